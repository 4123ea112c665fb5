"""The really trained tiny models (tests/data/real-tiny: RWKV-4, 5.2 and 7, byte-level, from rwkv.cpp's test
data): fp32 exact to the reference, and what bf16 and int8 really cost (random weights have near-ties in their
logits and overstate it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rwkv_chat import load_model
from reference import reference_run
from reference_v7 import reference_v7_logits

REAL_TINY = Path(__file__).resolve().parents[1] / "data" / "real-tiny"
MODELS = ["rwkv4-tiny-660K", "rwkv5.2-tiny-730K", "rwkv7-tiny-834K"]
TEXT = ("The quick brown fox jumps over the lazy dog. Once upon a time, there was a little girl who lived in a "
        "village near the forest. Whenever she went out, the little girl wore a red riding cloak, so everyone in "
        "the village called her Little Red Riding Hood. One morning, she asked her mother if she could go to "
        "visit her grandmother, as it had been a while since they had seen each other.")
IDS = list(TEXT.encode())  # a token is a byte
# The agreement tests read the story on to 1,813 bytes: at 383 an argmax flip is 0.26% and int8's RWKV-5.2 share
# (0.9862 over the whole story on the Zen 4, 0.9817 over the first 383 bytes, 0.979 there on an Intel host with AMX;
# 0.9857 over the story with the VNNI GEMM's int8 activations in the prefill, kernels/quant.py)
# could not be told from the 98% bar; over 1,813 positions one binomial standard deviation is about 0.003.
STORY = TEXT + (
    " Her grandmother lived on the other side of the wood, in a small house with a green door and a garden full of "
    "flowers. The girl put on her cloak, took a basket of bread and butter and a little pot of honey, and set off "
    "down the path. The sun was warm and the birds were singing in the trees. She stopped to pick some flowers for "
    "her grandmother, and she watched a rabbit hop across the grass. After a while she met a wolf. The wolf was big "
    "and grey, and he had a long nose and sharp teeth. \"Good morning, little girl,\" said the wolf. \"Where are you "
    "going on this fine day?\" \"I am going to see my grandmother,\" she said. \"She is not well, and I am bringing "
    "her some bread and honey.\" The wolf smiled and told her to take the long way through the meadow, where the "
    "flowers were the prettiest. Then he ran ahead as fast as he could. When the girl came to the house, the door "
    "was open. She went inside and saw her grandmother in bed, with her cap pulled down over her face. \"Grandmother, "
    "what big eyes you have!\" she said. \"All the better to see you with, my dear.\" Just then a woodcutter walked by "
    "the window. He heard the voice and knew at once that something was wrong. He came in, chased the wolf away, and "
    "found the real grandmother hiding in the cupboard. They all sat down together, ate the bread and honey, and "
    "laughed. From that day on, the little girl always stayed on the path, and she never spoke to a wolf again. "
    "The end.")
STORY_IDS = list(STORY.encode())


def decoded(model, ids) -> torch.Tensor:
    """The logits after each token, fed one at a time through the decode step."""
    logits, state = model.forward(ids[:1])
    rows = [logits]
    for token in ids[1:]:
        logits, state = model.forward([token], state)
        rows.append(logits)
    return torch.stack(rows)


def agreement(low: torch.Tensor, fp32: torch.Tensor) -> float:
    return (low.argmax(-1) == fp32.argmax(-1)).float().mean().item()


def reference_logits(name: str, prompt, decode) -> torch.Tensor:
    path = REAL_TINY / f"{name}.pth"
    if name.startswith("rwkv7"):
        return reference_v7_logits(path, prompt, decode)
    logits, state = reference_run(path, prompt)
    rows = [logits]
    for token in decode:
        logits, state = reference_run(path, [token], state)
        rows.append(logits)
    return torch.stack(rows)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("name", MODELS)
def test_fp32_equals_the_reference(name, device):
    """A prompt of 200 tokens, then 32 decode steps (on a GPU: RWKV-7's prompt through the Triton scan)."""
    model = load_model(REAL_TINY / f"{name}.pth", device=device, dtype="fp32")
    assert model.config.vocab_size == 256
    prompt, decode = IDS[:200], IDS[200:232]
    logits, state = model.forward(prompt)
    rows = [logits]
    for token in decode:
        logits, state = model.forward([token], state)
        rows.append(logits)
    assert (torch.stack(rows).cpu() - reference_logits(name, prompt, decode)).abs().max().item() <= 1e-3


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_bf16_and_int8_keep_98_percent_of_the_fp32_argmax(name, dtype):
    fp32 = load_model(REAL_TINY / f"{name}.pth", device="cpu", dtype="fp32").forward(STORY_IDS, all_logits=True)[0]
    low = load_model(REAL_TINY / f"{name}.pth", device="cpu", dtype=dtype).forward(STORY_IDS, all_logits=True)[0]
    share = agreement(low, fp32)
    assert len(STORY_IDS) >= 1800 and share >= 0.98, f"{name} {dtype}: argmax agreement {share:.4f}"


@pytest.mark.parametrize("name", MODELS)
def test_the_int8_decode_step_keeps_98_percent_of_the_fp32_argmax(name):
    """Token by token through the decode step: its own products (on CPUs with AVX512-VNNI the int8 ones round
    the activations to int16, kernels/cpu_kernels.py), against the fp32 prefill's logits at every position."""
    fp32 = load_model(REAL_TINY / f"{name}.pth", device="cpu", dtype="fp32").forward(STORY_IDS, all_logits=True)[0]
    share = agreement(decoded(load_model(REAL_TINY / f"{name}.pth", device="cpu", dtype="int8"), STORY_IDS), fp32)
    assert share >= 0.98, f"{name} int8 decode: argmax agreement {share:.4f}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
@pytest.mark.parametrize("name", MODELS)
def test_the_cuda_decode_step_keeps_98_percent_of_the_fp32_argmax(name, dtype):
    """Token by token on a GPU (the fast runner's fused step for RWKV-4/5.2, the fused Triton step of RWKV-7 where
    Triton runs, int8 included), against the fp32 prefill on the CPU."""
    fp32 = load_model(REAL_TINY / f"{name}.pth", device="cpu", dtype="fp32").forward(STORY_IDS, all_logits=True)[0]
    share = agreement(decoded(load_model(REAL_TINY / f"{name}.pth", device="cuda", dtype=dtype), STORY_IDS).cpu(),
                      fp32)
    assert share >= 0.98, f"{name} {dtype} CUDA decode: argmax agreement {share:.4f}"


# int4 (4.5 bits a weight, the head in int8) measured on these models over STORY (2026-12-01, Zen 4, VNNI products):
# argmax agreement with fp32 prefill / decode and mean |Δlogit| RWKV-4 0.979 / 0.979, 0.018; RWKV-5.2 0.837 / 0.835,
# 0.244; RWKV-7 0.996 / 0.997, 0.0036. RWKV-5.2 (12 layers of width 64, heads of 8) misses the 98% that int8 keeps at
# any group size or scheme tried (symmetric or asymmetric, groups of 32 or 64, a clipped scale, the head in int8:
# 83-87% over the first 383 bytes); its loss is spread over every matrix of every layer. The bounds below are what
# was measured, rounded down.
INT4_BOUNDS = {"rwkv4-tiny-660K": (0.97, 0.03), "rwkv5.2-tiny-730K": (0.82, 0.3), "rwkv7-tiny-834K": (0.98, 0.01)}


@pytest.mark.parametrize("name", MODELS)
def test_int4_keeps_the_measured_share_of_the_fp32_argmax(name):
    """Prefill (the integer GEMM, VNNI or AVX2, where it runs, else the weights widened per call; kernels/quant.py)
    and token by token through the decode step (the int4 products on int8 activations, kernels/cpu_kernels.py),
    against the fp32 prefill's logits at every position."""
    agreement_bound, delta_bound = INT4_BOUNDS[name]
    fp32 = load_model(REAL_TINY / f"{name}.pth", device="cpu", dtype="fp32").forward(STORY_IDS, all_logits=True)[0]
    model = load_model(REAL_TINY / f"{name}.pth", device="cpu", dtype="int4")
    prefill = model.forward(STORY_IDS, all_logits=True)[0]
    for how, low in (("prefill", prefill), ("decode", decoded(model, STORY_IDS))):
        share = agreement(low, fp32)
        delta = (low - fp32).abs().mean().item()
        assert share >= agreement_bound and delta <= delta_bound, f"{name} int4 {how}: {share:.3f}, {delta:.4f}"
