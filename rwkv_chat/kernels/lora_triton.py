"""Triton kernels for the low-rank (LoRA) products of the RWKV-6/7 time mix in a decode step.

What this module promises:
- `LowRank.pack(firsts, seconds, parts)` stacks several LoRAs `act(x_i @ A_i) @ B_i` of one layer, each fed by
  its own input row, into two matrices: `down` [R, C] (the A_i transposed, rows concatenated) and `up` [R, N]
  (the B_i, rows concatenated). The caller's A and B parameters are re-pointed to views of them, so the weights
  are held once (the A views are transposed, hence not contiguous: fine for every PyTorch product). On CUDA,
  where every value is a bf16 (a bf16 checkpoint's, as the released files are), they are held in bf16 and the
  kernels widen them to fp32 as they load them: the same values in half the bytes (the parameters then show bf16
  too, and every product that reads them widens them as before).
- `LowRank.__call__(x [I, M, C] fp32, operands)` returns fp32 [P, M, N]: part p's `act_p(x[input_p] @ A_p) @ B_p`,
  with act one of identity, tanh, sigmoid, in two kernel launches whatever the number of parts (the first
  writes the down products, whole and activated or as split-K partial sums that the second adds and activates
  while loading). For fewer than MANY_ROWS rows (a decode step of a few chats) the kernels multiply in fp32
  and read the weights once per row. For more (a batch of many chats) they are tile GEMMs that read them once
  for many rows, on the tensor cores of NVIDIA GPUs with TF32: in 3xTF32 (about fp32's accuracy) when
  `operands` is fp32, in TF32 (operands rounded to 10-bit mantissas, finer than the bf16 or fp16 operands of
  the caller's other products) when it is 16-bit; as fp32 FMAs elsewhere; PyTorch's fp32 GEMMs where a part's
  width is not a multiple of MIN_DOT. Up to that rounding and the order of the additions, the same function as
  the PyTorch products of the plain path.
- Under TRITON_INTERPRET=1 the kernels also run on CPU tensors (the tests compare them there).

It knows matrices and the three activations, not which LoRA of which architecture it serves.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from .quant import holds_bf16_values
from .triton_kernels import AVAILABLE, _sm_count, pdl, tl, triton

IDENTITY, TANH, SIGMOID = 0, 1, 2
MAX_BLOCK_R = 32  # rows of the down product per program
MAX_UP_BLOCK_R = 256  # rows of a part the few-row up product loads at once (two tiles for the widest, 480)
# the few-row kernels' warps, and how many programs the down product's K splits aim at (a multiple of the SMs).
# Swept on an H200 for the 7.2B and 1.5B LoRAs at 1 and 4 rows, bf16-held factors (docs/PERFORMANCE.md)
DOWN_WARPS, UP_WARPS, FEW_ROW_PROGRAMS_PER_SM = 8, 2, 2
MANY_ROWS = 16  # from this many rows the products are GEMMs (the kernels re-read the weights for every row)
MIN_DOT = 16  # the GEMMs' tiles need parts whose widths are multiples of this (else PyTorch's fp32 GEMMs)
# the many-row GEMMs by the precision of their products, TF32 then 3xTF32 (three tensor-core products a tile; also
# the tiles of plain fp32 FMAs): the down GEMM's tile, the up GEMM's, and whether the down GEMM runs whole (one split
# over K: it applies the activations, and the up GEMM reads one matrix) or splits K until its programs fill the SMs
# DOWN_PROGRAMS_PER_SM times (the up GEMM sums the splits). Tuned on an H200 for the 7.2B and 1.5B LoRAs at 16-256
# rows (docs/PERFORMANCE.md): whole wins in TF32 at every row count, split in 3xTF32.
GEMM_TILES = {
    "tf32": ({"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
             {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}, True),
    "tf32x3": ({"BLOCK_M": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4},
               {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}, False),
}
DOWN_PROGRAMS_PER_SM = 2
ACTIVATIONS = {IDENTITY: lambda h: h, TANH: torch.tanh, SIGMOID: torch.sigmoid}

if AVAILABLE:
    from .triton_kernels import _let_next_launch, _sum_splits, _wait_for_kernel_before

    TANH_CODE = tl.constexpr(TANH)
    SIGMOID_CODE = tl.constexpr(SIGMOID)

    @triton.jit
    def _activate(h, act):
        """act(h) for an activation code (IDENTITY, TANH, SIGMOID)."""
        return tl.where(act == TANH_CODE, 2.0 / (1.0 + tl.exp(-2.0 * h)) - 1.0,
                        tl.where(act == SIGMOID_CODE, 1.0 / (1.0 + tl.exp(-h)), h))

    @triton.jit
    def _part(PARTS, i):
        """Row i of LowRank.parts (the widest part first): the part's first row, width, activation code and
        index (its place in the output)."""
        row = PARTS + i * 4
        return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)

    @triton.jit
    def _lora_down_kernel(X, stride_xi, stride_xm, W, INPUT_OF_BLOCK, Y, stride_ys, stride_ym, R, K, K_PER_SPLIT,
                          BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
        """Y[s, m, r] = sum over split s's k of X[input(r), m, k] * W[r, k]; the rows of one block share an input.
        The first factor tile is read before the wait for the kernel before (PDL): no kernel writes factors."""
        pid_r = tl.program_id(0)
        pid_s = tl.program_id(1)
        m = tl.program_id(2)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        k_begin = pid_s * K_PER_SPLIT
        _let_next_launch(PDL)
        first = k_begin + tl.arange(0, BLOCK_K)
        first_ok = first < K
        w_first = tl.load(W + offs_r[:, None] * K + first[None, :], mask=r_ok[:, None] & first_ok[None, :], other=0.0)
        _wait_for_kernel_before(PDL)
        x_base = X + tl.load(INPUT_OF_BLOCK + pid_r) * stride_xi + m * stride_xm
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        acc += w_first.to(tl.float32) * tl.load(x_base + first, mask=first_ok, other=0.0)[None, :]
        for kk in range(BLOCK_K, K_PER_SPLIT, BLOCK_K):
            offs_k = k_begin + kk + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            w = tl.load(W + offs_r[:, None] * K + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)
            x = tl.load(x_base + offs_k, mask=k_ok, other=0.0)
            acc += w * x[None, :]
        tl.store(Y + pid_s * stride_ys + m * stride_ym + offs_r, tl.sum(acc, axis=1), mask=r_ok)

    @triton.jit
    def _lora_up_kernel(H, stride_hs, stride_hm, n_split, PARTS, W, Y, stride_yp, stride_ym, N,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
        """Y[p, m, n] = sum over part p's rows r of act_p(H[m, r]) * W[r, n]; H as split partials [S, M, R].
        BLOCK_R rows of a part a tile (MAX_UP_BLOCK_R: two tiles for the widest part), their loads issued at once.
        The part's description and first factor tile are read before the wait for the kernel before (PDL)."""
        pid_n = tl.program_id(0)
        m = tl.program_id(2)
        _let_next_launch(PDL)
        start, length, act, p = _part(PARTS, tl.program_id(1))
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        rows = tl.arange(0, BLOCK_R)
        r_ok = rows < length
        w_first = tl.load(W + (start + rows)[:, None] * N + offs_n[None, :], mask=r_ok[:, None] & n_ok[None, :],
                          other=0.0)
        _wait_for_kernel_before(PDL)
        h = _activate(_sum_splits(H + m * stride_hm, stride_hs, n_split, start + rows, r_ok), act)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        acc += tl.sum(w_first.to(tl.float32) * h[:, None], axis=0)
        for r0 in range(BLOCK_R, length, BLOCK_R):
            r_ok = r0 + rows < length
            offs_r = start + r0 + rows
            w = tl.load(W + offs_r[:, None] * N + offs_n[None, :], mask=r_ok[:, None] & n_ok[None, :],
                        other=0.0).to(tl.float32)
            h = _sum_splits(H + m * stride_hm, stride_hs, n_split, offs_r, r_ok)
            h = _activate(h, act)
            acc += tl.sum(w * h[:, None], axis=0)
        tl.store(Y + p * stride_yp + m * stride_ym + offs_n, acc, mask=n_ok)

    @triton.jit
    def _lora_down_gemm_kernel(X, stride_xi, stride_xm, W, INPUT_OF_BLOCK, ACT_OF_BLOCK, Y, stride_ys, stride_ym, M,
                               K, K_PER_SPLIT, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                               PRECISION: tl.constexpr, ACTIVATE: tl.constexpr):
        """Many rows: Y[s, m, r] = sum over split s's k of X[input(r), m, k] * W[r, k], a [BLOCK_M, BLOCK_R] tile
        a program on the tensor cores (the rows of a block share an input and a part; R is a multiple of
        BLOCK_R); with ACTIVATE (one split: the sums are whole) each block's part's activation applied."""
        pid_r = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        x_base = X + tl.load(INPUT_OF_BLOCK + pid_r) * stride_xi + offs_m[:, None] * stride_xm
        k_begin = pid_s * K_PER_SPLIT
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for kk in range(0, K_PER_SPLIT, BLOCK_K):
            offs_k = k_begin + kk + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_base + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(W + offs_r[None, :] * K + offs_k[:, None], mask=k_ok[:, None], other=0.0).to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if ACTIVATE:
            acc = _activate(acc, tl.load(ACT_OF_BLOCK + pid_r))
        tl.store(Y + pid_s * stride_ys + offs_m[:, None] * stride_ym + offs_r[None, :], acc, mask=m_ok[:, None])

    @triton.jit
    def _lora_up_gemm_kernel(H, stride_hs, stride_hm, n_split, PARTS, W, Y, stride_yp, stride_ym, M, N,
                             BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                             PRECISION: tl.constexpr, ACTIVATED: tl.constexpr):
        """Many rows: Y[p, m, n] = sum over part p's rows r of act_p(H[m, r]) * W[r, n], H as split partials
        [S, M, R] (or, ACTIVATED, one [M, R] of act_p(H) already); a [BLOCK_M, BLOCK_N] tile a program on the
        tensor cores. The widest part's programs come first (the last wave is not one part's long tiles)."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        start, length, act, p = _part(PARTS, tl.program_id(2))
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        rows = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, length, BLOCK_R):
            r_ok = r0 + rows < length
            offs_r = start + r0 + rows
            h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for s in range(n_split):
                h += tl.load(H + s * stride_hs + offs_m[:, None] * stride_hm + offs_r[None, :],
                             mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            if not ACTIVATED:
                h = _activate(h, act)
            w = tl.load(W + offs_r[:, None] * N + offs_n[None, :], mask=r_ok[:, None] & n_ok[None, :],
                        other=0.0).to(tl.float32)
            acc = tl.dot(h, w, acc, input_precision=PRECISION)
        tl.store(Y + p * stride_yp + offs_m[:, None] * stride_ym + offs_n[None, :], acc,
                 mask=m_ok[:, None] & n_ok[None, :])


@dataclass
class LoraPart:
    """One LoRA `act(x[input_row] @ A) @ B` of width `width` (rows of the concatenated matrices, in order)."""

    width: int
    input_row: int
    activation: int = IDENTITY


def _block_rows(parts: list[LoraPart]) -> int:
    """The largest power of two (<= MAX_BLOCK_R) that divides every part's width: a block never straddles two."""
    widths = math.gcd(*(p.width for p in parts))
    return min(MAX_BLOCK_R, widths & -widths)


