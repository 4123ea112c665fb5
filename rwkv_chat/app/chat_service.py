"""Chat turns for the web app in plain Python: per-session values and the `ChatService` that answers,
retries, edits and undoes turns with models from the shared pool.

Promises:
- A browser session's chat is a `Conversation`: an immutable value (the model key, the token-exact
  `ChatSession`, the last stats line, its id and the settings of its last answer). Every method returns a new one;
  nothing is shared between sessions except the model pool and each engine's prefix-state cache (whose states are
  copies).
- `ChatService` saves a conversation to its store (conversation_store.py; given an id first) when a turn ends,
  when a stop ends it early, and on undo, clear and a model switch; `resume(id)` gives a saved one back, whose next
  turn rebuilds the state from its saved tokens on a cache miss. New answers are refused (ShuttingDown) once the
  admission closes for a shutdown, and running ones are counted so the drain can wait for them (draining.py).
- `SessionControl` is a session's stop button and its one-generation-at-a-time guard. Copying it (as
  gr.State does for each new browser session) gives a fresh one.
- Streams: `reply`/`retry`/`edit` check their input first (ValueError with a message for people; the
  conversation is unchanged) and return an iterator of `ChatUpdate`s. The last update carries the new
  conversation; when a stop was requested it holds the partial answer, and the state kept matches it.
- A conversation keeps the prompt style, preamble and start state it started with; a message sent with other
  ones starts a new conversation (the update's `notice` says so).
- The "messages" (Gradio's chat format) show user text as typed and answers as Markdown without raw HTML or
  remote images (display.py); stored texts and every API return the texts themselves.
- The stats line is the engine's (serving/engine.py): `prefill N tok` counts every token read before the
  first new token of the turn, the preamble's included when it had to be read.
Knows nothing of Gradio.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional

from .. import limits
from ..prompts import DEFAULT_TEMPLATE, TEMPLATES
from ..serving.engine import GenerationSettings
from ..serving.sampling import SamplingParams
from ..serving.session import ChatSession
from .display import answer_markdown, user_markdown
from .draining import Admission
from .model_choices import ModelKey

NO_SEED = -1
NUMBER_SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty",
                   "penalty_decay")  # and the seed, which may also be None (random)
MAX_SEED = 2**63 - 1  # torch.Generator's seeds are 64-bit


class Busy(RuntimeError):
    """This session is already generating an answer."""


@dataclass(frozen=True)
class ChatSettings:
    """Everything sent with a message (the page's sliders, or the API's arguments)."""

    max_new_tokens: int = limits.DEFAULT_NEW_TOKENS
    temperature: float = SamplingParams.temperature
    top_p: float = SamplingParams.top_p
    top_k: int = SamplingParams.top_k
    presence_penalty: float = SamplingParams.presence_penalty
    frequency_penalty: float = SamplingParams.frequency_penalty
    penalty_decay: float = SamplingParams.penalty_decay
    prompt_style: str = DEFAULT_TEMPLATE
    preamble: Optional[str] = None
    seed: int = NO_SEED  # negative = a fresh random seed each time
    think: str = "off"  # RWKV-7 G1 thinking: "off", "think" or "fake think" (prompts.THINK_PROMPTS)
    start_state: str = ""  # a state file the operator offers ("" = none); the engine refuses unknown names

    def generation(self) -> GenerationSettings:
        """The engine's settings; ValueError naming the first setting that is not valid. Each rule is checked
        once: whole numbers (which may arrive as floats from JSON or sliders) are converted here, what
        sampling itself needs by SamplingParams, max new tokens by GenerationSettings, and here the caps that
        the page and the API put on what a visitor may ask for (limits.py)."""
        for name in NUMBER_SETTINGS:
            checked_number(name, getattr(self, name))
        sampling = SamplingParams(self.temperature, self.top_p, _integer("top_k", self.top_k),
                                  self.presence_penalty, self.frequency_penalty, self.penalty_decay)
        for name, cap in (("temperature", limits.MAX_TEMPERATURE), ("top_k", limits.MAX_TOP_K),
                          ("presence_penalty", limits.MAX_PENALTY), ("frequency_penalty", limits.MAX_PENALTY)):
            if getattr(sampling, name) > cap:
                raise ValueError(f"{name} must be at most {cap}, got {getattr(sampling, name)}")
        seed = _integer("seed", NO_SEED if self.seed is None else self.seed)
        if not NO_SEED <= seed <= MAX_SEED:
            raise ValueError(f"seed must be between {NO_SEED} (random) and {MAX_SEED}, got {seed}")
        return GenerationSettings(sampling, _integer("max_new_tokens", self.max_new_tokens),
                                  None if seed < 0 else seed, self.think)

    def session_style(self) -> tuple[str, Optional[str], Optional[str]]:
        """(template, preamble, start state) a new conversation with these settings starts with."""
        if self.prompt_style not in TEMPLATES:
            raise ValueError(f"unknown prompt style {self.prompt_style!r}; choose one of: {', '.join(TEMPLATES)}")
        preamble = self.preamble if self.preamble and self.preamble.strip() else None
        if preamble is not None and len(preamble) > limits.MAX_PREAMBLE_CHARS:
            raise ValueError(f"the preamble has {len(preamble)} characters; the limit is "
                             f"{limits.MAX_PREAMBLE_CHARS}")
        if not isinstance(self.start_state, (str, type(None))):
            raise ValueError(f"start_state must be a state name, got {self.start_state!r}")
        return self.prompt_style, preamble, self.start_state or None


def checked_number(name: str, value) -> float:
    """`value` when it is a finite int or float; ValueError naming the setting otherwise (the one wording of this
    refusal, for the page, gradio_client and the OpenAI API)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number, got {'nothing' if value is None else repr(value)}")
    return value


