"""Batched decoding for concurrent chats: one worker runs the token loop of every chat, all of them in one
sampling call and one model step per token.

What this module promises:
- `DecodeBatcher(model).generate(logits, state, sampler, judge)` returns a `generation.Generation`, the
  interface `generation.DirectDecoder` has, so a reply runs the same way with or without batching. Each
  chat gets the tokens, logits and states it gets alone, up to the batched kernels' rounding (rows never
  mix; bit for bit in fp32 on the CPU, tested in both modes below).
- The worker runs every chat still generating (up to `max_batch`; later ones wait for a free row) in
  lockstep, one batched model step (`model.decode_batch`) per token for all of them. Chats join and leave
  between steps; a chat never waits for company. A chat's own thread only waits for progress: the
  per-token work of a reply (its judge: stop rules, detokenising, penalties) runs in the worker, so no
  thread round trip sits between two steps. Readers are woken after the step is launched, at most every
  WAKE_INTERVAL_S while their chat generates (longer in batches whose readers together would be woken more
  than MAX_WAKES_PER_S times a second: each wake costs the worker a thread switch; the page shows 20 updates
  a second at most anyway).
- Two modes, the same results. Pipelined (the default off the CPU): sampling lives on the device
  (`sampling.SamplingRows`: per-row parameters, dense penalty counts and uniforms drawn ahead, built when a
  chat joins), chats keep fixed rows (a joining chat takes a freed row in place, or a new one at the end;
  rows are never gathered), their states live in three buffers of max_batch rows that each step reads one
  of and writes the next (in place, graphed on the GPU: no state is copied per step), and the worker
  launches step t+1 (draw every row's token on the device, count it in the penalties, feed it) before it
  judges step t's tokens, so the host work between two steps does not grow with the number of chats: it is
  the judges' (which overlap the device's steps) and a fixed number of kernel launches. A chat that ended
  at step t wastes its row of step t+1; each chat's generator runs up to `sampling.UNIFORM_BLOCK` uniforms
  ahead of its draws, and its penalties are counted on the device from the tokens drawn (the caller's
  PenaltyState is read when the chat joins; the judge keeps updating it as before). On the CPU (where
  sorting whole vocabularies is slow and there is no queue to overlap): `sampling.sample_batch` row by row,
  then the step, then the judges; the rows' states live in two buffers that the steps write in turn (the
  runner's decode_into), a chat that ends hands its row to the last one, and joining chats are written after
  the last row, so no step allocates or gathers the whole batch's states (at 15 chats of a 0.1B RWKV-7, 35 MB).
- A refused token's row of the step that fed it is wasted: its chat ends with the state and logits it had
  before that token (the step leaves them untouched); a chat whose judge says LAST ends with the ones after.
  A chat's state and logits are copied out when it ends.
- Errors: a bad call (a state of another shape or batch size, logits that are not [vocab], no Sampler, no
  judge) raises at once in its caller; a row that cannot be sampled (e.g. NaN logits, penalties or bans
  that do not fit the vocabulary) or a judge that raises ends only its own chat, with that error; a failed
  step (the model's or the sampling's) ends every chat of that step with its error, and the batcher goes
  on serving. `close()` ends every chat in flight with BatcherClosed and stops the worker; later calls
  raise it at once. The states and logits passed in are never changed.

- `read(ids, state)` is the decoder's prompt read (model.forward: the logits [vocab] and state after `ids`), one
  read at a time in the order they came. Pipelined, in the caller's thread. On the CPU the worker reads them
  between its steps, so a prompt never runs beside a step on the same cores (two products of 2 threads each on 2
  cores slowed both 4-5x: measured in docs/PERFORMANCE.md): the oldest read goes on by READ_CHUNK tokens between
  two steps while chats generate (so they keep streaming while a long prompt is read), or to its end when none
  does; a prompt of fewer than 2 * READ_CHUNK tokens is read in one call, and no piece is shorter than
  READ_CHUNK, so the pieces fall on the boundaries of the model's own chunked prefill and a read gives the bits a
  whole read gives (tested on every architecture). Its errors (bad ids, a failing model) raise in its caller
  only; close() ends the reads still queued with BatcherClosed.
- `times()` says what the worker did and where its time went since it started (`WorkerTimes`: steps, rows fed,
  seconds launching, waiting for the device, judging, letting chats join and leave, reading prompts and the
  tokens read); with `report` given, a
  thread of the batcher hands it the window of the last `report_every` seconds (a `WorkerTimes` and its wall
  time) whenever that window had steps, e.g. for a server's log; a report that raises is logged and skipped.

It knows the model's decode_batch contract (and its runner, to feed ids already on the device), RwkvState,
the sampling module's batch interfaces and the generation protocol; nothing of text or sessions.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import astuple, dataclass
from typing import Callable, Iterator, Optional

import torch

from ..state import RwkvState
from .generation import Generation, Verdict
from .sampling import Sampler, SamplingRows, sample_batch, to_device

log = logging.getLogger(__name__)
DEFAULT_MAX_BATCH = 32
READ_CHUNK = 128  # prompt tokens the CPU worker reads between two steps while chats generate: 0.1B int8 on a Zen 4
# (2 threads) reads 128 tokens in ~100-115 ms at 75-85% of its speed on 512 (64: ~60-75 ms at ~60%); a multiple of
# every architecture's CPU wkv chunk (16 or 32), so that the pieces fall on the whole read's chunk boundaries
WAKE_INTERVAL_S = 0.02  # a reader is woken at most this often while its chat generates (always when it ends)
MAX_WAKES_PER_S = 4000  # ... and less often in large batches: all readers together, at most this many a second


@dataclass(frozen=True)
class WorkerTimes:
    """What the batcher's worker did, summed since it started: batched steps, the rows fed in them (tokens drawn,
    a refused one's included), and seconds spent launching steps (drawing the tokens and queueing the model step;
    on the CPU also running it), waiting for a launched step's tokens (the device behind the host), judging them
    (stop rules, detokenising, penalties; waking readers), letting chats join and leave, and reading prompts (the
    CPU worker's reads: `read_tokens` tokens). The rest of its time is idle (no chat) or between these parts
    (waiting for the interpreter lock among them). `later - earlier` is a window."""

    steps: int = 0
    rows: int = 0
    launch: float = 0.0
    wait: float = 0.0
    judge: float = 0.0
    join: float = 0.0
    read: float = 0.0
    read_tokens: int = 0

    def __sub__(self, other: "WorkerTimes") -> "WorkerTimes":
        return WorkerTimes(*(a - b for a, b in zip(astuple(self), astuple(other))))

    def describe(self, seconds: float) -> str:
        """One line for an operator about a window of `seconds` of wall time."""
        steps = max(1, self.steps)

        def ms(part: float) -> str:
            return f"{part / steps * 1e3:.1f}"
        rest = max(0.0, seconds - self.launch - self.wait - self.judge - self.join - self.read)
        reads = (f"; prompts read {self.read_tokens:,} tokens in {self.read:.1f} s" if self.read_tokens else "")
        return (f"{self.steps:,} steps in {seconds:.1f} s, {self.rows / max(seconds, 1e-9):,.0f} tokens/s, mean batch "
                f"{self.rows / steps:.1f}; ms a step {ms(seconds)}: launching {ms(self.launch)}, waiting for the "
                f"device {ms(self.wait)}, judges {ms(self.judge)}, joins {ms(self.join)}, reading prompts "
                f"{ms(self.read)}, other {ms(rest)}{reads}")


class _Clock:
    """The worker's running WorkerTimes (written by the worker only; a snapshot is read by anyone)."""

    def __init__(self):
        self.totals = dict.fromkeys(WorkerTimes.__dataclass_fields__, 0)
        self.mark = time.perf_counter()

    def lap(self, part: str) -> None:
        """Add the time since the last lap to `part` ("" = count it nowhere)."""
        now = time.perf_counter()
        if part:
            self.totals[part] += now - self.mark
        self.mark = now

    def count(self, rows: int) -> None:
        self.totals["steps"] += 1
        self.totals["rows"] += rows

    def count_read(self, tokens: int) -> None:
        self.totals["read_tokens"] += tokens

    def snapshot(self) -> WorkerTimes:
        return WorkerTimes(**self.totals)


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
        self.error_traceback = None  # the error's traceback where the worker caught it
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
        if self.error is not None:  # one error can end many chats: each reader raises it from its own traceback
            raise self.error.with_traceback(self.error_traceback)

    def close(self) -> None:
        if not self.finished:
            self.cancelled = True

    def end(self, logits: Optional[torch.Tensor] = None, state: Optional[RwkvState] = None,
            error: Optional[BaseException] = None) -> None:
        """Record the result (copies of the rows given) or the error; the reader is woken by the caller."""
        self.logits = logits.clone() if logits is not None else None
        self.state = state.clone() if state is not None else None
        self.error = error
        self.error_traceback = error.__traceback__ if error is not None else None
        self.finished = True


class _Read:
    """One prompt read queued for the CPU worker: written by the worker, read by its caller once `done` is set."""

    def __init__(self, ids: list[int], state: Optional[RwkvState]):
        self.ids, self.state = ids, state  # the state after the tokens read so far (None: an empty state)
        self.position = 0  # tokens read so far
        self.logits: Optional[torch.Tensor] = None
        self.error: Optional[BaseException] = None
        self.done = threading.Event()

    def piece(self, whole: bool) -> list[int]:
        """The next tokens to read: all that are left (`whole`, or fewer than 2 * READ_CHUNK), else READ_CHUNK."""
        left = len(self.ids) - self.position
        size = left if whole or left < 2 * READ_CHUNK else READ_CHUNK
        return self.ids[self.position:self.position + size]

    def finish(self, error: Optional[BaseException] = None) -> None:
        self.error = error
        self.done.set()


class DecodeBatcher:
    """Runs the token loops of concurrent chats as batched steps (see the module docstring)."""

    def __init__(self, model, max_batch: int = DEFAULT_MAX_BATCH, pipelined: Optional[bool] = None,
                 report: Optional[Callable[[WorkerTimes, float], None]] = None, report_every: float = 60.0):
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if report is not None and not report_every > 0:
            raise ValueError(f"report_every must be more than 0 seconds, got {report_every}")
        self.model = model
        self.max_batch = max_batch
        # off the CPU the sampling lives on the device and steps overlap the judging (see the docstring)
        self.pipelined = torch.device(model.device).type != "cpu" if pipelined is None else bool(pipelined)
        self._incoming: list[_Chat] = []
        self._reads: list[_Read] = []  # prompt reads the CPU worker has to do, oldest first
        self._reading = threading.Lock()  # pipelined: one prompt read at a time, in the callers' threads
        self._wake = threading.Condition()
        self._closed = False
        self._clock = _Clock()
        self._stopped = threading.Event()
        self._worker = threading.Thread(target=self._serve, name="rwkv-decode-batcher", daemon=True)
        self._worker.start()
        if report is not None:
            threading.Thread(target=self._reports, args=(report, report_every), name="rwkv-decode-report",
                             daemon=True).start()

    @property
    def steps(self) -> int:
        """Batched model steps run so far."""
        return self._clock.totals["steps"]

    @property
    def served(self) -> int:
        """Rows fed in those steps (served / steps = the mean batch)."""
        return self._clock.totals["rows"]

    def times(self) -> WorkerTimes:
        """What the worker did and where its time went since it started (see WorkerTimes)."""
        return self._clock.snapshot()

    def _reports(self, report, every: float) -> None:
        """Every `every` seconds until closed: report(the window's WorkerTimes, its wall time) if it had steps."""
        start, before = time.perf_counter(), self._clock.snapshot()
        while not self._stopped.wait(every):
            now, times = time.perf_counter(), self._clock.snapshot()
            if times.steps > before.steps:
                try:
                    report(times - before, now - start)
                except Exception:  # a report that fails must not stop the next ones, nor the batcher
                    log.exception("decode batcher: the report failed")
            start, before = now, times

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

    def read(self, ids, state: Optional[RwkvState] = None) -> tuple[torch.Tensor, RwkvState]:
        """The logits [vocab] and state after reading `ids` from `state` (None: an empty state), as model.forward
        gives them; one read at a time (see the module docstring)."""
        ids = [int(token) for token in ids]
        if not ids:
            raise ValueError("a prompt read needs at least one token")
        if self.pipelined:
            with self._reading:
                return self.model.forward(ids, state)
        job = _Read(ids, state)
        with self._wake:
            if self._closed:
                raise BatcherClosed("the decode batcher is closed")
            self._reads.append(job)
            self._wake.notify()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.logits, job.state

    def close(self, timeout: float | None = None) -> None:
        """End every chat in flight (BatcherClosed) and stop the worker thread. Idempotent."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        self._stopped.set()
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
        self._clock.lap("")  # the clock starts with the worker
        with torch.inference_mode():  # the worker's tensors never need autograd: each op costs less host time
            if self.pipelined:
                self._serve_pipelined()
            else:
                self._serve_chats()

    def _serve_chats(self) -> None:
        batch = _HostRows(self.model)
        failure: BaseException = BatcherClosed("the decode batcher was closed")
        try:
            while True:
                batch.retire()
                self._clock.lap("join")
                joining = self._take(len(batch.rows))
                if joining is None:
                    break
                batch.join(joining, self.max_batch)
                self._clock.lap("join")
                self._read_piece(whole=not batch.rows)
                if batch.rows:
                    try:
                        self._step(batch)
                    except Exception as error:  # a failed step (the model's, or the sampling's) ends its chats
                        _end_all(batch.rows, error)
                        batch.rows, batch.logits = [], None
        except BaseException as error:  # a bug in the worker: every chat learns it, and the batcher closes
            failure = error
            raise
        finally:
            _end_all(batch.rows + self._shut(), failure)

    def _read_piece(self, whole: bool) -> None:
        """Go on with the oldest queued prompt read: one piece of it, or all of it when `whole` (no chat is
        generating); a read that fails ends with its error, and the worker goes on."""
        with self._wake:
            job = self._reads[0] if self._reads else None
        if job is None:
            return
        piece = job.piece(whole)
        try:
            job.logits, job.state = self.model.forward(piece, job.state)
            job.position += len(piece)
            error = None
        except Exception as failed:  # bad ids, a failing model: only this read's caller learns it
            error = failed
        self._clock.count_read(len(piece))
        if error is not None or job.position == len(job.ids):
            with self._wake:
                self._reads.remove(job)
            job.finish(error)
        self._clock.lap("read")

    def _take(self, busy: int, waiting: bool = False) -> Optional[list[_Chat]]:
        """The chats that join before the next step, at most max_batch - busy (waits while there is nothing
        to do: no chat busy, none incoming, nothing `waiting` to be judged, no prompt to read); None once
        closed."""
        with self._wake:
            while not self._closed and not self._incoming and not busy and not waiting and not self._reads:
                self._wake.wait()
            if self._closed:
                return None
            room = self.max_batch - busy
            joining, self._incoming = self._incoming[:room], self._incoming[room:]
        self._clock.lap("")  # idle, or the lock: neither is a part of the work
        return [chat for chat in joining if not chat.cancelled]

    def _step(self, batch: "_HostRows") -> None:
        """Sample every row, feed every token drawn in one model step (from the batch's state buffer into the
        other one), then judge the tokens. A refused token's row of the step is wasted: its chat ends with the
        state and logits it had before (the step leaves them untouched)."""
        rows, logits = batch.rows, batch.logits
        tokens = sample_batch(logits, [chat.sampler for chat in rows], errors="return")
        feeding = [0 if isinstance(token, ValueError) else token for token in tokens]  # 0: a row wasted
        before, after = batch.step(torch.tensor(feeding, dtype=torch.long))
        self._clock.count(len(rows))
        self._clock.lap("launch")
        for i, (chat, token) in enumerate(zip(rows, tokens)):
            if isinstance(token, ValueError):
                chat.end(error=token)
                continue
            _judge(chat, token, i, logits[i], before, after)
        _wake_readers(rows, len(rows))  # after the step: the readers' threads would slow it down
        self._clock.lap("judge")

    # ------------------------------------------------------------------------------- the pipelined worker
    def _serve_pipelined(self) -> None:
        batch = _Slots(self.model, self.max_batch)
        pending: Optional[_Launch] = None  # the launched step whose tokens are not judged yet
        failure: BaseException = BatcherClosed("the decode batcher was closed")
        try:
            while True:
                batch.retire()
                self._clock.lap("join")
                joining = self._take(batch.live, waiting=pending is not None)
                if joining is None:
                    break
                launch = None
                try:
                    batch.join(joining)
                    self._clock.lap("join")
                    if batch.live:
                        launch = batch.launch(self._decode_into)
                        self._clock.count(batch.live)
                        self._clock.lap("launch")
                    if pending is not None:
                        pending.judge(self._clock)
                except Exception as error:  # a failed step (the model's, the sampling's) ends its chats
                    _end_all(batch.chats() + joining + (pending.chats() if pending is not None else []), error)
                    batch, launch = _Slots(self.model, self.max_batch), None
                pending = launch
        except BaseException as error:  # a bug in the worker: every chat learns it, and the batcher closes
            failure = error
            raise
        finally:
            _end_all(batch.chats() + (pending.chats() if pending is not None else []) + self._shut(), failure)

    def _shut(self) -> list[_Chat]:
        """Mark the batcher closed (later calls are refused), end the prompt reads still queued with
        BatcherClosed, and take the chats still waiting to join."""
        with self._wake:
            self._closed = True
            left, self._incoming = self._incoming, []
            reads, self._reads = self._reads, []
        for job in reads:
            job.finish(BatcherClosed("the decode batcher was closed"))
        return left

    def _decode_into(self, ids: torch.Tensor, source: RwkvState, target: RwkvState) -> torch.Tensor:
        return decode_into(self.model, ids, source, target)


def decode_into(model, ids: torch.Tensor, source: RwkvState, target: RwkvState) -> torch.Tensor:
    """The model's batched step on token ids drawn on its device (always in range), from the first len(ids) rows
    of `source` into the same rows of `target` -> logits: in place (and graphed where graphs run) through the
    runner's decode_into where it has one; else the step (the plain one off the CPU, which skips decode_batch's
    host-side range check, a host sync) with its new state copied in."""
    runner = getattr(model, "runner", None)
    if runner is not None and hasattr(runner, "decode_into"):
        return runner.decode_into(ids, source, target)
    rows = ids.shape[0]
    start, end = source.leading(rows), target.leading(rows)
    if ids.device.type == "cpu" or not hasattr(model, "decode_plain"):
        logits, new = model.decode_batch(ids, start)
    else:
        logits, new = runner.decode(ids, start) if runner is not None else model.decode_plain(ids, start)
    end.shift.copy_(new.shift)
    end.wkv.copy_(new.wkv)
    return logits


def _end_all(chats, error: BaseException) -> None:
    """End every chat of `chats` not yet finished with `error`, and wake its reader."""
    for chat in chats:
        if not chat.finished:
            chat.end(error=error)
            chat.progress.set()


def _judge(chat: _Chat, token: int, i: int, row: torch.Tensor, before: tuple, after: tuple) -> None:
    """Chat `chat`'s judge on `token`, drawn from `row` (row i of the step's logits): STOP ends the chat with
    row i of `before` (the logits and states the step started from: the token is not fed), LAST with row i
    of `after` (those the step made); a judge that raises, or answers no Verdict, ends it with that error."""
    try:
        verdict = chat.judge.accept(token, row)
        if not isinstance(verdict, Verdict):
            raise TypeError(f"a judge must return a Verdict, got {verdict!r}")
    except Exception as error:
        chat.end(error=error)
        return
    if verdict is Verdict.STOP:
        chat.end(before[0][i], before[1][i])
        return
    chat.accepted += 1
    if verdict is Verdict.LAST:
        chat.end(after[0][i], after[1][i])


def _wake_readers(chats, batch: int) -> None:
    """Wake each reader whose chat ended, or that was last woken long enough ago: WAKE_INTERVAL_S, or longer
    in batches so large that their readers together would be woken more than MAX_WAKES_PER_S times a second
    (each wake costs the worker the interpreter lock for a while)."""
    now = time.monotonic()
    interval = max(WAKE_INTERVAL_S, batch / MAX_WAKES_PER_S)
    for chat in chats:
        if chat.finished or now - chat.woken >= interval:
            chat.woken = now
            chat.progress.set()


def _index(index: list[int], device: torch.device) -> torch.Tensor:
    """Row indices as a long tensor on `device`, copied without waiting for the device's queued work."""
    return to_device(torch.tensor(index, dtype=torch.long), device)


