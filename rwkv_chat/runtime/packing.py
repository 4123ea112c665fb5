"""Packed projections: the weights of several `Projection`s as one matrix, and the products the fast paths take
with it.

What this module promises:
- `pack_projections(projections)` concatenates the rows of several `Projection`s (float, int8 with per-row
  scales, or int4 with its per-row groups) into one `PackedLinear` and re-points the modules' weights to views
  of it: the weights are held once.
- `PackedLinear(x, i)` is segment i's product x @ Wᵀ in fp32 (or, widen=False, in the dtype a bf16/fp16 GEMM
  gave it), as the plain path computes it (kernels/quant.py chooses the CPU's product; fp32 weights too take the
  C++ kernels for few rows there; on CUDA, int8 runs in the Triton kernel or, from quant.CUDA_INT8_EXPAND_ROWS
  rows, expanded to bf16 for one wide GEMM).
- `project(x [P, M, K], lin)` is the decode steps' product on CUDA: segment i takes input x[i] (the last one
  when P is smaller), and comes back as a split-K partials view [S, M, N_i] (S = 1 from cuBLAS), which the
  Triton kernels add while loading. `project_channel_mix(x, lin, dtype)` is the channel mix's product (segment 0
  the key) with relu² of the key applied: (relu(key)² [M, F] in dtype, the other segments' partials views);
  one row squares the key inside the product where triton_kernels.project_relu2 can, else `ffn_act` does.

It knows matrices and where they run best, not RWKV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_kernels, quant, triton_kernels


# ----------------------------------------------------------------------------------------- packing

@dataclass(frozen=True)
class PackedLinear:
    """One weight [N, K] (float, int8 with per-row scale, or int4 [N, K/2] with per-row groups) whose rows are split
    into named segments."""

    weight: torch.Tensor
    scale: torch.Tensor | None
    bounds: tuple[int, ...]  # row offsets: segment i is rows bounds[i]:bounds[i+1]

    @property
    def n_segments(self) -> int:
        return len(self.bounds) - 1

    @property
    def equal_segments(self) -> bool:
        sizes = {self.bounds[i + 1] - self.bounds[i] for i in range(self.n_segments)}
        return len(sizes) == 1

    def segment(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, b = self.bounds[i], self.bounds[i + 1]
        return self.weight[a:b], None if self.scale is None else self.scale[a:b]

    def __call__(self, x: torch.Tensor, i: int = 0, widen: bool = True) -> torch.Tensor:
        """x [..., K] @ segment i ᵀ -> fp32; widen=False: a GEMM that ran in bf16/fp16 returns its result in that
        dtype (quant.linear)."""
        weight, scale = self.segment(i)
        few_rows = x.numel() < quant.MANY_ROWS * x.shape[-1]  # rows = numel / K, without a reshape
        if (x.device.type != "cuda" and few_rows and weight.dtype == torch.float32
                and cpu_kernels.handles(x, weight)):
            return cpu_kernels.linear(x, weight)  # a decode step's packed fp32 products stream here too
        return quant.linear(x, weight, scale, widen)

    def decode(self, x: torch.Tensor, i: int = 0) -> torch.Tensor:
        """As a call, for a decode step's rows (one per chat): streamed as quant.decode_linear streams them."""
        weight, scale = self.segment(i)
        return cpu_kernels.linear(x, weight, scale) if quant.decode_streams(x, weight) else self(x, i)


def pack_projections(projections: list[nn.Module]) -> PackedLinear:
    """Concatenate the rows of several `Projection`s and re-point their weights to views of the result."""
    weights = [p.weight.data for p in projections]
    scaled = hasattr(projections[0], "weight_scale")  # int8 and int4: a scale row (or groups) per weight row
    packed = torch.cat(weights).contiguous() if len(weights) > 1 else weights[0].contiguous()
    scale = None
    if scaled:
        scales = [p.weight_scale for p in projections]
        scale = torch.cat(scales).contiguous() if len(scales) > 1 else scales[0].contiguous()
    bounds, offset = [0], 0
    for p, w in zip(projections, weights):
        rows = w.shape[0]
        p.weight = nn.Parameter(packed[offset:offset + rows], requires_grad=False)
        if scaled:
            p.weight_scale = scale[offset:offset + rows]
        offset += rows
        bounds.append(offset)
    return PackedLinear(packed, scale, tuple(bounds))


def project(x: torch.Tensor, lin: PackedLinear) -> list[torch.Tensor]:
    """x [P, M, K] -> one partials view [S, M, N_i] per segment."""
    # float weights: cuBLAS for several rows; one row through our kernel, a programmatic dependent of the kernel
    # before it (on its own cuBLAS's batched r|k|v product is as fast, but in a CUDA-graphed 7B step ours made the
    # step 0.9-1.2 % shorter on an H200: docs/PERFORMANCE.md, thirty-third session)
    if lin.scale is None and x.shape[1] > 1:
        if lin.n_segments > 1 and lin.equal_segments:
            n = lin.bounds[1]
            out = torch.bmm(x, lin.weight.view(lin.n_segments, n, -1).transpose(1, 2))  # [P, M, n]
            return [out[i:i + 1] for i in range(lin.n_segments)]
        return [F.linear(x[min(i, x.shape[0] - 1)], lin.segment(i)[0]).unsqueeze(0)
                for i in range(lin.n_segments)]
    return _segments(triton_kernels.project(x, lin.weight, lin.scale, _segment_length(lin)), lin)


def _segment_length(lin: PackedLinear) -> int | None:
    """The row count after which the Triton product takes its next input (None: one segment)."""
    return lin.bounds[1] if lin.n_segments > 1 else None


def _segments(parts: torch.Tensor, lin: PackedLinear, first: int = 0) -> list[torch.Tensor]:
    """The partials [S, M, N] of a packed product as one view per segment, from segment `first` on."""
    return [parts[:, :, lin.bounds[i]:lin.bounds[i + 1]] for i in range(first, lin.n_segments)]


def project_channel_mix(x: torch.Tensor, lin: PackedLinear, dtype: torch.dtype) -> tuple[torch.Tensor, list]:
    """x [P, M, K] -> (relu(key)² [M, F] in dtype, the partials views of segments 1...) (see the module docstring)."""
    if x.shape[1] == 1:
        fused = triton_kernels.project_relu2(x, lin.weight, lin.scale, lin.bounds[1], dtype, _segment_length(lin))
        if fused is not None:
            hidden, parts = fused
            return hidden, _segments(parts, lin, first=1)
    key, *rest = project(x, lin)
    return triton_kernels.ffn_act(key, dtype), rest
