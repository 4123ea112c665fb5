"""RWKV-6 and RWKV-7 in the transformers wing: the converter, the Auto classes (no remote code), generation, the
cache, and the published HF layouts (RWKV/v6-Finch-*-HF, fla-hub/rwkv7-*), on tiny random checkpoints.

Oracles: `load_model(pth)` on the original file (itself checked against the `rwkv` package in
tests/models/test_rwkv6_rwkv7.py), and the `rwkv` package directly for the first logits (RWKV-6 in process,
RWKV-7 through RWKV_x070 in a subprocess).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from checkpoints import RANDOM_LORA, hf_state_dict, make_state_dict, save_fla_rwkv7, save_hf_rwkv6, save_pth
from hf_helpers import PROMPT, converted_dir, register_hf
from reference import reference_run
from reference_v7 import reference_v7_logits

register_hf()

from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline  # noqa: E402

from rwkv_chat import load_model  # noqa: E402
from rwkv_chat.hf.config import Rwkv6WorldConfig, Rwkv7WorldConfig, fit_config_to_weights  # noqa: E402
from rwkv_chat.hf.model import CACHE_NAME, RwkvCache, Rwkv6WorldForCausalLM, Rwkv7WorldForCausalLM  # noqa: E402
from rwkv_chat.loading.loader import read_hf_dir  # noqa: E402

VERSIONS = ["6", "7"]
MODEL_CLASSES = {"6": Rwkv6WorldForCausalLM, "7": Rwkv7WorldForCausalLM}
MODEL_TYPES = {"6": "rwkv6_world", "7": "rwkv7_world"}
TOKENS = [33155, 40213, 45, 32234, 4600, 11, 261, 0, 65535]
_loaded: dict = {}


@pytest.fixture
def converted(request, checkpoint_factory):
    """(checkpoint, directory, HF model, tokenizer, load_model of the .pth) for the test's `version`, once per module."""
    version = request.node.callspec.params["version"]
    if version not in _loaded:
        checkpoint, out_dir = converted_dir(checkpoint_factory, version)
        _loaded[version] = (checkpoint, out_dir, AutoModelForCausalLM.from_pretrained(out_dir),
                            AutoTokenizer.from_pretrained(out_dir),
                            load_model(checkpoint.path, device="cpu", dtype="fp32"))
    return _loaded[version]


def prompt_ids(tokenizer, text: str = PROMPT) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids


def greedy(model, prompt: list[int], count: int) -> list[int]:
    """`load_model`'s greedy continuation: argmax, feed it back, `count` times."""
    logits, state = model.forward(prompt)
    tokens = []
    for _ in range(count):
        tokens.append(int(torch.argmax(logits)))
        logits, state = model.forward([tokens[-1]], state)
    return tokens


def all_logits(model, tokens: list[int]) -> torch.Tensor:
    return model.forward(tokens, all_logits=True)[0]


# ------------------------------------------------------------------------------------ converted directories

