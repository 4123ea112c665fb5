"""The int4 weight format (kernels/quant.py's quantize_int4) and its CPU products: the packing against a layout
built by hand, the rounding bound of the quantisation, the C++ products of few rows on every instruction-set path
this CPU runs (AVX2; AVX-VNNI and AVX512-VNNI where it has them) against the float64 product of the dequantised
weights, the products of many rows (the integer GEMMs, or bf16 or fp32 GEMMs on weights the C++ kernels widen), and
what the loader makes of dtype "int4"."""

from __future__ import annotations

import shutil

import pytest
import torch

from rwkv_chat import load_model
from rwkv_chat.kernels import cpu_kernels, quant
from rwkv_chat.kernels.cpu_features import cpu_features, detected
from rwkv_chat.loading.loader import ModelLoadError, resolve_device_dtype
from rwkv_chat.models.layers import Projection

CAPABLE = torch.backends.cpu.get_cpu_capability() in cpu_kernels.CAPABLE and shutil.which("c++") is not None
needs_kernels = pytest.mark.skipif(not CAPABLE, reason="needs an AVX2 CPU and a C++ compiler")
PATHS = ["avx2"] + (["avx_vnni"] if CAPABLE and detected().avx2 and detected().avx_vnni else []) + \
    (["avx512"] if CAPABLE and detected().int8_dot == "avx512_vnni" else [])


