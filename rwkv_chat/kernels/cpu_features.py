"""What this x86 CPU can do, and so which product each CPU path takes.

What this module promises:
- `cpu_features()` is the `CpuFeatures` of this machine: AVX2, AVX-VNNI, AVX-512, AVX512-VNNI, AVX512-BF16, AMX
  (bf16 and fp16 tiles), as PyTorch's own CPU checks report them (the instruction sets its oneDNN kernels use;
  AVX-VNNI, which PyTorch does not report, from the flags of Linux's /proc/cpuinfo: elsewhere it counts as
  absent, and the AVX2 products serve). Detected once per
  process; the environment variable RWKV_CPU_ISA (one of PATHS) caps them for this call, so the paths below a
  CPU's best can be run and compared on it (the tests do). A value outside PATHS raises ValueError naming the
  variable and the values it takes; asking for more than the CPU has gives what it has.
- `CpuFeatures.path` names the best path (amx > avx512_bf16 > avx512 > avx_vnni > avx2 > baseline; avx_vnni is
  AVX2 with AVX-VNNI's 256-bit integer dot products and no AVX-512: Intel's client CPUs from Alder Lake on);
  `native_matmul(dtype)` says whether PyTorch's matrix product of that dtype runs on matrix units or dot-product
  instructions for it (bf16 with AVX512-BF16 or AMX, fp16 with AMX-FP16; fp32 always). Where it does not, a bf16
  or fp16 product of many rows is many times slower than the fp32 one (measured: 3.5× on AVX2 Zen 3 the other
  way round from Zen 4 with AVX512-BF16, whose bf16 GEMM reads 220 GFLOP/s against 56-69 for fp32).
  `int8_dot` names the C++ kernels' integer products (int8 and int4 weights on int16 / int8 activations;
  csrc/cpu_kernels.cpp): "avx512_vnni" where the path keeps AVX-512 and the CPU has VNNI; "avx_vnni" where the
  path is avx_vnni (the GEMMs on AVX-VNNI, the products of few rows on AVX2); else "avx2". All give the same bits.
  `int8_gemm` says whether int8 / int4 products of many rows (a prefill) take a C++ integer GEMM: the VNNI one
  wherever the path has AVX512-VNNI, AMX CPUs included, the AVX-VNNI one where the path is avx_vnni, the AVX2 one
  where it is avx2 (all with the same bits).
- `CpuFeatures.prefetch_bytes` is how far ahead of the row they read the C++ products of few rows ask for the
  next weights (software prefetch; 0: not at all), and `prefetch_rows_below` for which weights: rows shorter than
  that many bytes (0: every row). Intel CPUs get PREFETCH_INTEL for every row, into L2: on the first Xeon measured
  (2 cores) prefetching at all made the products read their weights at ~85% of a plain read instead of ~65%,
  because a core's hardware prefetch alone leaves the loads waiting on memory between the rows' arithmetic (decode
  18-31% faster); on another (2 cores, 480 MiB L3, 2026-12-04) prefetching into L2 inside the products' loops
  instead of into L1 at each row's start made decode 4-62% faster in every format at 0.1B and 1.5B (int8 at 1.5B
  12.0 -> 19.4 tok/s), its AVX2 products (capped) too, and on the GPU machine's Xeon host the two levels measured
  alike at 4,096. AMD CPUs of family 26 and later (Zen 5) get PREFETCH_ZEN5 for rows shorter than
  PREFETCH_ZEN5_ROWS_BELOW: measured there (2 cores), decode 2.7-6.8% faster with rows of 384-1,536 bytes (0.1B
  and 0.4B models in every format, int4 at 1.5B) and 3-4% slower with rows of 2,048 and 4,096 (int8 and bf16 at
  1.5B). `prefetch_to_l2` says where the prefetches put
  the weights: into L2 only (prefetcht1) or into L1 as well (prefetcht0, the default). AMD Zen 4 (family 25 with
  AVX-512) gets PREFETCH_ZEN4 for every row into L2: there prefetching into L1 made decode 11-26% slower; into L2,
  issued inside the products' loops (one row: int8, int4, float; several rows: int8), int8 decode ran 11-19%
  faster at 0.1B, int4 decode 8-11% at 1.5B (at 0.1B within noise, as int4 prefetched at each row's start was at
  both sizes) and the bf16 products of long rows (7,168-14,336 columns) 1.5-2.2× (2 cores, alternated in one
  process; docs/PERFORMANCE.md). Its AVX2 int8 product lost 11% with it, so a Zen 4 capped below the avx512 path
  (RWKV_CPU_ISA) prefetches nothing. Zen 3 (family 25 without AVX-512) gets PREFETCH_ZEN3 for every row into L2:
  measured there (2 cores, 2026-12-05, alternated in one process), int4 decode 15-27% faster at 0.1B and 35-47%
  at 1.5B, int8 5-12% at 0.1B and -5% to +1% at 1.5B (three runs), bf16 -11% to +14% (two runs a size: noise).
  Older AMD CPUs (Zen 2 and before, not measured) get 0. RWKV_CPU_PREFETCH (bytes, 0..MAX_PREFETCH) sets the
  distance for every row on any CPU (the CPU's level kept); other values raise ValueError naming the variable and
  the bound.
- `describe()` is the one line the app prints at start-up.

It knows instruction sets, not models; the products that use it live in kernels/quant.py.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, replace

import torch

ISA_VARIABLE = "RWKV_CPU_ISA"
PATHS = ("baseline", "avx2", "avx_vnni", "avx512", "avx512_bf16", "amx")  # from the least to the most a CPU can have
PREFETCH_VARIABLE = "RWKV_CPU_PREFETCH"
PREFETCH_INTEL = 8192  # bytes, into L2; on the 480 MiB-L3 Xeon 4,096 gave 1-10% less, 16,384 about the same
PREFETCH_ZEN5 = 4096  # bytes; on a Zen 5 at 0.1B 2,048 and 8,192 gave a little less, at 1.5B all three lost
PREFETCH_ZEN5_ROWS_BELOW = 2048  # bytes a weight row: shorter rows gained on a Zen 5, rows of 2,048 and 4,096 lost
ZEN5_FAMILY = 26  # /proc/cpuinfo's "cpu family" of AMD's Zen 5
PREFETCH_ZEN4 = 8192  # bytes, into L2; 4,096 gave less on long rows, 16,384 about the same
ZEN4_FAMILY = 25  # Zen 3 and Zen 4 share it: Zen 4 is the one with AVX-512
PREFETCH_ZEN3 = 8192  # bytes, into L2; 4,096 gave int4 a little more and bf16 less, both within noise
MAX_PREFETCH = 1 << 20
VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}


@dataclass(frozen=True)
class CpuFeatures:
    avx2: bool = False
    avx_vnni: bool = False  # AVX-VNNI: 256-bit integer dot products without AVX-512 (VEX vpdpbusd)
    avx512: bool = False  # AVX-512 F/BW/VL/DQ, as PyTorch's AVX512 kernels need
    avx512_vnni: bool = False  # AVX512-VNNI's integer dot products (part of the avx512 path)
    avx512_bf16: bool = False
    amx_bf16: bool = False  # AMX tiles with bf16 (Sapphire Rapids and later)
    amx_fp16: bool = False  # AMX tiles with fp16 (Granite Rapids)
    vendor: str = ""  # "intel", "amd" or "" (not known)
    prefetch_bytes: int = 0  # how far ahead the C++ products of few rows prefetch weights (0: they do not)
    prefetch_rows_below: int = 0  # ... for weight rows shorter than this many bytes (0: every row)
    prefetch_to_l2: bool = False  # ... into L2 only (prefetcht1), else into L1 too (prefetcht0)

    @property
    def path(self) -> str:
        if self.amx_bf16:
            return "amx"
        if self.avx512_bf16:
            return "avx512_bf16"
        if self.avx512:
            return "avx512"
        if self.avx2 and self.avx_vnni:
            return "avx_vnni"
        return "avx2" if self.avx2 else "baseline"

    def native_matmul(self, dtype: torch.dtype) -> bool:
        """PyTorch's CPU product in `dtype` runs at least as fast as the fp32 one here."""
        if dtype == torch.bfloat16:
            return self.avx512_bf16 or self.amx_bf16
        if dtype == torch.float16:
            return self.amx_fp16
        return True

    @property
    def int8_dot(self) -> str:
        if self.avx512 and self.avx512_vnni:
            return "avx512_vnni"
        return "avx_vnni" if self.path == "avx_vnni" else "avx2"

    @property
    def int8_gemm(self) -> bool:
        """A product of many rows with int8 or int4 weights runs on a C++ integer GEMM (int8 activations) here:
        the VNNI one wherever the path has AVX512-VNNI, the AVX-VNNI one where the path is avx_vnni (on a Xeon
        capped to it, 2 threads, 256 rows, 2026-12-05: int8 380-500 GOP/s against 140-190 for the AVX2 GEMM and
        195-210 GFLOP/s for PyTorch's fp32 GEMM capped to AVX2), the AVX2 one where the path is avx2. Measured
        at 2 threads, 128 rows: on a Zen 4 the VNNI GEMM ran 1.6-1.8x the widened bf16 GEMM; on a Xeon with AMX,
        whole int8 prefills (128 tokens, 2 cores, 2026-12-03) ran 1.05-1.13x the widened GEMM on AMX's bf16 tiles
        at 0.1B and 1.00-1.05x at 1.5B (RWKV-7: 1.54x), because widening a model's weights to bf16 every prefill
        costs memory traffic that the GEMM alone, timed on one cached matrix, does not show. int4 prefills there
        ran within noise of the widened path (0.96-1.04x), so one rule serves both. The AVX2 GEMM on a Zen 4
        (2 threads, 256 rows, 2026-12-03): 160-180 GOP/s int8, 215-230 int4, against 105-140 for PyTorch's fp32
        GEMM on the widened weights (MKL not capped); whole 0.1B int8 prefills with everything capped to AVX2
        1.4-1.5x faster than widening (docs/PERFORMANCE.md). AVX-512 CPUs without VNNI (Skylake-X) keep the widened fp32
        GEMM: their 16-lane FMAs match the AVX2 integer products' rate, and no such CPU was at hand to measure."""
        return self.int8_dot in ("avx512_vnni", "avx_vnni") or self.path == "avx2"

    def capped(self, path: str) -> "CpuFeatures":
        """These features without those above `path` (PATHS order); an AMD Zen 4's L2 prefetch (measured for
        its VNNI products; its AVX2 products lost with it) off below the avx512 path (a Zen 3's, measured on its
        AVX2 products, stays)."""
        rank = PATHS.index(path)

        def keeps(level: str) -> bool:
            return rank >= PATHS.index(level)
        zen4_below = self.vendor == "amd" and self.avx512 and self.prefetch_to_l2 and not keeps("avx512")
        prefetch = 0 if zen4_below else self.prefetch_bytes
        return replace(self, prefetch_bytes=prefetch, avx2=self.avx2 and keeps("avx2"),
                       avx_vnni=self.avx_vnni and keeps("avx_vnni"), avx512=self.avx512 and keeps("avx512"),
                       avx512_vnni=self.avx512_vnni and keeps("avx512"),
                       avx512_bf16=self.avx512_bf16 and keeps("avx512_bf16"), amx_bf16=self.amx_bf16 and keeps("amx"),
                       amx_fp16=self.amx_fp16 and keeps("amx"))


