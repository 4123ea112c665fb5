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


@pytest.mark.parametrize("name", MODELS)
def test_fp32_equals_the_reference(name):
    model = load_model(REAL_TINY / f"{name}.pth", device="cpu", dtype="fp32")
    assert model.config.vocab_size == 256
    prompt, decode = IDS[:200], IDS[200:232]
    logits, state = model.forward(prompt)
    rows = [logits]
    for token in decode:
        logits, state = model.forward([token], state)
        rows.append(logits)
    assert (torch.stack(rows) - reference_logits(name, prompt, decode)).abs().max().item() <= 1e-3


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_bf16_and_int8_keep_98_percent_of_the_fp32_argmax(name, dtype):
    fp32 = load_model(REAL_TINY / f"{name}.pth", device="cpu", dtype="fp32").forward(IDS, all_logits=True)[0]
    low = load_model(REAL_TINY / f"{name}.pth", device="cpu", dtype=dtype).forward(IDS, all_logits=True)[0]
    agreement = (low.argmax(-1) == fp32.argmax(-1)).float().mean().item()
    assert len(IDS) >= 300 and agreement >= 0.98, f"{name} {dtype}: argmax agreement {agreement:.3f}"


@pytest.mark.parametrize("name", MODELS)
def test_the_int8_decode_step_keeps_98_percent_of_the_fp32_argmax(name):
    """Token by token through the decode step: its own products (on CPUs with AVX512-VNNI the int8 ones round
    the activations to int16, kernels/cpu_kernels.py), against the fp32 prefill's logits at every position."""
    fp32 = load_model(REAL_TINY / f"{name}.pth", device="cpu", dtype="fp32").forward(IDS, all_logits=True)[0]
    model = load_model(REAL_TINY / f"{name}.pth", device="cpu", dtype="int8")
    logits, state = model.forward(IDS[:1])
    rows = [logits]
    for token in IDS[1:]:
        logits, state = model.forward([token], state)
        rows.append(logits)
    agreement = (torch.stack(rows).argmax(-1) == fp32.argmax(-1)).float().mean().item()
    assert agreement >= 0.98, f"{name} int8 decode: argmax agreement {agreement:.3f}"
