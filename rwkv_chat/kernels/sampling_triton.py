"""One Triton program per row that draws a batch's next tokens without sorting the vocabulary.

What this module promises:
- `draw(...)` returns, for every row of logits [B, V], the token that serving/sampling.py's `_draw_rows`
  (and `sample_token`) draws from the same inputs: penalties (x - (presence + count * frequency) at every seen
  token, float64 arithmetic, subtracted in fp32) and bans (-inf) applied first; -1 where the prepared row is
  invalid (a NaN or +inf, or every token banned); greedy rows the lowest id among the maxima; the others keep
  the smallest head of the distribution sorted by probability (most likely first, equal probabilities in id
  order) whose mass reaches top_p (every token as likely as the last one kept survives), then at most top_k of
  them, and draw by inverse CDF on the row's uniform over softmax(x / T) of the kept tokens in that order (in
  id order when neither filter removed a token).
- It equals the sorted computation up to the rounding of its sums, which run in another order (fp32 for the
  probability mass, float64 for the draw's CDF, as there), and of exp (libdevice's, as accurate as PyTorch's CUDA
  softmax; it decides whether two logits one ulp apart share a probability). Instead of sorting, each row searches the
  levels of its probabilities: the top-p cut is the largest probability v with mass(p >= v) >= top_p, the top-k cut
  the largest v with count(p >= v) >= k (then the first ids at that level), the drawn token's level the largest v
  whose kept weight at or above it exceeds u * total (then the first id at that level where it does). Each search
  fixes two bits of v's fp32 pattern per pass over the row (15 passes: probabilities are at most 1.0, below 2**30 as
  bit patterns). Once the filters' cuts are known the kept tokens are compacted (in id order), and the weights and the
  draw's search read only them: the whole vocabulary is read about 20 times (for the top-p search, mostly), the
  nucleus a further 20, and nothing is sorted.
- Scratch per call: [B, V] each, the prepared logits and the probabilities (fp32), and the kept tokens
  compacted: their ids (int32), logits then weights, and probabilities (fp32).
- `usable(device)`: Triton present, the tensors on CUDA (or under TRITON_INTERPRET=1, on any device, for the
  tests), and the kernel has not failed there. A kernel that fails to compile or launch (a GPU or Triton build
  it does not suit) raises `KernelFailed` once, with a warning, and `usable` says False for that device from
  then on, so callers fall back to the sorted path and stay there.

It knows the sampling arithmetic, not the tables or the chats that feed it (serving/sampling.py).
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch

from . import triton_kernels
from .triton_kernels import AVAILABLE, INTERPRET

__all__ = ["AVAILABLE", "KernelFailed", "usable", "draw"]

_failed: set[str] = set()  # devices the kernel failed on (a capability found out, like cpu_kernels' build)


class KernelFailed(RuntimeError):
    """The kernel could not compile or launch on this device; the caller draws another way."""


def usable(device: torch.device | str) -> bool:
    """The kernel can draw on tensors of this device (see the module docstring)."""
    return triton_kernels.usable(device) and _key(device) not in _failed


def _key(device: torch.device | str) -> str:
    """The device's name with its index ("cuda" is the current CUDA device)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


BLOCK = 4096  # logits a program handles at once: a row is read a few dozen times, each read this many at once
# (the passes are latency-bound; measured on an H200 at 65,536 logits: 1,024 a block took twice as long)


