"""The C++ CPU kernels (rwkv_chat/cpu_kernels.py) against PyTorch: the products on random operands, the
one-call decode layer against the PyTorch decode step of the same runner, the prefill's wkv scans against the
plain model's token-by-token recurrence in float64, and the fallback without them."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from rwkv_chat import load_model
from rwkv_chat.kernels import cpu_kernels
from rwkv_chat.kernels.cpu_features import detected
from rwkv_chat.runtime.fast_path import attach_fast_path
from rwkv_chat.models.rwkv4 import wkv4_step
from rwkv_chat.models.rwkv5 import wkv5_step
from rwkv_chat.models.rwkv6 import wkv6_step
from rwkv_chat.models.rwkv7 import wkv7_step
from rwkv_chat.state import RwkvState
from reference import logits_after, random_tokens

CAPABLE = torch.backends.cpu.get_cpu_capability() in cpu_kernels.CAPABLE and shutil.which("c++") is not None
needs_kernels = pytest.mark.skipif(not CAPABLE, reason="needs an AVX2 CPU and a C++ compiler")


@pytest.mark.skipif(not CAPABLE, reason="needs an AVX2 CPU and a C++ compiler")
def test_the_kernels_build_where_they_can():
    assert cpu_kernels.kernels() is not None


def dequantised(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return weight.float() * scale[:, None] if weight.dtype == torch.int8 else weight.float()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 37])
@pytest.mark.parametrize("n,k", [(33, 40), (257, 768)])  # a k remainder after the 16-wide loop; whole blocks
def test_rows_product_equals_pytorch(dtype, rows, n, k):
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(rows, k, generator=gen)
    if dtype == torch.int8:
        weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        scale = torch.rand(n, generator=gen) / 50
    else:
        weight, scale = torch.randn(n, k, generator=gen).to(dtype), None
    seen = x.double()
    if dtype == torch.int8:
        q, step = int16_rows(x)  # that product's rounded activations (tested on their own below)
        seen = q.double() * step.double()[:, None]
    expected = seen @ dequantised(weight, scale).double().T
    got = cpu_kernels.linear(x, weight, scale)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-4)


VNNI = CAPABLE and detected().int8_dot == "avx512_vnni"
AVX_VNNI = CAPABLE and detected().avx2 and detected().avx_vnni  # the AVX-VNNI GEMMs (int8_dot skips a build without)


def integer_paths():
    """The integer products (int8 of few rows, the GEMMs) this machine runs, as (RWKV_CPU_ISA cap, the int8
    product it picks): the AVX2 ones on any CPU the kernels build for, the AVX-VNNI GEMMs where the CPU has
    AVX-VNNI, the VNNI ones where it has AVX512-VNNI."""
    return [pytest.param(path, product, marks=pytest.mark.skipif(not runs, reason=f"needs {product}, a C++ compiler"))
            for path, product, runs in (("avx2", "avx2", CAPABLE), ("avx_vnni", "avx_vnni", AVX_VNNI),
                                        ("avx512", "avx512_vnni", VNNI))]


def int16_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 product's activations, as its C++ comment defines them: each row rounded (half to even) to
    int16 multiples of its step max|x| / 32767, the multiplier 32767 / max|x| computed in fp32."""
    amax = x.abs().amax(dim=1)
    mult = torch.where(amax > 0, torch.tensor(32767.0) / amax, torch.zeros_like(amax))
    return torch.round(x * mult[:, None]), amax / 32767.0


@pytest.mark.parametrize("path,product", integer_paths())
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
# a tail; whole blocks; past one integer block; one row's longest single sum (8- and 16-row groups, a rest row)
@pytest.mark.parametrize("n,k", [(33, 40), (257, 768), (9, 8520), (17, 8192)])
def test_the_int8_product_equals_its_integer_oracle(int8_dot, path, product, rows, n, k):
    """Against float64: exactly the integer products of the rounded activations (up to fp32 sums), and within
    the documented rounding bound of the exact product of the stored weights."""
    assert int8_dot(path) == product
    gen = torch.Generator().manual_seed(rows * 100 + n)
    x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 10
    x[0, 3] = 0.0
    weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) / 50
    got = cpu_kernels.linear(x, weight, scale).double()
    q, step = int16_rows(x)
    factor = step.double()[:, None] * scale.double()[None, :]
    integer = q.double() @ weight.double().T  # exact in float64 (|sum| < 2^53)
    magnitude = (q.double().abs() @ weight.double().abs().T) * factor
    assert (got - integer * factor).abs().max().item() <= 1e-6 * magnitude.max().item() + 1e-30
    exact = x.double() @ (weight.double() * scale.double()[:, None]).T
    bound = factor / 2 * weight.double().abs().sum(1)[None, :] + 1e-6 * magnitude  # step/2 an activation
    assert ((got - exact).abs() <= bound).all()


@needs_kernels
@pytest.mark.parametrize("path", ["avx2", detected().path])
@pytest.mark.parametrize("n,k", [(1000, 128), (4099, 768), (770, 2688)])  # 16-row groups, rests, thread splits
@pytest.mark.parametrize("rows", [7, 37])  # on AVX512-VNNI: one pass or several over each 16 weight rows, rests
def test_each_row_of_a_batched_int8_product_has_the_bits_of_that_row_alone(int8_dot, path, n, k, rows):
    """A chat's logits must not depend on how many chats share its decode step: the one-row product (its own
    loop) adds in the same order as the batched rows' (same bits, not only close)."""
    int8_dot(path)
    gen = torch.Generator().manual_seed(n + k)
    weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) / 50
    x = torch.randn(rows, k, generator=gen)
    batched = cpu_kernels.linear(x, weight, scale)
    for row in range(rows):
        assert torch.equal(cpu_kernels.linear(x[row:row + 1], weight, scale)[0], batched[row])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(1000, 128), (771, 768), (100, 40)])  # 8-row panels, rests; K not a multiple of 16
@pytest.mark.parametrize("rows", [7, 37])  # one pass or several over each 8 weight rows, rests
def test_each_row_of_a_batched_float_product_has_the_bits_of_that_row_alone(dtype, n, k, rows):
    """The same for float weights (a model in fp32, bf16 or fp16): eight weight rows at a time against every chat's
    row, their sums reduced together, give each output the bits the one-row loop gives it."""
    gen = torch.Generator().manual_seed(n + k + rows)
    weight = torch.randn(n, k, generator=gen).to(dtype)
    x = torch.randn(rows, k, generator=gen)
    batched = cpu_kernels.linear(x, weight)
    for row in range(rows):
        assert torch.equal(cpu_kernels.linear(x[row:row + 1], weight)[0], batched[row])


