"""DecodeBatcher: the token loops of concurrent chats run as batched steps in one worker; every chat gets
what it gets alone (generation.DirectDecoder), and one chat's trouble stays its own."""

from __future__ import annotations

import functools
import threading
import time
import traceback

import pytest
import torch

from rwkv_chat import load_model
from rwkv_chat.serving import batching
from rwkv_chat.serving.batching import BatcherClosed, DecodeBatcher
from rwkv_chat.serving.engine import ChatEngine, GenerationSettings
from rwkv_chat.serving.generation import DirectDecoder, Verdict
from rwkv_chat.serving.sampling import Sampler, SamplingParams, sample_batch
from rwkv_chat.serving.session import ChatSession
from rwkv_chat.state import RwkvState
from rwkv_chat.tokenizer import WorldTokenizer
from reference import random_tokens


@pytest.fixture(scope="module", params=["4", "5.2", "6", "7"], ids=lambda v: f"v{v}")
def model(request, make_checkpoint):
    # On the CPU wherever the tests run: batched and single products agree to fp32 rounding there (1e-4 below);
    # GPU batching is checked by the benchmark's parity columns.
    return load_model(make_checkpoint(request.param, n_layer=2, n_embd=128, seed=2).path, device="cpu",
                      dtype="fp32")


def run_threads(targets):
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)


def wait_until(condition, timeout: float = 60.0) -> None:
    waited = 0.0
    while not condition():
        assert waited < timeout, "timed out"
        threading.Event().wait(0.01)
        waited += 0.01


class Recorder:
    """A judge that keeps `count` tokens (feeding the last as LAST), or refuses the one at `stop_at`
    (STOP), or raises at `fail_at`; records each token it sees, the logits row it came from and the thread
    that judged it."""

    def __init__(self, count: int, stop_at: int | None = None, fail_at: int | None = None):
        self.count, self.stop_at, self.fail_at = count, stop_at, fail_at
        self.tokens, self.logits, self.threads = [], [], []

    def accept(self, token, logits):
        self.threads.append(threading.current_thread().name)
        n = len(self.tokens)
        if n == self.fail_at:
            raise RuntimeError("the judge failed")
        self.tokens.append(token)
        self.logits.append(logits.clone())
        if n == self.stop_at:
            return Verdict.STOP
        return Verdict.LAST if n + 1 == self.count else Verdict.FEED


def run_chat(decoder, logits, state, sampler, judge):
    """Iterate a chat to its end -> (items seen, final logits, final state)."""
    run = decoder.generate(logits, state, sampler, judge)
    items = sum(1 for _ in run)
    return items, run.logits, run.state


CHAT_PARAMS = [
    SamplingParams(),  # the chat defaults: T 1, top_p 0.3, penalties 0.4 / 0.4 / 0.996
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.3, top_p=0.9, top_k=40, presence_penalty=1.0, frequency_penalty=0.2),
    SamplingParams(temperature=0.6, top_p=1.0, top_k=0),
    SamplingParams(temperature=1.0, top_p=0.6, top_k=5, penalty_decay=0.9),
    SamplingParams(temperature=2.0, top_p=0.95, presence_penalty=0.0, frequency_penalty=0.0),
]


