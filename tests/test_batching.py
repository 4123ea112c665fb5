"""DecodeBatcher: concurrent single-token requests served by batched model calls, equal to unbatched decoding;
batched sampling gives every chat the tokens it gets alone."""

from __future__ import annotations

import functools
import threading

import pytest
import torch

from rwkv_chat import batching, load_model
from rwkv_chat.batching import BatcherClosed, DecodeBatcher
from rwkv_chat.engine import ChatEngine, GenerationSettings
from rwkv_chat.sampling import Sampler, SamplingParams, sample_batch
from rwkv_chat.session import ChatSession
from rwkv_chat.state import RwkvState
from rwkv_chat.tokenizer import WorldTokenizer
from reference import random_tokens


@pytest.fixture(scope="module", params=["4", "5.2"], ids=lambda v: f"v{v}")
def model(request, make_checkpoint):
    return load_model(make_checkpoint(request.param, n_layer=2, n_embd=128, seed=2).path, dtype="fp32")


def run_threads(targets):
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)


def test_concurrent_chats_get_what_they_get_alone(model):
    """Chats of different lengths join and leave; every step equals the unbatched step."""
    n_chats = 6
    prompts = [random_tokens(5 + i, seed=i) for i in range(n_chats)]
    plans = [random_tokens(3 + 2 * i, seed=100 + i) for i in range(n_chats)]  # 3..13 steps: chats leave early
    starts = [model.forward(p)[1] for p in prompts]
    expected = []
    for state, plan in zip(starts, plans):
        rows = []
        for token in plan:
            logits, state = model.forward([token], state)
            rows.append((logits, state))
        expected.append(rows)
    got = [[] for _ in range(n_chats)]
    with DecodeBatcher(model, max_batch=4) as batcher:
        def chat(i):
            state = starts[i]
            for token in plans[i]:
                logits, state = batcher.decode(token, state)
                got[i].append((logits, state))
        run_threads([lambda i=i: chat(i) for i in range(n_chats)])
        assert batcher.served == sum(len(p) for p in plans)
    for rows, want in zip(got, expected):
        assert len(rows) == len(want)
        for (logits, state), (ref_logits, ref_state) in zip(rows, want):
            assert logits.shape == ref_logits.shape and logits.dtype == torch.float32
            assert (logits - ref_logits).abs().max().item() <= 1e-4  # fp32 rounding of batched products
            assert state.batch_size == 1
            assert torch.allclose(state.wkv, ref_state.wkv, rtol=1e-4, atol=1e-4)
            assert torch.allclose(state.shift, ref_state.shift, atol=1e-4)


def test_states_passed_in_are_not_changed(model):
    _, state = model.forward(random_tokens(8, seed=1))
    before = state.clone()
    with DecodeBatcher(model) as batcher:
        run_threads([lambda: batcher.decode(3, state) for _ in range(4)])
    assert state.equal(before)


class SlowModel:
    """A stand-in model: records batch sizes; decode_batch waits until released so requests pile up."""

    class config:
        vocab_size = 100

    device = torch.device("cpu")

    def __init__(self, fail: bool = False):
        self.batches = []
        self.release = threading.Event()
        self.fail = fail

    def _answer(self, tokens, state):
        self.entered = getattr(self, "entered", 0) + len(tokens)
        self.threads = getattr(self, "threads", []) + [threading.current_thread().name]
        self.release.wait(timeout=60)
        self.batches.append(len(tokens))
        if self.fail:
            raise RuntimeError("kernel exploded")
        logits = torch.nn.functional.one_hot(torch.as_tensor(tokens), 100).float()
        return logits, RwkvState(state.shift + 1, state.wkv)

    def forward(self, tokens, state):
        logits, state = self._answer(list(tokens), state)
        return logits[0], state

    def decode_batch(self, tokens, state):
        return self._answer(tokens.tolist(), state)


def tiny_state(value: float = 0.0) -> RwkvState:
    return RwkvState(torch.full((1, 1, 2, 4), value), torch.zeros(1, 1, 3, 4))


def run_queued_behind_a_blocked_call(model: SlowModel, batcher: DecodeBatcher, first, others) -> None:
    """Start `first` and wait until it occupies the (SlowModel) model, start `others` and wait until all of
    them are queued behind it, then release the model and wait for every call to finish."""
    head = threading.Thread(target=first)
    head.start()
    while getattr(model, "entered", 0) < 1:
        threading.Event().wait(0.01)
    rest = [threading.Thread(target=target) for target in others]
    for t in rest:
        t.start()
    while len(batcher._pending) < len(rest):
        threading.Event().wait(0.01)
    model.release.set()
    for t in [head] + rest:
        t.join(timeout=60)


def test_waiting_requests_are_grouped_and_rows_go_back_to_their_callers():
    model = SlowModel()
    results = {}
    with DecodeBatcher(model, max_batch=8) as batcher:
        def call(i):
            return lambda: results.setdefault(i, batcher.decode(i, tiny_state(i)))
        run_queued_behind_a_blocked_call(model, batcher, call(0), [call(i) for i in range(1, 6)])
    assert model.batches == [1, 5]
    for i in range(6):
        logits, state = results[i]
        assert int(logits.argmax()) == i  # each caller got its own row
        assert state.shift.flatten()[0].item() == i + 1


