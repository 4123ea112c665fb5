"""Builds a ready `ChatEngine` for a `ModelKey`: load the weights, share one tokenizer, pick the decoder.

Promises:
- One `WorldTokenizer` for every engine of the app (it is read once, on first use; engine processes read their own).
- The decoder is `batching.DecodeBatcher(model, max_batch)` (DEFAULT_MAX_BATCH rows unless told; the app
  passes its --concurrency, which by default follows what the device holds), so concurrent chats with one
  model decode and sample together (or `generation.DirectDecoder`, one chat at a time, when batching is
  turned off). With `stats_every` > 0 the batcher's work is printed that often while chats generate
  ("rwkv-chat: MODEL · PLACE: decode N steps in …": tokens/s, mean batch, where a step's time goes).
- The engine's prefix-state cache holds at least CACHED_STATES_PER_CHAT states for each chat that can generate
  at once (max_batch), and never less than limits.STATE_CACHE_BYTES: with a fixed budget, a GPU serving a
  hundred chats of a 1.5B model evicted their states between turns, so every turn read the whole
  conversation again.
- The operator's preamble (if any) is read once per model at load time and pinned in the engine's cache.
- The operator's state files that fit the model (loading/state_files.py) become the engine's start states.
- Models load on the fast path (loading.load_model(fast=True)), fp32 on a CPU included.
- A model on a CPU is served by `engine_process_count` engine processes (`serving.engine_processes.EngineProcesses`)
  when that is more than one, each with its own copy of the model and batcher and an equal share of torch's
  threads: a small model's per-token Python then runs on every core (`copies(key)` says how many copies a load
  places, for the pool's memory checks). `processes` None is auto: for a small model (its estimate at most
  AUTO_SMALL_MODEL_BYTES: the 0.1B models in int8 or int4, whose lone user is as fast on four threads as on
  sixteen) one process per THREADS_PER_PROCESS torch threads, as many as AUTO_MEMORY_SHARE of the available RAM
  holds copies of; one process for larger models (a lone user would be slower) and for models whose size is
  unknown before they load; settled once per model. So a 2-core machine keeps one process, a 16-thread server of
  the 0.1B int8 model gets four. GPUs keep one engine (one batch serves them best).
- `recipe(key)` is the whole build as a picklable `EngineRecipe`, which is what an engine process runs (there it
  also hands the heap the load freed back and trims every TRIM_SECONDS, as the server's process does).
- Load stages ("downloading …", "placing …", "preparing the CPU kernels …") go to the `progress` callback.
Never runs remote code: loading goes through `loading.load_model`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import limits
from ..loading.loader import ModelLoadError, load_model, resolve_device_dtype
from ..loading.state_files import StateFile
from ..serving.batching import DEFAULT_MAX_BATCH, DecodeBatcher, WorkerTimes
from ..serving.engine import ChatEngine
from ..serving.engine_processes import EngineProcesses
from ..serving.session import ChatSession
from ..tokenizer import WorldTokenizer
from .model_choices import ModelChoices, ModelKey, free_memory
from .process_memory import TRIM_SECONDS, MemoryTrimmer, trim_freed_memory

CACHED_STATES_PER_CHAT = 2  # the state after a chat's prompt (retry, edit) and after its reply (the next turn)
# --engine-processes auto: one process per THREADS_PER_PROCESS torch threads for a model whose estimated memory is at
# most AUTO_SMALL_MODEL_BYTES (the 0.1B models in int8 or int4), one process for larger ones. Measured on a 16-core
# Xeon (docs/PERFORMANCE.md, twenty-third session; load_test, 16 threads, 1 process against 4 of 4 threads): 0.1B
# int8, 32 users: 2.2x the steady aggregate, one user alone as fast (156-241 against 159-193 tok/s); but one user
# alone of 0.1B fp32 got 0.75x (73 against 94-104), 0.4B int8 0.8x, 1.5B int8 0.6x (26 against 41-44; 16 users:
# 1.8x the steady aggregate): four threads stream less than a larger model's lone user reads. 8 processes of 2
# threads gave 0.1B int8 only 6% more than 4 of 4, for 1.5x the memory.
THREADS_PER_PROCESS = 4
AUTO_SMALL_MODEL_BYTES = 500_000_000
AUTO_MEMORY_SHARE = 0.5  # auto: the copies of a model take at most this share of the RAM available at its load


def auto_engine_processes(threads: int, model_bytes: Optional[int], available_bytes: int,
                          limit: int = 64) -> int:
    """--engine-processes auto for a CPU model: one process per THREADS_PER_PROCESS of `threads` when the model's
    estimated `model_bytes` are at most AUTO_SMALL_MODEL_BYTES, at most as many copies as AUTO_MEMORY_SHARE of
    `available_bytes` holds, at most `limit`; one for a larger model, or one whose size is unknown."""
    if not model_bytes or model_bytes <= 0 or model_bytes > AUTO_SMALL_MODEL_BYTES:
        return 1
    by_threads = threads // THREADS_PER_PROCESS
    by_memory = int(available_bytes * AUTO_MEMORY_SHARE // model_bytes)
    return max(1, min(by_threads, by_memory, limit))


def engine_process_count(choice, device: str, dtype: str, setting: Optional[int],
                         threads: Optional[int] = None, memory: Callable = free_memory) -> int:
    """How many engine processes serve `choice` placed on `device` in `dtype` ("auto" allowed): one on a GPU;
    on a CPU `setting`, or auto_engine_processes when it is None (torch's threads unless `threads` is given,
    `memory("cpu")`'s available bytes)."""
    try:
        placed_on, placed_as = resolve_device_dtype(device, dtype)
    except ModelLoadError:
        return 1
    if placed_on.type != "cpu":
        return 1
    if setting is not None:
        return setting
    threads = torch.get_num_threads() if threads is None else threads
    return auto_engine_processes(threads, choice.memory_bytes(placed_as), memory("cpu")[0])


class EngineFactory:
    def __init__(self, choices: ModelChoices, preamble: Optional[str] = None, max_batch: int = DEFAULT_MAX_BATCH,
                 batching: bool = True, state_files: tuple[StateFile, ...] = (), stats_every: float = 0.0,
                 processes: Optional[int] = 1, threads: Optional[int] = None, memory: Callable = free_memory):
        self.choices = choices
        self.preamble = preamble
        self.state_files = state_files
        self.max_batch = max_batch
        self.batching = batching
        self.stats_every = stats_every
        self.processes = processes  # None: auto
        self._threads, self._memory = threads, memory  # auto's inputs (tests give them)
        self._copies: dict[ModelKey, int] = {}  # auto, settled at a key's first ask
        self._tokenizer = None
        self._lock = threading.Lock()

    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = WorldTokenizer()
            return self._tokenizer

    def copies(self, key: ModelKey) -> int:
        """How many copies of the model a load of `key` places (one an engine process): engine_process_count's,
        settled at the key's first ask (the pool's memory check) so that its load places as many."""
        with self._lock:
            if key not in self._copies:
                self._copies[key] = engine_process_count(self.choices.get(key.choice), key.device, key.dtype,
                                                         self.processes, self._threads, self._memory)
            return self._copies[key]

    def recipe(self, key: ModelKey) -> "EngineRecipe":
        choice = self.choices.get(key.choice)
        trim = TRIM_SECONDS if self.copies(key) > 1 else 0.0  # the server's own process trims itself (ui.serve)
        return EngineRecipe(choice.source, f"{choice.name} · {key.placement}", key.device, key.dtype, self.preamble,
                            self.state_files, self.max_batch, self.batching, self.stats_every, trim)

    def __call__(self, key: ModelKey, progress: Callable[[str], None]):
        recipe = self.recipe(key)
        copies = self.copies(key)
        if copies == 1:
            return recipe(progress, self.tokenizer())
        threads = max(1, (self._threads or torch.get_num_threads()) // copies)
        progress(f"starting {copies} engine processes of {threads} threads each")
        engines = EngineProcesses(recipe, copies, threads, tokenizer=self.tokenizer(), progress=progress)
        print(f"rwkv-chat: {recipe.label}: served by {copies} engine processes of {threads} torch threads each",
              flush=True)
        return engines


@dataclass(frozen=True)
class EngineRecipe:
    """Everything that builds one engine for one model (picklable: an engine process builds its own)."""

    source: str
    label: str
    device: str
    dtype: str
    preamble: Optional[str] = None
    state_files: tuple[StateFile, ...] = ()
    max_batch: int = DEFAULT_MAX_BATCH
    batching: bool = True
    stats_every: float = 0.0
    trim_every: float = 0.0  # > 0: hand freed heap back after the load and then this often (an engine process)

    def __call__(self, progress: Callable[[str], None], tokenizer=None) -> ChatEngine:
        # the fast path everywhere, fp32 on CPUs included: the same fp32 arithmetic as the plain path (the tests
        # hold the two together), with the decode step in the C++ kernels, about twice as fast
        model = load_model(self.source, self.device, self.dtype, progress=progress, fast=True)
        progress("reading the tokenizer")
        tokenizer = tokenizer or WorldTokenizer()
        decoder = None
        if self.batching:
            report = _printer(self.label) if self.stats_every > 0 else None
            decoder = DecodeBatcher(model, max_batch=self.max_batch, report=report, report_every=self.stats_every)
        cache_bytes = max(limits.STATE_CACHE_BYTES,
                          CACHED_STATES_PER_CHAT * self.max_batch * model.zero_state(1).nbytes)
        engine = ChatEngine(model, tokenizer, label=self.label, cache_bytes=cache_bytes, decoder=decoder)
        for state_file in self.state_files:
            if state_file.fits(model.config):
                engine.add_start_state(state_file.name, state_file.initial_state(model.config, model.device))
        if self.preamble:
            progress("reading the preamble")
            engine.warm_preamble(ChatSession(preamble=self.preamble))
        if self.trim_every > 0:
            trim_freed_memory()  # the checkpoint as read, before conversion
            MemoryTrimmer(self.trim_every)  # a daemon thread for the process's life, as ui.serve runs for the server
        return engine


def _printer(label: str) -> Callable[[WorkerTimes, float], None]:
    """A batcher report as one line of the server's output."""
    def report(times: WorkerTimes, seconds: float) -> None:
        print(f"rwkv-chat: {label}: decode {times.describe(seconds)}", flush=True)
    return report