@pytest.mark.parametrize("path,product", integer_paths())
def test_the_int8_product_does_not_overflow_its_integer_sums(int8_dot, path, product):
    """The worst case: every weight 127, every activation the row's maximum (32767 after rounding), over more
    weights than one int32 lane could sum (16 lanes × 2 products × 4.16e6 each pass 2³¹ after 8,257 weights)."""
    assert int8_dot(path) == product
    k = 8192 + 320 + 5
    x = torch.full((2, k), 3.0)
    x[1] *= -1
    weight = torch.full((3, k), 127, dtype=torch.int8)
    scale = torch.ones(3)
    got = cpu_kernels.linear(x, weight, scale)
    expected = 127.0 * 3.0 * k
    assert torch.allclose(got.double(), torch.tensor([[expected] * 3, [-expected] * 3], dtype=torch.float64),
                          rtol=1e-6)
    # one activation row sums a whole weight row in int32 lanes up to 8,192 weights (2 x 256 products a lane):
    # at that length, and past it (the blocked sums), 16 rows (two groups of 8 on AVX2) and a rest
    for k in (8192, 8192 + 320):  # 8,512: 532 products a lane would pass 2³¹
        x = torch.full((1, k), -3.0)
        weight = torch.full((17, k), 127, dtype=torch.int8)
        got = cpu_kernels.linear(x, weight, torch.ones(17))
        assert torch.allclose(got.double(), torch.full((1, 17), -127.0 * 3.0 * k, dtype=torch.float64), rtol=1e-6)


def int8_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 GEMM's activations, as its C++ comment defines them: each block of 32 columns rounded (half to
    even) to int8 multiples of its step max|x_block| / 127, the multiplier 127 / max|x_block| computed in fp32.
    Returns (q [M, K/32, 32], step [M, K/32])."""
    blocks = x.reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(dim=2)
    mult = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    return torch.round(blocks * mult[..., None]), amax / 127.0


@pytest.mark.parametrize("path,product", integer_paths())
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 16, 37])  # each tile height (AVX2 2, AVX-VNNI 3, VNNI 6), rests
@pytest.mark.parametrize("n,k", [(32, 32), (64, 224), (96, 768), (160, 2688)])
def test_the_int8_gemm_equals_its_integer_oracle(int8_dot, path, product, rows, n, k):
    """Against float64: exactly the integer products of the rounded blocks (up to fp32 sums), and within the
    documented bound (step / 2 an activation) of the exact product of the stored weights."""
    assert int8_dot(path) == product
    gen = torch.Generator().manual_seed(rows * 100 + n)
    x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 10
    x[0, :32] = 0.0  # a block of zeros: step 0
    x[-1, 40:45] *= 50.0  # a block with an outlier
    weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) / 50
    got = cpu_kernels.gemm(x, weight, scale).double()
    q, step = int8_blocks(x)
    w = weight.double().reshape(n, -1, 32)
    per_block = torch.einsum("mbk,nbk->mnb", q.double(), w) * step.double()[:, None, :]  # exact integer sums
    expected = per_block.sum(2) * scale.double()[None, :]
    magnitude = (torch.einsum("mbk,nbk->mnb", q.double().abs(), w.abs()) * step.double()[:, None, :]).sum(2)
    magnitude = magnitude * scale.double()[None, :]
    assert (got - expected).abs().max().item() <= 1e-6 * magnitude.max().item() + 1e-30
    exact = x.double() @ (weight.double() * scale.double()[:, None]).T
    bound = (step.double()[:, None, :] / 2 * w.abs().sum(2)[None, :, :]).sum(2) * scale.double()[None, :]
    assert ((got - exact).abs() <= bound + 1e-6 * magnitude).all()
    if k == 32:  # a row of zeros: exactly zero
        assert torch.equal(got[0], torch.zeros(n, dtype=torch.float64))


@pytest.mark.parametrize("path,product", integer_paths())
def test_each_row_of_the_int8_gemm_has_the_bits_of_that_row_alone(int8_dot, path, product):
    """A row's result depends on that row only: the same bits alone, in a tile of any height, on any thread."""
    assert int8_dot(path) == product
    gen = torch.Generator().manual_seed(5)
    weight = torch.randint(-127, 128, (320, 768), generator=gen, dtype=torch.int8)
    scale = torch.rand(320, generator=gen)
    x = torch.randn(23, 768, generator=gen)
    batched = cpu_kernels.gemm(x, weight, scale)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [cpu_kernels.gemm(x[row:row + 1], weight, scale)[0] for row in range(23)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(alone[row], batched[row]) for row in range(23))


@pytest.mark.parametrize("path,product", integer_paths())
@pytest.mark.parametrize("rows,k", [(1, 64), (7, 768), (37, 2112)])  # one row, a tile and a rest, threads' rows
def test_the_gemms_read_bf16_rows_as_their_fp32_widening(int8_dot, path, product, rows, k):
    """A prefill's bf16 mixes go into the GEMMs as they are: the same bits as the same rows widened to fp32 first
    (both weight formats; values at bf16's extremes of range), and other dtypes are refused by name."""
    from rwkv_chat.kernels import quant
    assert int8_dot(path) == product
    gen = torch.Generator().manual_seed(rows + k)
    x = (torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 10).to(torch.bfloat16)
    x[0, :32] = 0.0
    x[-1, 33:36] = torch.tensor([3e38, -1e-38, 1e-40])  # near bf16's largest, a normal and a subnormal small one
    weight = torch.randint(-127, 128, (96, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(96, generator=gen) / 50
    packed, groups = quant.quantize_int4(torch.randn(96, k, generator=gen), 64)
    module = cpu_kernels.kernels()
    assert torch.equal(module.int8_gemm(x, weight, scale), module.int8_gemm(x.float(), weight, scale))
    assert torch.equal(module.int4_gemm(x, packed, groups), module.int4_gemm(x.float(), packed, groups))
    assert torch.equal(cpu_kernels.gemm(x, weight, scale), module.int8_gemm(x.float(), weight, scale))
    with pytest.raises(RuntimeError, match="contiguous fp32 or bf16"):
        module.int8_gemm(x.half(), weight, scale)


@pytest.mark.skipif(not VNNI, reason="needs AVX512-VNNI and a C++ compiler")
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 37])  # the one-row loop, groups of rows, passes, rests
# a tail; 8- and 16-row groups with rests; past one integer block with a tail; thread splits
@pytest.mark.parametrize("n,k", [(33, 40), (1000, 128), (257, 768), (9, 8520), (770, 2688)])
def test_the_avx2_int8_product_gives_the_vnni_products_bits(int8_dot, rows, n, k):
    """The AVX2 int8 product of few rows holds each 32 columns' 16 integer lanes as two halves of 8 and reduces
    them in _mm512_reduce_add_ps's order: the VNNI product's bits, whatever the signs (the weights at both ends of
    their range, an outlier, a row of zeros), so a chat's logits do not depend on which of the two a CPU runs."""
    gen = torch.Generator().manual_seed(rows * 1000 + k)
    x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 10
    x[-1, 3] *= 80.0
    if rows > 1:
        x[0] = 0.0
    weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    weight[:, :8] = torch.tensor([127, -127, 127, -127, -127, -127, 127, 127], dtype=torch.int8)
    scale = torch.rand(n, generator=gen) / 50
    results = {}
    for path in ("avx512", "avx2"):
        int8_dot(path)
        results[path] = cpu_kernels.linear(x, weight, scale)
    assert torch.equal(results["avx2"], results["avx512"])


