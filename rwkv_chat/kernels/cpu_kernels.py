"""C++ AVX2 kernels for CPU decode steps and the prefill's wkv (csrc/cpu_kernels.cpp), compiled on first use,
and their loader.

What this module promises:
- `kernels()` returns the compiled extension, or None where it cannot run: not an x86 CPU with AVX2, no C++
  compiler or ninja, a failed build, or `RWKV_CPU_KERNELS=0` in the environment. It builds once per process
  (and torch caches the build on disk, so later processes only load it); a failure is reported once as a
  warning and never raised. Callers fall back to PyTorch when it returns None.
- `linear` is a weight-streaming product for few rows with fp32 activations (int8 weights: the activations are
  rounded to int16, one step per row, and the products are integer dot products, whose bound the C++ file gives,
  the same bits on AVX2 and on AVX512-VNNI. int4 weights
  (kernels/quant.py's packing): int8 activations, a step per 64 columns, and integer sums on every CPU, AVX2 or
  AVX512-VNNI; the extension's `int4_widen` dequantises them for a prefill's GEMM where `gemm` does not run).
  `gemm` is the product of many rows (a prefill) with an int8 or int4 weight on CPUs with AVX512-VNNI, or AVX2
  without AVX-512 (`runs_gemm` says where): int8 activations, a step per 32 columns (int4 weights: 64, as their
  decode products round them), integer sums, the same bits on either instruction set; its error bound is in the
  C++ file. `DecodeStack(layers, version)` is every layer of a decode step in one call of the extension's
  `DecodeStack` (runtime/fast_path.py and runtime/cpu_decode.py run it); built with its `ends` (the embedding, the
  two outer LayerNorms and the head), its `logits` is the whole step from token ids to logits in one call.
  It returns its refusals instead of throwing them through the binding: they are raised here, as RuntimeError.
  The extension's `wkv4_scan` / `wkv5_scan` (RWKV-5/6) / `wkv7_scan` are the wkv of a prefill segment (the runners
  and the RWKV-6/7 modules call them; `built_for` hands them to the plain path once built, and
  `scan_each_sequence` runs one over a batch). Its `lora_shift_mixes` writes a prefill's token-shift mixes
  (RWKV-6/7) in fp32 or bf16 in one pass (models/layers.py's `ShiftMixes`). The tests hold them to PyTorch and to the
  float64 recurrence.

- A build lock that a stopped build left behind (torch's `lock` file in the extension's build directory, older
  than STALE_LOCK_SECONDS) is removed, with a warning, before building: torch would otherwise wait on it forever,
  so an app killed during its first build (a Space restarted, Ctrl-C) would hang at every later start.
- `configure()` picks the int8 and int4 products (cpu_features' `int8_dot`, so RWKV_CPU_ISA caps it) and the
  products' prefetch distance and level (cpu_features' `prefetch_bytes`, `prefetch_to_l2`, RWKV_CPU_PREFETCH) for
  the whole process; the build runs it once, and a caller that changes either variable afterwards (the tests, the
  benchmark) runs it again.

It knows how to build and call the kernels; the RWKV arithmetic lives in the C++ file and in the architectures.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from pathlib import Path

import torch

from .cpu_features import cpu_features

SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
EXTENSION_NAME = "rwkv_chat_cpu_kernels"
DISABLE_VARIABLE = "RWKV_CPU_KERNELS"
CAPABLE = ("AVX2", "AVX512")
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8)  # uint8: int4, packed
INT4 = torch.int4  # the int4 format's dtype token (quant.INT4), as a model names its dtype
GEMM_MULTIPLE = 32  # the GEMMs' blocks of columns and panels of rows
STALE_LOCK_SECONDS = 600  # a build takes about a minute on 2 cores: a lock this old was left by a stopped one

_lock = threading.Lock()
_built: dict[str, object] = {}  # "module": the extension or None, once tried (process-wide build cache)


def _unusable_reason() -> str | None:
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return f"{DISABLE_VARIABLE}=0"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in CAPABLE:
        return f"this CPU reports {capability}, not AVX2"
    from torch.utils import cpp_extension
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed"
    return None


def build_directory() -> Path | None:
    """Where torch builds and caches the extension (TORCH_EXTENSIONS_DIR or its default), or None where this
    torch does not say (the function is torch's own, not public)."""
    from torch.utils import cpp_extension
    find = getattr(cpp_extension, "_get_build_directory", None)
    try:
        return Path(find(EXTENSION_NAME, False)) if find is not None else None
    except Exception:  # an unusual torch: no check, the build goes on as before
        return None


def clear_stale_lock(directory: Path, now: float | None = None) -> bool:
    """Removes torch's build lock in `directory` when it is older than STALE_LOCK_SECONDS (a build stopped while
    it held it), with a warning naming it; whether it did. A younger lock is another process building: kept."""
    lock = directory / "lock"
    try:
        age = (time.time() if now is None else now) - lock.stat().st_mtime
        if age < STALE_LOCK_SECONDS:
            return False
        lock.unlink()
    except FileNotFoundError:  # none, or its builder finished meanwhile
        return False
    warnings.warn(f"rwkv_chat: removed the CPU kernels' build lock {lock}, {age / 60:,.0f} min old (left by a build "
                  "that was stopped); building again", stacklevel=2)
    return True


def kernels():
    """The compiled extension, or None (see the module docstring)."""
    if "module" in _built:  # every product asks: no lock once the build was tried
        return _built["module"]
    with _lock:
        if "module" in _built:
            return _built["module"]
        module = None
        reason = _unusable_reason()
        if reason is None:
            try:
                from torch.utils import cpp_extension
                directory = build_directory()
                if directory is not None:
                    clear_stale_lock(directory)
                module = cpp_extension.load(
                    name=EXTENSION_NAME, sources=[str(SOURCE)],
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], verbose=False)
            except Exception as error:  # a missing compiler, a failed build: the PyTorch path still works
                reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error) else ''}"
        if module is not None:
            _configure(module)
        if module is None:
            warnings.warn(f"rwkv_chat: CPU kernels unavailable ({reason}); using PyTorch's products", stacklevel=2)
        _built["module"] = module
        return module


