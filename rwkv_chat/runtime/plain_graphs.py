"""The runner for architectures without packed kernels yet (`Architecture.fast_runner` False) on CUDA: the
model's own plain decode step, captured in CUDA graphs.

Promises: `GraphedPlainRunner(model)` gives `decode(ids [B], state)` -> (logits [B, vocab], new state), exactly
`model.decode_plain` but replayed from one graph per batch bucket (runtime/cuda_graphs.py; a plain decode step
is thousands of small kernels, and launching them one by one is most of its time), and `prefill` = the plain
path. The state passed in is never changed. Knows nothing of any architecture's math.
"""

from __future__ import annotations

import torch
from torch import nn

from ..state import RwkvState
from .cuda_graphs import GraphedDecoder


class GraphedPlainRunner:
    use_graphs = True

    def __init__(self, model: nn.Module):
        self.model = model
        self.device = model.device
        self._graphs = GraphedDecoder(self._step, model.zero_state, self.device)

    def _step(self, ids: torch.Tensor, shift: torch.Tensor, wkv: torch.Tensor):
        return self.model.decode_plain(ids, RwkvState(shift, wkv))

    def decode(self, ids: torch.Tensor, state: RwkvState) -> tuple[torch.Tensor, RwkvState]:
        return self._graphs(ids, state)

    def prefill(self, ids: torch.Tensor, state: RwkvState, all_logits: bool = False):
        return self.model.read_plain(ids, state, all_logits)
