"""How fast could a CPU prefill go here? This CPU's arithmetic ceilings against the reference, in one run.

    python -m benchmarks.bench_cpu_bound             # 0.1B shape, RWKV-4 and RWKV-5.2, 1024-token prefill

What it promises:
- The ceilings of this CPU (benchmarks/cpu_bounds.cpp, x86-64 with AVX2 only), on one core and on all of torch's
  threads, in GMAC/s: register-only loops of the three AVX2 patterns a matrix product can be built from
  (fp32 FMA; int16 `vpmaddwd` + `vpaddd`; 8-bit `vpmaddubsw` + `vpaddw`, whose saturating 16-bit sums make it
  an upper bound for 8-bit products, not a usable one), a complete int16 GEMM micro-kernel on operands held in
  L1 (checked against a scalar loop), and PyTorch's fp32 GEMM on the prefill's own shapes.
- For each version: the matrix work any exact prefill of N tokens must do (every projection of every token,
  except in the last layer: k and v for every token (its wkv state), its other attention projections for
  the last two (the last token's channel mix reads the one before through its token shift), its channel mix
  and the head for the last one), the reference's prefill (the `rwkv` package, `cpu fp32`) and ours (bf16 fast
  path) timed in the same process on the same random checkpoint, and for each ceiling the time that matrix work alone
  would take at that rate (nothing else counted) and so the largest prefill speed-up over the reference it
  leaves room for.
- It prints markdown tables and asserts nothing. It is the measurement behind docs/PERFORMANCE.md's
  "Why prefill is not met".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.bench import SIZES, OursImpl, RwkvPipImpl, cleanup, random_state_dict

SOURCE = Path(__file__).with_name("cpu_bounds.cpp")
# every projection of a layer, and how many of the last tokens need it in the last layer (None: every token)
LAST_LAYER_ROWS = {"att.key": None, "att.value": None, "att.receptance": 2, "att.gate": 2, "att.output": 2,
                   "ffn.key": 1, "ffn.receptance": 1, "ffn.value": 1}
SECONDS_PER_MEASURE = 0.3


def build_extension():
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        raise SystemExit(f"this CPU reports {torch.backends.cpu.get_cpu_capability()}; the ceilings need AVX2")
    from torch.utils import cpp_extension
    return cpp_extension.load(name="rwkv_chat_cpu_bounds", sources=[str(SOURCE)],
                              extra_cflags=["-O2", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)


def best_rate(measure, calibration: int) -> float:
    """GMAC/s of measure(count, ...) at a count that runs about SECONDS_PER_MEASURE; best of three."""
    start = time.perf_counter()
    measure(calibration)
    count = max(calibration, int(calibration * SECONDS_PER_MEASURE / (time.perf_counter() - start)))
    return max(measure(count) for _ in range(3))


def ceilings(ext, threads: int) -> list[tuple[str, float, float, str]]:
    """(name, GMAC/s on one core, GMAC/s on `threads`, note) for each instruction pattern and the L1 tile."""
    rows = []
    for name, fn, note in (
            ("fp32 FMA (vfmadd231ps), registers only", ext.fp32_fma_peak, "fp32: what MKL's GEMM can reach"),
            ("int16 vpmaddwd + vpaddd, registers only", ext.int16_madd_peak,
             "the AVX2 int8 GEMM's product (int8 values widened to int16)"),
            ("int16 4×24 GEMM micro-kernel, L1 operands", ext.int16_tile_rate, "a real int16 GEMM's best case"),
            ("8-bit vpmaddubsw + vpaddw, registers only", ext.u8s8_madd_peak,
             "saturating 16-bit sums: a bound, not a usable product")):
        calibration = 20_000 if fn is ext.int16_tile_rate else 2_000_000
        one = best_rate(lambda n: fn(n, 1), calibration)
        every = best_rate(lambda n: fn(n, threads), calibration)
        rows.append((name, one, every, note))
    return rows


def layer_weights(sd: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    return {p: sd[f"blocks.{layer}.{p}.weight"] for p in LAST_LAYER_ROWS if f"blocks.{layer}.{p}.weight" in sd}


def prefill_macs(sd: dict[str, torch.Tensor], n_layer: int, tokens: int) -> int:
    """Multiply-accumulates an exact prefill of `tokens` must do (see the module docstring)."""
    macs = 0
    for i in range(n_layer):
        for name, w in layer_weights(sd, i).items():
            rows = tokens if i < n_layer - 1 or LAST_LAYER_ROWS[name] is None else min(tokens, LAST_LAYER_ROWS[name])
            macs += w.numel() * rows
    return macs + sd["head.weight"].numel()


def torch_gemm_rate(sd: dict[str, torch.Tensor], n_layer: int, tokens: int) -> float:
    """GMAC/s of PyTorch's fp32 GEMM over every layer's projections in turn, `tokens` rows each: each weight
    once and out of cache, as a prefill meets them. Best of three passes after a warm-up."""
    weights = [w for i in range(n_layer) for w in layer_weights(sd, i).values()]
    inputs = {k: torch.randn(tokens, k) for k in {w.shape[1] for w in weights}}
    macs = tokens * sum(w.numel() for w in weights)
    times = []
    for _ in range(4):
        start = time.perf_counter()
        for w in weights:
            F.linear(inputs[w.shape[1]], w)
        times.append(time.perf_counter() - start)
    return macs / min(times[1:]) / 1e9


def prefill_seconds(impl, prompt: list[int], reps: int) -> float:
    with torch.inference_mode():
        impl.prefill(prompt[:16])
        impl.prefill(prompt)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            impl.prefill(prompt)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bound_table(version: str, size: str, args, limits: list[tuple[str, float, float, str]]) -> str:
    n_layer, n_embd = SIZES[size]
    sd = random_state_dict(version, n_layer, n_embd, seed=args.seed)
    prompt = torch.randint(1, 65530, (args.tokens,), generator=torch.Generator().manual_seed(args.seed + 1)).tolist()
    macs = prefill_macs(sd, n_layer, args.tokens)
    limits = limits + [("PyTorch fp32 GEMM on these shapes (measured)", float("nan"),
                        torch_gemm_rate(sd, n_layer, args.tokens), "what the reference and our prefill run on")]
    print(f"[bound] RWKV-{version} {size}: timing the reference and ours", file=sys.stderr, flush=True)
    reference = RwkvPipImpl(sd, "cpu", "cpu fp32")
    ref_s = prefill_seconds(reference, prompt, args.reps)
    del reference
    cleanup()
    ours = OursImpl(sd, "cpu", "bf16")
    ours_s = prefill_seconds(ours, prompt, args.reps)
    del ours, sd
    cleanup()
    target = args.target
    lines = [f"#### RWKV-{version} {size} (L{n_layer} D{n_embd}) · prefill {args.tokens} tok · "
             f"{macs / 1e9:.1f} GMAC of matrix work",
             "",
             f"Measured in this run: the reference (`rwkv` package, cpu fp32) {args.tokens / ref_s:,.0f} tok/s "
             f"({ref_s:.2f} s); ours, bf16, {args.tokens / ours_s:,.0f} tok/s ({ours_s:.2f} s, "
             f"{ref_s / ours_s:.2f}×). {target:g}× the reference means the whole prefill in {ref_s / target:.2f} s.",
             "",
             "| matrix work at the rate of | GMAC/s | seconds for the matrix work alone | largest × reference it "
             "allows | note |",
             "|---|---:|---:|---:|---|"]
    for name, _, rate, note in limits:
        seconds = macs / (rate * 1e9)
        lines.append(f"| {name} | {rate:.1f} | {seconds:.2f} | {ref_s / seconds:.2f}× | {note} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_cpu_bound", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="0.1B", choices=list(SIZES))
    p.add_argument("--versions", default="4,5.2")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3, help="prefill repetitions, median")
    p.add_argument("--target", type=float, default=2.5, help="the speed-up over the reference asked for")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print("[bound] building the ceiling loops", file=sys.stderr, flush=True)
    ext = build_extension()
    limits = ceilings(ext, threads)
    out = [f"### Arithmetic ceilings · {threads} threads · torch {torch.__version__}",
           "",
           "| instruction pattern | GMAC/s, one core | GMAC/s, all threads | note |",
           "|---|---:|---:|---|"]
    out += [f"| {name} | {one:.1f} | {every:.1f} | {note} |" for name, one, every, note in limits]
    print("\n".join(out) + "\n", flush=True)
    for version in args.versions.split(","):
        print(bound_table(version, args.size, args, limits) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
