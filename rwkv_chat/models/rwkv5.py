"""RWKV-5 (Eagle) in its two published versions, 5.0 and 5.2: every question about them in one place.

- Checkpoints: `att.ln_x` present; 5.0 has a per-head decay `att.time_decay` [H] (some files `att.time_first`,
  u = exp(time_first), instead of `time_faaaa`), 5.2 a per-channel one [H, S] and an output gate
  (`att.gate`, `time_mix_g`); 5.1 (a gate with per-head decay) is refused. F = 4C (5.0), int(3.5C)//32*32 (5.2).
- State per layer: the token shifts and one key-by-value matrix per head [H, S, S] fp32.
- Math (log_w = -exp(time_decay), u = time_faaaa): `wkv5_step` for one token, `wkv5_chunk` for L tokens at once
  (every exponent <= 0), `TimeMixV5` the module (GroupNorm of the heads, 5.2's SiLU gate).
- Fast paths: the packed r|k|v(|g) projections, the PyTorch/Triton decode cores and the prefill scans. A prompt
  padded at its end (the fast runner's graphed pieces) goes through the scans with a decay per token, 1 for the
  padding, and zero keys there, so the padding leaves the memory as it is (`prefill_wkv`'s `real`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import parallel_wkv
from .architecture import HeadMatrixArchitecture, TimeMixPack, UnsupportedCheckpoint
from .layers import GROUP_NORM_EPS, WKV_CHUNK, Projection, ffn_size, group_norm, mix, token_shift


def wkv5_step(log_w, u, r, k, v, s):
    """One token of the v5 recurrence. r, k, v: [B, H, S]; u: [H, S]; log_w: [H, S], or [B, H, S] where the decay
    depends on the token (RWKV-6); s: [B, H, S(key), S(value)]."""
    a = k.unsqueeze(-1) * v.unsqueeze(-2)  # [B, H, S, S]
    out = (r.unsqueeze(-2) @ (u.unsqueeze(-1) * a + s)).squeeze(-2)  # [B, H, S]
    return out, a + torch.exp(log_w).unsqueeze(-1) * s


def wkv5_chunk(log_w, u, r, k, v, s):
    """L tokens of the v5 recurrence at once; every exponent is <= 0, so nothing overflows.

    r, k, v: [B, H, L, S]; log_w = -exp(time_decay), u: [H, S]; s: [B, H, S, S].
    out_t = sum_{j<t} (r_t * w^(t-1-j) . k_j) v_j + (r_t * u . k_t) v_t + (r_t * w^t) @ s.
    """
    length = r.shape[2]
    pos = torch.arange(length, device=r.device, dtype=torch.float32)
    gap = pos[:, None] - 1 - pos[None, :]  # [L, L]: t-1-j
    decay = torch.exp(log_w[:, None, None, :] * gap.clamp(min=0)[None, :, :, None])  # [H, L, L, S]
    decay = decay * (gap >= 0)[None, :, :, None]
    scores = torch.einsum("bhts,htjs,bhjs->bhtj", r, decay, k)  # [B, H, L, L]
    scores = scores + torch.diag_embed((r * u[:, None, :] * k).sum(-1))
    decay_from_start = torch.exp(log_w[:, None, :] * pos[None, :, None])  # [H, L, S]: w^t
    out = scores @ v + (r * decay_from_start) @ s  # [B, H, L, S]
    decay_to_end = torch.exp(log_w[:, None, :] * (length - 1 - pos)[None, :, None])  # [H, L, S]
    s = torch.exp(log_w * length).unsqueeze(-1) * s + (k * decay_to_end).transpose(-1, -2) @ v
    return out, s


class TimeMixV5(nn.Module):
    """RWKV-5 time mix: multi-head linear attention with a per-head (5.0) or per-channel (5.2) decay,
    GroupNorm of the heads, and (5.2) a SiLU output gate."""

    def __init__(self, config, gated: bool):
        super().__init__()
        c, a, h = config.n_embd, config.dim_att, config.n_head
        self.n_head, self.head_size, self.gated = h, config.head_size, gated
        decay_shape = (h, config.head_size) if gated else (h,)
        self.time_decay = nn.Parameter(torch.empty(decay_shape))
        self.time_faaaa = nn.Parameter(torch.empty(decay_shape))
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, c))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, c))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, c))
        self.key = Projection(c, a)
        self.value = Projection(c, a)
        self.receptance = Projection(c, a)
        self.output = Projection(a, c)
        self.ln_x = nn.GroupNorm(h, a, eps=GROUP_NORM_EPS)
        if gated:
            self.time_mix_g = nn.Parameter(torch.empty(1, 1, c))
            self.gate = Projection(c, a)

    def forward(self, xx: torch.Tensor, prev: torch.Tensor, wkv: torch.Tensor, carry=None):
        """xx: normalised input [B, T, C]; prev: [B, C]; wkv: [B, H, S, S] -> (out [B, T, C], new wkv, carry)."""
        batch, length, _ = xx.shape
        h, size = self.n_head, self.head_size
        shifted = token_shift(xx, prev)
        heads = (batch, length, h, size)
        r = self.receptance(mix(xx, shifted, self.time_mix_r)).view(heads).transpose(1, 2)  # [B, H, T, S]
        k = self.key(mix(xx, shifted, self.time_mix_k)).view(heads).transpose(1, 2)
        v = self.value(mix(xx, shifted, self.time_mix_v)).view(heads).transpose(1, 2)
        log_w = -torch.exp(self.time_decay.float()).view(h, -1).expand(h, size)
        u = self.time_faaaa.float().view(h, -1).expand(h, size)
        if length == 1:
            out, wkv = wkv5_step(log_w, u, r[:, :, 0], k[:, :, 0], v[:, :, 0], wkv)
            out = out.unsqueeze(2)
        else:
            pieces = []
            for start in range(0, length, WKV_CHUNK):
                end = start + WKV_CHUNK
                piece, wkv = wkv5_chunk(log_w, u, r[:, :, start:end], k[:, :, start:end],
                                        v[:, :, start:end], wkv)
                pieces.append(piece)
            out = torch.cat(pieces, dim=2)
        out = out.transpose(1, 2).reshape(batch * length, h * size)
        out = group_norm(out, h, self.ln_x.weight, self.ln_x.bias).view(batch, length, h * size)
        if self.gated:
            out = out * F.silu(self.gate(mix(xx, shifted, self.time_mix_g)))
        return self.output(out), wkv, carry


class Rwkv5(HeadMatrixArchitecture):
    """5.0 (`gated=False`) or 5.2 (`gated=True`)."""

    family = "RWKV-5"
    cpu_kernel_id = 5
    triton_decode = True
    cpu_wkv_chunk = 16
    state_file_transposed = True  # state files hold [H, S(value), S(key)]
    projections_for_every_token = (0, 1, 2)  # r, k and v: the scans read r
    prefill_wkv_reads_padding = True  # padding: decay 1 and zero keys, through the scans' decay per token

    def __init__(self, version: str, gated: bool):
        self.version, self.gated = version, gated

    # ------------------------------------------------------------------------------------- checkpoints
    def identifies(self, state_dict):
        if not any(".ln_x." in key for key in state_dict):
            return False
        decay = state_dict["blocks.0.att.time_decay"]
        per_channel = decay.dim() >= 2 and decay.shape[1] > 1
        has_gate = any(".att.gate.weight" in key for key in state_dict)
        if has_gate and not per_channel:
            raise UnsupportedCheckpoint("this is an RWKV-5.1 checkpoint, which is not supported (5.0 and 5.2 are)")
        return has_gate == self.gated

    def head_size_from(self, state_dict, dim_att):
        return dim_att // state_dict["blocks.0.att.time_decay"].shape[0]

    def default_ffn_size(self, n_embd):
        return ffn_size(n_embd) if self.gated else 4 * n_embd

    def canonical_key(self, key, tensor):
        if key.endswith(".att.time_first"):  # some 5.0 files: u = exp(time_first)
            return key.replace("time_first", "time_faaaa"), torch.exp(tensor.float())
        return key, tensor

    # ------------------------------------------------------------------------------------- shapes and state
    def make_time_mix(self, config, layer_id):
        return TimeMixV5(config, self.gated)

    def time_mix_params(self, n_embd, dim_att):
        return (5 if self.gated else 4) * n_embd * dim_att

    # ------------------------------------------------------------------------------------- fast paths
    def pack_time_mix(self, att, config):
        h, s = config.n_head, config.head_size
        f32 = lambda t: t.detach().float()  # noqa: E731
        mixes = [att.time_mix_r, att.time_mix_k, att.time_mix_v]
        projections = [att.receptance, att.key, att.value]
        if self.gated:
            mixes.append(att.time_mix_g)
            projections.append(att.gate)
        return TimeMixPack(mixes=mixes, projections=projections,
                           decay=(-torch.exp(f32(att.time_decay))).reshape(h, -1).expand(h, s).contiguous(),
                           first=f32(att.time_faaaa).reshape(h, -1).expand(h, s).contiguous(),
                           ln_x=(f32(att.ln_x.weight).contiguous(), f32(att.ln_x.bias).contiguous()))

    def _gate(self, out: torch.Tensor, proj: list[torch.Tensor]) -> torch.Tensor:
        return out * F.silu(proj[3]) if self.gated else out

    def decode_wkv(self, layer, proj, wkv, wkv_out):
        batch = proj[0].shape[0]
        h, s = layer.decay.shape
        r, k, v = (t.view(batch, h, s) for t in proj[:3])
        out, new = wkv5_step(layer.decay, layer.first, r, k, v, wkv)
        wkv_out.copy_(new)
        return self._gate(group_norm(out.reshape(batch, h * s), h, *layer.ln_x), proj)

    def triton_decode_wkv(self, kernels, layer, proj, wkv, wkv_out, act_dtype):
        gate = proj[3] if self.gated else None
        return kernels.wkv5_decode(proj[0], proj[1], proj[2], gate, wkv, wkv_out, layer.decay_factor, layer.first,
                                   *layer.ln_x, act_dtype, GROUP_NORM_EPS)

    def prefill_wkv(self, layer, proj, wkv, kernels, chunk, kept, real=None):
        h, s = layer.decay.shape
        if real is not None:  # padding after the prompt: decay 1 and zero keys (the scans' decay per token, RWKV-6's)
            if kernels is None:
                raise ValueError("RWKV-5 reads padded prompts with the token-by-token scans only (Triton or C++)")
            decay = torch.where(real, layer.decay_factor.view(1, -1), 1.0)
            r, k, v = proj[0].contiguous(), torch.where(real, proj[1], 0.0), proj[2].contiguous()
            out, new_wkv = kernels.wkv5_scan(decay, layer.first, r, k, v, wkv.contiguous())
        elif kernels is not None:
            out, new_wkv = kernels.wkv5_scan(layer.decay_factor, layer.first, *(t.contiguous() for t in proj[:3]),
                                             wkv.contiguous())
        else:
            length = proj[0].shape[0]
            r, k, v = (t.view(1, length, h, s).transpose(1, 2) for t in proj[:3])  # [1, H, T, S]
            scan = "matrix" if r.device.type == "cuda" else "loop"
            out, new_wkv = parallel_wkv.wkv5_segment(layer.decay, layer.first, r, k, v, wkv.unsqueeze(0),
                                                     chunk, scan)
            new_wkv = new_wkv[0]
            out = out[0].transpose(0, 1).reshape(length, h * s)
        norm = getattr(kernels, "group_norm_gate", None)  # the C++ ln_x and gate: one pass
        if norm is not None:
            return norm(out[kept], h, *layer.ln_x, GROUP_NORM_EPS, proj[3] if self.gated else None), new_wkv
        return self._gate(group_norm(out[kept], h, *layer.ln_x), proj), new_wkv

    def cpu_decay(self, layer):
        return layer.decay_factor  # the C++ kernels read w = exp(log_w)


ARCHITECTURES = (Rwkv5("5.0", gated=False), Rwkv5("5.2", gated=True))