INT8_PRODUCTS = {"avx2": 0, "avx512_vnni": 1, "avx_vnni": 2}  # cpu_features' int8_dot -> set_int8_product


def _int8_product(module) -> str:
    """cpu_features' int8_dot as this build can run it: the AVX-VNNI GEMMs need a compiler with AVX-VNNI's
    intrinsics (GCC 11, clang 12 and later; the C++ file's RWKV_AVX_VNNI), else the AVX2 ones (the same bits)."""
    product = cpu_features().int8_dot
    return "avx2" if product == "avx_vnni" and not module.avx_vnni_runs() else product


def _configure(module) -> str:
    features = cpu_features()
    product = _int8_product(module)
    module.set_int8_product(INT8_PRODUCTS[product])
    module.set_prefetch_bytes(features.prefetch_bytes, features.prefetch_rows_below, features.prefetch_to_l2)
    return product


def configure() -> str | None:
    """Picks the int8 product and the prefetch distance by cpu_features() now (RWKV_CPU_ISA and RWKV_CPU_PREFETCH
    included); the int8 product's name, or None without kernels."""
    module = kernels()
    return _configure(module) if module is not None else None


def tried() -> bool:
    """Whether this process has already built (or failed to build) the kernels: the next `kernels()` is quick."""
    return "module" in _built


def built_for(tensor: torch.Tensor):
    """The extension, for a CPU tensor once this process has built it (every fast or low-precision CPU load
    does); else None. The plain path's prefill asks it for its token-by-token scans (wkv5_scan, wkv7_scan) and
    its RWKV-6/7 token-shift mixes (lora_shift_mixes), without ever starting a build itself."""
    return _built.get("module") if tensor.device.type == "cpu" else None


class DecodeStack:
    """Every layer of a decode step in one call into the C++ kernels (built: `kernels()` is not None). `layers`:
    each layer's tensors in the order the layer step of `version` (an architecture's `cpu_kernel_id`: 4, 5, 6, 7)
    reads them, held for the stack's life; n_att: the RWKV-4/5 time mix's projections (3, or 4 with a gate)."""

    def __init__(self, layers: list[list[torch.Tensor]], version: int, n_att: int = 0,
                 ends: list[torch.Tensor] | None = None):
        if version not in (4, 5, 6, 7) or not layers:
            raise ValueError(f"a decode stack needs layers and a layer step 4, 5, 6 or 7, not {version}")
        if ends is not None and len(ends) != 7:
            raise ValueError("a decode stack's ends are the embedding, ln0 weight and bias, ln_out weight and bias, "
                             "the head's weight and its scale")
        self.ends = ends
        self.whole = ends is not None
        self._stack = kernels().DecodeStack(layers, version, n_att, ends or [])

    def step(self, x: torch.Tensor, shift: torch.Tensor, wkv: torch.Tensor, shift_out: torch.Tensor,
             wkv_out: torch.Tensor, rescale_every: int = 0) -> torch.Tensor:
        """x [B, C] fp32 after ln0, overwritten with the residual stream after the last layer (halved after
        every `rescale_every` layers) and returned; the states [B, L, ...] (shift [B, L, 2, C], wkv as the
        architecture lays it out), the new ones written to the `_out` tensors. Refusals raise RuntimeError."""
        refusal = self._stack.step(x, shift, wkv, shift_out, wkv_out, rescale_every)
        if refusal:
            raise RuntimeError(refusal)
        return x

    def logits(self, ids: torch.Tensor, shift: torch.Tensor, wkv: torch.Tensor, shift_out: torch.Tensor,
               wkv_out: torch.Tensor, rescale_every: int = 0) -> torch.Tensor:
        """The whole step (a stack built with its `ends`): token ids [B] (int64) -> logits fp32 [B, V]: each id's
        embedding row, ln0, the layers as `step` runs them, ln_out and the head's product as the C++ rows product
        computes it (whatever the head's dtype); the states as `step` takes them."""
        refusal, logits = self._stack.logits(ids, shift, wkv, shift_out, wkv_out, rescale_every)
        if refusal:
            raise RuntimeError(refusal)
        return logits


