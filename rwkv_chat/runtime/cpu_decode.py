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
  `decode_into(ids, source, target)` writes the new states of the first B rows into `target`'s rows (a
  batcher's state buffers) instead of new tensors.
  The layers' tensors are views of the model's own parameters: nothing is copied.

It knows the runner interface and the architecture's CPU hooks, not any version's arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import cpu_kernels
from ..models.layers import layer_norm
from ..state import RwkvState


class CpuStepRunner:
    """The plain prefill and a C++ decode step a layer (see the module docstring)."""

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
        self.cpu_stack = cpu_kernels.DecodeStack(self.layers, self.architecture.cpu_kernel_id)

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
        x = layer_norm(model.emb(ids.reshape(-1)).float(), model.ln0.weight, model.ln0.bias).contiguous()
        # x is this step's own tensor: the layers write their outputs over it
        x = self.cpu_stack.step(x, state.shift, state.wkv, out.shift, out.wkv, model.rescale_every)
        return model._logits(x, step=True), RwkvState(out.shift, out.wkv)
