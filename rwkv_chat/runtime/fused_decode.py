"""A decode step in fused Triton kernels and weight-streaming products, for the architectures whose time mix the
fast runner does not pack (`Architecture.fast_runner` False: RWKV-6 and RWKV-7).

What this module promises:
- `fused_decoder(model)` is a `FusedDecoder` when Triton runs on the model's device, its projections are float
  (fp32, bf16, fp16) or int8 (per-row scales; the products' inputs then in bf16, as the fast runner's) and its
  architecture has a fused time-mix core for its shape (`Architecture.pack_fused_time_mix`); else None (int4
  keeps the plain step).
- `FusedDecoder.step(ids [B], shift, wkv, out=None)` -> (logits fp32 [B, V], RwkvState) is `model.decode_plain`'s
  function within the rounding of the weight dtype (fp32 arithmetic; only the matrix operands in the weight
  dtype; from lora_triton.MANY_ROWS rows on, an architecture may round its LoRAs' operands to TF32 where that
  dtype is 16-bit or int8, as RWKV-7 does), the state written into `out` when given. It changes none of its
  inputs, synchronises nothing with the host, and is captured in CUDA graphs by its runner.
- Per layer: one kernel for the residual add, LayerNorm and every token-shift mix (triton_kernels.ln_mix); the
  architecture's time-mix core (RWKV-7: one product for r/k/v, two LoRA launches, one kernel for everything
  else; for fewer than SIDE_STREAM_ROWS rows, work that does not need the projections, as RWKV-7's LoRAs, runs on
  a second CUDA stream beside them: `SideStream`); the output product; one kernel for the channel mix's add,
  LayerNorm and mixes; its key (and receptance) product with relu² (in the product's last step for one row:
  packing.project_channel_mix) and the value product. The time-mix projections are packed into one matrix and
  the LoRAs into two, sharing memory with the model (packing.py, kernels/lora_triton.py).

It knows the block around the time mix (LayerNorms, residual stream, channel mix, fp16 halving), not any
architecture's time mix: that is the architecture's `fused_time_mix`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import lora_triton, triton_kernels
from ..models.architecture import FusedTimeMixPack
from ..models.layers import LAYER_NORM_EPS
from ..state import RwkvState
from .packing import PackedLinear, pack_projections, project, project_channel_mix

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTIVATION_DTYPES = {dtype: dtype for dtype in FLOAT_DTYPES} | {torch.int8: torch.bfloat16}  # products' inputs
# below this many rows the LoRA kernels are bound by their latency and run beside the projections (measured at one
# row); from it on they are GEMMs and stay in order (beside the projections' GEMMs: not measured)
SIDE_STREAM_ROWS = lora_triton.MANY_ROWS


@dataclass
class FusedLayer:
    ln1: tuple[torch.Tensor, torch.Tensor]
    ln2: tuple[torch.Tensor, torch.Tensor]
    time_mix: FusedTimeMixPack
    att: PackedLinear  # the time mix's packed projections
    out: PackedLinear
    ffn_mix: torch.Tensor  # [Q, C]
    ffn: PackedLinear  # key (, receptance)
    value: PackedLinear


def fused_decoder(model: nn.Module) -> FusedDecoder | None:
    """The model's fused decode step, or None where it cannot run (see the module docstring)."""
    config = model.config
    if model.dtype not in ACTIVATION_DTYPES or not triton_kernels.usable(model.device):
        return None
    packs = [config.architecture.pack_fused_time_mix(block.att, config) for block in model.blocks]
    return None if any(pack is None for pack in packs) else FusedDecoder(model, packs)