@pytest.mark.parametrize("pipelined", [False, True], ids=["host", "pipelined"])
def test_concurrent_chats_get_what_they_get_alone(model, pipelined):
    """Six chats with their own sampling settings, seeds and lengths (two end on a refused token), more
    than the batch holds: they join and leave between steps (pipelined: into freed rows), and each draws
    the same tokens from the same logits, and ends in the same state, as alone."""
    vocab = model.config.vocab_size
    prompts = [random_tokens(5 + i, seed=i) for i in range(6)]
    starts = [model.forward(p) for p in prompts]
    judges = {"alone": [], "batched": []}

    def chat(decoder, i, kind):
        logits, state = starts[i]
        judge = Recorder(count=4 + 3 * i, stop_at=5 if i in (2, 5) else None)
        judges[kind].append(judge)
        sampler = Sampler(CHAT_PARAMS[i], torch.Generator().manual_seed(10 + i), None, range(vocab - 6, vocab))
        return run_chat(decoder, logits, state, sampler, judge)

    alone = [chat(DirectDecoder(model), i, "alone") for i in range(6)]
    got = [None] * 6
    with DecodeBatcher(model, max_batch=4, pipelined=pipelined) as batcher:
        run_threads([lambda i=i: got.__setitem__(i, chat(batcher, i, "batched")) for i in range(6)])
        assert batcher.served > batcher.steps  # chats shared steps
    batched = sorted(judges["batched"], key=lambda j: j.count)  # judges in chat order (counts differ)
    for i, (want, judge) in enumerate(zip(judges["alone"], batched)):
        assert judge.tokens == want.tokens
        assert len(judge.tokens) == (6 if i in (2, 5) else 4 + 3 * i)
        for a, b in zip(judge.logits, want.logits):
            assert (a - b).abs().max().item() <= 1e-4  # fp32 rounding of batched products
        assert set(judge.threads) == {"rwkv-decode-batcher"}  # the judges run in the worker
    for (items, logits, state), (_, ref_logits, ref_state) in zip(got, alone):
        assert 1 <= items and state.batch_size == 1 and logits.shape == (vocab,)
        assert (logits - ref_logits).abs().max().item() <= 1e-4
        assert torch.allclose(state.wkv, ref_state.wkv, rtol=1e-4, atol=1e-4)
        assert torch.allclose(state.shift, ref_state.shift, atol=1e-4)


def test_states_and_logits_passed_in_are_not_changed(model):
    logits, state = model.forward(random_tokens(8, seed=1))
    before = (logits.clone(), state.clone())
    greedy = SamplingParams(temperature=0)
    with DecodeBatcher(model) as batcher:
        run_threads([lambda: run_chat(batcher, logits, state, Sampler(greedy), Recorder(3)) for _ in range(4)])
    assert torch.equal(logits, before[0]) and state.equal(before[1])


class SlowModel:
    """A stand-in model: logits one-hot at each token fed (so a greedy chat repeats its first token) and
    shift + 1 per step; records batch sizes; each step waits until `release` is set."""

    class config:
        vocab_size = 100

    device = torch.device("cpu")

    def __init__(self, fail: bool = False):
        self.batches = []
        self.entered = 0
        self.release = threading.Event()
        self.fail = fail

    def decode_batch(self, tokens, state):
        self.entered += 1
        self.release.wait(timeout=60)
        self.batches.append(len(tokens))
        if self.fail:
            raise RuntimeError("kernel exploded")
        return torch.nn.functional.one_hot(tokens, 100).float(), RwkvState(state.shift + 1, state.wkv)


def tiny_state(value: float = 0.0) -> RwkvState:
    return RwkvState(torch.full((1, 1, 2, 4), value), torch.zeros(1, 1, 3, 4))


def one_hot(token: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(token), 100).float()


GREEDY = SamplingParams(temperature=0)


def test_chats_that_arrive_during_a_step_join_the_next_one_and_rows_go_back_to_their_callers():
    model = SlowModel()
    results, judges = {}, {i: Recorder(3) for i in range(6)}
    with DecodeBatcher(model, max_batch=8) as batcher:
        def chat(i):
            return lambda: results.setdefault(
                i, run_chat(batcher, one_hot(i), tiny_state(10 * i), Sampler(GREEDY), judges[i]))
        first = threading.Thread(target=chat(0))
        first.start()
        wait_until(lambda: model.entered == 1)  # chat 0's first step is running
        rest = [threading.Thread(target=chat(i)) for i in range(1, 6)]
        for t in rest:
            t.start()
        wait_until(lambda: len(batcher._incoming) == 5)
        model.release.set()
        for t in [first] + rest:
            t.join(timeout=60)
    assert model.batches == [1, 6, 6, 5]  # chat 0 ends a step before the others
    for i in range(6):
        items, logits, state = results[i]
        assert judges[i].tokens == [i] * 3  # each chat got its own rows back
        assert int(logits.argmax()) == i and state.shift.flatten()[0].item() == 10 * i + 3
        assert 1 <= items <= 3


