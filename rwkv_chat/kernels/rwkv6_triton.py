"""Triton kernels for RWKV-6's decode step: the data-dependent token shift, and the recurrence with its
per-token decay (RWKV-5's decode kernel, which computes the decay in the same launch).

What this module promises:
- `dynamic_mixes(xx, prev, lora, maa, out32, out)` writes `xx + (prev - xx) * (maa_p + lora_p)` for the five
  parts w, k, v, r, g (models/rwkv6.py's order): w in fp32 to out32 [B, C], and k, v, r, g, in that order, to
  out [4, B, C] in out's dtype (they feed the packed projections).
- `wkv6_decode(...)` is one token of the recurrence with decay `exp(-exp(time_decay + w_lora))`, then the
  GroupNorm of the heads and the SiLU gate: y [B, A] in the requested dtype, the new state written.
- fp32 arithmetic throughout; under TRITON_INTERPRET=1 the kernels also run on CPU tensors.

It knows the arithmetic of one RWKV-6 time-mix step, not the model's structure.
"""

from __future__ import annotations

import torch

from .triton_kernels import AVAILABLE, _pow2, _split_view, pdl, tl, triton

if AVAILABLE:
    from .triton_kernels import _wait_for_producer, _wkv5_decode_kernel

    @triton.jit
    def _dynamic_mix_kernel(XX, stride_xx, PREV, stride_prev, L, stride_lp, stride_lb, MAA, OUT32, OUT, stride_op,
                            stride_ob, C, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        """Parts p = w, k, v, r, g: mix_p = xx + (prev - xx) * (MAA[p] + L[p]); w -> OUT32, k, v, r, g -> OUT."""
        _wait_for_producer(PDL)
        pid = tl.program_id(0)
        b = tl.program_id(1)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        ok = offs < C
        xx = tl.load(XX + b * stride_xx + offs, mask=ok, other=0.0)
        sx = tl.load(PREV + b * stride_prev + offs, mask=ok, other=0.0) - xx
        for p in tl.static_range(5):
            m = tl.load(MAA + p * C + offs, mask=ok, other=0.0) + tl.load(L + p * stride_lp + b * stride_lb + offs,
                                                                          mask=ok, other=0.0)
            mixed = xx + sx * m
            if p == 0:
                tl.store(OUT32 + b * C + offs, mixed, mask=ok)
            else:
                tl.store(OUT + (p - 1) * stride_op + b * stride_ob + offs, mixed.to(OUT.dtype.element_ty), mask=ok)


def dynamic_mixes(xx, prev, lora, maa, out32, out) -> None:
    """xx, prev [B, C] fp32 (row stride any); lora [5, B, C] fp32; maa [5, C] fp32; out32 [B, C] fp32 contiguous;
    out [4, B, C] (k, v, r, g)."""
    batch, c = xx.shape
    block = min(1024, _pow2(c))
    _dynamic_mix_kernel[(triton.cdiv(c, block), batch)](xx, xx.stride(0), prev, prev.stride(0), lora, lora.stride(0),
                                                        lora.stride(1), maa, out32, out, out.stride(0),
                                                        out.stride(1), c, BLOCK=block, num_warps=4, **pdl(xx.device))


def wkv6_decode(r, k, v, g, w_lora, state_in, state_out, time_decay, u, ln_w, ln_b, out_dtype, eps) -> torch.Tensor:
    """r, k, v, g: partials [S, B, A] views; w_lora fp32 [B, A] (row stride any); time_decay [A] and u [H, N]
    fp32; state_in/out [B, H, N(key), N(value)] (row stride any). Returns y [B, A] in out_dtype."""
    _, batch, dim = r.shape
    heads, size = state_in.shape[1], state_in.shape[-1]
    stride_s, stride_b, n_split = _split_view(r)
    for t in (k, v, g):
        assert _split_view(t) == (stride_s, stride_b, n_split)
    y = torch.empty((batch, dim), device=r.device, dtype=out_dtype)
    _wkv5_decode_kernel[(heads, batch)](r, k, v, g, stride_s, stride_b, n_split, state_in, state_out,
                                        state_in.stride(0), time_decay, u, ln_w, ln_b, y, dim, eps, w_lora,
                                        w_lora.stride(0), GATED=True, SIZE=size, TOKEN_DECAY=True, num_warps=4,
                                        **pdl(r.device))
    return y