GEMM_PATHS = ["avx2"] + (["avx_vnni"] if AVX_VNNI else []) + (["avx512"] if VNNI else [])


@pytest.mark.skipif(len(GEMM_PATHS) < 2, reason="needs AVX-VNNI or AVX512-VNNI and a C++ compiler")
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 40])  # every tile height of each path, and rests
@pytest.mark.parametrize("n,k,group", [(32, 64, 64), (96, 768, 128), (64, 2688, 384)])
def test_every_gemm_path_gives_the_same_bits(int8_dot, rows, n, k, group):
    """The AVX2 GEMMs (int16 products for int8 weights, byte products for int4) and the AVX-VNNI ones (256-bit
    byte dot products; the int8 activations offset by 128, the int4 weights the unsigned operand) build the same
    integer block sums as the VNNI ones and apply the same fp32 steps in the same order: the same bits, whatever
    the values' signs (the weights at both ends of their range, blocks of zeros and outliers)."""
    from rwkv_chat.kernels import quant
    gen = torch.Generator().manual_seed(rows * 1000 + k)
    x = torch.randn(rows, k, generator=gen) * torch.rand(rows, 1, generator=gen) * 10
    x[0, :32] = 0.0
    x[-1, 40:45] *= 50.0
    weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    weight[:, :8] = torch.tensor([127, -127, 127, -127, -127, -127, 127, 127], dtype=torch.int8)
    scale = torch.rand(n, generator=gen) / 50
    packed, groups = quant.quantize_int4(torch.randn(n, k, generator=gen), group)
    module = cpu_kernels.kernels()
    results = {}
    for path in GEMM_PATHS:
        assert int8_dot(path) == {"avx512": "avx512_vnni"}.get(path, path)
        results[path] = (module.int8_gemm(x, weight, scale), module.int4_gemm(x, packed, groups))
    for path in GEMM_PATHS[1:]:
        assert torch.equal(results[path][0], results["avx2"][0])
        assert torch.equal(results[path][1], results["avx2"][1])


@pytest.mark.parametrize("path,product", integer_paths())
def test_the_int8_gemm_serves_a_prefills_int8_products_where_it_runs(int8_dot, path, product):
    """quant.linear takes the int8 GEMM for many rows of an int8 weight whose sides are multiples of 32 (where
    cpu_features' int8_gemm says so: AVX512-VNNI, or AVX2 without AVX-512), and the widened GEMM for other shapes or
    under the baseline cap; the GEMM refuses what it cannot do."""
    from rwkv_chat.kernels import quant
    from rwkv_chat.kernels.cpu_features import cpu_features
    assert int8_dot(path) == product and cpu_features().int8_gemm
    gen = torch.Generator().manual_seed(9)
    weight = torch.randint(-127, 128, (64, 96), generator=gen, dtype=torch.int8)
    scale = torch.rand(64, generator=gen)
    x = torch.randn(2, quant.MANY_ROWS, 96, generator=gen)
    assert cpu_kernels.runs_gemm(weight) == cpu_features().int8_gemm
    took_gemm = torch.equal(quant.linear(x, weight, scale), cpu_kernels.gemm(x, weight, scale))
    assert took_gemm == cpu_features().int8_gemm  # else widened: the activations not rounded to int8
    assert quant.linear(x, weight, scale).shape == (2, quant.MANY_ROWS, 64)
    odd = torch.randint(-127, 128, (64, 40), generator=gen, dtype=torch.int8)
    assert not cpu_kernels.runs_gemm(odd) and not cpu_kernels.runs_gemm(weight[:48])
    with pytest.raises(RuntimeError, match="multiples of 32"):
        cpu_kernels.gemm(torch.randn(20, 40), odd, scale)
    int8_dot("baseline")
    assert not cpu_kernels.runs_gemm(weight)
    widened = quant.linear(x, weight, scale)
    assert torch.allclose(widened, x @ (weight.float() * scale[:, None]).T, rtol=1e-2, atol=1e-1)


@needs_kernels
def test_the_int8_product_follows_the_instruction_set_cap(int8_dot):
    """The avx2 cap picks the AVX2 products (0); the CPU's best path names its own product."""
    assert int8_dot("avx2") == "avx2" and cpu_kernels.kernels().int8_product() == 0
    assert int8_dot(detected().path) == detected().int8_dot
    assert cpu_kernels.kernels().int8_product() == cpu_kernels.INT8_PRODUCTS[detected().int8_dot]


@needs_kernels
def test_the_avx_vnni_gemms_run_only_where_the_cpu_and_the_build_have_them(int8_dot, monkeypatch):
    """The extension runs its AVX-VNNI tiles where Linux lists the CPU flag (the oracle) and refuses them, by
    name, elsewhere; where the CPU would pick them but the build cannot run them (a compiler without AVX-VNNI's
    intrinsics), configure() takes the AVX2 products, whose GEMMs give the same bits, and the prefill's products
    still take a GEMM."""
    from rwkv_chat.kernels import cpu_features as features_module
    module = cpu_kernels.kernels()
    assert AVX_VNNI or not module.avx_vnni_runs()
    if AVX_VNNI:
        assert int8_dot("avx_vnni") == "avx_vnni" and module.int8_product() == 2  # (skips a build without it)
    with pytest.raises(RuntimeError, match="int8 product 0 \\(avx2\\), 1 \\(vnni\\) or 2 \\(avx_vnni\\)"):
        module.set_int8_product(3)
    if not AVX_VNNI:
        with pytest.raises(RuntimeError, match="AVX-VNNI needs a CPU and a compiler with it"):
            module.set_int8_product(2)
    client = features_module.CpuFeatures(avx2=True, avx_vnni=True)
    monkeypatch.setattr(cpu_kernels, "cpu_features", lambda: client)
    without = SimpleNamespace(avx_vnni_runs=lambda: False, set_int8_product=module.set_int8_product,
                              set_prefetch_bytes=module.set_prefetch_bytes)
    monkeypatch.setitem(cpu_kernels._built, "module", without)
    try:
        assert cpu_kernels.configure() == "avx2" and module.int8_product() == 0
        monkeypatch.setattr(without, "int8_product", module.int8_product, raising=False)
        assert cpu_kernels.runs_gemm(torch.zeros(64, 96, dtype=torch.int8))
    finally:
        monkeypatch.undo()  # the real build and features back before int8_dot configures them again


