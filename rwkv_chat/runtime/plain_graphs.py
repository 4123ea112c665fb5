"""The runner for architectures the fast runner does not pack (`Architecture.fast_runner` False: RWKV-6/7) on
CUDA: the plain prefill, and a decode step captured in CUDA graphs.

Promises: `GraphedPlainRunner(model)` gives `decode(ids [B], state)` -> (logits [B, vocab], new state) replayed
from one graph per batch bucket, and `decode_into`, the same step from and into a batcher's own state buffers
(runtime/cuda_graphs.py; a decode step is hundreds to thousands of small kernels,
and launching them one by one is most of its time), and `prefill` = the plain path, prompts replayed from
CUDA graphs of it (runtime/prefill_graphs.py; their last piece padded where the architecture reads padding).
The step is the fused one (runtime/fused_decode.py: a few Triton kernels and packed products per layer) where
it runs, unless `use_triton=False`; else `model.decode_plain` itself. Either computes `model.decode_plain`'s
function (the fused one within the weight dtype's rounding). The state passed in is never changed. Knows nothing
of any architecture's math.
"""

from __future__ import annotations

import torch
from torch import nn

from ..state import RwkvState
from .cuda_graphs import GraphedDecoder
from .fused_decode import fused_decoder
from .prefill_graphs import GraphedPrefill


class GraphedPlainRunner:
    use_graphs = True

    def __init__(self, model: nn.Module, use_triton: bool | None = None):
        self.model = model
        self.device = model.device
        self.fused = fused_decoder(model) if use_triton is not False else None
        self._graphs = GraphedDecoder(self.fused.step if self.fused else self._plain_step, model.zero_state,
                                      self.device)
        padded = model.read_padded if model.config.architecture.reads_padded_prompts else None
        self._prompt_graphs = GraphedPrefill(self._prefill_last, model.zero_state, self.device, padded)

    def _plain_step(self, ids: torch.Tensor, shift: torch.Tensor, wkv: torch.Tensor, out: RwkvState | None = None):
        logits, state = self.model.decode_plain(ids, RwkvState(shift, wkv))
        if out is None:
            return logits, state
        out.shift.copy_(state.shift)
        out.wkv.copy_(state.wkv)
        return logits, out

    def decode(self, ids: torch.Tensor, state: RwkvState) -> tuple[torch.Tensor, RwkvState]:
        return self._graphs(ids, state)

    def decode_into(self, ids: torch.Tensor, source: RwkvState, target: RwkvState) -> torch.Tensor:
        """The step of the first len(ids) rows of `source` into the same rows of `target` (GraphedDecoder.into)."""
        return self._graphs.into(ids, source, target)

    def prefill(self, ids: torch.Tensor, state: RwkvState, all_logits: bool = False):
        if all_logits:
            return self.model.read_plain(ids, state, all_logits)
        return self._prompt_graphs(ids, state)

    def _prefill_last(self, ids: torch.Tensor, state: RwkvState):
        return self.model.read_plain(ids, state)
