"""RWKV-6 and RWKV-7 on a CPU: the decode step in one C++ call (runtime/cpu_decode.py, cpu_kernels' DecodeStack
running its RWKV-6 / RWKV-7 layer step a layer) equals the plain PyTorch step (models/rwkv6.py, rwkv7.py),
whatever the weights' dtype, head size, batch and layer count; the stack's refusals (RWKV-4/5 too) raise."""

from __future__ import annotations

import re

import pytest
import torch

from rwkv_chat import load_model
from rwkv_chat.kernels import cpu_kernels, quant
from rwkv_chat.kernels.cpu_features import detected
from rwkv_chat.loading import loader
from rwkv_chat.runtime.cpu_decode import CpuStepRunner
from rwkv_chat.runtime.fast_path import attach_fast_path
from rwkv_chat.state import RwkvState
from reference import assert_decode_into_equals_decode, assert_states_passed_in_stay_unchanged, random_tokens

pytestmark = pytest.mark.skipif(cpu_kernels.kernels() is None, reason="the C++ kernels did not build here")


@pytest.mark.parametrize("shape", [dict(n_layer=3, n_embd=128), dict(n_layer=2, n_embd=192, head_size=32),
                                   dict(n_layer=7, n_embd=64, head_size=16), dict(n_layer=2, n_embd=512),
                                   dict(n_layer=2, n_embd=36, head_size=12)],
                         ids=["h64", "h32", "h16-7layers", "wide", "odd"])  # wide: LoRAs split over the threads;
# odd: rows of no whole number of 8 floats (the element-wise loops' masked last lanes, the scalar heads)
@pytest.mark.parametrize("dtype,tolerance", [("fp32", 1e-4), ("bf16", 1e-3), ("fp16", 1e-3), ("int8", 1e-3),
                                             ("int4", 5e-2)])
@pytest.mark.parametrize("version", ["6", "7"])
def test_the_cpp_decode_step_equals_the_plain_step(make_checkpoint, int8_dot, version, shape, dtype, tolerance):
    """The same weights (as stored) through both steps: only the order of fp32 sums differs (the int8 products'
    int16 rounding of slightly different activations moves the logits and the states by a few of its steps, which
    these random weights amplify: RWKV-6 int8, 12 seeds of the h16 and h64 shapes, the worst state difference was
    0.3-0.7 of rtol = atol = 2e-3 in most and 1.0-1.24 of it in 2 of 24, so the states are held to 4e-3; the
    product itself is held to float64 by test_cpu_kernels). fp16 halves the residual stream after the 6th
    layer (7 layers). int4: its products round the activations to int8 (a step per 64 columns) on every path, and
    the two steps' activations differ in their fp32 sums, so now and then one rounds the other way and these random
    weights amplify it (measured: logits up to 1.2e-2 of their scale, states 0.15, in 2 of 36 steps): the logits are
    held to 5e-2 (wrong weights or groups move them by their whole size), the states, computed alike for every
    dtype, are left to the others. The h32 shape's channel-mix value (672 columns) is no whole number of groups, so
    it stays int8 there."""
    int8_dot("avx2")
    state_tolerance = 4e-3 if dtype == "int8" else 1e-4
    path = make_checkpoint(version, seed=4, **shape).path
    plain = load_model(path, device="cpu", dtype=dtype, fast=False)
    fast = attach_fast_path(load_model(path, device="cpu", dtype=dtype, fast=False))
    assert plain.runner is None and isinstance(fast.runner, CpuStepRunner)
    for batch in (1, 3):
        states = [plain.forward(random_tokens(4 + 3 * i, seed=i))[1] for i in range(batch)]
        state = RwkvState.stack(states)
        ids = torch.randint(1, 65530, (batch,), generator=torch.Generator().manual_seed(batch))
        for _ in range(3):  # a few tokens: the carried state must stay equal too
            la, sa = plain.decode_batch(ids, state)
            lb, sb = fast.decode_batch(ids, state)
            scale = la.abs().max().item()
            assert (la - lb).abs().max().item() <= tolerance * max(1.0, scale)
            if dtype != "int4":
                assert torch.allclose(sa.wkv, sb.wkv, rtol=state_tolerance, atol=state_tolerance)
                assert torch.allclose(sa.shift, sb.shift, atol=state_tolerance)
            state, ids = sa, la.argmax(-1)
    assert_states_passed_in_stay_unchanged(fast)


