"""Every fast path against the plain PyTorch path (model.py), on random-weight checkpoints of every architecture.

CPU always; the Triton kernels also under Triton's interpreter when Triton is installed (subprocess), and the
CUDA graphs + Triton path when a GPU is present. Speed is the benchmark's business (benchmarks.bench), not this.
"""

from __future__ import annotations

import math

import pytest
import torch

from rwkv_chat import load_model
from rwkv_chat.kernels import cpu_kernels, parallel_wkv, quant, triton_kernels
from rwkv_chat.kernels.cpu_features import ISA_VARIABLE, describe, detected
from rwkv_chat.runtime.fast_path import attach_fast_path
from rwkv_chat.runtime.packing import PackedLinear
from rwkv_chat.models.rwkv4 import wkv4_step
from rwkv_chat.models.rwkv5 import wkv5_step
from rwkv_chat.state import RwkvState
from reference import (assert_decode_into_equals_decode, assert_states_passed_in_stay_unchanged, int8_one_row_case,
                       logits_after, random_tokens)
from triton_interpreter import run_interpreted

VERSIONS = ["4", "5.0", "5.2"]
SHAPE = dict(n_layer=2, n_embd=128)
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module", params=VERSIONS, ids=lambda v: f"v{v}")
def ckpt(request, make_checkpoint):
    return make_checkpoint(request.param, **SHAPE, seed=5)


def plain_and_fast(path, dtype="fp32", device="cpu", **options):
    plain = load_model(path, device=device, dtype=dtype, fast=False)
    fast = attach_fast_path(load_model(path, device=device, dtype=dtype, fast=False), **options)
    return plain, fast


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------- recurrences

@pytest.mark.parametrize("chunk", [1, 5, 16])
@pytest.mark.parametrize("scan", ["loop", "matrix"])
@pytest.mark.parametrize("max_time_decay", [3.5, 5.0])  # 5.0: too fast for the factored form at chunk 16
def test_wkv5_segment_equals_token_by_token(chunk, scan, max_time_decay):
    gen = torch.Generator().manual_seed(chunk)
    batch, heads, size, length = 2, 2, 64, 37
    log_w = -torch.exp(torch.rand(heads, size, generator=gen) * (max_time_decay + 6) - 6)
    log_w[0, 0] = -math.exp(max_time_decay)  # the fastest decay is in every draw
    u = torch.rand(heads, size, generator=gen)
    r, k, v = (torch.randn(batch, heads, length, size, generator=gen) for _ in range(3))
    s0 = torch.randn(batch, heads, size, size, generator=gen)
    s, rows = s0, []
    for t in range(length):
        out, s = wkv5_step(log_w, u, r[:, :, t], k[:, :, t], v[:, :, t], s)
        rows.append(out)
    out, s_end = parallel_wkv.wkv5_segment(log_w, u, r, k, v, s0, chunk, scan)
    assert torch.allclose(out, torch.stack(rows, 2), rtol=1e-4, atol=1e-3)
    assert torch.allclose(s_end, s, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
@pytest.mark.parametrize("empty_state", [False, True])
@pytest.mark.parametrize("k_scale", [3.0, 40.0])  # 40: keys spread far beyond fp32's exp range in a chunk
def test_wkv4_segment_equals_token_by_token(chunk, empty_state, k_scale):
    gen = torch.Generator().manual_seed(chunk)
    batch, channels, length = 2, 96, 37
    w = -torch.exp(torch.rand(channels, generator=gen) * 9 - 6)
    u = torch.rand(channels, generator=gen) * 2 - 1
    k = torch.randn(batch, length, channels, generator=gen) * k_scale
    v = torch.randn(batch, length, channels, generator=gen)
    if empty_state:
        aa, bb, pp = torch.zeros(batch, channels), torch.zeros(batch, channels), torch.full((batch, channels), -1e30)
    else:
        aa, bb, pp = torch.randn(batch, channels), torch.rand(batch, channels) + 0.1, torch.randn(batch, channels)
    # oracle: the token-by-token recurrence in float64
    a, b, p, rows = aa.double(), bb.double(), pp.double(), []
    for t in range(length):
        out, a, b, p = wkv4_step(w.double(), u.double(), k[:, t].double(), v[:, t].double(), a, b, p)
        rows.append(out)
    out, a2, b2, p2 = parallel_wkv.wkv4_segment(w, u, k, v, aa, bb, pp, chunk)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), torch.stack(rows, 1), rtol=1e-5, atol=1e-5)
    # states may differ in their common log-scale; compare the values they stand for. The fp32 log-scale p
    # (~100 with keys of scale 40) carries an absolute rounding error that becomes a relative one in exp(p).
    rtol = 1e-4 if k_scale < 10 else 1e-3
    assert torch.allclose(a2.double() * torch.exp(p2.double() - p), a, rtol=rtol, atol=1e-5)
    assert torch.allclose(b2.double() * torch.exp(p2.double() - p), b, rtol=rtol, atol=1e-5)


# ------------------------------------------------------------------------------------- int8

