"""Int8 weight-only quantisation of the projection matrices, and the matrix products that use it.

What this module promises:
- `quantize_rows(w)` stores a [N, K] matrix as int8 with one fp32 scale per output row (symmetric,
  scale = max|row| / 127): half the bytes of bf16, a quarter of fp32. `dequantize` undoes it.
- `linear(x, weight, scale)` is `x @ Wᵀ` returning fp32, for float weights (computed in the weight's dtype,
  as `model.Projection` does) and for int8 weights (scale given). On CUDA, int8 products run in Triton
  kernels when Triton is present; on CPU through PyTorch's int8 weight kernel; anywhere else by
  dequantising, which is slow but exact to the stored weights.

It knows nothing of RWKV: which matrices are quantised is the loader's choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels, triton_kernels

CPU_KERNEL_ROWS = 16  # up to this many rows, low-precision CPU products stream the weight through cpu_kernels

INT8_MAX = 127.0
QUANTIZE_BLOCK = 1 << 24  # weights per block of rows in quantize_rows (64 MiB of fp32)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [N, K], fp32 scale [N]) with weight ≈ q * scale[:, None]. Rows are done in
    blocks of about QUANTIZE_BLOCK weights, so the fp32 temporaries stay small whatever the matrix (a whole
    7B head at once took 3 GiB of them, the peak of loading a model in int8)."""
    rows, cols = weight.shape
    q = torch.empty((rows, cols), dtype=torch.int8, device=weight.device)
    scale = torch.empty(rows, dtype=torch.float32, device=weight.device)
    step = max(1, QUANTIZE_BLOCK // max(1, cols))
    for start in range(0, rows, step):
        w = weight[start:start + step].float()
        s = w.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX
        q[start:start + step] = torch.round(w / s[:, None]).clamp_(-INT8_MAX, INT8_MAX)  # exact integers
        scale[start:start + step] = s
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale[:, None]).to(dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] (any float dtype) @ (q * scale)ᵀ -> fp32 [..., N]."""
    shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x.device.type == "cuda":
        if triton_kernels.AVAILABLE:
            out = triton_kernels.matmul(x2.to(torch.bfloat16).unsqueeze(0), q, scale).sum(0)
            return out.reshape(*shape, q.shape[0])
        out = F.linear(x2.to(torch.bfloat16), dequantize(q, scale, torch.bfloat16)).float()
    elif x.device.type == "cpu":
        out = _int8_linear_cpu(x2, q, scale)
    else:
        out = F.linear(x2.float(), dequantize(q, scale))
    return out.reshape(*shape, q.shape[0])


def _int8_linear_cpu(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """PyTorch's weight-only int8 kernel (vectorised dequantise-and-multiply; bf16 activations)."""
    xb = x.to(torch.bfloat16).contiguous()
    return torch._weight_int8pack_mm(xb, q, scale.to(torch.bfloat16)).float()


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weightᵀ in fp32 out; int8 weights need their `scale`. A decode step's few rows against a bf16, fp16 or
    int8 weight on a CPU run in the C++ kernels when they are built (PyTorch's bf16 matrix-vector product
    reads weights at half the speed of its fp32 one); fp32 stays with PyTorch."""
    if (x.device.type == "cpu" and weight.dtype != torch.float32 and x.numel() <= CPU_KERNEL_ROWS * x.shape[-1]
            and cpu_kernels.tried() and cpu_kernels.handles(x, weight)):
        return cpu_kernels.linear(x, weight, scale)
    if weight.dtype == torch.int8:
        if scale is None:
            raise ValueError("an int8 weight needs its per-row scale")
        return int8_linear(x, weight, scale)
    return F.linear(x.to(weight.dtype), weight).float()
