"""RWKV-6/7's fused decode step (runtime/fused_decode.py with kernels/lora_triton.py, rwkv6_triton.py and
rwkv7_triton.py) against the model's plain decode step, under Triton's interpreter on CPU tensors (subprocess).
On a GPU, tests/runtime/test_plain_graphs.py runs it graphed against the plain path."""

from __future__ import annotations

import json

import pytest

from triton_interpreter import run_interpreted

SCRIPT = """
    import json, sys
    import torch
    from rwkv_chat import load_model
    from rwkv_chat.kernels import lora_triton, triton_kernels
    from rwkv_chat.runtime.fused_decode import fused_decoder
    from rwkv_chat.state import RwkvState

    triton_kernels.LN_MIX_CHUNK = 32  # rows fewer than the (interpreter's 8) SMs spread over programs; more: whole

    def worst_difference(path, dtype, rescale_every):
        model = load_model(path, device="cpu", dtype=dtype, fast=False)
        if rescale_every:
            model.enable_fp16_rescale(rescale_every)  # halving the residual stream, also in fp32
        gen = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        _, state = model.forward(torch.randint(1, vocab, (12,), generator=gen).tolist())
        decoder = fused_decoder(model)
        worst = 0.0
        for batch in (1, 3, lora_triton.MANY_ROWS):  # the LoRAs' kernels, then their GEMMs
            shift = state.shift.repeat(batch, 1, 1, 1)
            wkv = state.wkv.repeat(batch, 1, 1, 1, 1)
            shift = shift + 0.3 * torch.randn(shift.shape, generator=gen)  # rows that differ
            wkv = wkv + 0.3 * torch.randn(wkv.shape, generator=gen)
            ids = torch.randint(1, vocab, (batch,), generator=gen)
            expected, expected_state = model.decode_plain(ids, RwkvState(shift, wkv))
            shift_in, wkv_in = shift.clone(), wkv.clone()
            logits, new = decoder.step(ids, shift_in, wkv_in)
            assert torch.equal(shift_in, shift) and torch.equal(wkv_in, wkv), "the step changed its inputs"
            for a, b in ((logits, expected), (new.wkv, expected_state.wkv), (new.shift, expected_state.shift)):
                assert a.shape == b.shape and a.dtype == b.dtype
                worst = max(worst, (a - b).abs().max().item())
        return worst

    int4 = load_model(sys.argv[1].split(",")[0], device="cpu", dtype="int4", fast=False)
    results = {"int4 has no fused step": fused_decoder(int4) is None}
    for case in sys.argv[1:]:
        path, dtype, rescale_every = case.split(",")
        results[case] = worst_difference(path, dtype, int(rescale_every))
    print(json.dumps(results))
"""


@pytest.mark.parametrize("version", ["6", "7"])
def test_fused_decode_step_equals_the_plain_step_under_the_interpreter(version, make_checkpoint):
    """fp32 within 1e-4 for head sizes 64 and 32 and with the residual stream halved after every layer (fp16
    models' rescaling, here in fp32 so that it is exact); bf16 within the rounding the plain path has too; int8
    (bf16 inputs to its products) against the plain path's int8 products on the CPU, within the same bound (the
    differences measured 0.34-0.44 where bf16's were 0.22-0.40)."""
    pytest.importorskip("triton")
    small = dict(n_embd=128, vocab_size=1024)  # a small head: the interpreter runs its product slowly
    wide = make_checkpoint(version, n_layer=3, seed=11, **small).path
    narrow = make_checkpoint(version, n_layer=2, head_size=32, seed=12, **small).path
    cases = {f"{wide},fp32,0": 1e-4, f"{narrow},fp32,0": 1e-4, f"{wide},fp32,1": 1e-4, f"{wide},bf16,0": 1.0,
             f"{wide},int8,0": 1.0}
    results = json.loads(run_interpreted(SCRIPT, *cases).strip().splitlines()[-1])
    assert results.pop("int4 has no fused step") is True
    for case, tolerance in cases.items():
        assert results[case] <= tolerance, (case, results[case])