def _zero_states(like: RwkvState, rows: int, count: int) -> list[RwkvState]:
    """`count` zero state buffers of `rows` sequences each, shaped like `like`'s sequences, on its device."""
    return [RwkvState(like.shift.new_zeros((rows,) + like.shift.shape[1:]),
                      like.wkv.new_zeros((rows,) + like.wkv.shape[1:])) for _ in range(count)]


class _HostRows:
    """The CPU worker's batch: the chats generating in the order of their rows, the logits [n, V] each row's next
    token is drawn from, and their states in the first n rows of one of two buffers; each step reads one buffer
    and writes the other (the runner's decode_into: no state is allocated or gathered per step). A chat that ends
    leaves its row to the last row's chat (one row copied); joining chats are written after the last row. The
    buffers grow (by powers of two, up to the batcher's max_batch) only when the rows outgrow them."""

    def __init__(self, model):
        self.model = model
        self.rows: list[_Chat] = []
        self.logits: Optional[torch.Tensor] = None
        self.buffers: list[RwkvState] = []
        self.current = 0

    @property
    def state(self) -> RwkvState:
        return self.buffers[self.current].leading(len(self.rows))

    def retire(self) -> None:
        """Drop the chats that ended or whose reader left, moving the last rows into their places."""
        for i in reversed(range(len(self.rows))):
            chat = self.rows[i]
            if not (chat.finished or chat.cancelled):
                continue
            last = len(self.rows) - 1
            if i != last:
                buffer = self.buffers[self.current]
                buffer.shift[i].copy_(buffer.shift[last])
                buffer.wkv[i].copy_(buffer.wkv[last])
                self.logits[i].copy_(self.logits[last])
                self.rows[i] = self.rows[last]
            self.rows.pop()
        self.logits = self.logits[:len(self.rows)] if self.rows else None

    def join(self, joining: list[_Chat], max_batch: int) -> None:
        """Write the joining chats' states and logits after the last row."""
        if not joining:
            return
        size, count = len(self.rows), len(joining)
        self._reserve(joining[0].state, size + count, max_batch)
        buffer = self.buffers[self.current]
        for j, chat in enumerate(joining):
            buffer.shift[size + j].copy_(chat.state.shift[0])
            buffer.wkv[size + j].copy_(chat.state.wkv[0])
            chat.state = None  # the row holds it now
        fresh = torch.stack([chat.logits for chat in joining])
        self.logits = fresh if self.logits is None else torch.cat([self.logits, fresh])
        self.rows = self.rows + joining

    def _reserve(self, like: RwkvState, rows: int, max_batch: int) -> None:
        capacity = self.buffers[0].batch_size if self.buffers else 0
        if rows <= capacity:
            return
        capacity = min(max_batch, 1 << (rows - 1).bit_length())
        grown = _zero_states(like, capacity, 2)
        if self.rows:  # the rows so far move to the new buffers
            grown[0].leading(len(self.rows)).shift.copy_(self.state.shift)
            grown[0].leading(len(self.rows)).wkv.copy_(self.state.wkv)
        self.buffers, self.current = grown, 0

    def step(self, ids: torch.Tensor) -> tuple[tuple, tuple]:
        """One model step of every row on `ids` [n] -> ((logits, state) before it, (logits, state) after it); the
        batch moves on to the latter (views of the buffers: valid until the step after next)."""
        before = (self.logits, self.state)
        following = 1 - self.current
        logits = decode_into(self.model, ids, self.buffers[self.current], self.buffers[following])
        self.current = following
        self.logits = logits
        return before, (logits, self.state)


