"""Batched decoding for concurrent chats: many threads ask for one token each, one model call serves them all.

What this module promises:
- `DecodeBatcher(model).decode(token, state)` returns what `model.forward([token], state)` returns — fp32
  logits [vocab] and a new batch-1 `RwkvState` — so the two are interchangeable in a generation loop.
  Results equal the unbatched ones within the batched kernels' rounding (rows never mix).
- `step(token, state, sampler)` also picks the chat's next token from those logits with its
  `sampling.Sampler` and returns `(next_token, logits, new_state)`. The worker samples the whole batch at
  once (`sampling.sample_batch`: a fixed number of device kernels and one host sync per step, whatever the
  batch size), so per chat and token only O(1) Python work is left between steps; a chat draws exactly
  the token `Sampler.sample` would draw from its logits row (see `sampling`). The sampler's penalties are
  read, not updated: the caller records each token it keeps before the step that feeds it.
- Many threads may call `decode` / `step` at once. A background worker takes whatever requests are waiting
  (up to `max_batch`) and runs them as one batched model call (`model.decode_batch`, or the fast path's
  `decode_states`, which skips stacking). It waits for more only while fewer requests are waiting than there
  are chats still generating — the waiting ones plus those served earlier that have not come back yet (so
  chats that fell into two alternating half-batches merge again) — and then no longer than the chats took
  to come back recently (at least `window_s`, at most MAX_FILL_WAIT_S); chats that miss that wait count as
  gone until they come back. A lone chat never waits: while nothing else is queued or running it runs its
  own step (and its own sampling) in its own thread (`model.forward`). Sessions join and leave between
  steps freely.
- Look-ahead (`look_ahead=True`, the default): right after a batched step the worker starts the next model
  step of every chat it sampled for, feeding the token it just drew, so the device runs it while the chats
  are away doing their own bookkeeping (the round trip of 32 Python threads takes about as long as a 1.5B
  model step). A chat that then asks for exactly that step — the state object it was handed and the token
  drawn — gets it without another model call (only the sampling, with its penalties as they are by then,
  waits for it); anything else (another token, a stop) gets a fresh step and the look-ahead is dropped, so
  results never depend on it. It costs a wasted row of model work for each chat that stops, and device
  memory for one more state per chat until the look-ahead is taken or dropped (two steps later).
- Errors reach the callers whose step failed; a bad request (token out of range, wrong state) fails alone,
  at once, in its own thread, and a row that cannot be sampled (e.g. NaN logits) fails alone too.
  `close()` serves what is queued, then stops the worker; later calls raise.
- The states passed in are never changed; the logits rows handed back may be views of one batch tensor.

It knows the model's forward/decode_batch contract, RwkvState and the sampling module's batch interface;
nothing of text or sessions.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from .sampling import Sampler, sample_batch
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
    sampler: Sampler | None = None  # set by step(): sample the next token too
    logits: torch.Tensor | None = None
    new_state: RwkvState | None = None
    next_token: int | None = None
    error: BaseException | None = None


@dataclass
class _Ahead:
    """A step computed before it was asked for: `token` fed after `state` (the state a caller was handed)."""
    state: RwkvState
    token: int
    logits: torch.Tensor  # [V]
    new_state: RwkvState
    generation: int  # which look-ahead call made it


class BatcherClosed(RuntimeError):
    """decode() was called on a closed DecodeBatcher."""


class DecodeBatcher:
    """Groups concurrent single-token decode requests into batched model calls (see module docstring)."""

    def __init__(self, model, max_batch: int = DEFAULT_MAX_BATCH, window_s: float = DEFAULT_WINDOW_S,
                 look_ahead: bool = True):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model = model
        self.max_batch = max_batch
        self.window_s = window_s
        self.look_ahead = look_ahead
        self._ahead: dict[int, _Ahead] = {}  # id(state handed out) -> its next step; the worker's alone
        self._generation = 0
        self._pending: list[_Request] = []
        self._wake = threading.Condition()
        self._closed = False
        self._last_batch = 0
        self._expected = 1  # requests the worker is waiting for (callers notify it when reached)
        self._busy = False  # a model call is running (the worker's, or a lone caller's own)
        self._fill_s = 0.0  # how long the previous step's chats took to come back (moving average)
        self._away = 0  # requests served whose callers have not asked again yet (the chats still generating)
        self._events = threading.local()  # one reusable Event per calling thread
        self.steps = 0  # batched steps served (each a model call, or look-aheads taken up)
        self.served = 0  # requests served
        self.ahead_used = 0  # requests served from a look-ahead
        self._worker = threading.Thread(target=self._serve, name="rwkv-decode-batcher", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------- callers
    def decode(self, token: int, state: RwkvState) -> tuple[torch.Tensor, RwkvState]:
        """One token after `state` (a batch of one) -> (fp32 logits [vocab], new state). Blocks until done."""
        request = self._submit(token, state, None)
        return request.logits, request.new_state

    def step(self, token: int, state: RwkvState, sampler: Sampler) -> tuple[int, torch.Tensor, RwkvState]:
        """`decode`, then the next token drawn from the new logits with `sampler`:
        -> (next token, fp32 logits [vocab], new state). Blocks until done."""
        if not isinstance(sampler, Sampler):
            raise ValueError(f"step needs a sampling.Sampler, got {type(sampler).__name__}")
        request = self._submit(token, state, sampler)
        return request.next_token, request.logits, request.new_state

    def _submit(self, token, state, sampler) -> _Request:
        state = self._validate(token, state)
        done = getattr(self._events, "event", None)
        if done is None:
            done = self._events.event = threading.Event()
        done.clear()  # a thread has one request at a time, so its event can be reused
        request = _Request(int(token), state, done, sampler=sampler)
        with self._wake:
            if self._closed:
                raise BatcherClosed("the decode batcher is closed")
            self._away = max(0, self._away - 1)  # one of them (or a newcomer) is back
            direct = (not self._busy and not self._pending and self._last_batch <= 1
                      and id(state) not in self._ahead)
            if direct:  # a lone chat runs its own step: no hand-over to the worker and back
                self._busy = True
            else:
                self._pending.append(request)
                waiting = len(self._pending)
                if waiting == 1 or waiting >= self._expected:  # wake the worker only when it can act
                    self._wake.notify()
        if direct:
            self._run_direct(request)
        else:
            request.done.wait()
        if request.error is not None:
            raise request.error
        return request

    def _run_direct(self, request: _Request) -> None:
        try:
            request.logits, request.new_state = self.model.forward([request.token], request.state)
        finally:
            with self._wake:
                self._busy = False
                self._last_batch = 1
                self._away += 1
                self.steps += 1
                self.served += 1
                if self._pending:
                    self._wake.notify()
        if request.sampler is not None:  # outside the busy section: others may start a step meanwhile
            request.next_token = request.sampler.sample(request.logits)

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
            expected = max(1, min(len(self._pending) + self._away, self.max_batch))
            first = self._pending[0].arrived
            # wait for the chats still generating: as long as they took to come back recently (they do
            # their own bookkeeping between steps), at least window_s, at most MAX_FILL_WAIT_S
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
                if not filled:
                    self._away = 0  # those still out count as gone; each one that comes back counts again
            batch = self._pending[:self.max_batch]
            del self._pending[:self.max_batch]
            self._last_batch = len(batch)
            self._busy = True
            return batch

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                self._ahead.clear()
                return
            try:
                self._run(batch)
                if self.look_ahead:  # launched before the chats wake: their threads would slow every launch
                    self._compute_ahead(batch)
            except BaseException as error:  # every caller of this step learns why it failed
                for request in batch:
                    request.error = error
            finally:
                with self._wake:
                    self._busy = False
                    self._away += len(batch)
                    self.steps += 1
                    self.served += len(batch)
                for request in batch:
                    request.done.set()

    def _forward(self, tokens: list[int], states: list[RwkvState]) -> tuple[torch.Tensor, list[RwkvState]]:
        """One model call for len(tokens) chats -> (logits [n, V], n new batch-1 states)."""
        if len(tokens) == 1:
            logits, state = self.model.forward(tokens, states[0])
            return logits.unsqueeze(0), [state]
        ids = torch.tensor(tokens, dtype=torch.long)
        runner = getattr(self.model, "runner", None)
        if runner is not None:  # the fast path takes the states as they are (no stack / unstack passes)
            return runner.decode_states(ids, states)
        logits, new_state = self.model.decode_batch(ids, RwkvState.stack(states))
        return logits, new_state.unstack()

    def _run(self, batch: list[_Request]) -> None:
        fresh = []
        for request in batch:
            ahead = self._ahead.pop(id(request.state), None)
            if ahead is not None and ahead.state is request.state and ahead.token == request.token:
                request.logits, request.new_state = ahead.logits, ahead.new_state
            else:
                fresh.append(request)
        self.ahead_used += len(batch) - len(fresh)
        logits = None
        if fresh:
            logits, states = self._forward([r.token for r in fresh], [r.state for r in fresh])
            for i, request in enumerate(fresh):
                request.logits, request.new_state = logits[i], states[i]  # [V] views of the batch's logits
        self._sample(batch, logits if len(fresh) == len(batch) else None)

    @staticmethod
    def _sample(batch: list[_Request], logits: torch.Tensor | None) -> None:
        """Next tokens of the requests that asked for one, all rows in one batched call; a row that cannot
        be sampled fails alone (its caller gets the ValueError). `logits`: the batch's [B, V] logits when
        they are one tensor in batch order (else the rows are gathered)."""
        wanted = [i for i, r in enumerate(batch) if r.sampler is not None]
        if not wanted:
            return
        if logits is None:
            rows = torch.stack([batch[i].logits for i in wanted])  # [n, V]
        else:
            rows = logits if len(wanted) == len(batch) else logits[wanted]  # [n, V]
        tokens = sample_batch(rows, [batch[i].sampler for i in wanted], errors="return")
        for i, token in zip(wanted, tokens):
            if isinstance(token, ValueError):
                batch[i].error = token
            else:
                batch[i].next_token = token

    def _compute_ahead(self, batch: list[_Request]) -> None:
        """Start the next step of every chat just sampled for (see the module docstring)."""
        chats = [r for r in batch if r.sampler is not None and r.error is None and r.next_token is not None]
        self._generation += 1
        for key in [k for k, ahead in self._ahead.items() if ahead.generation < self._generation - 1]:
            del self._ahead[key]  # nobody came back for these
        if not chats:
            return
        try:
            logits, states = self._forward([r.next_token for r in chats], [r.new_state for r in chats])
        except Exception:  # the step runs again when asked for, and its caller learns what is wrong
            return
        for i, request in enumerate(chats):
            self._ahead[id(request.new_state)] = _Ahead(request.new_state, request.next_token, logits[i],
                                                        states[i], self._generation)
