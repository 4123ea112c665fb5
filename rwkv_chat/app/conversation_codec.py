"""A conversation as JSON (export, import, and the rows of the conversation store), and back.

Promises:
- `to_json(conversation)` gives a plain dict (format FORMAT, version VERSION): the id, the model key, the last
  settings used, the stats line, and the session: template, preamble, start state and every turn with the exact
  token ids the model read (prompt and answer), so the RNN state can be rebuilt exactly from it.
- `from_json(data)` (or `parsed(text or data)`) checks everything it reads (it may come from a visitor's import): unknown formats or
  versions, missing or mistyped fields, token ids that are not whole numbers in [0, MAX_TOKEN_ID], more turns or
  text than limits.py allows; ValueError names the field. It never evaluates anything it reads.
Knows nothing of storage, Gradio or models (which model may be used is the caller's decision).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

from .. import limits
from ..prompts import get_template
from ..serving.session import ChatSession, Turn
from .chat_service import ChatSettings, Conversation
from .model_choices import ModelKey

FORMAT = "rwkv-chat conversation"
VERSION = 1
MAX_TOKEN_ID = 2**31 - 1  # the model checks ids against its own vocabulary when it reads them
MAX_TURNS = 10_000
_TURN_TEXTS = ("message", "answer", "fed_text", "stop_reason", "think", "reasoning")


def to_json(conversation: Conversation) -> dict:
    session = conversation.session
    model = conversation.model
    return {
        "format": FORMAT, "version": VERSION, "id": conversation.id,
        "model": None if model is None else dataclasses.asdict(model),
        "settings": None if conversation.settings is None else dataclasses.asdict(conversation.settings),
        "stats": conversation.stats,
        "session": {
            "template": session.template, "preamble": session.preamble, "start_state": session.start_state,
            "turns": [{**{name: getattr(turn, name) for name in _TURN_TEXTS},
                       "prompt_ids": list(turn.prompt_ids), "answer_ids": list(turn.answer_ids)}
                      for turn in session.turns],
        },
    }


def from_json(data: Any) -> Conversation:
    """The conversation `data` describes; ValueError naming what is wrong."""
    _require(isinstance(data, dict), "a conversation must be a JSON object")
    _require(data.get("format") == FORMAT, f"not an exported conversation (its 'format' must be {FORMAT!r})")
    _require(data.get("version") == VERSION,
             f"conversation format version {data.get('version')!r} is not supported (this server reads {VERSION})")
    session = _field(data, "session", dict)
    turns = _field(session, "turns", list)
    _require(len(turns) <= MAX_TURNS, f"the conversation has {len(turns)} turns; the limit is {MAX_TURNS}")
    preamble = _optional_text(session, "preamble", limits.MAX_PREAMBLE_CHARS)
    template = _text(session, "template", where="session")
    try:
        get_template(template)
    except (KeyError, ValueError) as error:
        raise ValueError(f"session.template: {error}") from None
    chat = ChatSession(template, preamble, tuple(_turn(turn, index) for index, turn in enumerate(turns)),
                       _optional_text(session, "start_state", 200))
    return Conversation(_model(data.get("model")), chat, _text(data, "stats", limit=1000, default=""),
                        _text(data, "id", limit=100, default=""), _settings(data.get("settings")))


def parsed(value: Any) -> Conversation:
    """`from_json` of an export given as JSON text (the page's box, an API string) or as decoded JSON."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("paste an exported conversation (JSON) first")
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"the text is not JSON ({error})") from None
    return from_json(value)


def _turn(turn: Any, index: int) -> Turn:
    where = f"turn {index}"
    _require(isinstance(turn, dict), f"{where} must be an object")
    texts = {name: _text(turn, name, limit=limits.MAX_MESSAGE_CHARS * 8,
                         default="" if name in ("stop_reason", "reasoning") else ("off" if name == "think" else None),
                         where=where) for name in _TURN_TEXTS}
    return Turn(texts["message"], _ids(turn, "prompt_ids", where), texts["answer"], _ids(turn, "answer_ids", where),
                texts["fed_text"], texts["stop_reason"], texts["think"], texts["reasoning"])


def _ids(turn: dict, name: str, where: str) -> tuple[int, ...]:
    ids = _field(turn, name, list, where)
    for token in ids:
        _require(isinstance(token, int) and not isinstance(token, bool) and 0 <= token <= MAX_TOKEN_ID,
                 f"{where}.{name} must hold token ids (whole numbers from 0 to {MAX_TOKEN_ID}), found {token!r}")
    return tuple(ids)


def _model(model: Any) -> Optional[ModelKey]:
    if model is None:
        return None
    _require(isinstance(model, dict) and set(model) == {"choice", "device", "dtype"}
             and all(isinstance(v, str) for v in model.values()),
             "model must be an object with the text fields choice, device and dtype")
    return ModelKey(**model)


def _settings(settings: Any) -> Optional[ChatSettings]:
    if settings is None:
        return None
    _require(isinstance(settings, dict), "settings must be an object")
    known = {f.name for f in dataclasses.fields(ChatSettings)}
    unknown = sorted(set(settings) - known)
    _require(not unknown, f"settings has unknown fields: {', '.join(unknown)}")
    chosen = ChatSettings(**settings)
    chosen.generation()  # every bound, with the message the page and the API give
    return chosen


def _field(data: dict, name: str, kind: type, where: str = ""):
    value = data.get(name)
    label = f"{where}.{name}" if where else name
    _require(isinstance(value, kind), f"{label} is missing or is not a {kind.__name__}")
    return value


def _text(data: dict, name: str, limit: int = 10_000, default: Optional[str] = None, where: str = "") -> str:
    label = f"{where}.{name}" if where else name
    value = data.get(name, default)
    _require(isinstance(value, str), f"{label} is missing or is not text")
    _require(len(value) <= limit, f"{label} has {len(value)} characters; the limit is {limit}")
    return value


def _optional_text(data: dict, name: str, limit: int) -> Optional[str]:
    return None if data.get(name) is None else _text(data, name, limit)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