@pytest.mark.parametrize("version", ["6", "7"])
def test_the_cpp_step_reads_bf16_lora_factors_as_fp32_ones_holding_the_same_values(make_checkpoint, monkeypatch,
                                                                                    version):
    """LoRA factors kept in bf16 (layers.lora_storage_dtype; forced here on any CPU) are widened as they are read:
    the same products in the same order as fp32 factors of the same values, so the same bits. The wide shape
    splits the second factors by chunks of input rows (their partial sums added after)."""
    monkeypatch.setattr(loader, "lora_storage_dtype", lambda device, dtype, factor=None: torch.bfloat16)
    model = load_model(make_checkpoint(version, seed=6, n_layer=2, n_embd=512).path, device="cpu", dtype="int8")
    runner = model.runner
    assert isinstance(runner, CpuStepRunner)
    params = dict(model.named_parameters())
    assert {params[name].dtype for name in model.lora_factor_names()} == {torch.bfloat16}
    kept = runner.layers
    widened = [[t.float() if t.dtype == torch.bfloat16 else t for t in layer] for layer in kept]
    assert sum(t.dtype == torch.bfloat16 for layer in kept for t in layer) == len(model.lora_factor_names())
    state = RwkvState.stack([model.forward(random_tokens(5 + i, seed=i))[1] for i in range(2)])
    ids = torch.tensor([17, 4242])
    logits, new_state = runner.decode(ids, state)
    runner.cpu_stack = cpu_kernels.DecodeStack(widened, runner.architecture.cpu_kernel_id, ends=runner.cpu_stack.ends)
    logits_widened, state_widened = runner.decode(ids, state)
    assert torch.equal(logits, logits_widened)
    assert torch.equal(new_state.wkv, state_widened.wkv) and torch.equal(new_state.shift, state_widened.shift)


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_the_cpp_step_is_the_same_on_any_thread_count(make_checkpoint, version, dtype):
    """A layer's independent products (and the LoRAs' factors) share one parallel region, cut into one run a thread
    by the bytes they read; each weight row (or chunk of a LoRA factor's input rows, added in chunk order) is whole
    on one thread: the step is bit for bit the same on one thread as on three (uneven cuts) or four."""
    path = make_checkpoint(version, seed=5, n_layer=2, n_embd=512).path
    fast = attach_fast_path(load_model(path, device="cpu", dtype=dtype, fast=False))
    state = RwkvState.stack([fast.forward(random_tokens(6 + i, seed=i))[1] for i in range(2)])
    ids = torch.tensor([17, 4242])
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3, 4):
            torch.set_num_threads(count)
            results.append(fast.decode_batch(ids, state))
    finally:
        torch.set_num_threads(threads)
    (l1, s1), *others = results
    for logits, state in others:
        assert torch.equal(l1, logits) and torch.equal(s1.shift, state.shift) and torch.equal(s1.wkv, state.wkv)


@pytest.mark.skipif(cpu_kernels.kernels() is None or detected().int8_dot != "avx512_vnni",
                    reason="needs AVX512-VNNI and the kernels")
@pytest.mark.parametrize("version", ["6", "7"])
def test_the_int8_step_has_the_same_bits_on_avx2_and_vnni(make_checkpoint, int8_dot, version):
    """The whole int8 step (its LoRAs, wkv and head included) on the AVX2 products and on the VNNI ones: the same
    logits and states, bit for bit, one chat and three, so a conversation reads the same on either kind of CPU."""
    fast = attach_fast_path(load_model(make_checkpoint(version, seed=4, n_layer=3, n_embd=128).path, device="cpu",
                                       dtype="int8", fast=False))
    states = [fast.forward(random_tokens(9 + i, seed=2 + i))[1] for i in range(3)]
    for state, ids in ((states[0], torch.tensor([7])), (RwkvState.stack(states), torch.tensor([7, 300, 65000]))):
        int8_dot("avx2")
        avx2_logits, avx2_state = fast.decode_batch(ids, state)
        int8_dot("avx512")
        vnni_logits, vnni_state = fast.decode_batch(ids, state)
        assert torch.equal(avx2_logits, vnni_logits)
        assert torch.equal(avx2_state.wkv, vnni_state.wkv) and torch.equal(avx2_state.shift, vnni_state.shift)


def test_cpu_loads_take_it_for_rwkv6_and_rwkv7(make_checkpoint):
    """load_model's default fast path on a CPU (bf16, int8) runs it; fp32 on a CPU stays on the plain reference
    path unless asked."""
    for version in ("6", "7"):
        path = make_checkpoint(version).path
        assert isinstance(load_model(path, device="cpu", dtype="bf16").runner, CpuStepRunner)
        assert isinstance(load_model(path, device="cpu", dtype="int8").runner, CpuStepRunner)
        assert load_model(path, device="cpu", dtype="fp32").runner is None