@needs_kernels
@pytest.mark.parametrize("path", ["avx2", detected().path])
def test_prefetching_changes_no_product(int8_dot, monkeypatch, path):
    """Software prefetch only moves weights into the cache sooner: every product of few rows, in every weight
    format and on each int8/int4 product this CPU runs, is bit for bit the one without it, also where the prefetch
    runs past the end of the matrix (the distance beyond the last rows) or only for the shorter rows (a row limit,
    as on a Zen 5), into L1 or into L2 only (as on a Zen 4); configure() hands the distance of RWKV_CPU_PREFETCH to
    the kernels, and the default's row limit and level."""
    from rwkv_chat.kernels import quant
    from rwkv_chat.kernels.cpu_features import PREFETCH_VARIABLE, cpu_features
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(300, 768, generator=gen) / 20
    weights = [(w, None), (w.bfloat16(), None), (w.half(), None), quant.quantize_rows(w), quant.quantize_int4(w)]
    for rows in (1, 2, 5):
        x = torch.randn(rows, 768, generator=gen)
        results = {}
        for distance in (0, 1024, 65536):
            monkeypatch.setenv(PREFETCH_VARIABLE, str(distance))
            int8_dot(path)
            assert cpu_kernels.kernels().prefetch_bytes() == distance
            results[distance] = [cpu_kernels.linear(x, weight, scale) for weight, scale in weights]
        for distance in (1024, 65536):
            for plain, prefetched in zip(results[0], results[distance]):
                assert torch.equal(plain, prefetched)
        for to_l2 in (False, True):
            cpu_kernels.kernels().set_prefetch_bytes(4096, 0, to_l2)
            assert cpu_kernels.kernels().prefetch_to_l2() == to_l2
            for plain, (weight, scale) in zip(results[0], weights):
                assert torch.equal(plain, cpu_kernels.linear(x, weight, scale))
        # prefetching only rows shorter than 1,024 bytes: the int8 (768) and int4 (384) rows, not the others
        cpu_kernels.kernels().set_prefetch_bytes(65536, 1024)
        assert cpu_kernels.kernels().prefetch_rows_below() == 1024
        for plain, (weight, scale) in zip(results[0], weights):
            assert torch.equal(plain, cpu_kernels.linear(x, weight, scale))
        monkeypatch.delenv(PREFETCH_VARIABLE)
        int8_dot(path)  # back to this CPU's default
        assert cpu_kernels.kernels().prefetch_rows_below() == cpu_features().prefetch_rows_below
        assert cpu_kernels.kernels().prefetch_to_l2() == cpu_features().prefetch_to_l2


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
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8", "int4"])
def test_decode_layer_equals_the_pytorch_step(version, dtype, make_checkpoint, int8_dot):
    """The whole C++ decode step against the PyTorch step of the same runner (same weights, same fp32
    activations): eight layers, so fp16's halving after layer 6 feeds two more; one row and three. The integer
    products round their activations (int8: to int16, a step a row; int4: to int8, a step per 64 columns; both
    held to float64 in their own tests) and the two steps' activations differ in their fp32 sums, so one may
    round the other way now and then (test_cpu_decode's docstring): int8 logits to 1e-3 and its states to 2e-3,
    int4 logits to 5e-2. The AVX2 int8 step is also the VNNI one bit for bit, where the CPU has both."""
    int8_dot("avx2")
    tolerance = {"int4": 5e-2, "int8": 1e-3}.get(dtype, 1e-5)
    state_tolerance = 2e-3 if dtype == "int8" else 1e-5
    ckpt = make_checkpoint(version, n_layer=8, n_embd=128, seed=7)
    model = attach_fast_path(load_model(ckpt.path, device="cpu", dtype=dtype, fast=False))  # CPU fp32 loads without it
    runner = model.runner
    assert runner.cpu_layers is not None and runner.act_dtype == torch.float32
    states = [model.forward(random_tokens(5 + i, seed=i))[1] for i in range(3)]
    for state in (states[0], RwkvState.stack(states)):
        ids = torch.tensor([11, 222, 3333][:state.shift.shape[0]])
        x = torch.nn.functional.embedding(ids, runner.emb).float()
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], *runner.ln0, 1e-5)
        buffers = lambda: (torch.empty_like(state.shift), torch.empty_like(state.wkv))  # noqa: E731
        got_logits, got = runner._decode_cpu(x, state.shift, state.wkv, *buffers())
        want_logits, want = runner._decode_torch(x, state.shift, state.wkv, *buffers())
        scale = want_logits.abs().max().item()
        assert (got_logits - want_logits).abs().max().item() <= tolerance * max(1.0, scale)
        if dtype != "int4":  # int8: its flips move the states by a few 1e-4 (measured), as they move the logits
            assert torch.allclose(got.shift, want.shift, atol=state_tolerance)
            assert torch.allclose(got.wkv, want.wkv, rtol=state_tolerance, atol=state_tolerance)
        if dtype == "int8" and VNNI:
            int8_dot("avx512")
            vnni_logits, vnni = runner._decode_cpu(x, state.shift, state.wkv, *buffers())
            int8_dot("avx2")
            assert torch.equal(vnni_logits, got_logits) and torch.equal(vnni.wkv, got.wkv)


@needs_kernels
@pytest.mark.parametrize("k_scale", [3.0, 40.0])  # 40: keys far beyond fp32's exp range without the max shift
@pytest.mark.parametrize("empty_state", [False, True])
def test_wkv4_scan_equals_the_recurrence_in_float64(k_scale, empty_state):
    gen = torch.Generator().manual_seed(int(k_scale))
    length, channels = 37, 200  # channels: several thread blocks of 64 and a remainder
    w = -torch.exp(torch.rand(channels, generator=gen) * 9 - 6)
    u = torch.rand(channels, generator=gen) * 2 - 1
    k = torch.randn(length, channels, generator=gen) * k_scale
    v = torch.randn(length, channels, generator=gen)
    if empty_state:
        state = torch.stack([torch.zeros(channels), torch.zeros(channels), torch.full((channels,), -1e30)])
    else:
        state = torch.stack([torch.randn(channels, generator=gen), torch.rand(channels, generator=gen) + 0.1,
                             torch.randn(channels, generator=gen)])
    before = state.clone()
    out, new_state = cpu_kernels.kernels().wkv4_scan(w, u, k, v, state)
    assert torch.equal(state, before)  # the state passed in is left alone
    a, b, p = (t.double()[None] for t in state)
    rows = []
    for t in range(length):
        y, a, b, p = wkv4_step(w.double(), u.double(), k[t:t + 1].double(), v[t:t + 1].double(), a, b, p)
        rows.append(y[0])
    assert torch.allclose(out.double(), torch.stack(rows), rtol=1e-5, atol=1e-5)
    # the same recurrence token by token, so the same log-scale p: the state compares directly
    rtol = 1e-4 if k_scale < 10 else 1e-3  # exp(p ~ 100) turns p's absolute rounding into a relative error
    assert torch.allclose(new_state[2].double(), p[0], rtol=1e-5, atol=1e-5)
    assert torch.allclose(new_state[0].double(), a[0], rtol=rtol, atol=1e-5)
    assert torch.allclose(new_state[1].double(), b[0], rtol=rtol, atol=1e-5)


# wkv5_head_token's three forms: heads of 64 (the sums in registers), other multiples of 8, the plain loop
WKV5_SIZES = [64, 32, 8, 12]


