"""Loaded models shared by every session of the app: an LRU pool of chat engines keyed by `ModelKey`.

Promises:
- `get(key)` returns the `ChatEngine` for a key, loading it first if needed. Loads of different keys run in
  parallel and never hold the pool's lock, so sessions keep chatting with models already loaded while
  another one loads; two sessions asking for the same key share one load.
- Models stay loaded while memory allows. Before a load, the least recently used models on the same kind of
  device are evicted (and their batchers closed) until the new model's estimated memory fits what the
  device has free; if it could not fit even with every other model gone, the load is refused with a
  ModelLoadError saying so, and nothing is evicted. A model evicted while a chat still uses it is freed
  when that answer ends.
- The last load error of each key is kept for status lines (e.g. the hub was unreachable), and cleared by a
  later successful load.
Knows nothing of Gradio or of sessions.
"""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..loading.loader import DTYPES, ModelLoadError
from .model_choices import ModelChoices, ModelKey, free_memory, gigabytes

Progress = Callable[[str], None]
EngineFactory = Callable[[ModelKey, Progress], object]


@dataclass
class _Slot:
    engine: object
    nbytes: int


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


class ModelPool:
    def __init__(self, choices: ModelChoices, factory: EngineFactory,
                 memory: Callable[[str], tuple[int, int]] = free_memory):
        self.choices = choices
        self._factory = factory
        self._memory = memory
        self._loaded: OrderedDict[ModelKey, _Slot] = OrderedDict()
        self._errors: dict[ModelKey, str] = {}
        self._loading: set[ModelKey] = set()
        self._key_locks: dict[ModelKey, threading.Lock] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------ queries
    def peek(self, key: ModelKey):
        """The engine if `key` is loaded now (marks it recently used), else None. Never loads."""
        with self._lock:
            slot = self._loaded.get(key)
            if slot is not None:
                self._loaded.move_to_end(key)
            return slot.engine if slot is not None else None

    def loaded_keys(self) -> list[ModelKey]:
        with self._lock:
            return list(self._loaded)

    def error(self, key: ModelKey) -> Optional[str]:
        with self._lock:
            return self._errors.get(key)

    def is_loading(self, key: ModelKey) -> bool:
        with self._lock:
            return key in self._loading

    def reclaimable_bytes(self, device: str) -> int:
        """Estimated bytes held by loaded models on `device`'s kind (what evicting them could free)."""
        kind = torch.device(device).type
        with self._lock:
            return sum(slot.nbytes for key, slot in self._loaded.items() if torch.device(key.device).type == kind)

    # ------------------------------------------------------------------------------------ loading
    def get(self, key: ModelKey, progress: Optional[Progress] = None):
        engine = self.peek(key)
        if engine is not None:
            return engine
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one load per key; other keys load in parallel
            engine = self.peek(key)
            if engine is not None:
                return engine
            return self._load(key, progress or (lambda stage: None))

    def _load(self, key: ModelKey, progress: Progress):
        with self._lock:
            self._loading.add(key)
        try:
            self._make_room(key)
            engine = self._factory(key, progress)
        except Exception as error:  # kept for status lines, then raised to the caller
            with self._lock:
                self._errors[key] = str(error) or type(error).__name__
            raise
        finally:
            with self._lock:
                self._loading.discard(key)
        with self._lock:
            self._loaded[key] = _Slot(engine, self._need(key) or model_bytes(engine.model))
            self._errors.pop(key, None)
        return engine

    def _need(self, key: ModelKey) -> Optional[int]:
        return self.choices.get(key.choice).memory_bytes(DTYPES[key.dtype])

    def _make_room(self, key: ModelKey) -> None:
        """Evict least recently used models until `key` fits; refuse (evicting nothing) if it never could."""
        need = self._need(key)
        if need is None:
            return
        free, _total = self._memory(key.device)
        if need > free + self.reclaimable_bytes(key.device):
            raise ModelLoadError(
                f"{self.choices.get(key.choice).name} needs about {gigabytes(need)} in {key.dtype} but only "
                f"{gigabytes(free)} is free on {key.device} (other loaded models included); pick a smaller "
                "model, another precision (bf16/fp16 halve fp32) or another device")
        while need > free and self._evict_one(key):
            free, _total = self._memory(key.device)

    def _evict_one(self, keep: ModelKey) -> bool:
        kind = torch.device(keep.device).type
        with self._lock:
            victim = next((k for k in self._loaded if k != keep and torch.device(k.device).type == kind), None)
            slot = self._loaded.pop(victim) if victim is not None else None
        if slot is None:
            return False
        _close_decoder(slot.engine)
        del slot
        gc.collect()
        if kind == "cuda":
            torch.cuda.empty_cache()
        return True

    def preload(self, key: ModelKey) -> threading.Thread:
        """Start loading `key` in the background (errors are kept for `error(key)`)."""
        def run():
            try:
                self.get(key)
            except Exception:  # noqa: BLE001 - recorded in self._errors for the page to show
                pass
        thread = threading.Thread(target=run, name=f"preload {key.choice}", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """Drop every model (closing batchers)."""
        with self._lock:
            slots = list(self._loaded.values())
            self._loaded.clear()
        for slot in slots:
            _close_decoder(slot.engine)


def _close_decoder(engine) -> None:
    close = getattr(getattr(engine, "decoder", None), "close", None)
    if close is not None:
        close()
