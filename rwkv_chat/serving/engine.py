"""The chat engine: prefill through the prefix-state cache, then streaming generation, in token ids.

What it promises:
- The engine owns a whole turn: callers hand it the conversation and the message, and get the streamed answer
  and, on the last chunk, the new conversation and the turn's final stats.
- A new turn reads only the tokens the conversation does not already have a state for: the state after the
  previous answer (or after the shared preamble, or after the prompt being retried) comes from the cache, so
  time to first token does not grow with the length of the chat. The state after a preamble is cached on its
  own, so every conversation with the same preamble reads it once (`warm_preamble` pins the operator's);
  `prefill N tok` counts every token read for the turn, the preamble's included when it had to be read. On a
  cache miss the state is rebuilt from the session's tokens, with the same result.
- Generation streams text as it decodes (never a broken multi-byte character), stops at the turn separator,
  end-of-text (token 0, never shown), the token limit, a stop string of the settings, or a stop request, and the
  state it keeps always matches the tokens it keeps (the stop separator is not fed; text that shares its token
  is). `complete` continues plain text, where only stop strings, end-of-text and the limit end it.
- Nothing here touches a session in place: each reply hands back a new `ChatSession`.
- `remember(session)` caches the state after a whole conversation handed in from outside (e.g. history a client
  sends back), so its next turn reads only its new message; `close()` stops the decoder; `model_bytes` is what the
  model's weights and buffers take.
- Start states (state files): `add_start_state(name, state)` registers an initial state; a session whose
  `start_state` names it begins there instead of from zeros. The cache keys such a conversation's tokens after
  a pseudo-token of its own (a negative id, pinned with the state), so conversations from different start
  states never share a cached prefix.
- The token loop runs in the decoder (`generation.DirectDecoder` in the reader's thread, or a
  `batching.DecodeBatcher` that runs many chats' loops as batched steps); the reply's bookkeeping is its
  judge (`AnswerJudge`), which decides every token in whatever thread runs the loop. Penalties count a token
  before the step that feeds it, so the next sample sees them; a reply runs exactly one model step per kept
  token. A reader slower than the decoder gets several tokens per chunk.
- Prompts are read by the decoder (`read`), one at a time: concurrent turns queue for the read (a batcher on the
  CPU reads them in its worker, between the decode steps of the chats already answering), then decode in the
  decoder (together, in a batcher). Time to first token counts that wait.

It knows tokens, a tokenizer and a model; it knows nothing of Gradio or of other sessions.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from .. import limits
from ..prompts import TURN_SEPARATOR, check_think, find_stop, split_reasoning
from ..tokenizer import EOT_ID
from .generation import DirectDecoder, Verdict
from .sampling import PenaltyState, Sampler, SamplingParams, penalty_exempt_mask
from .session import ChatSession, Turn
from .state_cache import StateCache


@dataclass(frozen=True)
class GenerationSettings:
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = limits.DEFAULT_NEW_TOKENS
    seed: Optional[int] = None
    think: str = "off"  # how the turn's prompt ends: prompts.THINK_PROMPTS
    stop: tuple[str, ...] = ()  # more strings that end the answer (not kept, like the turn separator)
    turn_ends_answer: bool = True  # the turn separator "\n\n" ends the answer (off for plain completions)

    def __post_init__(self):
        check_think(self.think)
        if len(self.stop) > limits.MAX_STOP_STRINGS or any(not s or len(s) > limits.MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop takes at most {limits.MAX_STOP_STRINGS} non-empty strings of at most "
                             f"{limits.MAX_STOP_CHARS} characters")
        if not 1 <= self.max_new_tokens <= limits.MAX_NEW_TOKENS:
            raise ValueError(f"max new tokens must be between 1 and {limits.MAX_NEW_TOKENS}, "
                             f"got {self.max_new_tokens}")


@dataclass(frozen=True)
class ReplyStats:
    prefill_tokens: int  # tokens read before the first new token of this turn
    ttft_s: float
    new_tokens: int
    decode_s: float
    state_bytes: int
    stop_reason: str  # "separator", "end_of_text", "max_tokens", "stopped"
    model_label: str
    context_tokens: int = 0  # tokens the answer was conditioned on (preamble, earlier turns, the prompt)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def line(self) -> str:
        stopped = " · stopped" if self.stop_reason == "stopped" else ""
        return (f"prefill {self.prefill_tokens} tok · TTFT {self.ttft_s:.2f} s · {self.new_tokens} tok at "
                f"{self.tokens_per_s:.0f} tok/s · state {self.state_bytes / 1e6:.1f} MB · {self.model_label}"
                f"{stopped}")


@dataclass(frozen=True)
class ReplyChunk:
    text: str  # the answer so far, as shown
    done: bool = False
    session: Optional[ChatSession] = None  # the conversation with this answer, on the last chunk
    stats: Optional[ReplyStats] = None  # on the last chunk
    reasoning: str = ""  # the thinking so far (kept out of `text`)
    thinking: bool = False  # the model is still thinking
    written: str = ""  # everything generated so far, exactly as written (for plain completions)


class AnswerJudge:
    """One reply's per-token bookkeeping, as the decoder's judge (`generation`): stop rules, the streamed
    text, the kept ids and the penalties. Written only by the thread that runs the loop; the reader reads
    `text`, which is always whole characters."""

    def __init__(self, tokenizer, penalties: PenaltyState, max_new_tokens: int, stop: threading.Event,
                 stop_strings: tuple[str, ...] = (), turn_ends_answer: bool = True):
        self.stream = tokenizer.stream_decoder()
        self.penalties, self.max_new_tokens, self.stop = penalties, max_new_tokens, stop
        self.stop_strings, self.turn_ends_answer = stop_strings, turn_ends_answer
        # how far back from the text's end a stop can begin and still end in the next piece
        lengths = ([len(TURN_SEPARATOR)] if turn_ends_answer else []) + [len(s) for s in stop_strings]
        longest = max(lengths, default=1)
        self._reach = max(0, longest - 1)
        self.ids: list[int] = []  # every token kept (and fed)
        self.text = ""  # their decoded text
        self.reason = "max_tokens"
        self.first_token_at: Optional[float] = None
        self.separator: Optional[tuple[str, int]] = None  # (the refused token's text, where the stop begins)

    def accept(self, token: int, logits: torch.Tensor) -> Verdict:
        if self.stop.is_set():
            self.reason = "stopped"
            return Verdict.STOP
        self.first_token_at = self.first_token_at or time.perf_counter()
        if token == EOT_ID:
            self.reason = "end_of_text"
            return Verdict.STOP
        piece = self.stream.push(token)
        cut = self._find_stop(piece)
        if cut is not None:
            self.reason, self.separator = "separator", (piece, cut)
            return Verdict.STOP
        self.penalties.update(token)  # before the step: the token sampled after it must see this one
        self.ids.append(token)
        self.text += piece
        return Verdict.LAST if len(self.ids) == self.max_new_tokens else Verdict.FEED

    def _find_stop(self, piece: str) -> Optional[int]:
        """Where the answer ends in `self.text + piece`: the first turn separator (if it ends answers) or stop
        string. The text so far holds none (it would have ended there), so only a stop that `piece` completes can
        be new: the search covers the piece and the text's last characters that such a stop can begin in (a
        search of the whole text took a 4,000-token answer's judge from 3 to 11 us a token)."""
        start = max(0, len(self.text) - self._reach)
        window = self.text[start:] + piece
        cuts = [find_stop(window)] if self.turn_ends_answer else []
        cuts += [index for index in (window.find(s) for s in self.stop_strings) if index >= 0]
        cuts = [cut for cut in cuts if cut is not None]
        return start + min(cuts) if cuts else None


