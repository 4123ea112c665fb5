"""Triton kernels for RWKV-7: the decode step (everything element-wise between the projections and the output
product, for one token of B sequences, in one launch) and the recurrence of a prompt token by token.

What this module promises:
- `wkv7_decode(...)` computes, per (sequence, head) and in fp32, what models/rwkv7.py's `TimeMixV7` computes
  after its products: the decay `exp(-DECAY_SCALE * sigmoid(w0 + w_lora))`, the learning rate
  `a = sigmoid(a0 + a_lora)`, the value residual (layer 0 writes `v_first`, the others mix towards it with
  `sigmoid(v0 + v_lora)`), `kk = normalize(k * k_k)`, `k *= 1 + (a - 1) * k_a`, the state step
  `S = S diag(w) - (S kk)(kk a)^T + v k^T`, `y = S r`, the GroupNorm of the head, the bonus `(r . k r_k) v`
  and the gate. It returns `(y_norm + bonus) * g` in the requested dtype and writes the new state.
- r, k, v come as split-K partial sums (views [S, B, A], any dtype), the LoRA outputs as fp32 [B, A] views.
- The head size must be a power of two (triton_kernels.supports_head_size). Under TRITON_INTERPRET=1 the kernel
  also runs on CPU tensors (the tests compare it with the PyTorch path there).
- `wkv7_scan(log_w, r, k, v, kk, a, s)` runs the state step `S = S diag(w) - (S kk)(kk a)^T + v k^T`, `y = S r`
  over T tokens of B sequences in one launch (fp32 throughout; each program keeps SCAN_ROWS value rows of one
  head's state in registers from the first token to the last) and returns (y, new state); the state passed in is
  not changed. Its cost grows with T one token after another: the caller decides where it beats a chunked form.

It knows the arithmetic of one RWKV-7 time-mix step, not the model's structure.
"""

from __future__ import annotations

import torch

from .triton_kernels import AVAILABLE, _split_view, pdl, tl, triton

WIDE_BATCH = 32  # from this many sequences a program has 2 warps, not 4 (H200, 7.2B shape: 256 rows 169 -> 145 us
# a layer, 64 rows 46 -> 40; fewer rows alike within 1 us)

