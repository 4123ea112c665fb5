"""Int8 and int4 weight-only quantisation of the projection matrices, and the matrix products that use them.

What this module promises:
- `quantize_rows(w)` stores a [N, K] matrix as int8 with one fp32 scale per output row (symmetric,
  scale = max|row| / 127): half the bytes of bf16, a quarter of fp32. `dequantize` undoes it.
- `quantize_int4(w, group)` stores it as 4-bit integers q in 0..15, two a byte (uint8 [N, K/2], in the layout
  csrc/cpu_kernels.cpp reads: each block of 64 columns is 32 bytes, byte j holding column j in its low nibble and
  column j + 32 in its high one), with an fp16 scale and min per group of `group` input columns ([N, 2, K/group]:
  a row's scales, then its mins):
  w ≈ q * scale + min (asymmetric: the group's min and max are representable up to fp16 rounding). At the default
  group of 64 that is 4.5 bits a weight. `dequantize_int4` undoes it. `INT4` (torch.int4) is the dtype token a
  caller asks for; `weight_format` names a stored weight's format (torch.int4 for the uint8 packing);
  `holds_bf16_values` says whether a tensor's values are all bf16s (held so, nothing changes).
- `linear(x, weight, scale)` is `x @ Wᵀ` returning fp32, for float weights (computed in the weight's dtype,
  as `model.Projection` does) and for int8 weights (scale given); with widen=False a float product that ran in
  bf16/fp16 comes back unwidened. On CUDA, int8 products of fewer than CUDA_INT8_EXPAND_ROWS rows run in
  Triton kernels when Triton is present (they read the int8 bytes once); from that many rows, without Triton,
  and anywhere else but CPUs the weight is dequantised for one GEMM (exact to the stored weights; a bf16 GEMM
  on CUDA, whose result widen=False keeps in bf16).
- CPUs (`cpu_linear`): few rows (a decode step) of a bf16/fp16/int8/int4 weight stream it through the C++ kernels
  (cpu_kernels.py) when they are built: fewer than MANY_ROWS, or, for a bf16/fp16 weight on a CPU without units for
  it (`widened_on_cpu`), fewer than WIDENED_STREAM_ROWS, since the GEMM would first widen the whole weight to fp32
  (chat turns in bf16 on a 2-core Zen 3: 0.1B, 16-63 tokens, RWKV-5.2 37-115 ms streamed against 98-174 widened,
  RWKV-7 44-128 against 71-161, from 64 to 127 tokens either way within 15 %; 1.5B, RWKV-7 16 / 63 / 128 tokens
  0.50 / 1.7 / 3.4 s against 2.1 / 3.4 / 4.5, RWKV-5.2 80 / 127 tokens 2.1 / 3.4 s against 3.0-3.5 / 4.4; from
  256 tokens the GEMM wins). Many rows (a prefill) of an int8 or int4 weight take the C++ GEMM on CPUs with
  AVX512-VNNI or with AVX2 but no AVX-512 (cpu_kernels.gemm: the activations rounded to int8, a step per 32 columns
  as llama.cpp's q8_0, 64 for int4 weights as their decode products; the VNNI one 1.6-1.8x the widened bf16 GEMM
  on a Zen 4 and faster than widening to AMX's bf16 tiles on a Xeon, the AVX2 one, the same bits, 1.2-1.6x the
  widened fp32 GEMM on that Zen 4 capped to AVX2).
  Other many-row products take PyTorch's GEMM in the dtype this CPU multiplies fastest (cpu_features.py): bf16
  inputs where the CPU has bf16 units (AVX512-BF16, AMX), int8 weights widened to bf16 there where the int8 GEMM
  does not run (exact: |q| ≤ 127 is a bf16 integer) with the row scales applied to the fp32 result, int4 ones
  dequantised to bf16 there (q * scale + min rounded to bf16: 8 significant bits, far finer than the 4-bit steps);
  elsewhere bf16/fp16 weights are widened to fp32 and int8/int4 ones dequantised to fp32, because a half-precision
  GEMM without such units is several times slower than the fp32 one. int4 runs on CPUs only (`linear` refuses it
  elsewhere; the loader says so first).
- `decode_linear` is `linear` for a batched decode step's rows (one per chat): on CPUs, an int8/int4 weight (or a
  bf16/fp16 one without units for it) streams through the C++ kernels up to STREAM_ROWS rows, not only below
  MANY_ROWS: a step reads each weight once, so widening it for a GEMM costs more than the arithmetic it saves
  (the 0.1B head, 65,536 x 768 int8, on a Zen 4, 2 threads: 16 rows 9.6 ms streamed against 37.9 widened; 64
  rows 46 against 53), and so that each chat's logits are the bits it gets decoded alone. From STREAM_ROWS rows
  `linear` takes over (int8 / int4 on the integer GEMM where it runs; the VNNI one: the head at 64 rows 13.8 ms;
  it would win from ~16 rows, 7.1 against 5.4 ms, at the price of those bits; a bf16/fp16 weight without units
  streams on there up to WIDENED_STREAM_ROWS).

It knows nothing of RWKV: which matrices are quantised is the loader's choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels, triton_kernels
from .cpu_features import cpu_features

MANY_ROWS = 16  # from this many rows a CPU product is one GEMM in the fastest dtype (weights widened once);
# fewer stream the weight through cpu_kernels
STREAM_ROWS = 64  # a decode step's narrow weights stream through cpu_kernels below this many rows (decode_linear)
WIDENED_STREAM_ROWS = 128  # a weight the GEMM would widen (widened_on_cpu) streams below this many rows in any
# product (cpu_linear), prompts included; measured in the module docstring
CUDA_INT8_EXPAND_ROWS = 1024  # from this many rows a CUDA int8 product expands its weight to bf16 for cuBLAS; fewer
# take the Triton int8 kernel. On an H100 at 7B and 1.5B shapes the kernel was 1.1-16x faster up to 512 rows; at 1,024
# 0-17 % faster at 7B, 26-35 % slower at 1.5B; the expansion 1.3-1.9x faster at 2,048 (docs/PERFORMANCE.md,
# forty-third session)

INT8_MAX = 127.0
QUANTIZE_BLOCK = 1 << 24  # weights per block of rows in quantize_rows / quantize_int4 (64 MiB of fp32)

INT4 = torch.int4  # the dtype token of the int4 format; its weights are stored as uint8, two a byte
INT4_STORAGE = torch.uint8
INT4_MAX = 15.0
INT4_BLOCK = 64  # columns per packing block (32 bytes); a group is a whole number of blocks
INT4_GROUP = 64  # input columns per (scale, min): measured on the trained tiny models, 32 was no better


def holds_bf16_values(tensor: torch.Tensor) -> bool:
    """Whether every value of a floating tensor is a bf16 (rounding it to bf16 changes nothing): a bf16
    checkpoint's, which may then be held in bf16 and widened exactly where it is read."""
    if tensor.dtype == torch.bfloat16:
        return True
    return tensor.is_floating_point() and torch.equal(tensor, tensor.to(torch.bfloat16).to(tensor.dtype))


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
    """quantize_rows' (q, scale) -> q * scale[:, None] in `dtype`: each product in fp32, rounded to `dtype` once,
    in one pass (the int8 read, the result written; no fp32 copy of the matrix in between)."""
    return torch.mul(q, scale[:, None].float(), out=torch.empty(q.shape, dtype=dtype, device=q.device))