@pytest.mark.parametrize("version", VERSIONS)
def test_auto_classes_load_the_converted_directory_without_remote_code(version, converted):
    checkpoint, out_dir, model, tokenizer, _ = converted
    assert type(model) is MODEL_CLASSES[version]
    assert type(tokenizer).__name__ == "RwkvWorldTokenizer"
    config = json.loads((out_dir / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPES[version] and config["rwkv_version"] == version
    assert "auto_map" not in config
    assert model.config.lora() == RANDOM_LORA[version] and model.config.head_size == checkpoint.head_size
    assert model.config.num_hidden_layers == checkpoint.n_layer and model.config.hidden_size == checkpoint.n_embd


@pytest.mark.parametrize("version", VERSIONS)
def test_fp32_logits_equal_load_model_of_the_pth(version, converted):
    _, _, model, tokenizer, original = converted
    ids = prompt_ids(tokenizer)
    logits = model(ids).logits[0]
    expected = all_logits(original, ids[0].tolist())
    assert logits.shape == expected.shape and expected.abs().max() > 5
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("version", VERSIONS)
def test_last_logits_equal_the_reference_package(version, converted):
    checkpoint, _, model, _, _ = converted
    if version == "6":
        expected, _ = reference_run(checkpoint.oracle_pth, TOKENS)
    else:
        expected = reference_v7_logits(checkpoint.oracle_pth, TOKENS, [])[0]
    logits = model(torch.tensor([TOKENS])).logits[0, -1]
    assert (logits - expected).abs().max().item() <= 1e-3  # the reference's own fp32 path (as in tests/models)


@pytest.mark.parametrize("version", VERSIONS)
def test_greedy_generate_equals_the_greedy_continuation_of_load_model(version, converted):
    _, _, model, tokenizer, original = converted
    ids = prompt_ids(tokenizer)
    output = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert output[0, :ids.shape[1]].tolist() == ids[0].tolist()
    assert output[0, ids.shape[1]:].tolist() == greedy(original, ids[0].tolist(), 8)


# a new prompt on top of a returned cache: tests/hf/test_hf_model.py, parametrized over these versions too


@pytest.mark.parametrize("version", VERSIONS)
def test_generate_from_a_state_reads_only_the_new_tokens(version, converted):
    _, _, model, tokenizer, original = converted
    preamble, question = prompt_ids(tokenizer, "You are helpful.\n\n"), prompt_ids(tokenizer)
    state = model(preamble).state
    on_state = model.generate(question, **{CACHE_NAME: RwkvCache(state)}, max_new_tokens=6, do_sample=False)
    whole = torch.cat([preamble, question], dim=1)
    assert on_state[0, question.shape[1]:].tolist() == greedy(original, whole[0].tolist(), 6)
    # the state is load_model's own: the same numbers after the same tokens
    _, expected_state = original.forward(preamble[0].tolist())
    torch.testing.assert_close(state.wkv, expected_state.wkv, atol=1e-5, rtol=1e-5)


def test_bf16_rwkv7_keeps_everything_but_the_projections_in_fp32(checkpoint_factory):
    checkpoint, out_dir = converted_dir(checkpoint_factory, "7", dtype="bf16")
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    params = dict(model.named_parameters())
    for name in ("rwkv.blocks.1.attention.key.weight", "rwkv.blocks.1.feed_forward.value.weight", "head.weight"):
        assert params[name].dtype == torch.bfloat16, name
    for name in ("rwkv.blocks.1.attention.w1", "rwkv.blocks.1.attention.v2", "rwkv.blocks.1.attention.x_g",
                 "rwkv.blocks.1.attention.k_k", "rwkv.blocks.1.attention.r_k", "rwkv.blocks.1.feed_forward.x_k",
                 "rwkv.blocks.0.pre_ln.weight", "rwkv.embeddings.weight", "rwkv.ln_out.weight"):
        assert params[name].dtype == torch.float32, name
    ids = torch.tensor([TOKENS])
    same_math = all_logits(load_model(checkpoint.path, device="cpu", dtype=torch.bfloat16, fast=False), TOKENS)
    torch.testing.assert_close(model(ids).logits[0], same_math, atol=1e-4, rtol=1e-4)


def test_text_generation_pipeline_continues_greedily(checkpoint_factory):
    checkpoint, out_dir = converted_dir(checkpoint_factory, "7")
    generator = pipeline("text-generation", model=str(out_dir), device="cpu")
    tokenizer = generator.tokenizer
    original = load_model(checkpoint.path, device="cpu", dtype="fp32")
    expected = greedy(original, tokenizer.encode(PROMPT), 8)
    result = generator(PROMPT, max_new_tokens=8, do_sample=False)
    assert result[0]["generated_text"] == PROMPT + tokenizer.decode(expected)


# ------------------------------------------------------------------------------------ published layouts

@pytest.fixture(scope="module")
def v7_with_first_layer_value_lora(tmp_path_factory):
    """An RWKV-7 .pth whose layer 0 carries v0/v1/v2 (unused; some files have them)."""
    weights = make_state_dict("7", 2, 128, seed=3, v7_v_in_first_layer=True)
    return weights, save_pth(weights, tmp_path_factory.mktemp("fla") / "v7-first-layer-v.pth")


@pytest.mark.parametrize("stacked_mixes", [False, True], ids=["x_r..x_g", "x_x"])
def test_fla_rwkv7_directory_loads_like_its_pth(v7_with_first_layer_value_lora, tmp_path, stacked_mixes):
    weights, pth = v7_with_first_layer_value_lora
    directory = save_fla_rwkv7(weights, tmp_path / "fla", stacked_mixes=stacked_mixes)
    # back to the original names, shapes and values (LoRAs transposed back, biases split into w0/a0/v0)
    restored = read_hf_dir(directory)
    assert sorted(restored) == sorted(weights)
    for key, tensor in weights.items():
        assert restored[key].shape == tensor.shape and torch.equal(restored[key], tensor), key
    expected = all_logits(load_model(pth, device="cpu", dtype="fp32"), TOKENS)
    torch.testing.assert_close(all_logits(load_model(directory, device="cpu", dtype="fp32"), TOKENS), expected,
                               atol=0, rtol=0)


def test_convert_command_turns_an_fla_directory_into_an_rwkv7_world_directory(v7_with_first_layer_value_lora,
                                                                              tmp_path):
    weights, pth = v7_with_first_layer_value_lora
    source = save_fla_rwkv7(weights, tmp_path / "fla")
    out_dir = tmp_path / "converted"
    result = subprocess.run([sys.executable, "-m", "rwkv_chat.hf.convert", str(source), str(out_dir)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads((out_dir / "config.json").read_text())["model_type"] == "rwkv7_world"
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert type(model) is Rwkv7WorldForCausalLM and "rwkv.blocks.0.attention.v1" not in model.state_dict()
    expected = all_logits(load_model(pth, device="cpu", dtype="fp32"), TOKENS)
    torch.testing.assert_close(model(torch.tensor([TOKENS])).logits[0], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt, shards", [("bin", 1), ("safetensors", 2)])
def test_finch_hf_directory_loads_through_load_model_and_the_auto_classes(checkpoint_factory, tmp_path, fmt, shards):
    checkpoint = checkpoint_factory.make("6", n_layer=2, n_embd=128)
    directory = save_hf_rwkv6(checkpoint.state_dict(), tmp_path / "finch", fmt=fmt, shards=shards)
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "rwkv6" and "auto_map" in config  # remote code is referenced, and ignored
    expected = all_logits(load_model(checkpoint.path, device="cpu", dtype="fp32"), TOKENS)
    torch.testing.assert_close(all_logits(load_model(directory, device="cpu", dtype="fp32"), TOKENS), expected,
                               atol=0, rtol=0)
    model = AutoModelForCausalLM.from_pretrained(directory)  # no trust_remote_code anywhere
    assert type(model) is Rwkv6WorldForCausalLM and not hasattr(model.config, "auto_map")
    assert model.config.lora() == RANDOM_LORA["6"]  # not in config.json: read from the weights
    assert type(AutoTokenizer.from_pretrained(directory)).__name__ == "RwkvWorldTokenizer"
    torch.testing.assert_close(model(torch.tensor([TOKENS])).logits[0], expected, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------ configurations

def test_fit_config_refuses_weights_of_another_family():
    shapes = {key: tuple(tensor.shape) for key, tensor in hf_state_dict(make_state_dict("7", 2, 64)).items()}
    with pytest.raises(ValueError, match="RWKV-7"):
        fit_config_to_weights(Rwkv6WorldConfig(), shapes)
    config = Rwkv7WorldConfig()
    fit_config_to_weights(config, shapes)
    assert config.lora() == RANDOM_LORA["7"] and config.num_hidden_layers == 2 and config.hidden_size == 64


@pytest.mark.parametrize("config_class", [Rwkv6WorldConfig, Rwkv7WorldConfig])
def test_from_config_builds_a_finite_random_model(config_class):
    model = AutoModelForCausalLM.from_config(config_class(vocab_size=1000, hidden_size=128, num_hidden_layers=2))
    assert type(model) is MODEL_CLASSES[config_class.versions[0]]
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
