"""Speed benchmark: this package against the `rwkv` package and transformers, side by side, in one process.

    python -m benchmarks.bench                       # CPU, 0.1B shape, v4 and v5.2
    python -m benchmarks.bench --device cuda --sizes 0.1B,1.5B,7B --dtypes bf16,int8 --batch 32
    python -m benchmarks.bench --versions 7 --dtypes fp32,bf16   # RWKV-7 (its reference needs a run of its own)

What it promises:
- Every implementation runs on the same random-weight checkpoint (original BlinkDL layout, built in memory
  from a seed with realistic scales), the same prompt and the same decode tokens, in this process.
- Rows: ours (fast path, each --dtypes entry), the `rwkv` package (strategy "cpu fp32" on CPU, "cuda fp16"
  with its CUDA kernel on GPUs) and transformers' RwkvForCausalLM (RWKV-4 shapes only; fp32 on CPU, fp16 on
  GPUs). Columns: prefill tok/s (one prompt of --prefill-tokens), decode tok/s (batch 1, --decode-tokens
  steps), memory of the implementation (held once loaded, and the peak of the whole run: loading, prefill
  and decode), ratio to the best reference, and parity against the fp32 reference (this package's plain
  path in fp32, which the tests hold to the `rwkv` package): max |Δlogit| and argmax agreement over the
  prompt's last token and --parity-steps teacher-forced decode steps.
- `--turn-tokens 2,16,60`: a second table per shape, ms of a prompt of each length for every row (a chat turn's
  wait before its first token; on GPUs our graphed pieces, captured by two untimed runs first).
- `--batch N`: N concurrent chats through `batching.DecodeBatcher` (a reading thread each), aggregate tok/s
  against one chat alone, all running the engine's per-token judge (stop rules, detokenising, penalties)
  and sampling with the default chat settings; each chat's logits (teacher-forced along its batched
  tokens) and sampled tokens against its unbatched run. Beside it, the ceilings without threads or judges:
  the batched model step alone, the step fed by the batcher's device sampling (`SamplingRows.step`), and
  that sampling alone (ms per step).
- int8 and int4 rows also report agreement with ours in bf16 (argmax, mean |Δlogit|): their quality measure.
  int4 runs on CPUs only.
- On CPUs, ours rows note their decode speed against the memory ceiling measured in the same run: the bytes a
  decode step must read (every weight and constant as stored, and the state it starts from) read plainly (fp32
  sums over a buffer that size on the same threads), as a percentage of the tokens a second that read allows.
  With `--rounds N` each round times that read right after its decode and the note gives the median of the
  rounds' shares (and their range).
- Timings are medians after warm-up; device work is synchronised before each clock read. Nothing is asserted:
  this prints tables (and --json writes them). `--rounds N` (N > 1) keeps every implementation of a shape
  loaded after its first pass and times them in turn, N rounds: figures are medians over those rounds, ratios
  the median of each round's ratio (the note gives their range), so a machine that slows down mid-run moves
  ours and the reference alike.

It imports the reference packages only when they are asked for and present; a missing one gives a note. The
`rwkv` package runs RWKV-7 only with RWKV_V7_ON=1 set before its import, which then serves no other version: a
run whose --versions are all "7" sets it, and in a mixed run the RWKV-7 shapes go without that reference.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from rwkv_chat.models import architecture_for

SIZES = {"tiny": (2, 256), "0.1B": (12, 768), "0.4B": (24, 1024), "1.5B": (24, 2048), "3B": (32, 2560),
         "7B": (32, 4096)}
VOCAB = 65536
HEAD_SIZE = 64
TIME_BUDGET_S = 4.0  # per implementation and phase: repetitions stop once this much time was spent


# ------------------------------------------------------------------------------------- checkpoints

def ffn_dim(version: str, n_embd: int) -> int:
    return architecture_for(version).default_ffn_size(n_embd)


def random_state_dict(version: str, n_layer: int, n_embd: int, vocab: int = VOCAB, seed: int = 0,
                      device="cpu", values: str = "fp32") -> dict[str, torch.Tensor]:
    """A random checkpoint in the original layout and key order, fp32, with scales like trained models'
    (unit-variance projections, decays spread over [-6, 1], mixes in [0, 1]), so logits span a few units.
    values="bf16": every value rounded to a bf16 (still fp32 tensors), as the released .pth files hold them: the
    loaders then keep what a bf16 checkpoint lets them keep in bf16 (RWKV-6/7's LoRA factors on a GPU)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    c, f, h = n_embd, ffn_dim(version, n_embd), n_embd // HEAD_SIZE

    def normal(*shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=gen, device=device) * std + mean

    def uniform(*shape, low=0.0, high=1.0):
        return torch.rand(shape, generator=gen, device=device) * (high - low) + low

    def linear(out_features, in_features, gain=1.0):
        return normal(out_features, in_features, std=gain / in_features ** 0.5)

    def norm(prefix, size):
        return {f"{prefix}.weight": normal(size, std=0.1, mean=1.0), f"{prefix}.bias": normal(size, std=0.1)}

    sd = {"emb.weight": normal(vocab, c, std=0.5)}
    lora = architecture_for(version).default_lora(c)  # the published widths (RWKV-6/7)
    for i in range(n_layer):
        b = f"blocks.{i}"
        sd.update(norm(f"{b}.ln1", c))
        sd.update(norm(f"{b}.ln2", c))
        if i == 0:
            sd.update(norm(f"{b}.ln0", c))
        a = f"{b}.att"
        if version in ("6", "7"):
            sd.update(_time_mix_v6(a, c, h, lora, normal, uniform, linear) if version == "6"
                      else _time_mix_v7(a, i, c, h, lora, normal, uniform, linear))
            sd.update(norm(f"{a}.ln_x", c))
            m = f"{b}.ffn"
            if version == "6":
                sd[f"{m}.time_maa_k"], sd[f"{m}.time_maa_r"] = uniform(1, 1, c), uniform(1, 1, c)
                sd[f"{m}.receptance.weight"] = linear(c, c)
            else:
                sd[f"{m}.x_k"] = uniform(1, 1, c)
            sd[f"{m}.key.weight"] = linear(f, c)
            sd[f"{m}.value.weight"] = linear(c, f)
            continue
        if version == "4":
            sd[f"{a}.time_decay"] = uniform(c, low=-6.0, high=1.0)
            sd[f"{a}.time_first"] = uniform(c, low=-1.0, high=1.0)
        for name in ("k", "v", "r") + (("g",) if version == "5.2" else ()):
            sd[f"{a}.time_mix_{name}"] = uniform(1, 1, c)
        if version != "4":
            shape = (h, HEAD_SIZE) if version == "5.2" else (h,)
            sd[f"{a}.time_decay"] = uniform(*shape, low=-6.0, high=1.0)
            sd[f"{a}.time_faaaa"] = uniform(*shape)
        for name in ("key", "value", "receptance"):
            sd[f"{a}.{name}.weight"] = linear(c, c)
        sd[f"{a}.output.weight"] = linear(c, c)
        if version == "5.2":
            sd[f"{a}.gate.weight"] = linear(c, c)
        if version != "4":
            sd.update(norm(f"{a}.ln_x", c))
        m = f"{b}.ffn"
        sd[f"{m}.time_mix_k"] = uniform(1, 1, c)
        sd[f"{m}.time_mix_r"] = uniform(1, 1, c)
        sd[f"{m}.key.weight"] = linear(f, c)
        sd[f"{m}.receptance.weight"] = linear(c, c)
        sd[f"{m}.value.weight"] = linear(c, f)
    sd.update(norm("ln_out", c))
    sd["head.weight"] = linear(vocab, c, gain=4.0)
    if values == "bf16":
        sd = {name: tensor.bfloat16().float() for name, tensor in sd.items()}
    elif values != "fp32":
        raise ValueError(f"values must be fp32 or bf16, not {values!r}")
    return sd


def _time_mix_v6(a, c, h, lora, normal, uniform, linear):
    maa, decay = lora
    sd = {f"{a}.time_maa_{n}": uniform(1, 1, c) for n in ("x", "w", "k", "v", "r", "g")}
    sd.update({f"{a}.time_maa_w1": normal(c, 5 * maa, std=0.1), f"{a}.time_maa_w2": normal(5, maa, c, std=0.1),
               f"{a}.time_decay": uniform(1, 1, c, low=-6.0, high=1.0),
               f"{a}.time_decay_w1": normal(c, decay, std=0.1), f"{a}.time_decay_w2": normal(decay, c, std=0.1),
               f"{a}.time_faaaa": uniform(h, HEAD_SIZE)})
    sd.update({f"{a}.{n}.weight": linear(c, c) for n in ("receptance", "key", "value", "gate", "output")})
    return sd


def _time_mix_v7(a, layer, c, h, lora, normal, uniform, linear):
    w, al, v, g = lora
    sd = {f"{a}.x_{n}": uniform(1, 1, c) for n in ("r", "w", "k", "v", "a", "g")}
    sd.update({f"{a}.w1": normal(c, w, std=0.1), f"{a}.w2": normal(w, c, std=0.1),
               f"{a}.w0": uniform(1, 1, c, low=-3.0, high=2.0), f"{a}.a1": normal(c, al, std=0.1),
               f"{a}.a2": normal(al, c, std=0.1), f"{a}.a0": uniform(1, 1, c, low=-1.0, high=1.0)})
    if layer:
        sd.update({f"{a}.v1": normal(c, v, std=0.1), f"{a}.v2": normal(v, c, std=0.1),
                   f"{a}.v0": uniform(1, 1, c, low=-1.0, high=1.0)})
    sd.update({f"{a}.g1": normal(c, g, std=0.1), f"{a}.g2": normal(g, c, std=0.1),
               f"{a}.k_k": uniform(1, 1, c, low=0.5, high=1.5), f"{a}.k_a": uniform(1, 1, c),
               f"{a}.r_k": normal(h, HEAD_SIZE, std=0.5)})
    sd.update({f"{a}.{n}.weight": linear(c, c) for n in ("receptance", "key", "value", "output")})
    return sd


# ------------------------------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryMeter:
    """Peak bytes an implementation adds: CUDA peak allocation, or CPU resident-set growth (sampled)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base = rss_bytes()
            self.peak = self.base
        return self

    def sample(self) -> None:
        if self.device.type != "cuda":
            self.peak = max(self.peak, rss_bytes())

    @property
    def current(self) -> int:
        """Bytes held now (CUDA: allocated; CPU: resident set), over the start."""
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) - self.base
        return rss_bytes() - self.base

    @property
    def used(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        self.sample()
        return self.peak - self.base

    def __exit__(self, *exc):
        return False


@dataclass
class Row:
    name: str
    dtype: str
    prefill_tps: float = float("nan")
    decode_tps: float = float("nan")
    memory_bytes: int = 0  # peak of the whole run (loading, prefill, decode)
    loaded_bytes: int = 0  # held once loaded, before running
    max_dlogit: float = float("nan")
    argmax_agree: float = float("nan")
    ratio_prefill: float = float("nan")
    ratio_decode: float = float("nan")
    note: str = ""
    logits: list = field(default_factory=list, repr=False)  # per position, for cross-row comparisons
    prefill_rounds: list = field(default_factory=list, repr=False)  # tok/s of each interleaved round (--rounds)
    decode_rounds: list = field(default_factory=list, repr=False)
    read_rounds: list = field(default_factory=list, repr=False)  # CPU: bytes/s of the plain read after each decode
    sustained_rounds: list = field(default_factory=list, repr=False)  # CPU: bytes/s of the sustained read after it
    decode_bytes: int = 0  # CPU: what a decode step reads (for the read-ceiling note)
    turn_ms: dict = field(default_factory=dict)  # --turn-tokens: ms of a prefill of that many tokens (median)
    impl: object = field(default=None, repr=False)  # kept loaded between interleaved rounds


class Impl:
    """Uniform adapter: prefill(tokens) -> (logits [V] fp32, state); step(token, state) -> (logits, state)."""

    name = "?"
    dtype = "?"

    def prefill(self, tokens):
        raise NotImplementedError

    def step(self, token, state):
        raise NotImplementedError

    def close(self):
        pass


class OursImpl(Impl):
    def __init__(self, sd, device, dtype, fast=True, name="ours"):
        from rwkv_chat.loading.loader import build_model, config_from_state_dict, resolve_device_dtype
        device, torch_dtype = resolve_device_dtype(device, dtype)
        config = config_from_state_dict(sd)
        self.model = build_model(config, dict(sd), device, torch_dtype, fast=fast)
        self.name, self.dtype = name, dtype

    def prefill(self, tokens):
        return self.model.forward(tokens)

    def step(self, token, state):
        return self.model.forward([token], state)

    def decode_bytes(self) -> int:
        """Bytes a decode step must read: every weight and constant as stored (int8 scales, int4's packed bytes and
        group scales included), but of the embedding only its one row (the packed runners' weights are views of
        these: each counted once), and the recurrent state it starts from (one sequence's: RWKV-5/6/7 keep a
        head-size square of fp32 a head and layer, 2.3 MiB at 0.1B). The new state it writes is not counted."""
        tensors = [t for name, t in self.model.named_parameters() if name != "emb.weight"]
        tensors += [t for _, t in self.model.named_buffers()]
        return (sum(t.numel() * t.element_size() for t in tensors) + self.model.emb.weight[0].nbytes
                + self.model.zero_state(1).nbytes)


def read_bandwidth(nbytes: int, reps: int = 15, buffer: torch.Tensor | None = None) -> float:
    """Bytes a second of a plain read of `nbytes` (fp32 sums over a buffer that size, on torch's threads): the
    memory ceiling a decode step that reads those bytes is held to. Best of `reps` after one warm-up (the first
    sums of a run measured up to a third slower). `buffer`: fp32 memory of at least that size to read the first
    `nbytes` of (allocated and freed here if not given)."""
    buffer = torch.ones(max(1, nbytes // 4), dtype=torch.float32) if buffer is None else buffer[:max(1, nbytes // 4)]
    buffer.sum()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    del buffer
    return nbytes / best


def sustained_read_bandwidth(nbytes: int, passes: int, buffer: torch.Tensor) -> float:
    """Bytes a second of `passes` plain reads of the first `nbytes` of `buffer` timed as one (after one warm-up
    read): the read timed the way a decode of `passes` steps over the same bytes is timed, where read_bandwidth's
    best of many short reads catches a bursty machine's fast moments."""
    data = buffer[:max(1, nbytes // 4)]
    data.sum()
    start = time.perf_counter()
    for _ in range(passes):
        data.sum()
    return nbytes * passes / (time.perf_counter() - start)


def ceiling_note(row: Row) -> str:
    """How close a CPU decode comes to reading its bytes at the plain-read bandwidth. With interleaved rounds, the
    median of each round's share against the plain read timed right after that round's decode (this VM's
    bandwidth drifts by tens of percent over minutes); else against a read measured now."""
    nbytes = row.decode_bytes
    if row.read_rounds:
        shares = ceiling_shares(row)
        bandwidth = statistics.median(row.read_rounds)
        note = (f"decode {statistics.median(shares) * 100:.0f}% of the read ceiling (median of {len(shares)} "
                f"rounds, each against a plain read after its decode: {min(shares) * 100:.0f}-"
                f"{max(shares) * 100:.0f}%; {nbytes / 2**20:,.0f} MiB a token at a median "
                f"{bandwidth / 1e9:.1f} GB/s)")
        if row.sustained_rounds:
            sustained = [tps / (rate / nbytes) for tps, rate in zip(row.decode_rounds, row.sustained_rounds)]
            note += (f", {statistics.median(sustained) * 100:.0f}% of a sustained read ({min(sustained) * 100:.0f}-"
                     f"{max(sustained) * 100:.0f}%: those bytes read once a decode step, timed as the decode is; a "
                     f"median {statistics.median(row.sustained_rounds) / 1e9:.1f} GB/s)")
        return note
    bandwidth = read_bandwidth(nbytes)
    ceiling = bandwidth / nbytes
    return (f"decode {row.decode_tps / ceiling * 100:.0f}% of the read ceiling ({ceiling:,.1f} tok/s: "
            f"{nbytes / 2**20:,.0f} MiB a token at {bandwidth / 1e9:.1f} GB/s)")


def ceiling_shares(row: Row) -> list[float]:
    """Per interleaved round: the decode's tok/s over the tok/s a plain read of its bytes allowed in that round."""
    return [tps / (bandwidth / row.decode_bytes) for tps, bandwidth in zip(row.decode_rounds, row.read_rounds)]


class RwkvPipImpl(Impl):
    """The rwkv package, fed the in-memory checkpoint (its loader only reads the dict)."""

    def __init__(self, sd, device, strategy):
        import rwkv.model as rwkv_model
        original = torch.load
        torch.load = lambda *a, **k: dict(sd)  # its loader calls torch.load(path); hand it our dict
        try:
            quiet = {} if os.environ.get("RWKV_V7_ON") == "1" else {"verbose": False}  # RWKV_x070 has no verbose
            self.model = rwkv_model.RWKV(model="in-memory-checkpoint", strategy=strategy, **quiet)
        finally:
            torch.load = original
        self.name, self.dtype = "rwkv pip", strategy.split()[1]

    def prefill(self, tokens):
        out, state = self.model.forward(list(tokens), None)
        return out.float(), state

    def step(self, token, state):
        out, state = self.model.forward([token], state)
        return out.float(), state


class TransformersImpl(Impl):
    """transformers' RwkvForCausalLM (RWKV-4), built from the same weights."""

    def __init__(self, sd, device, dtype: torch.dtype):
        from transformers import RwkvConfig, RwkvForCausalLM
        n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        vocab, c = sd["emb.weight"].shape
        f = sd["blocks.0.ffn.key.weight"].shape[0]
        config = RwkvConfig(vocab_size=vocab, context_length=4096, hidden_size=c, num_hidden_layers=n_layer,
                            attention_hidden_size=c, intermediate_size=f,
                            rescale_every=6 if dtype == torch.float16 else 0)
        parts = {"emb": "embeddings", "ln0": "pre_ln", "att": "attention", "ffn": "feed_forward",
                 "time_mix_k": "time_mix_key", "time_mix_v": "time_mix_value", "time_mix_r": "time_mix_receptance"}
        weights = {}
        for key, tensor in sd.items():
            name = ".".join(parts.get(p, p) for p in key.split("."))
            weights[name if key == "head.weight" else f"rwkv.{name}"] = tensor.to(device, dtype).clone()
        with torch.device("meta"):
            model = RwkvForCausalLM(config)
        model.load_state_dict(weights, assign=True)
        self.model = model.eval()
        self.device = torch.device(device)
        self.name, self.dtype = "transformers", {torch.float16: "fp16", torch.float32: "fp32"}[dtype]

    @torch.no_grad()
    def prefill(self, tokens):
        ids = torch.tensor([list(tokens)], device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float(), out.state

    @torch.no_grad()
    def step(self, token, state):
        ids = torch.tensor([[token]], device=self.device)
        out = self.model(input_ids=ids, state=state, use_cache=True)
        return out.logits[0, -1].float(), out.state


def compare(logits: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    """(max |Δlogit|, argmax agreement) over the positions both have."""
    n = min(len(logits), len(reference))
    if n == 0:
        return float("nan"), float("nan")
    a = torch.stack([t.float().cpu() for t in logits[:n]])
    b = torch.stack([t.float().cpu() for t in reference[:n]])
    return (a - b).abs().max().item(), (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def timed_prefill(impl, prompt, device) -> tuple[float, torch.Tensor, object]:
    """(seconds, logits, state) of one prefill of the prompt, device work included."""
    sync(device)
    start = time.perf_counter()
    logits, state = impl.prefill(prompt)
    sync(device)
    return time.perf_counter() - start, logits, state


def decode_rate(impl, state, timing_tokens, device) -> tuple[float, float]:
    """(tok/s, seconds) of one batch-1 decode pass over timing_tokens from state, cut short past TIME_BUDGET_S."""
    s, done = state, 0
    sync(device)
    start = time.perf_counter()
    for token in timing_tokens:
        out, s = impl.step(token, s)
        done += 1
        if done % 16 == 0 and time.perf_counter() - start > TIME_BUDGET_S:
            break
    sync(device)
    elapsed = time.perf_counter() - start
    return done / elapsed, elapsed


def run_impl(impl_factory, device, prompt, steps, timing_tokens, reps, meter_note="", keep=False,
             turns=()) -> Row:
    """Build, time prefill and decode, and collect logits for parity; then, for each length in `turns`, a prompt of
    that many tokens (a chat's turn: `turn_times`). Returns the row; the impl is freed, or with keep=True left
    loaded on the row (row.impl) for interleaved rounds."""
    device = torch.device(device)
    meter = MemoryMeter(device)
    with meter:
        try:
            impl = impl_factory()
        except Exception as error:  # a reference that cannot run here gets a note, not a crash
            return Row("?", "?", note=f"unavailable: {type(error).__name__}: {str(error)[:120]}")
        row = Row(impl.name, impl.dtype, note=meter_note)
        gc.collect()
        row.loaded_bytes = meter.current
        try:
            with torch.inference_mode():
                logits, state = impl.prefill(prompt[:16])  # warm-up (kernels, graphs, allocator)
                logits, state = impl.prefill(prompt)
                for token in steps[:3]:
                    impl.step(token, state)
                sync(device)
                times = []
                for _ in range(reps):  # slow implementations get fewer repetitions (>= 1)
                    meter.sample()
                    elapsed, logits, state = timed_prefill(impl, prompt, device)
                    times.append(elapsed)
                    if sum(times) > TIME_BUDGET_S:
                        break
                row.prefill_tps = len(prompt) / statistics.median(times)
                collected = [logits.float().clone()]
                # parity: teacher-forced on the reference's greedy tokens
                s = state
                for token in steps:
                    out, s = impl.step(token, s)
                    collected.append(out.float().clone())
                sync(device)
                row.logits = [t.cpu() for t in collected]
                # speed: batch-1 decode over timing_tokens steps, best of two passes (one when slow)
                rates, spent = [], 0.0
                for _ in range(2):
                    rate, elapsed = decode_rate(impl, state, timing_tokens, device)
                    rates.append(rate)
                    spent += elapsed
                    meter.sample()
                    if spent > TIME_BUDGET_S:
                        break
                row.decode_tps = max(rates)
                row.turn_ms = turn_times(impl, prompt, turns, reps, device)
            if device.type == "cpu" and hasattr(impl, "decode_bytes"):
                row.decode_bytes = impl.decode_bytes()
        except Exception as error:
            row.note = (row.note + " " if row.note else "") + f"failed: {type(error).__name__}: {str(error)[:160]}"
            keep = False
        row.memory_bytes = meter.used
    if keep:
        row.impl = impl
        return row
    impl.close()
    del impl
    cleanup()
    return row


def turn_times(impl, prompt, lengths, reps, device) -> dict:
    """{n: ms of a prefill of n tokens (the prompt's first n, repeated where it is shorter), median of `reps`
    after two untimed ones (their graphs captured, their kernels built)}: what a chat's turn of n new tokens
    waits before its first token is sampled (a turn reads after a state; the cost does not depend on it)."""
    out = {}
    for n in lengths:
        ids = (prompt * (n // len(prompt) + 1))[:n]
        for _ in range(2):
            impl.prefill(ids)
        out[n] = statistics.median(timed_prefill(impl, ids, device)[0] for _ in range(max(reps, 3))) * 1e3
    return out


def print_turns(title: str, rows: list[Row]) -> str:
    """The --turn-tokens table: ms a prefill of each length, every row that measured them."""
    lengths = sorted({n for r in rows for n in r.turn_ms})
    if not lengths:
        return ""
    lines = [f"\n### {title}: a prompt of N tokens, ms (median)", "",
             "| impl | dtype | " + " | ".join(f"N={n}" for n in lengths) + " |",
             "|---|---|" + "---:|" * len(lengths)]
    for r in rows:
        if r.turn_ms:
            lines.append(f"| {r.name} | {r.dtype} | "
                         + " | ".join(f"{r.turn_ms[n]:,.2f}" if n in r.turn_ms else "" for n in lengths) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def interleaved_rounds(rows: list[Row], prompt, timing_tokens, device, rounds: int) -> None:
    """Timing rounds with every implementation loaded, each round timing each one in turn (one prefill, one
    decode pass): a machine whose speed drifts over minutes moves all rows of a round alike. Each row's figures
    become the medians over these rounds (the first pass, one implementation after another, only warms up and
    collects parity), then the impls are freed. Rows with decode_bytes (CPU) also time a plain read of those bytes
    right after each decode (`read_rounds`: the round's own ceiling) and the same read repeated as many times as
    the decode's steps, timed as one (`sustained_rounds`), from one buffer kept for the run."""
    live = [r for r in rows if r.impl is not None]
    largest = max((r.decode_bytes for r in live), default=0)
    buffer = torch.ones(largest // 4, dtype=torch.float32) if largest else None
    with torch.inference_mode():
        for _ in range(rounds):
            for r in live:
                elapsed, _, state = timed_prefill(r.impl, prompt, device)
                r.prefill_rounds.append(len(prompt) / elapsed)
                r.decode_rounds.append(decode_rate(r.impl, state, timing_tokens, device)[0])
                if r.decode_bytes:
                    r.read_rounds.append(read_bandwidth(r.decode_bytes, buffer=buffer))
                    r.sustained_rounds.append(sustained_read_bandwidth(r.decode_bytes, len(timing_tokens), buffer))
    del buffer
    for r in live:
        r.prefill_tps, r.decode_tps = statistics.median(r.prefill_rounds), statistics.median(r.decode_rounds)
        r.impl.close()
        r.impl = None
    cleanup()


def round_ratios(row: Row, refs: list[Row]) -> tuple[list[float], list[float]]:
    """Per round: row's prefill and decode tok/s over the best reference's in the same round."""
    count = min(len(r.prefill_rounds) for r in [row] + refs)
    prefill = [row.prefill_rounds[i] / max(r.prefill_rounds[i] for r in refs) for i in range(count)]
    decode = [row.decode_rounds[i] / max(r.decode_rounds[i] for r in refs) for i in range(count)]
    return prefill, decode


def cleanup() -> None:
    """Return freed memory (callers `del` their references first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------- batching

def bench_batching(model, n_chats: int, steps: int, seed: int = 0, check_chats: int = 3) -> dict:
    """N chats generating at once through a DecodeBatcher (a reading thread each) vs one chat alone, all
    running the engine's own judge (`engine.AnswerJudge`: stop rules, streamed detokenising with the World
    tokenizer, penalties) with the default chat SamplingParams and the ids the tokenizer cannot decode
    banned, from the states after short prompts, for up to `steps` tokens each. One chat alone runs through
    `generation.DirectDecoder` (the loop in its own thread) and through the batcher; the speed-up is taken
    against the faster of the two. Parity comes from a separate untimed batched run that also keeps every
    logits row a token was drawn from: those rows against the same tokens fed alone (teacher-forced), and
    each free-running chat's tokens against its run alone up to the first difference (they drift apart at
    the first draw a logit difference moves)."""
    from rwkv_chat.serving.batching import DecodeBatcher, decode_into
    from rwkv_chat.serving.engine import AnswerJudge
    from rwkv_chat.serving.generation import DirectDecoder, Verdict
    from rwkv_chat.serving.sampling import PenaltyState, Sampler, SamplingParams, SamplingRows
    from rwkv_chat.state import RwkvState
    from rwkv_chat.tokenizer import WorldTokenizer
    device = model.device
    vocab = model.config.vocab_size
    tokenizer = WorldTokenizer()
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 65530, (8 + i % 5,), generator=gen).tolist() for i in range(n_chats)]
    starts = [model.forward(p) for p in prompts]
    params = SamplingParams()
    bans = tuple(range(tokenizer.max_token_id + 1, vocab))

    class Recording(AnswerJudge):
        """The engine's judge, also keeping the logits row of every token it keeps."""

        def __init__(self, *args):
            super().__init__(*args)
            self.rows = []

        def accept(self, token, logits):
            verdict = super().accept(token, logits)
            if verdict is not Verdict.STOP:
                self.rows.append(logits.clone())
            return verdict

    def chat(decoder, i, judge_type=AnswerJudge, max_new=steps):
        """Chat i's reply from its prompt state; returns its judge."""
        penalties = PenaltyState.from_params(params, vocab)
        sampler = Sampler(params, torch.Generator().manual_seed(seed + i), penalties, bans)
        judge = judge_type(tokenizer, penalties, max_new, threading.Event())
        for _ in decoder.generate(*starts[i], sampler, judge):
            pass
        return judge

    def in_threads(target, count):
        results, errors = [None] * count, []
        barrier = threading.Barrier(count + 1)

        def run(i):
            try:
                barrier.wait()
                results[i] = target(i)
            except Exception as error:  # pragma: no cover - reported below
                errors.append(error)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        sync(device)
        if errors:
            raise errors[0]
        return results, time.perf_counter() - start

    def alone_tps(decoder):
        chat(decoder, 0, max_new=8)  # warm-up
        sync(device)
        start = time.perf_counter()
        judges = [chat(decoder, i) for i in range(check_chats)]
        sync(device)
        return sum(len(j.ids) for j in judges) / (time.perf_counter() - start), judges

    direct_tps, alone = alone_tps(DirectDecoder(model))
    # the batched step without threads or judges (the ceiling): the model alone, then with sampling
    batch_state = RwkvState.stack([state for _, state in starts])
    ids = torch.tensor([int(logits.argmax()) for logits, _ in starts])
    rows = [Sampler(params, torch.Generator().manual_seed(i), PenaltyState.from_params(params, vocab), bans)
            for i in range(n_chats)]
    for row in rows:
        for t in prompts[0]:
            row.penalties.update(t)
    raw = {}
    table = SamplingRows(vocab, device)
    table.add(rows)
    first_logits = torch.stack([logits for logits, _ in starts])
    # the step's states in two buffers of a power of two of rows, stepped from one into the other, as the batcher's
    # ring does (graphs captured on them: no state copied per step)
    capacity = 1 << (n_chats - 1).bit_length()
    ring = [model.zero_state(capacity) for _ in range(2)]
    for buffer in ring:
        buffer.shift[:n_chats].copy_(batch_state.shift)
        buffer.wkv[:n_chats].copy_(batch_state.wkv)
    on_device = ids.to(device)
    for with_sampling in (False, True):
        # the model alone (the same tokens every step), then the batcher's pipelined step without threads or
        # judges: the device draws and counts each step's tokens (SamplingRows.step) and feeds them to the next
        for k in range(2):
            fed = table.step(first_logits).clamp(min=0) if with_sampling else on_device
            decode_into(model, fed, ring[k % 2], ring[1 - k % 2])
        sync(device)
        start = time.perf_counter()
        logits = first_logits
        for k in range(steps):
            fed = table.step(logits).clamp(min=0) if with_sampling else on_device
            logits = decode_into(model, fed, ring[k % 2], ring[1 - k % 2])
        sync(device)
        raw[with_sampling] = n_chats * steps / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(steps):  # the device sampling alone
        table.step(first_logits)
    sync(device)
    sampling_ms = (time.perf_counter() - start) / steps * 1e3
    del ring, batch_state, table, logits, fed  # the batcher's own ring holds three such buffers
    cleanup()
    with DecodeBatcher(model, max_batch=n_chats) as batcher:
        lone_tps, _ = alone_tps(batcher)
        # warm-up: the timed chats once untimed. Chats of a few tokens never filled the batch (the first ended
        # before the last joined), so the timed run captured the full batch's graphs (7B x 256: ~250 ms of a ~1 s run)
        in_threads(lambda i: chat(batcher, i), n_chats)
        before = batcher.times()
        judges, elapsed = in_threads(lambda i: chat(batcher, i), n_chats)
        worker = batcher.times() - before  # where the worker's time went (batching.WorkerTimes)
        steps = max(1, worker.steps)
        worker_ms = {"launch": worker.launch / steps * 1e3, "wait": worker.wait / steps * 1e3,
                     "judge": worker.judge / steps * 1e3, "join+retire": worker.join / steps * 1e3,
                     "step": elapsed / steps * 1e3}
        mean_batch = worker.rows / steps
        recorded = in_threads(lambda i: chat(batcher, i, Recording), n_chats)[0][:check_chats]
    generated = sum(len(j.ids) for j in judges)
    batched_tps = generated / elapsed
    single_tps = max(direct_tps, lone_tps)
    pairs = []
    for i, judge in enumerate(recorded):  # the rows each token was drawn from, against the same tokens fed alone
        logits, state = starts[i]
        for token, row in zip(judge.ids, judge.rows):
            pairs.append((row, logits))
            logits, state = model.forward([token], state)
    dmax = max((a - b).abs().max().item() for a, b in pairs)
    agree = statistics.mean(float(int(a.argmax()) == int(b.argmax())) for a, b in pairs)

    def common_prefix(a, b):
        return next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    same_tokens = statistics.mean(common_prefix(recorded[i].ids, alone[i].ids) / max(1, len(alone[i].ids))
                                  for i in range(check_chats))
    reasons = sorted({j.reason for j in judges})
    return {"chats": n_chats, "steps": steps, "direct_tps": direct_tps, "lone_batcher_tps": lone_tps,
            "single_tps": single_tps, "raw_batch_tps": raw[False], "raw_batch_sampled_tps": raw[True],
            "sampling_ms": sampling_ms,
            "batcher_tps": batched_tps, "speedup": batched_tps / single_tps, "mean_batch": mean_batch,
            "tokens_per_chat": generated / n_chats, "stop_reasons": reasons, "max_dlogit_vs_alone": dmax,
            "argmax_agree_vs_alone": agree, "sampled_agree_vs_alone": same_tokens, "worker_ms": worker_ms}


def report_batching(info: dict, texts: list) -> None:
    """One row of the batching table (into `texts`, and printed at once)."""
    line = (f"| RWKV-{info['version']} {info['size']} | {info['dtype']} | {info['chats']} "
            f"(wakes ≤ {info['max_wakes_per_s']:,}/s) | {info['direct_tps']:,.1f} | "
            f"{info['lone_batcher_tps']:,.1f} | {info['raw_batch_tps']:,.0f} | "
            f"{info['raw_batch_sampled_tps']:,.0f} | {info['sampling_ms']:.2f} | "
            f"{info['batcher_tps']:,.0f} | "
            f"{info['speedup']:.1f}× | {info['mean_batch']:.1f} | {info['tokens_per_chat']:.0f} "
            f"({', '.join(info['stop_reasons'])}) | {info['max_dlogit_vs_alone']:.2e} | "
            f"{info['argmax_agree_vs_alone'] * 100:.0f}% | {info['sampled_agree_vs_alone'] * 100:.0f}% |")
    texts.append(line)
    print(f"[bench] batching {line}", file=sys.stderr, flush=True)
    print("[bench] batcher worker, ms a step: " + ", ".join(
        f"{part} {ms:.2f}" for part, ms in info["worker_ms"].items()), file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- kernels

def graph_time(fn, calls: int = 24) -> float:
    """Seconds per call of `fn` (CUDA), replayed from a graph of `calls` calls (no launch gaps)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def bench_kernels(sizes: list[str], device: torch.device) -> list[dict]:
    """Batch-1 weight-streaming products of each size's matrices: cuBLAS against our Triton kernel, bf16 and int8,
    at the launch settings in use (triton_kernels.GEMV_CONFIGS) and at the best of a few alternatives.

    Weights are rotated over copies totalling >= 512 MB so every call reads HBM, not L2."""
    from rwkv_chat.kernels import quant, triton_kernels as tk
    configs = [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, target_programs=tp)
               for bn, bk, nw, ns, tp in [(8, 1024, 4, 3, 8), (8, 512, 4, 3, 8), (8, 256, 4, 3, 8),
                                          (16, 512, 4, 3, 8), (16, 256, 4, 3, 8), (16, 1024, 4, 3, 8),
                                          (32, 256, 4, 3, 8), (16, 512, 8, 3, 8), (16, 512, 4, 2, 4)]]
    in_use = {fmt: dict(cfg) for fmt, cfg in tk.GEMV_CONFIGS.items()}
    out = []
    for size in sizes:
        n_layer, c = SIZES[size]
        f = ffn_dim("5.2", c)
        shapes = {"att r|k|v|g": (4, c, 4 * c), "att out": (1, c, c), "ffn k|r": (2, c, f + c),
                  "ffn value": (1, f, c), "head": (1, c, VOCAB)}
        for label, (p, k, n) in shapes.items():
            nbytes = n * k * 2
            copies = max(2, -(-512 * 2**20 // nbytes))
            calls = max(24, min(400, -(-256 * 2**20 // nbytes)))  # one replay reads > 4x the L2
            seg = n // p if label != "ffn k|r" else f
            ws = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            qs = [quant.quantize_rows(w)[0] for w in ws[:max(2, copies // 2 + 1)]]
            scale = torch.rand(n, device=device) * 0.01
            x = torch.randn(p, 1, k, device=device, dtype=torch.bfloat16)
            state = {"i": 0}

            def rotate(items):
                state["i"] = (state["i"] + 1) % len(items)
                return items[state["i"]]

            rec = {"size": size, "matrix": label, "shape": f"{p}x[{k}->{n // p if p > 1 else n}]", "MB": nbytes / 1e6}
            if p > 1 and label != "ffn k|r":
                t = graph_time(calls=calls, fn=lambda: torch.bmm(x, rotate(ws).view(p, n // p, k).transpose(1, 2)))
            else:
                t = graph_time(calls=calls, fn=lambda: [torch.nn.functional.linear(x[i], rotate(ws)[:n // p])
                                                        for i in range(p)]
                               if label != "ffn k|r" else
                               (torch.nn.functional.linear(x[0], rotate(ws)[:f]),
                                torch.nn.functional.linear(x[1], ws[state["i"]][f:])))
            rec["cublas_us"], rec["cublas_TBps"] = t * 1e6, nbytes / t / 1e12
            for fmt, weights, scales, fmt_bytes in (("float", ws, None, nbytes), ("int8", qs, scale, nbytes // 2)):
                timings = []
                for cfg in [in_use[fmt]] + configs:
                    tk.GEMV_CONFIGS[fmt].update(cfg)
                    try:
                        timings.append((graph_time(lambda: tk.project(x, rotate(weights), scales, seg), calls), cfg))
                    except Exception as error:  # a config the compiler rejects
                        print(f"[kernels] {label} {fmt} {cfg}: {type(error).__name__}", file=sys.stderr)
                tk.GEMV_CONFIGS[fmt].update(in_use[fmt])
                best = min(timings, key=lambda item: item[0])
                rec[f"{fmt}_us"], rec[f"{fmt}_TBps"] = timings[0][0] * 1e6, fmt_bytes / timings[0][0] / 1e12
                rec[f"{fmt}_best_us"], rec[f"{fmt}_best"] = best[0] * 1e6, best[1]
            out.append(rec)
            print(f"| {size} | {label} | {rec['shape']} | {rec['MB']:.1f} | {rec['cublas_us']:.1f} "
                  f"({rec['cublas_TBps']:.2f}) | {rec['float_us']:.1f} ({rec['float_TBps']:.2f}) | "
                  f"{rec['float_best_us']:.1f} {tuple(rec['float_best'].values())} | "
                  f"{rec['int8_us']:.1f} ({rec['int8_TBps']:.2f}) | "
                  f"{rec['int8_best_us']:.1f} {tuple(rec['int8_best'].values())} |", flush=True)
            ws = qs = None  # freed before the next shape (the timed lambdas above read them)
            cleanup()
    return out


# ------------------------------------------------------------------------------------- profile

def profile_decode(args, version: str, size: str, dtype: str, device: torch.device) -> dict:
    """Where a decode step's time goes: graph replay on the GPU alone vs model.forward wall time, and the
    kernels of one eager step and of one prefill (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile
    sd = random_state_dict(version, *SIZES[size], seed=args.seed, device=device, values=args.checkpoint_values)
    model = OursImpl(sd, device, dtype).model
    del sd
    cleanup()
    prompt = torch.randint(1, 65530, (args.prefill_tokens,)).tolist()
    steps = 50
    info = {"version": version, "size": size, "dtype": dtype}
    with torch.inference_mode():
        logits, state = model.forward(prompt)
        for _ in range(3):
            logits, new = model.forward([1], state)
        runner = model.runner
        graph = runner._graphs.graphs[1].graph
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        info["graph_replay_us"] = start.elapsed_time(end) * 1e3 / steps
        s = state
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, s = model.forward([1], s)
            int(logits.argmax())
        info["forward_wall_us"] = (time.perf_counter() - t0) * 1e6 / steps
        step = runner._graphs.step  # the step the graphs replay, run eagerly (either runner)
        ids = torch.ones(1, dtype=torch.long, device=device)
        step(ids, state.shift, state.wkv)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step(ids, state.shift, state.wkv)
            torch.cuda.synchronize()
        decode_table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.forward(prompt)
            torch.cuda.synchronize()
        prefill_table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
    print(f"\n### Profile RWKV-{version} {size} {dtype}: graph replay {info['graph_replay_us']:.0f} µs/step (GPU), "
          f"model.forward {info['forward_wall_us']:.0f} µs/step (wall)\n3 eager decode steps:\n{decode_table}\n"
          f"one prefill of {len(prompt)} tokens:\n{prefill_table}", flush=True)
    del model
    cleanup()
    return info


# ------------------------------------------------------------------------------------- driver

def cpu_model() -> str:
    """The CPU's model name as Linux lists it (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def print_table(title: str, rows: list[Row]) -> str:
    lines = [f"\n### {title}", "",
             "| impl | dtype | prefill tok/s | decode tok/s | memory loaded / peak | × best ref (prefill / decode) | "
             "max abs Δlogit vs fp32 | argmax agree | note |",
             "|---|---|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        ratio = "" if r.ratio_prefill != r.ratio_prefill else f"{r.ratio_prefill:.2f} / {r.ratio_decode:.2f}"
        lines.append(f"| {r.name} | {r.dtype} | {r.prefill_tps:,.0f} | {r.decode_tps:,.1f} | "
                     f"{fmt_bytes(r.loaded_bytes)} / {fmt_bytes(r.memory_bytes)} | {ratio} | {r.max_dlogit:.4f} | "
                     f"{r.argmax_agree * 100:.1f}% | {r.note} |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default="0.1B", help="comma list of " + ",".join(SIZES))
    p.add_argument("--versions", default="4,5.2")
    p.add_argument("--dtypes", default=None, help="ours: comma list of fp32,bf16,fp16,int8,int4 (default bf16,int8)")
    p.add_argument("--prefill-tokens", type=int, default=1024)
    p.add_argument("--decode-tokens", type=int, default=None, help="timed decode steps (default 64 CPU, 256 GPU)")
    p.add_argument("--parity-steps", type=int, default=16)
    p.add_argument("--reps", type=int, default=None, help="prefill repetitions (default 2 CPU, 5 GPU)")
    p.add_argument("--rounds", type=int, default=1,
                   help="N > 1: after the first pass, N timing rounds with every implementation loaded at once, "
                        "each timed in turn per round: figures and ratios are medians over the rounds (for "
                        "machines whose speed drifts)")
    p.add_argument("--refs", default="rwkv,transformers",
                   help="reference implementations to run ('' for none; rwkv.cpp: see benchmarks/rwkv_cpp.py)")
    p.add_argument("--plain", action="store_true", help="also time our plain (reference) path")
    p.add_argument("--turn-tokens", default="",
                   help="comma list of prompt lengths to time as chat turns (ms a prefill; e.g. 2,16,60,128,1023)")
    p.add_argument("--batch", type=int, default=0, help="concurrent chats for the batching section (0 = skip)")
    p.add_argument("--batch-sizes", default=None, help="sizes for the batching section (default: --sizes)")
    p.add_argument("--batch-steps", type=int, default=64)
    p.add_argument("--max-wakes", type=str, default="",
                   help="batching: the batcher's MAX_WAKES_PER_S values to run, comma-separated (default: its own)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--kernels", action="store_true", help="GPU: time the batch-1 matrix products first")
    p.add_argument("--profile", action="store_true", help="GPU: profile one decode step and one prefill per shape")
    p.add_argument("--skip-shapes", action="store_true", help="skip the per-model tables")
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-values", choices=["fp32", "bf16"], default="fp32",
                   help="the random checkpoint's values: fp32, or every value a bf16 as in the released .pth files "
                        "(on a GPU RWKV-6/7's LoRA factors are then held in bf16)")
    return p.parse_args(argv)


def bench_shape(args, version: str, size: str, device: torch.device) -> tuple[list[Row], str]:
    n_layer, n_embd = SIZES[size]
    on_cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(1, 65530, (args.prefill_tokens,), generator=gen).tolist()
    decode_n = args.decode_tokens or (256 if on_cuda else 64)
    timing_tokens = torch.randint(1, 65530, (decode_n,), generator=gen).tolist()
    reps = args.reps or (5 if on_cuda else 2)
    sd = random_state_dict(version, n_layer, n_embd, seed=args.seed, device=device, values=args.checkpoint_values)
    print(f"[bench] RWKV-{version} {size} (L{n_layer} D{n_embd}) on {device}", file=sys.stderr, flush=True)
    # fp32 reference logits: our plain path (held to the rwkv package by the tests)
    with torch.inference_mode():
        ref_model = OursImpl(sd, device, "fp32", fast=False, name="ours plain")
        logits, state = ref_model.prefill(prompt)
        ref_logits, steps = [logits.float().cpu()], []
        for _ in range(args.parity_steps):
            token = int(logits.argmax())
            steps.append(token)
            logits, state = ref_model.step(token, state)
            ref_logits.append(logits.float().cpu())
        ref_logits = ref_logits[:-1]  # positions: after prompt, after each of steps[:-1]... aligned below
    del ref_model
    cleanup()
    # position i of every row: logits after prompt + steps[:i]; the reference has the same positions
    rows: list[Row] = []
    dtypes = (args.dtypes or "bf16,int8").split(",")
    factories = []
    if args.plain:
        factories.append(lambda: OursImpl(sd, device, "fp32", fast=False, name="ours plain"))
    for dt in dtypes:
        factories.append(lambda dt=dt: OursImpl(sd, device, dt))
    refs = [r for r in args.refs.split(",") if r]
    turns = [int(n) for n in args.turn_tokens.split(",") if n]
    if "rwkv" in refs and (version == "7") == (os.environ.get("RWKV_V7_ON") == "1"):
        strategy = "cuda fp16" if on_cuda else "cpu fp32"
        factories.append(lambda: RwkvPipImpl(sd, device, strategy))
    if "transformers" in refs and version == "4":
        factories.append(lambda: TransformersImpl(sd, device, torch.float16 if on_cuda else torch.float32))
    if "rwkv.cpp" in refs:  # opt-in: a built rwkv.cpp checkout (benchmarks/rwkv_cpp.py), else a line saying how
        from benchmarks import rwkv_cpp
        factories += rwkv_cpp.factories(sd, torch.get_num_threads())
    for factory in factories:
        row = run_impl(factory, device, prompt, steps, timing_tokens, reps, keep=args.rounds > 1, turns=turns)
        row.max_dlogit, row.argmax_agree = compare(row.logits, ref_logits + [None] * 0)
        rows.append(row)
        print(f"[bench]   {row.name} {row.dtype}: prefill {row.prefill_tps:,.0f} tok/s, decode "
              f"{row.decode_tps:,.1f} tok/s {row.note}", file=sys.stderr, flush=True)
    if args.rounds > 1:
        interleaved_rounds(rows, prompt, timing_tokens, device, args.rounds)
    for row in rows:
        if row.decode_bytes:
            row.note = (row.note + "; " if row.note else "") + ceiling_note(row)
    refs_rows = [r for r in rows if r.name in ("rwkv pip", "transformers") and r.prefill_tps == r.prefill_tps]
    best_p = max((r.prefill_tps for r in refs_rows), default=float("nan"))
    best_d = max((r.decode_tps for r in refs_rows), default=float("nan"))
    by_dtype = {r.dtype: r for r in rows if r.name == "ours"}
    for r in rows:
        r.ratio_prefill, r.ratio_decode = r.prefill_tps / best_p, r.decode_tps / best_d
        is_ref = any(r is ref for ref in refs_rows)
        if args.rounds > 1 and refs_rows and not is_ref and r.prefill_tps == r.prefill_tps:
            prefill, decode = round_ratios(r, refs_rows)
            r.ratio_prefill, r.ratio_decode = statistics.median(prefill), statistics.median(decode)
            r.note += (("; " if r.note else "") + f"{len(prefill)} interleaved rounds, × ref per round: prefill "
                       f"{min(prefill):.2f}-{max(prefill):.2f}, decode {min(decode):.2f}-{max(decode):.2f}")
        if r.name == "ours" and r.dtype in ("int8", "int4") and "bf16" in by_dtype:
            a = torch.stack(r.logits[:len(by_dtype["bf16"].logits)])
            b = torch.stack(by_dtype["bf16"].logits[:len(a)])
            agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item() * 100
            mean = (a - b).abs().mean().item()
            r.note += ("; " if r.note else "") + f"vs bf16: argmax {agree:.1f}%, mean |Δ| {mean:.4f}"
    if "rwkv.cpp" in refs:  # ours against the fastest rwkv.cpp format, per phase, in the ours rows' notes
        rwkv_cpp.annotate(rows)
    sd = factories = None  # freed (the factories above read sd)
    cleanup()
    if on_cuda:
        name = torch.cuda.get_device_name(device)
    else:
        from rwkv_chat.kernels import cpu_kernels
        steps = "C++ decode kernels" if cpu_kernels.kernels() is not None else "PyTorch decode step (no C++ kernels)"
        name = f"CPU ({torch.get_num_threads()} threads, {steps})"
    title = (f"RWKV-{version} {size} (L{n_layer} D{n_embd}) · {name} · prefill {args.prefill_tokens} tok · "
             f"decode {decode_n} tok · batch 1" + (" · bf16 checkpoint values" if args.checkpoint_values == "bf16"
                                                   else ""))
    return rows, print_table(title, rows) + print_turns(title, rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RWKV_JIT_ON", "1")
    if set(args.versions.split(",")) == {"7"}:
        os.environ["RWKV_V7_ON"] = "1"  # the reference's RWKV-7 class replaces its RWKV class, process-wide
    device = torch.device(args.device)
    if device.type == "cuda":
        os.environ.setdefault("RWKV_CUDA_ON", "1")
    else:
        os.environ.setdefault("RWKV_CUDA_ON", "0")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"device": str(device), "args": vars(args), "shapes": [], "batching": [], "kernels": []}
    if device.type == "cpu":  # which machine and which CPU path every row below came from
        from rwkv_chat.kernels import cpu_features
        results["cpu"] = f"{cpu_model()}; {cpu_features.describe()}"
        print(f"[bench] {results['cpu']}", flush=True)
    texts = []
    if args.kernels and device.type == "cuda":
        print("\n### Batch-1 products: µs (TB/s of weight read); settings (block_n, block_k, warps, stages, "
              "programs)\n\n"
              "| size | matrix | shape | MB bf16 | cuBLAS bf16 | Triton bf16 | best setting bf16 | Triton int8 | "
              "best setting int8 |\n|---|---|---|---:|---:|---:|---|---:|---|", flush=True)
        results["kernels"] = bench_kernels(args.sizes.split(","), device)
    if args.profile and device.type == "cuda":
        results["profile"] = [profile_decode(args, v, size, dt, device) for size in args.sizes.split(",")
                              for v in args.versions.split(",") for dt in (args.dtypes or "bf16").split(",")]
    for size in ([] if args.skip_shapes else args.sizes.split(",")):
        for version in args.versions.split(","):
            rows, text = bench_shape(args, version, size, device)
            texts.append(text)
            results["shapes"].append({"version": version, "size": size,
                                      "rows": [{k: v for k, v in asdict(r).items() if k != "logits"} for r in rows]})
    if args.batch:
        from rwkv_chat.loading.loader import build_model, config_from_state_dict, resolve_device_dtype
        from rwkv_chat.serving import batching
        wake_rates = [int(rate) for rate in args.max_wakes.split(",") if rate] or [batching.MAX_WAKES_PER_S]
        for size in (args.batch_sizes or args.sizes).split(","):
            for version in args.versions.split(","):
                for dt in (args.dtypes or "bf16").split(","):
                    sd = random_state_dict(version, *SIZES[size], seed=args.seed, device=device,
                                           values=args.checkpoint_values)
                    dev, torch_dtype = resolve_device_dtype(device, dt)
                    model = build_model(config_from_state_dict(sd), dict(sd), dev, torch_dtype, fast=True)
                    del sd
                    cleanup()
                    for rate in wake_rates:
                        batching.MAX_WAKES_PER_S = rate
                        with torch.inference_mode():
                            info = bench_batching(model, args.batch, args.batch_steps)
                        info.update(version=version, size=size, dtype=dt, max_wakes_per_s=rate)
                        results["batching"].append(info)
                        report_batching(info, texts)
                    del model
                    cleanup()
        header = ("\n### Concurrent chats (DecodeBatcher: a reading thread per chat, the engine's judge, sampling "
                  "with penalties)\n\n"
                  "| model | dtype | chats | one chat tok/s (DirectDecoder) | one chat tok/s (batcher) | decode_batch "
                  "tok/s (no threads) | decode + SamplingRows.step tok/s (no threads) | sampling alone ms/step | "
                  "batcher aggregate tok/s | "
                  "× one chat (the faster) | mean batch | tokens per chat (stops) | max abs Δlogit vs alone | "
                  "argmax vs alone | tokens as alone until first difference |\n"
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(header + "\n" + "\n".join(t for t in texts if t.startswith("| RWKV")), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
