"""The CPU bound benchmark's own arithmetic (rwkv_chat/bench_cpu_bound.py): its count of a prefill's matrix
work against the products our plain model really runs, and its assembly loops against their checks. The
speeds themselves are the benchmark's to print, never asserted here."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from benchmarks import bench_cpu_bound
from rwkv_chat.loading.loader import build_model, config_from_state_dict
from rwkv_chat.models.layers import Projection
from checkpoints import VERSIONS, make_state_dict

CAPABLE = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and shutil.which("c++") is not None


def products_run(model, tokens: int) -> dict[str, tuple[int, int]]:
    """(rows, weights) of every Projection the plain model calls while reading `tokens` tokens: the rows it
    multiplies and its weight's size (their product: its multiply-accumulates)."""
    macs: dict[str, tuple[int, int]] = {}
    names = {module: name for name, module in model.named_modules() if isinstance(module, Projection)}

    def record(module, inputs, output):
        rows = inputs[0].numel() // inputs[0].shape[-1]
        macs[names[module]] = (macs.get(names[module], (0, 0))[0] + rows, module.weight.numel())

    hooks = [module.register_forward_hook(record) for module in names]
    try:
        with torch.inference_mode():
            model.forward(torch.randint(0, 1000, (tokens,)).tolist())
    finally:
        for hook in hooks:
            hook.remove()
    return macs


@pytest.mark.parametrize("version", VERSIONS)
def test_the_prefill_count_is_what_the_model_multiplies_less_the_last_layers_unused_rows(version):
    n_layer, tokens = 3, 17
    sd = make_state_dict(version, n_layer=n_layer, n_embd=128, vocab_size=1000)
    model = build_model(config_from_state_dict(sd), dict(sd), torch.device("cpu"), torch.float32, fast=False)
    run = products_run(model, tokens)
    assert "head" in run and any(".att.key" in name for name in run)
    # the plain model runs every projection on every token (the head on the last), but for the last layer's
    # channel mix, which it runs for the last token alone. In the last layer only the wkv state needs every
    # token (att.key, att.value); the last token's channel mix needs the attention output of the token before
    # it (token shift), and nothing else needs more than the last token
    last = f"blocks.{n_layer - 1}."
    assert all(run[name][0] == (1 if name.startswith(last + "ffn.") else tokens) for name in run if "blocks." in name)
    rows = {"att.key": tokens, "att.value": tokens, "att.receptance": 2, "att.gate": 2, "att.output": 2}
    needed = sum(weights * (rows.get(name[len(last):], 1) if name.startswith(last) else ran)
                 for name, (ran, weights) in run.items())
    assert bench_cpu_bound.prefill_macs(sd, n_layer, tokens) == needed


@pytest.mark.skipif(not CAPABLE, reason="needs an x86-64 AVX2 CPU and a C++ compiler")
def test_the_ceiling_loops_run_and_the_int16_tile_matches_its_scalar_check():
    ext = bench_cpu_bound.build_extension()
    for measure in (ext.fp32_fma_peak, ext.int16_madd_peak, ext.u8s8_madd_peak):
        rate = measure(10_000, 1)
        assert math.isfinite(rate) and rate > 0
    assert ext.int16_tile_rate(50, 2) > 0  # raises if its sums differ from the scalar loop's
    with pytest.raises(ValueError, match="positive"):
        ext.fp32_fma_peak(0, 1)
