"""DecodeBatcher: concurrent single-token requests served by batched model calls, equal to unbatched decoding."""

from __future__ import annotations

import threading

import pytest
import torch

from rwkv_chat import load_model
from rwkv_chat.batching import BatcherClosed, DecodeBatcher
from rwkv_chat.state import RwkvState
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


def test_waiting_requests_are_grouped_and_rows_go_back_to_their_callers():
    model = SlowModel()
    results = {}
    with DecodeBatcher(model, max_batch=8) as batcher:
        first = threading.Thread(target=lambda: results.setdefault(0, batcher.decode(0, tiny_state(0))))
        first.start()  # occupies the worker until released
        while getattr(model, "entered", 0) < 1:
            threading.Event().wait(0.01)
        others = [threading.Thread(target=lambda i=i: results.setdefault(i, batcher.decode(i, tiny_state(i))))
                  for i in range(1, 6)]
        for t in others:
            t.start()
        while len(batcher._pending) < 5:  # all five are queued behind the first call
            threading.Event().wait(0.01)
        model.release.set()
        for t in [first] + others:
            t.join(timeout=60)
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