@pytest.mark.parametrize("version", ["6", "7"])
def test_the_cpp_step_into_state_buffers_equals_decode_batch(make_checkpoint, version):
    """decode_into (the CPU batcher's step: leading rows of one state buffer into another's) gives decode_batch's
    logits and states, bit for bit, and leaves the source alone."""
    model = load_model(make_checkpoint(version, n_layer=2, n_embd=128).path, device="cpu", dtype="int8")
    assert isinstance(model.runner, CpuStepRunner)
    assert_decode_into_equals_decode(model, 0.0)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "int8", "int4"])  # fp32 models keep the plain step
@pytest.mark.parametrize("version", ["6", "7"])
def test_each_row_of_a_batched_cpp_step_has_the_bits_of_that_row_stepped_alone(make_checkpoint, version, dtype):
    """Rows never mix and take the same operations in a batch as alone (the products of many rows, the LoRAs'
    factors, which a batch multiplies from registers and one row streams, the heads): logits and states bit for
    bit. n_embd 512: LoRA factors of 64 outputs and more, and of fewer."""
    model = load_model(make_checkpoint(version, n_layer=2, n_embd=512, seed=5).path, device="cpu", dtype=dtype)
    assert isinstance(model.runner, CpuStepRunner)
    states = [model.forward(random_tokens(3 + i, seed=i))[1] for i in range(5)]
    ids = torch.randint(1, 65530, (5,), generator=torch.Generator().manual_seed(5))
    logits, state = model.decode_batch(ids, RwkvState.stack(states))
    for row in range(5):
        alone_logits, alone_state = model.decode_batch(ids[row:row + 1], states[row])
        assert torch.equal(logits[row], alone_logits[0])
        assert torch.equal(state.wkv[row], alone_state.wkv[0]) and torch.equal(state.shift[row], alone_state.shift[0])