class _Slots:
    """The pipelined worker's batch: chats in fixed rows (None = a free row), the logits [n, V] of every row, their
    SamplingRows, and their states in a ring of RING state buffers of max_batch rows (rounded up to a power of
    two). A chat keeps its row until it ends; a joining chat takes the lowest free row (written in place) or a new
    one at the end; free rows at the end are dropped, free rows inside draw and step as junk (never read) until a
    chat takes them. Each step reads the rows of one buffer and writes them into the next (`decode_into`: in
    place, in graphs captured on these buffers where they run), so no state is gathered or copied per step; the
    ring keeps the states of the last two steps alive for the judges of the launched step (before and after its
    token) while the next one runs."""

    RING = 3

    def __init__(self, model, max_batch: int):
        self.model, self.max_batch = model, max_batch
        self.rows: list[Optional[_Chat]] = []
        self.logits: Optional[torch.Tensor] = None  # [n, V]
        self.ring: list[RwkvState] = []  # RING buffers (allocated on the first join); ring[current]: the rows now
        self.current = 0
        self.sampling = SamplingRows(model.config.vocab_size, model.device)
        self.live = 0

    @property
    def state(self) -> RwkvState:
        """The states of the rows now (views of the ring's current buffer)."""
        return self.ring[self.current].leading(len(self.rows))

    def chats(self) -> list[_Chat]:
        return [chat for chat in self.rows if chat is not None]

    def retire(self) -> None:
        """Free the rows of chats that ended or whose reader left; drop free rows at the end."""
        gone = [i for i, chat in enumerate(self.rows) if chat is not None and (chat.finished or chat.cancelled)]
        for i in gone:
            self.rows[i] = None
        self.live -= len(gone)
        size = len(self.rows)
        while size and self.rows[size - 1] is None:
            size -= 1
        self.sampling.release([i for i in gone if i < size])
        if size < len(self.rows):
            self.rows = self.rows[:size]
            self.sampling.truncate(size)
            self.logits = self.logits[:size] if size else None

    def join(self, joining: list[_Chat]) -> None:
        """Give each joining chat a row (a chat whose sampler does not fit the vocabulary ends at once)."""
        problems = self.sampling.problems([chat.sampler for chat in joining])
        fit = []
        for chat, problem in zip(joining, problems):
            if problem is None:
                fit.append(chat)
            else:
                chat.end(error=ValueError(problem))
                chat.progress.set()
        if not fit:
            return
        free = [i for i, chat in enumerate(self.rows) if chat is None][:len(fit)]
        size = len(self.rows)
        slots = free + list(range(size, size + len(fit) - len(free)))
        self._reserve(fit[0].state)
        self.sampling.put(slots, [chat.sampler for chat in fit])
        logits = torch.stack([chat.logits for chat in fit])  # [m, V]
        where = _index(slots, logits.device)
        buffer = self.ring[self.current]  # written in place: free rows' contents belong to no one
        # row by row: no stacked copy of the joining states beside the ring (256 RWKV-7 7.2B states: 8.6 GB)
        for slot, chat in zip(slots, fit):
            buffer.shift[slot].copy_(chat.state.shift[0])
            buffer.wkv[slot].copy_(chat.state.wkv[0])
        if self.logits is not None and free:
            self.logits.index_copy_(0, where[:len(free)], logits[:len(free)])
        appended = logits[len(free):]
        if appended.shape[0]:
            self.logits = appended if self.logits is None else torch.cat([self.logits, appended])
        for chat in fit:  # the rows hold them now
            chat.logits = chat.state = None
        for slot, chat in zip(slots, fit):
            if slot < len(self.rows):
                self.rows[slot] = chat
            else:
                self.rows.append(chat)
        self.live += len(fit)

    def _reserve(self, like: RwkvState) -> None:
        """The ring, on the first join: RING buffers of the power of two of max_batch rows (rows never outgrow
        it: a chat takes a free row before a new one), states shaped like `like`'s. Allocated once, so the
        graphs captured on its buffers serve every later step."""
        if not self.ring:
            capacity = 1 << (self.max_batch - 1).bit_length()
            self.ring = _zero_states(like, capacity, self.RING)

    def launch(self, decode_into) -> "_Launch":
        """Draw every row's token and launch the step that feeds them, without waiting for either; the
        batch moves on to that step's logits and states (the next buffer of the ring)."""
        source, following = self.ring[self.current], (self.current + 1) % self.RING
        target = self.ring[following]
        launch = _Launch(list(self.rows), self.logits, self.state)
        tokens = self.sampling.step(self.logits)  # [n] drawn and counted, -1 where a row cannot be sampled
        launch.fetch(tokens)
        self.logits = decode_into(tokens.clamp(min=0), source, target)  # a refused row's step is wasted
        self.current = following
        launch.new_logits, launch.new_state = self.logits, self.state
        return launch