def random_int4(n: int, k: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * 0.05 + torch.randn(n, 1, generator=gen) * 0.01  # groups off zero
    return quant.quantize_int4(weight, group)


def test_the_packing_is_the_documented_layout():
    """Byte j of each 32-byte block holds column j (low nibble) and column j + 32 (high nibble); scales then mins."""
    group = 128
    q = torch.randint(0, 16, (3, 256), generator=torch.Generator().manual_seed(1))
    scale, minimum = torch.tensor([[0.5, 0.25], [1.0, 2.0], [0.125, 4.0]]), torch.tensor([[-1.0, 3.0]] * 3)
    weight = q.float() * scale.repeat_interleave(group, 1) + minimum.repeat_interleave(group, 1)  # exactly on the grid
    packed, groups = quant.quantize_int4(weight, group)
    expected = bytearray()
    for row in q.tolist():
        for block in range(0, 256, 64):
            expected += bytes(row[block + j] | row[block + 32 + j] << 4 for j in range(32))
    assert packed.shape == (3, 128) and bytes(packed.flatten().tolist()) == bytes(expected)
    assert groups.dtype == torch.float16 and torch.equal(groups.float(), torch.stack([scale, minimum], dim=1))
    assert torch.equal(quant.dequantize_int4(packed, groups), weight)
    assert quant.weight_format(packed) == quant.INT4 and quant.weight_format(weight) == torch.float32


@pytest.mark.parametrize("group", [64, 128])
def test_quantisation_rounds_each_weight_to_its_groups_grid(group):
    """Every weight within half a step of the stored grid (up to the fp16 rounding of scale and min), the group's
    min and max within one step; a constant group comes back exactly as its fp16 value."""
    gen = torch.Generator().manual_seed(group)
    weight = torch.randn(50, 512, generator=gen) * torch.rand(50, 1, generator=gen)
    weight[7, :group] = 0.3
    packed, groups = quant.quantize_int4(weight, group)
    back = quant.dequantize_int4(packed, groups, torch.float64)
    step, low = (groups[:, i].double().repeat_interleave(group, 1) for i in (0, 1))
    fp16_rounding = 2.0 ** -11 * (low.abs() + 15 * step)  # of the min, and of the scale over 15 steps
    assert ((back - weight.double()).abs() <= step / 2 + fp16_rounding).all()
    assert torch.equal(back[7, :group], torch.full((group,), float(torch.tensor(0.3).half()), dtype=torch.float64))
    with pytest.raises(ValueError, match="multiple"):
        quant.quantize_int4(torch.randn(4, 96))


def int8_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 products' activations (few rows and the GEMM alike), as the C++ comments define them: each block of
    64 columns rounded (half to even) to int8 multiples of its step max|x_block| / 127, the multiplier
    127 / max|x_block| computed in fp32. Returns (the rounded activations in float64, each column's step)."""
    blocks = x.reshape(x.shape[0], -1, quant.INT4_BLOCK)
    amax = blocks.abs().amax(dim=2, keepdim=True)
    mult = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    step = (amax.double() / 127).expand_as(blocks)
    return (torch.round(blocks * mult).double() * step).reshape(x.shape), step.reshape(x.shape)


@needs_kernels
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("n,k,group", [(33, 64, 64), (257, 768, 64), (40, 1024, 256), (9, 4096, 512), (5, 192, 192)])
def test_the_int4_product_equals_the_dequantised_product_in_float64(int8_dot, path, rows, n, k, group):
    """Within the documented bound: each activation rounded to int8 steps of its 64-column block's max|x| / 127,
    so |Δ| ≤ Σ_k |w_k| · step_k / 2 a product (+ fp32 sums); and equal to the product of the rounded activations
    up to fp32 sums."""
    int8_dot(path)
    packed, groups = random_int4(n, k, group, seed=rows * 1000 + n)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 10
    x[0, 3] = 0.0
    x[-1, :64] = 0.0  # a block of zeros
    got = cpu_kernels.linear(x, packed, groups).double()
    weight = quant.dequantize_int4(packed, groups, torch.float64)
    magnitude = x.double().abs() @ weight.abs().T
    rounded, step = int8_blocks(x)
    assert (got - rounded @ weight.T).abs().max().item() <= 1e-5 * magnitude.max().item()
    bound = step / 2 @ weight.abs().T + 1e-5 * magnitude.max().item()
    assert ((got - x.double() @ weight.T).abs() <= bound).all()


@needs_kernels
def test_the_avx2_and_vnni_int4_products_agree_to_fp32_sums(int8_dot):
    if "avx512" not in PATHS:
        pytest.skip("needs AVX512-VNNI")
    packed, groups = random_int4(300, 2048, 64, seed=5)
    x = torch.randn(3, 2048)
    int8_dot("avx2")
    avx2 = cpu_kernels.linear(x, packed, groups)
    int8_dot("avx512")
    vnni = cpu_kernels.linear(x, packed, groups)
    assert (avx2 - vnni).abs().max().item() <= 1e-5 * avx2.abs().max().item()


@needs_kernels
def test_the_int4_product_refuses_bad_groups():
    packed, groups = random_int4(8, 128, 64, seed=1)
    rows = cpu_kernels.kernels().rows_product
    with pytest.raises(RuntimeError, match="fp16 groups"):
        rows(torch.randn(1, 128), packed, groups.float())
    with pytest.raises(RuntimeError, match="fp16 groups"):
        rows(torch.randn(1, 128), packed, None)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        rows(torch.randn(1, 128), packed, torch.zeros(8, 2, 4, dtype=torch.float16))  # groups of 32 columns
    with pytest.raises(RuntimeError, match="x \\[M, K\\]"):
        rows(torch.randn(1, 64), packed, groups)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_widen_int4_as_the_dequantisation_does(dtype):
    packed, groups = random_int4(70, 384, 128, seed=2)
    got = cpu_kernels.kernels().int4_widen(packed, groups, dtype == torch.bfloat16)
    expected = quant.dequantize_int4(packed, groups, torch.float64)
    assert got.dtype == dtype and got.shape == (70, 384)
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -22  # half an ulp, and an fp32 one before rounding
    assert ((got.double() - expected).abs() <= ulp * expected.abs() + 1e-12).all()


@pytest.mark.skipif(not CAPABLE, reason="needs an AVX2 CPU and a C++ compiler")
@pytest.mark.parametrize("path", PATHS)  # the AVX2 GEMM everywhere, AVX-VNNI's and VNNI's where the CPU has them
@pytest.mark.parametrize("rows", [1, 2, 3, 6, 7, 37])
@pytest.mark.parametrize("n,k,group", [(32, 64, 64), (64, 768, 64), (96, 1024, 256), (32, 192, 192),
                                         (64, 1088, 64)])  # 17 groups: the panel's groups 16 at a time and one after
def test_the_int4_gemm_equals_the_dequantised_product_in_float64(int8_dot, path, rows, n, k, group):
    """A prefill's GEMM: the product of the activations rounded in blocks of 64 with the dequantised weights (the
    scales' and the mins' terms alike), up to fp32 sums; so within step / 2 an activation of the exact product;
    each row's bits the same alone; and the activations rounded as a decode step's product rounds them (its
    blocks of 64): the two agree up to fp32 sums."""
    assert int8_dot(path) == {"avx512": "avx512_vnni"}.get(path, path)
    packed, groups = random_int4(n, k, group, seed=rows * 100 + n)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 10
    x[0, :64] = 0.0  # a block of zeros
    got = cpu_kernels.kernels().int4_gemm(x, packed, groups).double()
    weight = quant.dequantize_int4(packed, groups, torch.float64)
    magnitude = (x.double().abs() @ weight.abs().T).max().item()
    rounded, step = int8_blocks(x)
    assert (got - rounded @ weight.T).abs().max().item() <= 1e-5 * magnitude
    decode = cpu_kernels.kernels().rows_product(x, packed, groups).double()
    assert (got - decode).abs().max().item() <= 1e-5 * magnitude
    bound = step / 2 @ weight.abs().T + 1e-5 * magnitude
    assert ((got - x.double() @ weight.T).abs() <= bound).all()
    alone = cpu_kernels.kernels().int4_gemm(x[-1:], packed, groups).double()
    assert torch.equal(alone[0], got[-1])


@pytest.mark.skipif(not CAPABLE, reason="needs an AVX2 CPU and a C++ compiler")
@pytest.mark.parametrize("path", PATHS)
def test_the_gemms_refuse_what_they_cannot_do(int8_dot, path):
    int8_dot(path)
    packed, groups = random_int4(40, 128, 64, seed=4)
    module = cpu_kernels.kernels()
    with pytest.raises(RuntimeError, match="multiples of 32"):
        module.int4_gemm(torch.randn(20, 128), packed, groups)  # 40 rows: a part panel
    packed, groups = random_int4(32, 128, 64, seed=4)
    with pytest.raises(RuntimeError, match="int4 \\(uint8\\) weights only"):
        module.int4_gemm(torch.randn(20, 128), torch.zeros(32, 128, dtype=torch.int8), torch.ones(32))
    with pytest.raises(RuntimeError, match="int8 weights only"):
        module.int8_gemm(torch.randn(20, 128), packed, groups)


@pytest.mark.parametrize("n", [96, 100])  # 100 rows: not whole panels of 32 for the GEMM
@pytest.mark.parametrize("path", ["avx512", "avx512_bf16"])
def test_many_rows_take_the_gemm_or_multiply_the_widened_weights(int8_dot, path, n):
    """A prefill's product: the GEMM where it runs (cpu_kernels.runs_gemm: int8 activations in blocks of 64);
    else the weights dequantised to bf16 where the CPU has bf16 units (the inputs rounded to bf16 too), else to
    fp32."""
    int8_dot(path)
    packed, groups = random_int4(n, 256, 64, seed=3)
    x = torch.randn(40, 256)
    got = quant.linear(x, packed, groups).double()
    weight = quant.dequantize_int4(packed, groups)
    magnitude = (x.double().abs() @ weight.double().abs().T).max().item()
    assert cpu_kernels.runs_gemm(packed) == (n == 96 and cpu_features().int8_gemm)
    if cpu_kernels.runs_gemm(packed):
        rounded, _ = int8_blocks(x)
        assert (got - rounded @ weight.double().T).abs().max().item() <= 1e-5 * magnitude
    elif path == "avx512_bf16" and detected().avx512_bf16:
        expected = x.bfloat16().double() @ weight.bfloat16().double().T
        assert torch.equal(got, got.bfloat16().double())  # a bf16 GEMM ran: its results are bf16 values
        assert ((got - expected).abs() <= 2.0 ** -8 * expected.abs() + 1e-5 * magnitude).all()
    else:
        expected = x.double() @ weight.double().T
        assert (got - expected).abs().max().item() <= 1e-5 * magnitude


def test_the_loader_refuses_int4_off_a_cpu_and_names_what_to_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ModelLoadError, match="int4 runs on CPUs only.*dtype.*int8"):
        resolve_device_dtype("cuda", "int4")
    assert resolve_device_dtype("cpu", "int4") == (torch.device("cpu"), quant.INT4)


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_an_int4_model_stores_its_layers_in_int4_and_its_head_in_int8(make_checkpoint, version):
    path = make_checkpoint(version, n_layer=2, n_embd=128, seed=3).path
    model = load_model(path, device="cpu", dtype="int4")
    assert model.dtype == quant.INT4 and model.head.weight.dtype == torch.int8
    output = model.blocks[1].att.output
    assert output.weight.dtype == torch.uint8 and output.weight.shape == (128, 64)
    assert output.weight_scale.shape == (128, 2, 128 // quant.INT4_GROUP)
    int8 = load_model(path, device="cpu", dtype="int8")
    assert layer_bytes(model) <= (0.5 + 4 / quant.INT4_GROUP) * layer_bytes(int8)  # fp16 scale and min a group


def layer_bytes(model) -> int:
    """Bytes of the layers' projections as stored (weights and their scales)."""
    return sum(t.numel() * t.element_size() for module in model.blocks.modules() if isinstance(module, Projection)
               for t in (module.weight, module.weight_scale))


def test_without_the_kernels_int4_runs_on_pytorch(monkeypatch, make_checkpoint):
    """No C++ kernels (RWKV_CPU_KERNELS=0): the products dequantise the weights in PyTorch (exact to fp32 sums), and
    an int4 model decodes through the PyTorch step to the logits of the kernels' step (whose int8 activations
    move them by a little)."""
    path = make_checkpoint("5.2", n_layer=2, n_embd=128, seed=5).path
    with_kernels = load_model(path, device="cpu", dtype="int4")
    state = with_kernels.forward([1, 2, 3])[1]
    expected, _ = with_kernels.forward([4], state)
    monkeypatch.setattr(cpu_kernels, "_built", {})
    monkeypatch.setenv(cpu_kernels.DISABLE_VARIABLE, "0")
    with pytest.warns(UserWarning, match="RWKV_CPU_KERNELS=0"):
        assert cpu_kernels.kernels() is None
    packed, groups = random_int4(20, 192, 64, seed=4)
    x = torch.randn(3, 192)
    weight = quant.dequantize_int4(packed, groups, torch.float64)
    magnitude = (x.double().abs() @ weight.abs().T).max().item()
    assert (quant.linear(x, packed, groups).double() - x.double() @ weight.T).abs().max().item() <= 1e-5 * magnitude
    plain = load_model(path, device="cpu", dtype="int4")
    assert plain.runner.cpu_layers is None
    got, _ = plain.forward([4], plain.forward([1, 2, 3])[1])
    assert (got - expected).abs().max().item() <= 5e-2 * expected.abs().max().item()
