"""Prompts padded at their end read as the prompt alone, whatever the padding tokens: RwkvModel.read_padded (RWKV-6
and RWKV-7, whose time mixes pass padding) and the fast runner's read_padded (RWKV-5, whose token-by-token scans
pass it; here the C++ ones). The oracle is the plain read of the prompt alone (held to the reference by
test_model.py, test_rwkv6_rwkv7.py and test_real_tiny.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rwkv_chat import load_model
from reference import random_tokens
from runtime.triton_interpreter import run_interpreted

REAL_TINY_V7 = Path(__file__).resolve().parents[1] / "data" / "real-tiny" / "rwkv7-tiny-834K.pth"
CASES = [(1, 1), (1, 8), (2, 2), (5, 8), (16, 16), (17, 32), (31, 32), (33, 64), (100, 128)]  # (prompt, padded to)


def padded_reads_equal_the_plain_read(model, ids: list[int], start, tolerance: float, read=None,
                                      oracle=None) -> None:
    """read(ids, state, valid): model.read_padded unless given; oracle(ids, state): model.read_plain unless given.
    tolerance: of the largest difference, times the largest expected value where that is past 1."""
    read = read or model.read_padded
    oracle = oracle or model.read_plain
    vocab = model.config.vocab_size
    for prompt, length in CASES:
        expected_logits, expected = oracle(torch.tensor(ids[:prompt]), start)
        results = []
        for seed in (1, 2):  # two different paddings
            padding = torch.randint(0, vocab, (length - prompt,), generator=torch.Generator().manual_seed(seed))
            padded = torch.cat([torch.tensor(ids[:prompt]), padding])
            results.append(read(padded, start, torch.tensor([prompt])))
        for logits, state in results:
            for got, want in ((logits, expected_logits), (state.wkv, expected.wkv), (state.shift, expected.shift)):
                # relative to the values' size past 1: products of other row counts round otherwise (a GPU
                # machine's 16-core CPU: 2.0e-5 on wkv cells of ~3.6)
                bound = tolerance * max(1.0, want.abs().max().item())
                assert (got - want).abs().max().item() <= bound, (prompt, length)
        # the padding changes nothing at all: two different paddings give the same bits
        (first_logits, first), (second_logits, second) = results
        assert torch.equal(first_logits, second_logits) and torch.equal(first.wkv, second.wkv)
        assert torch.equal(first.shift, second.shift)


@pytest.mark.parametrize("version", ["6", "7"])
def test_a_padded_prompt_reads_as_the_prompt_alone(make_checkpoint, version):
    model = load_model(make_checkpoint(version, n_layer=2, n_embd=128, seed=3).path, device="cpu", dtype="fp32")
    start = model.forward(random_tokens(9, seed=4))[1]  # a state that is not empty
    before = start.clone()
    padded_reads_equal_the_plain_read(model, random_tokens(128, seed=5), model.zero_state(1), 2e-5)
    padded_reads_equal_the_plain_read(model, random_tokens(128, seed=6), start, 2e-5)
    assert torch.equal(start.wkv, before.wkv) and torch.equal(start.shift, before.shift)  # never changed


def test_the_trained_tiny_rwkv7_reads_a_padded_prompt_as_the_prompt_alone():
    model = load_model(REAL_TINY_V7, device="cpu", dtype="fp32")
    text = list(b"Once upon a time, there was a little girl who lived in a village near the forest. Whenever she "
                b"went out, she wore a red riding cloak.")
    padded_reads_equal_the_plain_read(model, text, model.zero_state(1), 2e-5)


@pytest.mark.parametrize("version", ["5.0", "5.2"])
def test_the_fast_runner_reads_a_padded_rwkv5_prompt_as_the_prompt_alone(make_checkpoint, version):
    model = load_model(make_checkpoint(version, n_layer=2, n_embd=128, seed=3).path, device="cpu", dtype="fp32",
                       fast=True)
    runner = model.runner
    if runner.prefill_kernels is None:
        pytest.skip("the C++ kernels did not build here")
    start = model.forward(random_tokens(9, seed=4))[1]
    ids = random_tokens(128, seed=5)
    # against the runner's own read of the prompt alone, and the plain path's (its chunked form rounds otherwise)
    padded_reads_equal_the_plain_read(model, ids, start, 2e-5, runner.read_padded, runner.prefill)
    padded_reads_equal_the_plain_read(model, ids, start, 2e-4, runner.read_padded)


TRITON_PADDED_SCRIPT = """
    import sys
    import torch
    from rwkv_chat import load_model
    from rwkv_chat.runtime.fast_path import attach_fast_path
    plain = load_model(sys.argv[1], device="cpu", dtype="fp32", fast=False)
    fast = attach_fast_path(load_model(sys.argv[1], device="cpu", dtype="fp32", fast=False), use_triton=True)
    runner = fast.runner
    assert runner.use_triton and runner.prefill_kernels.__name__.endswith("triton_kernels")
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, plain.config.vocab_size, (128,), generator=gen)
    start = plain.forward(ids[:9].tolist())[1]
    for prompt, length in ((1, 4), (5, 8), (17, 32), (100, 128)):
        padded = torch.cat([ids[:prompt], torch.randint(0, plain.config.vocab_size, (length - prompt,), generator=gen)])
        logits, state = runner.read_padded(padded, start, torch.tensor([prompt]))
        own_logits, own = runner.prefill(ids[:prompt], start)  # the runner's read of the prompt alone
        plain_logits, expected = plain.read_plain(ids[:prompt], start)
        print(prompt, length, max((logits - own_logits).abs().max().item(), (state.wkv - own.wkv).abs().max().item(),
                                  (state.shift - own.shift).abs().max().item()),
              max((logits - plain_logits).abs().max().item(), (state.wkv - expected.wkv).abs().max().item()))
"""


def test_the_gpu_scans_read_a_padded_rwkv5_prompt_as_the_prompt_alone_under_the_interpreter(make_checkpoint):
    """The fast runner's padded read through the Triton kernels a GPU runs (RWKV-5's scan with a decay per token,
    1 for the padding), under Triton's interpreter: against the runner's read of the prompt alone, and the plain
    path's."""
    pytest.importorskip("triton")
    path = make_checkpoint("5.2", n_layer=2, n_embd=128, seed=3).path
    lines = run_interpreted(TRITON_PADDED_SCRIPT, str(path)).strip().splitlines()
    assert len(lines) == 4
    for line in lines:
        own, plain = (float(x) for x in line.split()[2:])
        assert own <= 2e-5 and plain <= 2e-4, line


def test_architectures_without_padding_and_bad_lengths_are_refused(make_checkpoint):
    model = load_model(make_checkpoint("5.2", n_layer=2, n_embd=64, seed=1).path, device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match="RWKV-5 cannot read padded prompts"):
        model.read_padded(torch.tensor([1, 2, 0]), model.zero_state(1), torch.tensor([2]))
    model = load_model(make_checkpoint("7", n_layer=2, n_embd=64, seed=1).path, device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match="1 to 1024 tokens, got 0"):
        model.read_padded(torch.tensor([], dtype=torch.long), model.zero_state(1), torch.tensor([1]))
    model = load_model(make_checkpoint("4", n_layer=2, n_embd=64, seed=1).path, device="cpu", dtype="fp32",
                       fast=True)
    with pytest.raises(ValueError, match="RWKV-4 prompts cannot be read padded here"):
        model.runner.read_padded(torch.tensor([1, 2, 0]), model.zero_state(1), torch.tensor([2]))