def scan_each_sequence(scan, per_token: list[torch.Tensor], state: torch.Tensor):
    """A token-by-token scan over each sequence of a batch: `per_token` tensors [B, T, H, N] go to
    `scan(rows, state)` as contiguous fp32 [T, H*N] rows with that sequence's state [H, N, N], which returns
    (out [T, H*N], new state) -> (out [B, T, H, N], new state [B, H, N, N])."""
    batch, length, heads, size = per_token[0].shape
    pairs = [scan([t[b].reshape(length, heads * size).float().contiguous() for t in per_token], state[b].contiguous())
             for b in range(batch)]
    return (torch.stack([y for y, _ in pairs]).view(batch, length, heads, size),
            torch.stack([new for _, new in pairs]))


def handles_dtype(dtype: torch.dtype) -> bool:
    """Weights of this dtype (or the int4 format) get their CPU products here (builds the kernels on the first
    call)."""
    return (dtype in WEIGHT_DTYPES or dtype == INT4) and kernels() is not None


def handles(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """`linear(x, weight)` runs here: CPU tensors, a weight dtype the kernels read, and the kernels built."""
    return x.device.type == "cpu" and weight.device.type == "cpu" and handles_dtype(weight.dtype)


def runs_gemm(weight: torch.Tensor) -> bool:
    """A product of many rows with this int8 or int4 (uint8) weight takes the extension's `int8_gemm` /
    `int4_gemm`: a CPU whose features pick them (cpu_features' `int8_gemm`: AVX512-VNNI, or AVX2 without
    AVX-512), the kernels built with the features' int8 product picked (configure: it also picks the GEMM's VNNI,
    AVX-VNNI or AVX2 tiles), the weight's rows a multiple of GEMM_MULTIPLE (int8: its columns too; int4's are
    whole blocks of 64 by its format)."""
    if not (weight.dtype in (torch.int8, torch.uint8) and weight.device.type == "cpu" and weight.dim() == 2
            and weight.shape[0] % GEMM_MULTIPLE == 0 and cpu_features().int8_gemm):
        return False
    if weight.dtype == torch.int8 and weight.shape[1] % GEMM_MULTIPLE != 0:
        return False
    module = kernels()
    return module is not None and module.int8_product() == INT8_PRODUCTS[_int8_product(module)]


def gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ Wᵀ -> fp32 [..., N] for many rows: int8 weights with their per-row `scale`, or int4 (uint8
    [N, K/2]) with their (scale, min) groups as `scale`; int8 activations, a step per 32 columns (int4: 64; the
    C++ file gives the arithmetic and its bound). bf16 rows go in as they are (the C++ widens each row as it reads
    it: the bits of `x.float()` without the copy). Only where `runs_gemm(weight)`."""
    rows = x.reshape(-1, x.shape[-1])
    rows = (rows if rows.dtype == torch.bfloat16 else rows.float()).contiguous()
    product = kernels().int8_gemm if weight.dtype == torch.int8 else kernels().int4_gemm
    return product(rows, weight, scale).reshape(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ Wᵀ -> fp32 [..., N]; W fp32/bf16/fp16, int8 with its per-row `scale`, or int4 (uint8 [N, K/2])
    with its (scale, min) groups as `scale`. Only where `handles`."""
    rows = x.reshape(-1, x.shape[-1]).float().contiguous()
    out = kernels().rows_product(rows, weight, scale if weight.dtype in (torch.int8, torch.uint8) else None)
    return out.reshape(*x.shape[:-1], weight.shape[0])
