"""Decode steps on CPUs for the architectures the fast runner does not pack (RWKV-6, 7): one C++ call a step.

What this module promises:
- `CpuStepRunner.runs(model)` says whether a model can take it: a CPU model whose architecture has a whole-layer
  C++ step (`Architecture.cpu_layer_tensors`, `cpu_kernel_id`) with weights the C++ kernels read
  (kernels/cpu_kernels.py built).
- `CpuStepRunner(model)` is a runner (model.runner): `prefill` is the model's plain path (its parallel chunked
  form), `decode(ids [B], state)` runs every layer of one token for B sequences in one call of cpu_kernels'
  DecodeStack, the architecture's C++ layer step a layer (its LoRAs, recurrence and norms in fp32 arithmetic,
  its products streaming the weights and the LoRA factors as stored: fp32, or bf16 where
  layers.lora_storage_dtype keeps them so), the same function as the plain decode step up to fp32 rounding
  (tested against it). States passed in are never changed.
  Where the head's product streams through the C++ kernels (quant.decode_streams: int8/int4 heads, bf16/fp16
  ones on CPUs without units for them) and the rows are fewer than quant.STREAM_ROWS, the embedding, ln0, ln_out
  and the head run in that same call (`stack_ends`): a step is then one call from token ids to logits.
  `decode_into(ids, source, target)` writes the new states of the first B rows into `target`'s rows (a
  batcher's state buffers) instead of new tensors.
  The layers' tensors are views of the model's own parameters: nothing is copied.

It knows the runner interface and the architecture's CPU hooks, not any version's arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import cpu_kernels, quant
from ..models.layers import layer_norm
from ..state import RwkvState


def stack_ends(embedding: torch.Tensor, ln0: tuple[torch.Tensor, torch.Tensor],
               ln_out: tuple[torch.Tensor, torch.Tensor], head: torch.Tensor,
               head_scale: torch.Tensor | None) -> list[torch.Tensor] | None:
    """What a DecodeStack needs to run a whole step from token ids (cpu_kernels.DecodeStack's `ends`), where the
    head's decode product is the C++ kernels' own (quant.decode_streams), else None: the step then ends in
    Python (the head through quant.decode_linear), as a step of many rows always does."""
    if not quant.decode_streams(torch.empty(1, head.shape[-1] * (2 if head.dtype == quant.INT4_STORAGE else 1)),
                                head):
        return None
    flat = lambda t: t.detach().float().reshape(-1).contiguous()  # noqa: E731
    return [embedding.detach(), flat(ln0[0]), flat(ln0[1]), flat(ln_out[0]), flat(ln_out[1]), head.detach(),
            torch.empty(0) if head_scale is None else head_scale.detach()]


class CpuStepRunner:
    """The plain prefill and a decode step in one C++ call (see the module docstring)."""

    @staticmethod
    def runs(model: nn.Module) -> bool:
        return (model.device.type == "cpu" and cpu_kernels.handles_dtype(model.dtype)
                and model.config.architecture.cpu_layer_tensors(model.blocks[0]) is not None)

    def __init__(self, model: nn.Module):
        if not self.runs(model):
            raise ValueError("CpuStepRunner needs a CPU model whose architecture has a C++ decode step, with the "
                             "C++ kernels built")
        self.model = model
        self.architecture = model.config.architecture
        self.layers = [self.architecture.cpu_layer_tensors(block) for block in model.blocks]
        ends = stack_ends(model.emb.weight, (model.ln0.weight, model.ln0.bias),
                          (model.ln_out.weight, model.ln_out.bias), *model.head.stored())
        self.cpu_stack = cpu_kernels.DecodeStack(self.layers, self.architecture.cpu_kernel_id, ends=ends)

    def prefill(self, ids: torch.Tensor, state: RwkvState, all_logits: bool = False):
        return self.model.read_plain(ids, state, all_logits)

    def decode(self, ids: torch.Tensor, state: RwkvState):
        """ids [B] -> (logits fp32 [B, V], new state)."""
        return self._step(ids, state, RwkvState(torch.empty_like(state.shift), torch.empty_like(state.wkv)))

    def decode_into(self, ids: torch.Tensor, source: RwkvState, target: RwkvState) -> torch.Tensor:
        """The step of the first B = len(ids) rows of `source` written into the same rows of `target` (never the
        same tensors) -> logits fp32 [B, V]."""
        rows = ids.shape[0]
        return self._step(ids, source.leading(rows), target.leading(rows))[0]

    @torch.no_grad()
    def _step(self, ids: torch.Tensor, state: RwkvState, out: RwkvState):
        model = self.model
        if self.cpu_stack.whole and 0 < ids.numel() < quant.STREAM_ROWS:
            logits = self.cpu_stack.logits(ids.reshape(-1).to(torch.long).contiguous(), state.shift, state.wkv,
                                           out.shift, out.wkv, model.rescale_every)
            return logits, RwkvState(out.shift, out.wkv)
        x = layer_norm(model.emb(ids.reshape(-1)).float(), model.ln0.weight, model.ln0.bias).contiguous()
        # x is this step's own tensor: the layers write their outputs over it
        x = self.cpu_stack.step(x, state.shift, state.wkv, out.shift, out.wkv, model.rescale_every)
        return model._logits(x, step=True), RwkvState(out.shift, out.wkv)