@pytest.mark.parametrize("version", ["6", "7"])
def test_a_prefill_then_decode_through_the_runner_equals_the_plain_path(make_checkpoint, version):
    path = make_checkpoint(version, n_layer=2, n_embd=128, seed=9).path
    plain = load_model(path, device="cpu", dtype="fp32", fast=False)
    fast = attach_fast_path(load_model(path, device="cpu", dtype="fp32", fast=False))
    prompt, steps = random_tokens(40, seed=3), random_tokens(12, seed=4)
    la, sa = plain.forward(prompt)
    lb, sb = fast.forward(prompt)
    assert torch.equal(la, lb)  # the runner's prefill is the plain path itself
    for token in steps:
        la, sa = plain.forward([token], sa)
        lb, sb = fast.forward([token], sb)
    assert (la - lb).abs().max().item() <= 1e-4 and torch.allclose(sa.wkv, sb.wkv, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_the_cpp_step_refuses_states_that_do_not_fit_and_writes_nothing(make_checkpoint, version):
    """The stack's refusals come back as RuntimeErrors naming what is wrong (its C++ side returns them rather than
    throwing through the binding), before anything is written, and the stack steps as before afterwards."""
    model = attach_fast_path(load_model(make_checkpoint(version, n_layer=2).path, device="cpu", dtype="bf16",
                                        fast=False))
    stack, c = model.runner.cpu_stack, model.config.n_embd
    state = model.zero_state(2)
    out_shift, out_wkv = torch.full_like(state.shift, 7.0), torch.full_like(state.wkv, 7.0)
    cases = {
        "batch first": (torch.zeros(3, c), state.shift, state.wkv),  # 3 rows, a state of 2
        "block must be contiguous": (torch.zeros(2, c), state.shift.transpose(2, 3), state.wkv),
        "shift and shift_out": (torch.zeros(2, c), state.shift[:, :1], state.wkv),  # one layer of two
        "wkv and wkv_out": (torch.zeros(2, c), state.shift, state.wkv[:, :1]),
        "contiguous fp32 [B, C]": (torch.zeros(2, c, dtype=torch.float64), state.shift, state.wkv),
    }
    for message, (x, shift, wkv) in cases.items():
        kept = x.clone()
        with pytest.raises(RuntimeError, match=re.escape(message)):
            stack.step(x, shift, wkv, out_shift, out_wkv)
        assert torch.equal(x, kept)
    with pytest.raises(RuntimeError, match="shift and shift_out"):  # an out state of another width
        stack.step(torch.zeros(2, c), state.shift, state.wkv, torch.zeros(2, 2, 2, c - 1), out_wkv)
    with pytest.raises(RuntimeError, match="shift and shift_out"):  # x wider than the state
        stack.step(torch.zeros(2, c + 8), state.shift, state.wkv, out_shift, out_wkv)
    assert bool((out_shift == 7).all()) and bool((out_wkv == 7).all())
    # the whole step's refusals: an int8 model's stack (its head streams on every CPU), and one built without ends
    int8 = attach_fast_path(load_model(make_checkpoint(version, n_layer=2).path, device="cpu", dtype="int8",
                                       fast=False)).runner.cpu_stack
    for message, ids in [("token ids in [0, V)", [5, 65536]), ("token ids in [0, V)", [-1, 6]),
                         ("contiguous int64", [5.0, 6.0])]:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            int8.logits(torch.tensor(ids), state.shift, state.wkv, out_shift, out_wkv)
    with pytest.raises(RuntimeError, match="without the embedding"):
        _stack_ending_in_python(model.runner).logits(torch.tensor([5, 6]), state.shift, state.wkv, out_shift,
                                                      out_wkv)
    assert bool((out_shift == 7).all()) and bool((out_wkv == 7).all())
    ids = torch.tensor([5, 6])
    logits, new = model.decode_batch(ids, state)  # and it still steps, as the plain path does
    plain_logits, _ = model.decode_plain(ids, state)
    assert (logits - plain_logits).abs().max().item() <= 2e-2 * max(1.0, plain_logits.abs().max().item())


def _stack_ending_in_python(runner) -> cpu_kernels.DecodeStack:
    """The runner's layers in a stack without the embedding, norms and head: its steps end in Python."""
    if isinstance(runner, CpuStepRunner):
        return cpu_kernels.DecodeStack(runner.layers, runner.architecture.cpu_kernel_id)
    return cpu_kernels.DecodeStack(runner.cpu_layers, runner.architecture.cpu_kernel_id,
                                   runner.layers[0].att.n_segments)


@pytest.mark.parametrize("dtype,tolerance,state_tolerance", [("int8", 1e-3, 1e-3), ("int4", 5e-2, 0.2)])
@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_the_whole_step_from_token_ids_equals_the_step_ending_in_python(make_checkpoint, version, dtype, tolerance,
                                                                         state_tolerance):
    """Where the head streams (int8, int4), a step of few rows is one call from token ids to logits (embedding,
    ln0, the layers, ln_out, head); it computes what the step whose embedding, norms and head run in Python
    computes. ln0 and ln_out are the kernels' own fp32 arithmetic, so the products' rounded activations (int16
    for int8 on VNNI, int8 for int4) may round apart by a step: the logits are held as the first test holds
    them, the states (values up to ~10) to 1e-3 (int8: measured up to 1e-4 apart) and 0.2 (int4: its rounding,
    amplified by random weights, moved them up to 0.15 in the first test); a wrong row or norm moves them by ~1.
    A step of STREAM_ROWS rows or more ends in Python."""
    model = load_model(make_checkpoint(version, n_layer=2, n_embd=128, seed=3).path, device="cpu", dtype=dtype)
    runner = model.runner
    assert runner.cpu_stack.whole
    state = RwkvState.stack([model.forward(random_tokens(5 + i, seed=i))[1] for i in range(3)])
    ids = torch.tensor([3, 70, 65000])
    whole = model.decode_batch(ids, state)
    into = model.zero_state(3)  # the batcher's step, its ids in any integer dtype
    assert torch.equal(runner.decode_into(ids.to(torch.int32), state, into), whole[0])
    assert torch.equal(into.wkv, whole[1].wkv)
    whole_stack, runner.cpu_stack = runner.cpu_stack, _stack_ending_in_python(runner)
    split = model.decode_batch(ids, state)
    scale = split[0].abs().max().item()
    assert (whole[0] - split[0]).abs().max().item() <= tolerance * max(1.0, scale)
    assert torch.allclose(whole[1].wkv, split[1].wkv, rtol=1e-4, atol=state_tolerance)
    assert torch.allclose(whole[1].shift, split[1].shift, rtol=1e-4, atol=state_tolerance)
    runner.cpu_stack = whole_stack
    many = torch.randint(0, 65536, (quant.STREAM_ROWS,), generator=torch.Generator().manual_seed(1))
    calls = []
    whole_stack.logits = lambda *args: calls.append(args)  # never reached by a step of many rows
    logits, _ = model.decode_batch(many, model.zero_state(quant.STREAM_ROWS))
    assert calls == [] and logits.shape == (quant.STREAM_ROWS, 65536)
