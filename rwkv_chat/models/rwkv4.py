"""RWKV-4: every question about this architecture, answered in one place.

- Checkpoints: no `ln_x` in the keys; `att.time_decay`/`att.time_first` are per channel [A]; F = 4C.
- State per layer: the token shifts and the wkv memory [3, A] = (aa, bb, pp): numerator, denominator and
  their common log-scale; an empty memory has pp = -1e30 (e^-1e30 is exactly 0 in fp32).
- Math (w = -exp(time_decay), u = time_first, all fp32): `wkv4_step` for one token, `wkv4_chunk` for L tokens
  at once in log space (the reference's parallel form), `TimeMixV4` the module.
- Fast paths: the packed r|k|v projections, the PyTorch/Triton decode cores and the prefill scans.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels import parallel_wkv
from .architecture import Architecture, TimeMixPack
from .layers import WKV_CHUNK, Projection, mix, token_shift

EMPTY_LOG_SCALE = -1e30  # pp of an empty memory


def wkv4_step(w, u, k, v, aa, bb, pp):
    """One token of the v4 recurrence. k, v, aa, bb, pp: [B, C]; w = -exp(time_decay), u = time_first: [C]."""
    ww = u + k
    p = torch.maximum(pp, ww)
    e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
    out = (e1 * aa + e2 * v) / (e1 * bb + e2)
    ww = w + pp
    p = torch.maximum(ww, k)
    e1, e2 = torch.exp(ww - p), torch.exp(k - p)
    return out, e1 * aa + e2 * v, e1 * bb + e2, p


def wkv4_chunk(w, u, k, v, aa, bb, pp):
    """L tokens of the v4 recurrence at once, in log space (every exponent is shifted by its maximum).

    k, v: [B, L, C]; aa, bb, pp: [B, C]. Token t sees token j < t with weight exp((t-1-j)w + k_j), itself
    with exp(u + k_t), and the carried state with exp(t w + pp).
    """
    length = k.shape[1]
    pos = torch.arange(length, device=k.device)
    gap = (pos[:, None] - 1 - pos[None, :]).to(torch.float32)  # [L, L]: t-1-j
    offset = gap[:, :, None] * w  # [L, L, C]
    offset = torch.where((gap >= 0)[:, :, None], offset, torch.full_like(offset, -math.inf))
    offset = torch.where(torch.eye(length, dtype=torch.bool, device=k.device)[:, :, None], u, offset)
    logits = offset.unsqueeze(0) + k.unsqueeze(1)  # [B, L(t), L(j), C]
    carried = pos[None, :, None].to(torch.float32) * w + pp.unsqueeze(1)  # [B, L, C]
    top = torch.maximum(logits.amax(dim=2), carried)
    weight = torch.exp(logits - top.unsqueeze(2))
    carried_weight = torch.exp(carried - top)
    num = torch.einsum("btjc,bjc->btc", weight, v) + carried_weight * aa.unsqueeze(1)
    den = weight.sum(dim=2) + carried_weight * bb.unsqueeze(1)
    out = num / den
    # state after the chunk: token j decayed L-1-j times, the carried state L times
    last = (length - 1 - pos)[None, :, None].to(torch.float32) * w + k  # [B, L, C]
    carried_end = length * w + pp  # [B, C]
    p = torch.maximum(last.amax(dim=1), carried_end)
    e_last, e_carried = torch.exp(last - p.unsqueeze(1)), torch.exp(carried_end - p)
    aa = (e_last * v).sum(dim=1) + e_carried * aa
    bb = e_last.sum(dim=1) + e_carried * bb
    return out, aa, bb, p


class TimeMixV4(nn.Module):
    """RWKV-4 time mix: a per-channel exponentially decaying weighted average of values."""

    def __init__(self, config):
        super().__init__()
        c, a = config.n_embd, config.dim_att
        self.time_decay = nn.Parameter(torch.empty(a))
        self.time_first = nn.Parameter(torch.empty(a))
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, c))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, c))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, c))
        self.key = Projection(c, a)
        self.value = Projection(c, a)
        self.receptance = Projection(c, a)
        self.output = Projection(a, c)

    def forward(self, xx: torch.Tensor, prev: torch.Tensor, wkv: torch.Tensor, carry=None):
        """xx: normalised input [B, T, C]; prev: [B, C]; wkv: [B, 3, C] -> (out [B, T, C], new wkv)."""
        shifted = token_shift(xx, prev)
        r = torch.sigmoid(self.receptance(mix(xx, shifted, self.time_mix_r)))
        k = self.key(mix(xx, shifted, self.time_mix_k))
        v = self.value(mix(xx, shifted, self.time_mix_v))
        w, u = -torch.exp(self.time_decay.float()), self.time_first.float()
        aa, bb, pp = wkv.unbind(dim=1)
        if xx.shape[1] == 1:
            out, aa, bb, pp = wkv4_step(w, u, k[:, 0], v[:, 0], aa, bb, pp)
            out = out.unsqueeze(1)
        else:
            pieces = []
            for start in range(0, xx.shape[1], WKV_CHUNK):
                piece, aa, bb, pp = wkv4_chunk(w, u, k[:, start:start + WKV_CHUNK],
                                               v[:, start:start + WKV_CHUNK], aa, bb, pp)
                pieces.append(piece)
            out = torch.cat(pieces, dim=1)
        return self.output(r * out), torch.stack([aa, bb, pp], dim=1), carry


class Rwkv4(Architecture):
    version = "4"
    family = "RWKV-4"
    heads = False
    cpu_kernel_id = 4
    triton_decode = True
    cpu_wkv_chunk = 32  # v4's chunks cost one [C, L, L] table product: longer ones measured faster on CPU
    projections_for_every_token = (1, 2)  # k and v; r only where the output is kept
    prefill_takes_gemm_dtype = True  # Triton's scan widens k and v as it reads them, its gate r

    def identifies(self, state_dict):
        return not any(".ln_x." in key for key in state_dict)

    def head_size_from(self, state_dict, dim_att):
        return 64  # unused: RWKV-4 has no heads

    def default_ffn_size(self, n_embd):
        return 4 * n_embd

    def n_head(self, config):
        return 0

    def empty_wkv(self, config, batch, device):
        wkv = torch.zeros(batch, config.n_layer, 3, config.dim_att, dtype=torch.float32, device=device)
        wkv[:, :, 2] = EMPTY_LOG_SCALE
        return wkv

    def make_time_mix(self, config, layer_id):
        return TimeMixV4(config)

    def time_mix_params(self, n_embd, dim_att):
        return 4 * n_embd * dim_att

    def state_floats_per_layer(self, n_embd, dim_att, head_size):
        return 2 * n_embd + 3 * dim_att

    def pack_time_mix(self, att, config):
        return TimeMixPack(mixes=[att.time_mix_r, att.time_mix_k, att.time_mix_v],
                           projections=[att.receptance, att.key, att.value],
                           decay=-torch.exp(att.time_decay.detach().float()).contiguous(),
                           first=att.time_first.detach().float().contiguous())

    def decode_wkv(self, layer, proj, wkv, wkv_out):
        r, k, v = proj
        out, aa, bb, pp = wkv4_step(layer.decay, layer.first, k, v, wkv[:, 0], wkv[:, 1], wkv[:, 2])
        wkv_out[:, 0], wkv_out[:, 1], wkv_out[:, 2] = aa, bb, pp
        return torch.sigmoid(r) * out

    def triton_decode_wkv(self, kernels, layer, proj, wkv, wkv_out, act_dtype):
        return kernels.wkv4_decode(*proj, wkv, wkv_out, layer.decay, layer.first, act_dtype)

    def prefill_wkv(self, layer, proj, wkv, kernels, chunk, kept):
        r, k, v = proj
        if kernels is not None:
            out, new_wkv = kernels.wkv4_scan(layer.decay, layer.first, k.contiguous(), v.contiguous(),
                                             wkv.contiguous())
        else:
            out, aa, bb, pp = parallel_wkv.wkv4_segment(layer.decay, layer.first, k[None], v[None],
                                                        wkv[0:1], wkv[1:2], wkv[2:3], chunk)
            out, new_wkv = out[0], torch.cat([aa, bb, pp])
        gate = getattr(kernels, "sigmoid_gate", None)  # Triton's or C++'s: one pass, sigmoid in fp32 from r as it came
        if gate is not None:
            return gate(r, out[kept], out_dtype=r.dtype), new_wkv
        return torch.sigmoid(r) * out[kept], new_wkv


ARCHITECTURES = (Rwkv4(),)