if AVAILABLE:
    from .triton_kernels import _sum_splits, _wait_for_producer

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _wkv7_decode_kernel(R, K, V, stride_s, stride_b, n_split, W_L, A_L, V_L, G, stride_l, V_FIRST,
                            W0, A0, V0, K_K, K_A, R_K, LNW, LNB, S_IN, S_OUT, stride_state, Y, A, eps, decay_scale,
                            FIRST: tl.constexpr, SIZE: tl.constexpr, PDL: tl.constexpr = False):
        """One token for one (sequence, head): i indexes values (state rows), j keys (state columns)."""
        _wait_for_producer(PDL)
        h = tl.program_id(0)
        b = tl.program_id(1)
        n = tl.arange(0, SIZE)
        ch = h * SIZE + n
        ok = n < SIZE
        r = _sum_splits(R + b * stride_b + h * SIZE, stride_s, n_split, n, ok)
        k = _sum_splits(K + b * stride_b + h * SIZE, stride_s, n_split, n, ok)
        v = _sum_splits(V + b * stride_b + h * SIZE, stride_s, n_split, n, ok)
        lora = b * stride_l + ch
        w = tl.exp(-decay_scale * _sigmoid(tl.load(W0 + ch) + tl.load(W_L + lora)))
        a = _sigmoid(tl.load(A0 + ch) + tl.load(A_L + lora))
        kk = k * tl.load(K_K + ch)
        kk = kk / tl.maximum(tl.sqrt(tl.sum(kk * kk, axis=0)), 1e-12)
        k = k * (1.0 + (a - 1.0) * tl.load(K_A + ch))
        if FIRST:
            tl.store(V_FIRST + b * A + ch, v)
        else:
            v = v + (tl.load(V_FIRST + b * A + ch) - v) * _sigmoid(tl.load(V0 + ch) + tl.load(V_L + lora))
        cell = b * stride_state + h * SIZE * SIZE + n[:, None] * SIZE + n[None, :]
        s = tl.load(S_IN + cell)
        s_kk = tl.sum(s * kk[None, :], axis=1)  # [i]
        s = s * w[None, :] - s_kk[:, None] * (kk * a)[None, :] + v[:, None] * k[None, :]
        tl.store(S_OUT + cell, s)
        y = tl.sum(s * r[None, :], axis=1)  # [i]
        mean = tl.sum(y, axis=0) / SIZE
        diff = y - mean
        var = tl.sum(diff * diff, axis=0) / SIZE
        y = diff / tl.sqrt(var + eps) * tl.load(LNW + ch) + tl.load(LNB + ch)
        y = y + tl.sum(r * k * tl.load(R_K + ch), axis=0) * v
        tl.store(Y + b * A + ch, (y * tl.load(G + lora)).to(Y.dtype.element_ty))

    @triton.jit
    def _wkv7_scan_kernel(LOG_W, R, K, V, KK, A, S_IN, S_OUT, Y, length, heads,
                          SIZE: tl.constexpr, BLOCK: tl.constexpr):
        """T tokens of one (sequence, head) for BLOCK of its value rows (the state's rows are independent):
        i indexes values, j keys; the rows stay in registers from the first token to the last."""
        bh = tl.program_id(0)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        j = tl.arange(0, SIZE)
        cell = bh * SIZE * SIZE + i[:, None] * SIZE + j[None, :]
        s = tl.load(S_IN + cell)
        row = (bh // heads) * length * heads * SIZE + (bh % heads) * SIZE  # token 0 of [B, T, H, N]
        for _ in range(0, length):
            w = tl.exp(tl.load(LOG_W + row + j))
            kk = tl.load(KK + row + j)
            s_kk = tl.sum(s * kk[None, :], axis=1)  # [i]
            s = (s * w[None, :] - s_kk[:, None] * (kk * tl.load(A + row + j))[None, :]
                 + tl.load(V + row + i)[:, None] * tl.load(K + row + j)[None, :])
            tl.store(Y + row + i, tl.sum(s * tl.load(R + row + j)[None, :], axis=1))
            row += heads * SIZE
        tl.store(S_OUT + cell, s)


def wkv7_decode(r, k, v, w_lora, a_lora, v_lora, g, v_first, first: bool, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b,
                state_in, state_out, out_dtype, eps: float, decay_scale: float) -> torch.Tensor:
    """r, k, v: partials [S, B, A] views; w_lora, a_lora, v_lora (None in layer 0), g: fp32 [B, A] views sharing
    one row stride; v_first fp32 [B, A] (written when `first`, else read); the per-channel constants fp32 [A]
    (v0 None in layer 0; r_k flattened); state_in/out [B, H, N, N] (row stride any). Returns y [B, A]."""
    _, batch, dim = r.shape
    heads, size = state_in.shape[1], state_in.shape[-1]
    stride_s, stride_b, n_split = _split_view(r)
    for t in (k, v):
        assert _split_view(t) == (stride_s, stride_b, n_split)
    for t in (a_lora, g) + (() if first else (v_lora,)):
        assert t.stride() == w_lora.stride()
    y = torch.empty((batch, dim), device=r.device, dtype=out_dtype)
    v_lora = w_lora if first else v_lora
    v0 = w0 if first else v0
    _wkv7_decode_kernel[(heads, batch)](r, k, v, stride_s, stride_b, n_split, w_lora, a_lora, v_lora, g,
                                        w_lora.stride(0), v_first, w0, a0, v0, k_k, k_a, r_k, ln_w, ln_b,
                                        state_in, state_out, state_in.stride(0), y, dim, eps, decay_scale,
                                        FIRST=first, SIZE=size, num_warps=2 if batch >= WIDE_BATCH else 4,
                                        **pdl(r.device))
    return y


SCAN_ROWS = 16  # value rows of a head's state a scan program keeps (4 programs a head of 64: more of the GPU's
SCAN_WARPS = 2  # cores busy); rows and warps not tuned beyond one measured point (H100, 7.2B, 2026-12-05)


def wkv7_scan(log_w, r, k, v, kk, a, s):
    """T tokens token by token, in fp32: every input [B, T, H, N] fp32 (k already scaled by k_a), s [B, H, N, N]
    fp32 (values by keys) -> (y fp32 [B, T, H, N], new s). The arithmetic of `models.rwkv7.wkv7_step` per token;
    one launch for the whole prompt."""
    batch, length, heads, size = r.shape
    rows = [t.contiguous() for t in (log_w, r, k, v, kk, a)]
    state_in = s.contiguous()
    state_out = torch.empty_like(state_in)
    y = torch.empty_like(rows[1])
    block = min(size, SCAN_ROWS)
    _wkv7_scan_kernel[(batch * heads, size // block)](*rows, state_in, state_out, y, length, heads,
                                                       SIZE=size, BLOCK=block, num_warps=SCAN_WARPS)
    return y, state_out
