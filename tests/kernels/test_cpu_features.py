"""The CPU path chosen by what the CPU has (kernels/cpu_features.py), and every path this machine can run held to
the product it promises (kernels/quant.py's cpu_linear), against float64 products of the stored weights."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rwkv_chat.kernels import cpu_kernels, cpu_features as features_module, quant
from rwkv_chat.kernels.cpu_features import (ISA_VARIABLE, MAX_PREFETCH, PATHS, PREFETCH_INTEL, PREFETCH_VARIABLE,
                                            PREFETCH_ZEN3, PREFETCH_ZEN4, PREFETCH_ZEN5, PREFETCH_ZEN5_ROWS_BELOW,
                                            CpuFeatures, cpu_features, detected)

RUNNABLE = [path for path in PATHS if detected().capped(path).path == path]  # its best path and those below it


def runnable(path: str):
    return pytest.param(path, marks=pytest.mark.skipif(path not in RUNNABLE, reason=f"this CPU has no {path}"))


def test_the_variable_caps_the_features_and_refuses_unknown_values(monkeypatch):
    best = detected()
    monkeypatch.delenv(ISA_VARIABLE, raising=False)
    assert cpu_features() == best
    for path in RUNNABLE:
        monkeypatch.setenv(ISA_VARIABLE, path)
        assert cpu_features().path == path
    monkeypatch.setenv(ISA_VARIABLE, "amx")  # more than a CPU has gives what it has
    assert cpu_features() == best
    monkeypatch.setenv(ISA_VARIABLE, "avx2")
    assert not cpu_features().native_matmul(torch.bfloat16) and cpu_features().native_matmul(torch.float32)
    assert "capped" in features_module.describe()
    assert cpu_features().int8_gemm  # the AVX2 GEMM
    monkeypatch.setenv(ISA_VARIABLE, "sse9")
    with pytest.raises(ValueError, match=f"{ISA_VARIABLE} must be one of baseline, avx2, avx_vnni, avx512, "
                                         "avx512_bf16, amx"):
        cpu_features()


def test_int8_prefill_products_take_a_gemm_on_vnni_cpus_and_on_avx2_cpus():
    vnni = CpuFeatures(avx2=True, avx512=True, avx512_vnni=True, avx512_bf16=True)
    assert vnni.int8_gemm and vnni.int8_dot == "avx512_vnni"
    assert replace(vnni, amx_bf16=True).int8_gemm  # faster than widening to AMX's bf16 tiles (measured)
    assert vnni.capped("avx2").int8_gemm and vnni.capped("avx2").int8_dot == "avx2"  # the AVX2 GEMM
    assert not replace(vnni, avx512_vnni=False).int8_gemm  # AVX-512 without VNNI: widened to fp32 (not measured)
    assert not vnni.capped("baseline").int8_gemm
    client = CpuFeatures(avx2=True, avx_vnni=True)  # Intel's Alder Lake and later client CPUs: no AVX-512
    assert client.path == "avx_vnni" and client.int8_dot == "avx_vnni" and client.int8_gemm
    assert client.capped("avx2").int8_dot == "avx2" and client.capped("avx2").int8_gemm
    assert client.capped("avx512") == client  # more than it has gives what it has
    both = replace(vnni, avx_vnni=True)  # Sapphire Rapids, Zen 5: the AVX-512 products win
    assert both.int8_dot == "avx512_vnni" and both.capped("avx_vnni").int8_dot == "avx_vnni"
    assert CpuFeatures(avx_vnni=True).path == "baseline"  # AVX-VNNI without AVX2 is nothing these kernels use


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's /proc/cpuinfo")
def test_what_is_detected_is_what_the_kernel_reports():
    """An independent oracle: the CPU flags Linux lists (what PyTorch's checks must agree with)."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    best = detected()
    assert best.avx2 == ("avx2" in flags)
    assert best.avx512_bf16 == ("avx512_bf16" in flags)
    assert best.avx512_vnni == ("avx512_vnni" in flags)
    assert best.avx_vnni == ("avx_vnni" in flags)
    assert best.int8_dot == ("avx512_vnni" if best.avx512 and "avx512_vnni" in flags else
                             "avx_vnni" if not best.avx512 and {"avx2", "avx_vnni"} <= flags else "avx2")
    # AMX also needs the kernel's permission for its tile state, which a CPU listing the flags may lack
    assert not best.amx_bf16 or {"amx_bf16", "amx_tile"} <= flags
    assert best.native_matmul(torch.bfloat16) == (("avx512_bf16" in flags) or best.amx_bf16)


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's /proc/cpuinfo")
def test_the_prefetch_distance_follows_the_vendor_and_the_variable(monkeypatch):
    """Intel CPUs prefetch every row into L2 by default, AMD's Zen 5 (family 26) and later rows under 2 KiB, Zen 4
    (family 25 with AVX-512) and Zen 3 (without) every row into L2, older AMD CPUs none (the vendor, family and
    flags as Linux names them are the oracle); the variable sets any distance in its bound for every row, keeps
    the CPU's level and the instruction-set cap, and refuses the rest by name."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    vendor_ids = {line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id")}
    families = {int(line.split(":", 1)[1]) for line in lines if line.startswith("cpu family")}
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    intel = vendor_ids == {"GenuineIntel"}
    zen5 = vendor_ids == {"AuthenticAMD"} and min(families, default=0) >= 26
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags  # what PyTorch's AVX512 check asks for
    zen4 = vendor_ids == {"AuthenticAMD"} and families == {25} and avx512
    zen3 = vendor_ids == {"AuthenticAMD"} and families == {25} and not avx512
    monkeypatch.delenv(PREFETCH_VARIABLE, raising=False)
    monkeypatch.delenv(ISA_VARIABLE, raising=False)
    expected = (PREFETCH_INTEL if intel else PREFETCH_ZEN5 if zen5 else PREFETCH_ZEN4 if zen4 else
                PREFETCH_ZEN3 if zen3 else 0)
    assert cpu_features().prefetch_bytes == expected
    assert cpu_features().prefetch_rows_below == (PREFETCH_ZEN5_ROWS_BELOW if zen5 else 0)
    assert cpu_features().prefetch_to_l2 == (zen4 or zen3 or intel)
    assert ("prefetched" in features_module.describe()) == (intel or zen5 or zen4 or zen3)
    assert ("into L2" in features_module.describe()) == (zen4 or zen3 or intel)
    monkeypatch.setenv(ISA_VARIABLE, "avx2")
    assert cpu_features().prefetch_to_l2 == (zen4 or zen3 or intel)  # the CPU's generation, not the capped path
    assert cpu_features().prefetch_bytes == (0 if zen4 else expected)  # the Zen 4's AVX2 products lost with it
    for value in ("0", "2048", f"{MAX_PREFETCH}"):
        monkeypatch.setenv(PREFETCH_VARIABLE, value)
        assert cpu_features().prefetch_bytes == int(value) and cpu_features().path == "avx2"
        assert cpu_features().prefetch_rows_below == 0
        assert cpu_features().prefetch_to_l2 == (zen4 or zen3 or intel)
    for bad in ("-64", f"{MAX_PREFETCH + 1}", "4k"):
        monkeypatch.setenv(PREFETCH_VARIABLE, bad)
        with pytest.raises(ValueError, match=f"{PREFETCH_VARIABLE} must be a whole number of bytes from 0 "
                                             f"\\(no prefetch\\) to {MAX_PREFETCH:,}.*got '{bad}'"):
            cpu_features()


@pytest.mark.parametrize("path", [runnable(p) for p in ("avx2", "avx_vnni", "avx512", "avx512_bf16", "amx")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("rows", [3, 40, 130])  # a decode step's few rows (C++ kernels), a prefill's many (GEMM;
# from 40 rows for int8 and where the CPU has units for the dtype, from 130 where a GEMM would widen it)
def test_each_path_computes_the_product_it_promises(int8_dot, path, dtype, rows):
    int8_dot(path)  # the kernels built, as loading a model on a CPU does (else few rows stay with PyTorch)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(rows, 512, generator=gen)
    w32 = torch.randn(384, 512, generator=gen) / 20
    if dtype == torch.int8:
        weight, scale = quant.quantize_rows(w32)
        exact_w = weight.double() * scale.double()[:, None]
    else:
        weight, scale = w32.to(dtype), None
        exact_w = weight.double()
    out = quant.cpu_linear(x, weight, scale)
    features = cpu_features()
    streamed_below = quant.WIDENED_STREAM_ROWS if quant.widened_on_cpu(weight) else quant.MANY_ROWS
    few_in_kernels = rows < streamed_below and cpu_kernels.handles(x, weight)
    many = rows >= quant.MANY_ROWS and not few_in_kernels
    int8_gemm = dtype == torch.int8 and many and features.int8_gemm  # the integer GEMM: int8 activations
    on_units = many and not int8_gemm and (
        (dtype in (torch.bfloat16, torch.int8) and features.native_matmul(torch.bfloat16))
        or (dtype == torch.float16 and features.native_matmul(torch.float16)))
    if on_units:  # the GEMM on the CPU's bf16 (fp16) units reads and writes that dtype, and sums in fp32
        inputs = x.to(torch.float16 if dtype == torch.float16 else torch.bfloat16).double()
    elif many or few_in_kernels:
        inputs = x.double()  # widened to an fp32 GEMM, or streamed by the C++ kernels with fp32 inputs
    else:
        inputs = x.to(torch.bfloat16 if dtype == torch.int8 else dtype).double()  # PyTorch's few-row products
    expected = inputs @ exact_w.T
    bound = inputs.abs() @ exact_w.abs().T  # an accumulation in fp32 is off by a few ulps of this at most
    rounding = 2.0 ** -8 if on_units or not (many or few_in_kernels) else 0.0  # a half-precision result
    activations = 0.0
    if dtype == torch.int8 and few_in_kernels:
        # int16 activations: each off by at most half its row's step max|x| / 32767
        activations = (x.double().abs().amax(1, keepdim=True) / 65534) @ exact_w.abs().sum(1)[None, :]
    if int8_gemm:  # int8 activations: each off by at most half its 32-column block's step max|x_block| / 127
        half_steps = x.double().reshape(rows, -1, 32).abs().amax(2) / 254
        activations = half_steps @ exact_w.abs().reshape(exact_w.shape[0], -1, 32).sum(2).T
    assert out.dtype == torch.float32 and out.shape == (rows, 384)
    error = (out.double() - expected).abs()
    assert (error <= rounding * expected.abs() + 1e-5 * bound + activations + 1e-6).all(), \
        f"{path} {dtype} {rows} rows: max error {error.max().item():.3g}"
    unscaled = out if scale is None else out / scale  # int8: the row scales multiply the GEMM's result
    half = unscaled.to(torch.float16 if dtype == torch.float16 else torch.bfloat16).float()
    is_half = torch.allclose(half, unscaled, rtol=1e-6, atol=0)  # (int8: up to the division's rounding)
    assert is_half == on_units  # which path ran: only the units' products are half-precision values


INTEL_INFO = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
ZEN4_INFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
ZEN5_INFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"


@pytest.mark.parametrize("info, avx512, vendor, family, prefetch", [
    (INTEL_INFO, True, "intel", 6, (PREFETCH_INTEL, 0, True)),
    (ZEN4_INFO, True, "amd", 25, (PREFETCH_ZEN4, 0, True)),
    (ZEN4_INFO.replace(": 17", ": 33"), False, "amd", 25, (PREFETCH_ZEN3, 0, True)),  # Zen 3: no AVX-512
    (ZEN4_INFO.replace(": 25", ": 23"), False, "amd", 23, (0, 0, False)),  # a Zen 2: not measured
    (ZEN5_INFO, True, "amd", 26, (PREFETCH_ZEN5, PREFETCH_ZEN5_ROWS_BELOW, False)),
    (ZEN5_INFO.replace(": 26", ": 27"), True, "amd", 27, (PREFETCH_ZEN5, PREFETCH_ZEN5_ROWS_BELOW, False)),
    ("Intel64 Family 6 Model 85 Stepping 7, GenuineIntel", True, "intel", 0, (PREFETCH_INTEL, 0, True)),  # Windows
    ("", True, "", 0, (0, 0, False)),
])
def test_the_default_prefetch_by_maker_and_family(monkeypatch, info, avx512, vendor, family, prefetch):
    """/proc/cpuinfo texts of an Intel, a Zen 3, a Zen 4 and a Zen 5 (and Windows' platform.processor()) with and
    without AVX-512 give their maker, family and default prefetch; detected() takes them from the text it reads."""
    assert features_module._vendor_and_family(info) == (vendor, family)
    monkeypatch.setattr(features_module, "_cpu_info", lambda: info)
    monkeypatch.setattr(features_module.platform, "machine", lambda: "x86_64")
    real_check = features_module._check
    monkeypatch.setattr(features_module, "_check",
                        lambda name: avx512 if name == "_is_avx512_supported" else real_check(name))
    features_module.detected.cache_clear()
    try:
        assert (detected().vendor, detected().prefetch_bytes, detected().prefetch_rows_below,
                detected().prefetch_to_l2) == (vendor, *prefetch)
        capped = detected().capped("avx2")  # only the Zen 4's prefetch into L2 stops below the avx512 path
        assert capped.prefetch_bytes == (0 if vendor == "amd" and prefetch[2] and avx512 else prefetch[0])
        assert detected().capped("avx512").prefetch_bytes == prefetch[0]
    finally:
        features_module.detected.cache_clear()