def test_a_failing_step_ends_every_chat_of_that_step_with_its_error_and_the_batcher_goes_on(monkeypatch):
    model = SlowModel(fail=True)
    model.release.set()
    errors = []
    with DecodeBatcher(model) as batcher:
        def chat(i):
            try:
                run_chat(batcher, one_hot(i), tiny_state(), Sampler(GREEDY), Recorder(5))
            except RuntimeError as error:
                errors.append(str(error))
        run_threads([lambda i=i: chat(i) for i in range(4)])
        assert errors == ["kernel exploded"] * 4
        model.fail = False

        def broken_sampling(*args, **kwargs):
            monkeypatch.undo()  # once
            raise RuntimeError("sampling exploded")
        monkeypatch.setattr(batching, "sample_batch", broken_sampling)
        with pytest.raises(RuntimeError, match="sampling exploded"):
            run_chat(batcher, one_hot(1), tiny_state(), Sampler(GREEDY), Recorder(5))
        judge = Recorder(3)
        run_chat(batcher, one_hot(1), tiny_state(), Sampler(GREEDY), judge)  # still serving
    assert judge.tokens == [1, 1, 1]


def test_an_error_that_ends_several_chats_keeps_its_traceback_for_each_reader():
    # the chats of one failing step share its error; each reader raises it with the traceback the worker caught,
    # not with the frames of every reader that raised it before (256 chats made a traceback of 256 raises)
    model = SlowModel(fail=True)
    with DecodeBatcher(model) as batcher:
        runs = [batcher.generate(one_hot(i), tiny_state(), Sampler(GREEDY), Recorder(5)) for i in range(4)]
        wait_until(lambda: model.entered == 1)
        model.release.set()
        raised = []
        for run in runs:
            with pytest.raises(RuntimeError, match="kernel exploded") as caught:
                for _ in run:
                    pass
            raised.append((caught.value, len(traceback.extract_tb(caught.value.__traceback__))))
    assert len({id(error) for error, _ in raised}) < len(raised)  # some chats shared one step's error
    assert len({depth for _, depth in raised}) == 1


def test_bad_calls_fail_at_once_and_the_batcher_still_serves(model):
    logits, state = model.forward([1, 2])
    sampler, judge = Sampler(GREEDY), Recorder(2)
    with DecodeBatcher(model) as batcher:
        with pytest.raises(ValueError, match="one sequence"):
            batcher.generate(logits, model.zero_state(batch=2), sampler, judge)
        with pytest.raises(ValueError, match="logits"):
            batcher.generate(logits[:10], state, sampler, judge)
        with pytest.raises(ValueError, match="Sampler"):
            batcher.generate(logits, state, GREEDY, judge)
        with pytest.raises(ValueError, match="judge"):
            batcher.generate(logits, state, sampler, object())
        items, final, _ = run_chat(batcher, logits, state, sampler, judge)
    assert judge.tokens and final.shape == (model.config.vocab_size,)


@pytest.mark.parametrize("pipelined", [False, True], ids=["host", "pipelined"])
def test_a_row_that_cannot_be_sampled_or_a_failing_judge_ends_only_its_own_chat(pipelined):
    model = SlowModel()
    model.release.set()
    outcome = {}
    rows = {"ok": (Sampler(GREEDY), Recorder(4)),
            "all banned": (Sampler(GREEDY, ban_tokens=range(100)), Recorder(4)),
            "judge fails": (Sampler(GREEDY), Recorder(4, fail_at=2))}
    with DecodeBatcher(model, pipelined=pipelined) as batcher:
        def chat(name):
            try:
                outcome[name] = run_chat(batcher, one_hot(7), tiny_state(), *rows[name])[1:]
            except (ValueError, RuntimeError) as error:
                outcome[name] = str(error)
        run_threads([lambda n=n: chat(n) for n in rows])
    logits, state = outcome["ok"]
    assert rows["ok"][1].tokens == [7] * 4 and state.shift.flatten()[0].item() == 4
    assert "banned" in outcome["all banned"]
    assert outcome["judge fails"] == "the judge failed" and rows["judge fails"][1].tokens == [7, 7]


