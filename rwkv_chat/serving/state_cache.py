"""A prefix-state cache: token sequence -> (RNN state after it, logits of its last token).

What it promises:
- `longest_prefix(ids)` finds the longest cached sequence that `ids` starts with, so a caller only reads the
  tokens after it (retry, undo and edit restore an earlier state instead of re-reading the chat).
- Memory is bounded: entries are evicted least-recently-used once their bytes exceed `max_bytes`; pinned
  entries (a preamble shared by every session) are never evicted.
- States are kept on the CPU (off the GPU while idle) and handed out as copies on the requested device, so
  no caller can change what another one gets.
- Safe to use from many threads.

It knows nothing of models or text: only token tuples and tensors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..state import RwkvState


@dataclass(frozen=True)
class CachedPrefix:
    length: int  # how many leading tokens of the query this entry covers
    state: RwkvState  # on the requested device, a private copy
    logits: torch.Tensor  # [vocab] fp32, the prediction after the last covered token


@dataclass
class _Entry:
    state: RwkvState
    logits: torch.Tensor
    pinned: bool

    @property
    def nbytes(self) -> int:
        return self.state.nbytes + self.logits.numel() * self.logits.element_size()


class StateCache:
    def __init__(self, max_bytes: int = 512 * 2**20, storage_device: str = "cpu"):
        self.max_bytes = max_bytes
        self.storage_device = torch.device(storage_device)
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, ids, state: RwkvState, logits: torch.Tensor, pinned: bool = False) -> None:
        """Remember the state after `ids` (and the logits after its last token)."""
        key = tuple(int(i) for i in ids)
        if not key:
            raise ValueError("cannot cache the state of an empty sequence")
        entry = _Entry(state.to(self.storage_device).clone(), logits.detach().to(self.storage_device).clone(),
                       pinned)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
                entry.pinned = entry.pinned or old.pinned
            self._entries[key] = entry
            self._bytes += entry.nbytes
            self._evict()

    def longest_prefix(self, ids, device: torch.device | str | None = None) -> CachedPrefix | None:
        """The longest cached sequence that `ids` starts with (itself included), or None."""
        query = tuple(int(i) for i in ids)
        with self._lock:
            best = None
            for key in self._entries:
                if len(key) <= len(query) and (best is None or len(key) > len(best)) and query[:len(key)] == key:
                    best = key
            if best is None:
                return None
            self._entries.move_to_end(best)
            entry = self._entries[best]
        target = device if device is not None else self.storage_device
        return CachedPrefix(len(best), entry.state.to(target).clone(), entry.logits.to(target).clone())

    def clear(self, keep_pinned: bool = True) -> None:
        with self._lock:
            for key in [k for k, e in self._entries.items() if not (keep_pinned and e.pinned)]:
                self._bytes -= self._entries.pop(key).nbytes

    def _evict(self) -> None:
        for key in list(self._entries):
            if self._bytes <= self.max_bytes:
                return
            if not self._entries[key].pinned:
                self._bytes -= self._entries.pop(key).nbytes
