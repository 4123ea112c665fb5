"""RWKV-6 (Finch, "x060"): every question about this architecture, answered in one place.

- Checkpoints: `att.time_maa_x` (and `time_maa_w1/w2`, `time_decay_w1/w2`) in the keys. Head size from
  `att.time_faaaa` [H, N]; the two LoRA widths from `time_maa_w2` [5, D, C] and `time_decay_w1` [C, D2];
  F from `ffn.key.weight`.
- State per layer: the token shifts and one key-by-value matrix per head [H, N(key), N(value)] fp32, as RWKV-5.
- Math (the reference's `att_one_v6_0`): a data-dependent token shift (`xx + sx * (maa + lora(xx + sx*maa_x))`,
  sx = previous - current) feeds r, k, v, g and a per-token, per-channel decay
  `log_w = -exp(time_decay + tanh(wx @ w1) @ w2)`; then RWKV-5.2's per-head recurrence with that decay,
  GroupNorm of the heads and a SiLU gate. `wkv6_step` runs one token, `wkv6_chunk` L tokens at once (every
  exponent <= 0). The channel mix is RWKV-5's with the same shift convention (`time_maa_k/r`).
- Fast paths: none yet beyond the plain PyTorch path (`fast_runner = False`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import HeadMatrixArchitecture
from .layers import GROUP_NORM_EPS, WKV_CHUNK, Projection, ffn_size, group_norm, token_shift
from .rwkv5 import wkv5_step

MAA_PARTS = 5  # the LoRA of the token shift feeds w, k, v, r, g (in that order)


wkv6_step = wkv5_step  # one token: RWKV-5.2's step, its decay given per sequence ([B, H, N]) instead of shared


def wkv6_chunk(log_w, u, r, k, v, s):
    """L tokens at once. r, k, v, log_w: [B, H, L, N]; u: [H, N]; s: [B, H, N, N].

    With c_t = sum_{i<=t} log_w_i: out_t = sum_{j<t} (r_t * e^(c_{t-1}-c_j) . k_j) v_j + (r_t * u . k_t) v_t
    + (r_t * e^(c_{t-1})) @ s; every exponent is a sum of log decays and so <= 0.
    """
    length = r.shape[2]
    c = torch.cumsum(log_w, dim=2)  # [B, H, L, N]
    c_prev = c - log_w
    before = torch.ones(length, length, dtype=torch.bool, device=r.device).tril(-1)  # j < t
    gap = c_prev.unsqueeze(3) - c.unsqueeze(2)  # [B, H, L(t), L(j), N]
    decay = torch.exp(torch.where(before[:, :, None], gap, torch.full_like(gap, -torch.inf)))
    scores = torch.einsum("bhtn,bhtjn,bhjn->bhtj", r, decay, k)
    scores = scores + torch.diag_embed((r * u[:, None, :] * k).sum(-1))
    out = scores @ v + (r * torch.exp(c_prev)) @ s
    c_end = c[:, :, -1:]  # [B, H, 1, N]
    s = torch.exp(c_end).transpose(-1, -2) * s + (k * torch.exp(c_end - c)).transpose(-1, -2) @ v
    return out, s


class TimeMixV6(nn.Module):
    """RWKV-6 time mix: data-dependent token shift and decay, multi-head linear attention, SiLU gate."""

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

    def forward(self, xx: torch.Tensor, prev: torch.Tensor, wkv: torch.Tensor, carry=None):
        """xx: normalised input [B, T, C]; prev: [B, C]; wkv: [B, H, N, N] -> (out [B, T, C], new wkv, carry)."""
        batch, length, _ = xx.shape
        h, n = self.n_head, self.head_size
        sx = token_shift(xx, prev) - xx
        lora = torch.tanh((xx + sx * self.time_maa_x) @ self.time_maa_w1).view(batch, length, MAA_PARTS, -1)
        mw, mk, mv, mr, mg = torch.einsum("btpd,pdc->pbtc", lora, self.time_maa_w2).unbind(0)
        wx = xx + sx * (self.time_maa_w + mw)
        heads = (batch, length, h, n)
        r = self.receptance(xx + sx * (self.time_maa_r + mr)).view(heads).transpose(1, 2)  # [B, H, T, N]
        k = self.key(xx + sx * (self.time_maa_k + mk)).view(heads).transpose(1, 2)
        v = self.value(xx + sx * (self.time_maa_v + mv)).view(heads).transpose(1, 2)
        g = F.silu(self.gate(xx + sx * (self.time_maa_g + mg)))
        w = self.time_decay.view(-1) + torch.tanh(wx @ self.time_decay_w1) @ self.time_decay_w2
        log_w = -torch.exp(w).view(heads).transpose(1, 2)
        u = self.time_faaaa.float()
        if length == 1:
            out, wkv = wkv6_step(log_w[:, :, 0], u, r[:, :, 0], k[:, :, 0], v[:, :, 0], wkv)
            out = out.unsqueeze(2)
        else:
            pieces = []
            for start in range(0, length, WKV_CHUNK):
                part = slice(start, start + WKV_CHUNK)
                piece, wkv = wkv6_chunk(log_w[:, :, part], u, r[:, :, part], k[:, :, part], v[:, :, part], wkv)
                pieces.append(piece)
            out = torch.cat(pieces, dim=2)
        out = out.transpose(1, 2).reshape(batch * length, h * n)
        out = group_norm(out, h, self.ln_x.weight, self.ln_x.bias).view(batch, length, h * n)
        return self.output(out * g), wkv, carry


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
        sx = token_shift(xx, prev) - xx
        k = torch.relu(self.key(xx + sx * self.time_maa_k)).square()
        return torch.sigmoid(self.receptance(xx + sx * self.time_maa_r)) * self.value(k)


class Rwkv6(HeadMatrixArchitecture):
    version = "6"
    family = "RWKV-6"
    fast_runner = False
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

    def time_mix_params(self, n_embd, dim_att):
        maa, decay = self.default_lora(n_embd)
        return 5 * n_embd * dim_att + 2 * MAA_PARTS * maa * n_embd + 2 * decay * n_embd


ARCHITECTURES = (Rwkv6(),)
