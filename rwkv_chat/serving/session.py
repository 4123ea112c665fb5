"""One conversation as tokens: what was said, and exactly which token ids the model read for it.

A `ChatSession` is immutable: every change (a new turn, undo, edit, retry) returns a new session, so a UI can
keep one per browser session in its state and nothing is shared by accident. The token ids of each piece are
kept as they were fed (the answer's ids are the sampled ones, never a re-encoding of the text), so the
conversation's tokens — and therefore the RNN state they lead to — can always be rebuilt exactly.

Pieces, per `prompts`: [preamble] then for each turn the user turn up to the assistant prefix
(`Question: …\\n\\nAnswer:`, preceded from the second turn on by the separator that closes the previous
answer) and the answer as generated (without the stop separator, which is never fed).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from ..prompts import DEFAULT_TEMPLATE, first_turn_text, get_template, next_turn_text, preamble_text, \
    user_turn_text


@dataclass(frozen=True)
class Turn:
    message: str  # the user's message as typed
    prompt_ids: tuple[int, ...]  # separator (from turn 2) + user turn + assistant prefix
    answer: str  # the answer as shown
    answer_ids: tuple[int, ...]  # tokens fed for the answer
    fed_text: str  # the answer's text exactly as fed (decides the next separator)
    stop_reason: str = ""
    think: str = "off"  # the thinking mode its prompt ended with (prompts.THINK_PROMPTS)
    reasoning: str = ""  # the thinking the model wrote before `answer`, if any


@dataclass(frozen=True)
class ChatSession:
    template: str = DEFAULT_TEMPLATE
    preamble: Optional[str] = None
    turns: tuple[Turn, ...] = field(default_factory=tuple)
    start_state: Optional[str] = None  # the state file the conversation starts from (the engine's name for it)

    def __post_init__(self):
        get_template(self.template)  # unknown names fail here, with the list of known ones

    # ------------------------------------------------------------------------------------ tokens
    def preamble_ids(self, tokenizer) -> tuple[int, ...]:
        text = preamble_text(self.preamble)
        return tuple(tokenizer.encode(text)) if text else ()

    def context_ids(self, tokenizer, turns: Optional[int] = None) -> tuple[int, ...]:
        """Every token fed for the preamble and the first `turns` turns (all by default)."""
        return self.preamble_ids(tokenizer) + self.turn_ids(turns)

    def turn_ids(self, turns: Optional[int] = None) -> tuple[int, ...]:
        """Every token fed for the first `turns` turns (all by default), without the preamble's."""
        return tuple(token for turn in self.turns[:turns] for token in turn.prompt_ids + turn.answer_ids)

    def prompt_ids(self, tokenizer, message: str, after: Optional[int] = None, think: str = "off") -> tuple[int, ...]:
        """Tokens of a new user turn placed after the first `after` turns (default: after all of them)."""
        template = get_template(self.template)
        previous = self.turns[:after][-1:] if after is None or after > 0 else ()
        if previous:
            return tuple(tokenizer.encode(next_turn_text(template, message, fed_text=previous[0].fed_text,
                                                         think=think)))
        return tuple(tokenizer.encode(user_turn_text(template, message, think=think)))

    def text(self) -> str:
        """The whole conversation as the model read it (for display and debugging)."""
        pieces = [preamble_text(self.preamble)]
        template = get_template(self.template)
        for index, turn in enumerate(self.turns):
            previous = self.turns[index - 1].fed_text if index else None
            pieces.append(next_turn_text(template, turn.message, fed_text=previous, think=turn.think) if index
                          else first_turn_text(template, turn.message, think=turn.think))
            pieces.append(turn.fed_text)
        return "".join(pieces)

    # ------------------------------------------------------------------------------------ changes
    def with_turn(self, turn: Turn) -> "ChatSession":
        return replace(self, turns=self.turns + (turn,))

    def truncated(self, n_turns: int) -> "ChatSession":
        """The session with only its first `n_turns` turns (undo, edit and retry start from here)."""
        if not 0 <= n_turns <= len(self.turns):
            raise IndexError(f"the conversation has {len(self.turns)} turns, cannot keep {n_turns}")
        return replace(self, turns=self.turns[:n_turns])

    def history(self) -> list[tuple[str, str]]:
        return [(turn.message, turn.answer) for turn in self.turns]