def weight_format(weight: torch.Tensor) -> torch.dtype:
    """The format a stored projection weight is in: its dtype, or INT4 for the uint8 packing of quantize_int4."""
    return INT4 if weight.dtype == INT4_STORAGE else weight.dtype


def int4_fits(cols: int, group: int = INT4_GROUP) -> bool:
    """Whether a matrix of `cols` input columns can be stored in int4 with this group size."""
    return group % INT4_BLOCK == 0 and cols % group == 0


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (uint8 [N, K/2], fp16 [N, 2, K/group]) with weight ≈ q * scale + min per group (module
    docstring). q is rounded against the fp16 scale and min as stored. Rows go in blocks of about QUANTIZE_BLOCK
    weights, as in quantize_rows."""
    rows, cols = weight.shape
    if not int4_fits(cols, group):
        raise ValueError(f"int4 groups of {group} columns need K a multiple of the group and the group a multiple "
                         f"of {INT4_BLOCK}; K is {cols}")
    packed = torch.empty((rows, cols // 2), dtype=INT4_STORAGE, device=weight.device)
    groups = torch.empty((rows, 2, cols // group), dtype=torch.float16, device=weight.device)
    step = max(1, QUANTIZE_BLOCK // max(1, cols))
    for start in range(0, rows, step):
        w = weight[start:start + step].float().reshape(-1, cols // group, group)
        low = w.amin(dim=2)
        scale = ((w.amax(dim=2) - low) / INT4_MAX).half()
        minimum = low.half()
        inverse = torch.where(scale > 0, 1 / scale.float(), torch.zeros(()))  # a constant group: q = 0, w = min
        q = ((w - minimum.float()[..., None]) * inverse[..., None]).round_().clamp_(0, INT4_MAX).to(INT4_STORAGE)
        q = q.reshape(len(w), cols // INT4_BLOCK, 2, INT4_BLOCK // 2)  # [rows, blocks, low/high, 32]
        packed[start:start + step] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(len(w), cols // 2)
        groups[start:start + step] = torch.stack([scale, minimum], dim=1)
    return packed, groups


def dequantize_int4(packed: torch.Tensor, groups: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """quantize_int4's (packed, groups) -> the [N, K] weights q * scale + min in `dtype` (computed in fp32)."""
    rows, cols = packed.shape[0], packed.shape[1] * 2
    blocks = packed.reshape(rows, cols // INT4_BLOCK, 1, INT4_BLOCK // 2)
    q = torch.cat([blocks & 0x0F, blocks >> 4], dim=2).reshape(rows, groups.shape[2], -1)  # columns in order
    w = torch.addcmul(groups[:, 1, :, None].float(), q.float(), groups[:, 0, :, None].float())
    return w.reshape(rows, cols).to(dtype)


def widen_int4(packed: torch.Tensor, groups: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dequantize_int4 for a CPU product, in one pass of the C++ kernels when they are built (bf16 or fp32)."""
    module = cpu_kernels.kernels() if cpu_kernels.tried() else None
    if module is not None and dtype in (torch.bfloat16, torch.float32) and packed.device.type == "cpu":
        return module.int4_widen(packed, groups, dtype == torch.bfloat16)
    return dequantize_int4(packed, groups, dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, widen: bool = True) -> torch.Tensor:
    """x [..., K] (any float dtype) @ (q * scale)ᵀ -> fp32 [..., N]; widen=False: a product that ran as a bf16
    GEMM (CUDA, from CUDA_INT8_EXPAND_ROWS rows or without Triton) comes back in bf16."""
    if x.device.type == "cpu":
        return cpu_linear(x, q, scale)
    shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x.device.type == "cuda":
        if triton_kernels.AVAILABLE and x2.shape[0] < CUDA_INT8_EXPAND_ROWS:
            out = triton_kernels.matmul(x2.to(torch.bfloat16).unsqueeze(0), q, scale).sum(0)
            return out.reshape(*shape, q.shape[0])
        out = F.linear(x2.to(torch.bfloat16), dequantize(q, scale, torch.bfloat16))
        out = out.float() if widen else out
    else:
        out = F.linear(x2.float(), dequantize(q, scale))
    return out.reshape(*shape, q.shape[0])


def widened_on_cpu(weight: torch.Tensor) -> bool:
    """A bf16/fp16 weight on a CPU without units for its dtype: its products of many rows run in fp32."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16)
            and not cpu_features().native_matmul(weight.dtype))


def many_rows_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype `cpu_linear` computes a product of many rows (MANY_ROWS or more: a prefill) in, for a weight
    stored as `weight`: bf16 for int8/int4 weights where this CPU has bf16 units, else fp32; fp32 for bf16/fp16
    weights on a CPU without units for them; the weight's own dtype otherwise."""
    if weight.dtype in (INT4_STORAGE, torch.int8):
        return torch.bfloat16 if cpu_features().native_matmul(torch.bfloat16) else torch.float32
    return torch.float32 if widened_on_cpu(weight) else weight.dtype


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
               widen: bool = True) -> torch.Tensor:
    """x [..., K] @ Wᵀ -> fp32 [..., N] on a CPU, each case where it runs fastest (see the module docstring);
    widen=False: see `linear`."""
    rows = x.numel() // x.shape[-1]
    few = rows < MANY_ROWS or (rows < WIDENED_STREAM_ROWS and widened_on_cpu(weight))  # (module docstring)
    if weight.dtype != torch.float32 and few and cpu_kernels.tried() and cpu_kernels.handles(x, weight):
        return cpu_kernels.linear(x, weight, scale)
    shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    many = rows >= MANY_ROWS
    if weight.dtype == INT4_STORAGE and scale is None:
        raise ValueError("an int4 weight needs its (scale, min) groups")
    if weight.dtype == torch.int8 and scale is None:
        raise ValueError("an int8 weight needs its per-row scale")
    if many and cpu_kernels.tried() and cpu_kernels.runs_gemm(weight):  # int8 and int4 alike
        return cpu_kernels.gemm(x, weight, scale)
    if weight.dtype == INT4_STORAGE:
        wide = many_rows_dtype(weight) if many else torch.float32
        out = F.linear(x2.to(wide), widen_int4(weight, scale, wide)).float()
        return out.reshape(*shape, weight.shape[0])
    if weight.dtype == torch.int8:
        if many and many_rows_dtype(weight) == torch.bfloat16:
            out = F.linear(x2.to(torch.bfloat16), weight.to(torch.bfloat16)).float().mul_(scale)
        elif many:
            out = F.linear(x2.float(), dequantize(weight, scale))
        else:  # PyTorch's weight-only int8 kernel (vectorised dequantise-and-multiply; bf16 activations)
            out = torch._weight_int8pack_mm(x2.to(torch.bfloat16).contiguous(), weight,
                                            scale.to(torch.bfloat16)).float()
    elif many and widened_on_cpu(weight):
        out = F.linear(x2.float(), weight.float())
    else:
        out = F.linear(x2.to(weight.dtype), weight)
        out = out.float() if widen else out
    return out.reshape(*shape, weight.shape[0])


