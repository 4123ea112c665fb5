"""Load and soak test: many gradio_client users chatting with the real server at once, and its memory over time.

    python -m benchmarks.load_test                         # 64 clients x 20 turns, a random-weight RWKV-7 L12 D64
    python -m benchmarks.load_test --clients 4 --turns 3   # a quick look
    python -m benchmarks.load_test --soak 10               # conversations of 20 turns, new sessions, for 10 minutes
    python -m benchmarks.load_test --model /path/to/RWKV-x070-World-0.1B.pth --threads 2
    python -m benchmarks.load_test --url http://127.0.0.1:7860/ --pid 12345   # a server that is already running
    python -m benchmarks.load_test --device cuda --dtype bf16 --version 5.2 --shape 24x2048 --clients 256 \
        --turns 2 --max-new-tokens 128                    # a GPU server with a real-shaped (1.5B) random model

What it promises:
- The server is the real one: `python app.py --model M --device D` started on 127.0.0.1 with a free port, no
  network (HF_HUB_OFFLINE, an empty HF_HOME, no analytics, saved conversations in the temporary directory) and
  stopped whatever happens (tests/app_harness.py's `running_app`), with `--stats-every` (5 s unless told), whose
  decode lines (the batcher's tokens/s, mean batch and where a step's time goes) are printed after the run;
  or the server at --url (its memory only when --pid names its process).
- Each simulated user is one `gradio_client.Client`, i.e. one Gradio session, i.e. one conversation. Every turn
  is streamed from /chat with temperature 0 and a small --max-new-tokens; its message names the client, the
  conversation and the turn ("client 17 conv 1 turn 3: ..."). One warm-up turn (which loads the model) runs
  before the clock starts.
- Checks, reported as violations (and a non-zero exit status, as are failed turns):
  history   - at the end of each conversation, /history holds exactly that conversation's answered messages in
              order, with the answers as they were streamed;
  cross-talk - no other conversation's marker appears anywhere in a client's history or answers;
  state     - every later turn read only its own new tokens: its stats line's `prefill N tok` equals the tokens
              of "\\n\\nQuestion: {message}\\n\\nAnswer:" (or with the part of the separator that the previous
              answer already fed, prompts.separator_rest), so the RNN state after the previous answer was used.
- The server's memory, with its engine processes (--engine-processes), is sampled every second: on Linux the sum
  of their PSS (/proc/PID/smaps_rollup: pages they share, the libraries and the mmapped checkpoint, count once),
  elsewhere of their RSS (psutil); the tables say which. It is printed at each 10% of the run, with an estimate
  of the prefix-state cache's size (2 entries a turn, each a state and a 65,536-entry fp32 logits row, capped at
  limits.STATE_CACHE_BYTES) for comparison; the verdict says whether it plateaued (grew less than --plateau-pct
  over the last half of the run), and a last line how much it grew per turn after the cache was (by that
  estimate) full: the growth that no bound of the cache explains.
- Latency: TTFT as a client sees it (submit -> first streamed non-empty answer, polled every 10 ms, queueing
  included), the whole turn, and the engine's own TTFT from the stats line; p50/p95 (nearest rank). Throughput:
  new tokens (from the stats lines) over the wall time (aggregate), and per user: each answered turn's new
  tokens after its first over the time from its first streamed token to its end, p50 and p5 (the slowest
  users). The server's CPU use over the run: its and its engine processes' CPU seconds over the wall time, as
  the cores they kept busy on average (so a server that runs on one core shows it). Nothing is asserted about
  speed: the load generator runs on the same machine as the server, so on a small CPU the figures are indicative
  only.
- --soak MINUTES: each client keeps having conversations of --turns turns until the time is up; each new
  conversation is a new Gradio session (`Client.reset_session`, like a new visitor; the old one is abandoned like
  a closed tab), or `/reset` in the same session with --renew reset.
- Connecting (a `Client` reads /config and /info) is tried up to CONNECT_TRIES times; retries are reported.
  The server runs with one torch thread unless --threads says otherwise (the clients need the rest of a small CPU).

Why not the trained tiny models of tests/data/real-tiny: their vocabulary is 256 bytes, while the app serves every
model with the World tokenizer (app/engine_factory.py), so their first turn fails ("token id 264 is outside the
vocabulary (size 256)"). The default is therefore a random-weight RWKV-7 of the same shape (12 layers, width 64)
with the World vocabulary, written to a temporary directory (bench.random_state_dict); its answers are gibberish,
which a load test does not mind.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
POLL_S = 0.01  # how often a client looks for its first streamed token
SAMPLE_S = 1.0  # memory sampling period
CONNECT_TRIES = 5
WORLD_VOCAB = 65536
TOPICS = ("what comes after {n}?", "name a colour and the number {n}.", "tell me a short fact about {n}.",
          "is {n} odd or even?", "write one word that rhymes with {n}.")
MARKER = re.compile(r"client (\d+) conv (\d+) turn (\d+):")
STATS = re.compile(r"prefill (\d+) tok · TTFT ([\d.]+) s · (\d+) tok at")


# ------------------------------------------------------------------------------------- the server

def random_checkpoint(directory: Path, shape: str, seed: int, version: str = "7") -> Path:
    """A random-weight RWKV model (RWKV-7 unless told) with the World vocabulary in the original .pth layout."""
    import torch
    from benchmarks.bench import random_state_dict
    n_layer, n_embd = (int(x) for x in shape.lower().split("x"))
    path = directory / f"rwkv{version}-random-L{n_layer}-D{n_embd}.pth"
    torch.save(random_state_dict(version, n_layer, n_embd, seed=seed), path)
    return path


def process_tree(pid: int) -> list[int]:
    """The process and its descendants (its engine processes), from /proc; threads and descendants that end while
    it reads are left out (the process itself must be there: FileNotFoundError if not)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(kid) for kid in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            pass
    members = [pid]
    for kid in kids:
        try:
            members += process_tree(kid)
        except (FileNotFoundError, ProcessLookupError):  # a child that ended meanwhile
            pass
    return members


