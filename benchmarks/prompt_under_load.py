"""How long one short prompt takes to read while a batcher decodes N other chats: graphed (prefill_graphs) against
the direct prefill, side by side, in one process.

    python -m benchmarks.prompt_under_load --device cuda --shape 24x2048 --chats 0,32,128 --tokens 20,60,200
    python -m benchmarks.prompt_under_load                     # CPU, a small shape (no graphs there: direct only)

What it promises:
- One random-weight checkpoint (bench.random_state_dict, --version, LAYERSxWIDTH --shape), loaded as the app loads
  it (fast path, --dtype), a `DecodeBatcher` of --max-batch rows and a `ChatEngine` over it. For each count in
  --chats, that many chats generate sampled answers of up to 2,048 tokens in threads of their own (restarting
  when one ends) while this thread times `model.forward` over a prompt of each --tokens length from an empty
  state: the median, min and max of --reps reads in ms (logits copied to the host, device work synchronised
  before the clock starts), through the runner's prefill (graphed where graphs run) and its direct prefill
  (`runner._prefill_last`, the same function unreplayed), both in this thread beside the batcher's worker, and
  through the batcher's own `read` (the engine's read: on the CPU by the worker, between its steps, in pieces of
  batching.READ_CHUNK tokens). Graphs are captured before the clock starts.
- Nothing is asserted; it prints a table (and --json writes it). The chats' own speed is not measured here
  (bench.py --batch and load_test.py do that).

docs/PERFORMANCE.md's "short prompts were launch-bound" figures (H200) came from a first version of this script
(the same reads through model.forward, 20 tokens, before and after the graphs); this form, with both columns in
one run, has run on a CPU only so far.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from rwkv_chat.loading.loader import load_model
from rwkv_chat.serving.batching import DecodeBatcher
from rwkv_chat.serving.engine import ChatEngine, GenerationSettings
from rwkv_chat.serving.sampling import SamplingParams
from rwkv_chat.serving.session import ChatSession
from rwkv_chat.tokenizer import WorldTokenizer

from .load_test import random_checkpoint

ANSWER_TOKENS = 2_048


def timed_reads(read, ids: list[int], reps: int, device: torch.device) -> list[float]:
    """ms of `read(ids)` (logits to the host), `reps` times."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        logits, _ = read(ids)
        logits.float().cpu()
        times.append((time.perf_counter() - start) * 1000)
    return times


class Chatter:
    """`count` chats generating in threads of their own until `stop`."""

    def __init__(self, engine: ChatEngine, count: int):
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._chat, args=(engine, i), daemon=True) for i in range(count)]
        for thread in self.threads:
            thread.start()

    def _chat(self, engine: ChatEngine, index: int) -> None:
        settings = GenerationSettings(SamplingParams(temperature=1.0, top_p=0.9), max_new_tokens=ANSWER_TOKENS,
                                      seed=index, turn_ends_answer=False)
        while not self.stop.is_set():
            for _ in engine.reply(ChatSession(), f"chat {index} says hello", settings, self.stop):
                pass

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--version", default="5.2", help="RWKV version of the random checkpoint (4, 5.2, 6, 7)")
    p.add_argument("--shape", default="4x256", help="LAYERS x WIDTH of the random checkpoint")
    p.add_argument("--chats", default="0,4", help="decoding chats beside the prompt, comma-separated")
    p.add_argument("--tokens", default="20,60", help="prompt lengths, comma-separated")
    p.add_argument("--max-batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--settle", type=float, default=4.0, help="seconds the chats run before the clock starts")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        path = random_checkpoint(Path(folder), args.shape, 0, args.version)
        model = load_model(str(path), args.device, args.dtype, fast=True)
    device = torch.device(model.device)
    runner = model.runner
    engine = ChatEngine(model, WorldTokenizer(), decoder=DecodeBatcher(model, max_batch=args.max_batch))
    direct = getattr(runner, "_prefill_last", None)
    ways = {"graphed" if getattr(runner, "_prompt_graphs", None) is not None else "runner": model.forward}
    if direct is not None and "graphed" in ways:
        ways["direct"] = lambda ids: direct(torch.tensor(ids, device=device), model.zero_state(1))
    ways["batcher's read"] = engine.decoder.read
    lengths = [int(n) for n in args.tokens.split(",")]
    for read in ways.values():  # compile kernels, capture graphs
        for n in lengths:
            timed_reads(read, list(range(1000, 1000 + n)), 2, device)

    rows = []
    for count in [int(n) for n in args.chats.split(",")]:
        chatter = Chatter(engine, count)
        time.sleep(args.settle if count else 0)
        try:
            for n in lengths:
                ids = list(range(1000, 1000 + n))
                for way, read in ways.items():
                    times = timed_reads(read, ids, args.reps, device)
                    rows.append(dict(chats=count, tokens=n, way=way, median_ms=statistics.median(times),
                                     min_ms=min(times), max_ms=max(times)))
        finally:
            chatter.close()

    print(f"\n#### prompt reads beside decoding chats · RWKV-{args.version} {args.shape} {args.dtype} · "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}\n")
    print("| chats decoding | prompt tokens | read | median ms | min | max |")
    print("|---:|---:|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['chats']} | {row['tokens']} | {row['way']} | {row['median_ms']:.1f} | {row['min_ms']:.1f} | "
              f"{row['max_ms']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))
    engine.decoder.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
