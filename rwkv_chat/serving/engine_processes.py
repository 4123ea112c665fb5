"""Chat engines in worker processes, so that one server uses every core it is given.

A chat server's per-token work is Python (the batcher's loop, the judges, the prompt reads' layer calls) under one
interpreter lock, shared with the web server's threads: a small model on many cores leaves most of them idle
however many chats wait. `EngineProcesses` runs `processes` copies of the engine, each in its own spawned process
(its own interpreter, its own batcher, `threads` torch threads), and answers for all of them.

What it promises:
- `EngineProcesses(recipe, processes, threads)` starts the processes (spawned, never forked: a forked torch with
  running OpenMP threads can hang; the parent's main script is not imported there, so app.py builds no app in them)
  and returns once every one has built its engine with `recipe(progress)` (a picklable callable run in the process:
  it loads the model itself, so memory grows with the processes); the first builds alone (a download lands once),
  the rest together. `progress` lines of the build reach the caller's `progress`. A build that fails raises its
  error here, with every process stopped.
- It answers the ChatEngine calls the app makes, with the same results: `reply`, `regenerate`, `edit`, `complete`
  (iterators of ReplyChunk), `remember`, and `start_states`, `label`, `tokenizer` (the caller's own, for encoding),
  `model_bytes` (every copy's), `close()`. Errors raise in the caller with their type and message (a ValueError for
  a bad message, say), at the call when the engine raises at its call (the iterators' refusals), else from the
  iterator; ones that do not pickle raise as EngineProcessError with their text.
- A conversation stays with one process (its prefix-state cache is there): a conversation is known by its start
  state, preamble and first message (`conversation_key`); one not seen before (or forgotten: the newest
  ROUTES_KEPT are kept) goes to the process with the fewest calls in flight. A completion is known by its first
  COMPLETION_KEY_TOKENS prompt tokens.
- A `stop` event set in the caller stops the answer in its process (the reply ends as "stopped", as in process);
  a reader that leaves half-way (closes the iterator) stops it too. Chunks a slow reader has not taken are
  merged: it gets the newest, never an older one after a newer (each chunk holds the whole answer so far).
- A process that dies ends its calls in flight with EngineProcessError; its conversations move to the others
  (their states are rebuilt from their tokens: the same results), and calls fail only when no process is left.
  Another process is started in its place (a line on the output says so; at most MAX_RESTARTS in all, so that a
  process that dies at every start does not loop); `restarts` counts them.
  `close()` stops every process (calls in flight end with EngineProcessError) and is idempotent.

It knows the engine's call surface and the session's fields used for routing; nothing of models or Gradio.
"""

from __future__ import annotations

import itertools
import multiprocessing
import queue
import sys
import threading
import traceback
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

ROUTES_KEPT = 100_000  # conversations whose process is remembered
COMPLETION_KEY_TOKENS = 64
STOP_POLL_S = 0.05  # how often a waiting reader checks its stop event
MAX_RESTARTS = 16  # processes started again after one died, in the life of an EngineProcesses
_ITERATORS = ("reply", "regenerate", "edit", "complete")
_MAIN_HIDDEN = threading.Lock()  # held while a process starts with the main script hidden (_main_not_imported)


class EngineProcessError(RuntimeError):
    """An engine process died, was closed, or raised an error that could not be carried back."""


def conversation_key(session, message: str = "") -> tuple:
    """What routes a conversation to its process: it stays the same for every turn, retry and edit of it."""
    first = session.turns[0].message if session.turns else message
    return ("chat", session.start_state, session.preamble, session.template, first)