def test_a_failing_step_raises_in_every_caller_of_that_step():
    model = SlowModel(fail=True)
    model.release.set()
    errors = []
    with DecodeBatcher(model) as batcher:
        def call(i):
            try:
                batcher.decode(i, tiny_state())
            except RuntimeError as error:
                errors.append(str(error))
        run_threads([lambda i=i: call(i) for i in range(4)])
    assert errors == ["kernel exploded"] * 4


def test_bad_requests_fail_alone_at_once(model):
    with DecodeBatcher(model) as batcher:
        with pytest.raises(ValueError, match="token ids"):
            batcher.decode(70000, model.zero_state())
        with pytest.raises(ValueError, match="one sequence"):
            batcher.decode(1, model.zero_state(batch=2))
        logits, _ = batcher.decode(1, model.zero_state())  # the batcher still serves
        assert logits.shape == (model.config.vocab_size,)


def test_close_serves_the_queue_then_refuses():
    model = SlowModel()
    batcher = DecodeBatcher(model)
    done = []
    callers = [threading.Thread(target=lambda: done.append(batcher.decode(1, tiny_state()))) for _ in range(3)]
    for t in callers:
        t.start()
    while len(batcher._pending) + getattr(model, "entered", 0) < 3:  # all three submitted
        threading.Event().wait(0.01)
    closer = threading.Thread(target=batcher.close)
    closer.start()
    model.release.set()
    for t in callers + [closer]:
        t.join(timeout=60)
    assert len(done) == 3
    with pytest.raises(BatcherClosed):
        batcher.decode(1, tiny_state())


def test_a_lone_chat_does_not_wait_for_company():
    """With an absurd window, a single caller's steps still complete at once, and run in the caller's own
    thread (no hand-over to the worker and back)."""
    model = SlowModel()
    model.release.set()
    with DecodeBatcher(model, window_s=600.0) as batcher:
        finished = threading.Event()

        def chat():
            for i in range(5):
                batcher.decode(i, tiny_state())
            finished.set()
        t = threading.Thread(target=chat, name="lone-chat", daemon=True)
        t.start()
        assert finished.wait(timeout=120)
    assert model.batches == [1] * 5
    assert model.threads == ["lone-chat"] * 5


def test_step_samples_each_row_with_its_own_sampler_and_a_bad_row_fails_alone():
    """One-hot logits at the token fed: greedy and narrow-nucleus samplers both give that token back."""
    model = SlowModel()
    results, errors = {}, {}
    narrow = SamplingParams(temperature=1.0, top_p=0.02)  # the top token alone holds e / (e + 99) > 0.02

    def call(i, sampler):
        try:
            results[i] = batcher.step(i, tiny_state(i), sampler) if sampler else batcher.decode(i, tiny_state(i))
        except ValueError as error:
            errors[i] = str(error)
    samplers = {0: Sampler(narrow), 1: Sampler(SamplingParams(temperature=0)), 2: None,
                3: Sampler(narrow, torch.Generator().manual_seed(3)), 4: Sampler(narrow, ban_tokens=range(100))}
    with DecodeBatcher(model, max_batch=8) as batcher:
        run_queued_behind_a_blocked_call(model, batcher, lambda: call(0, samplers[0]),
                                         [lambda i=i: call(i, samplers[i]) for i in range(1, 5)])
    assert model.batches == [1, 4, 2]  # then the look-ahead of the two chats sampled for without error
    assert model.threads[0] != "rwkv-decode-batcher" and model.threads[1] == "rwkv-decode-batcher"
    for i in (0, 1, 3):
        token, logits, state = results[i]
        assert token == i and int(logits.argmax()) == i and state.shift.flatten()[0].item() == i + 1
    assert int(results[2][0].argmax()) == 2  # a plain decode in the same batch
    assert list(errors) == [4] and "banned" in errors[4]


def test_the_next_step_is_computed_while_the_chats_are_away_and_used_only_if_it_matches():
    """Three chats queue behind a blocked one; after their batch the worker feeds each one's drawn token at
    once. Chats that feed exactly that token get the precomputed step; one that feeds another token gets a
    fresh step for it. Either way every result equals plain decoding (SlowModel: logits one-hot at the
    token fed, shift + 1 per step; greedy sampling draws the token just fed)."""
    model = SlowModel()
    results = {}

    def chat(i, tokens):
        sampler, state, got = Sampler(SamplingParams(temperature=0)), tiny_state(10 * i), []
        for token in tokens:
            drawn, logits, state = batcher.step(token, state, sampler)
            got.append((drawn, int(logits.argmax()), state.shift.flatten()[0].item()))
        results[i] = got
    plans = {0: [0, 0], 1: [1, 1, 1], 2: [2, 2, 2], 3: [3, 7, 7]}  # chat 3 switches to another token
    with DecodeBatcher(model, max_batch=8) as batcher:
        run_queued_behind_a_blocked_call(model, batcher, lambda: chat(0, plans[0]),
                                         [lambda i=i: chat(i, plans[i]) for i in (1, 2, 3)])
        used = batcher.ahead_used
    for i, plan in plans.items():
        assert results[i] == [(t, t, 10 * i + n + 1) for n, t in enumerate(plan)]
    assert used >= 2  # chats 1 and 2 at least once each; chat 3's look-ahead (token 3) was not used for 7


