"""Int8 weight-only quantisation of the projection matrices, and the matrix products that use it.

What this module promises:
- `quantize_rows(w)` stores a [N, K] matrix as int8 with one fp32 scale per output row (symmetric,
  scale = max|row| / 127): half the bytes of bf16, a quarter of fp32. `dequantize` undoes it.
- `linear(x, weight, scale)` is `x @ Wᵀ` returning fp32, for float weights (computed in the weight's dtype,
  as `model.Projection` does) and for int8 weights (scale given). On CUDA, int8 products run in Triton
  kernels when Triton is present; anywhere else but CPUs by dequantising, which is slow but exact to the
  stored weights.
- CPUs (`cpu_linear`): few rows (a decode step) of a bf16/fp16/int8 weight stream it through the C++ kernels
  (cpu_kernels.py) when they are built. Many rows (a prefill) take PyTorch's GEMM in the dtype this CPU
  multiplies fastest (cpu_features.py): bf16 inputs where the CPU has bf16 units (AVX512-BF16, AMX), int8
  weights widened to bf16 there (exact: |q| ≤ 127 is a bf16 integer) with the row scales applied to the fp32
  result; elsewhere bf16/fp16 weights are widened to fp32 and int8 ones dequantised to fp32, because a
  half-precision GEMM without such units is several times slower than the fp32 one.

It knows nothing of RWKV: which matrices are quantised is the loader's choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels, triton_kernels
from .cpu_features import cpu_features

MANY_ROWS = 16  # from this many rows a CPU product is one GEMM in the fastest dtype (weights widened once);
# fewer stream the weight through cpu_kernels

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
    if x.device.type == "cpu":
        return cpu_linear(x, q, scale)
    shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x.device.type == "cuda":
        if triton_kernels.AVAILABLE:
            out = triton_kernels.matmul(x2.to(torch.bfloat16).unsqueeze(0), q, scale).sum(0)
            return out.reshape(*shape, q.shape[0])
        out = F.linear(x2.to(torch.bfloat16), dequantize(q, scale, torch.bfloat16)).float()
    else:
        out = F.linear(x2.float(), dequantize(q, scale))
    return out.reshape(*shape, q.shape[0])


def widened_on_cpu(weight: torch.Tensor) -> bool:
    """A bf16/fp16 weight on a CPU without units for its dtype: its products of many rows run in fp32."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16)
            and not cpu_features().native_matmul(weight.dtype))


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ Wᵀ -> fp32 [..., N] on a CPU, each case where it runs fastest (see the module docstring)."""
    rows = x.numel() // x.shape[-1]
    if (weight.dtype != torch.float32 and rows < MANY_ROWS and cpu_kernels.tried()
            and cpu_kernels.handles(x, weight)):
        return cpu_kernels.linear(x, weight, scale)
    shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    many = rows >= MANY_ROWS
    if weight.dtype == torch.int8:
        if scale is None:
            raise ValueError("an int8 weight needs its per-row scale")
        if many and cpu_features().native_matmul(torch.bfloat16):
            out = F.linear(x2.to(torch.bfloat16), weight.to(torch.bfloat16)).float().mul_(scale)
        elif many:
            out = F.linear(x2.float(), dequantize(weight, scale))
        else:  # PyTorch's weight-only int8 kernel (vectorised dequantise-and-multiply; bf16 activations)
            out = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), weight,
                                            scale.to(torch.bfloat16)).float()
    elif many and widened_on_cpu(weight):
        out = F.linear(x2.float(), weight.float())
    else:
        out = F.linear(x2.to(weight.dtype), weight).float()
    return out.reshape(*shape, weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weightᵀ in fp32 out; int8 weights need their `scale`. CPUs: `cpu_linear`."""
    if x.device.type == "cpu":
        return cpu_linear(x, weight, scale)
    if weight.dtype == torch.int8:
        if scale is None:
            raise ValueError("an int8 weight needs its per-row scale")
        return int8_linear(x, weight, scale)
    return F.linear(x.to(weight.dtype), weight).float()
