"""The published Hugging Face layouts (RWKV/rwkv-4-world-*, RWKV/rwkv-5-world-*, RWKV/v5-Eagle-7B-HF) load
with this package's classes through the Auto classes, without running their remote code."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoints import DROP
from hf_helpers import reference_logits, register_hf

register_hf()

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from rwkv_chat.hf.model import Rwkv4WorldForCausalLM, Rwkv5WorldForCausalLM  # noqa: E402

VOCAB = 65536  # the shared tiny checkpoints' (so the reference models are built once per session)
TOKENS = [33155, 40213, 45, 32234, 4600, 11, 261, 0, VOCAB - 1]


def assert_matches_reference(directory, checkpoint):
    model = AutoModelForCausalLM.from_pretrained(directory)  # no trust_remote_code anywhere
    expected_class = Rwkv4WorldForCausalLM if checkpoint.version == "4" else Rwkv5WorldForCausalLM
    assert type(model) is expected_class
    expected, _ = reference_logits(checkpoint.oracle_pth, TOKENS)
    torch.testing.assert_close(model(torch.tensor([TOKENS])).logits[0], expected, atol=2e-4, rtol=1e-4)
    return model


def test_published_layout_loads(tiny_hf):
    checkpoint = tiny_hf  # every architecture; safetensors, and .bin in 2 shards
    config = json.loads((checkpoint.path / "config.json").read_text())
    if checkpoint.version != "4":
        assert "auto_map" in config  # remote code is referenced, and must be ignored
    model = assert_matches_reference(checkpoint.path, checkpoint)
    assert type(AutoTokenizer.from_pretrained(checkpoint.path)).__name__ == "RwkvWorldTokenizer"
    assert not hasattr(model.config, "auto_map")


@pytest.mark.parametrize("version", ["5.0", "5.2"])
def test_eagle_config_with_model_version_and_rwkv_for_causal_lm_architecture(make_checkpoint, version):
    checkpoint = make_checkpoint(version, vocab_size=VOCAB, layout="hf", fmt="bin", flavor="eagle")
    config = json.loads((checkpoint.path / "config.json").read_text())
    assert config["architectures"] == ["RwkvForCausalLM"] and config["model_type"] == "rwkv5"
    assert_matches_reference(checkpoint.path, checkpoint)


@pytest.mark.parametrize("version, overrides", [
    ("4", {"architectures": DROP}),  # the RWKV/ org's rwkv-4-world configs name no architecture
    ("4", {"vocab_size": VOCAB - 7}),  # BBuf's converter writes the vocabulary size without the padding rows
    ("5.2", {"num_attention_heads": 64, "vocab_size": VOCAB - 7}),  # RWKV/rwkv-5-world-3b's head count is wrong
    ("5.0", {}),  # world flavor of a 5.0 model: nothing in config.json says 5.0, the weights do
], ids=["v4-no-architectures", "v4-wrong-vocab", "v5.2-wrong-heads", "v5.0-world"])
def test_wrong_or_missing_config_fields_are_corrected_from_the_weights(make_checkpoint, version, overrides):
    checkpoint = make_checkpoint(version, vocab_size=VOCAB, layout="hf", config_overrides=overrides)
    model = assert_matches_reference(checkpoint.path, checkpoint)
    assert model.config.vocab_size == VOCAB


def test_saving_a_published_rwkv5_model_writes_this_package_model_type(make_checkpoint, tmp_path):
    checkpoint = make_checkpoint("5.2", vocab_size=VOCAB, layout="hf", fmt="bin", flavor="eagle")
    AutoModelForCausalLM.from_pretrained(checkpoint.path).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "rwkv5_world" and config["rwkv_version"] == "5.2"
    assert "auto_map" not in config and "model_version" not in config
    assert_matches_reference(tmp_path, checkpoint)
