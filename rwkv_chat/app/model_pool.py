"""Loaded models shared by every session of the app: an LRU pool of chat engines keyed by `ModelKey`.

Promises:
- `get(key)` returns the `ChatEngine` for a key, loading it first if needed. Loads of different keys run in
  parallel and never hold the pool's lock, so sessions keep chatting with models already loaded while
  another one loads; two sessions asking for the same key share one load.
- Models stay loaded while memory allows. Before a load, the least recently used models on the same kind of device
  are evicted (and closed: their batchers, their engine processes) until the new model's estimated memory (every
  copy's, with engine processes) fits what the device has free; if it could not fit even with every other model
  gone, the load is refused with a ModelLoadError saying so, and nothing is evicted. A model evicted while a chat
  still uses it is freed when that answer ends.
- The last load error of each key is kept for status lines (e.g. the hub was unreachable), and cleared by a
  later successful load.
- Loads by visitors are rate-limited by a `LoadCooldown` (--load-cooldown): once a visitor's request has
  started loading a model that was neither loaded nor loading, another such load is refused with `LoadRefused`
  (a ModelLoadError naming the setting, its bound and the seconds left) until the cooldown has passed. Models
  already loaded or loading are always served; the operator's preload (`preload(key, by_visitor=False)`) does
  not count, and neither do later reloads of that key. A refused load evicts nothing and is not kept as the
  key's load error; a load refused because the model could never fit does not start the cooldown.
- `chat_capacity(choice, device, dtype, processes)`: how many chats can generate at once with that model there (the
  app's default --concurrency): on a GPU, the chats whose states (STATE_COPIES_PER_CHAT copies each: the batcher's
  ring of three, the prefix cache, prompts and replies in flight) fit in CAPACITY_SHARE of the memory left beside
  the model, as a power of two (a CUDA graph bucket) up to config.MAX_CONCURRENCY; CPU_CHATS on a CPU for each
  engine process (a CPU step's time grows with the batch, so more rows buy little there); GPU_CHATS_UNKNOWN when the
  model's shape is unknown before it loads (a hub id, a directory; an operator's .pth file is read for it).
Knows nothing of Gradio or of sessions.
"""

from __future__ import annotations

import gc
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..loading.loader import DTYPES, ModelLoadError, resolve_device_dtype
from .config import MAX_CONCURRENCY
from .model_choices import ModelChoices, ModelKey, free_memory, gigabytes

CPU_CHATS = 8
GPU_CHATS_UNKNOWN = 32
STATE_COPIES_PER_CHAT = 8  # 3 in the batcher's ring, 1 cached, the rest for prompts read and replies ended meanwhile
CAPACITY_SHARE = 0.5  # of the memory free beside the model: the rest for prefill activations, other models

Progress = Callable[[str], None]
EngineFactory = Callable[[ModelKey, Progress], object]


