"""Batched decoding for concurrent chats: one worker runs the token loop of every chat, all of them in one
sampling call and one model step per token.

What this module promises:
- `DecodeBatcher(model).generate(logits, state, sampler, judge)` returns a `generation.Generation`, the
  interface `generation.DirectDecoder` has, so a reply runs the same way with or without batching. Each
  chat gets the tokens, logits and states it gets alone, up to the batched kernels' rounding (rows never
  mix; bit for bit in fp32 on the CPU, tested).
- The worker runs every chat still generating (up to `max_batch`; later ones wait for a free row) in
  lockstep: one `sampling.sample_batch` over all their logits rows, then one batched model step
  (`model.decode_batch`) feeding every token drawn, then each chat's judge on its token while the device
  runs that step (a refused token wastes its row of the step). Chats join and leave between steps; a chat
  never waits for company. A chat's own thread only waits for progress: the per-token work of a reply
  (its judge: stop rules, detokenising, penalties) runs in the worker, so no thread round trip sits
  between two steps. Readers are woken after the step is launched, at most every WAKE_INTERVAL_S while
  their chat generates (each wake costs the worker a thread switch; the page shows 20 updates a second at
  most anyway), and sampling builds its host-side inputs while that step runs on the device.
- The batch's states stay stacked in the worker between steps (rows are gathered again only when chats
  join or leave); a chat's state and logits are copied out when it ends.
- Errors: a bad call (a state of another shape or batch size, logits that are not [vocab], no Sampler, no
  judge) raises at once in its caller; a row that cannot be sampled (e.g. NaN logits) or a judge that
  raises ends only its own chat, with that error; a failed step (the model's or the sampling's) ends
  every chat of that step with its error, and the batcher goes on serving. `close()` ends every chat in
  flight with BatcherClosed and stops the worker; later calls raise it at once. The states and logits
  passed in are never changed.

It knows the model's decode_batch contract, RwkvState, the sampling module's batch interface and the
generation protocol; nothing of text or sessions.
"""

from __future__ import annotations

import threading
import time
from typing import Iterator, Optional

import torch

from ..state import RwkvState
from .generation import Generation, Verdict
from .sampling import Sampler, sample_batch

DEFAULT_MAX_BATCH = 32
WAKE_INTERVAL_S = 0.02  # a reader is woken at most this often while its chat generates (always when it ends)


class BatcherClosed(RuntimeError):
    """The DecodeBatcher was closed before or while this chat generated."""


class _Chat(Generation):
    """One chat in the batcher: written by the worker, read by the chat's own thread."""

    def __init__(self, logits: torch.Tensor, state: RwkvState, sampler: Sampler, judge):
        self.logits: Optional[torch.Tensor] = logits  # [V] the next token is drawn from (while queued)
        self.state: Optional[RwkvState] = state  # batch of one (while queued)
        self.sampler, self.judge = sampler, judge
        self.accepted = 0  # tokens the judge kept so far
        self.finished = False
        self.error: Optional[BaseException] = None
        self.cancelled = False  # set by the reader: the worker drops the chat before its next step
        self.progress = threading.Event()
        self.woken = 0.0  # when the worker last woke the reader (time.monotonic)

    def __iter__(self) -> Iterator[None]:
        seen = 0
        try:
            while True:
                self.progress.wait()
                self.progress.clear()  # anything the worker writes after this sets it again
                accepted, finished = self.accepted, self.finished
                if accepted > seen:
                    seen = accepted
                    yield
                if finished:
                    break
        finally:
            self.close()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if not self.finished:
            self.cancelled = True

    def end(self, logits: Optional[torch.Tensor] = None, state: Optional[RwkvState] = None,
            error: Optional[BaseException] = None) -> None:
        """Record the result (copies of the rows given) or the error; the reader is woken by the caller."""
        self.logits = logits.clone() if logits is not None else None
        self.state = state.clone() if state is not None else None
        self.error = error
        self.finished = True


