"""kernels/lora_triton.py's LoRA products against float64 products of the same matrices, under Triton's interpreter
on CPU tensors (subprocess): the few-row kernels, the many-row tile GEMMs (rows that are not a multiple of a tile,
the down product split over K) and the PyTorch fallback for parts too narrow for a tile. On a GPU,
tests/runtime/test_plain_graphs.py runs them inside the graphed decode step against the plain path."""

from __future__ import annotations

import json

import pytest

from rwkv_chat.kernels import triton_kernels
from runtime.triton_interpreter import run_interpreted

SCRIPT = """
    import json, sys
    import torch
    from torch import nn
    from rwkv_chat.kernels import lora_triton as lt

    widths, rows, width_in, held = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    gen = torch.Generator().manual_seed(0)
    acts = [lt.IDENTITY, lt.TANH, lt.IDENTITY, lt.SIGMOID]
    inputs = [0, 1, 1, 2]  # two parts share an input: one block group, as RWKV-6's token-shift LoRA has
    parts = [lt.LoraPart(w, inputs[i], acts[i]) for i, w in enumerate(widths)]
    values = (lambda t: t.bfloat16().float()) if held == "bf16" else (lambda t: t)  # a bf16 checkpoint's values
    firsts = [nn.Parameter(values(torch.randn(width_in, w, generator=gen) * 0.1)) for w in widths]
    seconds = [nn.Parameter(values(torch.randn(w, 48, generator=gen) * 0.1)) for w in widths]
    expected_views = [(a.detach().clone(), b.detach().clone()) for a, b in zip(firsts, seconds)]
    low_rank = lt.LowRank.pack(firsts, seconds, parts, bf16=True if held == "bf16" else None)
    out = {"views": all(torch.equal(a.float(), a0) and torch.equal(b.float(), b0)
                        for (a, b), (a0, b0) in zip(zip(firsts, seconds), expected_views)),
           "held": [str(low_rank.down.dtype), str(low_rank.up.dtype), str(firsts[0].dtype)]}
    for m in rows:
        x = torch.randn(3, m, width_in, generator=gen)
        want = torch.stack([lt.ACTIVATIONS[p.activation](x[p.input_row].double() @ a.double()) @ b.double()
                            for p, (a, b) in zip(parts, expected_views)])
        # the many-row down GEMM whole (it applies the activations) and split over K (the up GEMM sums the splits
        # and applies them), in the tiles of every precision (the interpreter's fp32 products take 3xTF32's)
        for label, whole in (("whole", True), ("split", False)):
            lt.GEMM_TILES = {key: (down, up, whole) for key, (down, up, _) in lt.GEMM_TILES.items()}
            got = low_rank(x, torch.bfloat16)
            error = (got.double() - want).abs().max().item() / want.abs().max().item()
            out[f"{m} {label}"] = [list(got.shape), error]
    print(json.dumps(out))
"""


@pytest.mark.skipif(not triton_kernels.AVAILABLE, reason="needs Triton")
@pytest.mark.parametrize("held", ["fp32", "bf16"])
@pytest.mark.parametrize("widths,note", [([32, 64, 32, 96], "tiles of 32 rows"),
                                         ([8, 8, 24, 8], "parts narrower than a tile: PyTorch's GEMMs")])
def test_lora_products_match_float64_for_few_and_many_rows(widths, note, held):
    """held "bf16": factors whose values are all bf16 (a bf16 checkpoint's), held in bf16 and widened as the
    kernels load them; "fp32": the default on a CPU tensor, which holds them in fp32 (bf16 only on CUDA)."""
    rows = [3, 16, 37]  # the few-row kernels; the GEMM path at MANY_ROWS; rows past a whole tile of 16 or 32
    # 512 inputs: split, the down GEMM takes 2 splits (7 tiles against the interpreter's 8 SMs)
    out = json.loads(run_interpreted(SCRIPT, json.dumps(widths), json.dumps(rows), "512", held)
                     .strip().splitlines()[-1])
    assert out["views"], "packing changed the values the parameters show"
    assert out["held"] == [f"torch.{'bfloat16' if held == 'bf16' else 'float32'}"] * 3
    for m in rows:
        for label in ("whole", "split"):
            shape, error = out[f"{m} {label}"]
            assert shape == [len(widths), m, 48]
            assert error < 1e-5, f"{note}, {m} rows, down GEMM {label}: relative error {error:.2e}"
