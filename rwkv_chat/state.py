"""The RNN state of an RWKV model as one named, immutable-by-convention object.

An `RwkvState` holds everything a model remembers about the tokens it has read, for a batch of B
independent sequences:

- `shift`  [B, L, 2, C] fp32: the previous token's normalised input to the time mix (index 0) and to the
  channel mix (index 1) of every layer (the "token shift").
- `wkv`    the time-mix memory of every layer, fp32, [B, L, ...] in the layout of the model's architecture
  (models/rwkv4.py: [B, L, 3, C]; models/rwkv5.py: [B, L, H, S, S]); `models.model.empty_state` builds an empty one.

Nothing in this package changes a state in place: the model returns new states. That is what lets the
engine branch from a cached state (retry, edit) and share a preamble state between users. This module knows
nothing of the model's weights or architecture, only of two tensors with a batch dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RwkvState:
    """A batch of RNN states. Build an empty one with `model.zero_state()`."""

    shift: torch.Tensor  # [B, L, 2, C]
    wkv: torch.Tensor  # [B, L, ...]: the architecture's time-mix memory

    @property
    def batch_size(self) -> int:
        return self.shift.shape[0]

    @property
    def device(self) -> torch.device:
        return self.shift.device

    @property
    def nbytes(self) -> int:
        """Bytes held by this state's tensors."""
        return sum(t.numel() * t.element_size() for t in (self.shift, self.wkv))

    def clone(self) -> "RwkvState":
        return RwkvState(self.shift.clone(), self.wkv.clone())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "RwkvState":
        return RwkvState(self.shift.to(device, non_blocking=non_blocking),
                         self.wkv.to(device, non_blocking=non_blocking))

    def __getitem__(self, index: int) -> "RwkvState":
        """The state of one sequence of the batch, as a batch of one (a view: clone it to keep it)."""
        if not -self.batch_size <= index < self.batch_size:
            raise IndexError(f"state index {index} out of range for batch {self.batch_size}")
        index %= self.batch_size
        return RwkvState(self.shift[index:index + 1], self.wkv[index:index + 1])

    def leading(self, rows: int) -> "RwkvState":
        """The first `rows` sequences of the batch (views: writing them writes this state's tensors)."""
        return RwkvState(self.shift[:rows], self.wkv[:rows])

    def unstack(self) -> list["RwkvState"]:
        """Split a batch into independent batch-1 states (copies)."""
        return [self[i].clone() for i in range(self.batch_size)]

    def select(self, rows: torch.Tensor) -> "RwkvState":
        """The sequences at `rows` (batch indices, a LongTensor on this device), in that order (copies)."""
        return RwkvState(self.shift.index_select(0, rows), self.wkv.index_select(0, rows))

    @staticmethod
    def stack(states: list["RwkvState"]) -> "RwkvState":
        """Join states (each of any batch size, same model) into one batch, in order."""
        if not states:
            raise ValueError("cannot stack an empty list of states")
        return RwkvState(torch.cat([s.shift for s in states]), torch.cat([s.wkv for s in states]))

    def equal(self, other: "RwkvState") -> bool:
        """Exact equality of every number (for tests and cache checks)."""
        return torch.equal(self.shift, other.shift) and torch.equal(self.wkv, other.wkv)
