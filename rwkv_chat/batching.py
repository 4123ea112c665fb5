"""Batched decoding for concurrent chats: many threads ask for one token each, one model call serves them all.

What this module promises:
- `DecodeBatcher(model).decode(token, state)` returns what `model.forward([token], state)` returns — fp32
  logits [vocab] and a new batch-1 `RwkvState` — so the two are interchangeable in a generation loop.
  Results equal the unbatched ones within the batched kernels' rounding (rows never mix).
- Many threads may call `decode` at once. A background worker takes whatever requests are waiting (up to
  `max_batch`) and runs them as one batched model call (`model.decode_batch`, or the fast path's
  `decode_states`, which skips stacking). It waits for more only while fewer requests are waiting than took
  part in the previous step (the chats still generating), and then no longer than those chats took to come
  back recently (at least `window_s`, at most MAX_FILL_WAIT_S). A lone chat never waits: while nothing else
  is queued or running it runs its own step in its own thread (`model.forward`). Sessions join and leave
  between steps freely.
- Errors reach the callers whose step failed; a bad request (token out of range, wrong state) fails alone,
  at once, in its own thread. `close()` serves what is queued, then stops the worker; later calls raise.
- The states passed in are never changed.

It knows the model's forward/decode_batch contract and RwkvState; nothing of text, sampling or sessions.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from .state import RwkvState

DEFAULT_MAX_BATCH = 32
DEFAULT_WINDOW_S = 0.002
MAX_FILL_WAIT_S = 0.010  # cap on the adaptive wait for the chats of the previous step


@dataclass
class _Request:
    token: int
    state: RwkvState
    done: threading.Event
    arrived: float = field(default_factory=time.monotonic)
    logits: torch.Tensor | None = None
    new_state: RwkvState | None = None
    error: BaseException | None = None


class BatcherClosed(RuntimeError):
    """decode() was called on a closed DecodeBatcher."""


class DecodeBatcher:
    """Groups concurrent single-token decode requests into batched model calls (see module docstring)."""

    def __init__(self, model, max_batch: int = DEFAULT_MAX_BATCH, window_s: float = DEFAULT_WINDOW_S):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model = model
        self.max_batch = max_batch
        self.window_s = window_s
        self._pending: list[_Request] = []
        self._wake = threading.Condition()
        self._closed = False
        self._last_batch = 0
        self._expected = 1  # requests the worker is waiting for (callers notify it when reached)
        self._busy = False  # a model call is running (the worker's, or a lone caller's own)
        self._fill_s = 0.0  # how long the previous step's chats took to come back (moving average)
        self._events = threading.local()  # one reusable Event per calling thread
        self.steps = 0  # model calls made (for stats)
        self.served = 0  # requests served
        self._worker = threading.Thread(target=self._serve, name="rwkv-decode-batcher", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------- callers
    def decode(self, token: int, state: RwkvState) -> tuple[torch.Tensor, RwkvState]:
        """One token after `state` (a batch of one) -> (fp32 logits [vocab], new state). Blocks until done."""
        state = self._validate(token, state)
        done = getattr(self._events, "event", None)
        if done is None:
            done = self._events.event = threading.Event()
        done.clear()  # a thread has one request at a time, so its event can be reused
        request = _Request(int(token), state, done)
        with self._wake:
            if self._closed:
                raise BatcherClosed("the decode batcher is closed")
            direct = not self._busy and not self._pending and self._last_batch <= 1
            if direct:  # a lone chat runs its own step: no hand-over to the worker and back
                self._busy = True
            else:
                self._pending.append(request)
                waiting = len(self._pending)
                if waiting == 1 or waiting >= self._expected:  # wake the worker only when it can act
                    self._wake.notify()
        if direct:
            return self._run_direct(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.logits, request.new_state

    def _run_direct(self, request: _Request) -> tuple[torch.Tensor, RwkvState]:
        try:
            return self.model.forward([request.token], request.state)
        finally:
            with self._wake:
                self._busy = False
                self._last_batch = 1
                self.steps += 1
                self.served += 1
                if self._pending:
                    self._wake.notify()

    def close(self, timeout: float | None = None) -> None:
        """Serve what is queued, then stop the worker thread. Idempotent."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)

    def __enter__(self) -> "DecodeBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _validate(self, token, state) -> RwkvState:
        vocab = self.model.config.vocab_size
        if not 0 <= int(token) < vocab:
            raise ValueError(f"token ids must be in [0, {vocab}); got {int(token)}")
        if not isinstance(state, RwkvState) or state.batch_size != 1:
            raise ValueError("decode takes the state of one sequence (an RwkvState with batch size 1)")
        prepare = getattr(self.model, "_prepare_state", None)
        return prepare(state, 1) if prepare is not None else state  # shape check, moved to the model's device

    # ------------------------------------------------------------------------------------------- worker
    def _next_batch(self) -> list[_Request] | None:
        with self._wake:
            while (not self._pending or self._busy) and not (self._closed and not self._busy):
                self._wake.wait()
            if not self._pending:
                return None  # closed and drained
            expected = max(1, min(self._last_batch, self.max_batch))
            first = self._pending[0].arrived
            # wait for the chats of the previous step: as long as they took to come back recently (they
            # sample between steps), at least window_s, at most MAX_FILL_WAIT_S
            allowed = max(self.window_s, min(MAX_FILL_WAIT_S, 1.5 * self._fill_s))
            self._expected = expected
            while len(self._pending) < expected and not self._closed:
                remaining = first + allowed - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.wait(remaining)
            self._expected = 1
            if expected > 1:  # learn how long the chats take to come back; a timeout means longer than allowed
                filled = len(self._pending) >= expected
                took = self._pending[expected - 1].arrived - first if filled else 1.5 * allowed
                self._fill_s = 0.7 * self._fill_s + 0.3 * took
            batch = self._pending[:self.max_batch]
            del self._pending[:self.max_batch]
            self._last_batch = len(batch)
            self._busy = True
            return batch

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except BaseException as error:  # every caller of this step learns why it failed
                for request in batch:
                    request.error = error
            finally:
                with self._wake:
                    self._busy = False
                    self.steps += 1
                    self.served += len(batch)
                for request in batch:
                    request.done.set()

    def _run(self, batch: list[_Request]) -> None:
        if len(batch) == 1:
            request = batch[0]
            request.logits, request.new_state = self.model.forward([request.token], request.state)
            return
        tokens = torch.tensor([r.token for r in batch], dtype=torch.long)
        runner = getattr(self.model, "runner", None)
        if runner is not None:  # the fast path takes the states as they are (no stack / unstack passes)
            logits, rows = runner.decode_states(tokens, [r.state for r in batch])
        else:
            logits, new_state = self.model.decode_batch(tokens, RwkvState.stack([r.state for r in batch]))
            rows = new_state.unstack()
        for i, (request, row) in enumerate(zip(batch, rows)):
            request.logits, request.new_state = logits[i], row
