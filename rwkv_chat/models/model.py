"""The RWKV language model as a PyTorch module: tokens + state -> logits + state, for every architecture.

What this module promises:
- `RwkvModel.forward(tokens, state)` returns the logits of the last token (or of every token) and a *new*
  `RwkvState`; the state passed in is never changed, so callers can branch from it.
- A sequence is read in parallel: every projection runs over the whole segment at once and the recurrent
  part runs in chunks with the exact chunked form of the recurrence (the architecture's time mix) — never a
  Python loop over tokens. Reading a sequence whole or split anywhere gives the same state (up to rounding).
  A read that returns only its last token's logits runs the last layer's channel mix for that token alone.
  `read_padded` reads a prompt padded at its end (RWKV-6/7: their time mixes pass the padding), so one CUDA
  graph of T tokens serves every prompt of 1 to T.
- Numerics follow the reference implementation: LayerNorms, the recurrence and the residual stream are fp32;
  only the projections run in the weight dtype (fp32, bf16, fp16, int8, int4), so bf16 stays close to fp32.
- Parameter names are those of the original checkpoints (`blocks.N.att.key.weight`, ...), except that
  `blocks.0.ln0` lives at `ln0`. Shapes come from a `RwkvConfig`, the time mix from its architecture.

It is the plain reference path. A fast runner (runtime.fast_path) can be attached from outside as `runner`:
`forward` and `decode_batch` then go through it under the same contract. It knows nothing of files, text or
devices beyond the tensors it is given, and nothing of any version: the architecture modules do.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import quant
from ..state import RwkvState
from .config import RwkvConfig
from .layers import LAYER_NORM_EPS, Padding, Projection, layer_norm

SEGMENT_TOKENS = 1024  # tokens read through all layers at once; bounds activation memory for long prompts


def empty_state(config: RwkvConfig, batch: int, device) -> RwkvState:
    """The state of a model that has read nothing: zero token shifts, the architecture's empty memory."""
    shift = torch.zeros(batch, config.n_layer, 2, config.n_embd, dtype=torch.float32, device=device)
    return RwkvState(shift, config.architecture.empty_wkv(config, batch, device))


class Block(nn.Module):
    def __init__(self, config: RwkvConfig, layer_id: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS)
        self.ln2 = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS)
        self.att = config.architecture.make_time_mix(config, layer_id)
        self.ffn = config.architecture.make_channel_mix(config)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, wkv: torch.Tensor, carry=None, last_only: bool = False,
                padding: Padding | None = None):
        """x: residual stream [B, T, C] fp32; shift: [B, 2, C]; wkv: this layer's memory; carry: what the
        previous layer's time mix hands on (RWKV-7's first-layer value, else None). last_only: return the
        stream of the last token alone [B, 1, C] (the last layer of a read whose only output is its last token):
        the channel mix then runs for that token only, its token shift read from the token before (same state).
        padding: the tokens after padding.last are padding (the time mix passes them, the new shifts are taken at
        padding.last; not with last_only)."""
        xx = layer_norm(x, self.ln1.weight, self.ln1.bias)
        real = {} if padding is None else {"real": padding.real}  # only architectures that read padding take it
        att, wkv, carry = self.att(xx, shift[:, 0], wkv, carry, **real)
        x = x + att
        if last_only and x.shape[1] > 1:
            x = x[:, -2:]  # the token before the last feeds the last one's shift
            xx2 = layer_norm(x, self.ln2.weight, self.ln2.bias)
            x = x[:, -1:] + self.ffn(xx2[:, -1:], xx2[:, -2])
        else:
            xx2 = layer_norm(x, self.ln2.weight, self.ln2.bias)
            x = x + self.ffn(xx2, shift[:, 1])
        if padding is not None:
            return x, padding.at_last([xx, xx2], 1), wkv, carry
        return x, torch.stack([xx[:, -1], xx2[:, -1]], dim=1), wkv, carry


