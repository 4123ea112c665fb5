"""Triton kernels for the GPU fast path: fused decode-step pieces, weight-streaming matrix-vector products,
and the RWKV-4 scan for prefill (chunks of a prompt side by side).

What this module promises:
- `AVAILABLE` says whether Triton imported; without it nothing here may be called (callers fall back to
  PyTorch), and importing this module never fails.
- Each wrapper computes the same function as the PyTorch code of runtime/fast_path.py and the architectures it
  replaces (fp32 arithmetic; only the matrix operands are in the weight dtype), allocates its outputs, and
  returns them. `ln_mix`, `ffn_act`, `project_relu2`,
  `project` and the RWKV-5 decode kernel (whose decay may also come per token, RWKV-6's) serve the fused decode
  step of RWKV-6/7 as well (runtime/fused_decode.py).
- `project` multiplies P stacked inputs [P, M, K] by one packed weight [N, K] whose rows fall into
  segments (r|k|v|g, or ffn key|receptance): row block n uses input `seg(n)`. The weight is read once.
  It serves int8 weights (per-row scale), for which no library kernel exists, and one row of float weights
  where it measured faster than cuBLAS on an H200 (runtime/packing.py chooses; docs/PERFORMANCE.md). One
  row's launch settings come from GEMV_CONFIGS, by weight format.
  Results come back as split-K partial sums [S, M, N] fp32; the consumers (`ln_mix`, `wkv*_decode`,
  `ffn_act`) add the S partials while loading, so no extra reduction pass runs. `project_relu2` is one row's
  `project` that also does `ffn_act`'s work on the channel mix's key where one split covers K (at 7B on an
  H100/H200 it does): relu² in the product's last step, one launch less a layer.
- For prefill, beside the scans: `shift_mix` (a prompt's token-shift mixes, one pass, in the GEMMs' input dtype)
  and `sigmoid_gate` ([residual +] sigmoid(r) * y in fp32 from inputs of any float dtype, one pass); the RWKV-4
  scan reads k and v as a bf16/fp16 GEMM gave them. `wkv5_scan` also takes a decay per token: RWKV-6's plain
  path reads its prompts with it.
- Under TRITON_INTERPRET=1 the kernels also run on CPU tensors (used by the tests). `PTX` says whether inline PTX
  may run (NVIDIA's CUDA, compiled kernels): only the int8 one-row product's fp16-pair widening uses it, and every
  kernel has a form without it.

It knows the RWKV layer's arithmetic, not the model's structure.
"""

from __future__ import annotations

import functools
import math
import os

import torch

try:  # Triton is optional: CPUs and CUDA machines without it use the PyTorch path.
    import triton
    import triton.language as tl
    AVAILABLE = True
except Exception:  # pragma: no cover - depends on the machine
    triton = tl = None
    AVAILABLE = False
try:  # grid dependency control (programmatic dependent launch), in Triton since 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAS_GDC = True
except Exception:  # pragma: no cover - depends on the Triton version
    HAS_GDC = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def usable(device: torch.device | str) -> bool:
    """Triton kernels can run on tensors of this device."""
    device = torch.device(device)
    return AVAILABLE and (device.type == "cuda" or INTERPRET)


def supports_head_size(head_size: int) -> bool:
    """Whether the kernels sized by the head (every architecture with heads) run heads of this size: a power of
    two, as Triton's ranges need."""
    return AVAILABLE and head_size >= 2 and head_size & (head_size - 1) == 0


@functools.lru_cache(maxsize=None)
def _pdl_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(device: torch.device) -> dict:
    """Launch options for a decode-step kernel on `device`: on Hopper and later GPUs, a programmatic dependent
    launch (the kernel starts while the one before it ends, and waits for it before touching memory, so results
    are unchanged; 7B decode on an H200 gained 1-2%, docs/PERFORMANCE.md); elsewhere a plain launch."""
    on = (HAS_GDC and device.type == "cuda" and not INTERPRET
          and _pdl_capable(device.index if device.index is not None else torch.cuda.current_device()))
    return {"PDL": on, "launch_pdl": on}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