def _check_message(message) -> None:
    if not isinstance(message, str):
        raise ValueError(f"message must be text, got {'nothing' if message is None else type(message).__name__}")


def _integer(name, value) -> int:
    if checked_number(name, value) != int(value):
        raise ValueError(f"{name} must be a whole number, got {value}")
    return int(value)


@dataclass(frozen=True)
class Conversation:
    model: Optional[ModelKey]
    session: ChatSession = field(default_factory=ChatSession)
    stats: str = ""
    id: str = ""  # given when it is first needed (saved, shown); the key of the conversation store
    settings: Optional[ChatSettings] = None  # those its last answer was written with

    def messages(self, turns: Optional[int] = None) -> list[dict]:
        """The chat as Gradio "messages": per turn the user's, the thinking (if any, collapsible) and the
        answer."""
        shown = []
        for turn in self.session.turns[:turns]:
            shown += [user_message(turn.message)] + answer_messages(turn.answer, turn.reasoning)
        return shown

    def turn_of_message(self, index: int) -> Optional[int]:
        """The turn whose user message is message `index` of `messages()`; None for any other message."""
        position = 0
        for turn_index, turn in enumerate(self.session.turns):
            if index == position:
                return turn_index
            position += 1 + len(answer_messages(turn.answer, turn.reasoning))
        return None

    def history(self) -> list[list[str]]:
        """[message, answer] per turn, plus the reasoning as a third item where the model thought."""
        return [[turn.message, turn.answer] + ([turn.reasoning] if turn.reasoning else [])
                for turn in self.session.turns]


def user_message(text: str) -> dict:
    """A user's message for the page: shown exactly as typed (display.user_markdown)."""
    return {"role": "user", "content": user_markdown(text)}


def assistant_message(text: str) -> dict:
    """An answer for the page: Markdown without raw HTML or remote images (display.answer_markdown)."""
    return {"role": "assistant", "content": answer_markdown(text)}


def answer_messages(answer: str, reasoning: str = "", thinking: bool = False) -> list[dict]:
    """The assistant's part of a turn: a collapsible "Thinking" message when there is reasoning, then the
    answer (left out while the model is still thinking and has written none)."""
    shown = []
    if reasoning or thinking:
        shown.append({"role": "assistant", "content": answer_markdown(reasoning),
                      "metadata": {"title": "Thinking", "status": "pending" if thinking else "done"}})
    if answer or not shown:
        shown.append(assistant_message(answer))
    return shown


