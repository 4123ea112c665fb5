"""CUDA graphs for the decode step: one captured graph per batch-size bucket, replayed per token.

What this module promises:
- `GraphedDecoder(step, empty_state, device)(ids [B], state)` returns exactly what `step(ids, state.shift,
  state.wkv)` returns, as fresh tensors the caller owns (the graph's static buffers are copied out), without
  the per-kernel launch cost: a decode step is hundreds of small kernels, and replaying them as one graph is
  what lets batch-1 decoding reach the memory bandwidth. The state it returned last, passed back unchanged (the
  same tensors, not written since), is not copied in: its values still lie in the graph's buffers, and a second
  graph of the bucket steps from the first's outputs back into its inputs (at 7B a copy in was ~33 MB a step).
- Batch sizes are rounded up to a bucket (1, 2, 4, ..., 256: so a batch that changes size by a few rows
  reuses its graph); padding rows compute garbage that is never returned. Larger batches run the step
  directly, ungraphed. Graphs are captured lazily, on first use of a
  bucket, and share one memory pool.
- `into(ids [B], source, target)` is the same step on the first B rows of the caller's own state buffers
  (`source` read, `target` written; each of at least B rows): replayed from a graph captured on exactly those
  buffers (one per bucket and buffer pair), so no state is copied in or out. A batcher that keeps its states in a
  few fixed buffers steps without moving them (at 7B and 256 rows the copies were ~9 GB a step). Rows past B up
  to the bucket are computed from and into those buffers too, as junk: the caller keeps them unused.
- Thread-safe: one replay at a time (the static buffers are shared); captures check only their own thread's
  calls, so other threads keep using the device meanwhile. A capture that fails anyway is reported once (a
  warning) and the decoder runs its steps unreplayed from then on: slower, never wrong.

It knows nothing of the model beyond the step function and the state's shapes.
"""

from __future__ import annotations

import threading
import warnings
import weakref

import torch

from ..state import RwkvState

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WARMUP_RUNS = 2


