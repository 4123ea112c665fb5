"""RWKV-6 (Finch, "x060"): every question about this architecture, answered in one place.

- Checkpoints: `att.time_maa_x` (and `time_maa_w1/w2`, `time_decay_w1/w2`) in the keys. Head size from
  `att.time_faaaa` [H, N]; the two LoRA widths from `time_maa_w2` [5, D, C] and `time_decay_w1` [C, D2];
  F from `ffn.key.weight`.
- State per layer: the token shifts and one key-by-value matrix per head [H, N(key), N(value)] fp32, as RWKV-5.
- Math (the reference's `att_one_v6_0`): a data-dependent token shift (`xx + sx * (maa + lora(xx + sx*maa_x))`,
  sx = previous - current) feeds r, k, v, g and a per-token, per-channel decay
  `log_w = -exp(time_decay + tanh(wx @ w1) @ w2)`; then RWKV-5.2's per-head recurrence with that decay,
  GroupNorm of the heads and a SiLU gate. `wkv6_step` runs one token, `wkv6_chunks` T tokens at once: every
  chunk's own terms in one batched pass, only the state carried from chunk to chunk in sequence (every exponent
  <= 0); `wkv6_sequence` picks a token-by-token scan instead where one runs (the C++ kernels' on CPUs that built
  them, Triton's on GPUs).
  The channel mix is RWKV-5's with the same shift convention (`time_maa_k/r`).
- Fast paths: the fast runner does not pack it (`fast_runner = False`): prefill is the plain path above (a prompt
  padded at its end, as graphed pieces are, gives the padding decay 1 and zero keys). On
  CUDA with Triton the decode step is fused (runtime/fused_decode.py, graphed by runtime/plain_graphs.py):
  `fused_time_mix` is the token shift's LoRA (two launches, kernels/lora_triton.py), the five mixes (one), one
  product for k/v/r/g, the decay's LoRA (two, on the step's side stream, beside the product) and the recurrence
  with GroupNorm and gate (one; kernels/rwkv6_triton.py). On CPUs with the C++ kernels, a decode step is one
  call (`cpu_kernel_id` 6: cpu_kernels' DecodeStack runs its RWKV-6 layer step a layer, fed by
  `cpu_layer_tensors`; runtime/cpu_decode.py), and a prompt's GroupNorm with its gate, and the channel mix's gate,
  are one C++ pass each (`group_norm_gate`, `sigmoid_gate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_kernels, lora_triton, rwkv6_triton, triton_kernels
from .architecture import FusedTimeMixPack, HeadMatrixArchitecture
from .layers import (GROUP_NORM_EPS, WKV_CHUNK, Projection, ShiftMixes, ffn_size, group_norm, lora_dtype,
                     lora_product)
from .rwkv5 import wkv5_step

MAA_PARTS = 5  # the LoRA of the token shift feeds w, k, v, r, g (in that order)
CHUNK_GROUP_FLOATS = 1 << 26  # the chunked prefill's [L, L, N] decays are made for this many numbers at a time


wkv6_step = wkv5_step  # one token: RWKV-5.2's step, its decay given per sequence ([B, H, N]) instead of shared


def wkv6_chunks(log_w, u, r, k, v, s, chunk: int):
    """T tokens at once, in chunks of `chunk`. r, k, v, log_w: [B, T, H, N]; u: [H, N]; s: [B, H, N, N]
    -> (out [B, T, H, N], s).

    Within a chunk, with c_t = sum_{i<=t} log_w_i and S_0 its start state: out_t = sum_{j<t} (r_t *
    e^(c_{t-1}-c_j) . k_j) v_j + (r_t * u . k_t) v_t + (r_t * e^(c_{t-1})) @ S_0, and the end state is
    e^(c_L) * S_0 + (k * e^(c_L - c))^T @ v; every exponent is a sum of log decays and so <= 0. All chunks'
    own terms are computed at once (the [L, L, N] decays in groups of chunks, CHUNK_GROUP_FLOATS at most), and
    only the state's diagonal decay and addition run chunk after chunk. A ragged last chunk is padded with
    tokens that leave the state as it is (decay 1, zero keys and values).
    """
    batch, length, heads, size = r.shape
    chunk = min(chunk, length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    rows = batch * heads

    def chunked(t):  # [B, T, H, N] -> [C, B * H, L, N]
        t = F.pad(t, (0, 0, 0, 0, 0, pad)) if pad else t
        t = t.reshape(batch, n_chunks, chunk, heads, size).permute(1, 0, 3, 2, 4)
        return t.reshape(n_chunks, rows, chunk, size)

    log_w, r, k, v = (chunked(t) for t in (log_w, r, k, v))
    c = torch.cumsum(log_w, dim=2)
    c_prev = c - log_w
    c_end = c[:, :, -1:]  # [C, B*H, 1, N]
    later = torch.ones(chunk, chunk, dtype=torch.bool, device=r.device).triu()[:, :, None]  # j >= t: no decay term
    own = torch.diag_embed((r * u.repeat(batch, 1)[:, None] * k).sum(-1))  # [C, B*H, L, L]: the bonus u
    group = max(1, CHUNK_GROUP_FLOATS // (rows * chunk * chunk * size))
    for first in range(0, n_chunks, group):
        part = slice(first, first + group)
        decay = (c_prev[part].unsqueeze(3) - c[part].unsqueeze(2)).masked_fill_(later, -torch.inf).exp_()
        own[part] += decay.mul_(r[part].unsqueeze(3)).mul_(k[part].unsqueeze(2)).sum(-1)  # [g, B*H, L(t), L(j)]
    y = own @ v
    add = (k * torch.exp(c_end - c)).mT @ v  # [C, B*H, K, V]
    keep = torch.exp(c_end).mT  # [C, B*H, K, 1]
    s = s.reshape(rows, size, size)
    starts = []
    for i in range(n_chunks):
        starts.append(s)
        s = torch.addcmul(add[i], keep[i], s)
    y = y.view(-1, chunk, size).baddbmm_((r * torch.exp(c_prev)).reshape(-1, chunk, size),
                                         torch.stack(starts).view(-1, size, size))
    y = y.view(n_chunks, batch, heads, chunk, size).permute(1, 0, 3, 2, 4).reshape(batch, -1, heads, size)
    return y[:, :length], s.view(batch, heads, size, size)


def wkv6_sequence(log_w, u, r, k, v, s):
    """T tokens [B, T, H, N] -> (out [B, T, H, N], s): a token-by-token scan for each sequence (the step's own
    arithmetic) where one runs, RWKV-5's with a decay per token: the C++ kernels' on a CPU that built them (a
    few times faster there than the chunked form's decay tables), Triton's on a GPU (a prompt of 1,024 tokens
    at 7B: the chunked form's element-wise passes took most of the prefill); else `wkv6_chunks`."""
    scans = cpu_kernels.built_for(r)
    if scans is None and triton_kernels.usable(r.device) and triton_kernels.supports_head_size(r.shape[-1]):
        scans = triton_kernels
    if scans is None:
        return wkv6_chunks(log_w, u, r, k, v, s, WKV_CHUNK)
    u = u.reshape(-1).float().contiguous()
    return cpu_kernels.scan_each_sequence(lambda rows, state: scans.wkv5_scan(rows[0], u, *rows[1:], state),
                                          [torch.exp(log_w), r, k, v], s)


class TimeMixV6(nn.Module):
    """RWKV-6 time mix: data-dependent token shift and decay, multi-head linear attention, SiLU gate."""

    LORA_FACTORS = ("time_maa_w1", "time_maa_w2", "time_decay_w1", "time_decay_w2")  # see layers.lora_storage_dtype

    def __init__(self, config, layer_id: int):
        super().__init__()
        c, a, h = config.n_embd, config.dim_att, config.n_head
        maa_rank, decay_rank = config.lora
        self.n_head, self.head_size = h, config.head_size
        for name in ("x", "w", "k", "v", "r", "g"):
            setattr(self, f"time_maa_{name}", nn.Parameter(torch.empty(1, 1, c)))
        self.time_maa_w1 = nn.Parameter(torch.empty(c, MAA_PARTS * maa_rank))
        self.time_maa_w2 = nn.Parameter(torch.empty(MAA_PARTS, maa_rank, c))
        self.time_decay = nn.Parameter(torch.empty(1, 1, a))
        self.time_decay_w1 = nn.Parameter(torch.empty(c, decay_rank))
        self.time_decay_w2 = nn.Parameter(torch.empty(decay_rank, a))
        self.time_faaaa = nn.Parameter(torch.empty(h, config.head_size))
        self.receptance = Projection(c, a)
        self.key = Projection(c, a)
        self.value = Projection(c, a)
        self.gate = Projection(c, a)
        self.output = Projection(a, c)
        self.ln_x = nn.GroupNorm(h, a, eps=GROUP_NORM_EPS)

    def forward(self, xx: torch.Tensor, prev: torch.Tensor, wkv: torch.Tensor, carry=None, real=None):
        """xx: normalised input [B, T, C]; prev: [B, C]; wkv: [B, H, N, N] -> (out [B, T, C], new wkv, carry).
        real: None, or a bool [1, T, 1] mask of the tokens that are the prompt's; the others (padding after it) get
        decay 1 and a zero key, so the memory passes them unchanged (their outputs are junk)."""
        batch, length, _ = xx.shape
        h, n = self.n_head, self.head_size
        low = lora_dtype(xx, self.receptance.weight)  # bf16 for a prefill beside bf16 products, else fp32
        shift_mixes = ShiftMixes(xx, prev, low)
        (xxx,) = shift_mixes(self.time_maa_x.view(1, -1))  # xx + sx * time_maa_x
        lora = torch.tanh(lora_product(xxx, self.time_maa_w1, low)).view(batch, length, MAA_PARTS, -1)
        lora = torch.einsum("btpd,pdc->pbtc", lora, self.time_maa_w2.to(low))  # [5, B, T, C] in low
        maa = torch.cat([self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g])
        # xx + sx * (time_maa_* + lora_*), in low: the products below read them in their own dtype
        wx, kx, vx, rx, gx = shift_mixes(maa.view(MAA_PARTS, -1), lora).unbind(0)
        heads = (batch, length, h, n)
        r = self.receptance(rx).view(heads)  # [B, T, H, N]
        k = self.key(kx)
        k = (k if real is None else torch.where(real, k, 0.0)).view(heads)
        v = self.value(vx).view(heads)
        gate = self.gate(gx)
        w = self.time_decay.view(-1) + lora_product(torch.tanh(lora_product(wx, self.time_decay_w1, low)),
                                                    self.time_decay_w2, low)  # fp32
        log_w = -torch.exp(w)
        log_w = (log_w if real is None else torch.where(real, log_w, 0.0)).view(heads)
        u = self.time_faaaa.float()
        if length == 1:
            out, wkv = wkv6_step(log_w[:, 0], u, r[:, 0], k[:, 0], v[:, 0], wkv)
        else:
            out, wkv = wkv6_sequence(log_w, u, r, k, v, wkv)
        rows = (batch * length, h * n)
        norm = getattr(cpu_kernels.built_for(out), "group_norm_gate", None)
        if norm is not None:  # ln_x and the gate in one C++ pass (fp32)
            out = norm(out.reshape(rows), h, self.ln_x.weight, self.ln_x.bias, GROUP_NORM_EPS, gate.reshape(rows))
        else:
            out = group_norm(out.reshape(rows), h, self.ln_x.weight, self.ln_x.bias) * F.silu(gate.reshape(rows))
        return self.output(out.view(batch, length, h * n)), wkv, carry


class ChannelMixV6(nn.Module):
    """RWKV-6 channel mix: RWKV-5's, with the token shift written as `xx + (prev - xx) * time_maa`."""

    def __init__(self, n_embd: int, dim_ffn: int):
        super().__init__()
        self.time_maa_k = nn.Parameter(torch.empty(1, 1, n_embd))
        self.time_maa_r = nn.Parameter(torch.empty(1, 1, n_embd))
        self.key = Projection(n_embd, dim_ffn)
        self.receptance = Projection(n_embd, n_embd)
        self.value = Projection(dim_ffn, n_embd)

    def forward(self, xx: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        mixes = torch.cat([self.time_maa_k, self.time_maa_r]).view(2, -1)
        kx, rx = ShiftMixes(xx, prev, lora_dtype(xx, self.key.weight))(mixes).unbind(0)  # xx + sx * maa
        r, v = self.receptance(rx), self.value(self.key.squared_relu(kx))
        sigmoid_gate = getattr(cpu_kernels.built_for(v), "sigmoid_gate", None)
        if sigmoid_gate is not None:  # the C++ gate: one pass, fp32
            return sigmoid_gate(r, v)
        return torch.sigmoid(r) * v


@dataclass
class FusedCoreV6:
    """What the fused decode step reads of one RWKV-6 time mix besides its projections (k, v, r, g)."""

    maa_lora: lora_triton.LowRank  # the token shift's LoRA: 5 parts (w, k, v, r, g)
    maa: torch.Tensor  # [5, C] fp32: time_maa_w, _k, _v, _r, _g
    decay_lora: lora_triton.LowRank
    time_decay: torch.Tensor  # [A]
    u: torch.Tensor  # [H, N]
    ln_w: torch.Tensor
    ln_b: torch.Tensor


def pack_fused_time_mix(att: TimeMixV6) -> FusedTimeMixPack:
    flat = lambda t: t.detach().float().reshape(-1)  # noqa: E731  (views of the fp32 parameters)
    tanh = lora_triton.TANH
    maa_rank, decay_rank = att.time_maa_w2.shape[1], att.time_decay_w1.shape[1]
    maa_lora = lora_triton.LowRank.pack([att.time_maa_w1], [att.time_maa_w2],
                                        [lora_triton.LoraPart(maa_rank, 0, tanh)] * MAA_PARTS)
    decay_lora = lora_triton.LowRank.pack([att.time_decay_w1], [att.time_decay_w2],
                                          [lora_triton.LoraPart(decay_rank, 0, tanh)])
    maa = torch.stack([flat(getattr(att, f"time_maa_{name}")) for name in ("w", "k", "v", "r", "g")])
    core = FusedCoreV6(maa_lora, maa, decay_lora, flat(att.time_decay), att.time_faaaa.detach().float(),
                       flat(att.ln_x.weight), flat(att.ln_x.bias))
    return FusedTimeMixPack(torch.stack([1 - flat(att.time_maa_x)]), [att.key, att.value, att.receptance, att.gate],
                            matrix_mixes=0, fp32_from=0, core=core)


def fused_time_mix(core: FusedCoreV6, projection, project, mixed32, xx, prev, wkv, wkv_out, act_dtype, side):
    """The fused decode step's RWKV-6 time mix (see Architecture.fused_time_mix): the token shift's LoRA (two
    launches), the five mixes (one), one product for k, v, r, g with the decay's LoRA (two) beside it on the side
    stream, the recurrence with GroupNorm and gate (one) (kernels/rwkv6_triton.py)."""
    batch, width = xx.shape
    wx = torch.empty((1, batch, width), dtype=torch.float32, device=xx.device)
    mixed = torch.empty((4, batch, width), dtype=act_dtype, device=xx.device)
    # the LoRAs keep fp32-level products in every dtype (their default operands): the decay's double exponential
    # magnifies their rounding (TF32 ones were not measured against them here), and at ranks of 32-64 they cost little
    rwkv6_triton.dynamic_mixes(xx, prev, core.maa_lora(mixed32), core.maa, wx[0], mixed)
    with side.branch():
        decay = core.decay_lora(wx)[0]
    k, v, r, g = project(mixed, projection)
    side.join()
    return rwkv6_triton.wkv6_decode(r, k, v, g, decay, wkv, wkv_out, core.time_decay, core.u, core.ln_w, core.ln_b,
                                    act_dtype, GROUP_NORM_EPS)


def cpu_layer_tensors(block: nn.Module) -> list[torch.Tensor]:
    """One block's tensors in the order cpu_kernels' RWKV-6 layer step reads them (views: nothing is copied)."""
    att, ffn = block.att, block.ffn
    flat = lambda t: t.detach().reshape(-1)  # noqa: E731
    return ([flat(block.ln1.weight), flat(block.ln1.bias), flat(block.ln2.weight), flat(block.ln2.bias)]
            + [flat(getattr(att, f"time_maa_{name}")) for name in ("x", "w", "k", "v", "r", "g")]
            + [att.time_maa_w1.detach(), att.time_maa_w2.detach(), flat(att.time_decay),
               att.time_decay_w1.detach(), att.time_decay_w2.detach(), flat(att.time_faaaa),
               flat(att.ln_x.weight), flat(att.ln_x.bias)]
            + att.receptance.stored() + att.key.stored() + att.value.stored() + att.gate.stored() + att.output.stored()
            + [flat(ffn.time_maa_k), flat(ffn.time_maa_r)]
            + ffn.key.stored() + ffn.receptance.stored() + ffn.value.stored())


class Rwkv6(HeadMatrixArchitecture):
    version = "6"
    family = "RWKV-6"
    fast_runner = False
    reads_padded_prompts = True  # the time mix's `real`: padding tokens get decay 1 and zero keys
    cpu_kernel_id = 6
    state_file_transposed = True  # state files hold [H, N(value), N(key)]; this memory is [H, N(key), N(value)]

    def identifies(self, state_dict):
        return "blocks.0.att.time_maa_x" in state_dict

    def head_size_from(self, state_dict, dim_att):
        return state_dict["blocks.0.att.time_faaaa"].shape[-1]

    def lora_from(self, state_dict):
        return (state_dict["blocks.0.att.time_maa_w2"].shape[1], state_dict["blocks.0.att.time_decay_w1"].shape[1])

    def default_lora(self, n_embd):
        return (32, 64) if n_embd < 4096 else (64, 128)  # the widths of the published models (for random tests)

    def default_ffn_size(self, n_embd):
        return ffn_size(n_embd)

    def canonical_key(self, key, tensor):
        if key.endswith(".att.time_faaaa"):
            return key, tensor.reshape(tensor.shape[0], -1)  # some files keep a trailing [.., 1]
        return key, tensor

    def make_time_mix(self, config, layer_id):
        return TimeMixV6(config, layer_id)

    def make_channel_mix(self, config):
        return ChannelMixV6(config.n_embd, config.dim_ffn)

    def pack_fused_time_mix(self, att, config):
        return pack_fused_time_mix(att) if triton_kernels.supports_head_size(config.head_size) else None

    def fused_time_mix(self, pack, projection, project, mixed, mixed32, xx, prev, wkv, wkv_out, carry, act_dtype,
                       side):
        return fused_time_mix(pack.core, projection, project, mixed32, xx, prev, wkv, wkv_out, act_dtype, side), carry

    def fused_channel_mix(self, ffn):
        mixes = [1 - ffn.time_maa_k.detach().float().reshape(-1), 1 - ffn.time_maa_r.detach().float().reshape(-1)]
        return torch.stack(mixes), [ffn.key, ffn.receptance]

    def cpu_layer_tensors(self, block):
        return cpu_layer_tensors(block)

    def time_mix_params(self, n_embd, dim_att):
        maa, decay = self.default_lora(n_embd)
        return 5 * n_embd * dim_att + 2 * MAA_PARTS * maa * n_embd + 2 * decay * n_embd


ARCHITECTURES = (Rwkv6(),)
