"""CUDA graphs for prompts: a prompt read in a few graph replays instead of hundreds of kernel launches.

Why: a chat's later turns read 10-60 new tokens. Read directly, that is ~25 kernel launches a layer (a 1.5B model:
~600), 21 ms on an H200 where the GPU works for a few; while a batcher decodes 128 chats on the same device and
process, each launch waits behind the others' and the same read took 220 ms, so prompts queued for seconds. Long
prompts are launch-bound too once the kernels are fast: RWKV-4 1.5B read 1,024 tokens in 23 ms of wall time for
13 ms of GPU work.

What this module promises:
- `GraphedPrefill(prefill, empty_state, device, padded)(ids [T], state)` returns what `prefill(ids, state)` returns
  ((logits fp32 [V] of the last token, new state of batch 1), fresh tensors the caller owns) for every T >= 1, up
  to the rounding of the products over other numbers of rows: the prompt is read in pieces of PIECES tokens
  (`pieces_of`: whole pieces of LONG_PIECE tokens first, then the rest largest first, each length at most once:
  20 = 16 + 4, 2,100 = 1,024 + 1,024 + 32 + 16 + 4), each replayed from a graph captured for that length on the
  first prompt that needs it. With `padded` (the model's read of a prompt padded at its end, for architectures
  whose recurrence passes padding: `RwkvModel.read_padded`), the rest's last part below PADDED_PIECE tokens is
  one piece of the next power of two, padded, so that a chat turn of up to PADDED_PIECE tokens is one replay
  (60 = one piece of 64; 1,023 = 512 + 256 + 255 in a piece of 256; 2,100 = 1,024 + 1,024 + 52 in a piece of
  64). The state passed in is never changed.
  Once a capture has failed (warned once) every prompt runs `prefill` directly: slower, never wrong.
- The graphs share one memory pool and one state buffer, which each piece reads and then overwrites with its
  own result (inside the graph, after everything read it), so a prompt's pieces chain without copies. The
  intermediate pieces' logits are computed and dropped (one head product each).
- Thread-safe: one prompt at a time. Captures check only their own thread's calls, so other threads (a batcher's
  decode steps) keep using the device meanwhile.

It knows nothing of the model beyond the prefill function and the state's shapes.
"""

from __future__ import annotations

import threading
import warnings

import torch

from ..state import RwkvState
from .cuda_graphs import captured

LONG_PIECE = 1024  # the largest piece: its intermediates (kept by the graphs' pool) stay a few hundred MB at 7B
PIECES = tuple(LONG_PIECE >> i for i in range(LONG_PIECE.bit_length()))  # 1024, 512, ..., 1
PADDED_PIECE = 256  # with a padded read, fewer tokens than this (a prompt's last part) take one padded piece. A
# piece costs little more for more tokens (H200, 7B, ms: RWKV-7 bf16 2-32 tokens 10-11, 128 16.4, 256 25.4; int8
# 9-11, 22.3, 39.6; RWKV-5.2 bf16 6-7, 8.4, 11.5; int8 6-7.5, 16.0, 29.5): one piece of 256 beats two of 128 in each,
# and a 60-token turn had taken four pieces (44 ms)


def pieces_of(length: int, padded: bool = False) -> list[tuple[int, int]]:
    """The pieces a prompt of `length` tokens is read in, as (the piece's length, the prompt tokens it reads): whole
    LONG_PIECEs, then the rest in PIECES (largest first, each at most once); with `padded`, the rest's last
    `rest % PADDED_PIECE` tokens in one piece of the next power of two."""
    if length < 1:
        raise ValueError(f"a graphed prompt has at least 1 token, got {length}")
    rest = length % LONG_PIECE
    tail = rest % PADDED_PIECE if padded else 0
    pieces = [(LONG_PIECE, LONG_PIECE)] * (length // LONG_PIECE)
    pieces += [(piece, piece) for piece in PIECES[1:] if (rest - tail) & piece]
    if tail:
        pieces.append((1 << (tail - 1).bit_length(), tail))
    return pieces


class _Piece:
    """The graph of `prefill` over `length` tokens: reads `ids` and `state`, then writes its new state into
    `state` and its logits into `logits`; with `padded`, the graph of `padded(ids, state, valid)`, which reads the
    first `valid` (a device tensor [1]) of its `ids` alone."""

    def __init__(self, prefill, length: int, state: RwkvState, device: torch.device, pool, padded=None):
        with torch.inference_mode(False):
            self.ids = torch.zeros(length, dtype=torch.long, device=device)
            self.valid = torch.full((1,), length, dtype=torch.long, device=device) if padded else None

        def run():  # the warm-up runs may overwrite the buffer too: every prompt writes its state in first
            logits, new = prefill(self.ids, state) if padded is None else padded(self.ids, state, self.valid)
            state.shift.copy_(new.shift)
            state.wkv.copy_(new.wkv)
            return logits
        self.graph, self.logits = captured(run, device, pool)


class GraphedPrefill:
    """Reads prompts by graph replays (see the module docstring)."""

    def __init__(self, prefill, empty_state, device: torch.device, padded=None):
        """prefill(ids [T] on the device, state of batch 1) -> (logits fp32 [V], new state), capturable (no host
        syncs); empty_state(batch) -> the model's empty RwkvState; padded: None, or padded(ids [T], state, valid
        long [1] on the device) -> what prefill(ids[:valid], state) gives, capturable, for T up to LONG_PIECE."""
        self.prefill = prefill
        self.padded = padded
        self.empty_state = empty_state
        self.device = torch.device(device)
        self.pieces: dict[int, _Piece] = {}
        self.state: RwkvState | None = None  # the buffer every piece reads and overwrites
        self.pool = None
        self.failed = False
        self.lock = threading.Lock()

    def __call__(self, ids: torch.Tensor, state: RwkvState):
        length = ids.numel()
        if length >= 1 and not self.failed:
            with self.lock, torch.inference_mode(False), torch.no_grad():
                if self._capture(pieces_of(length, self.padded is not None)):
                    return self._replay(ids, state)
        return self.prefill(ids, state)

    def _replay(self, ids: torch.Tensor, state: RwkvState):
        self.state.shift.copy_(state.shift)
        self.state.wkv.copy_(state.wkv)
        ids = ids.to(self.device)
        start = 0
        for length, tokens in pieces_of(ids.numel(), self.padded is not None):
            piece = self.pieces[length]
            piece.ids[:tokens].copy_(ids[start:start + tokens])  # the rest: an earlier prompt's ids, read as padding
            if piece.valid is not None:
                piece.valid.fill_(tokens)
            piece.graph.replay()
            start += tokens
        return piece.logits.clone(), self.state.clone()

    def _capture(self, pieces: list[tuple[int, int]]) -> bool:
        """Capture the pieces (length, tokens) not captured yet; False (and no more tries) if a capture fails."""
        try:
            if self.state is None:
                with torch.inference_mode(False):
                    self.state = self.empty_state(1)
                self.pool = torch.cuda.graph_pool_handle()
            for length, _ in pieces:
                if length not in self.pieces:
                    self.pieces[length] = _Piece(self.prefill, length, self.state, self.device, self.pool,
                                                 self.padded)
            return True
        except RuntimeError as error:
            self.failed = True
            warnings.warn(f"prefill: a CUDA graph capture failed ({error}); reading prompts without graphs from "
                          "now on (slower)", RuntimeWarning)
            return False