class RwkvModel(nn.Module):
    """An RWKV language model. See the module docstring for the contract."""

    def __init__(self, config: RwkvConfig):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.ln0 = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS)
        self.head = Projection(config.n_embd, config.vocab_size)
        # Halve the residual stream after every `rescale_every` layers (fp16 guard); 0 = off. Set through
        # `enable_fp16_rescale`, which also scales the weights to match.
        self.rescale_every = 0
        # The fast runner the loader attaches (runtime.fast_path.attach_fast_path); None = the plain path below.
        self.runner = None

    # -------------------------------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the projections are stored in (torch.int8 for int8 weights, which compute in bf16/fp32; torch.int4
        for int4 ones, stored two a byte, whose model keeps its head in int8): that of the first layer's."""
        projection = next(module for module in self.blocks[0].modules() if isinstance(module, Projection))
        return quant.weight_format(projection.weight)

    def projection_weight_names(self) -> set[str]:
        """Names of the weights that are multiplied (`Projection`s): the only ones stored in a low-precision
        dtype. The embedding is looked up, not multiplied."""
        return {f"{name}.weight" for name, module in self.named_modules() if isinstance(module, Projection)}

    def lora_factor_names(self) -> set[str]:
        """Names of the time mixes' LoRA factors (their modules' LORA_FACTORS): fp32, or bf16 where
        layers.lora_storage_dtype says."""
        return {f"{name}.{factor}" for name, module in self.named_modules()
                for factor in getattr(module, "LORA_FACTORS", ()) if hasattr(module, factor)}

    def zero_state(self, batch: int = 1) -> RwkvState:
        return empty_state(self.config, batch, self.device)

    @torch.no_grad()
    def enable_fp16_rescale(self, every: int = 6) -> None:
        """Divide each layer's output projections by 2**(layer // every) and halve the residual stream after
        every `every` layers, so fp16 activations do not overflow (RWKV-4 World needs it). Call once, before a
        fast runner is attached (it packs the weights as they are then)."""
        if self.rescale_every:
            raise RuntimeError("fp16 rescaling is already enabled")
        if self.runner is not None:
            raise RuntimeError("rescale the weights before attaching the fast runner")
        for i, block in enumerate(self.blocks):
            factor = 2 ** (i // every)
            block.att.output.weight.div_(factor)
            block.ffn.value.weight.div_(factor)
        self.rescale_every = every

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
        return self.read_plain(ids, state, all_logits)

    def read_plain(self, ids: torch.Tensor, state: RwkvState, all_logits: bool = False):
        """The plain path of `forward`, whatever runner is attached: checked 1-D ids, a state of batch 1."""
        ids = ids.to(self.device)
        outputs = []
        for start in range(0, ids.numel(), SEGMENT_TOKENS):
            segment = ids[start:start + SEGMENT_TOKENS].unsqueeze(0)  # [1, T]
            hidden, state = self._read(segment, state, last_only=not all_logits)
            outputs.append(hidden[0] if all_logits else hidden[0, -1:])
        hidden = torch.cat(outputs) if all_logits else outputs[-1][0]
        return self._logits(hidden), state

    def read_padded(self, ids: torch.Tensor, state: RwkvState, valid: torch.Tensor):
        """A prompt padded at its end: ids [T] (T <= SEGMENT_TOKENS, on the model's device, all in range) whose first
        `valid` are the prompt (`valid` a long tensor [1] on the device, 1 <= valid <= T; the rest any tokens) ->
        (logits fp32 [vocab] after the prompt's last token, the state after it): what read_plain(ids[:valid])
        gives, up to the rounding of the products over more rows. The architecture's time mix passes the padding
        (`Architecture.reads_padded_prompts`); the shifts and logits are taken at the prompt's last token. No host
        sync, so one CUDA graph captured for T tokens reads every prompt of 1 to T tokens."""
        if not self.config.architecture.reads_padded_prompts:
            raise ValueError(f"{self.config.architecture.family} cannot read padded prompts")
        if not 1 <= ids.numel() <= SEGMENT_TOKENS:
            raise ValueError(f"a padded read takes 1 to {SEGMENT_TOKENS} tokens, got {ids.numel()}")
        padding = Padding.of(ids.numel(), valid.to(self.device).reshape(1))
        hidden, state = self._read(ids.to(self.device).reshape(1, -1), state, padding=padding)
        return self._logits(hidden[0].index_select(0, padding.last))[0], state

    @torch.no_grad()
    def decode_batch(self, tokens: torch.Tensor, state: RwkvState):
        """One token for each of B sequences: tokens [B] -> (logits fp32 [B, vocab], new batched state)."""
        ids = self._token_ids(tokens).reshape(-1, 1)
        state = self._prepare_state(state, batch=ids.shape[0])
        if self.runner is not None:
            return self.runner.decode(ids.reshape(-1), state)
        return self.decode_plain(ids.reshape(-1), state)

    def decode_plain(self, ids: torch.Tensor, state: RwkvState):
        """The plain path of `decode_batch` (ids [B], any device), whatever runner is attached; no host sync, so
        a CUDA graph can capture it."""
        hidden, state = self._read(ids.to(self.device).reshape(-1, 1), state)
        return self._logits(hidden[:, -1]), state

    def _read(self, ids: torch.Tensor, state: RwkvState, last_only: bool = False, padding: Padding | None = None):
        """Run [B, T] ids through every layer; returns (final hidden [B, T, C], or [B, 1, C] of the last token
        with last_only (the last layer's channel mix then runs for that token alone), new state). padding: the
        tokens after padding.last leave the state as it is (Block.forward)."""
        x = layer_norm(self.emb(ids).float(), self.ln0.weight, self.ln0.bias)
        shifts, wkvs, carry = [], [], None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x, shift, wkv, carry = block(x, state.shift[:, i], state.wkv[:, i], carry, last_only and i == last,
                                         padding)
            shifts.append(shift)
            wkvs.append(wkv)
            if self.rescale_every and (i + 1) % self.rescale_every == 0:
                x = x / 2
        return x, RwkvState(torch.stack(shifts, dim=1), torch.stack(wkvs, dim=1))

    def _logits(self, hidden: torch.Tensor, step: bool = False) -> torch.Tensor:
        """The head's logits of `hidden`; `step`: its rows are a decode step's (Projection.decode)."""
        hidden = layer_norm(hidden, self.ln_out.weight, self.ln_out.bias)
        return self.head.decode(hidden) if step else self.head(hidden)

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
            expected = empty_state(self.config, 0, "cpu")
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
