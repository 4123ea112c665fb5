"""Where a decode step's GPU time goes: the CUDA-graphed step of a random-weight model, captured whole, with parts
left out and with module settings changed, timed side by side in one process.

    python -m benchmarks.decode_parts --versions 5.2,7 --dtypes bf16,int8
    python -m benchmarks.decode_parts --versions 7 --dtypes bf16 --rows 256     # the step of 256 chats
    python -m benchmarks.decode_parts --versions 5.2 --dtypes int8 \\
        --set "preload 2=rwkv_chat.kernels.triton_kernels.GEMV_CONFIGS.int8.preload=2"

What it promises:
- Every table row is a CUDA graph of the step the model's runner replays (`model.runner._graphs.step`) for --rows chats
  (default one), each from the state a --prompt-tokens prompt of the benchmark's random checkpoint left
  (benchmarks.bench's, --checkpoint-values as there). Times are CUDA events over --replays replays; each round
  times every graph in turn and the table gives the median over --rounds rounds, so a machine that drifts moves
  the table rows alike; tok/s is chats × steps a second. The graphs share one memory pool (no graph's outputs
  are read), so the new states of many chats (8.6 GB for 256 at RWKV-7 7.2B) are held once, not once a graph.
- "whole step": the step as the app runs it. "without ln_mix", "without the wkv step", "products only": the step
  captured with those launches left out (triton_kernels.ln_mix, wkv4_decode, wkv5_decode, rwkv6_triton.wkv6_decode
  and rwkv7_triton.wkv7_decode return without launching). Such a graph computes nothing useful; what it saves is
  what those kernels cost inside the step: the most that fusing them into other kernels could give.
- `--set "NAME=MODULE.ATTR[.KEY...]=VALUE"` (repeatable): a row captured with that setting (a Python literal; KEYs
  index dicts, as GEMV_CONFIGS.int8.preload), restored afterwards. Its logits after one step are compared with the
  whole step's: "same bits" or the largest difference.
- CUDA only: elsewhere it says so and exits with 2. Nothing is asserted; it prints tables.

It knows the step's small-kernel entry points by name, not the model's structure.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import statistics
import sys
from contextlib import ExitStack, contextmanager

import torch

from benchmarks.bench import SIZES, OursImpl, cleanup, random_state_dict
from rwkv_chat.runtime.cuda_graphs import BUCKETS, captured
from rwkv_chat.state import RwkvState

LEFT_OUT = {"whole step": (), "without ln_mix": ("ln_mix",), "without the wkv step": ("wkv",),
            "products only": ("ln_mix", "wkv")}


@contextmanager
def setting(path: str, value):
    """MODULE.ATTR[.KEY...] set to value inside the block (the longest importable prefix is the module)."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
            break
        except ImportError:
            continue
    else:
        raise ValueError(f"--set: no module in {path!r}")
    *walk, last = parts[cut:]
    for name in walk:
        owner = owner[name] if isinstance(owner, dict) else getattr(owner, name)
    is_dict = isinstance(owner, dict)
    if not (last in owner if is_dict else hasattr(owner, last)):
        raise ValueError(f"--set: {path!r} names nothing that exists")
    old = owner[last] if is_dict else getattr(owner, last)
    put = owner.__setitem__ if is_dict else functools.partial(setattr, owner)
    put(last, value)
    try:
        yield
    finally:
        put(last, old)


def _no_ln_mix(x, *args, **kwargs):
    return x


def _no_wkv(r, *args, **kwargs):
    out_dtype = next(a for a in args if isinstance(a, torch.dtype))
    return torch.empty((r.shape[1], r.shape[2]), device=r.device, dtype=out_dtype)