def _cpu_info() -> str:
    """The start of Linux's /proc/cpuinfo, else platform.processor() (which names the maker on Windows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            return info.read(1 << 16)
    except OSError:
        return platform.processor()


def _vendor_and_family(text: str) -> tuple[str, int]:
    """The CPU's maker ("intel", "amd" or "") and family number (0 where not given) from `_cpu_info()`."""
    vendor = next((name for marker, name in VENDORS.items() if marker in text), "")
    family = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                   if line.startswith("cpu family") and ":" in line), "")
    return vendor, int(family) if family.isdigit() else 0


def _flags(text: str) -> set[str]:
    """The first "flags" line of `_cpu_info()` (Linux's /proc/cpuinfo) as a set; empty where there is none."""
    line = next((line for line in text.splitlines() if line.startswith("flags") and ":" in line), "")
    return set(line.split(":", 1)[1].split()) if line else set()


def _default_prefetch(vendor: str, family: int, avx512: bool) -> tuple[int, int, bool]:
    """(prefetch_bytes, prefetch_rows_below, prefetch_to_l2) for this maker and family (the module docstring says
    why); `avx512`: the CPU has it (whatever RWKV_CPU_ISA caps), which tells a Zen 4 from a Zen 3."""
    if vendor == "intel":
        return PREFETCH_INTEL, 0, True
    if vendor == "amd" and family >= ZEN5_FAMILY:
        return PREFETCH_ZEN5, PREFETCH_ZEN5_ROWS_BELOW, False
    if vendor == "amd" and family == ZEN4_FAMILY:
        return (PREFETCH_ZEN4 if avx512 else PREFETCH_ZEN3), 0, True
    return 0, 0, False