class _Launch:
    """One launched step: its rows, the logits and states it started from and the ones it makes, and its
    tokens on their way to the host."""

    def __init__(self, rows: list[Optional[_Chat]], logits: torch.Tensor, state: RwkvState):
        self.rows, self.logits, self.state = rows, logits, state
        self.new_logits: Optional[torch.Tensor] = None
        self.new_state: Optional[RwkvState] = None
        self.tokens: Optional[torch.Tensor] = None
        self.copied = None

    def chats(self) -> list[_Chat]:
        return [chat for chat in self.rows if chat is not None]

    def fetch(self, tokens: torch.Tensor) -> None:
        """Start copying the tokens to the host (pinned, asynchronous on CUDA)."""
        if tokens.device.type == "cuda":
            self.tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.tokens.copy_(tokens, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        else:
            self.tokens = tokens.to("cpu")

    def judge(self, clock: _Clock) -> None:
        """Each chat's judge on its token (waiting only for the draw, not for the step), then the readers; the
        wait and the judging are timed on `clock`."""
        if self.copied is not None:
            self.copied.synchronize()
        clock.lap("wait")
        rows = self.logits.unbind(0)  # every row's view in one call
        for i, token in enumerate(self.tokens.tolist()):
            chat = self.rows[i]
            if chat is None or chat.finished or chat.cancelled:  # a free row, or a chat that already ended
                continue
            if token < 0:
                chat.end(error=ValueError(f"row {i}: logits must have no NaN or +inf and at least one finite "
                                          "entry (not all banned)"))
                continue
            _judge(chat, token, i, rows[i], (self.logits, self.state), (self.new_logits, self.new_state))
        chats = self.chats()
        _wake_readers(chats, len(chats))
        clock.lap("judge")