def test_a_lone_chat_samples_in_its_own_thread():
    model = SlowModel()
    model.release.set()
    with DecodeBatcher(model, window_s=600.0) as batcher:
        tokens = []

        def chat():
            sampler = Sampler(SamplingParams(temperature=0))
            for i in range(5):
                tokens.append(batcher.step(i, tiny_state(), sampler)[0])
        t = threading.Thread(target=chat, name="lone-chat", daemon=True)
        t.start()
        t.join(timeout=120)
    assert tokens == list(range(5))
    assert model.threads == ["lone-chat"] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return WorldTokenizer()


class GatedModel:
    """The model, except that one-token reads wait until `release` is set (counting who waits), so the test
    can make every chat queue up behind the first one and the batcher serve them as one batch."""

    def __init__(self, model):
        self.model, self.config, self.device = model, model.config, model.device
        self.release = threading.Event()
        self.waiting = 0
        self._lock = threading.Lock()

    def forward(self, tokens, state=None):
        if len(tokens) == 1 and not self.release.is_set():
            with self._lock:
                self.waiting += 1
            self.release.wait(timeout=120)
        return self.model.forward(tokens, state)

    def decode_batch(self, tokens, state):
        return self.model.decode_batch(tokens, state)

    def _prepare_state(self, state, batch):
        return self.model._prepare_state(state, batch)


CHAT_SETTINGS = [
    SamplingParams(),  # the chat defaults: T 1, top_p 0.3, penalties 0.4 / 0.4 / 0.996
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.3, top_p=0.9, top_k=40, presence_penalty=1.0, frequency_penalty=0.2),
    SamplingParams(temperature=0.6, top_p=1.0, top_k=0),
    SamplingParams(temperature=1.0, top_p=0.6, top_k=5, penalty_decay=0.9),
    SamplingParams(temperature=2.0, top_p=0.95, presence_penalty=0.0, frequency_penalty=0.0),
]


@pytest.mark.parametrize("vectorised", [False, True], ids=["auto", "vectorised"])
def test_batched_chats_write_what_they_write_alone(model, tokenizer, monkeypatch, vectorised):
    """Six chats with different sampling settings and seeds, answered concurrently through one batcher (the
    first batch holds all of them), give exactly the tokens each gets from the engine alone."""
    if vectorised:  # on the CPU the batched kernels are otherwise used only off the CPU; check them here too
        monkeypatch.setattr(batching, "sample_batch", functools.partial(sample_batch, vectorised=True))
    chats = [(f"Tell me story number {i}.", GenerationSettings(params, max_new_tokens=14, seed=100 + i))
             for i, params in enumerate(CHAT_SETTINGS)]

    def answer(engine, message, settings):
        final = list(engine.reply(ChatSession(), message, settings))[-1]
        return final.session.turns[-1].answer_ids, final.stats.stop_reason

    alone = [answer(ChatEngine(model, tokenizer), *chat) for chat in chats]
    assert sum(len(ids) for ids, _ in alone) > 3 * len(chats)  # the chats really generate
    gated = GatedModel(model)
    got = [None] * len(chats)
    with DecodeBatcher(gated, max_batch=8) as batcher:
        engine = ChatEngine(gated, tokenizer, decoder=batcher)
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, answer(engine, *chats[i])))
                   for i in range(len(chats))]
        for t in threads:
            t.start()
        # every chat is now finished, waiting at the gate (the first step, or a separator's extra token) or
        # queued behind the first one
        while sum(g is not None for g in got) + gated.waiting + len(batcher._pending) < len(chats):
            threading.Event().wait(0.01)
        gated.release.set()
        for t in threads:
            t.join(timeout=300)
        assert batcher.served > batcher.steps  # several chats shared steps
    assert got == alone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphed_batches_equal_single_decodes(make_checkpoint):
    model = load_model(make_checkpoint("5.2", n_layer=2, n_embd=128, seed=2).path, device="cuda", dtype="fp32",
                       fast=True)
    starts = [model.forward(random_tokens(4 + i, seed=i))[1] for i in range(5)]
    plans = [random_tokens(6, seed=50 + i) for i in range(5)]
    expected = []
    for state, plan in zip(starts, plans):
        for token in plan:
            logits, state = model.forward([token], state)
        expected.append((logits, state))
    got = [None] * 5
    with DecodeBatcher(model) as batcher:
        def chat(i):
            state = starts[i]
            for token in plans[i]:
                logits, state = batcher.decode(token, state)
            got[i] = (logits, state)
        run_threads([lambda i=i: chat(i) for i in range(5)])
    for (logits, state), (ref_logits, ref_state) in zip(got, expected):
        assert (logits - ref_logits).abs().max().item() <= 1e-3
        assert torch.allclose(state.wkv, ref_state.wkv, rtol=1e-3, atol=1e-3)