class EngineProcesses:
    def __init__(self, recipe: Callable, processes: int, threads: int, tokenizer=None,
                 progress: Optional[Callable[[str], None]] = None):
        if processes < 1 or threads < 1:
            raise ValueError(f"engine processes need at least 1 process and 1 thread each, got {processes} and "
                             f"{threads}")
        self.tokenizer = tokenizer
        self._context = multiprocessing.get_context("spawn")
        self._recipe, self._threads = recipe, threads
        self._lock = threading.Lock()
        self._routes: OrderedDict[tuple, int] = OrderedDict()
        self._closed = False
        self.restarts = 0
        self._workers: list[_Worker] = []
        try:
            first = self._start(0, progress)
            self._workers.append(first)
            first.wait_ready()
            rest = [self._start(i) for i in range(1, processes)]
            self._workers += rest
            for worker in rest:
                worker.wait_ready()
        except BaseException:
            self.close()
            raise
        self.label, self.start_states = first.label, first.start_states
        self.model_bytes = sum(worker.model_bytes for worker in self._workers)  # every copy's

    # ------------------------------------------------------------------------------------ the engine's calls
    def reply(self, session, message, settings, stop=None) -> Iterator:
        return self._stream(conversation_key(session, message), "reply", (session, message, settings), stop)

    def regenerate(self, session, settings, stop=None) -> Iterator:
        return self._stream(conversation_key(session), "regenerate", (session, settings), stop)

    def edit(self, session, turn_index, message, settings, stop=None) -> Iterator:
        key = conversation_key(session, message) if turn_index == 0 else conversation_key(session)
        return self._stream(key, "edit", (session, turn_index, message, settings), stop)

    def complete(self, prompt_ids, settings, stop=None) -> Iterator:
        key = ("completion", tuple(prompt_ids[:COMPLETION_KEY_TOKENS]))
        return self._stream(key, "complete", (tuple(prompt_ids), settings), stop)

    def remember(self, session) -> int:
        return self._call(conversation_key(session), "remember", (session,))

    @property
    def processes(self) -> int:
        return len(self._live())

    def pids(self) -> list[int]:
        return [worker.process.pid for worker in self._live()]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._workers)
        for worker in workers:
            worker.close()

    # ------------------------------------------------------------------------------------ processes
    def _start(self, index: int, progress=None) -> "_Worker":
        return _Worker(self._context, self._recipe, self._threads, index, progress, on_death=self._replace)

    def _replace(self, dead: "_Worker") -> None:
        """A process that died after it was ready: start another in its place (in a thread: this runs in the dead
        one's receiver), at most MAX_RESTARTS times."""
        with self._lock:
            exiting = not threading.main_thread().is_alive()  # the interpreter's exit ends daemon processes
            if self._closed or exiting or self.restarts >= MAX_RESTARTS:
                return
            self.restarts += 1
        print(f"rwkv-chat: engine process {dead.index} stopped (exit code {dead.process.exitcode}); starting "
              "another", flush=True)

        def start() -> None:
            worker = self._start(dead.index)
            try:
                worker.wait_ready()
            except BaseException as error:  # noqa: BLE001 - the others go on serving
                print(f"rwkv-chat: engine process {dead.index} could not be started again: {error}", flush=True)
                worker.close()
                dead.close()
                return
            with self._lock:
                closed = self._closed
                if not closed:
                    self._workers[dead.index] = worker
            (worker if closed else dead).close()  # the dead one's pipe, or the new one when all are closed
        threading.Thread(target=start, name=f"restart engine {dead.index}", daemon=True).start()

    # ------------------------------------------------------------------------------------ routing
    def _live(self) -> list["_Worker"]:
        return [worker for worker in self._workers if worker.alive]

    def _worker_for(self, key: tuple) -> "_Worker":
        with self._lock:
            if self._closed:
                raise EngineProcessError("the engine processes are closed")
            live = self._live()
            if not live:
                raise EngineProcessError("every engine process has stopped")
            index = self._routes.get(key)
            worker = self._workers[index] if index is not None else None
            if worker is None or not worker.alive:
                worker = min(live, key=lambda w: w.in_flight)
                self._routes[key] = worker.index
            self._routes.move_to_end(key)
            while len(self._routes) > ROUTES_KEPT:
                self._routes.popitem(last=False)
            return worker

    def _call(self, key, method, args):
        return self._worker_for(key).call(method, args, None).result()

    def _stream(self, key, method, args, stop) -> Iterator:
        """The call's chunks; as in the engine, a call it refuses (a bad message, say) raises here, at once."""
        call = self._worker_for(key).call(method, args, stop)
        call.result()  # "started", or its error
        return call.chunks()


class _Call:
    """One call in flight in a worker: its messages arrive on a queue (filled by the worker's receiver)."""

    def __init__(self, worker: "_Worker", ident: int, stop: Optional[threading.Event]):
        self.worker, self.ident, self.stop = worker, ident, stop
        self.messages: queue.Queue = queue.Queue()

    def result(self):
        kind, payload = self.messages.get()
        if kind == "error":
            raise payload
        return payload

    def chunks(self) -> Iterator:
        stopped = False
        try:
            while True:
                if not stopped and self.stop is not None and self.stop.is_set():
                    stopped = True
                    self.worker.send(("stop", self.ident))
                try:
                    kind, payload = self.messages.get(timeout=STOP_POLL_S)
                except queue.Empty:
                    continue
                if kind == "chunk":  # merge: the newest chunk of those waiting
                    while True:
                        try:
                            newer = self.messages.get_nowait()
                        except queue.Empty:
                            break
                        if newer[0] != "chunk":
                            self.messages.put(newer)  # put back at the end: the only other message is the last
                            break
                        payload = newer[1]
                    yield payload
                elif kind == "error":
                    raise payload
                else:  # "end"
                    return
        finally:
            if self.worker.finish(self.ident):  # the reader left before the end: stop the answer there
                self.worker.send(("stop", self.ident))


