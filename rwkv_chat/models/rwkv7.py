"""RWKV-7 (Goose, "x070"; the World and G1 models): every question about this architecture, in one place.

- Checkpoints: `att.r_k` [H, N] and no `time_maa` in the keys; head size from `r_k`; the LoRA widths from
  `w1`, `a1`, `v1` (layers after the first) and `g1`; F from `ffn.key.weight` [F, C]. Layer 0 has no value
  residual: `v0/v1/v2` there, when a file carries them, are dropped (the reference ignores them). DeepEmbed files
  (`rwkv7a`/`rwkv7b`: `ffn.s_emb`, `blocks.N.qkv`) are refused.
- State per layer: the token shifts and one value-by-key matrix per head [H, N(value), N(key)] fp32 (the
  reference's layout; state files are in it too).
- Math (the reference's `RWKV_x070_TMix_one`, shift written `x + (prev - x) * x_*`): r, k, v from projections,
  the decay `log_w = -e^-0.5 * sigmoid(w0 + lora_w)`, the in-context learning rate `a`, the gate `g` from LoRAs;
  `kk = normalize(k * k_k)` per head, `k *= 1 + (a - 1) * k_a`; after layer 0 the value is pulled towards layer
  0's (`v_first`, which flows across the layers of one token: the `carry` of the time mix). Per head:
  `S = S diag(w) + (S (-kk)) (kk a)^T + v k^T; y = S r`, then GroupNorm of the heads plus `(r . k r_k) v`,
  times g. `wkv7_step` runs one token; `wkv7_chunks` T tokens at once through the WY form of that
  diagonal-plus-rank-one recurrence: every chunk becomes an affine map of its start state, all chunks in one
  batched pass (one triangular inverse), and only one small matrix product per chunk runs in sequence; every
  exponent stays within a chunk. `wkv7_sequence` picks the C++ kernels' token-by-token scan instead on CPUs
  where they are built.
  The channel mix has no receptance: `relu(key(x + (prev - x) * x_k))^2 @ value`.
- Fast paths: the fast runner does not pack it (`fast_runner = False`): prefill is the plain path above (on GPUs
  with Triton, prompts of up to WKV7_GPU_SCAN_TOKENS tokens run the recurrence in kernels/rwkv7_triton.py's scan;
  a prompt padded at its end, as graphed pieces are, gives the padding decay 1, zero keys and learning rate). On
  CUDA with Triton the decode step is fused (runtime/fused_decode.py, graphed by runtime/plain_graphs.py):
  `fused_time_mix` is one product for r/k/v, two launches for the four LoRAs (kernels/lora_triton.py; on the
  step's side stream, beside the product) and one kernel for everything element-wise up to the gated output
  (kernels/rwkv7_triton.py). On CPUs with the C++ kernels, a decode step is one call (`cpu_kernel_id` 7:
  cpu_kernels' DecodeStack runs its RWKV-7 layer step a layer, fed by `cpu_layer_tensors`; runtime/cpu_decode.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_kernels, lora_triton, rwkv7_triton, triton_kernels
from .architecture import FusedTimeMixPack, HeadMatrixArchitecture, UnsupportedCheckpoint
from .layers import (GROUP_NORM_EPS, Projection, ShiftMixes, group_norm, lora_dtype, lora_product,
                     token_shift)

DECAY_SCALE = math.exp(-0.5)  # log_w = -DECAY_SCALE * sigmoid(...): every decay is in (e^-0.607, 1)
WKV7_CHUNK = 16  # tokens per chunk on CPUs: the in-chunk decay factors stay within e^(16 * 0.607) ~ 1.6e4
WKV7_GPU_CHUNK = 64  # on GPUs, fewer and larger chunks (factors within e^(64 * 0.607) ~ 7e16, far from fp32's limit)
WKV7_GPU_SCAN_TOKENS = 128  # on GPUs with Triton, prompts (graphed pieces) up to this long take the token-by-token
# scan: H100, 7.2B, a piece of 2-32 tokens 12-13 ms in bf16 where the chunked form's dozens of launches took 15-16,
# 128 tokens 18.8 vs 19.3; from 256 the chunked form is faster (27.0 vs 30.0, 1,024: 76.7 vs 99.4)
CPU_LORA_KERNEL_ROWS = 16  # CPU prompts of fewer rows multiply their LoRAs in the C++ kernels (see _lora): Zen 3, 2
# threads, whole prompts, PyTorch's time / the kernels': 2-15 tokens 1.07-1.26 (0.1B int8), 1.08-1.16 (1.5B int8),
# 1.10-1.15 (0.1B bf16); from ~24 rows the GEMM is ahead (0.1B int8 60 tokens 0.95: the kernels' rows re-read the
# factors, where a GEMM blocks them)
_KERNEL_ACTIVATIONS = {None: 0, torch.tanh: 1, torch.sigmoid: 2}  # cpu_kernels.lora's codes
_DEEP_EMBED = ("ffn.s_emb", ".qkv.", "ffn.s0", "ffn.s1")
MIX_ORDER = ("r", "k", "v", "w", "a", "g")  # the fused step's mixes: r, k, v feed the projections; v, w, a, g the LoRAs


def wkv7_step(log_w, r, k, v, kk, a, s):
    """One token. Every input [B, H, N] (k already scaled by k_a); s: [B, H, N(value), N(key)]."""
    s = (s * torch.exp(log_w).unsqueeze(-2) - (s @ kk.unsqueeze(-1)) * (kk * a).unsqueeze(-2)
         + v.unsqueeze(-1) * k.unsqueeze(-2))
    return (s @ r.unsqueeze(-1)).squeeze(-1), s


def wkv7_chunks(log_w, r, k, v, kk, a, s, chunk: int):
    """T tokens at once, in chunks of `chunk`. Every input [B, T, H, N]; s: [B, H, N(value), N(key)]
    -> (y [B, T, H, N], s).

    With alpha = -kk, beta = kk * a, D_t = diag(e^log_w_t): S_t = S_{t-1} D_t + u_t beta_t^T + v_t k_t^T, where
    u_t = S_{t-1} alpha_t. Within a chunk, with G_t = D_1 ... D_t and S_0 its start state, the u's solve a unit
    lower triangular system T u = alpha' S_0^T + M_k v, so u = P S_0^T + Q with P = T^-1 alpha' and
    Q = T^-1 M_k v independent of S_0. Hence every chunk is an affine map of its start state, S_c = S_{c-1} M_c
    + N_c, and its outputs are y = S_{c-1} R'^T + Y_0: all of M, N, R', Y_0 come from one batched pass over
    every chunk (one triangular inverse), and only the chunk-to-chunk products run in sequence. Every exponent
    stays within one chunk (a factor of at most e^(chunk * DECAY_SCALE)). A ragged last chunk is padded with
    tokens that leave the state as it is (decay 1, zero keys, values and learning rate).
    """
    batch, length, heads, size = r.shape
    chunk = min(chunk, length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    rows = n_chunks * batch * heads  # one matrix per (chunk, sequence, head), the chunk outermost

    def chunked(t):  # [B, T, H, N] -> [C * B * H, L, N]
        t = F.pad(t, (0, 0, 0, 0, 0, pad)) if pad else t
        return t.reshape(batch, n_chunks, chunk, heads, size).permute(1, 0, 3, 2, 4).reshape(rows, chunk, size)

    log_w, r, k, v, kk, a = (chunked(t) for t in (log_w, r, k, v, kk, a))
    c = torch.cumsum(log_w, dim=1)
    shrink = torch.exp(c)  # G_t
    grow = torch.reciprocal(shrink)
    kk_in = kk * torch.exp(c - log_w)  # -alpha_t G_{t-1}
    beta, k_in = kk * a * grow, k * grow  # beta_j / G_j, k_j / G_j
    r_out = r * shrink  # r_t G_t
    beta_t, k_t = beta.mT, k_in.mT
    # T = I + strict(kk_in beta^T) (the solve reads the strict lower triangle alone); with T^-1:
    # P' = T^-1 kk_in = -P, Q' = T^-1 strict(kk_in k^T) v = -Q
    eye = torch.eye(chunk, dtype=r.dtype, device=r.device).expand(rows, chunk, chunk)
    inverse = torch.linalg.solve_triangular(kk_in @ beta_t, eye, upper=False, unitriangular=True)
    p, q = inverse @ kk_in, inverse @ (torch.tril(kk_in @ k_t, -1) @ v)  # -P [X, L, K], -Q [X, L, V]
    end = shrink[:, -1:]  # G_L [X, 1, K]
    beta_end = beta * end
    m = torch.baddbmm(torch.diag_embed(end.squeeze(1)), p.mT, beta_end, alpha=-1)  # [X, K, K]
    n = torch.baddbmm(v.mT @ (k_in * end), q.mT, beta_end, alpha=-1)  # [X, V, K]
    r_beta = torch.tril(r_out @ beta_t)
    r_start = torch.baddbmm(r_out, r_beta, p, alpha=-1)  # y = r_start @ S_{c-1}^T + y_own
    y_own = torch.baddbmm(torch.tril(r_out @ k_t) @ v, r_beta, q, alpha=-1)  # [X, L, V]
    m, n = m.view(n_chunks, batch * heads, size, size), n.view(n_chunks, batch * heads, size, size)
    s = s.reshape(batch * heads, size, size)
    starts = []
    for i in range(n_chunks):
        starts.append(s)
        s = torch.baddbmm(n[i], s, m[i])
    y = torch.baddbmm(y_own, r_start, torch.stack(starts).view(rows, size, size).mT)
    y = y.view(n_chunks, batch, heads, chunk, size).permute(1, 0, 3, 2, 4).reshape(batch, -1, heads, size)
    return y[:, :length], s.view(batch, heads, size, size)


def wkv7_sequence(log_w, r, k, v, kk, a, s):
    """T tokens [B, T, H, N] -> (y [B, T, H, N], s): on a CPU whose C++ kernels are built, their token-by-token
    scan for each sequence (the step's own arithmetic; cheaper there than the chunked form's products and
    copies); on a GPU with Triton, prompts of at most WKV7_GPU_SCAN_TOKENS tokens in Triton's token-by-token
    scan (one launch where the chunked form makes dozens); else `wkv7_chunks`."""
    if (r.is_cuda and r.shape[1] <= WKV7_GPU_SCAN_TOKENS and triton_kernels.supports_head_size(r.shape[-1])
            and r.dtype == s.dtype == torch.float32):
        return rwkv7_triton.wkv7_scan(log_w, r, k, v, kk, a, s)
    scans = cpu_kernels.built_for(r)
    if scans is None:
        return wkv7_chunks(log_w, r, k, v, kk, a, s, WKV7_GPU_CHUNK if r.is_cuda else WKV7_CHUNK)
    return cpu_kernels.scan_each_sequence(lambda rows, state: scans.wkv7_scan(*rows, state),
                                          [torch.exp(log_w), r, k, v, kk, a], s)


class TimeMixV7(nn.Module):
    """RWKV-7 time mix (see the module docstring). `carry` is v_first: None into layer 0, its value after."""

    LORA_FACTORS = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")  # kept as layers.lora_storage_dtype says

    def __init__(self, config, layer_id: int):
        super().__init__()
        c, h = config.n_embd, config.n_head
        dim_att = config.dim_att
        w_rank, a_rank, v_rank, g_rank = config.lora
        self.n_head, self.head_size, self.first_layer = h, config.head_size, layer_id == 0
        for name in ("r", "w", "k", "v", "a", "g"):
            setattr(self, f"x_{name}", nn.Parameter(torch.empty(1, 1, c)))
        self.w0 = nn.Parameter(torch.empty(1, 1, dim_att))
        self.w1 = nn.Parameter(torch.empty(c, w_rank))
        self.w2 = nn.Parameter(torch.empty(w_rank, dim_att))
        self.a0 = nn.Parameter(torch.empty(1, 1, dim_att))
        self.a1 = nn.Parameter(torch.empty(c, a_rank))
        self.a2 = nn.Parameter(torch.empty(a_rank, dim_att))
        if not self.first_layer:
            self.v0 = nn.Parameter(torch.empty(1, 1, dim_att))
            self.v1 = nn.Parameter(torch.empty(c, v_rank))
            self.v2 = nn.Parameter(torch.empty(v_rank, dim_att))
        self.g1 = nn.Parameter(torch.empty(c, g_rank))
        self.g2 = nn.Parameter(torch.empty(g_rank, dim_att))
        self.k_k = nn.Parameter(torch.empty(1, 1, dim_att))
        self.k_a = nn.Parameter(torch.empty(1, 1, dim_att))
        self.r_k = nn.Parameter(torch.empty(h, config.head_size))
        self.receptance = Projection(c, dim_att)
        self.key = Projection(c, dim_att)
        self.value = Projection(c, dim_att)
        self.output = Projection(dim_att, c)
        self.ln_x = nn.GroupNorm(h, dim_att, eps=GROUP_NORM_EPS)

    def forward(self, xx: torch.Tensor, prev: torch.Tensor, wkv: torch.Tensor, v_first=None, real=None):
        """xx: normalised input [B, T, C]; prev: [B, C]; wkv: [B, H, N, N] -> (out, new wkv, v_first). real: None,
        or a bool [1, T, 1] mask of the tokens that are the prompt's; the others (padding after it) get decay 1,
        a zero key and a zero learning rate, so the memory passes them unchanged (their outputs are junk)."""
        batch, length, _ = xx.shape
        heads = (batch, length, self.n_head, self.head_size)
        low = lora_dtype(xx, self.receptance.weight)  # bf16 for a prefill beside bf16 products, else fp32
        mixes = torch.cat([self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g]).view(6, -1)
        xr, xw, xk, xv, xa, xg = ShiftMixes(xx, prev, low)(mixes).unbind(0)  # xx + (prev - xx) * x_*
        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        log_w = torch.sigmoid(_lora(xw, self.w1, self.w2, self.w0, torch.tanh, low)).mul_(-DECAY_SCALE)
        a = torch.sigmoid(_lora(xa, self.a1, self.a2, self.a0, dtype=low))
        g = _lora(xg, self.g1, self.g2, None, torch.sigmoid, low)
        kk = F.normalize((k * self.k_k).view(heads), dim=-1, p=2.0)
        k = k * torch.addcmul(1 - self.k_a, a, self.k_a)  # k * (1 + (a - 1) * k_a)
        if real is not None:  # exact: a chosen 0 where the mask is False, the value itself where it is True
            log_w, k, a = (torch.where(real, t, 0.0) for t in (log_w, k, a))
        if self.first_layer:
            v_first = v
        else:
            v = torch.lerp(v, v_first, torch.sigmoid(_lora(xv, self.v1, self.v2, self.v0, dtype=low)))
        log_w, r, k, v, a = (t.view(heads) for t in (log_w, r, k, v, a))  # [B, T, H, N]
        if length == 1:
            y, wkv = wkv7_step(log_w[:, 0], r[:, 0], k[:, 0], v[:, 0], kk[:, 0], a[:, 0], wkv)
        else:
            y, wkv = wkv7_sequence(log_w, r, k, v, kk, a, wkv)
        y = group_norm(y.reshape(batch * length, -1), self.n_head, self.ln_x.weight, self.ln_x.bias).view(heads)
        y = torch.addcmul(y, (r * k * self.r_k).sum(-1, keepdim=True), v)  # + (r . k r_k) v per head
        return self.output(y.view(batch, length, -1) * g), wkv, v_first


def _lora(x, first, second, bias=None, activation=None, dtype=torch.float32):
    """activation(x @ first) @ second (+ bias [1, 1, A]): a LoRA of the time mix, its products in `dtype`
    (layers.lora_dtype), the bias added and the result returned in fp32. A prompt (x [B, T > 1, C]) of fewer than
    CPU_LORA_KERNEL_ROWS rows in fp32 on a CPU whose C++ kernels are built: their LowRank (the decode step's), which
    reads bf16 factors as stored (decode steps keep PyTorch's products: a batch's rows stay bit for bit alone's)."""
    rows = x.numel() // x.shape[-1]
    prompt = x.dim() == 3 and x.shape[1] > 1 and rows < CPU_LORA_KERNEL_ROWS
    kernels = cpu_kernels.built_for(x) if prompt and dtype == torch.float32 else None
    if kernels is not None and all(f.is_contiguous() and f.dtype in (torch.float32, torch.bfloat16)
                                   for f in (first, second)):  # factors as the kernel reads them (as stored)
        out = kernels.lora(x.reshape(rows, -1).float().contiguous(), first, second, _KERNEL_ACTIVATIONS[activation])
        out = out.view(*x.shape[:-1], -1)
        return out if bias is None else out.add_(bias.view(-1))
    if dtype == torch.float32:  # factors kept in bf16 (layers.lora_storage_dtype) are widened here
        hidden = x @ first.to(dtype)
        hidden = activation(hidden) if activation is not None else hidden
        return F.linear(hidden, second.to(dtype).t(), None if bias is None else bias.view(-1))
    hidden = lora_product(x, first, dtype)
    hidden = activation(hidden) if activation is not None else hidden
    out = lora_product(hidden, second, dtype).float()
    return out if bias is None else out.add_(bias.view(-1))


class ChannelMixV7(nn.Module):
    """RWKV-7 channel mix: relu(key(x + (prev - x) * x_k))^2 @ value, no receptance."""

    def __init__(self, n_embd: int, dim_ffn: int):
        super().__init__()
        self.x_k = nn.Parameter(torch.empty(1, 1, n_embd))
        self.key = Projection(n_embd, dim_ffn)
        self.value = Projection(dim_ffn, n_embd)

    def forward(self, xx: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return self.value(self.key.squared_relu(torch.lerp(xx, token_shift(xx, prev), self.x_k)))


@dataclass
class FusedCoreV7:
    """What the fused decode step reads of one RWKV-7 time mix besides its projections (fp32 [A] constants)."""

    lora: lora_triton.LowRank  # parts v (after layer 0), w, a, g, fed by the fp32 mixes v, w, a, g
    first: bool
    w0: torch.Tensor
    a0: torch.Tensor
    v0: torch.Tensor | None
    k_k: torch.Tensor
    k_a: torch.Tensor
    r_k: torch.Tensor
    ln_w: torch.Tensor
    ln_b: torch.Tensor


def pack_fused_time_mix(att: TimeMixV7) -> FusedTimeMixPack:
    flat = lambda t: t.detach().float().reshape(-1)  # noqa: E731  (views of the fp32 parameters)
    part = lora_triton.LoraPart
    names = ("w", "a", "g") if att.first_layer else ("v", "w", "a", "g")
    inputs = {"v": 0, "w": 1, "a": 2, "g": 3}  # rows of the fp32 mixes (MIX_ORDER from v on)
    activations = {"w": lora_triton.TANH, "g": lora_triton.SIGMOID}
    lora = lora_triton.LowRank.pack(
        [getattr(att, f"{name}1") for name in names], [getattr(att, f"{name}2") for name in names],
        [part(getattr(att, f"{name}1").shape[1], inputs[name], activations.get(name, lora_triton.IDENTITY))
         for name in names])
    core = FusedCoreV7(lora, att.first_layer, flat(att.w0), flat(att.a0),
                       None if att.first_layer else flat(att.v0), flat(att.k_k), flat(att.k_a), flat(att.r_k),
                       flat(att.ln_x.weight), flat(att.ln_x.bias))
    mixes = torch.stack([1 - flat(getattr(att, f"x_{name}")) for name in MIX_ORDER])
    return FusedTimeMixPack(mixes, [att.receptance, att.key, att.value], matrix_mixes=3, fp32_from=2, core=core)


def fused_time_mix(core: FusedCoreV7, projection, project, mixed, mixed32, v_first, wkv, wkv_out, act_dtype,
                   side):
    """The fused decode step's RWKV-7 time mix (see Architecture.fused_time_mix): one product for r, k, v, with
    the two launches of the LoRAs (which read only the mixes) beside it on the side stream, one kernel for the rest
    (kernels/rwkv7_triton.py)."""
    with side.branch():
        lora = core.lora(mixed32, act_dtype)  # [P, B, A]
    r, k, v = project(mixed, projection)
    side.join()
    if core.first:
        (w_l, a_l, g), v_l = lora, None
        v_first = torch.empty(lora.shape[1:], dtype=torch.float32, device=lora.device)
    else:
        v_l, w_l, a_l, g = lora
    y = rwkv7_triton.wkv7_decode(r, k, v, w_l, a_l, v_l, g, v_first, core.first, core.w0, core.a0, core.v0,
                                 core.k_k, core.k_a, core.r_k, core.ln_w, core.ln_b, wkv, wkv_out, act_dtype,
                                 GROUP_NORM_EPS, DECAY_SCALE)
    return y, v_first


def cpu_layer_tensors(block: nn.Module) -> list[torch.Tensor]:
    """One block's tensors in the order cpu_kernels' RWKV-7 layer step reads them (views: nothing is copied)."""
    att, ffn = block.att, block.ffn
    flat = lambda t: t.detach().reshape(-1)  # noqa: E731
    residual = [torch.empty(0)] * 3 if att.first_layer else [flat(att.v0), att.v1.detach(), att.v2.detach()]
    return ([flat(block.ln1.weight), flat(block.ln1.bias), flat(block.ln2.weight), flat(block.ln2.bias)]
            + [flat(getattr(att, f"x_{name}")) for name in ("r", "w", "k", "v", "a", "g")]
            + att.receptance.stored() + att.key.stored() + att.value.stored() + att.output.stored()
            + [flat(att.w0), att.w1.detach(), att.w2.detach(), flat(att.a0), att.a1.detach(), att.a2.detach()]
            + residual + [att.g1.detach(), att.g2.detach(), flat(att.k_k), flat(att.k_a), flat(att.r_k),
                          flat(att.ln_x.weight), flat(att.ln_x.bias), flat(ffn.x_k)]
            + ffn.key.stored() + ffn.value.stored())


class Rwkv7(HeadMatrixArchitecture):
    version = "7"
    family = "RWKV-7"
    fast_runner = False
    reads_padded_prompts = True  # the time mix's `real`: padding gets decay 1, zero keys and learning rate
    cpu_kernel_id = 7
    state_file_transposed = False

    def identifies(self, state_dict):
        if "blocks.0.att.r_k" not in state_dict:
            return False
        deep = sorted({part for key in state_dict for part in _DEEP_EMBED if part in key})
        if deep:
            raise UnsupportedCheckpoint(f"this is an RWKV-7 DeepEmbed checkpoint (rwkv7a/rwkv7b: keys with "
                                        f"{', '.join(deep)}), which is not supported; use a plain RWKV-7 model "
                                        "(World or G1)")
        return True

    def head_size_from(self, state_dict, dim_att):
        return state_dict["blocks.0.att.r_k"].shape[-1]

    def lora_from(self, state_dict):
        v1 = next((tensor for key, tensor in state_dict.items() if key.endswith(".att.v1")
                   and not key.startswith("blocks.0.")), None)
        return (state_dict["blocks.0.att.w1"].shape[1], state_dict["blocks.0.att.a1"].shape[1],
                0 if v1 is None else v1.shape[1], state_dict["blocks.0.att.g1"].shape[1])

    def default_lora(self, n_embd):
        """The widths BlinkDL's training code gives a model of width C (0.1B: 64, 64, 32, 128; 7.2B: 128, 128,
        96, 480), multiples of 32."""
        def width(factor, power):
            return max(32, round(factor * n_embd ** power / 32) * 32)
        return (width(1.8, 0.5), width(1.8, 0.5), width(1.3, 0.5), width(0.6, 0.8))

    def default_ffn_size(self, n_embd):
        return 4 * n_embd

    def canonical_key(self, key, tensor):
        if key.startswith("blocks.0.att.v") and key[len("blocks.0.att.v"):] in ("0", "1", "2"):
            return None  # layer 0 has no value residual
        if key.endswith(".att.r_k"):
            return key, tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() != 2 else tensor
        return key, tensor

    def make_time_mix(self, config, layer_id):
        return TimeMixV7(config, layer_id)

    def make_channel_mix(self, config):
        return ChannelMixV7(config.n_embd, config.dim_ffn)

    def pack_fused_time_mix(self, att, config):
        return pack_fused_time_mix(att) if triton_kernels.supports_head_size(config.head_size) else None

    def fused_time_mix(self, pack, projection, project, mixed, mixed32, xx, prev, wkv, wkv_out, carry, act_dtype,
                       side):
        return fused_time_mix(pack.core, projection, project, mixed, mixed32, carry, wkv, wkv_out, act_dtype, side)

    def fused_channel_mix(self, ffn):
        return torch.stack([1 - ffn.x_k.detach().float().reshape(-1)]), [ffn.key]

    def cpu_layer_tensors(self, block):
        return cpu_layer_tensors(block)

    def time_mix_params(self, n_embd, dim_att):
        return 4 * n_embd * dim_att + 2 * n_embd * sum(self.default_lora(n_embd))

    def channel_mix_params(self, n_embd, dim_ffn):
        return 2 * n_embd * dim_ffn  # no receptance


ARCHITECTURES = (Rwkv7(),)