@needs_kernels
@pytest.mark.parametrize("size", WKV5_SIZES)
def test_wkv5_scan_equals_the_recurrence_in_float64(size):
    gen = torch.Generator().manual_seed(5)
    length, heads = 23, 3
    log_w = -torch.exp(torch.rand(heads, size, generator=gen) * 6 - 5)
    u = torch.randn(heads, size, generator=gen)
    r, k, v = (torch.randn(length, heads * size, generator=gen) for _ in range(3))
    state = torch.randn(heads, size, size, generator=gen)
    before = state.clone()
    out, new_state = cpu_kernels.kernels().wkv5_scan(torch.exp(log_w), u, r, k, v, state)
    assert torch.equal(state, before)
    s, rows = state.double()[None], []
    per_head = lambda t: t.double().view(1, heads, size)  # noqa: E731
    for t in range(length):
        y, s = wkv5_step(log_w.double(), u.double(), per_head(r[t]), per_head(k[t]), per_head(v[t]), s)
        rows.append(y.reshape(-1))
    assert torch.allclose(out.double(), torch.stack(rows), rtol=1e-4, atol=1e-4)
    assert torch.allclose(new_state.double(), s[0], rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("size", WKV5_SIZES)
def test_wkv5_scan_with_a_decay_per_token_equals_the_rwkv6_recurrence_in_float64(size):
    gen = torch.Generator().manual_seed(6)
    length, heads = 19, 2
    log_w = -torch.exp(torch.rand(length, heads, size, generator=gen) * 6 - 5)
    u = torch.randn(heads, size, generator=gen)
    r, k, v = (torch.randn(length, heads * size, generator=gen) for _ in range(3))
    state = torch.randn(heads, size, size, generator=gen)
    out, new_state = cpu_kernels.kernels().wkv5_scan(torch.exp(log_w).view(length, -1), u, r, k, v, state)
    s, rows = state.double()[None], []
    per_head = lambda t: t.double().view(1, heads, size)  # noqa: E731
    for t in range(length):
        y, s = wkv6_step(log_w[t].double()[None], u.double(), per_head(r[t]), per_head(k[t]), per_head(v[t]), s)
        rows.append(y.reshape(-1))
    assert torch.allclose(out.double(), torch.stack(rows), rtol=1e-4, atol=1e-4)
    assert torch.allclose(new_state.double(), s[0], rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("size", [64, 24, 8, 12, 264])  # vector: 64, 24 (an odd 8), 8; key by key: 12, 264
def test_wkv7_scan_equals_the_recurrence_in_float64(size):
    gen = torch.Generator().manual_seed(size)
    length, heads = 29, 3
    shape = (length, heads, size)
    log_w = -0.6 * torch.rand(shape, generator=gen)
    r, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    kk = torch.nn.functional.normalize(torch.randn(shape, generator=gen), dim=-1)
    a = torch.rand(shape, generator=gen)
    state = torch.randn(heads, size, size, generator=gen)
    before = state.clone()
    flat = lambda t: t.reshape(length, heads * size).contiguous()  # noqa: E731
    out, new_state = cpu_kernels.kernels().wkv7_scan(flat(torch.exp(log_w)), flat(r), flat(k), flat(v), flat(kk),
                                                     flat(a), state)
    assert torch.equal(state, before)
    s, rows = state.double()[None], []
    for t in range(length):
        y, s = wkv7_step(*(x[t].double()[None] for x in (log_w, r, k, v, kk, a)), s)
        rows.append(y.reshape(-1))
    assert torch.allclose(out.double(), torch.stack(rows), rtol=1e-4, atol=1e-4)
    assert torch.allclose(new_state.double(), s[0], rtol=1e-4, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("version", ["6", "7"])
def test_the_plain_prefill_with_the_scans_equals_the_chunked_form(version, make_checkpoint, monkeypatch):
    """RWKV-6/7 read a prompt with the C++ scan on a CPU where the kernels are built, else with the chunked form
    (GPUs without Triton, CPUs without a compiler): the same logits and state, two sequences at once."""
    model = load_model(make_checkpoint(version, n_layer=2, n_embd=128, seed=2).path, device="cpu", fast=False)
    cpu_kernels.kernels()
    ids = torch.tensor([random_tokens(70, seed=1), random_tokens(70, seed=2)])
    start = model.zero_state(2)
    scanned, scanned_state = model._read(ids, start)
    monkeypatch.setattr(cpu_kernels, "built_for", lambda tensor: None)
    chunked, chunked_state = model._read(ids, start)
    assert torch.allclose(scanned, chunked, rtol=1e-4, atol=1e-4)
    assert torch.allclose(scanned_state.wkv, chunked_state.wkv, rtol=1e-4, atol=1e-4)


def bf16_steps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 values lie between a and b (same signs; bf16 tensors)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def lora_shift_operands(batch, length, channels, parts, lora_dtype):
    gen = torch.Generator().manual_seed(channels)
    xx = torch.randn(batch, length, channels, generator=gen) * 3
    prev = torch.randn(batch, channels, generator=gen)
    mix = torch.rand(parts, channels, generator=gen)
    lora = None
    if lora_dtype is not None:
        lora = (torch.randn(parts, batch, length, channels, generator=gen) * 0.5).to(lora_dtype)
    return xx, prev, mix, lora


MIX_SHAPES = [(1, 40, 768, 5), (2, 7, 100, 2), (3, 1, 13, 6), (1, 20, 8, 1), (2, 300, 256, 5)]


@needs_kernels
@pytest.mark.parametrize("batch,length,channels,parts", MIX_SHAPES)
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16, None])
def test_lora_shift_mixes_in_fp32_are_the_fused_fp32_steps(batch, length, channels, parts, lora_dtype):
    """xx + (shift - xx) * (mix + lora) in fp32 with the product and sum rounded once, against an oracle in float64
    (the fp32 shift and weight, their exact product plus xx, rounded once to fp32); the shift takes the state's
    token at each sequence's first position. Channel tails of 8, sequences of 1, rows for several threads."""
    xx, prev, mix, lora = lora_shift_operands(batch, length, channels, parts, lora_dtype)
    got = cpu_kernels.kernels().lora_shift_mixes(xx, prev, mix, lora, False)
    shift = torch.cat([prev.unsqueeze(1), xx[:, :-1]], dim=1) - xx
    weights = mix.view(parts, 1, 1, channels) + (0 if lora is None else lora.float())
    want = (xx.double() + shift.double() * weights.double()).float()
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.equal(got, want)


@needs_kernels
@pytest.mark.parametrize("batch,length,channels,parts", MIX_SHAPES)
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.bfloat16, None])
def test_lora_shift_mixes_in_bf16_are_the_fp32_ones_rounded_to_nearest_even(batch, length, channels, parts,
                                                                            lora_dtype):
    """bf16 = True: the fp32 mixes rounded once to bf16, to nearest even, as PyTorch converts them."""
    kernels = cpu_kernels.kernels()
    xx, prev, mix, lora = lora_shift_operands(batch, length, channels, parts, lora_dtype)
    got = kernels.lora_shift_mixes(xx, prev, mix, lora, True)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, kernels.lora_shift_mixes(xx, prev, mix, lora, False).to(torch.bfloat16))


