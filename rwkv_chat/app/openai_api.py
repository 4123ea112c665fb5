"""An OpenAI-compatible API on the page's own server: `GET /v1/models`, `POST /v1/chat/completions` and
`POST /v1/completions`, streaming (server-sent events) or not.

Promises:
- Requests are stateless; the engine is not. A chat request's messages become the conversation the page would
  have had (the model family's template, `System:` lines as the preamble with `User:/Assistant:`, messages
  cleaned as on the page), tokenised piece by piece as the engine caches them, so a client that resends the whole
  conversation each turn reads only its new tokens: after an answer the engine also caches the state after the
  answer as the next request will spell it. `usage.prompt_tokens_details.cached_tokens` says how many prompt
  tokens came from the cache.
- The models are the picker's (`/v1/models`, as --models restricts them); nothing else can be named (404
  model_not_found). A model that is not loaded starts loading and the request gets 503 with Retry-After (429
  with the seconds left while --load-cooldown refuses new loads); requests decode through the model's
  batcher, beside the page's chats, and `n` choices run as concurrent rows of it.
- Errors have OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`): 400 for a bad parameter or a
  prompt over the limits, 401 for a missing or wrong key, 404 for an unknown model, 429 when `max_waiting`
  requests already wait, 503 while the model loads or could not be loaded, or while the server shuts down (running
  requests are let finish: draining.py).
- `api_key` (the --api-key flag or RWKV_API_KEY) turns on bearer checks for every /v1 route, compared in constant
  time. A client that disconnects stops its generation. CORS is the server's (ui.launch: Gradio's rules, or the
  operator's --cors-origins).
- RWKV-7 G1 thinking: `think` ("off" / "think" / "fake think"; or OpenAI's `reasoning_effort`: "none" and
  "minimal" mean fake think, the others think) defaults to the family's; the reasoning is returned as
  `reasoning_content` beside `content`, never inside it.
Knows nothing of Gradio beyond the routes it hands to the server; the pool and the engines do the work.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import limits
from ..prompts import USER_ASSISTANT, answer_text, check_think, clean_message, get_template
from ..serving.engine import GenerationSettings
from ..serving.session import ChatSession, Turn
from .chat_defaults import defaults_for
from .chat_service import ChatSettings
from .draining import SHUTTING_DOWN, Admission
from .model_choices import ModelChoices, ModelKey
from .model_pool import LoadRefused

MAX_CHOICES = 8
OWNER = "rwkv-chat"


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable"}.get(self.status, "api_error")
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


@dataclass(frozen=True)
class Job:
    """One validated request: what to read and how to generate."""

    key: ModelKey
    session: ChatSession  # the conversation before the last user message (chat), or empty (completions)
    message: Optional[str]  # the last user message (chat); None for completions
    prompt_ids: tuple[int, ...]  # completions: the prompt's ids
    settings: GenerationSettings
    n: int
    stream: bool
    include_usage: bool


class OpenAIApi:
    def __init__(self, pool, choices: ModelChoices, device: str = "auto", dtype: str = "auto",
                 api_key: Optional[str] = None, max_waiting: int = 64, preamble: Optional[str] = None,
                 admission: Optional[Admission] = None):
        self.pool, self.choices = pool, choices
        self.admission = admission if admission is not None else Admission()
        self.device, self.dtype, self.api_key = device, dtype, api_key
        self.preamble = preamble
        self.max_waiting = max_waiting
        self._waiting = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ routes
    def router(self) -> APIRouter:
        router = APIRouter()
        router.add_api_route("/v1/models", self._wrap(self.models), methods=["GET"])
        router.add_api_route("/v1/chat/completions", self._wrap(self.chat_completions), methods=["POST"])
        router.add_api_route("/v1/completions", self._wrap(self.completions), methods=["POST"])
        return router

    def _wrap(self, handler):
        async def endpoint(request: Request):
            try:
                self._authorize(request)
                return await handler(request)
            except ApiError as error:
                return error.response()
        endpoint.__name__ = handler.__name__
        return endpoint

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    # ------------------------------------------------------------------------------------ endpoints
    async def models(self, request: Request):
        return {"object": "list", "data": [{"id": choice.value, "object": "model", "created": 0, "owned_by": OWNER}
                                           for choice in self.choices]}

    async def chat_completions(self, request: Request):
        body = await _json(request)
        key, choice = self._model(body)
        defaults = defaults_for(choice, self.preamble)
        think = _think(body, defaults.think)
        preamble, turns, message = _conversation(body.get("messages"), defaults.prompt_style)
        session = ChatSession(defaults.prompt_style, preamble or self.preamble)  # the operator's, without a system
        engine = self._engine(key)
        for user, assistant in turns:
            session = session.with_turn(history_turn(session, engine.tokenizer, user, assistant, think))
        job = Job(key, session, message, (), self._settings(body, defaults, think), *_n_stream(body))
        return await self._run(job, engine, chat=True)

    async def completions(self, request: Request):
        body = await _json(request)
        key, choice = self._model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt must be a non-empty string", "prompt")
        engine = self._engine(key)
        ids = tuple(engine.tokenizer.encode(prompt))
        if len(ids) > limits.MAX_MESSAGE_TOKENS * 4:
            raise ApiError(400, f"the prompt is {len(ids)} tokens long; the limit is {limits.MAX_MESSAGE_TOKENS * 4}",
                           "prompt", "context_length_exceeded")
        defaults = defaults_for(choice)
        settings = replace(self._settings(body, defaults, "off"), turn_ends_answer=False)
        return await self._run(Job(key, ChatSession(), None, ids, settings, *_n_stream(body)), engine, chat=False)

    # ------------------------------------------------------------------------------------ parts
    def _model(self, body: dict):
        name = body.get("model") or self.choices.default.value
        if not isinstance(name, str):
            raise ApiError(400, "model must be a string", "model")
        try:
            choice = self.choices.get(name)
            return self.choices.resolve(choice.value, self.device, self.dtype), choice
        except ValueError as error:
            raise ApiError(404, str(error), "model", "model_not_found") from None
        except Exception as error:  # noqa: BLE001 - e.g. CUDA asked for and missing
            raise ApiError(503, str(error), "model") from None

    def _engine(self, key: ModelKey):
        engine = self.pool.peek(key)
        if engine is not None:
            return engine
        failure = self.pool.error(key)
        if failure:
            raise ApiError(503, f"the model could not be loaded: {failure}", "model", "model_not_loaded")
        if not self.pool.is_loading(key):
            try:
                self.pool.preload(key)
            except LoadRefused as error:  # --load-cooldown: models already loaded stay usable
                raise ApiError(429, str(error), "model", "model_load_cooldown",
                               headers={"Retry-After": str(error.retry_after)}) from None
        raise ApiError(503, f"{key.choice} is loading; try again shortly", "model", "model_loading",
                       headers={"Retry-After": "5"})

    @staticmethod
    def _settings(body: dict, defaults: ChatSettings, think: str) -> GenerationSettings:
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "stop must be a string or a list of strings", "stop")
        def given(name: str):  # OpenAI's parameters are nullable: null means "the default", as when left out
            return getattr(defaults, name) if body.get(name) is None else body[name]

        fields = dict(max_new_tokens=limits.DEFAULT_NEW_TOKENS if limit is None else limit,
                      temperature=given("temperature"), top_p=given("top_p"), top_k=given("top_k"),
                      presence_penalty=given("presence_penalty"), frequency_penalty=given("frequency_penalty"),
                      penalty_decay=given("penalty_decay"),
                      seed=-1 if body.get("seed") is None else body.get("seed"), think=think)
        try:
            settings = replace(defaults, **fields).generation()
            return replace(settings, stop=tuple(stop))
        except (ValueError, TypeError) as error:
            param = next((name for name in fields if name in str(error)), None)
            raise ApiError(400, str(error), param) from None

    async def _run(self, job: Job, engine, chat: bool):
        if not self.admission.open:
            raise ApiError(503, SHUTTING_DOWN, code="shutting_down", headers={"Retry-After": "10"})
        with self._lock:
            if self._waiting >= self.max_waiting:
                raise ApiError(429, f"{self._waiting} requests are already being served; try again shortly",
                               code="too_many_requests", headers={"Retry-After": "1"})
            self._waiting += 1
        stops = [threading.Event() for _ in range(job.n)]
        try:
            runs = [self._start(job, engine, stop) for stop in stops]
        except ValueError as error:
            self._release()
            raise ApiError(400, str(error), "messages" if chat else "prompt") from None
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if job.stream:
            queue: asyncio.Queue = asyncio.Queue()
            self._pump(runs, queue, asyncio.get_running_loop())
            return StreamingResponse(self._events(job, engine, queue, stops, ident, chat),
                                     media_type="text/event-stream")
        try:
            finals = await asyncio.gather(*(asyncio.to_thread(_last, run) for run in runs))
        finally:
            for stop in stops:
                stop.set()
            self._release()
        for final in finals:
            self._cache_as_resent(job, engine, final)
        return _completion(job, ident, finals, chat)

    def _release(self) -> None:
        with self._lock:
            self._waiting -= 1

    def _start(self, job: Job, engine, stop: threading.Event) -> Iterator:
        if job.message is not None:
            run = engine.reply(job.session, job.message, job.settings, stop)
        else:
            run = engine.complete(job.prompt_ids, job.settings, stop)
        return self.admission.guarded(stop, run)

    def _pump(self, runs, queue: asyncio.Queue, loop) -> None:
        """Run each choice's generation in a thread of its own, its chunks into `queue` as (index, chunk,
        error), then (index, None, None). The request's slot is released when the last generation has ended,
        so it counts generations still running, a stopped one included until it has stopped."""
        remaining = [len(runs)]
        lock = threading.Lock()

        def pump(index: int, run) -> None:
            try:
                for chunk in run:
                    loop.call_soon_threadsafe(queue.put_nowait, (index, chunk, None))
            except Exception as error:  # noqa: BLE001 - reported in the stream
                loop.call_soon_threadsafe(queue.put_nowait, (index, None, error))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, (index, None, None))
                with lock:
                    remaining[0] -= 1
                    last = remaining[0] == 0
                if last:
                    self._release()

        for index, run in enumerate(runs):
            threading.Thread(target=pump, args=(index, run), daemon=True).start()

    async def _events(self, job: Job, engine, queue: asyncio.Queue, stops, ident: str, chat: bool):
        created = int(time.time())
        sent = [("", "")] * job.n  # (content, reasoning) sent so far per choice
        finals: list = [None] * job.n
        open_runs = job.n
        try:
            if chat:
                for index in range(job.n):
                    yield _sse(_chunk(ident, created, job, chat, index, {"role": "assistant", "content": ""}))
            while open_runs:
                index, chunk, error = await queue.get()
                if error is not None:
                    yield _sse({"error": {"message": str(error), "type": "api_error", "param": None, "code": None}})
                    continue
                if chunk is None:
                    open_runs -= 1
                    continue
                content = chunk.text if chat else chunk.written
                reasoning = chunk.reasoning if chat else ""
                old_content, old_reasoning = sent[index]
                delta = {}
                if reasoning != old_reasoning and reasoning.startswith(old_reasoning):
                    delta["reasoning_content"] = reasoning[len(old_reasoning):]
                if content != old_content and content.startswith(old_content):
                    delta["content" if chat else "text"] = content[len(old_content):]
                if delta:
                    sent[index] = (content, reasoning)
                    yield _sse(_chunk(ident, created, job, chat, index, delta))
                if chunk.done:
                    finals[index] = chunk
                    yield _sse(_chunk(ident, created, job, chat, index, {} if chat else {"text": ""},
                                      _finish(chunk)))
            done = [final for final in finals if final is not None]
            for final in done:
                await asyncio.to_thread(self._cache_as_resent, job, engine, final)
            if job.include_usage and len(done) == job.n:
                yield _sse({"id": ident, "object": _object(chat, stream=True), "created": created,
                            "model": job.key.choice, "choices": [], "usage": _usage(job, done)})
            yield "data: [DONE]\n\n"
        finally:  # also when the client went away: every generation stops (and then frees the slot)
            for stop in stops:
                stop.set()

    @staticmethod
    def _cache_as_resent(job: Job, engine, final) -> None:
        """Cache the state after this answer as a client will send it back next time (the answer's text
        re-encoded, the reasoning left out), so its next request reads only its new message."""
        if job.message is None or final.session is None or final.stats.stop_reason == "stopped":
            return
        turn = final.session.turns[-1]
        resent = history_turn(job.session, engine.tokenizer, job.message, turn.answer, job.settings.think)
        session = job.session.with_turn(resent)
        if session.context_ids(engine.tokenizer) != final.session.context_ids(engine.tokenizer):
            engine.remember(session)


def history_turn(session: ChatSession, tokenizer, message: str, answer: str, think: str) -> Turn:
    """A past turn as a client sends it back: its message and the visible answer. A thinking turn comes back
    without its reasoning, as if answered at once ("fake think")."""
    think = "fake think" if think != "off" else "off"
    prompt_ids = session.prompt_ids(tokenizer, message, think=think)
    fed = answer_text(answer)
    fed = ">" + fed if think == "fake think" else fed
    return Turn(message, prompt_ids, answer, tuple(tokenizer.encode(fed)) if fed else (), fed, "", think)


# ---------------------------------------------------------------------------------------- request parsing

async def _json(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _think(body: dict, default: str) -> str:
    think = body.get("think")
    effort = body.get("reasoning_effort")
    if think is None and effort is not None:
        think = "fake think" if effort in ("none", "minimal") else "think"
    try:
        return check_think(default if think is None else think)
    except ValueError as error:
        raise ApiError(400, str(error), "think") from None


def _text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if len(parts) == len(content):
            return "".join(parts)
    raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts",
                   f"messages[{index}].content")


def _conversation(messages, template_name: str) -> tuple[Optional[str], list[tuple[str, str]], str]:
    """(preamble, [(user, assistant), ...], last user message) from OpenAI messages."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    system, turns, user = [], [], None
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{index}] must be an object", f"messages[{index}]")
        role, text = message.get("role"), _text(message.get("content", ""), index)
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            user = text if user is None else f"{user}\n{text}"
        elif role == "assistant":
            if user is None:
                raise ApiError(400, f"messages[{index}]: an assistant message must follow a user message",
                               f"messages[{index}]")
            turns.append((user, text))
            user = None
        else:
            raise ApiError(400, f"messages[{index}].role must be system, developer, user or assistant",
                           f"messages[{index}].role")
    if user is None:
        raise ApiError(400, "the last message must be the user's", "messages")
    try:
        for past, _ in turns:
            clean_message(past)
        clean_message(user)
    except ValueError as error:
        raise ApiError(400, f"a user message is empty: {error}", "messages") from None
    text = "\n".join(s.strip() for s in system if s.strip())
    if len(text) > limits.MAX_PREAMBLE_CHARS:
        raise ApiError(400, f"the system text has {len(text)} characters; the limit is {limits.MAX_PREAMBLE_CHARS}",
                       "messages")
    if len(user) > limits.MAX_MESSAGE_CHARS:
        raise ApiError(400, f"the message has {len(user)} characters; the limit is {limits.MAX_MESSAGE_CHARS}",
                       "messages", "context_length_exceeded")
    preamble = None
    if text:
        preamble = f"System: {text}" if get_template(template_name) == USER_ASSISTANT else text
    return preamble, turns, user


