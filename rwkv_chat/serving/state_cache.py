"""A prefix-state cache: token sequence -> (RNN state after it, logits of its last token).

What it promises:
- `longest_prefix(ids)` finds the longest cached sequence that `ids` starts with, so a caller only reads the
  tokens after it (retry, undo and edit restore an earlier state instead of re-reading the chat). The keys live
  in a radix tree of token runs, so a lookup walks the query once: its time grows with the query's length,
  never with the number of entries.
- Memory is bounded: everything the cache keeps counts against `max_bytes` (states, logits, the keys' tokens at
  4 bytes each and a fixed cost per tree node); entries are evicted least-recently-used beyond it; pinned entries
  (a preamble shared by every session, a start state) are never evicted.
- States are kept on the CPU (off the GPU while idle) and handed out as copies on the requested device, so
  no caller can change what another one gets. On the CPU each entry's tensors lie in a memory mapping of their
  own, unmapped when the entry is evicted: the allocator's heap never holds the cache's blocks, so a long day of
  evictions leaves no holes there (glibc kept them: +174 KiB of RSS a turn, docs/PERFORMANCE.md, "Load and
  soak"), and the process keeps glibc's defaults, under which a prompt's temporaries are reused from the heap
  rather than mapped and faulted in afresh each time.
- Safe to use from many threads.

It knows nothing of models or text: only token sequences (ints; negative ones are fine) and tensors.
"""

from __future__ import annotations

import mmap
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

from ..state import RwkvState

NODE_BYTES = 256  # what one tree node costs beyond its tokens (objects, dict slots), counted against the budget


ALIGN = 64  # bytes between the tensors of one entry's mapping


def kept_copies(tensors: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Copies of `tensors` on `device` for the cache to keep. On the CPU they share one anonymous mapping of their
    own (one map per entry, far below the system's limit on maps), which goes back to the system when the last of
    them is freed (torch.frombuffer holds the mapping for each tensor's life); where no mapping can be made (the
    limit reached, no memory), ordinary copies."""
    if torch.device(device).type != "cpu":
        return [t.detach().to(device).clone() for t in tensors]
    offsets, size = [], 0
    for t in tensors:
        offsets.append(size)
        size += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    try:
        mapping = mmap.mmap(-1, max(size, 1))
    except OSError:
        return [t.detach().clone() for t in tensors]
    return [torch.frombuffer(mapping, dtype=t.dtype, count=t.numel(), offset=offset).view(t.shape).copy_(t.detach())
            if t.numel() else t.detach().clone() for t, offset in zip(tensors, offsets)]


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


class _Node:
    """A radix-tree node: `label` is the run of tokens on the edge into it."""

    __slots__ = ("label", "children", "entry", "parent")

    def __init__(self, label: array, parent: Optional["_Node"]):
        self.label, self.parent = label, parent
        self.children: dict[int, _Node] = {}
        self.entry: Optional[_Entry] = None

    @property
    def nbytes(self) -> int:
        return NODE_BYTES + self.label.itemsize * len(self.label)


def _common(a: array, b: array) -> int:
    """Length of the common prefix of two token runs."""
    size = min(len(a), len(b))
    if a[:size] == b[:size]:
        return size
    low, high = 0, size  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle
    return low


class StateCache:
    def __init__(self, max_bytes: int = 512 * 2**20, storage_device: str = "cpu"):
        self.max_bytes = max_bytes
        self.storage_device = torch.device(storage_device)
        self._root = _Node(array("i"), None)
        self._lru: OrderedDict[_Node, None] = OrderedDict()  # nodes holding an entry, least recent first
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, ids, state: RwkvState, logits: torch.Tensor, pinned: bool = False) -> None:
        """Remember the state after `ids` (and the logits after its last token)."""
        key = array("i", (int(i) for i in ids))
        if not key:
            raise ValueError("cannot cache the state of an empty sequence")
        shift, wkv, kept_logits = kept_copies([state.shift, state.wkv, logits], self.storage_device)
        entry = _Entry(RwkvState(shift, wkv), kept_logits, pinned)
        with self._lock:
            node = self._insert(key)
            if node.entry is not None:
                self._bytes -= node.entry.nbytes
                entry.pinned = entry.pinned or node.entry.pinned
            node.entry = entry
            self._bytes += entry.nbytes
            self._lru[node] = None
            self._lru.move_to_end(node)
            self._evict()

    def longest_prefix(self, ids, device: torch.device | str | None = None) -> CachedPrefix | None:
        """The longest cached sequence that `ids` starts with (itself included), or None."""
        query = array("i", (int(i) for i in ids))
        with self._lock:
            node, depth, best, best_depth = self._root, 0, None, 0
            while depth < len(query):
                child = node.children.get(query[depth])
                if child is None or query[depth:depth + len(child.label)] != child.label:
                    break
                node, depth = child, depth + len(child.label)
                if node.entry is not None:
                    best, best_depth = node, depth
            if best is None:
                return None
            self._lru.move_to_end(best)
            entry = best.entry
        target = device if device is not None else self.storage_device
        return CachedPrefix(best_depth, entry.state.to(target).clone(), entry.logits.to(target).clone())

    def clear(self, keep_pinned: bool = True) -> None:
        with self._lock:
            for node in [n for n in self._lru if not (keep_pinned and n.entry.pinned)]:
                self._remove(node)

    # ------------------------------------------------------------------------------------ the tree
    def _insert(self, key: array) -> _Node:
        node, depth = self._root, 0
        while depth < len(key):
            child = node.children.get(key[depth])
            if child is None:
                leaf = _Node(key[depth:], node)
                node.children[key[depth]] = leaf
                self._bytes += leaf.nbytes
                return leaf
            shared = _common(child.label, key[depth:])
            if shared < len(child.label):  # split the edge: a new node where the key leaves it
                middle = _Node(child.label[:shared], node)
                node.children[key[depth]] = middle
                self._bytes += middle.nbytes - shared * child.label.itemsize
                child.label, child.parent = child.label[shared:], middle
                middle.children[child.label[0]] = child
                child = middle
            node, depth = child, depth + shared
        return node

    def _remove(self, node: _Node) -> None:
        """Drop the node's entry, then the nodes that no longer hold or lead to one."""
        self._bytes -= node.entry.nbytes
        node.entry = None
        del self._lru[node]
        while node is not self._root and node.entry is None and len(node.children) <= 1:
            parent = node.parent
            if node.children:  # one child: merge it into this edge
                (child,) = node.children.values()
                parent.children[node.label[0]] = child
                child.label, child.parent = node.label + child.label, parent
                self._bytes -= NODE_BYTES
                return
            del parent.children[node.label[0]]
            self._bytes -= node.nbytes
            node = parent

    def _evict(self) -> None:
        for node in list(self._lru):
            if self._bytes <= self.max_bytes:
                return
            if not node.entry.pinned:
                self._remove(node)