@needs_kernels
@pytest.mark.parametrize("length,channels,parts", [(1, 13, 2), (7, 100, 4), (300, 2048, 4), (40, 768, 2)])
def test_shift_mixes_have_the_bits_of_pytorchs_fp32_mixes(length, channels, parts):
    """An RWKV-4/5 prefill's xx * mix + shifted * (1 - mix) in one pass: bit for bit PyTorch's operators (no fused
    multiply-add), over channel tails, one token, and rows enough to run on several threads; the first token
    shifts in the state's."""
    gen = torch.Generator().manual_seed(length)
    xx = torch.randn(length, channels, generator=gen) * 3
    prev = torch.randn(channels, generator=gen)
    mix = torch.rand(parts, channels, generator=gen)
    got = cpu_kernels.kernels().shift_mixes(xx, prev, mix)
    shifted = torch.cat([prev.unsqueeze(0), xx[:-1]])
    want = xx * mix[:, None] + shifted * (1 - mix[:, None])
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.equal(got, want)
    assert not torch.equal(got, torch.addcmul(shifted * (1 - mix[:, None]), xx, mix[:, None])) or length == 1


@needs_kernels
def test_shift_mixes_refuse_what_they_cannot_read():
    kernels = cpu_kernels.kernels()
    xx, prev, mix = torch.zeros(4, 8), torch.zeros(8), torch.zeros(2, 8)
    with pytest.raises(RuntimeError, match="xx contiguous fp32"):
        kernels.shift_mixes(xx.double(), prev, mix)
    with pytest.raises(RuntimeError, match="prev contiguous fp32"):
        kernels.shift_mixes(xx, torch.zeros(7), mix)
    with pytest.raises(RuntimeError, match="mix contiguous fp32"):
        kernels.shift_mixes(xx, prev, torch.zeros(2, 8).t())


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 13), (7, 100), (300, 2048)])  # a tail of 8, several threads' rows
@pytest.mark.parametrize("with_residual", [True, False])
def test_the_sigmoid_gate_equals_pytorchs_within_float_rounding(shape, with_residual):
    """[x +] sigmoid(r) * y in one pass: PyTorch's value within a few fp32 steps (the decode step's exp), over
    saturating gates; inputs of other float dtypes are widened first and out_dtype rounds the result."""
    gen = torch.Generator().manual_seed(shape[1])
    r, y, x = (torch.randn(*shape, generator=gen) * 6 for _ in range(3))
    r[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -87.5])
    module = cpu_kernels.kernels()
    residual = x if with_residual else None
    got = module.sigmoid_gate(r, y, residual)
    want = torch.sigmoid(r.double()) * y.double() + (x.double() if with_residual else 0)
    assert got.dtype == torch.float32 and got.shape == y.shape
    assert ((got.double() - want).abs() <= 4e-7 * (want.abs() + y.double().abs() + 1e-30)).all()
    halves = module.sigmoid_gate(r.bfloat16(), y.bfloat16(), residual, out_dtype=torch.bfloat16)
    from_halves = module.sigmoid_gate(r.bfloat16().float(), y.bfloat16().float(), residual)
    assert halves.dtype == torch.bfloat16 and torch.equal(halves, from_halves.bfloat16())


@needs_kernels
@pytest.mark.parametrize("size", [1, 13, 4096, 300 * 7168 + 3])
def test_relu_square_has_pytorchs_bits_and_writes_over_its_input(size):
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(size, generator=gen) * 100
    x[0] = -0.0
    want = torch.relu(x).square()
    got = cpu_kernels.kernels().relu_square_(x)
    assert got.data_ptr() == x.data_ptr() and torch.equal(x, want)


@needs_kernels
@pytest.mark.parametrize("length,heads,size", [(1, 2, 64), (9, 3, 20), (200, 32, 64)])  # tails; threads' rows
@pytest.mark.parametrize("gated", [True, False])
def test_group_norm_gate_equals_pytorchs_group_norm_and_silu_gate(length, heads, size, gated):
    """An RWKV-5 prefill's ln_x (each head of each token normalised, with the model's eps) times silu(gate):
    PyTorch's group_norm and gate computed in float64, to fp32's rounding; weights of another dtype are widened."""
    from rwkv_chat.models.layers import GROUP_NORM_EPS
    import torch.nn.functional as F
    gen = torch.Generator().manual_seed(length * heads)
    y = torch.randn(length, heads * size, generator=gen) * 5 + 2
    y[0, :size] = 0.25  # a constant head: its variance is 0, the eps decides
    weight, bias = torch.randn(heads * size, generator=gen), torch.randn(heads * size, generator=gen)
    gate = torch.randn(length, heads * size, generator=gen) * 4 if gated else None
    got = cpu_kernels.kernels().group_norm_gate(y, heads, weight.bfloat16(), bias.bfloat16(), GROUP_NORM_EPS, gate)
    w, b = weight.bfloat16().double(), bias.bfloat16().double()
    want = F.group_norm(y.double(), heads, w, b, GROUP_NORM_EPS)
    if gated:
        want = want * F.silu(gate.double())
    assert got.dtype == torch.float32 and got.shape == y.shape
    scale = (w.abs() + b.abs()) * (gate.double().abs() if gated else 1) * 8 + 1e-6
    assert ((got.double() - want).abs() <= 2e-6 * scale).all()


@needs_kernels
def test_the_prefill_gates_refuse_what_they_cannot_read():
    kernels = cpu_kernels.kernels()
    with pytest.raises(RuntimeError, match="floating CPU tensors of one shape"):
        kernels.sigmoid_gate(torch.zeros(4, 8), torch.zeros(4, 9))
    with pytest.raises(RuntimeError, match="floating CPU tensors of one shape"):
        kernels.sigmoid_gate(torch.zeros(4, 8, dtype=torch.long), torch.zeros(4, 8))
    with pytest.raises(RuntimeError, match="a contiguous fp32 CPU tensor"):
        kernels.relu_square_(torch.zeros(8, 4).t())
    with pytest.raises(RuntimeError, match="A a multiple of heads"):
        kernels.group_norm_gate(torch.zeros(2, 10), 3, torch.zeros(10), torch.zeros(10), 1e-5)
    with pytest.raises(RuntimeError, match="weight and bias \\[A\\]"):
        kernels.group_norm_gate(torch.zeros(2, 12), 3, torch.zeros(11), torch.zeros(12), 1e-5)
    with pytest.raises(RuntimeError, match="floating CPU tensors of one shape"):
        kernels.group_norm_gate(torch.zeros(2, 12), 3, torch.zeros(12), torch.zeros(12), 1e-5, torch.zeros(2, 11))


def without(module, names):
    """The C++ module's public functions except `names`: what a caller that probes for them then finds."""
    return SimpleNamespace(**{name: getattr(module, name) for name in dir(module)
                              if not name.startswith("_") and name not in names})