class DecodeBatcher:
    """Runs the token loops of concurrent chats as batched steps (see the module docstring)."""

    def __init__(self, model, max_batch: int = DEFAULT_MAX_BATCH):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model = model
        self.max_batch = max_batch
        self._incoming: list[_Chat] = []
        self._wake = threading.Condition()
        self._closed = False
        self.steps = 0  # batched model steps run
        self.served = 0  # rows fed in them (served / steps = the mean batch)
        self._worker = threading.Thread(target=self._serve, name="rwkv-decode-batcher", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------- callers
    def generate(self, logits: torch.Tensor, state: RwkvState, sampler: Sampler, judge) -> Generation:
        """Start a chat's loop from the logits [vocab] and the batch-of-one state after its prompt."""
        if not isinstance(sampler, Sampler):
            raise ValueError(f"generate needs a sampling.Sampler, got {type(sampler).__name__}")
        if not callable(getattr(judge, "accept", None)):
            raise ValueError(f"generate needs a judge with accept(token, logits), got {type(judge).__name__}")
        chat = _Chat(self._check_logits(logits), self._check_state(state), sampler, judge)
        with self._wake:
            if self._closed:
                raise BatcherClosed("the decode batcher is closed")
            self._incoming.append(chat)
            self._wake.notify()
        return chat

    def close(self, timeout: float | None = None) -> None:
        """End every chat in flight (BatcherClosed) and stop the worker thread. Idempotent."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)

    def __enter__(self) -> "DecodeBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_state(self, state) -> RwkvState:
        if not isinstance(state, RwkvState) or state.batch_size != 1:
            raise ValueError("generate takes the state of one sequence (an RwkvState with batch size 1)")
        prepare = getattr(self.model, "_prepare_state", None)
        return prepare(state, 1) if prepare is not None else state  # shape check, moved to the model's device

    def _check_logits(self, logits) -> torch.Tensor:
        vocab = self.model.config.vocab_size
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (vocab,):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"generate takes the logits [{vocab}] after the prompt, got {shape}")
        return logits.to(self.model.device)

    # ------------------------------------------------------------------------------------------- worker
    def _serve(self) -> None:
        with torch.inference_mode():  # the worker's tensors never need autograd: each op costs less host time
            self._serve_chats()

    def _serve_chats(self) -> None:
        rows: list[_Chat] = []  # the chats generating, in the order of the batch's rows
        logits: Optional[torch.Tensor] = None  # [n, V] each row's next token is drawn from
        state: Optional[RwkvState] = None  # [n] each row's state
        failure: BaseException = BatcherClosed("the decode batcher was closed")
        try:
            while True:
                rows, logits, state = _keep(rows, logits, state, [not chat.cancelled for chat in rows])
                joining = self._take(len(rows))
                if joining is None:
                    break
                if joining:
                    fresh = torch.stack([chat.logits for chat in joining])
                    logits = fresh if logits is None else torch.cat([logits, fresh])
                    state = RwkvState.stack(([] if state is None else [state]) + [chat.state for chat in joining])
                    rows = rows + joining
                if rows:
                    try:
                        rows, logits, state = self._step(rows, logits, state)
                    except Exception as error:  # a failed step (the model's, or the sampling's) ends its chats
                        for chat in rows:
                            if not chat.finished:
                                chat.end(error=error)
                                chat.progress.set()
                        rows, logits, state = [], None, None
        except BaseException as error:  # a bug in the worker: every chat learns it, and the batcher closes
            failure = error
            raise
        finally:
            with self._wake:
                self._closed = True
                rows, self._incoming = rows + self._incoming, []
            for chat in rows:
                if not chat.finished:
                    chat.end(error=failure)
                    chat.progress.set()

    def _take(self, busy: int) -> Optional[list[_Chat]]:
        """The chats that join before the next step (waits while there is nothing to do); None once closed."""
        with self._wake:
            while not self._closed and not self._incoming and not busy:
                self._wake.wait()
            if self._closed:
                return None
            room = self.max_batch - busy
            joining, self._incoming = self._incoming[:room], self._incoming[room:]
        return [chat for chat in joining if not chat.cancelled]

    def _step(self, rows: list[_Chat], logits: torch.Tensor, state: RwkvState):
        """Sample every row, feed every token drawn in one model call, then judge the tokens while the
        device runs that call -> the rows left. A refused token's row of the call is wasted: its chat ends
        with the state and logits it had before (the call leaves them untouched)."""
        tokens = sample_batch(logits, [chat.sampler for chat in rows], errors="return")
        feeding = [0 if isinstance(token, ValueError) else token for token in tokens]  # 0: a row wasted
        new_logits, new_state = self.model.decode_batch(torch.tensor(feeding, dtype=torch.long), state)
        self.steps += 1
        self.served += len(rows)
        for i, (chat, token) in enumerate(zip(rows, tokens)):
            if isinstance(token, ValueError):
                chat.end(error=token)
                continue
            try:
                verdict = chat.judge.accept(token, logits[i])
                if not isinstance(verdict, Verdict):
                    raise TypeError(f"a judge must return a Verdict, got {verdict!r}")
            except Exception as error:
                chat.end(error=error)
                continue
            if verdict is Verdict.STOP:
                chat.end(logits[i], state[i])
                continue
            chat.accepted += 1
            if verdict is Verdict.LAST:
                chat.end(new_logits[i], new_state[i])
        now = time.monotonic()
        for chat in rows:  # after the launch: the readers' threads would slow it down
            if chat.finished or now - chat.woken >= WAKE_INTERVAL_S:
                chat.woken = now
                chat.progress.set()
        return _keep(rows, new_logits, new_state, [not chat.finished for chat in rows])


def _keep(rows: list[_Chat], logits: Optional[torch.Tensor], state: Optional[RwkvState], keep: list[bool]):
    """The rows marked in `keep`, with their logits and states (gathered only when some go)."""
    if all(keep):
        return rows, logits, state
    if not any(keep):
        return [], None, None
    index = [i for i, k in enumerate(keep) if k]
    on = torch.tensor(index, device=state.device)
    return [rows[i] for i in index], logits.index_select(0, on) if logits is not None else None, state.select(on)
