"""RWKV-4 and RWKV-5 (5.0, 5.2) language models as PyTorch modules: tokens + state -> logits + state.

What this module promises:
- `RwkvModel.forward(tokens, state)` returns the logits of the last token (or of every token) and a *new*
  `RwkvState`; the state passed in is never changed, so callers can branch from it.
- A sequence is read in parallel: every projection runs over the whole segment at once and the recurrent
  part (`wkv`) runs in chunks of `WKV_CHUNK` tokens with the exact chunked form of the recurrence — never a
  Python loop over tokens. Reading a sequence whole or split anywhere gives the same state (up to rounding).
- Numerics follow the reference implementation: LayerNorms, the recurrence and the residual stream are fp32;
  only the projections run in the weight dtype (fp32, bf16, fp16), so bf16 stays close to fp32.
- Parameter names are those of the original checkpoints (`blocks.N.att.key.weight`, ...), except that
  `blocks.0.ln0` lives at `ln0`. Shapes are read from a `RwkvConfig`.

- `use_fast_path()` routes `forward` and `decode_batch` through `fast.FastRunner` (packed projections,
  fused Triton kernels and CUDA graphs on GPUs, bf16/int8 weights on CPUs) under the same contract; the code
  in this module stays the plain reference path.

It knows nothing of files, text or devices beyond the tensors it is given. A new architecture (RWKV-6, 7) is
one more time-mix class registered in `TIME_MIX_CLASSES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .state import RwkvState

SUPPORTED_VERSIONS = ("4", "5.0", "5.2")
LAYER_NORM_EPS = 1e-5
GROUP_NORM_EPS = 64e-5  # ln_x: GroupNorm of the head outputs (equals GN(out / 8, eps=1e-5) for head size 64)
WKV_CHUNK = 32  # tokens per chunk of the parallel recurrence
SEGMENT_TOKENS = 1024  # tokens read through all layers at once; bounds activation memory for long prompts


@dataclass(frozen=True)
class RwkvConfig:
    """Shape and architecture of a model; everything else about it is in its weights."""

    version: str
    n_layer: int
    n_embd: int
    dim_att: int
    dim_ffn: int
    vocab_size: int
    head_size: int = 64

    def __post_init__(self):
        if self.version not in SUPPORTED_VERSIONS:
            raise ValueError(f"unsupported RWKV version {self.version!r}; supported: {SUPPORTED_VERSIONS}")
        if self.version != "4" and self.dim_att % self.head_size:
            raise ValueError(f"dim_att {self.dim_att} is not a multiple of head size {self.head_size}")

    @property
    def n_head(self) -> int:
        return 0 if self.version == "4" else self.dim_att // self.head_size

    @property
    def n_params(self) -> int:
        """Parameter count (for memory estimates)."""
        c, a, f, v = self.n_embd, self.dim_att, self.dim_ffn, self.vocab_size
        att = 3 * a * c + c * a + (a * c if self.version == "5.2" else 0)
        ffn = f * c + c * c + c * f
        return 2 * v * c + self.n_layer * (att + ffn)


class Projection(nn.Linear):
    """A bias-free linear layer that takes and returns fp32 and computes in its weight's dtype.

    An int8 weight (quant.quantize_model_) carries a per-row `weight_scale` buffer and multiplies through
    quant.linear."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.int8:
            from .quant import linear
            return linear(x, self.weight, self.weight_scale)
        return F.linear(x.to(self.weight.dtype), self.weight).float()