@pytest.mark.parametrize("pipelined", [False, True], ids=["host", "pipelined"])
def test_close_ends_the_chats_in_flight_then_refuses(pipelined):
    model = SlowModel()
    batcher = DecodeBatcher(model, pipelined=pipelined)
    errors = []

    def chat():
        try:
            run_chat(batcher, one_hot(1), tiny_state(), Sampler(GREEDY), Recorder(50))
        except BatcherClosed as error:
            errors.append(error)
    chats = [threading.Thread(target=chat) for _ in range(2)]
    chats[0].start()
    wait_until(lambda: model.entered == 1)
    chats[1].start()
    wait_until(lambda: len(batcher._incoming) == 1)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    model.release.set()
    for t in chats + [closer]:
        t.join(timeout=60)
    assert len(errors) == 2 and model.batches == [1]
    with pytest.raises(BatcherClosed):
        batcher.generate(one_hot(1), tiny_state(), Sampler(GREEDY), Recorder(1))


@pytest.mark.parametrize("pipelined", [False, True], ids=["host", "pipelined"])
def test_a_reader_that_leaves_stops_its_chat(pipelined):
    model = SlowModel()
    model.release.set()
    with DecodeBatcher(model, pipelined=pipelined) as batcher:
        endless = Recorder(10**9)
        run = batcher.generate(one_hot(3), tiny_state(), Sampler(GREEDY), endless)
        for n, _ in enumerate(run):
            if n == 2:
                break
        run.close()
        seen = len(endless.tokens)
        run_chat(batcher, one_hot(4), tiny_state(), Sampler(GREEDY), Recorder(3))
        wait_until(lambda: batcher.steps == len(model.batches))
        assert model.batches[-3:] == [1, 1, 1]  # the other chat ran alone
        assert len(endless.tokens) <= seen + 1  # at most the step that was running when it left


def test_a_slow_reader_gets_several_tokens_per_item_and_a_lone_chat_runs_at_once():
    model = SlowModel()
    model.release.set()
    with DecodeBatcher(model) as batcher:
        judge = Recorder(5)
        run = batcher.generate(one_hot(2), tiny_state(), Sampler(GREEDY), judge)
        wait_until(lambda: run.finished)  # nobody reads: the chat still runs to its end
        assert sum(1 for _ in run) == 1
        assert judge.tokens == [2] * 5 and model.batches == [1] * 5
        assert run.state.shift.flatten()[0].item() == 5
        judge = Recorder(300)
        items = sum(1 for _ in batcher.generate(one_hot(2), tiny_state(), Sampler(GREEDY), judge))
    assert len(judge.tokens) == 300 and 1 <= items < 300  # readers are woken at most every WAKE_INTERVAL_S


@pytest.fixture(scope="module")
def tokenizer():
    return WorldTokenizer()


class GatedModel:
    """The model, except that batched steps wait until `release` is set (counting the chats they hold), so
    the test can make every chat queue up behind the first step and the batcher serve them as one batch."""

    def __init__(self, model):
        self.model, self.config, self.device = model, model.config, model.device
        self.release = threading.Event()
        self.held = 0

    def forward(self, tokens, state=None):
        return self.model.forward(tokens, state)

    def decode_batch(self, tokens, state):
        if not self.release.is_set():
            self.held += len(tokens)  # only the batcher's worker calls this
            self.release.wait(timeout=120)
        return self.model.decode_batch(tokens, state)

    def _prepare_state(self, state, batch):
        return self.model._prepare_state(state, batch)