def chat_capacity(choice, device: str, dtype: str, processes: int = 1,
                  memory: Callable[[str], tuple[int, int]] = free_memory) -> int:
    """How many chats can generate at once with `choice` on `device` in `dtype` (see the module docstring)."""
    try:
        placed_on, placed_as = resolve_device_dtype(device, dtype)
    except ModelLoadError:
        return CPU_CHATS
    if placed_on.type != "cuda":
        return CPU_CHATS * processes
    need = choice.memory_bytes(placed_as)
    state_bytes = choice.state_bytes()
    if state_bytes is None or need is None:
        return GPU_CHATS_UNKNOWN
    free, _total = memory(str(placed_on))
    room = (free - need) * CAPACITY_SHARE
    chats = int(room // (STATE_COPIES_PER_CHAT * state_bytes)) if room > 0 else 1
    chats = max(1, min(MAX_CONCURRENCY, chats))
    return 1 << (chats.bit_length() - 1)  # a power of two: every row of the largest graph bucket is used


@dataclass
class _Slot:
    engine: object
    nbytes: int


class LoadRefused(ModelLoadError):
    """A visitor's load came too soon after the last one (--load-cooldown); `retry_after` is in whole seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class LoadCooldown:
    """At most one visitor-started load every `seconds` (0: no limit). Thread-safe; `clock` is injectable."""

    def __init__(self, seconds: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.seconds, self._clock = seconds, clock
        self._last: Optional[float] = None  # when the last counted load started
        self._lock = threading.Lock()

    def check(self) -> None:
        """LoadRefused if a load started now would be refused; records nothing."""
        with self._lock:
            self._refuse_if_early(self._clock())

    def claim(self) -> None:
        """Count a load starting now, or refuse it (LoadRefused): one atomic step."""
        with self._lock:
            now = self._clock()
            self._refuse_if_early(now)
            self._last = now

    def _refuse_if_early(self, now: float) -> None:
        if self._last is None or now - self._last >= self.seconds:
            return
        ago, left = now - self._last, self.seconds - (now - self._last)
        raise LoadRefused(f"another model was loaded {int(ago)} s ago; this server loads a new model at most once "
                          f"every {self.seconds:g} s (--load-cooldown); try again in {math.ceil(left)} s, or use "
                          "a model that is already loaded", math.ceil(left))


class ModelPool:
    def __init__(self, choices: ModelChoices, factory: EngineFactory,
                 memory: Callable[[str], tuple[int, int]] = free_memory, cooldown: Optional[LoadCooldown] = None):
        self.choices = choices
        self._factory = factory
        self._memory = memory
        self._cooldown = cooldown or LoadCooldown()
        self._operator_keys: set[ModelKey] = set()  # preloaded by the operator: their loads never count
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
    def get(self, key: ModelKey, progress: Optional[Progress] = None, by_visitor: bool = True):
        """The engine for `key`, loaded first if needed; a load a visitor starts counts for the cooldown."""
        engine = self.peek(key)
        if engine is not None:
            return engine
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one load per key; other keys load in parallel
            engine = self.peek(key)
            if engine is not None:
                return engine
            return self._load(key, progress or (lambda stage: None), by_visitor)

    def _counts(self, key: ModelKey, by_visitor: bool) -> bool:
        with self._lock:
            return by_visitor and key not in self._operator_keys

    def _load(self, key: ModelKey, progress: Progress, by_visitor: bool):
        with self._lock:
            self._loading.add(key)
        try:
            need = self._check_fits(key)
            if self._counts(key, by_visitor):
                self._cooldown.claim()
            self._make_room(key, need)
            engine = self._factory(key, progress)
        except LoadRefused:  # not the key's fault: the next visitor may load it once the cooldown has passed
            raise
        except Exception as error:  # kept for status lines, then raised to the caller
            with self._lock:
                self._errors[key] = str(error) or type(error).__name__
            raise
        finally:
            with self._lock:
                self._loading.discard(key)
        with self._lock:
            self._loaded[key] = _Slot(engine, self._need(key) or engine.model_bytes)
            self._errors.pop(key, None)
        return engine

    def _need(self, key: ModelKey) -> Optional[int]:
        need = self.choices.get(key.choice).memory_bytes(DTYPES[key.dtype])
        copies = getattr(self._factory, "copies", None)  # engine processes each hold a copy
        return need * copies(key) if need is not None and copies is not None else need

    def _check_fits(self, key: ModelKey) -> Optional[int]:
        """`key`'s estimated bytes (None: unknown); ModelLoadError if it could not fit even with every other model
        on its kind of device evicted."""
        need = self._need(key)
        if need is None:
            return None
        free, _total = self._memory(key.device)
        if need > free + self.reclaimable_bytes(key.device):
            raise ModelLoadError(
                f"{self.choices.get(key.choice).name} needs about {gigabytes(need)} in {key.dtype} but only "
                f"{gigabytes(free)} is free on {key.device} (other loaded models included); pick a smaller "
                "model, another precision (bf16/fp16 halve fp32) or another device")
        return need

    def _make_room(self, key: ModelKey, need: Optional[int]) -> None:
        """Evict least recently used models until `key` (`need` bytes) fits."""
        if need is None:
            return
        free, _total = self._memory(key.device)
        while need > free and self._evict_one(key):
            free, _total = self._memory(key.device)

    def _evict_one(self, keep: ModelKey) -> bool:
        kind = torch.device(keep.device).type
        with self._lock:
            victim = next((k for k in self._loaded if k != keep and torch.device(k.device).type == kind), None)
            slot = self._loaded.pop(victim) if victim is not None else None
        if slot is None:
            return False
        slot.engine.close()
        del slot
        gc.collect()
        if kind == "cuda":
            torch.cuda.empty_cache()
        return True

    def preload(self, key: ModelKey, by_visitor: bool = True) -> threading.Thread:
        """Start loading `key` in the background (errors are kept for `error(key)`). A visitor's preload is
        refused at once (LoadRefused) while the cooldown runs; the operator's (by_visitor=False) marks `key` as
        the operator's, whose loads never count."""
        if not by_visitor:
            with self._lock:
                self._operator_keys.add(key)
        elif self._counts(key, by_visitor) and self.peek(key) is None and not self.is_loading(key):
            self._cooldown.check()

        def run():
            try:
                self.get(key, by_visitor=by_visitor)
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
            slot.engine.close()
