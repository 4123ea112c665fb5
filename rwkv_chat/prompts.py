"""Chat prompt text for RWKV: templates, user-message cleaning, stop rules.

Promises: the conversation text RWKV chat models were trained on, built from pieces the engine can
tokenize (and cache the state after) one at a time. The pieces join into the canonical text::

    preamble_text(p)                        "{preamble}\\n\\n"            (or "" without a preamble)
    + user_turn_text(t, q1)                 "Question: q1\\n\\nAnswer:"
    + answer_text(a1)                       " a1"          (what the model generates; the engine feeds it)
    + next_turn_text(t, q2)                 "\\n\\nQuestion: q2\\n\\nAnswer:"
    = "{preamble}\\n\\nQuestion: q1\\n\\nAnswer: a1\\n\\nQuestion: q2\\n\\nAnswer:"

An answer ends where the model writes the turn separator "\\n\\n" (``find_stop``) or end-of-text
(token ``tokenizer.EOT_ID``); the separator itself is not fed back, so every later turn starts with it.
No space follows the final colon: the model writes the leading space of its answer itself.

Thinking (RWKV-7 G1): a turn's prompt may end "Assistant: <think" (``think``: the model writes its reasoning,
"</think>", then the answer) or "Assistant: <think></think" ("fake think": no reasoning, the answer at once).
``split_reasoning`` separates what the model wrote into the reasoning and the answer people see; the state
carries everything as the model wrote it.

Does not know: tokens (beyond the end-of-text id), torch, length limits (the engine and UI own those).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterable, Mapping, Optional

TURN_SEPARATOR = "\n\n"
ANSWER_LEAD = " "  # the model starts its answer with a space after the assistant prefix

_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")  # two or more line breaks, blank lines possibly holding spaces
_EXTRA_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n){2,}")


@dataclass(frozen=True)
class PromptTemplate:
    """Role prefixes of one chat format. ``input_prefix`` is for templates with an optional input block."""

    name: str
    user_prefix: str  # e.g. "Question: "
    assistant_prefix: str  # e.g. "Answer:" (no trailing space)
    input_prefix: Optional[str] = None  # e.g. "Input: "


QUESTION_ANSWER = PromptTemplate("Question/Answer", "Question: ", "Answer:")
USER_ASSISTANT = PromptTemplate("User/Assistant", "User: ", "Assistant:")
INSTRUCTION_RESPONSE = PromptTemplate("Instruction/Response", "Instruction: ", "Response:", input_prefix="Input: ")

TEMPLATES: Mapping[str, PromptTemplate] = MappingProxyType(
    {t.name: t for t in (QUESTION_ANSWER, USER_ASSISTANT, INSTRUCTION_RESPONSE)}
)
DEFAULT_TEMPLATE = QUESTION_ANSWER.name

THINK_PROMPTS: Mapping[str, str] = MappingProxyType({"off": "", "think": " <think", "fake think": " <think></think"})
THINK_MODES = tuple(THINK_PROMPTS)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def check_think(mode: str) -> str:
    if mode not in THINK_PROMPTS:
        raise ValueError(f"think must be one of {', '.join(repr(m) for m in THINK_MODES)}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class Reasoned:
    """What the model wrote after the prompt, split for display."""

    reasoning: str  # the thinking ("" when there was none)
    answer: str  # what people see as the answer
    thinking: bool  # the reasoning is still open (no "</think>" yet)


def split_reasoning(generated: str, think: str = "off") -> Reasoned:
    """Split generated text into reasoning and answer. `think` is the turn's mode: after " <think" the model
    closes the tag (">") and reasons until "</think>"; after " <think></think" it closes that tag and answers;
    with thinking off a model may still open "<think>" itself, which is treated the same way."""
    text = generated
    if think == "fake think":
        text = text[1:] if text.startswith(">") else text
        return Reasoned("", text.strip(), False)
    if think == "think":
        text = text[1:] if text.startswith(">") else text
    elif text.lstrip().startswith(THINK_OPEN):
        text = text.lstrip()[len(THINK_OPEN):]
    else:
        return Reasoned("", strip_answer(text), False)
    reasoning, closed, answer = text.partition(THINK_CLOSE)
    return Reasoned(reasoning.strip(), answer.strip(), not closed)


def get_template(name: str) -> PromptTemplate:
    try:
        return TEMPLATES[name]
    except (KeyError, TypeError):
        known = ", ".join(repr(n) for n in TEMPLATES)
        raise ValueError(f"unknown prompt template {name!r}; known templates: {known}") from None


def _normalize_newlines(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def clean_message(text: str) -> str:
    """A user message fit for one turn: stripped, "\\r\\n"/"\\r" -> "\\n", blank lines removed.

    Runs of line breaks (with only spaces/tabs between them) become one "\\n", so the message holds no
    turn separator. Raises ValueError when nothing is left.
    """
    cleaned = _BLANK_LINES.sub("\n", _normalize_newlines(text))
    if not cleaned:
        raise ValueError("message is empty (only whitespace)")
    return cleaned


def preamble_text(preamble: Optional[str]) -> str:
    """The preamble (system text) followed by the turn separator, or "" for None/blank.

    Unlike a message, a preamble may keep paragraph breaks (e.g. few-shot turns); only line endings are
    normalised, it is stripped, and longer runs of blank lines shrink to one separator.
    """
    if preamble is None:
        return ""
    cleaned = _EXTRA_BLANK_LINES.sub(TURN_SEPARATOR, _normalize_newlines(preamble))
    return cleaned + TURN_SEPARATOR if cleaned else ""


def user_turn_text(template: PromptTemplate, message: str, input_text: Optional[str] = None,
                   think: str = "off") -> str:
    """One user turn up to the assistant prefix: "Question: {message}\\n\\nAnswer:" (plus " <think" or
    " <think></think" when `think` says so).

    ``input_text`` fills the template's input block ("Instruction: …\\n\\nInput: …\\n\\nResponse:");
    the block is left out when there is no input. Raises ValueError for a template without one.
    """
    parts = [template.user_prefix + clean_message(message)]
    if input_text is not None:
        if template.input_prefix is None:
            raise ValueError(f"template {template.name!r} has no input block")
        parts.append(template.input_prefix + clean_message(input_text))
    parts.append(template.assistant_prefix + THINK_PROMPTS[check_think(think)])
    return TURN_SEPARATOR.join(parts)


def first_turn_text(template: PromptTemplate, message: str, preamble: Optional[str] = None,
                    input_text: Optional[str] = None, think: str = "off") -> str:
    """The text of a new conversation: the preamble piece then the first user turn."""
    return preamble_text(preamble) + user_turn_text(template, message, input_text, think)


def separator_rest(fed_text: str) -> str:
    """The part of the turn separator still missing after ``fed_text`` (what the model state has seen last).

    "\n\n" normally; "\n" when the fed text already ends with one line break (e.g. the model wrote "\n"
    and then "\n" as separate tokens and only the second was held back); "" when it ends with "\n\n".
    """
    if fed_text.endswith(TURN_SEPARATOR):
        return ""
    return "\n" if fed_text.endswith("\n") else TURN_SEPARATOR


def next_turn_text(template: PromptTemplate, message: str, input_text: Optional[str] = None,
                   fed_text: str = "", think: str = "off") -> str:
    """A later user turn; starts with the separator that closes the previous answer.

    ``fed_text``: the end of the text already fed to the model (e.g. the previous answer as generated);
    only the missing part of the separator is added, see ``separator_rest``.
    """
    return separator_rest(fed_text) + user_turn_text(template, message, input_text, think)


def answer_text(answer: str) -> str:
    """The text following the assistant prefix for a finished answer, as the model would have written it.

    For rebuilding a conversation from history; the inverse of ``strip_answer``. Blank lines are
    removed as in ``clean_message`` (a generated answer never holds a separator); "" stays "".
    """
    cleaned = _BLANK_LINES.sub("\n", _normalize_newlines(answer))
    return ANSWER_LEAD + cleaned if cleaned else ""


def conversation_text(template: PromptTemplate, turns: Iterable[tuple[str, Optional[str]]],
                      preamble: Optional[str] = None) -> str:
    """The whole canonical text for (message, answer) turns; an answer of None leaves that turn open.

    Only the last turn may be open. Equals the concatenation of the per-turn pieces above.
    """
    pieces = [preamble_text(preamble)]
    open_turn = False
    for index, (message, answer) in enumerate(turns):
        if open_turn:
            raise ValueError("only the last turn may be without an answer")
        pieces.append((next_turn_text if index else user_turn_text)(template, message))
        if answer is None:
            open_turn = True
        else:
            pieces.append(answer_text(answer))
    if len(pieces) == 1:
        raise ValueError("a conversation needs at least one turn")
    return "".join(pieces)


def find_stop(text: str) -> Optional[int]:
    """Index of the first turn separator in generated text, or None."""
    index = text.find(TURN_SEPARATOR)
    return None if index < 0 else index


def stream_safe_length(text: str) -> int:
    """How much of generated text may be shown now: up to a stop, and never a trailing "\\n" that the next
    token could turn into the separator."""
    stop = find_stop(text)
    if stop is not None:
        return stop
    return len(text) - 1 if text.endswith("\n") else len(text)


def strip_answer(text: str) -> str:
    """Generated answer text for display: the leading space after the prefix and trailing whitespace removed."""
    if text.startswith(ANSWER_LEAD):
        text = text[len(ANSWER_LEAD):]
    return text.rstrip()