@contextmanager
def left_out(parts: tuple[str, ...]):
    paths = {"ln_mix": [("rwkv_chat.kernels.triton_kernels.ln_mix", _no_ln_mix)],
             "wkv": [("rwkv_chat.kernels.triton_kernels.wkv4_decode", _no_wkv),
                     ("rwkv_chat.kernels.triton_kernels.wkv5_decode", _no_wkv),
                     ("rwkv_chat.kernels.rwkv6_triton.wkv6_decode", _no_wkv),
                     ("rwkv_chat.kernels.rwkv7_triton.wkv7_decode", _no_wkv)]}
    with ExitStack() as stack:
        for part in parts:
            for path, stub in paths[part]:
                stack.enter_context(setting(path, stub))
        yield


def parse_set(text: str) -> tuple[str, str, object]:
    name, path, value = text.split("=", 2)
    return name, path, ast.literal_eval(value)


def bench_model(args, version: str, size: str, dtype: str, device: torch.device) -> None:
    sd = random_state_dict(version, *SIZES[size], seed=args.seed, device=device, values=args.checkpoint_values)
    model = OursImpl(sd, device, dtype).model
    del sd
    cleanup()
    variants = [(name, left_out(parts)) for name, parts in LEFT_OUT.items()]
    variants += [(name, setting(path, value)) for name, path, value in map(parse_set, args.set)]
    with torch.inference_mode():
        _, state = model.forward(torch.randint(1, 65530, (args.prompt_tokens,)).tolist())
        model.forward([1], state)
        state = RwkvState(*(t.expand(args.rows, *t.shape[1:]).contiguous() for t in (state.shift, state.wkv)))
        step = model.runner._graphs.step
        ids = torch.ones(args.rows, dtype=torch.long, device=device)
        graphs, logits, pool = {}, {}, torch.cuda.graph_pool_handle()
        run = functools.partial(step, ids, state.shift, state.wkv)
        for name, context in variants:
            with context:
                graphs[name] = captured(run, device, pool)[0]
                logits[name] = run()[0].clone()
        times = {name: [] for name in graphs}
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(args.rounds):
            for name, graph in graphs.items():
                for _ in range(3):
                    graph.replay()
                start.record()
                for _ in range(args.replays):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end) * 1e3 / args.replays)
    whole = statistics.median(times["whole step"])
    print(f"\n### RWKV-{version} {size} {dtype}, {args.rows} row(s): {torch.cuda.get_device_name(device)}\n\n"
          "| graph | µs a step | tok/s | saves µs | logits vs the whole step |\n|---|---:|---:|---:|---|")
    for name, spread in times.items():
        median = statistics.median(spread)
        if name in LEFT_OUT and name != "whole step":
            parity = "(not computed)"
        else:
            diff = (logits[name] - logits["whole step"]).abs().max().item()
            parity = "same bits" if torch.equal(logits[name], logits["whole step"]) else f"max |Δ| {diff:.3g}"
        print(f"| {name} | {median:.1f} | {args.rows * 1e6 / median:.1f} | {whole - median:.1f} | {parity} |",
              flush=True)
    del model, graphs, run, step, state
    cleanup()


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode_parts", description=__doc__.split("\n")[0])
    p.add_argument("--versions", default="5.2,7")
    p.add_argument("--sizes", default="7B", help="comma list of " + ",".join(SIZES))
    p.add_argument("--dtypes", default="bf16,int8")
    p.add_argument("--rows", type=int, default=1, help="chats a step decodes (1 to 256)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--replays", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-values", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--set", action="append", default=[], metavar="NAME=MODULE.ATTR=VALUE",
                   help="a row captured with this setting (repeatable)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not 1 <= args.rows <= BUCKETS[-1]:
        raise ValueError(f"--rows: {args.rows} is not in 1..{BUCKETS[-1]} (the step's graph buckets)")
    for text in args.set:  # clear errors before any model is built
        name, path, value = parse_set(text)
        with setting(path, value):
            pass
    if not torch.cuda.is_available():
        print("decode_parts times CUDA graphs: it needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    for size in args.sizes.split(","):
        for version in args.versions.split(","):
            for dtype in args.dtypes.split(","):
                bench_model(args, version, size, dtype, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