def assert_same_read(fused, fused_state, plain, plain_state, int8=False):
    """Two prefills of one prompt agree up to fp32 rounding, and not bit for bit (the kernels did run). int8: the
    GEMMs round their activations to steps of max|x| / 127, so an fp32 rounding difference upstream can move an
    activation by a whole step, and that token's output by that step's share, and every later token of its
    sequence and its final state too (through the shift and the state): logits and states agree within 0.05. How
    many tokens agree up to fp32 rounding is chance (where the first such step falls: a Zen 3 saw 3 tokens of 80
    differ at db4558e, and 13, from the 28th token of one sequence on, by 0.019 at most, its state by 0.015, once
    the RWKV-5/6 scan ran in vectors), so it is not asserted."""
    tolerance = dict(rtol=0.0, atol=0.05) if int8 else dict(rtol=1e-4, atol=1e-4)
    assert torch.allclose(fused, plain, **tolerance)
    assert torch.allclose(fused_state.wkv, plain_state.wkv, **tolerance)
    assert torch.allclose(fused_state.shift, plain_state.shift, **tolerance)
    assert not torch.equal(fused, plain)


@needs_kernels
@pytest.mark.parametrize("version", ["4", "5.2"])
def test_a_prefill_with_the_kernels_gates_equals_pytorchs(version, make_checkpoint, monkeypatch):
    """An RWKV-4/5 CPU prefill with the C++ gates and group norm gives PyTorch's logits and state up to fp32
    rounding (the runner without them: its prefill kernels hide the two; relu² has PyTorch's bits either way)."""
    model = attach_fast_path(load_model(make_checkpoint(version, n_layer=2, n_embd=128, seed=4).path, device="cpu",
                                        dtype="fp32", fast=False))  # CPU fp32 loads without it
    runner = model.runner
    assert runner.prefill_kernels is not None and not runner.use_triton
    ids = torch.tensor(random_tokens(40, seed=5))
    start = model.zero_state(1)
    fused, fused_state = runner.prefill(ids, start, all_logits=True)
    monkeypatch.setattr(runner, "prefill_kernels",
                        without(runner.prefill_kernels, {"sigmoid_gate", "group_norm_gate"}))
    assert_same_read(fused, fused_state, *runner.prefill(ids, start, all_logits=True))


@needs_kernels
@pytest.mark.parametrize("dtype", ["fp32", "int8"])
def test_an_rwkv6_prefill_with_the_kernels_gates_equals_pytorchs(dtype, make_checkpoint, monkeypatch):
    """RWKV-6's prompt on CPUs: its GroupNorm with gate and its channel mix's gate from the C++ kernels once the
    process has built them, from PyTorch otherwise (the same scans either way): the same logits and state up to
    fp32 rounding (int8: up to an activation rounding step's share, assert_same_read)."""
    from rwkv_chat.models import rwkv6
    model = load_model(make_checkpoint("6", n_layer=2, n_embd=128, seed=4).path, device="cpu", dtype=dtype, fast=False)
    ids = torch.tensor([random_tokens(40, seed=5), random_tokens(40, seed=6)])
    real = cpu_kernels.kernels()
    start = model.zero_state(2)
    fused, fused_state = model._read(ids, start)
    hidden = without(real, {"group_norm_gate", "sigmoid_gate"})
    monkeypatch.setattr(rwkv6, "cpu_kernels", SimpleNamespace(
        built_for=lambda tensor: hidden if tensor.device.type == "cpu" else None,
        scan_each_sequence=cpu_kernels.scan_each_sequence))
    assert_same_read(fused, fused_state, *model._read(ids, start), int8=dtype == "int8")


@needs_kernels
@pytest.mark.parametrize("version", ["6", "7"])
def test_a_bf16_prefill_with_the_kernels_mixes_equals_pytorchs_mixes(version, make_checkpoint, monkeypatch):
    """A bf16 prefill's token-shift mixes come from the C++ kernel once the process has built it, from PyTorch
    otherwise (no compiler, GPUs): the same logits and state."""
    from rwkv_chat.models import layers
    model = load_model(make_checkpoint(version, n_layer=2, n_embd=128, seed=4).path, device="cpu", dtype="bf16",
                       fast=False)
    ids = torch.tensor([random_tokens(40, seed=5), random_tokens(40, seed=6)])
    if layers.lora_dtype(torch.zeros(80, 128), model.blocks[0].att.receptance.weight) != torch.bfloat16:
        pytest.skip("this CPU computes the prefill's products in fp32: its mixes stay fp32")
    cpu_kernels.kernels()
    start = model.zero_state(2)
    fused, fused_state = model._read(ids, start)
    monkeypatch.setattr(layers, "cpu_kernels", SimpleNamespace(built_for=lambda tensor: None))
    plain, plain_state = model._read(ids, start)
    assert torch.allclose(fused, plain, rtol=1e-3, atol=1e-3)
    assert torch.allclose(fused_state.wkv, plain_state.wkv, rtol=1e-3, atol=1e-3)
    assert torch.allclose(fused_state.shift, plain_state.shift, rtol=1e-3, atol=1e-3)


@needs_kernels
def test_lora_shift_mixes_refuse_operands_of_the_wrong_shape_or_kind():
    kernels = cpu_kernels.kernels()
    xx, prev, mix = torch.zeros(1, 4, 8), torch.zeros(1, 8), torch.zeros(2, 8)
    with pytest.raises(RuntimeError, match="xx contiguous fp32"):
        kernels.lora_shift_mixes(xx.double(), prev, mix, None, True)
    with pytest.raises(RuntimeError, match="prev fp32"):
        kernels.lora_shift_mixes(xx, torch.zeros(2, 8), mix, None, False)
    with pytest.raises(RuntimeError, match="mix contiguous fp32"):
        kernels.lora_shift_mixes(xx, prev, torch.zeros(2, 7), None, True)
    with pytest.raises(RuntimeError, match="lora contiguous fp32 or bf16"):
        kernels.lora_shift_mixes(xx, prev, mix, torch.zeros(2, 1, 4, 8, dtype=torch.float16), False)
    with pytest.raises(RuntimeError, match="lora contiguous fp32 or bf16"):
        kernels.lora_shift_mixes(xx, prev, mix, torch.zeros(2, 1, 4, 7), False)


@needs_kernels
@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 15, 40])
@pytest.mark.parametrize("activation", [0, 1, 2])
def test_the_lora_kernel_equals_its_float64_oracle(factor_dtype, rows, activation):
    """cpu_kernels.lora: activation(x @ w1) @ w2 (none, tanh, sigmoid) with fp32 or bf16 factors read as stored
    (widened exactly), against float64 from the same values; C = 300 leaves chunks and lanes over."""
    gen = torch.Generator().manual_seed(rows + 10 * activation)
    x = torch.randn(rows, 300, generator=gen)
    w1 = (torch.randn(300, 40, generator=gen) / 10).to(factor_dtype)
    w2 = (torch.randn(40, 70, generator=gen) / 5).to(factor_dtype)
    hidden = x.double() @ w1.double()
    hidden = [hidden, torch.tanh(hidden), torch.sigmoid(hidden)][activation]
    want = hidden @ w2.double()
    got = cpu_kernels.kernels().lora(x, w1, w2, activation)
    assert got.dtype == torch.float32 and got.shape == (rows, 70)
    assert (got.double() - want).abs().max().item() <= 1e-5 * (1 + want.abs().max().item())


