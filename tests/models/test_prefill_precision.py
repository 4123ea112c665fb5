"""What a CPU prefill of RWKV-6/7 computes in which precision, and the read that returns only its last token:
the time mixes' LoRA products in bf16 only where the projections beside them run in bf16 (layers.lora_dtype),
those products held to bf16's rounding bound against float64, the models' bf16 prefills with them held to fp32
within a bound of what fp32 LoRAs give, the LoRA factors kept in bf16 where that changes no bit
(layers.lora_storage_dtype), and a last-token read equal to the last row of an every-token read."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat import load_model
from rwkv_chat.kernels import quant
from rwkv_chat.kernels.cpu_features import ISA_VARIABLE, detected
from rwkv_chat.loading import loader
from rwkv_chat.models import layers, rwkv6, rwkv7
from checkpoints import make_state_dict, save_pth
from reference import random_tokens

BF16_UNITS = detected().native_matmul(torch.bfloat16)
needs_bf16_units = pytest.mark.skipif(not BF16_UNITS, reason="this CPU has no bf16 units (AVX512-BF16 or AMX)")
UNIT_ROUNDOFF = 2.0 ** -8  # bf16: 8 significant bits, round to nearest


@pytest.fixture(scope="module", params=["6", "7"], ids=lambda v: f"v{v}")
def checkpoint(request, tmp_path_factory):
    version = request.param
    weights = make_state_dict(version, 2, 128, head_size=32, seed=5)
    return version, save_pth(weights, tmp_path_factory.mktemp("prec") / f"v{version}.pth")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_prefill_runs_its_lora_products_in_bf16_beside_bf16_or_int8_projections():
    many, few = torch.zeros(1, quant.MANY_ROWS, 8, device="cuda"), torch.zeros(1, quant.MANY_ROWS - 1, 8, device="cuda")
    for stored in (torch.bfloat16, torch.int8):
        assert layers.lora_dtype(many, torch.zeros(8, 8, dtype=stored, device="cuda")) == torch.bfloat16
        assert layers.lora_dtype(few, torch.zeros(8, 8, dtype=stored, device="cuda")) == torch.float32
    for stored in (torch.float32, torch.float16):
        assert layers.lora_dtype(many, torch.zeros(8, 8, dtype=stored, device="cuda")) == torch.float32


def test_lora_products_run_in_bf16_only_for_a_prefill_beside_bf16_projections(monkeypatch):
    monkeypatch.delenv(ISA_VARIABLE, raising=False)
    many, few = torch.zeros(1, quant.MANY_ROWS, 8), torch.zeros(1, quant.MANY_ROWS - 1, 8)
    low = torch.bfloat16 if BF16_UNITS else torch.float32
    for stored in (torch.zeros(8, 8, dtype=torch.bfloat16), torch.zeros(8, 8, dtype=torch.int8),
                   torch.zeros(8, 4, dtype=quant.INT4_STORAGE)):
        assert layers.lora_dtype(many, stored) == low
        assert layers.lora_dtype(few, stored) == torch.float32  # a decode step's rows
    assert layers.lora_dtype(many, torch.zeros(8, 8)) == torch.float32  # an fp32 model stays fp32
    assert layers.lora_dtype(many, torch.zeros(8, 8, dtype=torch.float16)) == torch.float32
    monkeypatch.setenv(ISA_VARIABLE, "avx512")  # a CPU without bf16 units: its GEMMs, and so the LoRAs, in fp32
    assert layers.lora_dtype(many, torch.zeros(8, 8, dtype=torch.bfloat16)) == torch.float32


def test_a_cpu_model_keeps_its_lora_factors_in_bf16_where_its_prefill_multiplies_them_so_or_no_value_changes(
        monkeypatch):
    monkeypatch.delenv(ISA_VARIABLE, raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    inexact = torch.randn(8, 8, generator=gen)
    exact = inexact.bfloat16().float()  # every value a bf16, as in a bf16 checkpoint
    assert quant.holds_bf16_values(exact) and quant.holds_bf16_values(exact.bfloat16())
    assert not quant.holds_bf16_values(inexact) and not quant.holds_bf16_values(torch.zeros(8, dtype=torch.int8))
    units = torch.bfloat16 if BF16_UNITS else torch.float32
    for stored in (torch.bfloat16, torch.int8, quant.INT4):
        assert layers.lora_storage_dtype(cpu, stored) == units
        assert layers.lora_storage_dtype(cpu, stored, inexact) == units
        assert layers.lora_storage_dtype(cpu, stored, exact) == torch.bfloat16
        assert layers.lora_storage_dtype(cpu, stored, exact.bfloat16()) == torch.bfloat16
        assert layers.lora_storage_dtype(cuda, stored, exact) == torch.float32
    for stored in (torch.float32, torch.float16):
        assert layers.lora_storage_dtype(cpu, stored, exact) == torch.float32
    monkeypatch.setenv(ISA_VARIABLE, "avx512")  # a CPU without bf16 units: fp32 LoRA products
    assert layers.lora_storage_dtype(cpu, torch.int8) == torch.float32
    assert layers.lora_storage_dtype(cpu, torch.int8, inexact) == torch.float32
    assert layers.lora_storage_dtype(cpu, torch.int8, exact) == torch.bfloat16  # widened exactly where read


@pytest.mark.parametrize("version", ["6", "7"])
def test_a_bf16_checkpoints_lora_factors_stay_bf16_on_any_cpu_and_give_the_bits_of_fp32_ones(version, tmp_path,
                                                                                            monkeypatch):
    """A checkpoint whose values are bf16s (the released .pth files' dtype) keeps its LoRA factors in bf16 in an int8
    model on this CPU, with bf16 units or without (where they are widened as read): a prefill of many rows and the
    decode steps after it give the bits the same model with its factors in fp32 gives."""
    weights = {key: value.bfloat16() for key, value in make_state_dict(version, 2, 128, head_size=32, seed=7).items()}
    path = save_pth(weights, tmp_path / f"v{version}-bf16.pth")
    kept = load_model(path, device="cpu", dtype="int8")
    names = kept.lora_factor_names()
    assert names and {dict(kept.named_parameters())[name].dtype for name in names} == {torch.bfloat16}
    monkeypatch.setattr(loader, "lora_storage_dtype", lambda device, dtype, factor=None: torch.float32)
    fp32 = load_model(path, device="cpu", dtype="int8")
    assert {dict(fp32.named_parameters())[name].dtype for name in names} == {torch.float32}
    (logits, state), (logits_fp32, state_fp32) = [model.forward(random_tokens(40, seed=8), all_logits=True)
                                                  for model in (kept, fp32)]
    assert torch.equal(logits, logits_fp32)
    for token in random_tokens(3, seed=9):  # decode steps (the C++ step where the kernels are built)
        (last, state), (last_fp32, state_fp32) = kept.forward([token], state), fp32.forward([token], state_fp32)
        assert torch.equal(last, last_fp32)
    assert torch.equal(state.wkv, state_fp32.wkv) and torch.equal(state.shift, state_fp32.shift)


@needs_bf16_units
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_a_prefill_reads_bf16_kept_lora_factors_as_it_read_fp32_ones(checkpoint, monkeypatch, dtype):
    """A prefill of many rows rounds fp32 factors to bf16 for its products: the factors kept in bf16 give the
    same bits (logits and state); the factors are bf16 parameters, and only they (an fp32 model keeps fp32)."""
    monkeypatch.delenv(ISA_VARIABLE, raising=False)
    _, path = checkpoint
    tokens = random_tokens(40, seed=6)  # one segment of >= MANY_ROWS rows
    kept = load_model(path, device="cpu", dtype=dtype)
    params = dict(kept.named_parameters())
    names = kept.lora_factor_names()
    assert names and {params[name].dtype for name in names} == {torch.bfloat16}
    assert {p.dtype for n, p in params.items() if n not in names and n not in kept.projection_weight_names()} == \
        {torch.float32}
    fp32 = load_model(path, device="cpu", dtype="fp32")
    assert {p.dtype for n, p in fp32.named_parameters() if n in fp32.lora_factor_names()} == {torch.float32}
    monkeypatch.setattr(loader, "lora_storage_dtype", lambda device, dtype, factor=None: torch.float32)
    before = load_model(path, device="cpu", dtype=dtype)
    assert {dict(before.named_parameters())[name].dtype for name in names} == {torch.float32}
    (logits, state), (logits_before, state_before) = kept.forward(tokens, all_logits=True), \
        before.forward(tokens, all_logits=True)
    assert torch.equal(logits, logits_before)
    assert torch.equal(state.wkv, state_before.wkv) and torch.equal(state.shift, state_before.shift)


def test_a_bf16_lora_product_is_within_bf16_rounding_of_the_exact_one():
    """|x W - exact| <= (2u + u^2) sum|x||W| (the inputs rounded to bf16, the sums in fp32) + u |result| (the
    result rounded to bf16), against a float64 product of the fp32 operands."""
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(64, 768, generator=gen), torch.randn(768, 32, generator=gen) * 0.1
    got = layers.lora_product(x, w, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    exact = x.double() @ w.double()
    bound = (2 * UNIT_ROUNDOFF + UNIT_ROUNDOFF ** 2) * (x.double().abs() @ w.double().abs()) + \
        UNIT_ROUNDOFF * exact.abs() + 1e-6 * (x.double().abs() @ w.double().abs())  # + fp32 sums
    assert ((got.double() - exact).abs() <= bound).all()
    assert torch.equal(layers.lora_product(x, w, torch.float32), x @ w)  # fp32: the plain product


def _logits_deviation(path, tokens, device="cpu") -> tuple[float, float]:
    """(max, mean) |logits of a bf16 model on `device` - fp32 model on the CPU| over every position of a prefill."""
    exact = load_model(path, device="cpu", dtype="fp32").forward(tokens, all_logits=True)[0]
    got = load_model(path, device=device, dtype="bf16").forward(tokens, all_logits=True)[0].cpu()
    return (got - exact).abs().max().item(), (got - exact).abs().mean().item()


@needs_bf16_units
def test_bf16_prefill_with_bf16_loras_tracks_fp32_about_as_closely_as_with_fp32_loras(checkpoint, monkeypatch):
    """The bf16 model's deviation from fp32 at most doubles (max) or grows by 75% (mean) when its LoRAs run in
    bf16; a wrong product (a transposed or misplaced factor) costs far more. Random weights overstate the real
    cost: their LoRAs are large enough to saturate the tanh and outweigh the biases they are added to (measured
    on the Zen 4 at 2026-11-30, this checkpoint: max |Δ| ×1.49 / ×1.46, mean ×1.39 / ×1.13 for RWKV-6 / 7;
    other shapes: mean ×1.40-1.47 for RWKV-6, ×1.10-1.14 for RWKV-7); on the trained tiny RWKV-7, whose
    LoRAs are small beside the biases, bf16 LoRAs left argmax (99.2%) and mean |Δ| unchanged
    (tests/models/test_real_tiny.py holds it to >= 98%)."""
    monkeypatch.delenv(ISA_VARIABLE, raising=False)
    _bf16_loras_cost_at_most(checkpoint, monkeypatch, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_bf16_prefill_with_bf16_loras_tracks_fp32_about_as_closely_as_with_fp32_loras(checkpoint, monkeypatch):
    """The same bounds for a bf16 model read on a GPU, whose prefills run their LoRAs in bf16 too."""
    _bf16_loras_cost_at_most(checkpoint, monkeypatch, "cuda")


def _bf16_loras_cost_at_most(checkpoint, monkeypatch, device):
    version, path = checkpoint
    module = rwkv6 if version == "6" else rwkv7
    tokens = random_tokens(120, seed=9)
    calls = []
    chosen = module.lora_dtype
    monkeypatch.setattr(module, "lora_dtype", lambda x, w: calls.append(chosen(x, w)) or calls[-1])
    with_bf16 = _logits_deviation(path, tokens, device)
    assert torch.bfloat16 in calls  # the bf16 model's prefill did take them
    monkeypatch.setattr(module, "lora_dtype", lambda x, w: torch.float32)
    # fp32 factors too
    monkeypatch.setattr(loader, "lora_storage_dtype", lambda device, dtype, factor=None: torch.float32)
    with_fp32 = _logits_deviation(path, tokens, device)
    assert with_bf16[0] <= 2.0 * with_fp32[0] + 0.02, (with_bf16, with_fp32)
    assert with_bf16[1] <= 1.75 * with_fp32[1] + 0.002, (with_bf16, with_fp32)


@pytest.mark.parametrize("dtype,tolerance", [("fp32", 1e-5), ("bf16", 0.05)])
def test_a_read_of_the_last_logits_equals_the_last_row_of_an_every_token_read(checkpoint, dtype, tolerance):
    """The last-token read runs the last layer's channel mix for that token alone (its shift from the token
    before): the same logits and the same state as the read that computes every token's."""
    _, path = checkpoint
    model = load_model(path, device="cpu", dtype=dtype)
    tokens = random_tokens(40, seed=4)
    last, state = model.forward(tokens)
    every, every_state = model.forward(tokens, all_logits=True)
    assert (last - every[-1]).abs().max().item() <= tolerance * max(1.0, every[-1].abs().max().item())
    assert torch.allclose(state.shift, every_state.shift, atol=1e-5, rtol=0)
    assert torch.allclose(state.wkv, every_state.wkv, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("rows", [3, 40])  # a decode step's rows (fp32 out of the C++ products), a prefill's GEMM
def test_a_squared_relu_kept_in_bf16_feeds_the_next_product_the_same_values(dtype, rows):
    """Projection.squared_relu leaves a bf16 product's output in bf16 and squares it there: the next projection
    reads exactly what it read when the output was widened to fp32, squared and rounded back (a bf16 square is
    exact in fp32); products that return fp32 (int8's scales, fp32 weights, few rows) are unchanged."""
    gen = torch.Generator().manual_seed(rows)
    key = layers.Projection(64, 96).requires_grad_(False)
    weight = torch.randn(96, 64, generator=gen) * 0.2
    if dtype == torch.int8:
        weight, scale = quant.quantize_rows(weight)
        key.register_buffer("weight_scale", scale)
    key.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
    x = torch.randn(rows, 64, generator=gen)
    kept = key.squared_relu(x)
    widened = layers.relu_square_(key(x))
    assert widened.dtype == torch.float32
    read_as = torch.bfloat16 if kept.dtype == torch.bfloat16 else torch.float32
    assert torch.equal(kept.to(read_as), widened.to(read_as))
    if dtype != torch.bfloat16:  # int8 (its scales apply in fp32) and fp32 products come back fp32
        assert kept.dtype == torch.float32
    elif rows >= quant.MANY_ROWS and quant.many_rows_dtype(key.weight) == torch.bfloat16:
        assert kept.dtype == torch.bfloat16  # a prefill's bf16 GEMM (few rows: the C++ kernels' fp32, or a GEMM)
