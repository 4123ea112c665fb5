"""benchmarks/bench.py's interleaved rounds: on a machine that slows down during the run, each round's ratio
between two implementations stays their true ratio, where timing one after the other would not."""

from __future__ import annotations

import re
import statistics

import torch

from benchmarks import bench


class Clock:
    """A fake perf_counter: the implementations advance it by their cost times the machine's slowness, which
    doubles over the run."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def spend(self, cost: float) -> None:
        self.now += cost * (1.0 + self.now / 10.0)


class FakeImpl(bench.Impl):
    def __init__(self, name, clock, prefill_cost, step_cost):
        self.name, self.dtype = name, "fp32"
        self.clock, self.prefill_cost, self.step_cost = clock, prefill_cost, step_cost
        self.closed = False

    def prefill(self, tokens):
        self.clock.spend(self.prefill_cost * len(tokens))
        return torch.zeros(4), None

    def step(self, token, state):
        self.clock.spend(self.step_cost)
        return torch.zeros(4), None

    def close(self):
        self.closed = True


def test_interleaved_rounds_give_each_round_the_true_ratio_on_a_drifting_machine(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    ours = FakeImpl("ours", clock, prefill_cost=0.001, step_cost=0.01)
    ref = FakeImpl("rwkv pip", clock, prefill_cost=0.003, step_cost=0.04)  # 3x slower prefill, 4x decode
    prompt, tokens = list(range(100)), list(range(8))
    rows = [bench.run_impl(lambda: impl, "cpu", prompt, [1, 2], tokens, reps=2, keep=True) for impl in (ours, ref)]
    sequential = rows[0].prefill_tps / rows[1].prefill_tps  # the first pass: one implementation after another
    assert abs(sequential - 3.0) > 0.1  # the drift distorts it
    bench.interleaved_rounds(rows, prompt, tokens, torch.device("cpu"), rounds=4)
    prefill, decode = bench.round_ratios(rows[0], [rows[1]])
    assert len(prefill) == len(decode) == 4
    # within a round the machine slows a little between the two: each ratio is close to the truth
    assert all(abs(r - 3.0) < 0.15 for r in prefill), prefill
    assert all(abs(r - 4.0) < 0.2 for r in decode), decode
    for row in rows:  # the figures are the rounds' medians, not the first pass's
        assert row.prefill_tps == statistics.median(row.prefill_rounds)
        assert row.decode_tps == statistics.median(row.decode_rounds)
    assert ours.closed and ref.closed and rows[0].impl is None and rows[1].impl is None


def test_without_keep_the_implementation_is_closed_after_its_pass():
    clock = Clock()
    impl = FakeImpl("ours", clock, 0.001, 0.01)
    row = bench.run_impl(lambda: impl, "cpu", list(range(10)), [1], [1, 2], reps=1)
    assert impl.closed and row.impl is None and row.prefill_rounds == []


class ReadingImpl(FakeImpl):
    """A CPU implementation whose decode reads `nbytes` a token at `share` of the machine's plain-read bandwidth."""

    def __init__(self, clock, machine, nbytes, share):
        super().__init__("ours", clock, prefill_cost=0.001, step_cost=0.0)
        self.machine, self.nbytes, self.share = machine, nbytes, share

    def step(self, token, state):
        self.clock.spend(self.nbytes / (self.machine.bandwidth() * self.share))
        return torch.zeros(4), None

    def decode_bytes(self):
        return self.nbytes


def test_the_read_ceiling_share_is_each_rounds_own_on_a_machine_whose_bandwidth_drifts(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)

    class Machine:  # the plain read's bandwidth falls over the run
        def bandwidth(self):
            return 30e9 / (1.0 + 10.0 * clock.now)

    machine = Machine()
    reads = []

    def plain_read(nbytes, reps=15, buffer=None):  # what a plain read of those bytes gets at this moment
        assert buffer is not None and buffer.numel() * 4 >= nbytes  # one buffer for the run, large enough
        reads.append(nbytes)
        clock.spend(nbytes / machine.bandwidth())
        return machine.bandwidth()

    sustained_reads = []

    def sustained_read(nbytes, passes, buffer):  # read as the decode is timed: 90% of the bursts' bandwidth here
        assert buffer is not None and buffer.numel() * 4 >= nbytes
        sustained_reads.append((nbytes, passes))
        rate = 0.9 * machine.bandwidth()
        clock.spend(nbytes * passes / rate)
        return rate

    monkeypatch.setattr(bench, "read_bandwidth", plain_read)
    monkeypatch.setattr(bench, "sustained_read_bandwidth", sustained_read)
    impl = ReadingImpl(clock, machine, nbytes=4096, share=0.8)
    row = bench.run_impl(lambda: impl, "cpu", list(range(10)), [1], list(range(8)), reps=1, keep=True)
    assert row.decode_bytes == 4096 and reads == []
    bench.interleaved_rounds([row], list(range(10)), list(range(8)), torch.device("cpu"), rounds=5)
    assert reads == [4096] * 5 and len(row.read_rounds) == 5
    assert sustained_reads == [(4096, 8)] * 5 and len(row.sustained_rounds) == 5  # once a decode step
    assert row.read_rounds[0] > 1.2 * row.read_rounds[-1]  # the machine did drift
    shares = bench.ceiling_shares(row)
    assert all(abs(share - 0.8) < 0.02 for share in shares), shares
    note = bench.ceiling_note(row)
    assert note.startswith("decode 80% of the read ceiling (median of 5 rounds"), note
    sustained = re.search(r", (\d+)% of a sustained read \(", note)
    assert sustained and abs(int(sustained.group(1)) - 100 * 0.8 / 0.9) < 1.5, note  # 0.8 / 0.9, the round's own


def test_turn_lengths_are_timed_as_prompts_of_that_many_tokens_and_tabled(monkeypatch, capsys):
    class SteadyClock(Clock):
        def spend(self, cost: float) -> None:
            self.now += cost

    clock = SteadyClock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    seen = []

    class Recording(FakeImpl):
        def prefill(self, tokens):
            seen.append(list(tokens))
            return super().prefill(tokens)

    ours = Recording("ours", clock, prefill_cost=0.002, step_cost=0.01)
    ref = FakeImpl("rwkv pip", clock, prefill_cost=0.005, step_cost=0.04)
    prompt = list(range(10))
    rows = [bench.run_impl(lambda: impl, "cpu", prompt, [1], [1, 2], reps=2, turns=(3, 25)) for impl in (ours, ref)]
    for row, expected in zip(rows, ({3: 6.0, 25: 50.0}, {3: 15.0, 25: 125.0})):
        assert row.turn_ms.keys() == expected.keys()
        assert all(abs(row.turn_ms[n] - ms) < 1e-9 for n, ms in expected.items()), row.turn_ms
    assert seen[-1] == (prompt * 3)[:25] and seen.count([0, 1, 2]) == 5  # two untimed, three timed
    text = bench.print_turns("RWKV-7 tiny", rows)
    assert "| ours | fp32 | 6.00 | 50.00 |" in text and "| rwkv pip | fp32 | 15.00 | 125.00 |" in text
    assert "N=3 | N=25" in text and text in capsys.readouterr().out
    assert bench.print_turns("none", [bench.Row("x", "fp32")]) == ""