class LowRank:
    """Several LoRAs of one layer, packed (see the module docstring)."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, input_of_block: torch.Tensor,
                 activation_of_block: torch.Tensor, parts: torch.Tensor, block_r: int, up_block_r: int,
                 layout: list[LoraPart]):
        self.down, self.up, self.parts = down, up, parts
        self.input_of_block, self.activation_of_block = input_of_block, activation_of_block
        self.block_r, self.up_block_r = block_r, up_block_r
        self.groups = _input_groups(layout)

    @classmethod
    @torch.no_grad()
    def pack(cls, firsts: list[nn.Parameter], seconds: list[nn.Parameter], parts: list[LoraPart],
             bf16: bool | None = None) -> LowRank:
        """firsts: the A matrices [C, r_i]; seconds: the B matrices [r_i, N] (or [k, r, N]: k parts' stacked),
        whose rows, concatenated, are the parts' in order. `bf16`: hold the matrices in bf16 (the kernels widen
        them to fp32 as they load them); None: on CUDA where every value is a bf16 (no value changes), else fp32."""
        down = torch.cat([a.data.float().t() for a in firsts]).contiguous()  # [R, C]
        up = torch.cat([b.data.float().reshape(-1, b.shape[-1]) for b in seconds]).contiguous()  # [R, N]
        if bf16 is None:
            bf16 = down.is_cuda and all(holds_bf16_values(m) for m in (down, up))
        if bf16:  # every value a bf16 (a bf16 checkpoint's): held in half the bytes, widened exactly as loaded
            down, up = down.bfloat16(), up.bfloat16()
        if sum(p.width for p in parts) != down.shape[0] or up.shape[0] != down.shape[0]:
            raise ValueError("the parts' widths do not add up to the matrices' rows")
        for weights, packed, view in ((firsts, down, lambda rows, a: rows.t()),
                                      (seconds, up, lambda rows, b: rows.view(b.shape))):
            start = 0
            for weight in weights:
                rows = weight.numel() // packed.shape[1]
                weight.data = view(packed[start:start + rows], weight)
                start += rows
        block_r = _block_rows(parts)
        table, inputs, activations, start = [], [], [], 0
        for index, p in enumerate(parts):
            table.append((start, p.width, p.activation, index))
            inputs += [p.input_row] * (p.width // block_r)
            activations += [p.activation] * (p.width // block_r)
            start += p.width
        table.sort(key=lambda row: -row[1])  # the widest part first (stable: equal widths keep their order)
        device = down.device
        widest = 1 << (max(p.width for p in parts) - 1).bit_length()
        as_tensor = functools.partial(torch.tensor, dtype=torch.int32, device=device)
        return cls(down, up, as_tensor(inputs), as_tensor(activations), as_tensor(table), block_r,
                   min(widest, MAX_UP_BLOCK_R), list(parts))

    @property
    def n_parts(self) -> int:
        return self.parts.shape[0]

    def __call__(self, x: torch.Tensor, operands: torch.dtype = torch.float32) -> torch.Tensor:
        """x [I, M, C] fp32 (row stride any, unit column stride) -> [P, M, N] fp32. `operands`: the dtype the
        caller's other products round their operands to; from MANY_ROWS rows on, a 16-bit one lets these
        products round theirs to TF32 (see the module docstring)."""
        _, m, k = x.shape
        if m >= MANY_ROWS:
            if self.block_r < MIN_DOT:
                return self._products(x)
            return self._gemms(x, _dot_precision(x.device, exact=operands == torch.float32))
        r, n = self.up.shape
        block_k = 256
        n_blocks = r // self.block_r
        want = FEW_ROW_PROGRAMS_PER_SM * _sm_count(x.device)
        splits = max(1, min(want // max(1, n_blocks * m), k // (2 * block_k)))
        k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
        splits = triton.cdiv(k, k_per_split)
        hidden = torch.empty((splits, m, r), device=x.device, dtype=torch.float32)
        _lora_down_kernel[(n_blocks, splits, m)](x, x.stride(0), x.stride(1), self.down, self.input_of_block,
                                                  hidden, hidden.stride(0), hidden.stride(1), r, k, k_per_split,
                                                  BLOCK_R=self.block_r, BLOCK_K=block_k, num_warps=DOWN_WARPS,
                                                  **pdl(x.device))
        out = torch.empty((self.n_parts, m, n), device=x.device, dtype=torch.float32)
        block_n = 32
        _lora_up_kernel[(triton.cdiv(n, block_n), self.n_parts, m)](hidden, hidden.stride(0), hidden.stride(1),
                                                                     splits, self.parts, self.up, out, out.stride(0),
                                                                     out.stride(1), n, BLOCK_R=self.up_block_r,
                                                                     BLOCK_N=block_n, num_warps=UP_WARPS,
                                                                     **pdl(x.device))
        return out

    def _gemms(self, x: torch.Tensor, precision: str) -> torch.Tensor:
        """__call__ for many rows: two launches of tile GEMMs (`precision`: tl.dot's input precision); the down
        product whole or split over K as GEMM_TILES says for that precision."""
        _, m, k = x.shape
        r, n = self.up.shape
        down, up, whole = GEMM_TILES["tf32" if precision == "tf32" else "tf32x3"]
        n_blocks = r // self.block_r
        tiles = n_blocks * triton.cdiv(m, down["BLOCK_M"])
        splits = 1 if whole else max(1, min(DOWN_PROGRAMS_PER_SM * _sm_count(x.device) // tiles,
                                            k // (4 * down["BLOCK_K"])))
        k_per_split = triton.cdiv(triton.cdiv(k, splits), down["BLOCK_K"]) * down["BLOCK_K"]
        splits = triton.cdiv(k, k_per_split)
        hidden = torch.empty((splits, m, r), device=x.device, dtype=torch.float32)
        _lora_down_gemm_kernel[(n_blocks, triton.cdiv(m, down["BLOCK_M"]), splits)](
            x, x.stride(0), x.stride(1), self.down, self.input_of_block, self.activation_of_block, hidden,
            hidden.stride(0), hidden.stride(1), m, k, k_per_split, BLOCK_R=self.block_r, PRECISION=precision,
            ACTIVATE=splits == 1, **down)
        out = torch.empty((self.n_parts, m, n), device=x.device, dtype=torch.float32)
        _lora_up_gemm_kernel[(triton.cdiv(n, up["BLOCK_N"]), triton.cdiv(m, up["BLOCK_M"]), self.n_parts)](
            hidden, hidden.stride(0), hidden.stride(1), splits, self.parts, self.up, out, out.stride(0),
            out.stride(1), m, n, BLOCK_R=self.block_r, PRECISION=precision, ACTIVATED=splits == 1, **up)
        return out

    def _products(self, x: torch.Tensor) -> torch.Tensor:
        """__call__ as PyTorch GEMMs: one down product per group of parts sharing an input, one up product a part."""
        out = torch.empty((self.n_parts, x.shape[1], self.up.shape[1]), device=x.device, dtype=torch.float32)
        for input_row, start, stop, members in self.groups:
            hidden = x[input_row] @ self.down[start:stop].float().t()  # [M, rows of the group]
            for p, begin, end, activation in members:
                torch.mm(ACTIVATIONS[activation](hidden[:, begin - start:end - start]), self.up[begin:end].float(),
                         out=out[p])
        return out


@functools.lru_cache(maxsize=None)
def _tf32(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 8


def _dot_precision(device: torch.device, exact: bool) -> str:
    """How the GEMMs' fp32 tiles multiply: on NVIDIA GPUs with TF32 (Ampere and later) in TF32, or where `exact`
    in 3xTF32 (each operand the sum of two TF32 numbers, three tensor-core products: about fp32's accuracy);
    elsewhere (and under the interpreter) as fp32 FMAs."""
    if device.type == "cuda" and torch.version.cuda and _tf32(device.index if device.index is not None
                                                              else torch.cuda.current_device()):
        return "tf32x3" if exact else "tf32"
    return "ieee"


def _input_groups(parts: list[LoraPart]) -> list[tuple[int, int, int, list[tuple[int, int, int, int]]]]:
    """Runs of consecutive parts fed by one input: (input row, first row, end row, [(part, its first row, end
    row, activation)])."""
    groups, start = [], 0
    for p, part in enumerate(parts):
        member = (p, start, start + part.width, part.activation)
        if groups and groups[-1][0] == part.input_row:
            row, first, _, members = groups[-1]
            groups[-1] = (row, first, start + part.width, members + [member])
        else:
            groups.append((part.input_row, start, start + part.width, [member]))
        start += part.width
    return groups