@pytest.mark.parametrize("block", [quant.QUANTIZE_BLOCK, 600, 1])  # one block; 3 rows a block; a row each
def test_int8_rows_round_trip_within_half_a_step(monkeypatch, block):
    monkeypatch.setattr(quant, "QUANTIZE_BLOCK", block)
    w = (torch.randn(64, 200) * torch.rand(64, 1)).to(torch.bfloat16)
    q, scale = quant.quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    expected_scale = w.float().abs().amax(dim=1) / 127
    assert torch.equal(scale, expected_scale)
    assert torch.equal(q, torch.round(w.float() / expected_scale[:, None]).to(torch.int8))
    assert ((quant.dequantize(q, scale) - w.float()).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no GPU"))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantised_weights_are_the_fp32_products_rounded_once(device, dtype):
    """q * scale as an fp32 product rounded to the dtype once (the exact product in float64, rounded to fp32 and
    then to the dtype, is the oracle); scales near fp32's limits included (fp16 overflows to inf)."""
    w = torch.randn(96, 80, device=device)
    q, scale = quant.quantize_rows(w)
    scale[0], scale[1] = 1e-30, 3e38 / 127
    expected = (q.double() * scale.double()[:, None]).float().to(dtype)
    got = quant.dequantize(q, scale, dtype)
    assert got.dtype == dtype and got.device == w.device
    assert torch.equal(got, expected)


def test_int8_linear_equals_dequantised_product_on_cpu():
    w, x = torch.randn(300, 96), torch.randn(5, 96)
    q, scale = quant.quantize_rows(w)
    expected = x @ quant.dequantize(q, scale).T
    got = quant.linear(x, q, scale)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= 0.02 * expected.abs().max().item()  # bf16 activations


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [16, 64, quant.CUDA_INT8_EXPAND_ROWS - 1, quant.CUDA_INT8_EXPAND_ROWS])
def test_cuda_int8_products_of_many_rows_equal_the_dequantised_product(rows):
    # fewer than CUDA_INT8_EXPAND_ROWS rows take the Triton kernel, more the weight expanded to bf16; a packed
    # projection's segments take the same products
    w, x = torch.randn(384, 256, device="cuda"), torch.randn(rows, 256, device="cuda")
    q, scale = quant.quantize_rows(w)
    expected = x @ quant.dequantize(q, scale).T
    packed = PackedLinear(q, scale, (0, 128, 384))
    for got in (quant.linear(x, q, scale), torch.cat([packed(x, 0), packed(x, 1)], dim=1)):
        assert got.dtype == torch.float32
        assert (got - expected).abs().max().item() <= 0.02 * expected.abs().max().item()  # bf16 activations
    expanded = rows >= quant.CUDA_INT8_EXPAND_ROWS or not triton_kernels.AVAILABLE
    assert quant.linear(x, q, scale, widen=False).dtype == (torch.bfloat16 if expanded else torch.float32)


def test_int8_model_halves_bf16_memory_and_keeps_the_plain_path_working(ckpt):
    bf16 = load_model(ckpt.path, device="cpu", dtype="bf16", fast=False)
    int8 = load_model(ckpt.path, device="cpu", dtype="int8", fast=False)
    assert int8.dtype == torch.int8 and int8.blocks[0].att.key.weight.dtype == torch.int8
    projections = lambda m: sum(p.numel() * p.element_size() for n, p in m.named_parameters()  # noqa: E731
                                if n.endswith("weight") and p.dim() == 2 and not n.startswith("emb"))
    assert projections(int8) * 2 == projections(bf16)
    tokens = random_tokens(30, seed=1)
    plain, _ = int8.forward(tokens)
    attach_fast_path(int8)
    fast, _ = int8.forward(tokens)
    assert max_diff(plain, fast) <= 0.25  # both int8 weights; activations/logits rounded differently
    assert int(plain.argmax()) == int(fast.argmax())


# ------------------------------------------------------------------------------------- CPU fast path