def warps(rows: int, device: torch.device) -> int:
    """Warps a row's program runs on: 16 for a few rows, 32 from 64 (H200, before the compaction, 32 / 128 /
    256 rows: 0.36 / 0.52 / 1.0 ms a draw with these; 16 warps at 128 rows 0.59, 8 warps 1.06), at most 1,024
    threads (GPUs whose warps are 64 wide get half as many)."""
    wanted = 16 if rows < 64 else 32
    return max(1, min(wanted, 1024 // _warp_width(str(device)))) if device.type == "cuda" else wanted


@functools.lru_cache(maxsize=None)
def _warp_width(device: str) -> int:
    return getattr(torch.cuda.get_device_properties(torch.device(device)), "warp_size", 32) or 32


if AVAILABLE:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    _INTERPRET = tl.constexpr(INTERPRET)

    @triton.jit
    def _exp(x):
        """exp as accurate as the CUDA expf of PyTorch's softmax (tl.exp is the faster ex2.approx); the
        interpreter has tl.exp only (NumPy's, accurate)."""
        if _INTERPRET:
            return tl.exp(x)
        else:
            return libdevice.exp(x)

    @triton.jit
    def _level(P, W, base, V, goal, MODE: tl.constexpr, BLOCK: tl.constexpr):
        """The largest level t (an fp32 bit pattern of a probability in P) whose tokens at or above it meet
        `goal`: MODE 0 their probability mass >= goal, MODE 1 their count >= goal, MODE 2 their weight in W
        (float64 sums) > goal. Two bits a pass, from the top."""
        offs = tl.arange(0, BLOCK)
        lo = 0
        for step in range(15):
            shift = 28 - 2 * step
            t1 = lo + (1 << shift)
            t2 = lo + (2 << shift)
            t3 = lo + (3 << shift)
            if MODE == 0:
                a1 = tl.zeros([BLOCK], tl.float32)
            elif MODE == 1:
                a1 = tl.zeros([BLOCK], tl.int32)
            else:
                a1 = tl.zeros([BLOCK], tl.float64)
            a2 = a1
            a3 = a1
            for start in range(0, V, BLOCK):
                idx = start + offs
                ok = idx < V
                p = tl.load(P + base + idx, mask=ok, other=0.0)
                bits = p.to(tl.int32, bitcast=True)
                if MODE == 0:
                    v = p
                elif MODE == 1:
                    v = ok.to(tl.int32)
                else:
                    v = tl.load(W + base + idx, mask=ok, other=0.0).to(tl.float64)
                a1 += tl.where(bits >= t1, v, 0)
                a2 += tl.where(bits >= t2, v, 0)
                a3 += tl.where(bits >= t3, v, 0)
            s1 = tl.sum(a1, 0)
            s2 = tl.sum(a2, 0)
            s3 = tl.sum(a3, 0)
            if MODE == 2:
                m1 = s1 > goal
                m2 = s2 > goal
                m3 = s3 > goal
            else:
                m1 = s1 >= goal
                m2 = s2 >= goal
                m3 = s3 >= goal
            lo = tl.where(m3, t3, tl.where(m2, t2, tl.where(m1, t1, lo)))
        return lo

    @triton.jit
    def _draw_kernel(LOGITS, X, P, KEPT_ID, KEPT_X, KEPT_P, COUNTS, SEEN, BANNED, PRESENCE, FREQUENCY, TEMPERATURE,
                     TOP_P, TOP_K, HAS_TOP_K, GREEDY, UNIFORMS, CURSOR, TOKENS, V, stride_l, stride_u,
                     PENALISED: tl.constexpr, BANNING: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = row * V
        offs = tl.arange(0, BLOCK)
        # the prepared logits, their first maximum, and whether the row is valid
        top = tl.full([BLOCK], float("-inf"), tl.float32)
        top_id = tl.full([BLOCK], V, tl.int32)
        bad = tl.zeros([BLOCK], tl.int32)
        if PENALISED:
            presence = tl.load(PRESENCE + row)
            frequency = tl.load(FREQUENCY + row)
        for start in range(0, V, BLOCK):
            idx = start + offs
            ok = idx < V
            x = tl.load(LOGITS + row * stride_l + idx, mask=ok, other=float("-inf")).to(tl.float32)
            if PENALISED:
                seen = tl.load(SEEN + base + idx, mask=ok, other=0)
                count = tl.load(COUNTS + base + idx, mask=ok, other=0.0)
                product = count * frequency
                amount = tl.where(seen != 0, product + presence, 0.0)
                x = x - amount.to(tl.float32)
            if BANNING:
                banned = tl.load(BANNED + base + idx, mask=ok, other=0)
                x = tl.where(banned != 0, float("-inf"), x)
            tl.store(X + base + idx, x, mask=ok)
            bad += ((x != x) | (x == float("inf"))).to(tl.int32)
            better = x > top  # strict: a lane keeps its first (lowest id) maximum
            top = tl.where(better, x, top)
            top_id = tl.where(better, idx, top_id)
        best = tl.max(top, 0)
        best_id = tl.min(tl.where(top == best, top_id, V), 0)
        valid = (tl.sum(bad, 0) == 0) & (best > float("-inf"))
        greedy = tl.load(GREEDY + row) != 0
        if greedy | (valid == 0):
            tl.store(TOKENS + row, tl.where(valid, best_id, -1).to(tl.int64))
        else:
            temperature = tl.load(TEMPERATURE + row)
            top_p = tl.load(TOP_P + row)
            top_k = tl.load(TOP_K + row).to(tl.int32)
            has_top_k = tl.load(HAS_TOP_K + row) != 0
            uniform = tl.load(UNIFORMS + row * stride_u + tl.load(CURSOR + row))
            # probabilities softmax(x), and their total
            mass = tl.zeros([BLOCK], tl.float32)
            for start in range(0, V, BLOCK):
                idx = start + offs
                x = tl.load(X + base + idx, mask=idx < V, other=float("-inf"))
                mass += _exp(x - best)
            norm = tl.sum(mass, 0)
            total = tl.zeros([BLOCK], tl.float32)
            for start in range(0, V, BLOCK):
                idx = start + offs
                ok = idx < V
                x = tl.load(X + base + idx, mask=ok, other=float("-inf"))
                p = _exp(x - best) / norm
                tl.store(P + base + idx, p, mask=ok)
                total += p
            reached = tl.sum(total, 0) >= top_p  # top_p applies (never for its off value 2)
            # the kept tokens: every level above `cut`, and the ids up to `cut_id` at `cut`
            cut = 0
            size = V
            if reached:
                cut = _level(P, P, base, V, top_p, 0, BLOCK)
            if reached & has_top_k:  # how many top_p keeps (top_k needs it)
                above = tl.zeros([BLOCK], tl.int32)
                for start in range(0, V, BLOCK):
                    idx = start + offs
                    bits = tl.load(P + base + idx, mask=idx < V, other=0.0).to(tl.int32, bitcast=True)
                    above += ((idx < V) & (bits >= cut)).to(tl.int32)
                size = tl.sum(above, 0)
            kept = tl.minimum(size, top_k)
            cut_id = V
            if kept < size:  # top_k binds: its level, then the first ids there
                cut = _level(P, P, base, V, kept, 1, BLOCK)
                higher = tl.zeros([BLOCK], tl.int32)
                for start in range(0, V, BLOCK):
                    idx = start + offs
                    bits = tl.load(P + base + idx, mask=idx < V, other=0.0).to(tl.int32, bitcast=True)
                    higher += ((idx < V) & (bits > cut)).to(tl.int32)
                wanted = kept - tl.sum(higher, 0)
                seen_at = 0
                for start in range(0, V, BLOCK):
                    idx = start + offs
                    bits = tl.load(P + base + idx, mask=idx < V, other=0.0).to(tl.int32, bitcast=True)
                    at = ((idx < V) & (bits == cut)).to(tl.int32)
                    running = tl.cumsum(at, 0) + seen_at
                    cut_id = tl.minimum(cut_id, tl.min(tl.where((at != 0) & (running >= wanted), idx, V), 0))
                    seen_at += tl.sum(at, 0)
            in_sorted = reached | has_top_k
            # the kept tokens (all of them when neither filter applies), compacted in id order: their ids,
            # logits and probabilities; every later pass reads only these
            size = 0
            for start in range(0, V, BLOCK):
                idx = start + offs
                ok = idx < V
                p = tl.load(P + base + idx, mask=ok, other=0.0)
                bits = p.to(tl.int32, bitcast=True)
                keep = ok & ((in_sorted == 0) | (bits > cut) | ((bits == cut) & (idx <= cut_id)))
                flag = keep.to(tl.int32)
                at = base + size + tl.cumsum(flag, 0) - flag
                tl.store(KEPT_ID + at, idx, mask=keep)
                tl.store(KEPT_X + at, tl.load(X + base + idx, mask=ok, other=0.0), mask=keep)
                tl.store(KEPT_P + at, p, mask=keep)
                size += tl.sum(flag, 0)
            # their weights softmax(x / T), written over their logits: exp(x / T - peak) once, then normalised
            peak = best / temperature
            mass = tl.zeros([BLOCK], tl.float32)
            for start in range(0, size, BLOCK):
                j = start + offs
                e = _exp(tl.load(KEPT_X + base + j, mask=j < size, other=float("-inf")) / temperature - peak)
                tl.store(KEPT_X + base + j, e, mask=j < size)
                mass += e
            norm = tl.sum(mass, 0)
            weight = tl.zeros([BLOCK], tl.float64)
            for start in range(0, size, BLOCK):
                j = start + offs
                w = tl.load(KEPT_X + base + j, mask=j < size, other=0.0) / norm
                tl.store(KEPT_X + base + j, w, mask=j < size)
                weight += w.to(tl.float64)
            target = uniform * tl.sum(weight, 0)
            # the draw: in id order, or at the level (then the id) where the sorted order's CDF passes target
            level = -1
            before = tl.sum(tl.zeros([BLOCK], tl.float64), 0)
            if in_sorted:
                level = _level(KEPT_P, KEPT_X, base, size, target, 2, BLOCK)
                higher_weight = tl.zeros([BLOCK], tl.float64)
                for start in range(0, size, BLOCK):
                    j = start + offs
                    bits = tl.load(KEPT_P + base + j, mask=j < size, other=0.0).to(tl.int32, bitcast=True)
                    w = tl.load(KEPT_X + base + j, mask=j < size, other=0.0).to(tl.float64)
                    higher_weight += tl.where(bits > level, w, 0.0)
                before = tl.sum(higher_weight, 0)
            drawn = size
            last = -1  # the last one with weight there, for a target that rounding left unpassed
            for start in range(0, size, BLOCK):
                j = start + offs
                ok = j < size
                bits = tl.load(KEPT_P + base + j, mask=ok, other=0.0).to(tl.int32, bitcast=True)
                here = ok & ((level < 0) | (bits == level))
                w = tl.where(here, tl.load(KEPT_X + base + j, mask=ok, other=0.0).to(tl.float64), 0.0)
                running = tl.cumsum(w, 0) + before
                drawn = tl.minimum(drawn, tl.min(tl.where(here & (running > target), j, size), 0))
                last = tl.maximum(last, tl.max(tl.where(w > 0, j, -1), 0))
                before += tl.sum(w, 0)
            token = tl.load(KEPT_ID + base + tl.where(drawn < size, drawn, tl.maximum(last, 0)))
            tl.store(TOKENS + row, token.to(tl.int64))


def draw(logits: torch.Tensor, counts: Optional[torch.Tensor], seen: Optional[torch.Tensor],
         banned: Optional[torch.Tensor], presence: Optional[torch.Tensor], frequency: Optional[torch.Tensor],
         temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, has_top_k: torch.Tensor,
         greedy: torch.Tensor, uniforms: torch.Tensor, cursor: torch.Tensor, penalised: bool, banning: bool,
         block: int = BLOCK) -> torch.Tensor:
    """Every row's next token ([B] long, -1 for an invalid row) from logits [B, V] (any float dtype, rows
    contiguous) and the rows' tables in SamplingRows' layout: counts float64 [B, V], seen / banned bool
    [B, V], presence / frequency float64 [B], temperature / top_p fp32 [B] (top_p 2 = off), top_k long [B]
    (V = off), has_top_k / greedy bool [B], uniforms float64 [B, n] read at cursor long [B]. `penalised` /
    `banning` False skip reading the penalty / ban tables (True is always right; with False they may be
    None). `block`: logits a program handles at once (a power of two; the tests make rows of several blocks
    with small ones)."""
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    if rows == 0:
        return tokens
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    scratch = torch.empty((4, rows, vocab), dtype=torch.float32, device=logits.device)
    kept_ids = torch.empty((rows, vocab), dtype=torch.int32, device=logits.device)
    try:
        _draw_kernel[(rows,)](logits, scratch[0], scratch[1], kept_ids, scratch[2], scratch[3], counts, seen,
                              banned, presence, frequency, temperature, top_p, top_k, has_top_k, greedy, uniforms,
                              cursor, tokens, vocab, logits.stride(0), uniforms.stride(0), PENALISED=bool(penalised),
                              BANNING=bool(banning), BLOCK=block, num_warps=warps(rows, logits.device))
    except Exception as error:
        _failed.add(_key(logits.device))
        warnings.warn(f"sampling: the fused draw failed on {logits.device} ({type(error).__name__}: {error}); "
                      "drawing by sorting instead", stacklevel=2)
        raise KernelFailed(str(error)) from error
    return tokens
