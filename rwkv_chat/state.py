"""The RNN state of an RWKV model as one named, immutable-by-convention object.

An `RwkvState` holds everything a model remembers about the tokens it has read, for a batch of B
independent sequences:

- `shift`  [B, L, 2, C] fp32: the previous token's normalised input to the time mix (index 0) and to the
  channel mix (index 1) of every layer (the "token shift").
- `wkv`    the time-mix memory of every layer, fp32:
  v4: [B, L, 3, C] holding (aa, bb, pp): numerator, denominator and their common log-scale;
  v5: [B, L, H, S, S] holding per head the key-by-value matrix.

Nothing in this package changes a state in place: the model returns new states. That is what lets the
engine branch from a cached state (retry, edit) and share a preamble state between users. This module knows
nothing of the model's weights, only of shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Initial log-scale of an empty v4 numerator/denominator: e^-1e30 is exactly 0 in fp32.
V4_EMPTY_LOG_SCALE = -1e30


@dataclass(frozen=True)
class RwkvState:
    """A batch of RNN states. Build one with `RwkvState.zeros` or `model.zero_state()`."""

    shift: torch.Tensor  # [B, L, 2, C]
    wkv: torch.Tensor  # v4: [B, L, 3, C]; v5: [B, L, H, S, S]

    @staticmethod
    def zeros(version: str, n_layer: int, n_embd: int, n_head: int, head_size: int,
              batch: int = 1, device: torch.device | str | None = None) -> "RwkvState":
        """The state of a model that has read nothing."""
        shift = torch.zeros(batch, n_layer, 2, n_embd, dtype=torch.float32, device=device)
        if version == "4":
            wkv = torch.zeros(batch, n_layer, 3, n_embd, dtype=torch.float32, device=device)
            wkv[:, :, 2] = V4_EMPTY_LOG_SCALE
        else:
            wkv = torch.zeros(batch, n_layer, n_head, head_size, head_size,
                              dtype=torch.float32, device=device)
        return RwkvState(shift, wkv)

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