class SideStream:
    """A second CUDA stream for the work of a step that does not need the product running beside it: in a
    captured graph, a branch. `with side.branch():` runs its kernels after everything queued so far on the current
    stream, on the second one; `side.join()` makes the current stream wait for them. On a CPU both do nothing (the
    work then runs in order). What the branch allocates is reused only by later branches, which wait for the
    current stream first, so no tensor is reused while the other stream may still read it.

    Measured on an H200 (docs/PERFORMANCE.md, thirty-fourth session): RWKV-7's LoRA kernels beside its r|k|v product
    made a CUDA-graphed 7.2B decode step 4.8 % (bf16) to 7.5 % (int8) shorter, RWKV-6's decay LoRA 2.4-4.4 %, the
    same bits."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None

    @contextmanager
    def branch(self):
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            yield

    def join(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)


def _norm(layer_norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    return layer_norm.weight.detach().float(), layer_norm.bias.detach().float()


class FusedDecoder:
    """See the module docstring. Build it through `fused_decoder`."""

    def __init__(self, model: nn.Module, packs: list[FusedTimeMixPack]):
        self.architecture = model.config.architecture
        self.act_dtype = ACTIVATION_DTYPES[model.dtype]
        self.rescale_every = model.rescale_every
        self.emb = model.emb.weight
        self.ln0, self.ln_out = _norm(model.ln0), _norm(model.ln_out)
        self.layers = [self._pack_layer(block, pack) for block, pack in zip(model.blocks, packs)]
        self.head = pack_projections([model.head])
        self.side, self.in_order = SideStream(model.device), SideStream(model.device, enabled=False)

    def _pack_layer(self, block: nn.Module, pack: FusedTimeMixPack) -> FusedLayer:
        ffn_mix, ffn_projections = self.architecture.fused_channel_mix(block.ffn)
        return FusedLayer(_norm(block.ln1), _norm(block.ln2), pack, pack_projections(pack.projections),
                          pack_projections([block.att.output]), ffn_mix, pack_projections(ffn_projections),
                          pack_projections([block.ffn.value]))

    def _mix_buffers(self, batch: int, width: int, device) -> tuple[torch.Tensor | None, torch.Tensor]:
        pack = self.layers[0].time_mix
        n_matrix, n_fp32 = pack.matrix_mixes, pack.mixes.shape[0] - pack.fp32_from
        mixed = torch.empty((n_matrix, batch, width), device=device, dtype=self.act_dtype) if n_matrix else None
        return mixed, torch.empty((n_fp32, batch, width), device=device, dtype=torch.float32)

    def _ln_time_mix(self, x, layer: FusedLayer, shift, new_shift, mixed, mixed32, **residual) -> torch.Tensor:
        """x (+ the residual's delta) -> LayerNorm -> the time mix's mixes, into mixed / mixed32. Returns the
        residual (see triton_kernels.ln_mix)."""
        pack = layer.time_mix
        return triton_kernels.ln_mix(x, *layer.ln1, mixed, prev=shift, mix=pack.mixes, xx_out=new_shift,
                                     out32=mixed32, first32=pack.fp32_from, **residual)

    def step(self, ids: torch.Tensor, shift: torch.Tensor, wkv: torch.Tensor, out: RwkvState | None = None):
        """ids [B] on the model's device; shift [B, L, 2, C], wkv [B, L, ...] -> (logits fp32 [B, V], RwkvState),
        the state written into `out` when given (tensors shaped like shift and wkv, not the same ones)."""
        x = F.layer_norm(F.embedding(ids, self.emb).float(), self.ln0[0].shape, *self.ln0, LAYER_NORM_EPS)
        x = x.contiguous()
        batch, width = x.shape
        new_shift, new_wkv = (torch.empty_like(shift), torch.empty_like(wkv)) if out is None else (out.shift, out.wkv)
        mixed, mixed32 = self._mix_buffers(batch, width, x.device)
        side = self.side if batch < SIDE_STREAM_ROWS else self.in_order
        ffn_mixed = torch.empty((self.layers[0].ffn_mix.shape[0], batch, width), device=x.device,
                                dtype=self.act_dtype)
        carry = None
        x = self._ln_time_mix(x, self.layers[0], shift[:, 0, 0], new_shift[:, 0, 0], mixed, mixed32)
        for i, layer in enumerate(self.layers):
            y, carry = self.architecture.fused_time_mix(layer.time_mix, layer.att, project, mixed, mixed32,
                                                        new_shift[:, i, 0], shift[:, i, 0], wkv[:, i],
                                                        new_wkv[:, i], carry, self.act_dtype, side)
            (att_out,) = project(y.unsqueeze(0), layer.out)
            x = triton_kernels.ln_mix(x, *layer.ln2, ffn_mixed, prev=shift[:, i, 1], mix=layer.ffn_mix,
                                      xx_out=new_shift[:, i, 1], delta=att_out)
            hidden, receptance = project_channel_mix(ffn_mixed, layer.ffn, self.act_dtype)
            (value,) = project(hidden.unsqueeze(0), layer.value)
            residual = dict(delta=value, gate=receptance[0] if receptance else None,
                            halve=bool(self.rescale_every) and (i + 1) % self.rescale_every == 0)
            if i + 1 < len(self.layers):
                x = self._ln_time_mix(x, self.layers[i + 1], shift[:, i + 1, 0], new_shift[:, i + 1, 0],
                                      mixed, mixed32, **residual)
            else:
                final = torch.empty((1, batch, width), device=x.device, dtype=self.act_dtype)
                triton_kernels.ln_mix(x, *self.ln_out, final, **residual)
        (logits,) = project(final, self.head)
        logits = logits[0] if logits.shape[0] == 1 else logits.sum(0)
        return logits.float(), RwkvState(new_shift, new_wkv)