def proc_field(path: str, name: str) -> int:
    """A `Name:   N kB` line of a /proc file, in bytes."""
    with open(path) as lines:
        for line in lines:
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {name} in {path}")


def memory_reader(pid: int):
    """(kind, read): read() returns the memory of the process and its descendants (its engine processes) in bytes.
    Where Linux gives it (/proc/PID/smaps_rollup), kind "PSS": the sum of their proportional set sizes, each page
    shared by several processes split among them, so the libraries and the mmapped checkpoint that the server and
    its engine processes share count once (a sum of RSS counts them once a process). Elsewhere kind "RSS", summed
    (psutil)."""
    if Path(f"/proc/{pid}/smaps_rollup").exists():
        def total() -> int:
            pss = 0
            for member in process_tree(pid):
                try:
                    pss += proc_field(f"/proc/{member}/smaps_rollup", "Pss")
                except (FileNotFoundError, ProcessLookupError):  # a child that ended meanwhile
                    pass
            return pss
        return "PSS", total
    import psutil
    process = psutil.Process(pid)

    def rss(member) -> int:
        try:
            return member.memory_info().rss
        except psutil.NoSuchProcess:  # a child that ended meanwhile
            return 0
    return "RSS", lambda: sum(rss(member) for member in [process] + process.children(recursive=True))


def cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU seconds used so far by the process and its descendants (its engine processes): from
    /proc/PID/stat where Linux has it, else psutil; None when the process is gone. A descendant that ended before
    the call is not counted (the engine processes live as long as the server)."""
    if Path(f"/proc/{pid}/stat").exists():
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        try:
            members = process_tree(pid)
        except (FileNotFoundError, ProcessLookupError):
            return None
        for member in members:
            try:
                fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):  # a child that ended meanwhile
                continue
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15 of stat)
        return total
    import psutil
    try:
        process = psutil.Process(pid)
        members = [process] + process.children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    total = 0.0
    for member in members:
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


class MemorySampler(threading.Thread):
    """Samples (seconds since start, bytes) of the server's memory (memory_reader: `kind` says PSS or RSS) every
    SAMPLE_S until stopped."""

    def __init__(self, pid: Optional[int]):
        super().__init__(daemon=True)
        self.kind, self.read = memory_reader(pid) if pid else ("memory", None)
        self.samples: list[tuple[float, int]] = []
        self.started = time.perf_counter()
        self.halt = threading.Event()

    def now(self) -> Optional[int]:
        try:
            return self.read() if self.read else None
        except Exception:  # the process is gone
            return None

    def run(self) -> None:
        while not self.halt.is_set():
            used = self.now()
            if used is not None:
                self.samples.append((time.perf_counter() - self.started, used))
            self.halt.wait(SAMPLE_S)

    def at(self, t: float) -> Optional[int]:
        """The sample nearest to `t` seconds after the start."""
        return min(self.samples, key=lambda s: abs(s[0] - t))[1] if self.samples else None

    def between(self, t0: float, t1: float) -> list[int]:
        return [used for t, used in self.samples if t0 <= t <= t1]


# ------------------------------------------------------------------------------------- the clients

@dataclass
class Turn:
    client: int
    conv: int
    turn: int
    message: str
    started: float  # seconds since the run's start
    finished: float = 0.0
    error: str = ""
    answer: str = ""
    ttft_s: Optional[float] = None  # client-side: submit -> first non-empty streamed answer
    total_s: float = 0.0
    server_ttft_s: Optional[float] = None
    prefill: Optional[int] = None
    new_tokens: int = 0
    state_mb: Optional[float] = None


@dataclass
class Run:
    started: float
    turns: list[Turn] = field(default_factory=list)
    violations: list[tuple[str, str]] = field(default_factory=list)  # (kind, detail)
    conversations: int = 0
    connect_retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def clock(self) -> float:
        return time.perf_counter() - self.started

    def violate(self, kind: str, detail: str) -> None:
        with self.lock:
            self.violations.append((kind, detail))

    @property
    def answered(self) -> list[Turn]:
        return [t for t in self.turns if not t.error]


def message_for(client: int, conv: int, turn: int) -> str:
    n = (client * 31 + conv * 7 + turn) % 100
    return f"client {client} conv {conv} turn {turn}: " + TOPICS[(client + turn) % len(TOPICS)].format(n=n)


class TokenCounter:
    """Tokens a turn's prompt must read, by the app's own tokenizer and prompt pieces."""

    def __init__(self, style: str):
        from rwkv_chat.prompts import get_template, next_turn_text, user_turn_text
        from rwkv_chat.tokenizer import WorldTokenizer
        self.tokenizer, self.template = WorldTokenizer(), get_template(style)
        self.first_text, self.next_text = user_turn_text, next_turn_text

    def first(self, message: str) -> int:
        return len(self.tokenizer.encode(self.first_text(self.template, message)))

    def later(self, message: str) -> set[int]:
        """The previous answer may already have fed "\\n" or "\\n\\n" of the separator (separator_rest)."""
        return {len(self.tokenizer.encode(self.next_text(self.template, message, fed_text=fed)))
                for fed in ("", "\n", "\n\n")}


def chat_turn(client, record: Turn, settings: dict, timeout_s: float) -> None:
    """One streamed /chat turn; fills `record` (error text instead of raising)."""
    start = time.perf_counter()
    job = client.submit(record.message, api_name="/chat", **settings)
    try:
        while not job.done():  # poll for the first token (Job's own iterator polls every 1 ms)
            outputs = job.outputs()
            if outputs and outputs[-1] and outputs[-1][0]:
                record.ttft_s = time.perf_counter() - start
                break
            if time.perf_counter() - start > timeout_s:
                raise TimeoutError(f"no answer within {timeout_s:.0f} s")
            time.sleep(POLL_S)
        answer, stats = job.result(timeout=max(1.0, timeout_s - (time.perf_counter() - start)))
    except Exception as error:  # AppError, a timeout, a dropped connection: counted by message
        job.cancel()
        record.error = f"{type(error).__name__}: {str(error)[:160]}"
        return
    finally:
        record.total_s = time.perf_counter() - start
    record.answer = answer
    if record.ttft_s is None and answer:
        record.ttft_s = record.total_s
    match = STATS.search(stats or "")
    if not match:
        record.error = f"no stats line: {stats!r:.120}"
        return
    record.prefill, record.server_ttft_s, record.new_tokens = int(match[1]), float(match[2]), int(match[3])
    state = re.search(r"state ([\d.]+) MB", stats)
    record.state_mb = float(state[1]) if state else None


def check_conversation(run: Run, client, cid: int, conv: int, turns: list[Turn], counter: TokenCounter) -> None:
    """History, cross-talk and state-carrying checks for one finished conversation."""
    where = f"client {cid} conv {conv}"
    for turn in turns:
        if turn.error or turn.prefill is None:
            continue
        expected = {counter.first(turn.message)} if turn.turn == 1 else counter.later(turn.message)
        # a first turn may also read a preamble of the server's: at least its own tokens
        ok = turn.prefill >= min(expected) if turn.turn == 1 else turn.prefill in expected
        if not ok:
            run.violate("state", f"{where} turn {turn.turn}: prefill {turn.prefill} tok, expected "
                                 f"{'/'.join(map(str, sorted(expected)))}")
    try:
        history = client.predict(api_name="/history")
    except Exception as error:
        run.violate("history", f"{where}: /history failed: {type(error).__name__}: {str(error)[:120]}")
        return
    answered = [t for t in turns if not t.error]
    got = [(row[0], row[1]) for row in history]
    want = [(t.message, t.answer) for t in answered]
    if [m for m, _ in got] != [m for m, _ in want]:
        run.violate("history", f"{where}: messages {[m[:24] for m, _ in got]} != {[m[:24] for m, _ in want]}")
    elif got != want:
        bad = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
        run.violate("history", f"{where} turn {bad + 1}: answer in /history differs from the streamed one")
    for text in [repr(history)] + [t.answer for t in answered]:
        foreign = {(int(c), int(k)) for c, k, _ in MARKER.findall(text)} - {(cid, conv)}
        if foreign:
            run.violate("cross-talk", f"{where}: holds text of {sorted(foreign)[:4]}")
            break


def connect(run: Run, url: str):
    """A Client (it reads /config and /info); 64 of them at once on a busy CPU can time out, so it tries
    CONNECT_TRIES times, counting the retries (reported, not failures)."""
    from gradio_client import Client
    for attempt in range(1, CONNECT_TRIES + 1):
        try:
            return Client(url, verbose=False)
        except Exception:
            if attempt == CONNECT_TRIES:
                raise
            with run.lock:
                run.connect_retries += 1
            time.sleep(attempt)


def user(run: Run, url: str, cid: int, args, counter: TokenCounter, deadline: Optional[float],
         settings: dict) -> None:
    """One simulated user: conversations of args.turns turns (one, or until the soak's deadline)."""
    try:
        client = connect(run, url)
    except Exception as error:
        with run.lock:
            run.turns.append(Turn(cid, 1, 1, "", run.clock(), run.clock(),
                                  f"connect: {type(error).__name__}: {str(error)[:120]}"))
        return
    conv = 0
    try:
        while True:
            conv += 1
            turns = []
            for index in range(1, args.turns + 1):
                record = Turn(cid, conv, index, message_for(cid, conv, index), run.clock())
                chat_turn(client, record, settings, args.turn_timeout)
                record.finished = run.clock()
                turns.append(record)
                with run.lock:
                    run.turns.append(record)
                if deadline is not None and time.perf_counter() > deadline:
                    break
            check_conversation(run, client, cid, conv, turns, counter)
            with run.lock:
                run.conversations += 1
            if deadline is None or time.perf_counter() > deadline:
                return
            if args.renew == "reset":
                client.predict(api_name="/reset")
            else:
                client.reset_session()  # a new Gradio session: a new visitor; the old one is abandoned
    except Exception as error:  # outside a turn (history, reset): the user stops, counted as a failed turn
        with run.lock:
            run.turns.append(Turn(cid, conv, 0, "", run.clock(), run.clock(),
                                  f"client: {type(error).__name__}: {str(error)[:120]}"))
    finally:
        client.close()


# ------------------------------------------------------------------------------------- figures

def percentile(values: list[float], p: float) -> Optional[float]:
    values = sorted(v for v in values if v is not None)
    return values[max(0, math.ceil(p / 100 * len(values)) - 1)] if values else None


def cache_estimate(turns: int, state_mb: Optional[float]) -> Optional[float]:
    """MB the prefix-state cache holds after `turns` answered turns (2 entries each), at most its budget."""
    from rwkv_chat.limits import STATE_CACHE_BYTES
    if state_mb is None:
        return None
    return min(STATE_CACHE_BYTES, 2 * turns * (state_mb * 1e6 + 4 * WORLD_VOCAB)) / 2**20


def mb(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def sec(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def period_figures(run: Run, sampler: MemorySampler, t0: float, t1: float) -> dict:
    turns = [t for t in run.turns if t0 <= t.finished <= t1]
    ok = [t for t in turns if not t.error]
    memory = sampler.between(t0, t1)
    tokens = sum(t.new_tokens for t in ok)
    return {"turns": len(turns), "errors": len(turns) - len(ok),
            "ttft_p50": percentile([t.ttft_s for t in ok], 50), "ttft_p95": percentile([t.ttft_s for t in ok], 95),
            "turn_p50": percentile([t.total_s for t in ok], 50), "turn_p95": percentile([t.total_s for t in ok], 95),
            "server_ttft_p50": percentile([t.server_ttft_s for t in ok], 50),
            "server_ttft_p95": percentile([t.server_ttft_s for t in ok], 95),
            "new_tokens": tokens, "tok_per_s": tokens / (t1 - t0) if t1 > t0 else 0.0,
            "user_tps_p50": percentile([user_tps(t) for t in ok], 50),
            "user_tps_p5": percentile([user_tps(t) for t in ok], 5),
            "memory_kind": sampler.kind, "memory_min": min(memory) if memory else None,
            "memory_max": max(memory) if memory else None, "memory_end": memory[-1] if memory else None}


def user_tps(turn: Turn) -> Optional[float]:
    """The speed one user sees: new tokens after the first over the time from the first streamed one to the end."""
    if turn.ttft_s is None or turn.new_tokens < 2 or turn.total_s <= turn.ttft_s:
        return None
    return (turn.new_tokens - 1) / (turn.total_s - turn.ttft_s)


def summary_table(periods: dict[str, dict]) -> str:
    rows = [("turns answered / failed", lambda f: f"{f['turns'] - f['errors']} / {f['errors']}"),
            ("TTFT at the client p50 / p95 (s)", lambda f: f"{sec(f['ttft_p50'])} / {sec(f['ttft_p95'])}"),
            ("whole turn p50 / p95 (s)", lambda f: f"{sec(f['turn_p50'])} / {sec(f['turn_p95'])}"),
            ("engine TTFT p50 / p95 (s)", lambda f: f"{sec(f['server_ttft_p50'])} / {sec(f['server_ttft_p95'])}"),
            ("new tokens, aggregate tok/s", lambda f: f"{f['new_tokens']:,}, {f['tok_per_s']:.1f}"),
            ("per-user tok/s p50 / p5", lambda f: f"{num(f['user_tps_p50'])} / {num(f['user_tps_p5'])}"),
            ("server memory min / max / end (MiB)",
             lambda f: f"{f['memory_kind']} {mb(f['memory_min'])} / {mb(f['memory_max'])} / {mb(f['memory_end'])}")]
    names = list(periods)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {label} | " + " | ".join(cell(periods[n]) for n in names) + " |" for label, cell in rows]
    return "\n".join(lines)


def memory_timeline(run: Run, sampler: MemorySampler, marks: list[float]) -> str:
    state_mb = next((t.state_mb for t in run.turns if t.state_mb is not None), None)
    lines = [f"| done | elapsed (s) | turns answered | server {sampler.kind} (MiB) | prefix cache est. (MiB) |",
             "|---:|---:|---:|---:|---:|", f"| start | 0 | 0 | {mb(sampler.at(0.0))} | 0 |"]
    for index, t in enumerate(marks, 1):
        answered = sum(1 for turn in run.turns if turn.finished <= t and not turn.error)
        cache = cache_estimate(answered, state_mb)
        lines.append(f"| {10 * index}% | {t:.0f} | {answered:,} | {mb(sampler.at(t))} | "
                     f"{'-' if cache is None else f'{cache:,.0f}'} |")
    return "\n".join(lines)


def plateau_verdict(sampler: MemorySampler, duration: float, limit_pct: float) -> tuple[bool, str]:
    if not sampler.samples:
        return True, "memory not sampled (no --pid for an attached server)"
    mid, second_half = sampler.at(duration / 2), sampler.between(duration / 2, duration)
    top = max(second_half or [mid])
    growth = 100 * (top - mid) / mid
    held = growth < limit_pct
    return held, (f"{sampler.kind} {'plateaued' if held else 'did NOT plateau'}: {mb(mid)} MiB at half time, at most "
                  f"{mb(top)} MiB in the second half ({growth:+.1f}%; the bar is < {limit_pct:g}%)")


def cache_note(run: Run, sampler: MemorySampler, duration: float) -> str:
    """When the prefix cache (estimated) was full, and how memory moved after that: what a bound must explain."""
    from rwkv_chat.limits import STATE_CACHE_BYTES
    state_mb = next((t.state_mb for t in run.turns if t.state_mb is not None), None)
    done = sorted(t.finished for t in run.turns if not t.error)
    full_at = next((t for n, t in enumerate(done, 1) if cache_estimate(n, state_mb) * 2**20 >= STATE_CACHE_BYTES),
                   None) if state_mb is not None else None
    if full_at is None:
        return (f"the prefix cache was still filling at the end (est. {cache_estimate(len(done), state_mb) or 0:,.0f} "
                f"of {STATE_CACHE_BYTES / 2**20:,.0f} MiB): {sampler.kind} is expected to grow until it is full")
    later = sum(1 for t in done if t > full_at)
    start, end = sampler.at(full_at), sampler.at(duration)
    if start is None or end is None or not later:
        return f"the prefix cache was full (est.) from {full_at:.0f} s"
    return (f"after the prefix cache was full (est. from {full_at:.0f} s): {sampler.kind} {mb(start)} -> "
            f"{mb(end)} MiB over {later:,} turns ({(end - start) / 1024 / later:+.1f} KiB a turn)")


# ------------------------------------------------------------------------------------- the run

def progress_marks(run: Run, args, deadline: Optional[float], total_turns: int, threads, sampler) -> list[float]:
    """Wait for the clients, printing a line at each 10% (of the turns, or of the soak's time)."""
    marks: list[float] = []
    while len(marks) < 10:
        alive = any(thread.is_alive() for thread in threads)
        if deadline is None:
            due = len(run.turns) >= total_turns * (len(marks) + 1) / 10 or not alive
        else:
            due = time.perf_counter() >= run.started + args.soak * 60 * (len(marks) + 1) / 10 or not alive
        if not due:
            time.sleep(0.2)
            continue
        marks.append(run.clock())
        errors = sum(1 for t in run.turns if t.error)
        print(f"[{10 * len(marks):3d}%] {run.clock():7.1f} s  {len(run.turns):6,} turns  {errors} errors  "
              f"{len(run.violations)} violations  {sampler.kind} {mb(sampler.now())} MiB", flush=True)
        if not alive:
            while len(marks) < 10:
                marks.append(run.clock())
    return marks


def drive(url: str, pid: Optional[int], args) -> int:
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=0.0, seed=0, prompt_style=args.style)
    counter = TokenCounter(args.style)
    from gradio_client import Client
    warm = Client(url, verbose=False)  # loads the model (the server loads it on the first chat)
    record = Turn(0, 0, 0, "warm-up: hello", 0.0)
    chat_turn(warm, record, settings, args.turn_timeout * 4)
    warm.close()
    if record.error:
        print(f"the warm-up turn failed: {record.error}", file=sys.stderr)
        if "outside the vocabulary" in record.error:
            print("(the app reads every model with the World tokenizer; a byte-level model such as "
                  "tests/data/real-tiny's cannot be served)", file=sys.stderr)
        return 2
    print(f"warm-up turn: {record.total_s:.1f} s, {record.new_tokens} tokens; starting {args.clients} clients",
          flush=True)

    sampler = MemorySampler(pid)
    run = Run(started=sampler.started)
    cpu_start = cpu_seconds(pid) if pid else None
    sampler.start()
    deadline = time.perf_counter() + args.soak * 60 if args.soak else None
    threads = [threading.Thread(target=user, args=(run, url, cid, args, counter, deadline, settings), daemon=True)
               for cid in range(1, args.clients + 1)]
    for thread in threads:
        thread.start()
    marks = progress_marks(run, args, deadline, args.clients * args.turns, threads, sampler)
    for thread in threads:
        thread.join()
    duration = run.clock()
    cpu_end = cpu_seconds(pid) if pid else None
    sampler.halt.set()
    sampler.join()
    cores = (cpu_end - cpu_start) / duration if cpu_start is not None and cpu_end is not None and duration else None
    return report(run, sampler, marks, duration, args, cores)


def report(run: Run, sampler: MemorySampler, marks: list[float], duration: float, args,
           cores: Optional[float] = None) -> int:
    errors = Counter(t.error for t in run.turns if t.error)
    kinds = Counter(kind for kind, _ in run.violations)
    print(f"\n{args.clients} clients x {args.turns} turns"
          + (f", soak {args.soak:g} min ({args.renew} between conversations)" if args.soak else "")
          + f": {len(run.turns):,} turns in {run.conversations:,} conversations, {duration:.0f} s"
          + (f" ({run.connect_retries} connection retries)" if run.connect_retries else ""))
    print(f"errors: {sum(errors.values())}" + "".join(f"\n  {n} x {e}" for e, n in errors.most_common(10)))
    print(f"violations: {len(run.violations)} (history {kinds['history']}, cross-talk {kinds['cross-talk']}, "
          f"state not carried {kinds['state']})" + "".join(f"\n  {k}: {d}" for k, d in run.violations[:10]))
    print(f"\nserver {sampler.kind} over time:\n" + memory_timeline(run, sampler, marks))
    held, verdict = plateau_verdict(sampler, duration, args.plateau_pct)
    print("\n" + verdict)
    print(cache_note(run, sampler, duration))
    periods = {"first half": period_figures(run, sampler, 0.0, duration / 2),
               "second half": period_figures(run, sampler, duration / 2, duration),
               "whole run": period_figures(run, sampler, 0.0, duration)}
    print("\n" + summary_table(periods))
    if cores is not None:
        print(f"server CPU (with its engine processes): {cores:.2f} cores busy on average over the run "
              f"(CPU seconds / wall seconds; {os.cpu_count()} cores on this machine)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "duration_s": duration, "errors": dict(errors), "connect_retries": run.connect_retries,
            "violations": run.violations, "server_cores_busy": cores, "memory_kind": sampler.kind,
            "memory_samples": sampler.samples,
            "plateau": held, "verdict": verdict,
            "periods": periods, "turns": [{k: v for k, v in asdict(t).items() if k != "answer"} for t in run.turns]},
            indent=1))
    return 1 if errors or run.violations else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint for the server (default: a random RWKV-7 of --shape)")
    p.add_argument("--shape", default="12x64", help="LAYERS x WIDTH of the default random checkpoint")
    p.add_argument("--version", default="7", help="RWKV version of the default random checkpoint (4, 5.2, 6, 7)")
    p.add_argument("--device", default="cpu", help="the server's --device (cpu, cuda)")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--turns", type=int, default=20, help="turns per conversation")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--style", default="Question/Answer", help="prompt style sent with every message")
    p.add_argument("--soak", type=float, default=0.0, help="minutes of conversations (0: one conversation each)")
    p.add_argument("--renew", choices=("session", "reset"), default="session",
                   help="soak: a new conversation is a new Gradio session, or /reset in the same one")
    p.add_argument("--concurrency", type=int, default=None, help="the server's --concurrency (default: its own)")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads (OMP_NUM_THREADS)")
    p.add_argument("--engine-processes", default="auto",
                   help="the server's --engine-processes: a count, or auto (its default: for a 0.1B int8/int4 "
                        "model one per 4 threads as memory allows, else one; the threads are shared among them)")
    p.add_argument("--stats-every", type=float, default=5.0,
                   help="the server's --stats-every: its decode lines (tokens/s, mean batch, where a step's time "
                        "goes) are printed after the run")
    p.add_argument("--turn-timeout", type=float, default=600.0, help="seconds before a turn counts as failed")
    p.add_argument("--plateau-pct", type=float, default=5.0)
    p.add_argument("--url", default=None, help="drive a running server instead of starting one")
    p.add_argument("--pid", type=int, default=None, help="with --url: the server's process, for its memory")
    p.add_argument("--json", default=None, help="write every figure and turn here")
    p.add_argument("--seed", type=int, default=0, help="of the random checkpoint")
    args = p.parse_args(argv)
    if args.url:
        return drive(args.url if args.url.endswith("/") else args.url + "/", args.pid, args)
    sys.path.insert(0, str(REPO / "tests"))
    from app_harness import running_app
    with tempfile.TemporaryDirectory(prefix="rwkv-load-") as tmp:
        tmp_dir = Path(tmp)
        model = args.model or str(random_checkpoint(tmp_dir, args.shape, args.seed, args.version))
        server_args = ["--model", model, "--device", args.device, "--dtype", args.dtype]
        server_args += ["--concurrency", str(args.concurrency)] if args.concurrency else []
        server_args += ["--stats-every", f"{args.stats_every:g}", "--engine-processes", str(args.engine_processes)]
        print(f"server: python app.py {' '.join(server_args)} (OMP_NUM_THREADS={args.threads})", flush=True)
        # RWKV_DATA_DIR: a server that saves conversations keeps them in the temporary directory, not the user's
        env = {"OMP_NUM_THREADS": str(args.threads), "RWKV_DATA_DIR": str(tmp_dir / "data")}
        with running_app(server_args, tmp_dir, env=env) as app:
            try:
                return drive(app.url, app.process.pid, args)
            finally:
                log = app.log()
                served = [line for line in log.splitlines() if line.startswith("rwkv-chat: ") and " served by " in line]
                print("\n" + ("\n".join(served) if served else "the server's model: one engine (no engine processes)"))
                decode = [line for line in log.splitlines() if ": decode " in line and line.startswith("rwkv-chat: ")]
                if decode:
                    print(f"\nthe server's batched decoding, every {args.stats_every:g} s:\n" + "\n".join(decode))
                if "Traceback" in log:
                    print("\nthe server log holds a traceback; its end:\n" + log[-3000:], file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