class ChatEngine:
    def __init__(self, model, tokenizer, label: str = "", cache_bytes: int = limits.STATE_CACHE_BYTES,
                 decoder=None):
        self.model = model
        self.tokenizer = tokenizer
        self.label = label
        self.cache = StateCache(cache_bytes)
        self.decoder = decoder or DirectDecoder(model)
        self._exempt = penalty_exempt_mask(
            ((i, tokenizer.token_bytes(i)) for i in range(1, tokenizer.max_token_id + 1)),
            model.config.vocab_size)
        # ids the model can score but the tokenizer cannot decode (65530..65535 in World models) are never drawn
        self._unknown_ids = tuple(range(tokenizer.max_token_id + 1, model.config.vocab_size))
        self._start_keys: dict[str, tuple[int]] = {}  # start state name -> its cache key, (negative id,)

    # ------------------------------------------------------------------------------------ start states
    def add_start_state(self, name: str, state) -> None:
        """Offer `state` (batch 1, this model's shape) as the start of conversations whose start_state is `name`."""
        if name in self._start_keys:
            raise ValueError(f"a start state called {name!r} is already registered")
        if state.batch_size != 1:
            raise ValueError(f"a start state holds one sequence, not {state.batch_size}")
        key = (-1 - len(self._start_keys),)
        self.cache.put(key, state, torch.zeros(self.model.config.vocab_size), pinned=True)
        self._start_keys[name] = key

    @property
    def start_states(self) -> tuple[str, ...]:
        return tuple(self._start_keys)

    def _start_key(self, session: ChatSession) -> tuple[int, ...]:
        if session.start_state is None:
            return ()
        try:
            return self._start_keys[session.start_state]
        except KeyError:
            offered = ", ".join(repr(name) for name in self._start_keys) or "none"
            raise ValueError(f"start state {session.start_state!r} is not offered for this model (it offers: "
                             f"{offered})") from None

    # ------------------------------------------------------------------------------------ prefill
    def prefill(self, ids, pin: bool = False):
        """State and logits after `ids`, reading only what the cache does not cover.

        `ids` may begin with a start state's key (`_start_key`), which is always cached and never read.
        Returns (logits [vocab], state, number of tokens read)."""
        ids = tuple(ids)
        if not ids:
            raise ValueError("nothing to read")
        hit = self.cache.longest_prefix(ids, device=self.model.device)
        if ids[0] < 0 and hit is None:
            raise RuntimeError("the start state's cache entry is missing")
        if hit is not None and hit.length == len(ids):
            if pin:
                self.cache.put(ids, hit.state, hit.logits, pinned=True)
            return hit.logits, hit.state, 0
        start, state = (hit.length, hit.state) if hit is not None else (0, None)
        logits, state = self.decoder.read(list(ids[start:]), state)
        self.cache.put(ids, state, logits, pinned=pin)
        return logits, state, len(ids) - start

    def remember(self, session: ChatSession) -> int:
        """Cache the state after the whole of `session` (as if it had just been answered), so that its next turn
        reads only its new message; returns how many tokens had to be read."""
        ids = self._start_key(session) + session.context_ids(self.tokenizer)
        return self.prefill(ids)[2] if ids else 0

    @property
    def model_bytes(self) -> int:
        """The bytes of the model's weights and buffers."""
        return sum(t.numel() * t.element_size() for t in list(self.model.parameters()) + list(self.model.buffers()))

    def close(self) -> None:
        """Stop the decoder (a batcher's worker); answers in flight end with its error."""
        close = getattr(self.decoder, "close", None)
        if close is not None:
            close()

    def warm_preamble(self, session: ChatSession) -> int:
        """Compute (once, for every session) and pin the state after the session's preamble; returns how many
        tokens had to be read."""
        return self._read_preamble(self._start_key(session), session.preamble_ids(self.tokenizer), pin=True)

    def _read_preamble(self, start: tuple[int, ...], preamble_ids: tuple[int, ...], pin: bool = False) -> int:
        """Cache the state after a preamble on its own, so every conversation with it reuses it (pinned: the
        operator's, kept for good; a user's may be evicted); returns how many tokens had to be read."""
        return self.prefill(start + preamble_ids, pin=pin)[2] if preamble_ids else 0

    # ------------------------------------------------------------------------------------ replies
    def reply(self, session: ChatSession, message: str, settings: GenerationSettings,
              stop: Optional[threading.Event] = None) -> Iterator[ReplyChunk]:
        """Answer `message` as the next turn of `session`."""
        return self._answer(session, len(session.turns), message, settings, stop)

    def complete(self, prompt_ids, settings: GenerationSettings,
                 stop: Optional[threading.Event] = None) -> Iterator[ReplyChunk]:
        """Continue `prompt_ids` as plain text (no chat template); the chunks' `written` is the continuation."""
        prompt_ids = tuple(prompt_ids)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        return self._generate(ChatSession(), "", prompt_ids, settings, stop or threading.Event())

    def regenerate(self, session: ChatSession, settings: GenerationSettings,
                   stop: Optional[threading.Event] = None) -> Iterator[ReplyChunk]:
        """Answer the last user message again, from the state right after its prompt."""
        if not session.turns:
            raise ValueError("there is no answer to regenerate")
        return self._answer(session, len(session.turns) - 1, session.turns[-1].message, settings, stop)

    def edit(self, session: ChatSession, turn_index: int, message: str, settings: GenerationSettings,
             stop: Optional[threading.Event] = None) -> Iterator[ReplyChunk]:
        """Replace user message `turn_index` (and drop everything after it), then answer it."""
        if not 0 <= turn_index < len(session.turns):
            raise IndexError(f"no turn {turn_index} in a conversation of {len(session.turns)} turns")
        return self._answer(session, turn_index, message, settings, stop)

    def _answer(self, session, keep_turns, message, settings, stop) -> Iterator[ReplyChunk]:
        if len(message) > limits.MAX_MESSAGE_CHARS:
            raise ValueError(f"the message has {len(message)} characters; the limit is {limits.MAX_MESSAGE_CHARS}")
        base = session.truncated(keep_turns)
        self._start_key(base)  # an unknown start state is refused before anything runs
        prompt_ids = base.prompt_ids(self.tokenizer, message, think=settings.think)  # ValueError if empty
        if len(prompt_ids) > limits.MAX_MESSAGE_TOKENS:
            raise ValueError(f"the message is {len(prompt_ids)} tokens long; the limit is "
                             f"{limits.MAX_MESSAGE_TOKENS}")
        return self._generate(base, message, prompt_ids, settings, stop or threading.Event())

    def _generate(self, base: ChatSession, message: str, prompt_ids, settings,
                  stop: threading.Event) -> Iterator[ReplyChunk]:
        started = time.perf_counter()
        preamble_ids = base.preamble_ids(self.tokenizer)  # tokenised once a turn
        start = self._start_key(base)
        ids = start + preamble_ids + base.turn_ids() + prompt_ids
        read = self._read_preamble(start, preamble_ids)
        logits, state, rest = self.prefill(ids)
        read += rest
        generator = torch.Generator().manual_seed(settings.seed) if settings.seed is not None else None
        penalties = PenaltyState.from_params(settings.sampling, self.model.config.vocab_size, self._exempt)
        sampler = Sampler(settings.sampling, generator, penalties, self._unknown_ids)
        judge = AnswerJudge(self.tokenizer, penalties, settings.max_new_tokens, stop, settings.stop,
                            settings.turn_ends_answer)
        run = self.decoder.generate(logits, state, sampler, judge)
        try:
            for _ in run:
                written = _shown(judge.text, settings.stop)
                shown = split_reasoning(written, settings.think)
                yield ReplyChunk(shown.answer, reasoning=shown.reasoning, thinking=shown.thinking, written=written)
        finally:
            run.close()  # a reader that leaves half-way stops the loop
        logits, state, answer_ids, text = run.logits, run.state, judge.ids, judge.text
        written = text
        if judge.separator is not None:
            logits, state, answer_ids, text = self._feed_before_separator(text, *judge.separator, logits,
                                                                          state, answer_ids)
            written = text[:judge.separator[1]]  # a stop string may begin in text already fed: it is not shown
        else:
            text += judge.stream.flush()
            written = text
        finished = time.perf_counter()
        first_token_at = judge.first_token_at or finished
        split = split_reasoning(written, settings.think)
        turn = Turn(message, prompt_ids, split.answer, tuple(answer_ids), text, judge.reason, settings.think,
                    split.reasoning)
        all_ids = ids + turn.answer_ids
        self.cache.put(all_ids, state, logits)
        stats = ReplyStats(read, first_token_at - started, len(answer_ids), finished - first_token_at,
                           state.nbytes, judge.reason, self.label, len(ids) - len(start))
        yield ReplyChunk(turn.answer, True, base.with_turn(turn), stats, turn.reasoning, split.thinking, written)

    def _feed_before_separator(self, text, piece, cut, logits, state, answer_ids):
        """The token that completed the separator is not fed; text it carried before the separator is
        (re-encoded), so the state matches the kept answer exactly."""
        kept = text + piece[:max(0, cut - len(text))]
        extra = self.tokenizer.encode(kept[len(text):]) if cut > len(text) else []
        if extra:
            logits, state = self.decoder.read(extra, state)
        return logits, state, answer_ids + list(extra), kept


def _shown(text: str, stop_strings: tuple[str, ...] = ()) -> str:
    """Hold back one trailing newline (the next token may make it the separator) and any end of the text that
    may be the start of a stop string."""
    held = 1 if text.endswith("\n") else 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return text[:len(text) - held] if held else text