class _Worker:
    """One engine process and the parent's end of its pipe."""

    def __init__(self, context, recipe, threads: int, index: int, progress, on_death=None):
        self.index, self.progress, self.on_death = index, progress, on_death
        self.alive = False
        self.label, self.start_states, self.model_bytes = "", (), 0
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._calls_lock = threading.Lock()
        self._ready = threading.Event()
        self._closing = False
        self._failure: Optional[BaseException] = None
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, recipe, threads), daemon=True,
                                       name=f"rwkv-chat engine {index}")
        with _main_not_imported():
            self.process.start()
        child.close()
        self._receiver = threading.Thread(target=self._receive, name=f"engine {index} receiver", daemon=True)
        self._receiver.start()

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    def wait_ready(self) -> None:
        self._ready.wait()
        if self._failure is not None:
            raise self._failure

    def send(self, message) -> None:
        try:
            with self._send_lock:
                self.connection.send(message)
        except (OSError, ValueError):  # the process is gone: its calls end through the receiver
            pass

    def call(self, method: str, args: tuple, stop: Optional[threading.Event]) -> _Call:
        with self._calls_lock:
            call = _Call(self, next(self._ids), stop)
            self._calls[call.ident] = call
        if not self.alive:
            self.finish(call.ident)
            raise EngineProcessError(f"engine process {self.index} has stopped")
        self.send(("call", call.ident, method, args))
        return call

    def finish(self, ident: int) -> bool:
        """Forget a call; True if it was still in flight."""
        with self._calls_lock:
            return self._calls.pop(ident, None) is not None

    def close(self) -> None:
        self._closing = True
        self.send(("close",))
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self.connection.close()
        self._receiver.join(timeout=5)

    def _receive(self) -> None:
        try:
            while True:
                message = self.connection.recv()
                kind = message[0]
                if kind == "progress":
                    if self.progress is not None:
                        self.progress(message[1])
                elif kind == "ready":
                    self.label, self.start_states, self.model_bytes = message[1:4]
                    self.alive = True
                    self._ready.set()
                elif kind == "failed":
                    self._failure = message[1]
                    self._ready.set()
                    return
                else:
                    ident = message[1]
                    with self._calls_lock:
                        call = self._calls.get(ident)
                        if kind in ("end", "error", "result"):
                            self._calls.pop(ident, None)
                    if call is not None:
                        call.messages.put((kind, message[2] if kind != "end" else None))
        except (EOFError, OSError):
            pass
        finally:
            was_ready = self.alive
            self.alive = False
            if self._failure is None and not self._ready.is_set():
                self._failure = EngineProcessError(f"engine process {self.index} exited while building its engine")
            self._ready.set()
            with self._calls_lock:
                calls, self._calls = list(self._calls.values()), {}
            for call in calls:
                call.messages.put(("error", EngineProcessError(f"engine process {self.index} stopped during the "
                                                               "call")))
            if was_ready and not self._closing and self.on_death is not None:
                self.process.join(timeout=5)  # for its exit code
                self.on_death(self)


@contextmanager
def _main_not_imported():
    """A spawned process imports the parent's main script first, unless the script is hidden from it: app.py
    builds a whole app when imported (a Space needs `demo` at module level), which an engine process must not.
    What it runs comes from this package, so it needs nothing of the script."""
    main = sys.modules.get("__main__")
    if main is None:  # an embedding interpreter without one: nothing to hide
        yield
        return
    with _MAIN_HIDDEN:
        saved = {name: main.__dict__[name] for name in ("__file__", "__spec__") if name in main.__dict__}
        try:
            main.__dict__.pop("__file__", None)
            main.__spec__ = None
            yield
        finally:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


# ---------------------------------------------------------------------------------------- in the process
def _serve(connection, recipe, threads: int) -> None:
    """The engine process: build the engine, then run each call in a thread of its own until told to close."""
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent closes us
    torch.set_num_threads(threads)
    send_lock = threading.Lock()

    def send(message) -> None:
        with send_lock:
            connection.send(message)

    try:
        engine = recipe(lambda line: send(("progress", line)))
    except BaseException as error:  # noqa: BLE001 - carried to the parent, which raises it
        send(("failed", _portable(error)))
        return
    send(("ready", engine.label, tuple(engine.start_states), engine.model_bytes))
    stops: dict[int, threading.Event] = {}
    stops_lock = threading.Lock()

    def run(ident: int, method: str, args: tuple) -> None:
        try:
            if method in _ITERATORS:
                stream = getattr(engine, method)(*args, stop=stops[ident])  # a refusal raises here
                send(("started", ident, None))
                try:
                    for chunk in stream:
                        send(("chunk", ident, chunk))
                finally:
                    stream.close()
                send(("end", ident))
            else:
                send(("result", ident, getattr(engine, method)(*args)))
        except Exception as error:  # noqa: BLE001 - raised again in the caller
            send(("error", ident, _portable(error)))
        finally:
            with stops_lock:
                stops.pop(ident, None)

    try:
        while True:
            message = connection.recv()
            if message[0] == "close":
                break
            if message[0] == "stop":
                with stops_lock:
                    event = stops.get(message[1])
                if event is not None:
                    event.set()
                continue
            _, ident, method, args = message
            with stops_lock:
                stops[ident] = threading.Event()
            threading.Thread(target=run, args=(ident, method, args), daemon=True, name=f"call {ident}").start()
    except (EOFError, OSError):  # the parent is gone
        pass
    finally:
        with stops_lock:
            for event in stops.values():
                event.set()
        engine.close()


def _portable(error: BaseException) -> BaseException:
    """`error` if it pickles (its type and message reach the caller), else an EngineProcessError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        text = "".join(traceback.format_exception_only(type(error), error)).strip()
        return EngineProcessError(text)
