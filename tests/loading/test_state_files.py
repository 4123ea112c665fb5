"""State files: read and checked, started from exactly as the reference starts from them (RWKV-5/6: the `rwkv`
package reads `blocks.N.att.time_state` merged into the model file; RWKV-7: its RWKV_x070 given that memory),
offered only to the models they fit, and kept apart in the prefix cache."""

from __future__ import annotations

import pickle

import pytest
import torch

from rwkv_chat import load_model
from rwkv_chat.loading.state_files import StateFileError, parse_state_specs, read_state_file
from rwkv_chat.serving.engine import ChatEngine, GenerationSettings
from rwkv_chat.serving.sampling import SamplingParams
from rwkv_chat.serving.session import ChatSession
from rwkv_chat.tokenizer import WorldTokenizer
from checkpoints import make_state_dict, save_pth
from reference import random_tokens, reference_run
from reference_v7 import reference_v7_logits

GREEDY = SamplingParams(temperature=0.0, presence_penalty=0.0, frequency_penalty=0.0)


def state_tensors(n_layer: int, n_head: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"blocks.{i}.att.time_state": torch.randn(n_head, size, size, generator=gen) * 0.5
            for i in range(n_layer)}


@pytest.mark.parametrize("version", ["5.2", "6", "7"])
def test_a_chat_starts_from_the_state_exactly_as_the_reference_does(version, tmp_path):
    weights = make_state_dict(version, n_layer=2, n_embd=128, seed=3)
    model_path = save_pth(weights, tmp_path / "model.pth")
    states = state_tensors(2, 2, 64, seed=5)
    state_file = read_state_file("persona", save_pth(states, tmp_path / "persona.pth"))
    model = load_model(model_path, device="cpu", dtype="fp32")
    assert state_file.fits(model.config)
    tokens = random_tokens(40, seed=2)
    ours, _ = model.forward(tokens, state_file.initial_state(model.config, "cpu"))
    if version == "7":
        expected = reference_v7_logits(model_path, tokens, [], torch.stack(list(states.values())))[0]
    else:  # the reference starts from time_state keys found in the model file, transposed (1, 2)
        expected, _ = reference_run(save_pth({**weights, **states}, tmp_path / "merged.pth"), tokens)
    plain, _ = model.forward(tokens)
    assert (plain - expected).abs().max().item() > 0.1  # the state matters
    assert (ours - expected).abs().max().item() <= 1e-3


def test_a_state_file_fits_only_models_of_its_shape(make_checkpoint, tmp_path):
    state_file = read_state_file("two", save_pth(state_tensors(2, 2, 64, seed=1), tmp_path / "s.pth"))
    fits = load_model(make_checkpoint("5.2", n_layer=2, n_embd=128).path, device="cpu").config
    deeper = load_model(make_checkpoint("5.2", n_layer=3, n_embd=128).path, device="cpu").config
    rwkv4 = load_model(make_checkpoint("4", n_layer=2, n_embd=128).path, device="cpu").config
    assert state_file.fits(fits) and not state_file.fits(deeper) and not state_file.fits(rwkv4)
    with pytest.raises(StateFileError, match="2 layers and 2 heads of 64; this model has 3 layers"):
        state_file.initial_state(deeper, "cpu")
    with pytest.raises(StateFileError, match="RWKV-4 has no per-head state"):
        state_file.initial_state(rwkv4, "cpu")


def test_bad_state_files_and_settings_are_refused_with_reasons(tmp_path):
    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(StateFileError, match="cannot read state file"):
        read_state_file("evil", tmp_path / "evil.pth")
    with pytest.raises(StateFileError, match="cannot read state file"):
        read_state_file("missing", tmp_path / "missing.pth")
    with pytest.raises(StateFileError, match="is not a blocks.N.att.time_state"):
        read_state_file("model", save_pth(make_state_dict("5.2", 2, 128), tmp_path / "model.pth"))
    gap = state_tensors(3, 2, 64, seed=1)
    del gap["blocks.1.att.time_state"]
    with pytest.raises(StateFileError, match=r"layers 0..L-1; it has layers \[0, 2\]"):
        read_state_file("gap", save_pth(gap, tmp_path / "gap.pth"))
    good = save_pth(state_tensors(2, 2, 64, seed=1), tmp_path / "good.pth")
    with pytest.raises(StateFileError, match="NAME=PATH"):
        parse_state_specs([str(good)])
    with pytest.raises(StateFileError, match="two state files are called 'a'"):
        parse_state_specs([f"a={good}", f"a={good}"])
    with pytest.raises(StateFileError, match="must be 1-64 letters"):
        parse_state_specs([f"<b>={good}"])
    assert [f.name for f in parse_state_specs([f"Helpful cat={good}", f"b={good}"])] == ["Helpful cat", "b"]


def test_the_engine_starts_sessions_from_their_state_and_keeps_states_apart_in_the_cache(tmp_path):
    path = save_pth(make_state_dict("7", n_layer=2, n_embd=128, seed=3), tmp_path / "model.pth")
    model = load_model(path, device="cpu", dtype="fp32")
    tokenizer = WorldTokenizer()
    engine = ChatEngine(model, tokenizer)
    a = read_state_file("a", save_pth(state_tensors(2, 2, 64, seed=1), tmp_path / "a.pth"))
    b = read_state_file("b", save_pth(state_tensors(2, 2, 64, seed=2), tmp_path / "b.pth"))
    for state_file in (a, b):
        engine.add_start_state(state_file.name, state_file.initial_state(model.config, model.device))
    assert engine.start_states == ("a", "b")
    settings = GenerationSettings(GREEDY, 5)
    replies = {}
    for name in ("a", "b", None, "a"):
        session = ChatSession(start_state=name)
        final = list(engine.reply(session, "Hello", settings))[-1]
        replies.setdefault(name, []).append(final)
    prompt = ChatSession().prompt_ids(tokenizer, "Hello")
    assert replies["a"][0].stats.prefill_tokens == len(prompt)  # the pseudo-token of the state is never read
    assert replies["a"][1].stats.prefill_tokens == 0  # the same start state and prompt: cached
    assert replies["b"][0].stats.prefill_tokens == len(prompt)  # another state shares nothing with it
    expected, _ = model.forward(list(prompt), a.initial_state(model.config, "cpu"))
    assert replies["a"][0].session.turns[0].answer_ids[0] == int(expected.argmax())
    with pytest.raises(ValueError, match="start state 'c' is not offered for this model \\(it offers: 'a', 'b'\\)"):
        engine.reply(ChatSession(start_state="c"), "Hello", settings)