def test_fast_path_fp32_equals_plain_path(ckpt):
    plain, fast = plain_and_fast(ckpt.path)
    tokens = random_tokens(75, seed=2)  # whole chunks and a remainder
    p_logits, p_state = plain.forward(tokens)
    f_logits, f_state = fast.forward(tokens)
    assert max_diff(p_logits, f_logits) <= 1e-4
    assert torch.allclose(f_state.shift, p_state.shift, atol=1e-4)
    assert torch.allclose(f_state.wkv, p_state.wkv, rtol=1e-4, atol=1e-4)
    p_all, _ = plain.forward(tokens[:40], all_logits=True)
    f_all, _ = fast.forward(tokens[:40], all_logits=True)
    assert f_all.shape == p_all.shape and max_diff(p_all, f_all) <= 1e-4
    for token in (5, 500, 50000):
        p_logits, p_state = plain.forward([token], p_state)
        f_logits, f_state = fast.forward([token], f_state)
        assert max_diff(p_logits, f_logits) <= 1e-4
        assert torch.allclose(f_state.wkv, p_state.wkv, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("version", ["4", "5.2"])
def test_fast_decode_of_rows_of_no_whole_number_of_vectors_equals_plain_path(version, make_checkpoint):
    """36 channels (heads of 12): the C++ step's element-wise loops end in masked lanes, its heads run scalar."""
    shape = dict(n_layer=2, n_embd=36) if version == "4" else dict(n_layer=2, n_embd=36, head_size=12)
    plain, fast = plain_and_fast(make_checkpoint(version, seed=3, **shape).path)
    states = [plain.forward(random_tokens(5 + i, seed=i))[1] for i in range(3)]
    state, ids = RwkvState.stack(states), torch.tensor([5, 500, 50000])
    for _ in range(3):
        la, sa = plain.decode_batch(ids, state)
        lb, sb = fast.decode_batch(ids, state)
        assert max_diff(la, lb) <= 1e-4
        assert torch.allclose(sa.wkv, sb.wkv, rtol=1e-4, atol=1e-4)
        state, ids = sa, la.argmax(-1)


def test_fast_decode_batch_rows_equal_single_decodes(ckpt):
    _, fast = plain_and_fast(ckpt.path)
    states = [fast.forward(random_tokens(9 + i, seed=i))[1] for i in range(3)]
    tokens = torch.tensor([7, 700, 7000])
    logits, batched = fast.decode_batch(tokens, RwkvState.stack(states))
    for i, state in enumerate(states):
        single, new = fast.forward([int(tokens[i])], state)
        assert max_diff(logits[i], single) <= 1e-5
        assert torch.allclose(batched[i].wkv, new.wkv, atol=1e-5)
        assert torch.allclose(batched[i].shift, new.shift, atol=1e-5)


def test_fast_decode_into_state_buffers_equals_decode_batch(ckpt):
    _, fast = plain_and_fast(ckpt.path)
    assert_decode_into_equals_decode(fast, 1e-5)


def test_fast_split_prefill_equals_whole(ckpt):
    _, fast = plain_and_fast(ckpt.path)
    tokens = random_tokens(100, seed=3)
    whole, whole_state = fast.forward(tokens)
    _, first = fast.forward(tokens[:33])
    split, split_state = fast.forward(tokens[33:], first)
    assert max_diff(whole, split) <= 1e-4
    assert torch.allclose(whole_state.wkv, split_state.wkv, rtol=1e-4, atol=1e-4)


def test_fast_path_never_changes_the_state_passed_in(ckpt):
    _, fast = plain_and_fast(ckpt.path)
    assert_states_passed_in_stay_unchanged(fast)


def test_packing_shares_the_weights_with_the_model(ckpt):
    model = load_model(ckpt.path, device="cpu", dtype="bf16", fast=False)
    before = sum(p.numel() for p in model.parameters())
    attach_fast_path(model)
    layer = model.runner.layers[0]
    packed = layer.att.weight
    key = model.blocks[0].att.key.weight
    assert key.data_ptr() == packed[layer.att.bounds[1]:].data_ptr()  # r | k | v (| g): k is the second block
    assert model.blocks[0].ffn.receptance.weight.data_ptr() == layer.ffn.weight[layer.ffn.bounds[1]:].data_ptr()
    assert sum(p.numel() for p in model.parameters()) == before


def greedy_agreement(model, ckpt, steps=60) -> float:
    """Argmax agreement with the fp32 plain path, teacher-forced on its greedy tokens."""
    reference = load_model(ckpt.path, device="cpu", dtype="fp32", fast=False)
    prompt = random_tokens(64, seed=11)
    expected, ref_state = reference.forward(prompt)
    logits, state = model.forward(prompt)
    hits = []
    for _ in range(steps):
        hits.append(int(logits.argmax()) == int(expected.argmax()))
        token = int(expected.argmax())
        logits, state = model.forward([token], state)
        expected, ref_state = reference.forward([token], ref_state)
    return sum(hits) / len(hits)


@pytest.mark.parametrize("isa", sorted({"avx2", detected().path}))  # fp32 GEMMs; the CPU's own best
@pytest.mark.parametrize("version", ["4", "5.2"])
def test_bf16_and_int8_fast_paths_track_fp32(version, isa, make_checkpoint, monkeypatch):
    """Random tiny models are chaotic (the plain bf16 path itself agrees ~95% here), so the fast bf16 path
    is held to the plain bf16 path's agreement, and int8 to 90%; the benchmark measures the real shapes.
    Every CPU path this machine runs (kernels/cpu_features.py) is held to it."""
    monkeypatch.setenv(ISA_VARIABLE, isa)
    ckpt = make_checkpoint(version, n_layer=2, n_embd=256, seed=3)
    plain = greedy_agreement(load_model(ckpt.path, device="cpu", dtype="bf16", fast=False), ckpt)
    assert greedy_agreement(load_model(ckpt.path, device="cpu", dtype="bf16"), ckpt) >= plain - 0.02
    assert greedy_agreement(load_model(ckpt.path, device="cpu", dtype="int8"), ckpt) >= 0.9


def test_fp16_rescaled_fast_path_tracks_fp32(ckpt):
    fp16 = load_model(ckpt.path, device="cpu", dtype="fp16")
    assert fp16.runner is not None and fp16.runner.rescale_every == 6
    tokens = random_tokens(64, seed=2)
    logits, _ = fp16.forward(tokens, all_logits=True)
    expected, _ = load_model(ckpt.path, device="cpu").forward(tokens, all_logits=True)
    assert torch.isfinite(logits).all()
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.9


def test_an_architecture_without_kernels_runs_the_pytorch_step(ckpt, monkeypatch):
    """The fast runner uses only the kernels an architecture declares (a new one may have none yet)."""
    from rwkv_chat.models import architecture_for
    architecture = architecture_for(ckpt.version)
    monkeypatch.setattr(architecture, "cpu_kernel_id", None)
    monkeypatch.setattr(architecture, "triton_decode", False)
    plain = load_model(ckpt.path, device="cpu", dtype="fp32", fast=False)
    fast = attach_fast_path(load_model(ckpt.path, device="cpu", dtype="fp32", fast=False), use_triton=True)
    assert fast.runner.cpu_layers is None and not fast.runner.use_triton
    tokens = random_tokens(40, seed=5)
    assert max_diff(logits_after(plain, tokens, (7, 70)), logits_after(fast, tokens, (7, 70))) <= 1e-4


def test_load_model_turns_the_fast_path_on_except_for_cpu_fp32(ckpt):
    assert load_model(ckpt.path, device="cpu").runner is None
    assert load_model(ckpt.path, device="cpu", dtype="bf16").runner is not None
    assert load_model(ckpt.path, device="cpu", dtype="int8").runner is not None
    assert load_model(ckpt.path, device="cpu", dtype="bf16", fast=False).runner is None


def test_the_first_cpu_fast_load_of_a_process_says_it_prepares_the_kernels(ckpt, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_built", {})  # as in a fresh process
    preparing = "preparing the CPU kernels"
    stages = []
    load_model(ckpt.path, device="cpu", progress=stages.append)  # fp32 on the CPU: the plain path, no kernels
    assert stages[-1].startswith("CPU path ") and not cpu_kernels.tried()  # each CPU load names its path
    load_model(ckpt.path, device="cpu", dtype="bf16", progress=stages.append)
    assert stages[-1].startswith(preparing) and cpu_kernels.tried()
    load_model(ckpt.path, device="cpu", fast=True, progress=stages.append)  # once tried, loads say nothing of it
    assert stages[-1].startswith("CPU path ") and sum(s.startswith(preparing) for s in stages) == 1
    assert stages[0].startswith("placing") and stages[1] == describe() == f"CPU path {detected().path}: " + \
        describe().split(": ", 1)[1]


def test_a_cpu_path_the_variable_does_not_name_is_refused_at_load(ckpt, monkeypatch):
    monkeypatch.setenv(ISA_VARIABLE, "avx1024")
    with pytest.raises(ValueError, match=f"{ISA_VARIABLE} must be one of"):
        load_model(ckpt.path, device="cpu", dtype="bf16")


# ------------------------------------------------------------------------------------- Triton (interpreter)

INTERPRETER_SCRIPT = """
    import sys
    import torch
    from rwkv_chat import load_model
    from rwkv_chat.kernels import triton_kernels
    from rwkv_chat.runtime.fast_path import attach_fast_path
    from rwkv_chat.state import RwkvState
    path, dtype = sys.argv[1:]
    triton_kernels.LN_MIX_CHUNK = 32  # the residual's LayerNorm spread over programs a row (C = 128)
    torch.manual_seed(0)
    plain = load_model(path, device="cpu", dtype=dtype, fast=False)
    fast = attach_fast_path(load_model(path, device="cpu", dtype=dtype, fast=False), use_triton=True)
    tokens = torch.randint(1, plain.config.vocab_size, (21,)).tolist()
    a, sa = plain.forward(tokens)
    b, sb = fast.forward(tokens)
    worst = (a - b).abs().max().item()
    for batch in (1, 2, 5):  # one row, a few rows, the tensor-core product
        state = RwkvState.stack([sa] * batch)
        ids = torch.arange(batch) + 3
        la, na = plain.decode_batch(ids, state)
        lb, nb = fast.decode_batch(ids, state)
        worst = max(worst, (la - lb).abs().max().item(), (na.wkv - nb.wkv).abs().max().item(),
                    (na.shift - nb.shift).abs().max().item())
    print(worst)
"""


WKV4_SCAN_SCRIPT = """
    import torch
    from rwkv_chat.kernels import triton_kernels
    from rwkv_chat.models.rwkv4 import wkv4_step
    gen = torch.Generator().manual_seed(3)
    channels = 40  # a partial program of 32 channels too
    w = -torch.exp(torch.rand(channels, generator=gen) * 9 - 6)
    u = torch.rand(channels, generator=gen) * 2 - 1
    for length, chunk in ((1, None), (37, 37), (37, None), (37, 5), (70, 70), (70, 16), (70, 64), (3, 2)):
        for empty in (True, False):
            for k_scale in (3.0, 40.0):
                k = torch.randn(length, channels, generator=gen) * k_scale
                v = torch.randn(length, channels, generator=gen)
                if empty:
                    state = torch.stack([torch.zeros(channels), torch.zeros(channels), torch.full((channels,), -1e30)])
                else:
                    state = torch.stack([torch.randn(channels, generator=gen),
                                         torch.rand(channels, generator=gen) + 0.1,
                                         torch.randn(channels, generator=gen)])
                a, b, p = (x.double() for x in state)
                rows = []
                for t in range(length):  # the oracle: token by token in float64
                    out, a, b, p = wkv4_step(w.double(), u.double(), k[t].double(), v[t].double(), a, b, p)
                    rows.append(out)
                y, new = triton_kernels.wkv4_scan(w, u, k, v, state, chunk)
                want = torch.stack(rows)
                out_err = ((y.double() - want).abs() / (want.abs() + 1)).max().item()
                # the states may differ in their common log-scale: compare the values they stand for
                scale = torch.exp(new[2].double() - p)
                state_err = max(((new[0].double() * scale - a).abs() / (a.abs() + 1e-5)).max().item(),
                                ((new[1].double() * scale - b).abs() / (b.abs() + 1e-5)).max().item())
                print(length, chunk, empty, k_scale, out_err, state_err)
"""


def test_triton_wkv4_scan_in_chunks_equals_the_recurrence_under_the_interpreter():
    """The RWKV-4 prefill scan, in one pass and cut into chunks (a short last chunk, chunks shorter than the
    kernel's tile, keys spread far beyond fp32's exp range), against the token-by-token recurrence in float64."""
    pytest.importorskip("triton")
    lines = run_interpreted(WKV4_SCAN_SCRIPT).strip().splitlines()
    assert len(lines) == 32
    for line in lines:
        length, chunk, empty, k_scale, out_err, state_err = line.split()
        # fp32 rounding, as large in one pass (chunk = length): keys of scale 40 put the log-scale near 100,
        # whose rounding becomes a relative error of the exps
        assert float(out_err) < (1e-5 if float(k_scale) < 10 else 1e-4), line
        assert float(state_err) < 1e-3, line


PREFILL_PASSES_SCRIPT = """
    import torch
    from rwkv_chat.kernels import triton_kernels
    gen = torch.Generator().manual_seed(5)

    def close(got, want, dtype, steps=1):  # want rounded to dtype, up to `steps` of its rounding steps (an FMA may
        # round once less; exp's last bits differ between libraries)
        step = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7}[dtype]
        return bool(((got.float() - want.to(dtype).float()).abs() <= want.abs() * step * steps + 1e-30).all())

    for t, c, p in ((1, 40, 3), (7, 40, 2), (9, 1100, 4)):  # one token; a partial block of channels
        xx, prev, mix = torch.randn(t, c, generator=gen), torch.randn(c, generator=gen), torch.rand(p, c, generator=gen)
        shifted = torch.cat([prev[None], xx[:-1]])
        want = xx * mix[:, None] + shifted * (1 - mix[:, None])
        for dtype in (torch.float32, torch.bfloat16):
            got = triton_kernels.shift_mix(xx, prev, mix, dtype)
            shaped = tuple(got.shape) == (p, t, c) and got.dtype == dtype
            print("mix", t, c, p, dtype, shaped and close(got, want, dtype))
    r, y, x = (torch.randn(3, 1000, generator=gen) * 4 for _ in range(3))  # 3,000: a partial block
    for dtype in (torch.float32, torch.bfloat16):
        rd, yd = r.to(dtype), y.to(dtype)
        gated = torch.sigmoid(rd.float()) * yd.float()
        print("gate", dtype, close(triton_kernels.sigmoid_gate(rd, yd, out_dtype=dtype), gated, dtype, steps=4))
        got = triton_kernels.sigmoid_gate(rd, yd, x)
        print("residual", dtype, got.dtype == torch.float32
              and bool(((got - (x + gated)).abs() <= 2.0 ** -21 * (x.abs() + gated.abs())).all()))
    w = -torch.exp(torch.rand(40, generator=gen) * 9 - 6)
    u = torch.rand(40, generator=gen) * 2 - 1
    k = (torch.randn(70, 40, generator=gen) * 3).bfloat16()
    v = torch.randn(70, 40, generator=gen).bfloat16()
    state = torch.stack([torch.randn(40, generator=gen), torch.rand(40, generator=gen) + 0.1,
                         torch.randn(40, generator=gen)])
    for chunk in (70, 16):
        y16, s16 = triton_kernels.wkv4_scan(w, u, k, v, state, chunk)
        y32, s32 = triton_kernels.wkv4_scan(w, u, k.float(), v.float(), state, chunk)
        print("scan", chunk, y16.dtype == torch.float32 and torch.equal(y16, y32) and torch.equal(s16, s32))
"""


def test_prefill_element_wise_kernels_equal_pytorch_under_the_interpreter():
    """The GPU prefill's one-pass kernels against the PyTorch passes they replace: the token-shift mixes (fp32 and
    bf16 out), sigmoid(r) * y with and without the residual (bf16 inputs widened), and the RWKV-4 scan reading a
    bf16 GEMM's k and v: the very bits of the scan of those values widened first."""
    pytest.importorskip("triton")
    lines = run_interpreted(PREFILL_PASSES_SCRIPT).strip().splitlines()
    assert len(lines) == 12
    for line in lines:
        assert line.split()[-1] == "True", line


WKV6_SCAN_SCRIPT = """
    import torch
    from rwkv_chat.kernels import triton_kernels
    from rwkv_chat.models import rwkv6
    gen = torch.Generator().manual_seed(1)
    heads, size = 3, 16
    for length in (1, 5, 13):  # within one tile, and tiles with a ragged last one
        log_w = -torch.exp(torch.randn(length, heads, size, generator=gen) - 1)
        r, k, v = (torch.randn(length, heads, size, generator=gen) for _ in range(3))
        u = torch.randn(heads, size, generator=gen)
        start = torch.randn(heads, size, size, generator=gen)
        flat = lambda t: t.reshape(length, heads * size).contiguous()
        d = lambda t: t.double()[None]
        s, want = d(start), []
        for t in range(length):  # the oracle: the architecture's own step in float64
            y, s = rwkv6.wkv6_step(d(log_w[t]), u.double(), d(r[t]), d(k[t]), d(v[t]), s)
            want.append(y[0])
        y, new = triton_kernels.wkv5_scan(flat(torch.exp(log_w)), u, flat(r), flat(k), flat(v), start)
        print(length, (y.double() - torch.stack(want).reshape(length, -1)).abs().max().item(),
              (new.double() - s[0]).abs().max().item())
    # the plain path's choice on a batch of two: the Triton scan, against the chunked form
    log_w = -torch.exp(torch.randn(2, 21, heads, size, generator=gen) - 1)
    r, k, v = (torch.randn(2, 21, heads, size, generator=gen) for _ in range(3))
    u = torch.randn(heads, size, generator=gen)
    start = torch.randn(2, heads, size, size, generator=gen)
    calls, scan = [], triton_kernels.wkv5_scan
    triton_kernels.wkv5_scan = lambda *args: calls.append(args) or scan(*args)
    got = rwkv6.wkv6_sequence(log_w, u, r, k, v, start)
    triton_kernels.wkv5_scan = scan
    want = rwkv6.wkv6_chunks(log_w, u, r, k, v, start, 8)
    print("batch", len(calls), (got[0] - want[0]).abs().max().item(), (got[1] - want[1]).abs().max().item())
"""


def test_triton_rwkv6_scan_equals_its_step_under_the_interpreter():
    """The GPU prefill's token-by-token scan of RWKV-6 (RWKV-5's kernel with a decay per token) against the
    architecture's own step in float64, and the plain path choosing it for a batch of two sequences (against the
    chunked form)."""
    pytest.importorskip("triton")
    lines = run_interpreted(WKV6_SCAN_SCRIPT).strip().splitlines()
    assert len(lines) == 4
    assert lines[-1].split()[1] == "2", lines[-1]  # one scan a sequence
    for line in lines:
        out_err, state_err = (float(x) for x in line.split()[-2:])
        assert out_err < 1e-4 and state_err < 1e-4, line


def test_wkv4_scan_chunks_fill_the_gpu_without_cutting_short_prompts():
    pytest.importorskip("triton")
    from rwkv_chat.kernels import triton_kernels
    assert triton_kernels.wkv4_scan_chunk(20, 2048) == 20  # at most two chunks: one pass
    assert triton_kernels.wkv4_scan_chunk(1024, 2048) == 16  # 64 chunks x 64 channel blocks
    assert triton_kernels.wkv4_scan_chunk(4096, 2048) == 64
    assert triton_kernels.wkv4_scan_chunk(1024, 4096) == 32


GEMV_SCRIPT = """
    import torch
    from rwkv_chat.kernels import triton_kernels as tk
    from reference import int8_one_row_case
    gen = torch.Generator().manual_seed(5)
    # (N, K, segments): ragged row blocks, K past a multiple of the tile, an odd K (bytes, not words), segments
    for n, k, segments in ((40, 1000, 1), (64, 2052, 2), (48, 130, 1), (96, 1027, 3), (128, 4096, 4)):
        q, scale, x, seg, want = int8_one_row_case(gen, n, k, segments)
        for splits in (None, 1, 3):
            results = []
            for preload in (1, 0, 2, 3, 4):  # weight tiles read before the wait (past a split's end: none): same sums
                tk.GEMV_CONFIGS["int8"]["preload"] = preload
                results.append(tk.project(x, q, scale, seg, splits))
            got = results[0].sum(0)[0].double()
            print(n, k, segments, splits, int(all(torch.equal(results[0], r) for r in results[1:])),
                  ((got - want).abs().max() / want.abs().max()).item())
"""


def test_int8_one_row_product_equals_the_dequantised_product_under_the_interpreter():
    """One row against int8 weights: the kernel that reads them as 32-bit words (K a multiple of 4) and the byte
    kernel (an odd K) against the float64 product of the dequantised weights, over segments and split counts;
    the same bits whether a program reads its first weight tile before waiting for the kernel before it or not."""
    pytest.importorskip("triton")
    lines = run_interpreted(GEMV_SCRIPT).strip().splitlines()
    assert len(lines) == 15
    for line in lines:
        assert line.split()[-2] == "1" and float(line.split()[-1]) < 1e-6, line


RELU2_SCRIPT = """
    import torch
    from rwkv_chat.kernels import triton_kernels as tk
    from reference import int8_one_row_case
    gen = torch.Generator().manual_seed(9)
    # (N, K, segments): one split (a key alone, a key and a receptance, an odd K: bytes), then K long enough for
    # several splits (the interpreter counts 8 SMs), where the fused form must decline
    for n, k, segments in ((64, 260, 1), (96, 1000, 2), (96, 259, 2), (64, 4096, 1)):
        q, scale, x, seg, want = int8_one_row_case(gen, n, k, segments)
        rows = seg or n
        w32 = q.float() * scale[:, None]
        for name, w, s, dtype in (("int8", q, scale, torch.bfloat16), ("bf16", w32.to(torch.bfloat16), None,
                                  torch.bfloat16), ("fp32", w32, None, torch.float32)):
            parts = tk.project(x, w, s, seg)
            alone = tk.ffn_act(parts[:, :, :rows], dtype)
            fused = tk.project_relu2(x, w, s, rows, dtype, seg)
            if fused is None:
                print(n, k, segments, name, parts.shape[0], "declined")
                continue
            hidden, fused_parts = fused
            dense = w.double() if s is None else q.double() * scale.double()[:, None]
            keys = torch.einsum("k,nk->n", x[0, 0].double(), dense[:rows])  # the key reads input 0
            squares = keys.clamp(min=0) ** 2
            err = ((hidden[0].double() - squares).abs() / squares.clamp(min=squares.max() * 1e-3)).max().item()
            same = torch.equal(hidden, alone) and torch.equal(fused_parts[:, :, rows:], parts[:, :, rows:])
            print(n, k, segments, name, parts.shape[0], int(same), err)
    wide = tk.project_relu2(torch.zeros(1, 3, 64), torch.zeros(16, 64), None, 16, torch.float32)
    ragged = tk.project_relu2(torch.zeros(1, 1, 64), torch.zeros(16, 64), None, 12, torch.float32)  # 8-row blocks
    print("rows", wide, ragged)
"""


def test_key_squared_in_the_product_is_the_separate_ffn_act_under_the_interpreter():
    """One row's channel-mix product with relu² of the key in its last step (project_relu2): the same bits as
    `project` then `ffn_act` for int8, bf16 and fp32 weights, a key alone and a key with a receptance (whose
    partials also agree), and against the float64 squares of the stored weights; declined where K takes several
    splits, x has several rows or the key ends inside a row block."""
    pytest.importorskip("triton")
    lines = run_interpreted(RELU2_SCRIPT).strip().splitlines()
    assert lines[-1] == "rows None None"
    results = [line.split() for line in lines[:-1]]
    assert len(results) == 12
    for n, k, segments, name, splits, *rest in results:
        if k == "4096":
            assert int(splits) > 1 and rest == ["declined"], (n, k, name, splits, rest)
        else:
            # the squares rounded once to the output dtype (bf16: the interpreter's conversion truncates, one step)
            bound = 1e-5 if name == "fp32" else 2.0 ** -7
            assert splits == "1" and rest[0] == "1" and float(rest[1]) < bound, (n, k, name, rest)


LN_MIX_SCRIPT = """
    import torch
    from rwkv_chat.kernels import triton_kernels as tk
    gen = torch.Generator().manual_seed(6)
    for c in (100, 128):  # a row that is not a power of two: masked tails in every chunk
        for rows in (1, 3):
            for chunk in (16, 32, 256):  # 256 >= C: one program a row, x updated in place
                x = torch.randn(rows, c, generator=gen) * 3 + 1
                delta = torch.randn(2, rows, c, generator=gen)  # split-K partials of the residual's delta
                gate = torch.randn(3, rows, c, generator=gen)
                prev = torch.randn(rows, c, generator=gen)
                mix = torch.rand(4, c, generator=gen)
                weight, bias = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
                out, out32, xx = torch.zeros(3, rows, c), torch.zeros(2, rows, c), torch.zeros(rows, c)
                x64 = x.double() + torch.sigmoid(gate.double().sum(0)) * delta.double().sum(0)
                x64 = x64 / 2
                want = torch.nn.functional.layer_norm(x64, (c,), weight.double(), bias.double(), 1e-5)
                mixes = want[None] * mix.double()[:, None] + prev.double()[None] * (1 - mix.double()[:, None])
                before = x.clone()
                got = tk.ln_mix(x, weight, bias, out, prev=prev, mix=mix, xx_out=xx, delta=delta, gate=gate,
                                halve=True, out32=out32, first32=2, chunk=chunk)
                in_place = got is x
                untouched = torch.equal(x, before)
                err = max((got.double() - x64).abs().max().item(), (xx.double() - want).abs().max().item(),
                          (out.double() - mixes[:3]).abs().max().item(),
                          (out32.double() - mixes[2:]).abs().max().item())
                final = torch.zeros(1, rows, c)  # no delta, no mix: the LayerNorm alone (the head's input)
                same = tk.ln_mix(got, weight, bias, final, chunk=chunk)
                err = max(err, (final[0].double() - want).abs().max().item())
                print(c, rows, chunk, in_place, untouched, same is got, err)
    # the same inputs spread over programs or not: the same bits
    x, delta, gate, prev = (torch.randn(shape, generator=gen) for shape in ((2, 100), (2, 2, 100), (1, 2, 100),
                                                                            (2, 100)))
    mix, weight, bias = torch.rand(3, 100, generator=gen), torch.randn(100, generator=gen), torch.randn(100)
    outputs = []
    for chunk in (16, 32, 128):
        out, xx = torch.zeros(3, 2, 100), torch.zeros(2, 100)
        got = tk.ln_mix(x.clone(), weight, bias, out, prev=prev, mix=mix, xx_out=xx, delta=delta, gate=gate,
                        chunk=chunk)
        outputs.append(torch.cat([got.flatten(), out.flatten(), xx.flatten()]))
    print("chunks", all(torch.equal(outputs[0], o) for o in outputs[1:]))
"""


def test_ln_mix_spread_over_programs_equals_layer_norm_under_the_interpreter():
    """The residual add, LayerNorm and mixes with a row's channels spread over several programs (each reading
    the row's statistics itself) and with one program a row, against float64; spread, x is left for the caller
    and a new residual comes back (another program may still be reading x), one program updates x in place; the
    same bits however the channels are spread."""
    pytest.importorskip("triton")
    lines = run_interpreted(LN_MIX_SCRIPT).strip().splitlines()
    assert len(lines) == 13 and lines[-1] == "chunks True"
    for line in lines[:-1]:
        c, rows, chunk, in_place, untouched, same, err = line.split()
        whole = int(chunk) >= int(c)
        assert (in_place, untouched, same) == (str(whole), str(not whole), "True"), line
        assert float(err) < 1e-4, line


WKV5_STATE_SCRIPT = """
import torch
from rwkv_chat.kernels import rwkv6_triton, triton_kernels as tk
gen = torch.Generator().manual_seed(3)
heads, size = 3, 16
a = heads * size
for rows in (1, 3, 5):
    for version in ("5.2", "6"):
        r, k, v, g = (torch.randn(2, rows, a, generator=gen) for _ in range(4))  # two split-K partials each
        s_in = torch.randn(rows, heads, size, size, generator=gen)
        w, u = torch.rand(heads, size, generator=gen), torch.randn(heads, size, generator=gen)
        ln_w, ln_b = torch.randn(a, generator=gen), torch.randn(a, generator=gen)
        w_lora = torch.randn(rows, a, generator=gen)
        s_out = torch.empty_like(s_in)
        if version == "5.2":
            y = tk.wkv5_decode(r, k, v, g, s_in, s_out, w, u, ln_w, ln_b, torch.float32, 1e-5)
        else:
            y = rwkv6_triton.wkv6_decode(r, k, v, g, w_lora, s_in, s_out, w.flatten(), u, ln_w, ln_b,
                                         torch.float32, 1e-5)
        rs, ks, vs, gs = (t.sum(0).double().view(rows, heads, size) for t in (r, k, v, g))
        decay = (w.double()[None] if version == "5.2"
                 else torch.exp(-torch.exp(w.double().flatten()[None] + w_lora.double())).view(rows, heads, size))
        kv = ks[..., None] * vs[..., None, :]  # [rows, heads, key, value]
        s64 = s_in.double()
        out = torch.einsum("bhi,bhij->bhj", rs, u.double()[None, :, :, None] * kv + s64)
        normed = torch.nn.functional.group_norm(out.reshape(rows, a), heads, ln_w.double(), ln_b.double(), 1e-5)
        want_y = normed * gs.reshape(rows, a) * torch.sigmoid(gs.reshape(rows, a))
        want_s = kv + decay[..., None] * s64
        print(rows, version, (s_out.double() - want_s).abs().max().item(), (y.double() - want_y).abs().max().item())
"""


def test_v5_decode_step_is_the_float64_recurrence_under_the_interpreter():
    """The RWKV-5/6 decode kernel (the state passed in read before its wait for the kernel before) against the
    float64 recurrence: the new state, and the output after GroupNorm and the gate, at 1, 3 and 5 rows with
    split-K partials; RWKV-6's decay per row from its LoRA."""
    pytest.importorskip("triton")
    lines = run_interpreted(WKV5_STATE_SCRIPT).strip().splitlines()
    assert len(lines) == 6
    for line in lines:
        rows, version, state_err, y_err = line.split()
        assert float(state_err) < 1e-5 and float(y_err) < 1e-4, line


@pytest.mark.parametrize("version,dtype,tolerance,head_size", [("4", "fp32", 1e-4, 64), ("5.2", "fp32", 1e-4, 64),
                                                               ("5.2", "fp32", 1e-4, 8), ("4", "int8", 0.3, 64),
                                                               ("5.2", "int8", 0.3, 64)])
def test_triton_kernels_equal_plain_path_under_the_interpreter(version, dtype, tolerance, head_size, make_checkpoint):
    """fp32: the fused kernels exactly (RWKV-5.2 with heads of 64 and of 8, as the really trained tiny model has);
    int8: our int8 products against PyTorch's (bf16 activations there)."""
    pytest.importorskip("triton")
    # a small head: the interpreter runs its product slowly (a World-sized one took ~45 s of each fp32 case)
    ckpt = make_checkpoint(version, n_layer=2, n_embd=128, seed=7, head_size=head_size, vocab_size=1024)
    out = run_interpreted(INTERPRETER_SCRIPT, str(ckpt.path), dtype)
    assert float(out.strip().splitlines()[-1]) <= tolerance


# ------------------------------------------------------------------------------------- CUDA

@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_cuda_fast_path_matches_plain_path(ckpt, dtype):
    plain = load_model(ckpt.path, device="cuda", dtype=dtype, fast=False)  # same weights, plain PyTorch path
    fast = load_model(ckpt.path, device="cuda", dtype=dtype)
    assert fast.runner is not None and fast.runner.use_graphs
    tolerance = 1e-3 if dtype == "fp32" else 1.0  # bf16: rounding order differs; these random models amplify it
    tokens = random_tokens(300, seed=4)
    a, sa = plain.forward(tokens)
    b, sb = fast.forward(tokens)
    assert max_diff(a, b) <= tolerance
    for batch in (1, 3, 8, 33):  # graph buckets 1, 4, 8 and an ungraphed batch
        states = [plain.forward(random_tokens(5 + i, seed=i))[1] for i in range(batch)]
        ids = torch.randint(1, 65530, (batch,))
        for _ in range(2):  # a replay must not reuse the previous call's inputs
            la, na = plain.decode_batch(ids, RwkvState.stack(states))
            lb, nb = fast.decode_batch(ids, RwkvState.stack(states))
            assert max_diff(la, lb) <= tolerance
            if dtype == "fp32":
                assert torch.allclose(na.wkv, nb.wkv, rtol=1e-3, atol=1e-3)
            ids = ids.flip(0)
    assert_decode_into_equals_decode(fast, 1e-3 if dtype == "fp32" else 1.0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_int8_one_row_product_in_fp16_pairs_is_the_same_sums():
    """The one-row int8 product widening its bytes two at a time through fp16 (inline PTX) against the byte-at-a-time
    form: the same bits, over ragged blocks, segments, split counts, 8- and 16-row programs and a 7B-sized matrix;
    both against the float64 product of the dequantised weights."""
    pytest.importorskip("triton")
    from rwkv_chat.kernels import triton_kernels as tk
    assert tk.PTX
    gen = torch.Generator().manual_seed(5)
    config = dict(tk.GEMV_CONFIGS["int8"])
    try:
        for n, k, segments in ((40, 1000, 1), (64, 2052, 2), (96, 1028, 3), (128, 4096, 4), (4096, 4096, 1),
                               (12288, 4096, 3)):
            q, scale, x, seg, want = int8_one_row_case(gen, n, k, segments)
            q, scale, x = q.cuda(), scale.cuda(), x.cuda()
            for block_n in (8, 16):
                for splits in (None, 1, 3):
                    results = []
                    for pairs_per_sm in (1e9, 0):  # pairs always, never
                        tk.GEMV_CONFIGS["int8"].update(block_n=block_n, pairs_per_sm=pairs_per_sm)
                        results.append(tk.project(x, q, scale, seg, splits))
                    assert torch.equal(*results), (n, k, segments, block_n, splits)
                    got = results[0].sum(0)[0].double().cpu()
                    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-6
    finally:
        tk.GEMV_CONFIGS["int8"] = config


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_one_row_product_reads_tiles_before_the_wait_with_the_same_sums():
    """The one-row product reading 0-4 weight tiles before it waits for the kernel before it (compiled, with
    programmatic dependent launch where the GPU has it): the same bits in bf16 and int8, over splits whose share is
    shorter than the tiles read ahead; int8 against the float64 product of the dequantised weights."""
    pytest.importorskip("triton")
    from rwkv_chat.kernels import triton_kernels as tk
    gen = torch.Generator().manual_seed(7)
    configs = {fmt: dict(cfg) for fmt, cfg in tk.GEMV_CONFIGS.items()}
    try:
        for n, k, segments in ((40, 1000, 1), (96, 1028, 3), (4096, 4096, 1), (12288, 4096, 3)):
            q, scale, x, seg, want = int8_one_row_case(gen, n, k, segments)
            w16 = (q.float() * scale[:, None]).to(torch.bfloat16)
            q, scale, x, w16 = q.cuda(), scale.cuda(), x.cuda(), w16.cuda()
            for splits in (None, 1, 3, 7):
                for fmt, args in (("int8", (q, scale)), ("float", (w16, None))):
                    results = []
                    for preload in (0, 1, 2, 3, 4):
                        tk.GEMV_CONFIGS[fmt]["preload"] = preload
                        results.append(tk.project(x, *args, seg, splits))
                    assert all(torch.equal(results[0], r) for r in results[1:]), (fmt, n, k, segments, splits)
                    if fmt == "int8":
                        got = results[0].sum(0)[0].double().cpu()
                        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-6
    finally:
        for fmt, cfg in configs.items():
            tk.GEMV_CONFIGS[fmt] = cfg


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("version", ["4", "5.2"])
def test_cuda_bf16_greedy_agreement_is_the_plain_paths(version, make_checkpoint):
    ckpt = make_checkpoint(version, n_layer=2, n_embd=256, seed=3)
    plain = greedy_agreement(load_model(ckpt.path, device="cuda", dtype="bf16", fast=False), ckpt)
    assert greedy_agreement(load_model(ckpt.path, device="cuda", dtype="bf16"), ckpt) >= plain - 0.04


@pytest.mark.skipif(cpu_kernels.kernels() is None, reason="the C++ kernels did not build")
@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_a_step_of_many_chats_streams_its_narrow_head_like_a_single_decode(make_checkpoint, version, dtype):
    """A batched decode step of MANY_ROWS to STREAM_ROWS - 1 rows (a server's chats) keeps streaming int8 / int4
    weights through the C++ kernels instead of widening them for a GEMM: each row's logits and state are the bits
    of that chat decoded alone."""
    model = load_model(make_checkpoint(version, **SHAPE, seed=6).path, device="cpu", dtype=dtype, fast=True)
    rows = quant.MANY_ROWS + 4
    head = model.head.weight
    assert quant.decode_streams(torch.zeros(rows, SHAPE["n_embd"]), head)
    assert not quant.decode_streams(torch.zeros(quant.STREAM_ROWS, SHAPE["n_embd"]), head)
    assert not quant.decode_streams(torch.zeros(rows, 8), torch.zeros(4, 8))  # fp32 weights: PyTorch's GEMM
    states = [model.forward(random_tokens(3 + i % 5, seed=i))[1] for i in range(rows)]
    tokens = torch.tensor([(97 * i + 5) % model.config.vocab_size for i in range(rows)])
    logits, batched = model.decode_batch(tokens, RwkvState.stack(states))
    for i, state in enumerate(states):
        single, new = model.forward([int(tokens[i])], state)
        assert torch.equal(logits[i], single)
        assert torch.equal(batched[i].wkv, new.wkv) and torch.equal(batched[i].shift, new.shift)