def token_shift(xx: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Each position's previous token: [B, T, C] from xx [B, T, C] and the state's last token prev [B, C]."""
    return torch.cat([prev.unsqueeze(1), xx[:, :-1]], dim=1)


def mix(xx: torch.Tensor, shifted: torch.Tensor, time_mix: torch.Tensor) -> torch.Tensor:
    """Interpolate between the current and the previous token, per channel (reference formula)."""
    return xx * time_mix + shifted * (1 - time_mix)


# ---------------------------------------------------------------------------------------------- RWKV-4 wkv

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

    def __init__(self, config: RwkvConfig):
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

    def forward(self, xx: torch.Tensor, prev: torch.Tensor, wkv: torch.Tensor):
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
        return self.output(r * out), torch.stack([aa, bb, pp], dim=1)


# ---------------------------------------------------------------------------------------------- RWKV-5 wkv

def wkv5_step(log_w, u, r, k, v, s):
    """One token of the v5 recurrence. r, k, v: [B, H, S]; log_w, u: [H, S]; s: [B, H, S(key), S(value)]."""
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

    def __init__(self, config: RwkvConfig):
        super().__init__()
        c, a, h = config.n_embd, config.dim_att, config.n_head
        self.n_head, self.head_size = h, config.head_size
        self.gated = config.version == "5.2"
        decay_shape = (h, config.head_size) if self.gated else (h,)
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
        if self.gated:
            self.time_mix_g = nn.Parameter(torch.empty(1, 1, c))
            self.gate = Projection(c, a)

    def forward(self, xx: torch.Tensor, prev: torch.Tensor, wkv: torch.Tensor):
        """xx: normalised input [B, T, C]; prev: [B, C]; wkv: [B, H, S, S] -> (out [B, T, C], new wkv)."""
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
        out = F.group_norm(out, h, self.ln_x.weight.float(), self.ln_x.bias.float(), GROUP_NORM_EPS)
        out = out.view(batch, length, h * size)
        if self.gated:
            out = out * F.silu(self.gate(mix(xx, shifted, self.time_mix_g)))
        return self.output(out), wkv


TIME_MIX_CLASSES = {"4": TimeMixV4, "5.0": TimeMixV5, "5.2": TimeMixV5}


class ChannelMix(nn.Module):
    """The feed-forward half of a block: sigmoid(r) * (relu(k)^2 @ Wv), same in every version here."""

    def __init__(self, config: RwkvConfig):
        super().__init__()
        c, f = config.n_embd, config.dim_ffn
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, c))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, c))
        self.key = Projection(c, f)
        self.receptance = Projection(c, c)
        self.value = Projection(f, c)

    def forward(self, xx: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        shifted = token_shift(xx, prev)
        k = torch.relu(self.key(mix(xx, shifted, self.time_mix_k))).square()
        return torch.sigmoid(self.receptance(mix(xx, shifted, self.time_mix_r))) * self.value(k)


class Block(nn.Module):
    def __init__(self, config: RwkvConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS)
        self.ln2 = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS)
        self.att = TIME_MIX_CLASSES[config.version](config)
        self.ffn = ChannelMix(config)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, wkv: torch.Tensor):
        """x: residual stream [B, T, C] fp32; shift: [B, 2, C]; wkv: this layer's memory."""
        xx = F.layer_norm(x, x.shape[-1:], self.ln1.weight.float(), self.ln1.bias.float(), LAYER_NORM_EPS)
        att, wkv = self.att(xx, shift[:, 0], wkv)
        x = x + att
        xx2 = F.layer_norm(x, x.shape[-1:], self.ln2.weight.float(), self.ln2.bias.float(), LAYER_NORM_EPS)
        x = x + self.ffn(xx2, shift[:, 1])
        return x, torch.stack([xx[:, -1], xx2[:, -1]], dim=1), wkv


class RwkvModel(nn.Module):
    """An RWKV language model. See the module docstring for the contract."""

    def __init__(self, config: RwkvConfig):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.ln0 = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS)
        self.head = Projection(config.n_embd, config.vocab_size)
        # Halve the residual stream after every `rescale_every` layers (fp16 guard); 0 = off. Set through
        # `enable_fp16_rescale`, which also scales the weights to match.
        self.rescale_every = 0
        # The fast path (fast.FastRunner) when enabled through `use_fast_path`; None = the plain path below.
        self.runner = None

    # -------------------------------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the projections are stored in (torch.int8 for int8 weights, which compute in bf16/fp32)."""
        return self.head.weight.dtype

    def zero_state(self, batch: int = 1) -> RwkvState:
        c = self.config
        return RwkvState.zeros(c.version, c.n_layer, c.n_embd, c.n_head, c.head_size, batch, self.device)

    @torch.no_grad()
    def use_fast_path(self, enabled: bool = True, **options) -> "RwkvModel":
        """Route forward/decode_batch through fast.FastRunner (packed projections, fused kernels, CUDA graphs;
        same function within the weight dtype's rounding). Call after the weights are final (loading,
        fp16 rescale, int8 quantisation); `options` go to FastRunner (use_triton, use_graphs)."""
        self.runner = None
        if enabled:
            from .fast import FastRunner
            self.runner = FastRunner(self, **options)
        return self

    @torch.no_grad()
    def enable_fp16_rescale(self, every: int = 6) -> None:
        """Divide each layer's output projections by 2**(layer // every) and halve the residual stream after
        every `every` layers, so fp16 activations do not overflow (RWKV-4 World needs it). Call once."""
        if self.rescale_every:
            raise RuntimeError("fp16 rescaling is already enabled")
        for i, block in enumerate(self.blocks):
            factor = 2 ** (i // every)
            block.att.output.weight.div_(factor)
            block.ffn.value.weight.div_(factor)
        self.rescale_every = every
        if self.runner is not None:  # the packed weights are views of the scaled ones; refresh the rest
            self.use_fast_path()

    # -------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def forward(self, tokens, state: RwkvState | None = None, all_logits: bool = False):
        """Read `tokens` (list of ids or 1-D LongTensor) after `state` (None = empty).

        Returns (logits, new_state): logits fp32 [vocab] for the last token, or [T, vocab] with all_logits.
        """
        ids = self._token_ids(tokens).reshape(-1)
        if ids.numel() == 0:
            raise ValueError("forward needs at least one token")
        state = self._prepare_state(state, batch=1)
        if self.runner is not None:
            if ids.numel() == 1 and not all_logits:
                logits, state = self.runner.decode(ids, state)  # ids may stay on the CPU (graph input)
                return logits[0], state
            return self.runner.prefill(ids.to(self.device), state, all_logits)
        ids = ids.to(self.device)
        outputs = []
        for start in range(0, ids.numel(), SEGMENT_TOKENS):
            segment = ids[start:start + SEGMENT_TOKENS].unsqueeze(0)  # [1, T]
            hidden, state = self._read(segment, state)
            outputs.append(hidden[0] if all_logits else hidden[0, -1:])
        hidden = torch.cat(outputs) if all_logits else outputs[-1][0]
        return self._logits(hidden), state

    @torch.no_grad()
    def decode_batch(self, tokens: torch.Tensor, state: RwkvState):
        """One token for each of B sequences: tokens [B] -> (logits fp32 [B, vocab], new batched state)."""
        ids = self._token_ids(tokens).reshape(-1, 1)
        state = self._prepare_state(state, batch=ids.shape[0])
        if self.runner is not None:
            return self.runner.decode(ids.reshape(-1), state)
        hidden, state = self._read(ids.to(self.device), state)
        return self._logits(hidden[:, -1]), state

    def _read(self, ids: torch.Tensor, state: RwkvState):
        """Run [B, T] ids through every layer; returns (final hidden [B, T, C], new state)."""
        x = self.emb(ids).float()
        x = F.layer_norm(x, x.shape[-1:], self.ln0.weight.float(), self.ln0.bias.float(), LAYER_NORM_EPS)
        shifts, wkvs = [], []
        for i, block in enumerate(self.blocks):
            x, shift, wkv = block(x, state.shift[:, i], state.wkv[:, i])
            shifts.append(shift)
            wkvs.append(wkv)
            if self.rescale_every and (i + 1) % self.rescale_every == 0:
                x = x / 2
        return x, RwkvState(torch.stack(shifts, dim=1), torch.stack(wkvs, dim=1))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(hidden, hidden.shape[-1:], self.ln_out.weight.float(), self.ln_out.bias.float(),
                         LAYER_NORM_EPS)
        return self.head(x)

    def _token_ids(self, tokens) -> torch.Tensor:
        """Tokens -> a checked LongTensor. Lists are checked on the CPU, so a decode step costs no GPU sync."""
        ids = torch.as_tensor(tokens, dtype=torch.long)
        self._check_ids(ids)
        return ids

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}); got "
                             f"min {int(ids.min())}, max {int(ids.max())}")

    def _state_shapes(self):
        """Per-sequence shapes of (shift, wkv), computed once."""
        if not hasattr(self, "_shapes"):
            expected = RwkvState.zeros(self.config.version, self.config.n_layer, self.config.n_embd,
                                       self.config.n_head, self.config.head_size, 0, "cpu")
            self._shapes = (expected.shift.shape[1:], expected.wkv.shape[1:])
        return self._shapes

    def _prepare_state(self, state: RwkvState | None, batch: int) -> RwkvState:
        if state is None:
            return self.zero_state(batch)
        if state.batch_size != batch:
            raise ValueError(f"state holds {state.batch_size} sequences but {batch} were given")
        shift_shape, wkv_shape = self._state_shapes()
        if state.shift.shape[1:] != shift_shape or state.wkv.shape[1:] != wkv_shape:
            raise ValueError("state does not belong to a model of this shape "
                             f"(wkv {tuple(state.wkv.shape[1:])} vs {tuple(wkv_shape)})")
        return state.to(self.device) if state.device != self.device else state