def _check(name: str) -> bool:
    probe = getattr(torch.cpu, name, None)  # PyTorch's cpuinfo checks; older releases lack some
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


@functools.lru_cache(maxsize=1)
def detected() -> CpuFeatures:
    """What the CPU has (not capped by the environment). Non-x86 CPUs have none of these."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return CpuFeatures()
    text = _cpu_info()
    vendor, family = _vendor_and_family(text)
    avx512 = _check("_is_avx512_supported")
    prefetch, rows_below, to_l2 = _default_prefetch(vendor, family, avx512)
    return CpuFeatures(avx2=_check("_is_avx2_supported"), avx_vnni="avx_vnni" in _flags(text), avx512=avx512,
                       avx512_vnni=_check("_is_vnni_supported"),
                       avx512_bf16=_check("_is_avx512_bf16_supported"), amx_bf16=_check("_is_amx_tile_supported"),
                       amx_fp16=_check("_is_amx_fp16_supported"), vendor=vendor,
                       prefetch_bytes=prefetch, prefetch_rows_below=rows_below, prefetch_to_l2=to_l2)


def _prefetch_override() -> int | None:
    raw = os.environ.get(PREFETCH_VARIABLE, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_PREFETCH:
        raise ValueError(f"{PREFETCH_VARIABLE} must be a whole number of bytes from 0 (no prefetch) to "
                         f"{MAX_PREFETCH:,} (or unset for this CPU's default), got {raw!r}")
    return value


def cpu_features() -> CpuFeatures:
    """The features the CPU paths use now: the detected ones, capped by RWKV_CPU_ISA and with the prefetch
    distance of RWKV_CPU_PREFETCH (for every row) where they are set."""
    features = detected()
    wanted = os.environ.get(ISA_VARIABLE, "").strip().lower()
    if wanted:
        if wanted not in PATHS:
            raise ValueError(f"{ISA_VARIABLE} must be one of {', '.join(PATHS)} (or unset for the CPU's best), "
                             f"got {wanted!r}")
        features = features.capped(wanted)
    prefetch = _prefetch_override()
    return features if prefetch is None else replace(features, prefetch_bytes=prefetch, prefetch_rows_below=0)


def describe() -> str:
    features = cpu_features()
    have = [name for name in ("avx2", "avx_vnni", "avx512", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_fp16")
            if getattr(features, name)]
    matmul = "bf16 products on the CPU's bf16 units" if features.native_matmul(torch.bfloat16) else \
        "bf16/fp16 products as fp32 (no bf16 units)"
    capped = f" (capped by {ISA_VARIABLE})" if os.environ.get(ISA_VARIABLE, "").strip() else ""
    rows = f" (rows under {features.prefetch_rows_below:,} bytes)" if features.prefetch_rows_below else ""
    level = " into L2" if features.prefetch_to_l2 else ""
    prefetch = (f"weights prefetched {features.prefetch_bytes:,} bytes ahead{level}{rows}"
                if features.prefetch_bytes else "no software prefetch")
    gemm = {"avx512_vnni": "VNNI GEMM", "avx_vnni": "AVX-VNNI GEMM"}.get(features.int8_dot, "AVX2 GEMM") \
        if features.int8_gemm else "widened"
    decode = "avx512_vnni" if features.int8_dot == "avx512_vnni" else "avx2"
    return (f"CPU path {features.path}{capped}: {', '.join(have) or 'no AVX2'}; {matmul}; "
            f"int8/int4 decode products {decode}; "
            f"int8/int4 prefill products {gemm}; {prefetch}")