@pytest.mark.parametrize("mode", ["auto", "vectorised", "pipelined"])
def test_batched_chats_write_what_they_write_alone(model, tokenizer, monkeypatch, mode):
    """Six chats with different sampling settings and seeds, answered concurrently through one batcher (the
    second step holds all of them), give exactly the tokens each gets from the engine alone: on the CPU's
    own path, with the batched sampling kernels, and pipelined (sampling rows and penalty counts on the
    device, each step launched before the last one's tokens are judged), as it runs off the CPU."""
    if mode == "vectorised":  # on the CPU the batched kernels are otherwise used only off the CPU; check them too
        monkeypatch.setattr(batching, "sample_batch", functools.partial(sample_batch, vectorised=True))
    chats = [(f"Tell me story number {i}.", GenerationSettings(params, max_new_tokens=14, seed=100 + i))
             for i, params in enumerate(CHAT_PARAMS)]

    def answer(engine, message, settings):
        final = list(engine.reply(ChatSession(), message, settings))[-1]
        return final.session.turns[-1].answer_ids, final.stats.stop_reason

    alone = [answer(ChatEngine(model, tokenizer), *chat) for chat in chats]
    assert sum(len(ids) for ids, _ in alone) > 3 * len(chats)  # the chats really generate
    gated = GatedModel(model)
    got = [None] * len(chats)
    with DecodeBatcher(gated, max_batch=8, pipelined=mode == "pipelined") as batcher:
        engine = ChatEngine(gated, tokenizer, decoder=batcher)
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, answer(engine, *chats[i])))
                   for i in range(len(chats))]
        for t in threads:
            t.start()
        # every chat is now finished, in the first step (waiting at the gate) or queued behind it (to join, or,
        # on the CPU, for its prompt read)
        wait_until(lambda: sum(g is not None for g in got) + gated.held + len(batcher._incoming)
                   + len(batcher._reads) == len(chats))
        gated.release.set()
        for t in threads:
            t.join(timeout=300)
        assert batcher.served > batcher.steps  # several chats shared steps
    assert got == alone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphed_batches_equal_single_decodes(make_checkpoint):
    model = load_model(make_checkpoint("5.2", n_layer=2, n_embd=128, seed=2).path, device="cuda", dtype="fp32",
                       fast=True)
    starts = [model.forward(random_tokens(4 + i, seed=i)) for i in range(5)]
    greedy = SamplingParams(temperature=0)
    alone = []
    for logits, state in starts:
        judge = Recorder(6)
        alone.append((judge, run_chat(DirectDecoder(model), logits, state, Sampler(greedy), judge)))
    got = [None] * 5
    with DecodeBatcher(model) as batcher:
        def chat(i):
            judge = Recorder(6)
            got[i] = (judge, run_chat(batcher, *starts[i], Sampler(greedy), judge))
        run_threads([lambda i=i: chat(i) for i in range(5)])
    for (judge, (_, logits, state)), (ref_judge, (_, ref_logits, ref_state)) in zip(got, alone):
        assert judge.tokens == ref_judge.tokens
        for a, b in zip(judge.logits, ref_judge.logits):
            assert (a - b).abs().max().item() <= 1e-3
        assert (logits - ref_logits).abs().max().item() <= 1e-3
        assert torch.allclose(state.wkv, ref_state.wkv, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------- where the worker's time goes

def test_worker_times_describe_a_window():
    earlier = batching.WorkerTimes(steps=5, rows=20, launch=0.5, wait=0.1, judge=0.2, join=0.1)
    later = batching.WorkerTimes(steps=15, rows=60, launch=0.51, wait=0.12, judge=0.23, join=0.14)
    window = later - earlier
    assert (window.steps, window.rows) == (10, 40)
    assert window.describe(1.0) == ("10 steps in 1.0 s, 40 tokens/s, mean batch 4.0; ms a step 100.0: launching 1.0, "
                                    "waiting for the device 2.0, judges 3.0, joins 4.0, reading prompts 0.0, other "
                                    "90.0")
    reading = batching.WorkerTimes(steps=10, rows=40, launch=0.01, read=0.25, read_tokens=300) - batching.WorkerTimes()
    assert reading.describe(1.0) == ("10 steps in 1.0 s, 40 tokens/s, mean batch 4.0; ms a step 100.0: launching "
                                     "1.0, waiting for the device 0.0, judges 0.0, joins 0.0, reading prompts 25.0, "
                                     "other 74.0; prompts read 300 tokens in 0.2 s")


@pytest.mark.parametrize("pipelined", [False, True], ids=["host", "pipelined"])
def test_the_worker_counts_its_steps_and_times_its_parts(model, pipelined):
    logits, state = model.forward(random_tokens(5, seed=1))
    vocab = model.config.vocab_size
    reports = []
    start = threading.Event()
    begin = time.perf_counter()
    with DecodeBatcher(model, max_batch=4, pipelined=pipelined,
                       report=lambda times, seconds: reports.append((times, seconds)), report_every=0.05) as batcher:
        assert (batcher.times().steps, batcher.times().rows) == (0, 0)

        def chat(i):
            start.wait()
            sampler = Sampler(SamplingParams(temperature=0.0), None, None, range(vocab - 6, vocab))
            run_chat(batcher, logits, state, sampler, Recorder(count=12))
        threads = [threading.Thread(target=chat, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        start.set()
        for t in threads:
            t.join(timeout=300)
        wall = time.perf_counter() - begin
        times = batcher.times()
        assert (times.steps, times.rows) == (batcher.steps, batcher.served)
        # a row for each token drawn; pipelined, a chat's row of the step launched after its last token is wasted
        assert 36 <= times.rows <= (39 if pipelined else 36)
        parts = (times.launch, times.wait, times.judge, times.join)
        assert all(part >= 0 for part in parts) and times.launch > 0 and times.judge > 0
        assert sum(parts) <= wall
        if not pipelined:
            assert times.wait == 0  # nothing is launched ahead on the host loop
        wait_until(lambda: reports)  # a window with steps was reported
        threading.Event().wait(0.15)  # the window holding the last steps is reported by now
        seen = len(reports)
        threading.Event().wait(0.3)  # six report periods with no work: nothing more is reported
        assert len(reports) == seen
    for window, seconds in reports:
        assert window.steps > 0 and seconds >= 0.05
    assert sum(window.steps for window, _ in reports) <= times.steps


def test_a_report_needs_a_positive_period(model):
    with pytest.raises(ValueError, match="report_every must be more than 0 seconds, got 0"):
        DecodeBatcher(model, report=lambda times, seconds: None, report_every=0)


# ------------------------------------------------------------------------------------- prompt reads

class LoggedModel:
    """The model, logging its calls in order (("read", tokens) / ("step", rows)); `gate`, when cleared, holds
    reads until it is set again."""

    def __init__(self, model):
        self.model, self.config, self.device = model, model.config, model.device
        self.calls = []
        self.gate = threading.Event()
        self.gate.set()
        self.reading = threading.Event()  # set when a read has begun

    def forward(self, tokens, state=None):
        self.calls.append(("read", len(tokens)))
        self.reading.set()
        self.gate.wait(timeout=120)
        return self.model.forward(tokens, state)

    def decode_batch(self, tokens, state):
        self.calls.append(("step", len(tokens)))
        return self.model.decode_batch(tokens, state)

    def _prepare_state(self, state, batch):
        return self.model._prepare_state(state, batch)


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"], ids=lambda v: f"v{v}")
@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_the_cpu_worker_reads_prompts_between_steps_with_the_bits_of_a_whole_read(make_checkpoint, version, dtype):
    """While a chat generates, the CPU batcher's worker reads a long prompt READ_CHUNK tokens at a time with a
    batched step between two pieces (the chat keeps streaming), no piece shorter than READ_CHUNK; prompts read
    alone go in one call; every read gives the logits and state of model.forward over the whole prompt, bit for
    bit, from an empty state or a carried one."""
    model = load_model(make_checkpoint(version, n_layer=2, n_embd=128, seed=3).path, device="cpu", dtype=dtype,
                       fast=True)
    logged = LoggedModel(model)
    chunk = batching.READ_CHUNK
    lengths = [1, 5, 2 * chunk - 1, 2 * chunk + 3, 4 * chunk + 17]
    prompts = [random_tokens(n, seed=n) for n in lengths]
    carried = model.forward(random_tokens(9, seed=99))[1]
    expected = [model.forward(ids, state) for ids in prompts for state in (None, carried)]
    with DecodeBatcher(logged, max_batch=4, pipelined=False) as batcher:
        alone = [batcher.read(ids, state) for ids in prompts for state in (None, carried)]
        assert [call for call in logged.calls if call[0] == "read"] == [("read", n) for n in lengths for _ in "ab"]
        logged.calls.clear()
        start_logits, start_state = model.forward(random_tokens(4, seed=1))
        vocab = model.config.vocab_size
        chat = batcher.generate(start_logits, start_state, Sampler(SamplingParams(temperature=1.0),
                                                                   torch.Generator().manual_seed(0), None,
                                                                   range(vocab - 6, vocab)), Recorder(10_000))
        items = iter(chat)
        next(items)  # the chat is generating
        beside = [batcher.read(ids, state) for ids in prompts for state in (None, carried)]
        items.close()  # the reader leaves: the worker drops the chat
    for (logits, state), (ref_logits, ref_state) in zip(alone + beside, expected + expected):
        assert torch.equal(logits, ref_logits)
        assert torch.equal(state.shift, ref_state.shift) and torch.equal(state.wkv, ref_state.wkv)
    reads = [n for kind, n in logged.calls if kind == "read"]
    assert all(chunk <= n < 2 * chunk for n in reads if n >= chunk)
    assert reads.count(chunk) >= 2 * (1 + 3)  # the two longest prompts, each read twice, came in pieces
    # between two pieces of one prompt the worker ran a step of the chat
    for earlier, later in zip(logged.calls, logged.calls[1:]):
        if earlier == ("read", chunk):
            assert later[0] == "step"
    assert batcher.times().read_tokens == 4 * sum(lengths)


def test_a_bad_read_fails_in_its_caller_and_closing_ends_the_reads_still_queued(model):
    logged = LoggedModel(model)
    batcher = DecodeBatcher(logged, pipelined=False)
    with pytest.raises(ValueError, match="at least one token"):
        batcher.read([])
    with pytest.raises(ValueError, match="token ids must be in"):
        batcher.read([1, model.config.vocab_size])
    logits, state = batcher.read([1, 2, 3])  # the batcher goes on reading
    assert torch.equal(logits, model.forward([1, 2, 3])[0])
    logged.gate.clear()
    logged.reading.clear()
    results = {}

    def read(name):
        try:
            results[name] = batcher.read([4, 5])
        except BatcherClosed as error:
            results[name] = error
    first = threading.Thread(target=read, args=("first",))
    first.start()
    assert logged.reading.wait(timeout=60)  # the worker is inside the first read
    second = threading.Thread(target=read, args=("second",))
    second.start()
    wait_until(lambda: len(batcher._reads) == 2)
    closing = threading.Thread(target=batcher.close)
    closing.start()
    wait_until(lambda: batcher._closed)
    logged.gate.set()
    for t in (first, second, closing):
        t.join(timeout=60)
    assert torch.equal(results["first"][0], model.forward([4, 5])[0])  # the read under way finished
    assert isinstance(results["second"], BatcherClosed)  # the one still queued was ended
    with pytest.raises(BatcherClosed):
        batcher.read([1])


def test_direct_and_pipelined_reads_are_the_models_forward(model):
    ids = random_tokens(40, seed=5)
    expected = model.forward(ids)
    for decoder in (DirectDecoder(model), DecodeBatcher(model, pipelined=True)):
        logits, state = decoder.read(ids)
        assert torch.equal(logits, expected[0]) and torch.equal(state.wkv, expected[1].wkv)
        if isinstance(decoder, DecodeBatcher):
            decoder.close()
