"""The C++ CPU kernels (rwkv_chat/cpu_kernels.py) against PyTorch: the products on random operands, the
one-call decode layer against the PyTorch decode step of the same runner, and the fallback without them."""

from __future__ import annotations

import shutil

import pytest
import torch

from rwkv_chat import cpu_kernels, load_model
from rwkv_chat.state import RwkvState
from reference import random_tokens

CAPABLE = torch.backends.cpu.get_cpu_capability() in cpu_kernels.CAPABLE and shutil.which("c++") is not None
needs_kernels = pytest.mark.skipif(not CAPABLE, reason="needs an AVX2 CPU and a C++ compiler")


@pytest.mark.skipif(not CAPABLE, reason="needs an AVX2 CPU and a C++ compiler")
def test_the_kernels_build_where_they_can():
    assert cpu_kernels.kernels() is not None


def dequantised(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return weight.float() * scale[:, None] if weight.dtype == torch.int8 else weight.float()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("n,k", [(33, 40), (257, 768)])  # a k remainder after the 16-wide loop; whole blocks
def test_rows_product_equals_pytorch(dtype, rows, n, k):
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(rows, k, generator=gen)
    if dtype == torch.int8:
        weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        scale = torch.rand(n, generator=gen) / 50
    else:
        weight, scale = torch.randn(n, k, generator=gen).to(dtype), None
    expected = x.double() @ dequantised(weight, scale).double().T
    got = cpu_kernels.linear(x, weight, scale)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-4)


@needs_kernels
def test_linear_keeps_leading_dimensions_and_rejects_bad_operands():
    weight = torch.randn(8, 32).bfloat16()
    x = torch.randn(2, 3, 32)
    assert cpu_kernels.linear(x, weight).shape == (2, 3, 8)
    with pytest.raises(RuntimeError, match="scale"):
        cpu_kernels.kernels().rows_product(torch.randn(1, 32), torch.zeros(8, 32, dtype=torch.int8), None)
    with pytest.raises(RuntimeError, match="x \\[M, K\\]"):
        cpu_kernels.kernels().rows_product(torch.randn(1, 31), weight, None)


@needs_kernels
@pytest.mark.parametrize("version", ["4", "5.0", "5.2"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8"])
def test_decode_layer_equals_the_pytorch_step(version, dtype, make_checkpoint):
    """The whole C++ decode step against the PyTorch step of the same runner (same weights, same fp32
    activations): eight layers, so fp16's halving after layer 6 feeds two more; one row and three."""
    ckpt = make_checkpoint(version, n_layer=8, n_embd=128, seed=7)
    model = load_model(ckpt.path, dtype=dtype, fast=False).use_fast_path()  # CPU fp32 loads without it
    runner = model.runner
    assert runner.cpu_layers is not None and runner.act_dtype == torch.float32
    states = [model.forward(random_tokens(5 + i, seed=i))[1] for i in range(3)]
    for state in (states[0], RwkvState.stack(states)):
        ids = torch.tensor([11, 222, 3333][:state.shift.shape[0]])
        x = torch.nn.functional.embedding(ids, runner.emb).float()
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], *runner.ln0, 1e-5)
        got_logits, got = runner._decode_cpu(x, state.shift, state.wkv)
        want_logits, want = runner._decode_torch(x, state.shift, state.wkv)
        scale = want_logits.abs().max().item()
        assert (got_logits - want_logits).abs().max().item() <= 1e-5 * max(1.0, scale)
        assert torch.allclose(got.shift, want.shift, atol=1e-5)
        assert torch.allclose(got.wkv, want.wkv, rtol=1e-5, atol=1e-5)


@pytest.fixture
def kernels_disabled(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_built", {})
    monkeypatch.setenv(cpu_kernels.DISABLE_VARIABLE, "0")
    yield


def test_without_the_kernels_the_pytorch_path_serves(kernels_disabled, make_checkpoint):
    ckpt = make_checkpoint("5.2", n_layer=2, n_embd=128, seed=7)
    with pytest.warns(UserWarning, match="RWKV_CPU_KERNELS=0"):
        assert cpu_kernels.kernels() is None
    assert not cpu_kernels.handles_dtype(torch.bfloat16)
    model = load_model(ckpt.path, dtype="bf16")
    assert model.runner is not None and model.runner.cpu_layers is None
    assert model.runner.act_dtype == torch.bfloat16  # PyTorch's bf16 products round their inputs
    reference = load_model(ckpt.path, dtype="bf16", fast=False)
    tokens = random_tokens(20, seed=4)
    logits, state = model.forward(tokens)
    expected, ref_state = reference.forward(tokens)
    for token in (5, 50):
        logits, state = model.forward([token], state)
        expected, ref_state = reference.forward([token], ref_state)
    assert (logits - expected).abs().max().item() < 0.1


@needs_kernels
def test_decode_layer_refuses_an_int8_weight_without_its_scales(make_checkpoint):
    ckpt = make_checkpoint("4", n_layer=1, n_embd=64, seed=7)
    model = load_model(ckpt.path, dtype="int8")
    tensors = list(model.runner.cpu_layers[0])
    tensors[6] = torch.empty(0)  # the r|k|v weight's scales
    state = model.zero_state()
    with pytest.raises(RuntimeError, match="scale per row"):
        cpu_kernels.kernels().decode_layer(torch.zeros(1, 64), state.shift[:, 0], state.wkv[:, 0],
                                           state.shift[:, 0].clone(), state.wkv[:, 0].clone(), tensors, 4, 3, False)