def captured(run, device: torch.device, pool):
    """`run()` WARMUP_RUNS times on a side stream (kernels compiled, the allocator settled), then once more inside
    the capture of a CUDA graph on memory pool `pool` -> (the graph, what the captured run returned: its static
    outputs). The capture checks only this thread's calls (thread_local), so other threads (a chat reading its
    prompt, a batcher stepping) go on using the device meanwhile."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_RUNS):
            run()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = run()
    return graph, out


class _HandedOut:
    """The state a graph handed out last, remembered without keeping it alive: whether a state passed back is that
    one, unwritten since (then its values still lie in `buffer`, the graph's inputs or outputs)."""

    def __init__(self, state: RwkvState, rows: int, buffer: RwkvState):
        self.shift, self.wkv = weakref.ref(state.shift), weakref.ref(state.wkv)
        self.versions = state.shift._version, state.wkv._version
        self.rows, self.buffer = rows, buffer

    def holds(self, state: RwkvState, rows: int) -> bool:
        return (state.shift is self.shift() and state.wkv is self.wkv() and rows == self.rows
                and (state.shift._version, state.wkv._version) == self.versions)


class _Captured:
    """One graph of the step for `batch` rows: from and into its own static buffers, or (source and target
    given) from and into those. On its own buffers the graph steps from `inputs` into `out`, and a second graph
    (captured on first use) from `out` back into `inputs`, so that a caller's next step from the state just
    handed out reads it where it lies."""

    def __init__(self, step, batch: int, template: RwkvState, device: torch.device, pool,
                 source: RwkvState | None = None, target: RwkvState | None = None):
        with torch.inference_mode(False):  # ordinary tensors, written by callers in any mode
            self.ids = torch.zeros(batch, dtype=torch.long, device=device)
            self.ids_host = torch.zeros(batch, dtype=torch.long).pin_memory()  # staging: no sync per step
        self.ids_copied = torch.cuda.Event()
        if source is None:
            self.shift = torch.zeros((batch,) + tuple(template.shift.shape[1:]), device=device)
            self.wkv = torch.zeros((batch,) + tuple(template.wkv.shape[1:]), device=device)
            self.wkv.copy_(template.wkv[:1].expand_as(self.wkv))  # a valid empty state in every row
            into = None
        else:
            self.shift, self.wkv = source.shift[:batch], source.wkv[:batch]
            into = target.leading(batch)
        # into: the target's rows are the caller's junk, so the warm-up runs may write them
        self.graph, (self.logits, self.out) = captured(lambda: step(self.ids, self.shift, self.wkv, out=into),
                                                       device, pool)
        self.inputs = RwkvState(self.shift, self.wkv)
        self.step, self.device, self.pool = step, device, pool
        self.back = None  # (graph, its logits): outputs -> inputs; False once its capture failed
        self.handed_out = None  # the state returned last (_HandedOut)

    def run(self, ids: torch.Tensor, state: RwkvState):
        rows = ids.shape[0]
        holder = self._holder(state, rows)
        if holder is self.out and self._back() is not None:
            graph, logits = self.back
            result = self.inputs
        else:
            if holder is not self.inputs:
                self.shift[:rows].copy_(state.shift)
                self.wkv[:rows].copy_(state.wkv)
            graph, logits, result = self.graph, self.logits, self.out
        self._replay(ids, graph)
        new = result.leading(rows).clone()
        self.handed_out = _HandedOut(new, rows, result)
        return logits[:rows].clone(), new

    def _holder(self, state: RwkvState, rows: int) -> RwkvState | None:
        """The buffer (inputs or out) that holds `state`'s values: it is the state handed out last, unwritten."""
        handed = self.handed_out
        return handed.buffer if handed is not None and handed.holds(state, rows) else None

    def _back(self):
        """The graph from outputs back into inputs, captured on first use; None where that capture failed."""
        if self.back is None:
            try:
                graph, (logits, _) = captured(
                    lambda: self.step(self.ids, self.out.shift, self.out.wkv, out=self.inputs), self.device, self.pool)
                self.back = graph, logits
            except RuntimeError as error:
                self.back = False
                warnings.warn(f"decode step: a CUDA graph capture failed ({error}); states are copied into the "
                              "graph each step (slower)", RuntimeWarning)
        return self.back or None

    def _replay(self, ids: torch.Tensor, graph=None) -> None:
        rows = ids.shape[0]
        if ids.device.type == "cpu":
            self.ids_copied.synchronize()  # the previous step's copy out of the staging buffer is done
            self.ids_host[:rows].copy_(ids)
            self.ids[:rows].copy_(self.ids_host[:rows], non_blocking=True)
            self.ids_copied.record()
        else:
            self.ids[:rows].copy_(ids)
        (self.graph if graph is None else graph).replay()


class GraphedDecoder:
    """Replays captured decode steps (see module docstring)."""

    def __init__(self, step, empty_state, device: torch.device, buckets=BUCKETS):
        """step(ids, shift, wkv, out=None) -> (logits, RwkvState), the state written into `out` when given;
        empty_state(batch) -> the model's empty RwkvState."""
        self.step = step
        self.device = torch.device(device)
        self.buckets = tuple(sorted(buckets))
        self.template = empty_state(1)
        self.graphs: dict = {}  # bucket, or (bucket, data pointers of into's source and target) -> _Captured
        self.pool = None
        self.failed = False  # a capture failed: steps run unreplayed
        self.lock = threading.Lock()

    def bucket(self, batch: int) -> int | None:
        for size in self.buckets:
            if batch <= size:
                return size
        return None

    def __call__(self, ids: torch.Tensor, state: RwkvState):
        size = self.bucket(ids.shape[0])
        if size is not None:
            # static buffers are ordinary tensors whatever mode the caller is in (inference tensors could not
            # be written by a later caller outside inference mode)
            with self.lock, torch.inference_mode(False), torch.no_grad():
                captured = self._capture(size, size)
                if captured is not None:
                    return captured.run(ids, state)
        return self.step(ids.to(self.device), state.shift, state.wkv)

    def into(self, ids: torch.Tensor, source: RwkvState, target: RwkvState) -> torch.Tensor:
        """The step of source's first len(ids) rows, written into target's (see the module docstring) -> logits
        fp32 [len(ids), V], a copy the caller owns. source and target: states of the model's shapes with at
        least len(ids) rows each, not the same tensors; to be replayed without copies, tensors contiguous from
        the first row (a buffer, or its leading rows) that the caller keeps using."""
        rows = ids.shape[0]
        if source.batch_size < rows or target.batch_size < rows:
            raise ValueError(f"into needs states of at least {rows} rows, got {source.batch_size} and "
                             f"{target.batch_size}")
        size = self.bucket(rows)
        tensors = (source.shift, source.wkv, target.shift, target.wkv)
        in_place = size is not None and size <= min(source.batch_size, target.batch_size) and all(
            t[:size].is_contiguous() for t in tensors)  # room for the bucket's junk rows, one layout per pointer
        if in_place:
            with self.lock, torch.no_grad():
                captured = self._capture((size,) + tuple(t.data_ptr() for t in tensors), size, source, target)
                if captured is not None:
                    captured._replay(ids)
                    return captured.logits[:rows].clone()
        logits, _ = self.step(ids.to(self.device), source.shift[:rows], source.wkv[:rows], out=target.leading(rows))
        return logits

    def _capture(self, key, size: int, source: RwkvState | None = None, target: RwkvState | None = None):
        """The graph for `key` (captured on first use), or None once a capture has failed (under the lock)."""
        captured = self.graphs.get(key)
        if captured is None and not self.failed:
            try:
                if self.pool is None:
                    self.pool = torch.cuda.graph_pool_handle()
                captured = self.graphs[key] = _Captured(self.step, size, self.template, self.device, self.pool,
                                                        source, target)
            except RuntimeError as error:
                self.failed = True
                warnings.warn(f"decode step: a CUDA graph capture failed ({error}); stepping without graphs from "
                              "now on (slower)", RuntimeWarning)
        return captured