if AVAILABLE:

    if not HAS_GDC:  # pragma: no cover - an older Triton: `pdl` never sets PDL, these only let the kernels compile
        @triton.jit
        def gdc_launch_dependents():
            pass

        @triton.jit
        def gdc_wait():
            pass

    @triton.jit
    def _let_next_launch(PDL: tl.constexpr):
        """Launched as a programmatic dependent (PDL, see `pdl`): the next kernel may launch now."""
        if PDL:
            gdc_launch_dependents()

    @triton.jit
    def _wait_for_kernel_before(PDL: tl.constexpr):
        """Launched as a programmatic dependent: wait until the kernel before this one has finished and its writes
        are visible. Only what no kernel writes (weights) may be read before this."""
        if PDL:
            gdc_wait()

    @triton.jit
    def _wait_for_producer(PDL: tl.constexpr):
        """Launched as a programmatic dependent (PDL, see `pdl`): let the next kernel launch, then wait until the
        kernel before this one has finished and its writes are visible. First in every such kernel that reads
        nothing before it."""
        _let_next_launch(PDL)
        _wait_for_kernel_before(PDL)

    # ------------------------------------------------------------------------------- matrix products

    @triton.jit
    def _int8_pair(w, SELECT: tl.constexpr):
        """Two int8 weights of a word w whose sign bits are flipped (bytes b + 128), as two exact fp32 values: one
        byte permute places them under the fp16 exponent of 1024 (fp16 1024 + 128 + b), one paired fp16
        subtraction of 1152 leaves b, two widenings. SELECT picks the bytes ("0x4140": 0 and 1, "0x4342": 2
        and 3). PTX: CUDA only, never under the interpreter."""
        return tl.inline_asm_elementwise(
            "{ .reg .b32 c, t, m; .reg .b16 lo, hi; mov.b32 c, 0x64646464; mov.b32 m, 0x64806480; "
            "prmt.b32 t, $2, c, " + SELECT + "; sub.rn.f16x2 t, t, m; mov.b32 {lo, hi}, t; "
            "cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi; }",
            "=f,=f,r", [w], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)

    @triton.jit
    def _gemv1_tile(acc, w, x_base, offs, ok, WORDS: tl.constexpr, PAIRS: tl.constexpr):
        """acc += one [BLOCK_N, BLOCK_KW] weight tile times its activations (see `_gemv1_kernel`)."""
        if WORDS and PAIRS:
            w = w ^ -2139062144  # 0x80808080: every byte b + 128
            w0, w1 = _int8_pair(w, "0x4140")
            acc += w0 * tl.load(x_base + offs * 4, mask=ok, other=0.0).to(tl.float32)[None, :]
            acc += w1 * tl.load(x_base + offs * 4 + 1, mask=ok, other=0.0).to(tl.float32)[None, :]
            w2, w3 = _int8_pair(w, "0x4342")
            acc += w2 * tl.load(x_base + offs * 4 + 2, mask=ok, other=0.0).to(tl.float32)[None, :]
            acc += w3 * tl.load(x_base + offs * 4 + 3, mask=ok, other=0.0).to(tl.float32)[None, :]
        elif WORDS:
            for byte in tl.static_range(4):
                x = tl.load(x_base + offs * 4 + byte, mask=ok, other=0.0).to(tl.float32)
                biased = ((w >> (8 * byte)) & 0xFF) ^ 0x80  # b + 128, in 0..255
                wb = (biased | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0  # (2^23+b+128)-(2^23+128)
                acc += wb * x[None, :]
        else:
            x = tl.load(x_base + offs, mask=ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _gemv1_kernel(X, W, SCALE, Y, H, N, KW, SEG, NSEG, stride_xp, stride_ys, KW_PER_SPLIT, RELU2_N,
                      BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, HAS_SCALE: tl.constexpr,
                      WORDS: tl.constexpr = False, PAIRS: tl.constexpr = False, PRELOAD: tl.constexpr = 0,
                      RELU2: tl.constexpr = False, PDL: tl.constexpr = False):
        """One row: Y[s, 0, n] = sum_k X[seg(n), 0, k] * W[n, k] (* SCALE[n]). The products accumulate in a
        [BLOCK_N, BLOCK_KW] register tile and are reduced once at the end (no reduction inside the loop).

        With WORDS, W [N, KW] holds int8 weights as 32-bit words of four (K = 4 KW), widened without an
        integer-to-float conversion: byte b of a word, its sign bit flipped and OR-ed under the exponent bits of
        2^23, is the float 2^23 + 128 + b, from which 2^23 + 128 is subtracted exactly. On an H200 this read
        the 7B matrices at 3.2-4.0 TB/s where `.to(float32)` of int8 tiles read 2.0-3.3. With PAIRS too, two
        bytes at a time become exact fp16 pairs (`_int8_pair`): fewer instructions a weight, the same values
        and sums, but more registers a thread (`project` decides when that pays).

        With PRELOAD (1-4), a program loads its first PRELOAD weight tiles before it waits for the kernel before it
        (PDL): no kernel writes weights, so their reading may start while that kernel ends (the LayerNorm and mixes,
        the wkv step, relu²: a few microseconds each, ~130 a 7B step). The sums' order is the same.

        With RELU2 (one split only: Y then holds whole sums), rows below RELU2_N (the channel mix's key, whole row
        blocks) go to H [1, RELU2_N] as relu(y)² in H's dtype instead of to Y: the bits `ffn_act` gives."""
        tl.static_assert(PRELOAD <= 4, "PRELOAD: at most 4 weight tiles before the wait")
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        n0 = pid_n * BLOCK_N
        seg = tl.minimum(n0 // SEG, NSEG - 1)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        begin = pid_s * KW_PER_SPLIT
        _let_next_launch(PDL)
        if PRELOAD == 0:
            _wait_for_kernel_before(PDL)
        # tiles 1..PRELOAD are read before the wait (PRELOAD 0: the first after it); past the split's share, masked
        first = begin + tl.arange(0, BLOCK_KW)
        first_ok = first < KW
        w_first = tl.load(W + offs_n[:, None] * KW + first[None, :], mask=n_ok[:, None] & first_ok[None, :], other=0)
        if PRELOAD >= 2:
            second = first + BLOCK_KW
            second_ok = (second < KW) & (BLOCK_KW < KW_PER_SPLIT)
            w_second = tl.load(W + offs_n[:, None] * KW + second[None, :], mask=n_ok[:, None] & second_ok[None, :],
                               other=0)
        if PRELOAD >= 3:
            third = second + BLOCK_KW
            third_ok = (third < KW) & (2 * BLOCK_KW < KW_PER_SPLIT)
            w_third = tl.load(W + offs_n[:, None] * KW + third[None, :], mask=n_ok[:, None] & third_ok[None, :],
                              other=0)
        if PRELOAD >= 4:
            fourth = third + BLOCK_KW
            fourth_ok = (fourth < KW) & (3 * BLOCK_KW < KW_PER_SPLIT)
            w_fourth = tl.load(W + offs_n[:, None] * KW + fourth[None, :], mask=n_ok[:, None] & fourth_ok[None, :],
                               other=0)
        if PRELOAD > 0:
            _wait_for_kernel_before(PDL)
        x_base = X + seg * stride_xp
        acc = _gemv1_tile(tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32), w_first, x_base, first, first_ok, WORDS,
                          PAIRS)
        if PRELOAD >= 2:
            acc = _gemv1_tile(acc, w_second, x_base, second, second_ok, WORDS, PAIRS)
        if PRELOAD >= 3:
            acc = _gemv1_tile(acc, w_third, x_base, third, third_ok, WORDS, PAIRS)
        if PRELOAD >= 4:
            acc = _gemv1_tile(acc, w_fourth, x_base, fourth, fourth_ok, WORDS, PAIRS)
        for kk in range(max(PRELOAD, 1) * BLOCK_KW, KW_PER_SPLIT, BLOCK_KW):
            offs = begin + kk + tl.arange(0, BLOCK_KW)
            ok = offs < KW
            w = tl.load(W + offs_n[:, None] * KW + offs[None, :], mask=n_ok[:, None] & ok[None, :], other=0)
            acc = _gemv1_tile(acc, w, x_base, offs, ok, WORDS, PAIRS)
        out = tl.sum(acc, axis=1)
        if HAS_SCALE:
            out = out * tl.load(SCALE + offs_n, mask=n_ok, other=0.0)
        if RELU2:
            if n0 < RELU2_N:  # a row block lies wholly below RELU2_N or above it
                out = tl.maximum(out, 0.0)
                tl.store(H + offs_n, (out * out).to(H.dtype.element_ty), mask=n_ok)
            else:
                tl.store(Y + offs_n, out, mask=n_ok)
        else:
            tl.store(Y + pid_s * stride_ys + offs_n, out, mask=n_ok)

    @triton.jit
    def _matmul_kernel(X, W, SCALE, Y, M, N, K, SEG, NSEG, stride_xp, stride_xm, stride_ys, stride_ym,
                       K_PER_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       HAS_SCALE: tl.constexpr, DOT_FP16: tl.constexpr, PDL: tl.constexpr = False):
        """Y[s, m, n] = sum over this split's k of X[seg(n), m, k] * W[n, k] (* SCALE[n]) on the tensor cores
        (bf16 operands, fp32 accumulation; fp16 operands only under the interpreter, whose bf16 dot is
        broken). Rows past M are masked: 2 rows cost a 16-row tile, which still streams each weight once."""
        _wait_for_producer(PDL)
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_m = tl.program_id(2)
        n0 = pid_n * BLOCK_N
        seg = tl.minimum(n0 // SEG, NSEG - 1)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n_ok = offs_n < N
        m_ok = offs_m < M
        k_begin = pid_s * K_PER_SPLIT
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_base = X + seg * stride_xp
        for kk in range(0, K_PER_SPLIT, BLOCK_K):
            offs_k = k_begin + kk + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            w = tl.load(W + offs_n[:, None] * K + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_base + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if DOT_FP16:
                acc = tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)), acc)
            else:
                acc = tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)), acc)
        if HAS_SCALE:
            acc = acc * tl.load(SCALE + offs_n, mask=n_ok, other=0.0)[None, :]
        tl.store(Y + pid_s * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :], acc,
                 mask=m_ok[:, None] & n_ok[None, :])

    # ------------------------------------------------------------------------------- element-wise steps

    @triton.jit
    def _sum_splits(P, stride_s, n_split, offs, mask):
        acc = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
        for s in range(1, n_split):
            acc += tl.load(P + s * stride_s + offs, mask=mask, other=0.0).to(tl.float32)
        return acc

    @triton.jit
    def _residual(X, D, stride_ds, n_d, G, stride_gs, n_g, offs, ok, HAS_D: tl.constexpr, HAS_G: tl.constexpr,
                  HALVE: tl.constexpr):
        """x + sigmoid(g) * d (or + d), halved if HALVE, at offs of one row (D, G: that row's partials)."""
        x = tl.load(X + offs, mask=ok, other=0.0)
        if HAS_D:
            d = _sum_splits(D, stride_ds, n_d, offs, ok)
            if HAS_G:
                g = _sum_splits(G, stride_gs, n_g, offs, ok)
                d = d / (1.0 + tl.exp(-g))
            x = x + d
            if HALVE:
                x = x * 0.5
        return x

    @triton.jit
    def _ln_mix_kernel(X, X_OUT, D, stride_ds, stride_db, n_d, G, stride_gs, stride_gb, n_g, LNW, LNB, PREV,
                       stride_prev, MIX, OUT, stride_op, stride_om, OUT32, stride_o32p, stride_o32m, XX, stride_xx, C,
                       P, P_OUT, FIRST32, eps, HAS_D: tl.constexpr, HAS_G: tl.constexpr, HALVE: tl.constexpr,
                       HAS_MIX: tl.constexpr, HAS_OUT32: tl.constexpr, BLOCK_C: tl.constexpr,
                       CHUNK: tl.constexpr, PDL: tl.constexpr = False):
        """x' = x + sigmoid(g) * d (or + d), halved if HALVE, to X_OUT; xx = LayerNorm(x'); mix p = xx*mix_p +
        prev*(1-mix_p) goes to OUT[p] for p < P_OUT (OUT's dtype) and to OUT32[p - FIRST32] for p >= FIRST32
        (fp32). Program (b, c) writes channels [c CHUNK, (c+1) CHUNK) of row b; each program of a row computes
        the row's statistics itself (from L2), so one row's work spreads over several SMs. X_OUT may be X only
        when one program covers the row (CHUNK >= C)."""
        _wait_for_producer(PDL)
        b = tl.program_id(0)
        row = X + b * C
        d_row = D + b * stride_db
        g_row = G + b * stride_gb
        offs = tl.arange(0, BLOCK_C)
        ok = offs < C
        x = _residual(row, d_row, stride_ds, n_d, g_row, stride_gs, n_g, offs, ok, HAS_D, HAS_G, HALVE)
        mean = tl.sum(x, axis=0) / C
        diff = tl.where(ok, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / C + eps)
        if CHUNK < BLOCK_C:  # this program's channels only: their residual again, from L2
            offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
            ok = offs < C
            x = _residual(row, d_row, stride_ds, n_d, g_row, stride_gs, n_g, offs, ok, HAS_D, HAS_G, HALVE)
            diff = x - mean
        if HAS_D:
            tl.store(X_OUT + b * C + offs, x, mask=ok)
        xx = diff * rstd * tl.load(LNW + offs, mask=ok, other=1.0) + tl.load(LNB + offs, mask=ok, other=0.0)
        if HAS_MIX:
            prev = tl.load(PREV + b * stride_prev + offs, mask=ok, other=0.0)
            tl.store(XX + b * stride_xx + offs, xx, mask=ok)
            for p in range(P):
                m = tl.load(MIX + p * C + offs, mask=ok, other=0.0)
                mixed = xx * m + prev * (1.0 - m)
                if p < P_OUT:
                    tl.store(OUT + p * stride_op + b * stride_om + offs, mixed.to(OUT.dtype.element_ty), mask=ok)
                if HAS_OUT32:
                    if p >= FIRST32:
                        tl.store(OUT32 + (p - FIRST32) * stride_o32p + b * stride_o32m + offs, mixed, mask=ok)
        else:
            tl.store(OUT + b * stride_om + offs, xx.to(OUT.dtype.element_ty), mask=ok)

    @triton.jit
    def _wkv5_decode_kernel(R, K, V, G, stride_s, stride_b, n_split, S_IN, S_OUT, stride_state, W, U, LNW, LNB, Y,
                            A, eps, W_LORA, stride_wl, GATED: tl.constexpr, SIZE: tl.constexpr,
                            TOKEN_DECAY: tl.constexpr, PDL: tl.constexpr = False):
        """One token of the v5 recurrence for one (sequence, head), then GroupNorm and the 5.2 gate. W is the
        decay factor; with TOKEN_DECAY (RWKV-6) it is exp(-exp(W + W_LORA[b])) instead, per sequence. The
        state passed in is read before the wait for the kernel before (PDL): no kernel of the step writes S_IN (the
        new state goes to S_OUT), and what wrote it before the step (the step before, a copy) has finished by then.
        A graphed RWKV-5.2 7B step on an H100, against reading it after the wait: 17 µs (bf16) / 30 µs (int8)
        shorter at one row, 144 µs (1 %) at 256 rows (docs/PERFORMANCE.md, forty-seventh and forty-eighth
        sessions)."""
        _let_next_launch(PDL)
        h = tl.program_id(0)
        b = tl.program_id(1)
        i = tl.arange(0, SIZE)  # key index
        j = tl.arange(0, SIZE)  # value index
        cell = b * stride_state + h * SIZE * SIZE + i[:, None] * SIZE + j[None, :]
        s = tl.load(S_IN + cell)
        _wait_for_kernel_before(PDL)
        base = b * stride_b + h * SIZE
        mask = i < SIZE
        r = _sum_splits(R + base, stride_s, n_split, i, mask)
        k = _sum_splits(K + base, stride_s, n_split, i, mask)
        v = _sum_splits(V + base, stride_s, n_split, j, mask)
        u = tl.load(U + h * SIZE + i)
        w = tl.load(W + h * SIZE + i)
        if TOKEN_DECAY:
            w = tl.exp(-tl.exp(w + tl.load(W_LORA + b * stride_wl + h * SIZE + i)))
        a = k[:, None] * v[None, :]
        out = tl.sum(r[:, None] * (u[:, None] * a + s), axis=0)  # [value]
        tl.store(S_OUT + cell, a + w[:, None] * s)
        mean = tl.sum(out, axis=0) / SIZE
        diff = out - mean
        var = tl.sum(diff * diff, axis=0) / SIZE
        y = diff / tl.sqrt(var + eps) * tl.load(LNW + h * SIZE + j) + tl.load(LNB + h * SIZE + j)
        if GATED:
            g = _sum_splits(G + base, stride_s, n_split, j, mask)
            y = y * (g / (1.0 + tl.exp(-g)))
        tl.store(Y + b * A + h * SIZE + j, y.to(Y.dtype.element_ty))

    @triton.jit
    def _wkv4_decode_kernel(R, K, V, stride_s, stride_b, n_split, S_IN, S_OUT, stride_state, W, U, Y, C,
                            BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        """One token of the v4 recurrence; state rows (aa, bb, pp) at S + {0, C, 2C}; y = sigmoid(r) * wkv."""
        _wait_for_producer(PDL)
        pid = tl.program_id(0)
        b = tl.program_id(1)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        ok = offs < C
        base = b * stride_b
        r = _sum_splits(R + base, stride_s, n_split, offs, ok)
        k = _sum_splits(K + base, stride_s, n_split, offs, ok)
        v = _sum_splits(V + base, stride_s, n_split, offs, ok)
        st = b * stride_state + offs
        aa = tl.load(S_IN + st, mask=ok, other=0.0)
        bb = tl.load(S_IN + C + st, mask=ok, other=0.0)
        pp = tl.load(S_IN + 2 * C + st, mask=ok, other=0.0)
        w = tl.load(W + offs, mask=ok, other=0.0)
        u = tl.load(U + offs, mask=ok, other=0.0)
        ww = u + k
        p = tl.maximum(pp, ww)
        e1 = tl.exp(pp - p)
        e2 = tl.exp(ww - p)
        wkv = (e1 * aa + e2 * v) / (e1 * bb + e2)
        ww = w + pp
        p = tl.maximum(ww, k)
        e1 = tl.exp(ww - p)
        e2 = tl.exp(k - p)
        tl.store(S_OUT + st, e1 * aa + e2 * v, mask=ok)
        tl.store(S_OUT + C + st, e1 * bb + e2, mask=ok)
        tl.store(S_OUT + 2 * C + st, p, mask=ok)
        y = wkv / (1.0 + tl.exp(-r))
        tl.store(Y + b * C + offs, y.to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _ffn_act_kernel(KP, stride_s, stride_b, n_split, OUT, F, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        """relu(k)^2 of the channel-mix key, summed over splits, in the weight dtype."""
        _wait_for_producer(PDL)
        pid = tl.program_id(0)
        b = tl.program_id(1)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        ok = offs < F
        k = _sum_splits(KP + b * stride_b, stride_s, n_split, offs, ok)
        k = tl.maximum(k, 0.0)
        tl.store(OUT + b * F + offs, (k * k).to(OUT.dtype.element_ty), mask=ok)

    @triton.jit
    def _shift_mix_kernel(XX, PREV, MIX, OUT, T, C, P: tl.constexpr, BLOCK: tl.constexpr):
        """Token t's P token-shift mixes, BLOCK channels a program: XX[t] * m + XX[t-1] * (1 - m) for each mix row
        m (PREV stands before token 0), in OUT's dtype ([P, T, C])."""
        t = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < C
        x = tl.load(XX + t * C + offs, mask=ok, other=0.0)
        before = tl.load(XX + (t - 1) * C + offs, mask=ok & (t > 0), other=0.0)
        first = tl.load(PREV + offs, mask=ok & (t == 0), other=0.0)
        shifted = tl.where(t > 0, before, first)
        for p in tl.static_range(P):
            m = tl.load(MIX + p * C + offs, mask=ok, other=0.0)
            tl.store(OUT + (p * T + t) * C + offs, (x * m + shifted * (1.0 - m)).to(OUT.dtype.element_ty), mask=ok)

    @triton.jit
    def _sigmoid_gate_kernel(R, Y, X, OUT, N, HAS_X: tl.constexpr, BLOCK: tl.constexpr):
        """OUT = [X +] sigmoid(R) * Y over N elements, in fp32 whatever the inputs' dtypes, stored in OUT's."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        r = tl.load(R + offs, mask=ok, other=0.0).to(tl.float32)
        y = tl.load(Y + offs, mask=ok, other=0.0).to(tl.float32)
        out = 1.0 / (1.0 + tl.exp(-r)) * y  # sigmoid(r), then the product: torch's order
        if HAS_X:
            out = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32) + out
        tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=ok)

    @triton.jit
    def _row(tile, rows, q):
        """Row q of a register tile (rows run down axis 0, which stays inside each thread)."""
        return tl.sum(tl.where(rows[:, None] == q, tile, 0.0), axis=0)

    @triton.jit
    def _wkv4_scan_kernel(K, V, Y, S_IN, S_OUT, W, U, T, C, L, FROM_EMPTY: tl.constexpr, WRITE_Y: tl.constexpr,
                          UNROLL: tl.constexpr, BLOCK: tl.constexpr):
        """The v4 recurrence over chunk j (program_id 1) of T tokens of one sequence: tokens j*L .. j*L+L-1 (fewer
        in the last chunk), BLOCK channels per program, from the state S_IN[j] (or the empty state) into
        S_OUT[j]; the outputs written to Y when WRITE_Y. Tokens come in tiles of UNROLL, the next tile loaded
        before the current one is used, so memory latency hides behind the math (a load cannot move above the
        previous step's store on its own: the pointers might alias)."""
        pid = tl.program_id(0)
        j = tl.program_id(1)
        first = j * L
        n = tl.minimum(L, T - first)  # this chunk's tokens
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        ok = offs < C
        rows = tl.arange(0, UNROLL)
        if FROM_EMPTY:
            aa = tl.zeros((BLOCK,), dtype=tl.float32)
            bb = tl.zeros((BLOCK,), dtype=tl.float32)
            pp = tl.full((BLOCK,), -1e30, dtype=tl.float32)
        else:
            aa = tl.load(S_IN + j * 3 * C + offs, mask=ok, other=0.0)
            bb = tl.load(S_IN + j * 3 * C + C + offs, mask=ok, other=0.0)
            pp = tl.load(S_IN + j * 3 * C + 2 * C + offs, mask=ok, other=0.0)
        w = tl.load(W + offs, mask=ok, other=0.0)
        u = tl.load(U + offs, mask=ok, other=0.0)
        cell = (first + rows)[:, None] * C + offs[None, :]
        m = (rows[:, None] < n) & ok[None, :]
        k_tile = tl.load(K + cell, mask=m, other=0.0).to(tl.float32)
        v_tile = tl.load(V + cell, mask=m, other=0.0).to(tl.float32)
        for t0 in range(0, n, UNROLL):
            m_next = ((t0 + UNROLL + rows)[:, None] < n) & ok[None, :]
            k_next = tl.load(K + (t0 + UNROLL) * C + cell, mask=m_next, other=0.0).to(tl.float32)
            v_next = tl.load(V + (t0 + UNROLL) * C + cell, mask=m_next, other=0.0).to(tl.float32)
            y_tile = tl.zeros((UNROLL, BLOCK), dtype=tl.float32)
            for q in tl.static_range(UNROLL):
                live = t0 + q < n
                k = _row(k_tile, rows, q)
                v = _row(v_tile, rows, q)
                if WRITE_Y:
                    ww = u + k
                    p = tl.maximum(pp, ww)
                    e1 = tl.exp(pp - p)
                    e2 = tl.exp(ww - p)
                    y = (e1 * aa + e2 * v) / (e1 * bb + e2)
                    y_tile = tl.where(rows[:, None] == q, y[None, :], y_tile)
                ww = w + pp
                p = tl.maximum(ww, k)
                e1 = tl.exp(ww - p)
                e2 = tl.exp(k - p)
                aa = tl.where(live, e1 * aa + e2 * v, aa)
                bb = tl.where(live, e1 * bb + e2, bb)
                pp = tl.where(live, p, pp)
            if WRITE_Y:
                m_now = ((t0 + rows)[:, None] < n) & ok[None, :]
                tl.store(Y + t0 * C + cell, y_tile, mask=m_now)
            k_tile = k_next
            v_tile = v_next
        tl.store(S_OUT + j * 3 * C + offs, aa, mask=ok)
        tl.store(S_OUT + j * 3 * C + C + offs, bb, mask=ok)
        tl.store(S_OUT + j * 3 * C + 2 * C + offs, pp, mask=ok)

    @triton.jit
    def _wkv4_carry_kernel(ENDS, S_IN, STARTS, S_OUT, W, T, C, L, N, BLOCK: tl.constexpr):
        """The state entering each of N chunks: STARTS[j] = the state S_IN carried through chunks 0..j-1, where a
        chunk of n tokens decays a carried state by n*w and adds ENDS[j] (what its own tokens leave from the empty
        state), merged in log space; S_OUT = the state after the last chunk."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < C
        w = tl.load(W + offs, mask=ok, other=0.0)
        aa = tl.load(S_IN + offs, mask=ok, other=0.0)
        bb = tl.load(S_IN + C + offs, mask=ok, other=0.0)
        pp = tl.load(S_IN + 2 * C + offs, mask=ok, other=0.0)
        ea = tl.load(ENDS + offs, mask=ok, other=0.0)
        eb = tl.load(ENDS + C + offs, mask=ok, other=0.0)
        ep = tl.load(ENDS + 2 * C + offs, mask=ok, other=0.0)
        for j in range(0, N):
            more = ok & (j + 1 < N)  # the next chunk's end state, loaded before this one is used
            na = tl.load(ENDS + (j + 1) * 3 * C + offs, mask=more, other=0.0)
            nb = tl.load(ENDS + (j + 1) * 3 * C + C + offs, mask=more, other=0.0)
            npp = tl.load(ENDS + (j + 1) * 3 * C + 2 * C + offs, mask=more, other=0.0)
            tl.store(STARTS + j * 3 * C + offs, aa, mask=ok)
            tl.store(STARTS + j * 3 * C + C + offs, bb, mask=ok)
            tl.store(STARTS + j * 3 * C + 2 * C + offs, pp, mask=ok)
            n = tl.minimum(L, T - j * L)
            decayed = pp + n.to(tl.float32) * w
            p = tl.maximum(decayed, ep)
            e1 = tl.exp(decayed - p)
            e2 = tl.exp(ep - p)
            aa = e1 * aa + e2 * ea
            bb = e1 * bb + e2 * eb
            pp = p
            ea, eb, ep = na, nb, npp
        tl.store(S_OUT + offs, aa, mask=ok)
        tl.store(S_OUT + C + offs, bb, mask=ok)
        tl.store(S_OUT + 2 * C + offs, pp, mask=ok)

    @triton.jit
    def _wkv5_scan_kernel(R, K, V, Y, S_IN, S_OUT, W, U, T, A, UNROLL: tl.constexpr, SIZE: tl.constexpr,
                          VB: tl.constexpr, W_PER_TOKEN: tl.constexpr = False):
        """The v5 recurrence over T tokens of one sequence for one head and VB of its value columns; the
        [SIZE, VB] slice of the state lives in registers. r, k, v, y: [T, A] fp32; the decay W [H, N] shared by
        every token, or with W_PER_TOKEN one per token [T, A] (RWKV-6)."""
        h = tl.program_id(0)
        vb = tl.program_id(1)
        i = tl.arange(0, SIZE)
        j = vb * VB + tl.arange(0, VB)
        rows = tl.arange(0, UNROLL)
        cell = h * SIZE * SIZE + i[:, None] * SIZE + j[None, :]
        s = tl.load(S_IN + cell)
        u = tl.load(U + h * SIZE + i)
        key_cell = rows[:, None] * A + (h * SIZE + i)[None, :]
        val_cell = rows[:, None] * A + (h * SIZE + j)[None, :]
        r_tile = tl.load(R + key_cell, mask=rows[:, None] < T, other=0.0)
        k_tile = tl.load(K + key_cell, mask=rows[:, None] < T, other=0.0)
        v_tile = tl.load(V + val_cell, mask=rows[:, None] < T, other=0.0)
        if W_PER_TOKEN:
            w_tile = tl.load(W + key_cell, mask=rows[:, None] < T, other=1.0)
        else:
            w = tl.load(W + h * SIZE + i)
        for t0 in range(0, T, UNROLL):
            nxt = (t0 + UNROLL + rows)[:, None] < T
            r_next = tl.load(R + (t0 + UNROLL) * A + key_cell, mask=nxt, other=0.0)
            k_next = tl.load(K + (t0 + UNROLL) * A + key_cell, mask=nxt, other=0.0)
            v_next = tl.load(V + (t0 + UNROLL) * A + val_cell, mask=nxt, other=0.0)
            if W_PER_TOKEN:
                w_next = tl.load(W + (t0 + UNROLL) * A + key_cell, mask=nxt, other=1.0)
            y_tile = tl.zeros((UNROLL, VB), dtype=tl.float32)
            for q in tl.static_range(UNROLL):
                live = t0 + q < T
                r = _row(r_tile, rows, q)
                k = _row(k_tile, rows, q)
                v = _row(v_tile, rows, q)
                if W_PER_TOKEN:
                    w = _row(w_tile, rows, q)
                a = k[:, None] * v[None, :]
                out = tl.sum(r[:, None] * (u[:, None] * a + s), axis=0)  # [VB]
                y_tile = tl.where(rows[:, None] == q, out[None, :], y_tile)
                s = tl.where(live, a + w[:, None] * s, s)
            tl.store(Y + t0 * A + val_cell, y_tile, mask=(t0 + rows)[:, None] < T)
            r_tile = r_next
            k_tile = k_next
            v_tile = v_next
            if W_PER_TOKEN:
                w_tile = w_next
        tl.store(S_OUT + cell, s)


# ----------------------------------------------------------------------------------------- launchers

def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def _block_n(seg: int, n: int, preferred: int) -> int:
    """Largest power-of-two block <= preferred that divides the segment length (tiles never straddle)."""
    block = preferred
    while block > 16 and (seg % block or n % block):
        block //= 2
    return block


# One row's launch settings by weight format ("float": bf16/fp16/fp32, "int8"), measured on an H200 over the 1.5B and
# 7B matrices (docs/PERFORMANCE.md); `benchmarks/bench.py --kernels` times alternatives.
# "pairs_per_sm" (int8): the fp16-pair widening (`_int8_pair`) runs where a launch has at most that many programs an SM,
# or programs of at most 8 rows (0: never): at 16 rows its programs hold 79 registers a thread against 64, so 6 fit an
# SM where 8 did, and a launch of more programs than 6 an SM loses more to that than the pairs save.
# "preload": the weight tiles a program reads before it waits for the kernel before it. A float tile is 8 registers a
# thread, so three fit beside the loop's (whole 7B steps, bf16: 1 -> 3 tiles 1.5-3.3 % faster); an int8 tile is 16,
# and a second one cost more occupancy than it hid (whole 7B int8 steps 9-17 % slower).
GEMV_CONFIGS = {
    "float": {"block_n": 8, "block_k": 256, "num_warps": 4, "num_stages": 3, "target_programs": 8.0, "preload": 3},
    "int8": {"block_n": 16, "block_k": 512, "num_warps": 4, "num_stages": 3, "target_programs": 8.0, "preload": 1,
             "pairs_per_sm": 6.0},
}
PTX = AVAILABLE and not INTERPRET and torch.version.hip is None  # inline PTX can run (NVIDIA's CUDA, compiled)


def gemv_format(weight: torch.Tensor) -> str:
    """The GEMV_CONFIGS key of a weight."""
    return "int8" if weight.dtype == torch.int8 else "float"


def _splits(k: int, block_k: int, n_blocks: int, target_programs: float, device: torch.device) -> int:
    """Split-K count: about target_programs programs per SM, each split at least 4 blocks of K long."""
    want = int(target_programs * _sm_count(device))
    return max(1, min(want // max(1, n_blocks), k // (4 * block_k)))


def _one_row_plan(x: torch.Tensor, weight: torch.Tensor, seg: int, splits: int | None) -> tuple[int, int, int, int]:
    """(block_n, row blocks, splits, K a split) of one row's product (GEMV_CONFIGS)."""
    k, n = x.shape[-1], weight.shape[0]
    cfg = GEMV_CONFIGS[gemv_format(weight)]
    block_k = cfg["block_k"]
    block_n = _block_n(seg, n, cfg["block_n"])
    n_blocks = triton.cdiv(n, block_n)
    if block_n > 8 and n_blocks * _splits(k, block_k, n_blocks, cfg["target_programs"], x.device) < \
            4 * _sm_count(x.device):  # a small matrix: narrower blocks, so that every SM streams
        block_n = _block_n(seg, n, block_n // 2)
        n_blocks = triton.cdiv(n, block_n)
    splits = splits or _splits(k, block_k, n_blocks, cfg["target_programs"], x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    return block_n, n_blocks, triton.cdiv(k, k_per_split), k_per_split


def _one_row(x, weight, scale, seg, plan, relu2: torch.Tensor | None = None) -> torch.Tensor:
    """Launch one row's product by `plan` (`_one_row_plan`); relu2: H of `_gemv1_kernel` (one split)."""
    p_count, _, k = x.shape
    n = weight.shape[0]
    block_n, n_blocks, splits, k_per_split = plan
    cfg = GEMV_CONFIGS[gemv_format(weight)]
    y = torch.empty((splits, 1, n), device=x.device, dtype=torch.float32)
    options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl(x.device))
    words = (weight.dtype == torch.int8 and k % 4 == 0 and weight.is_contiguous()
             and weight.storage_offset() % 4 == 0)
    w, per = (weight.view(torch.int32), 4) if words else (weight, 1)
    pairs = (words and PTX and x.device.type == "cuda" and cfg["pairs_per_sm"] > 0
             and (block_n <= 8 or n_blocks * splits <= cfg["pairs_per_sm"] * _sm_count(x.device)))
    _gemv1_kernel[(n_blocks, splits)](x, w, y if scale is None else scale, y, y if relu2 is None else relu2, n,
                                      k // per, seg, p_count, x.stride(0), y.stride(0), k_per_split // per,
                                      0 if relu2 is None else relu2.shape[-1], BLOCK_N=block_n,
                                      BLOCK_KW=cfg["block_k"] // per, HAS_SCALE=scale is not None, WORDS=words,
                                      PAIRS=pairs, PRELOAD=cfg["preload"], RELU2=relu2 is not None, **options)
    return y


def project(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None, seg: int | None = None,
            splits: int | None = None) -> torch.Tensor:
    """x [P, M, K] (P stacked inputs) @ weight [N, K]ᵀ, row block n taking input n // seg (clamped to P-1).

    Returns split-K partials [S, M, N] fp32 (sum over dim 0 for the product).
    """
    p_count, m, k = x.shape
    n = weight.shape[0]
    seg = seg or n
    x = x if x.stride(-1) == 1 else x.contiguous()
    has_scale = scale is not None
    if m == 1:
        return _one_row(x, weight, scale, seg, _one_row_plan(x, weight, seg, splits))
    block_n = _block_n(seg, n, 64)
    block_k = 64
    n_blocks = triton.cdiv(n, block_n)
    splits = splits or _splits(k, block_k, n_blocks, 8.0, x.device)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    y = torch.empty((splits, m, n), device=x.device, dtype=torch.float32)
    scale_arg = scale if has_scale else y
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    grid = (n_blocks, splits, triton.cdiv(m, block_m))
    _matmul_kernel[grid](x, weight, scale_arg, y, m, n, k, seg, p_count, x.stride(0), x.stride(1),
                         y.stride(0), y.stride(1), k_per_split, BLOCK_M=block_m, BLOCK_N=block_n,
                         BLOCK_K=block_k, HAS_SCALE=has_scale, DOT_FP16=INTERPRET, num_warps=4, num_stages=3,
                         **pdl(x.device))
    return y


def matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, M, K] @ weight [N, K]ᵀ -> partials [S, M, N] fp32 (convenience for single inputs)."""
    return project(x, weight, scale)


def project_relu2(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, rows: int,
                  out_dtype: torch.dtype, seg: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One row's `project` (x [P, 1, K]) whose first `rows` outputs (the channel mix's key: segment 0, `rows`
    its length) come back as relu(.)² [1, rows] in out_dtype, squared in the product's last step rather than by
    `ffn_act` after it (one launch less, the same bits). Returns (that, partials [1, 1, N] whose first `rows`
    columns are not written), or None where one split does not cover K, x has several rows or `rows` is no whole
    number of the product's row blocks: then `project` and `ffn_act`."""
    n = weight.shape[0]
    seg = seg or n
    if x.shape[1] != 1:
        return None
    x = x if x.stride(-1) == 1 else x.contiguous()
    plan = _one_row_plan(x, weight, seg, None)
    if plan[2] != 1 or rows % plan[0] or rows > n:
        return None
    hidden = torch.empty((1, rows), device=x.device, dtype=out_dtype)
    return hidden, _one_row(x, weight, scale, seg, plan, relu2=hidden)


def _split_view(parts: torch.Tensor) -> tuple[int, int, int]:
    """(stride over splits, stride over rows, number of splits) of a [S, M, N] partials view."""
    return parts.stride(0), parts.stride(1), parts.shape[0]


LN_MIX_CHUNK = 512  # channels a program of `ln_mix` writes when rows are few (its statistics read the whole row)


def ln_mix(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor | None,
           prev: torch.Tensor | None = None, mix: torch.Tensor | None = None, xx_out: torch.Tensor | None = None,
           delta: torch.Tensor | None = None, gate: torch.Tensor | None = None, halve: bool = False,
           eps: float = 1e-5, out32: torch.Tensor | None = None, first32: int = 0,
           chunk: int | None = None) -> torch.Tensor:
    """x [M, C] fp32 -> x' = x + sigmoid(gate)*delta (delta/gate: partials [S, M, C] views), halved if halve;
    xx = LayerNorm(x'). With mix [P, C]: mix p = xx*mix[p] + prev*(1-mix[p]) goes to out[p] for the first
    out.shape[0] mixes (out [P', M, C]; None: none) and, with out32 (fp32), to out32[p - first32] for p >= first32;
    xx is written to xx_out [M, C]. Without mix: out[0] = xx.

    chunk: the channels one program writes (a power of two); None: LN_MIX_CHUNK while the rows are fewer than
    the SMs, else a whole row. Returns x': x itself (updated in place; untouched without delta) when one program
    covers a row, else a new tensor (the programs of a row all read x)."""
    m, c = x.shape
    has_d, has_g, has_mix, has_out32 = delta is not None, gate is not None, mix is not None, out32 is not None
    block_c = _pow2(c)
    if chunk is None:
        chunk = LN_MIX_CHUNK if m < _sm_count(x.device) else block_c
    chunk = min(_pow2(chunk), block_c)
    chunks = triton.cdiv(c, chunk)
    x_out = torch.empty_like(x) if has_d and chunks > 1 else x
    d = delta if has_d else x.unsqueeze(0)
    g = gate if has_g else d
    prev = prev if prev is not None else x
    xx_out = xx_out if xx_out is not None else x
    mix_arg = mix if has_mix else weight
    o32 = out32 if has_out32 else x.unsqueeze(0)
    o = out if out is not None else o32
    p_out = 0 if out is None else out.shape[0]
    _ln_mix_kernel[(m, chunks)](x, x_out, d, d.stride(0), d.stride(1), d.shape[0], g, g.stride(0), g.stride(1),
                                g.shape[0], weight, bias, prev, prev.stride(0), mix_arg, o, o.stride(0), o.stride(1),
                                o32, o32.stride(0), o32.stride(1), xx_out, xx_out.stride(0), c,
                                mix.shape[0] if has_mix else 1, p_out, first32, eps,
                                HAS_D=has_d, HAS_G=has_g, HALVE=halve, HAS_MIX=has_mix, HAS_OUT32=has_out32,
                                BLOCK_C=block_c, CHUNK=chunk, num_warps=4 if c <= 1024 else 8, **pdl(x.device))
    return x_out


def wkv5_decode(r, k, v, g, state_in, state_out, w, u, ln_w, ln_b, out_dtype, eps):
    """r, k, v, g: partials [S, M, A] views (g None for 5.0); state_in/out [M, H, N, N] (row stride any; N, the
    head size, a power of two); w = exp(log_w), u: [H, N]. Returns y [M, A] in out_dtype; writes state_out."""
    s_count, m, a = r.shape
    size = state_in.shape[-1]
    heads = a // size
    y = torch.empty((m, a), device=r.device, dtype=out_dtype)
    stride_s, stride_b, n_split = _split_view(r)
    for t in (k, v) + ((g,) if g is not None else ()):
        assert _split_view(t) == (stride_s, stride_b, n_split)
    _wkv5_decode_kernel[(heads, m)](r, k, v, g if g is not None else r, stride_s, stride_b, n_split,
                                    state_in, state_out, state_in.stride(0), w, u, ln_w, ln_b, y, a, eps, w, 0,
                                    GATED=g is not None, SIZE=size, TOKEN_DECAY=False, num_warps=4,
                                    **pdl(r.device))
    return y


def wkv4_decode(r, k, v, state_in, state_out, w, u, out_dtype):
    """r, k, v: partials [S, M, C] views; state_in/out [M, 3, C] (row stride any). Returns sigmoid(r)*wkv."""
    s_count, m, c = r.shape
    y = torch.empty((m, c), device=r.device, dtype=out_dtype)
    stride_s, stride_b, n_split = _split_view(r)
    block = 256
    _wkv4_decode_kernel[(triton.cdiv(c, block), m)](r, k, v, stride_s, stride_b, n_split, state_in, state_out,
                                                    state_in.stride(0), w, u, y, c, BLOCK=block, num_warps=2,
                                                    **pdl(r.device))
    return y


def ffn_act(k_parts: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """relu(sum of partials)^2 -> [M, F] in out_dtype."""
    s_count, m, f = k_parts.shape
    out = torch.empty((m, f), device=k_parts.device, dtype=out_dtype)
    stride_s, stride_b, n_split = _split_view(k_parts)
    block = 1024
    _ffn_act_kernel[(triton.cdiv(f, block), m)](k_parts, stride_s, stride_b, n_split, out, f, BLOCK=block,
                                               num_warps=4, **pdl(k_parts.device))
    return out


def shift_mix(xx: torch.Tensor, prev: torch.Tensor, mix: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """A prompt's token-shift mixes in one pass: xx [T, C] fp32 (the normalised rows), prev [C] (the row before
    them), mix [P, C] -> [P, T, C] in out_dtype, xx * m + shifted * (1 - m) for each mix row m."""
    t, c = xx.shape
    p = mix.shape[0]
    out = torch.empty((p, t, c), device=xx.device, dtype=out_dtype)
    block = 1024
    _shift_mix_kernel[(t, triton.cdiv(c, block))](xx.contiguous(), prev.contiguous(), mix.contiguous(), out, t, c,
                                                  P=p, BLOCK=block, num_warps=4)
    return out


def sigmoid_gate(r: torch.Tensor, y: torch.Tensor, residual: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[residual +] sigmoid(r) * y, computed in fp32 from inputs of any float dtype (the same shape), in one pass;
    the result in out_dtype."""
    out = torch.empty(y.shape, device=y.device, dtype=out_dtype)
    n = out.numel()
    block = 2048
    x = residual.contiguous() if residual is not None else out
    _sigmoid_gate_kernel[(triton.cdiv(n, block),)](r.contiguous(), y.contiguous(), x, out, n,
                                                   HAS_X=residual is not None, BLOCK=block, num_warps=8)
    return out


SCAN_UNROLL = 16
SCAN_BLOCK = 32  # channels per program of the RWKV-4 scan (one warp)
SCAN_PROGRAMS = 4096  # the RWKV-4 scan cuts a prompt into chunks until about this many programs run at once
SCAN_MIN_CHUNK = 16


def wkv4_scan_chunk(t: int, c: int) -> int:
    """Tokens per chunk of the RWKV-4 scan for T tokens of C channels: the smallest power of two from
    SCAN_MIN_CHUNK up that keeps the programs within SCAN_PROGRAMS, or T itself (one pass) when T is at most
    two such chunks (three passes over two chunks take longer than one pass)."""
    blocks = -(-c // SCAN_BLOCK)
    chunk = SCAN_MIN_CHUNK
    while -(-t // chunk) * blocks > SCAN_PROGRAMS:
        chunk *= 2
    return t if t <= 2 * chunk else chunk


def wkv4_scan(w, u, k, v, state, chunk: int | None = None):
    """Prefill of one sequence: k, v [T, C] contiguous, fp32 or a product's bf16/fp16 (widened as they are read);
    state [3, C] (aa, bb, pp).

    A token-by-token recurrence has only C lanes of parallel work (2,048 at 1.5B: a few warps per SM, each
    waiting on its own chain of exps), so the T tokens are cut into chunks (`chunk` tokens, by default
    `wkv4_scan_chunk`) scanned side by side in three passes: each chunk's own end state from the empty state,
    then the state entering every chunk (one short sequential pass over the chunks, merging in log space),
    then each chunk again from its entering state, writing the outputs. The same function as one pass up to
    fp32 rounding (the carried state is decayed by n*w at once instead of w n times).

    Returns (wkv [T, C] fp32, new state [3, C])."""
    t, c = k.shape
    y = torch.empty((t, c), device=k.device, dtype=torch.float32)
    new_state = torch.empty_like(state)
    state = state.contiguous()
    chunk = wkv4_scan_chunk(t, c) if chunk is None else max(1, min(int(chunk), t))
    blocks = triton.cdiv(c, SCAN_BLOCK)
    n = triton.cdiv(t, chunk)
    options = dict(UNROLL=SCAN_UNROLL, BLOCK=SCAN_BLOCK, num_warps=1)
    if n == 1:
        _wkv4_scan_kernel[(blocks, 1)](k, v, y, state, new_state, w, u, t, c, t, FROM_EMPTY=False, WRITE_Y=True,
                                       **options)
        return y, new_state
    ends = torch.empty((n, 3, c), device=k.device, dtype=torch.float32)
    starts = torch.empty_like(ends)
    _wkv4_scan_kernel[(blocks, n)](k, v, y, ends, ends, w, u, t, c, chunk, FROM_EMPTY=True, WRITE_Y=False,
                                   **options)
    _wkv4_carry_kernel[(triton.cdiv(c, 128),)](ends, state, starts, new_state, w, t, c, chunk, n, BLOCK=128,
                                               num_warps=4)
    _wkv4_scan_kernel[(blocks, n)](k, v, y, starts, ends, w, u, t, c, chunk, FROM_EMPTY=False, WRITE_Y=True,
                                   **options)
    return y, new_state


def wkv5_scan(w, u, r, k, v, state):
    """Prefill of one sequence: r, k, v [T, A] fp32 contiguous; w = exp(log_w) [H, N], or one per token [T, A]
    contiguous (RWKV-6's data-dependent decay); u: [H, N]; state [H, N, N] (N, the head size, a power of two).

    Returns (out [T, A] fp32 before GroupNorm, new state [H, N, N])."""
    t, a = r.shape
    size = state.shape[-1]
    heads = a // size
    y = torch.empty_like(r)
    new_state = torch.empty_like(state)
    vb = min(16, size)
    _wkv5_scan_kernel[(heads, size // vb)](r, k, v, y, state.contiguous(), new_state, w, u, t, a,
                                          UNROLL=8, SIZE=size, VB=vb, W_PER_TOKEN=w.numel() != a, num_warps=1)
    return y, new_state