@needs_kernels
def test_the_lora_kernel_refuses_what_it_cannot_read():
    kernels = cpu_kernels.kernels()
    x, w1, w2 = torch.zeros(3, 8), torch.zeros(8, 4), torch.zeros(4, 6)
    with pytest.raises(RuntimeError, match="x must be a contiguous fp32 CPU tensor"):
        kernels.lora(x.double(), w1, w2, 0)
    with pytest.raises(RuntimeError, match="factors must be"):
        kernels.lora(x, torch.zeros(7, 4), w2, 0)
    with pytest.raises(RuntimeError, match="must be a contiguous fp32 or bf16"):
        kernels.lora(x, w1.half(), w2, 0)
    with pytest.raises(RuntimeError, match="activation 0"):
        kernels.lora(x, w1, w2, 3)


@needs_kernels
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_short_rwkv7_prompts_take_the_lora_kernel_and_decode_steps_do_not(dtype, make_checkpoint, monkeypatch):
    """An RWKV-7 prompt of fewer than CPU_LORA_KERNEL_ROWS tokens multiplies its LoRAs in the C++ kernel (four a
    layer, three in the first), a longer one and a decode step in PyTorch; the kernel's read equals PyTorch's up
    to fp32 rounding."""
    from rwkv_chat.models import rwkv7
    model = load_model(make_checkpoint("7", n_layer=2, n_embd=128, seed=4).path, device="cpu", dtype=dtype, fast=False)
    real = cpu_kernels.kernels()
    calls = []

    class Counting:  # the kernels, counting the rows of each LoRA call
        def __getattr__(self, name):
            return getattr(real, name)

        def lora(self, *args):
            calls.append(args[0].shape[0])
            return real.lora(*args)
    counting = Counting()
    monkeypatch.setattr(rwkv7, "cpu_kernels", SimpleNamespace(
        built_for=lambda tensor: counting if tensor.device.type == "cpu" else None,
        scan_each_sequence=cpu_kernels.scan_each_sequence))
    start = model.zero_state(1)
    short = torch.tensor([random_tokens(rwkv7.CPU_LORA_KERNEL_ROWS - 1, seed=5)])
    fused, fused_state = model._read(short, start)
    assert calls == [short.shape[1]] * 7  # layer 0 has no value LoRA
    calls.clear()
    model._read(torch.tensor([random_tokens(rwkv7.CPU_LORA_KERNEL_ROWS, seed=5)]), start)
    model._read(torch.tensor([[7], [8]]), model.zero_state(2))  # a decode step of two rows
    assert calls == []
    monkeypatch.setattr(rwkv7, "CPU_LORA_KERNEL_ROWS", 0)
    assert_same_read(fused, fused_state, *model._read(short, start))


@needs_kernels
def test_the_scans_refuse_operands_of_the_wrong_shape_or_kind():
    kernels = cpu_kernels.kernels()
    c = 8
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        kernels.wkv4_scan(torch.zeros(c), torch.zeros(c), torch.zeros(4, c).double(), torch.zeros(4, c),
                          torch.zeros(3, c))
    with pytest.raises(RuntimeError, match=r"state \[3, C\]"):
        kernels.wkv4_scan(torch.zeros(c), torch.zeros(c), torch.zeros(4, c), torch.zeros(4, c), torch.zeros(2, c))
    with pytest.raises(RuntimeError, match=r"\[T, H\*S\]"):
        kernels.wkv5_scan(torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(3, 4), torch.zeros(3, 5),
                          torch.zeros(3, 4), torch.zeros(1, 4, 4))
    with pytest.raises(RuntimeError, match=r"w \[H, S\] or \[T, H\*S\]"):
        kernels.wkv5_scan(torch.zeros(2, 4), torch.zeros(1, 4), torch.zeros(3, 4), torch.zeros(3, 4),
                          torch.zeros(3, 4), torch.zeros(1, 4, 4))
    with pytest.raises(RuntimeError, match=r"must all be \[T, H\*N\]"):
        kernels.wkv7_scan(*(torch.zeros(3, 4) for _ in range(4)), torch.zeros(2, 4), torch.zeros(3, 4),
                          torch.zeros(1, 4, 4))


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
    model = load_model(ckpt.path, device="cpu", dtype="bf16")
    assert model.runner is not None and model.runner.cpu_layers is None
    assert model.runner.act_dtype == torch.bfloat16  # PyTorch's bf16 products round their inputs
    reference = load_model(ckpt.path, device="cpu", dtype="bf16", fast=False)
    tokens = random_tokens(20, seed=4)
    logits, expected = logits_after(model, tokens, (5, 50)), logits_after(reference, tokens, (5, 50))
    # a few bf16 steps of logits up to ~4 (0.03 each): 0.125 measured with the products capped to AVX2's
    assert (logits - expected).abs().max().item() < 0.25


@needs_kernels
def test_the_decode_stack_refuses_an_int8_weight_without_its_scales(make_checkpoint):
    ckpt = make_checkpoint("4", n_layer=1, n_embd=64, seed=7)
    model = load_model(ckpt.path, device="cpu", dtype="int8")
    tensors = list(model.runner.cpu_layers[0])
    tensors[6] = torch.empty(0)  # the r|k|v weight's scales
    stack = cpu_kernels.DecodeStack([tensors], 4, 3)
    state = model.zero_state()
    with pytest.raises(RuntimeError, match="scale per row"):
        stack.step(torch.zeros(1, 64), state.shift, state.wkv, state.shift.clone(), state.wkv.clone())


@needs_kernels
@pytest.mark.parametrize("widened", [True, False])
def test_a_weight_the_gemm_would_widen_streams_below_widened_stream_rows(monkeypatch, widened):
    """A bf16 weight on a CPU without bf16 units (the GEMM would widen it to fp32 first) streams through the C++
    kernels below quant.WIDENED_STREAM_ROWS rows, in a prefill as in a decode step; with the units only below
    MANY_ROWS."""
    from rwkv_chat.kernels import quant
    cpu_kernels.kernels()  # built, as loading a model on a CPU does
    monkeypatch.setattr(quant, "widened_on_cpu", lambda weight: widened)
    streamed = []
    stream = cpu_kernels.linear
    monkeypatch.setattr(cpu_kernels, "linear", lambda x, *rest: streamed.append(x.shape[0]) or stream(x, *rest))
    gen = torch.Generator().manual_seed(3)
    weight = (torch.randn(64, 96, generator=gen) / 10).to(torch.bfloat16)
    limit = quant.WIDENED_STREAM_ROWS if widened else quant.MANY_ROWS
    for rows in (quant.MANY_ROWS - 1, quant.MANY_ROWS, limit - 1, limit):
        x = torch.randn(rows, 96, generator=gen)
        out = quant.cpu_linear(x, weight)
        assert out.dtype == torch.float32
        assert torch.allclose(out, x @ weight.float().T, rtol=2e-2, atol=3e-2)  # a bf16 GEMM rounds x and out
    assert streamed == [rows for rows in (quant.MANY_ROWS - 1, quant.MANY_ROWS, limit - 1) if rows < limit]