@dataclass(frozen=True)
class ChatUpdate:
    conversation: Conversation  # before the answer while it streams; with it on the last update
    messages: list  # what the chat shows now
    answer: str  # the answer so far
    done: bool = False
    notice: str = ""
    reasoning: str = ""  # the thinking so far (never part of `answer`)


class SessionControl:
    """One browser session's stop request and generation guard (a fresh one per deepcopy)."""

    def __init__(self):
        self.stop_event = threading.Event()
        self._busy = threading.Lock()

    def __deepcopy__(self, memo) -> "SessionControl":
        return SessionControl()

    def request_stop(self) -> None:
        self.stop_event.set()

    @property
    def busy(self) -> bool:
        return self._busy.locked()

    @contextmanager
    def generating(self):
        """Hold the session's one generation slot; the stop request starts cleared."""
        if not self._busy.acquire(blocking=False):
            raise Busy("an answer is still being written in this conversation; wait for it or press Stop")
        self.stop_event.clear()
        try:
            yield self.stop_event
        finally:
            self._busy.release()


class ChatService:
    """Answers turns with the pool's models, saves each conversation to `store` when a turn ends (or is undone or
    cleared), and lets `admission` refuse new answers while the server drains. `store` None: nothing is saved."""

    def __init__(self, pool, store=None, admission: Optional[Admission] = None, log=print):
        self.pool = pool
        self.store = store
        self.admission = admission if admission is not None else Admission()
        self._log = log

    # ------------------------------------------------------------------------------------ conversations
    @staticmethod
    def start(model: Optional[ModelKey], settings: ChatSettings = ChatSettings()) -> Conversation:
        template, preamble, start_state = settings.session_style()
        return Conversation(model, ChatSession(template, preamble, start_state=start_state))

    @staticmethod
    def identified(conversation: Conversation) -> Conversation:
        """The conversation with an id (a new random one if it had none)."""
        return conversation if conversation.id else replace(conversation, id=uuid.uuid4().hex)

    def engine(self, conversation: Conversation, progress=None):
        if conversation.model is None:
            raise ValueError("no model is selected; pick one under Model and press Load")
        return self.pool.get(conversation.model, progress)

    def undo(self, conversation: Conversation) -> tuple[Conversation, str]:
        """Forget the last turn; returns the new conversation and the message of the forgotten turn."""
        turns = conversation.session.turns
        if not turns:
            return conversation, ""
        return self.save(replace(conversation, session=conversation.session.truncated(len(turns) - 1))), \
            turns[-1].message

    def cleared(self, conversation: Conversation) -> Conversation:
        return self.save(replace(conversation, session=conversation.session.truncated(0), stats=""))

    def switched(self, conversation: Conversation, model: ModelKey) -> Conversation:
        """A new start of the same conversation (id, style) with another model."""
        return self.save(replace(conversation, model=model, session=conversation.session.truncated(0), stats=""))

    # ------------------------------------------------------------------------------------ the store
    def save(self, conversation: Conversation) -> Conversation:
        """Write the conversation to the store (given an id first if it had none); returns it. A store that fails
        (a full disk) is reported on the console, and the chat goes on in memory."""
        conversation = self.identified(conversation)
        if self.store is not None:
            try:
                self.store.save(conversation)
            except (sqlite3.Error, OSError, RuntimeError) as error:
                self._log(f"rwkv-chat: could not save conversation {conversation.id}: {error}")
        return conversation

    def resume(self, conversation_id, fallback: Optional[ModelKey] = None) -> Conversation:
        """The saved conversation with this id; ValueError when there is none. Its model is kept when this server
        still offers it, else `fallback` continues it."""
        if not isinstance(conversation_id, str) or not conversation_id.strip():
            raise ValueError("conversation_id must be the id of a saved conversation (text)")
        found = self.store.load(conversation_id.strip()) if self.store is not None else None
        if found is None:
            raise ValueError(f"no saved conversation has the id {conversation_id.strip()!r}: it was deleted, or "
                             f"expired, or never existed on this server")
        return replace(found, model=found.model if self._offered(found.model) else fallback)

    def imported(self, conversation: Conversation, model: Optional[ModelKey]) -> Conversation:
        """An exported conversation (conversation_codec.from_json) continued here as a new one, with `model`."""
        return self.save(replace(conversation, id=uuid.uuid4().hex, model=model))

    def delete(self, conversation: Conversation) -> Conversation:
        """Forget the conversation (the store's copy too); returns a new empty one in the same style and model."""
        if self.store is not None and conversation.id:
            self.store.delete(conversation.id)
        session = conversation.session
        return Conversation(conversation.model, ChatSession(session.template, session.preamble,
                                                            start_state=session.start_state),
                            settings=conversation.settings)

    def _offered(self, key: Optional[ModelKey]) -> bool:
        if key is None:
            return False
        try:
            self.pool.choices.get(key.choice)
            return True
        except ValueError:
            return False

    # ------------------------------------------------------------------------------------ answers
    def reply(self, conversation: Conversation, message: str, settings: ChatSettings,
              stop: Optional[threading.Event] = None, progress=None) -> Iterator[ChatUpdate]:
        _check_message(message)
        generation = settings.generation()
        style = settings.session_style()
        self.admission.check()
        notice = ""
        session = conversation.session
        if style != (session.template, session.preamble, session.start_state):
            notice = "new conversation (prompt style, preamble or start state changed)" if session.turns else ""
            conversation = replace(conversation, session=ChatSession(style[0], style[1], start_state=style[2]))
        chunks = self.engine(conversation, progress).reply(conversation.session, message, generation, stop)
        return self._stream(conversation, len(conversation.session.turns), message, chunks, settings, stop, notice)

    def retry(self, conversation: Conversation, settings: ChatSettings,
              stop: Optional[threading.Event] = None, progress=None) -> Iterator[ChatUpdate]:
        turns = conversation.session.turns
        if not turns:
            raise ValueError("there is no answer to retry yet")
        generation = settings.generation()
        self.admission.check()
        chunks = self.engine(conversation, progress).regenerate(conversation.session, generation, stop)
        return self._stream(conversation, len(turns) - 1, turns[-1].message, chunks, settings, stop)

    def edit(self, conversation: Conversation, turn_index: int, message: str, settings: ChatSettings,
             stop: Optional[threading.Event] = None, progress=None) -> Iterator[ChatUpdate]:
        _check_message(message)
        turn_index = _integer("turn_index", turn_index)
        if not 0 <= turn_index < len(conversation.session.turns):
            raise ValueError(f"there is no message {turn_index} to edit (the conversation has "
                             f"{len(conversation.session.turns)} turns)")
        generation = settings.generation()
        self.admission.check()
        engine = self.engine(conversation, progress)
        chunks = engine.edit(conversation.session, turn_index, message, generation, stop)
        return self._stream(conversation, turn_index, message, chunks, settings, stop)

    def _stream(self, conversation: Conversation, keep_turns: int, message: str, chunks, settings: ChatSettings,
                stop: Optional[threading.Event], notice: str = "") -> Iterator[ChatUpdate]:
        conversation = self.identified(conversation)
        before = conversation.messages(keep_turns)
        base = replace(conversation, session=conversation.session.truncated(keep_turns))
        yield ChatUpdate(base, before + [user_message(message)], "", notice=notice)
        for chunk in self.admission.guarded(stop or threading.Event(), chunks):
            shown = before + [user_message(message)] + answer_messages(chunk.text, chunk.reasoning, chunk.thinking)
            if not chunk.done:
                yield ChatUpdate(base, shown, chunk.text, notice=notice, reasoning=chunk.reasoning)
                continue
            final = self.save(replace(conversation, session=chunk.session, stats=chunk.stats.line(),
                                      settings=settings))
            yield ChatUpdate(final, final.messages(), chunk.text, True, notice, chunk.reasoning)
