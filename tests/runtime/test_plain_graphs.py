"""RWKV-6/7 on a GPU: the decode step replayed from CUDA graphs (the fused one where Triton runs, and the plain
one) equals the plain path (needs CUDA)."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat import load_model
from rwkv_chat.kernels import triton_kernels
from rwkv_chat.runtime.fast_path import attach_fast_path
from rwkv_chat.runtime.plain_graphs import GraphedPlainRunner
from rwkv_chat.state import RwkvState
from reference import assert_decode_into_equals_decode, assert_states_passed_in_stay_unchanged, random_tokens

CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("version", ["6", "7"])
@pytest.mark.parametrize("dtype,tolerance", [("fp32", 1e-3), ("bf16", 1.0), ("fp16", 1.0), ("int8", 1.0)])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain-step"])
def test_graphed_decode_equals_the_plain_path(make_checkpoint, version, dtype, tolerance, fused):
    path = make_checkpoint(version, n_layer=7, n_embd=128, seed=3).path  # 7 layers: fp16 halves after the 6th
    plain = load_model(path, device="cuda", dtype=dtype, fast=False)
    graphed = attach_fast_path(load_model(path, device="cuda", dtype=dtype, fast=False), use_triton=fused)
    assert plain.runner is None and isinstance(graphed.runner, GraphedPlainRunner)
    # float and int8 weights get the fused step where Triton runs
    assert (graphed.runner.fused is not None) == (fused and triton_kernels.AVAILABLE)
    tokens = random_tokens(200, seed=1)
    a, _ = plain.forward(tokens)
    b, _ = graphed.forward(tokens)
    assert (a - b).abs().max().item() <= tolerance
    for batch in (1, 3, 8, 40):  # buckets 1, 4, 8 and an ungraphed batch
        states = [plain.forward(random_tokens(5 + i, seed=i))[1] for i in range(batch)]
        ids = torch.randint(1, 65530, (batch,))
        for _ in range(2):  # a replay must not reuse the previous call's inputs
            la, na = plain.decode_batch(ids, RwkvState.stack(states))
            lb, nb = graphed.decode_batch(ids, RwkvState.stack(states))
            assert (la - lb).abs().max().item() <= tolerance
            if dtype == "fp32":
                assert torch.allclose(na.wkv, nb.wkv, rtol=1e-3, atol=1e-3)
    assert_states_passed_in_stay_unchanged(graphed)
    assert_decode_into_equals_decode(graphed, tolerance)


@pytest.mark.skipif(not CUDA or not triton_kernels.AVAILABLE, reason="needs a CUDA GPU and Triton")
@pytest.mark.parametrize("version", ["6", "7"])
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_bf16_checkpoints_lora_factors_are_held_in_bf16_by_the_fused_step(make_checkpoint, version, dtype):
    """A checkpoint stored in bf16 (as the released files are): the fused step holds its LoRA factors in bf16
    (every value is one; half the bytes its kernels read) and still equals the plain path; an fp32 checkpoint's
    factors, not all bf16 values, stay fp32."""
    def lora_dtypes(model):
        names = model.lora_factor_names()
        return {p.dtype for name, p in model.named_parameters() if name in names}

    for stored, held in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)):
        path = make_checkpoint(version, n_layer=3, n_embd=128, seed=4, dtype=stored).path
        plain = load_model(path, device="cuda", dtype=dtype, fast=False)
        graphed = attach_fast_path(load_model(path, device="cuda", dtype=dtype, fast=False))
        assert graphed.runner.fused is not None
        assert lora_dtypes(graphed) == {held} and lora_dtypes(plain) == {torch.float32}
        states = [plain.forward(random_tokens(5 + i, seed=i))[1] for i in range(3)]
        for batch in (1, 3):  # the few-row kernels, graphed
            ids = torch.randint(1, 65530, (batch,))
            la, _ = plain.decode_batch(ids, RwkvState.stack(states[:batch]))
            lb, _ = graphed.decode_batch(ids, RwkvState.stack(states[:batch]))
            assert (la - lb).abs().max().item() <= 1.0
        a, _ = plain.forward(random_tokens(40, seed=9))  # a prefill through the packed (bf16) parameters
        b, _ = graphed.forward(random_tokens(40, seed=9))
        assert (a - b).abs().max().item() <= 1.0