def _n_stream(body: dict) -> tuple[int, bool, bool]:
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise ApiError(400, f"n must be a whole number from 1 to {MAX_CHOICES}", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    return n, stream, bool(isinstance(options, dict) and options.get("include_usage"))


# ---------------------------------------------------------------------------------------- responses

def _last(run):
    final = None
    for chunk in run:
        final = chunk
    return final


def _finish(chunk) -> str:
    return "length" if chunk.stats.stop_reason == "max_tokens" else "stop"


def _object(chat: bool, stream: bool = False) -> str:
    if chat:
        return "chat.completion.chunk" if stream else "chat.completion"
    return "text_completion"


def _usage(job: Job, finals) -> dict:
    stats = finals[0].stats
    completion = sum(final.stats.new_tokens for final in finals)
    return {"prompt_tokens": stats.context_tokens, "completion_tokens": completion,
            "total_tokens": stats.context_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": max(0, stats.context_tokens - stats.prefill_tokens)}}


def _message(final, chat: bool) -> dict:
    if not chat:
        return {"text": final.written}
    message = {"role": "assistant", "content": final.text}
    if final.reasoning:
        message["reasoning_content"] = final.reasoning
    return message


def _completion(job: Job, ident: str, finals, chat: bool) -> dict:
    choices = []
    for index, final in enumerate(finals):
        body = {"message": _message(final, True)} if chat else _message(final, False)
        choices.append({"index": index, **body, "finish_reason": _finish(final), "logprobs": None})
    return {"id": ident, "object": _object(chat), "created": int(time.time()), "model": job.key.choice,
            "choices": choices, "usage": _usage(job, finals)}


def _chunk(ident: str, created: int, job: Job, chat: bool, index: int, delta: dict,
           finish: Optional[str] = None) -> dict:
    choice = {"index": index, "delta": delta} if chat else {"index": index, **delta}
    choice.update(finish_reason=finish, logprobs=None)
    return {"id": ident, "object": _object(chat, stream=True), "created": created, "model": job.key.choice,
            "choices": [choice]}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
