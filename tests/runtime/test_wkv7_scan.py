"""RWKV-7's token-by-token Triton scan (kernels/rwkv7_triton.py `wkv7_scan`, the GPU prefill's recurrence for
prompts up to models/rwkv7.py's WKV7_GPU_SCAN_TOKENS) against a float64 loop of the model's one-token step:
under Triton's interpreter on CPU tensors (subprocess) everywhere, and compiled on a GPU where there is one."""

from __future__ import annotations

import json

import pytest
import torch

from triton_interpreter import run_interpreted
from wkv7_oracle import wkv7_inputs, wkv7_token_loop

CASES = [  # batch, tokens, heads, head size, every decay at its strongest
    (2, 37, 3, 16, False), (1, 1, 2, 64, False), (3, 5, 1, 8, True), (1, 70, 2, 64, True)]


def worst_differences(batch, length, heads, size, strongest, device) -> list[float]:
    """[output, new state]: the scan's largest difference from the float64 steps, relative to the largest value."""
    from rwkv_chat.kernels import rwkv7_triton
    inputs, s0 = wkv7_inputs(batch, length, seed=length, heads=heads, size=size, strongest=strongest)  # [B, H, T, N]
    expected, state = wkv7_token_loop(inputs, s0)
    start = s0.float().to(device)
    kept = start.clone()
    y, s = rwkv7_triton.wkv7_scan(*(x.transpose(1, 2).float().to(device) for x in inputs), start)  # [B, T, H, N]
    assert torch.equal(start, kept), "the scan changed the state it was given"
    y = y.transpose(1, 2)
    assert y.dtype == s.dtype == torch.float32 and y.shape == expected.shape and s.shape == s0.shape
    return [((y.double().cpu() - expected).abs().max() / expected.abs().max()).item(),
            ((s.double().cpu() - state).abs().max() / state.abs().max()).item()]


def check(worst):
    for (batch, length, heads, size, _), (out, state) in zip(CASES, worst, strict=True):
        assert out < 1e-5 and state < 1e-5, f"B{batch} T{length} H{heads} N{size}: {out:.2e} {state:.2e}"


def test_the_scan_equals_the_one_token_steps_under_the_interpreter():
    script = """
        import json, sys
        sys.path.insert(0, sys.argv[2])
        from test_wkv7_scan import worst_differences
        print(json.dumps([worst_differences(*case, "cpu") for case in json.loads(sys.argv[1])]))
    """
    from pathlib import Path
    check(json.loads(run_interpreted(script, json.dumps(CASES), str(Path(__file__).parent))))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_scan_equals_the_one_token_steps_on_the_gpu():
    from rwkv_chat.kernels import triton_kernels
    if not triton_kernels.AVAILABLE:
        pytest.skip("needs Triton")
    check([worst_differences(*case, "cuda") for case in CASES])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_prompts_take_the_scan_up_to_its_length_and_the_chunked_form_above(monkeypatch):
    from rwkv_chat.kernels import rwkv7_triton, triton_kernels
    from rwkv_chat.models import rwkv7
    if not triton_kernels.AVAILABLE:
        pytest.skip("needs Triton")
    scans = []
    scan = rwkv7_triton.wkv7_scan
    monkeypatch.setattr(rwkv7_triton, "wkv7_scan", lambda *args: scans.append(args[1].shape[1]) or scan(*args))
    for length in (rwkv7.WKV7_GPU_SCAN_TOKENS, rwkv7.WKV7_GPU_SCAN_TOKENS + 1):
        shape = (1, length, 2, 64)
        inputs = [-0.5 * torch.rand(shape), *(torch.randn(shape) for _ in range(3)),
                  torch.nn.functional.normalize(torch.randn(shape), dim=-1), torch.rand(shape)]
        s0 = torch.randn(1, 2, 64, 64)
        y, s = rwkv7.wkv7_sequence(*(x.cuda() for x in inputs), s0.cuda())
        expected, expected_state = rwkv7.wkv7_chunks(*inputs, s0, rwkv7.WKV7_CHUNK)
        assert (y.cpu() - expected).abs().max() / expected.abs().max() < 1e-4
        assert (s.cpu() - expected_state).abs().max() / expected_state.abs().max() < 1e-4
    assert scans == [rwkv7.WKV7_GPU_SCAN_TOKENS]