def decode_streams(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """A decode step's product of x's rows with `weight` streams through cpu_kernels (see decode_linear)."""
    return (x.device.type == "cpu" and x.numel() < STREAM_ROWS * x.shape[-1]
            and (weight.dtype in (torch.int8, INT4_STORAGE) or widened_on_cpu(weight))
            and cpu_kernels.tried() and cpu_kernels.handles(x, weight))


def decode_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """`linear` for a decode step's rows: streamed up to STREAM_ROWS rows where a GEMM would widen the weight."""
    return cpu_kernels.linear(x, weight, scale) if decode_streams(x, weight) else linear(x, weight, scale)


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           widen: bool = True) -> torch.Tensor:
    """x @ weightᵀ in fp32 out; int8 weights need their `scale`, int4 ones their groups. CPUs: `cpu_linear`.
    widen=False: a GEMM that ran in bf16/fp16 returns its result in that dtype, not widened to fp32 (for a
    consumer that reads it in that dtype anyway); every other product returns fp32 as always."""
    if x.device.type == "cpu":
        return cpu_linear(x, weight, scale, widen)
    if weight.dtype == INT4_STORAGE:
        raise ValueError(f"int4 weights run on CPUs only, not on {x.device.type}")
    if weight.dtype == torch.int8:
        if scale is None:
            raise ValueError("an int8 weight needs its per-row scale")
        return int8_linear(x, weight, scale, widen)
    out = F.linear(x.to(weight.dtype), weight)
    return out.float() if widen else out
