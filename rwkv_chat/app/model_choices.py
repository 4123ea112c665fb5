"""What the model picker may offer, what each choice needs, and whether it fits this machine.

Promises:
- `ModelChoices` holds exactly the operator's own `--model` (a catalog name, or a local path or hub id given on
  the command line) plus the catalog entries the operator offers (`--models`: catalog names and/or the words
  `all`, `small` and `none` (only --model); `small` = the catalog models whose download is at most SMALL_DOWNLOAD_BYTES and whose
  memory in the chosen precision is at most SMALL_MEMORY_SHARE of the device's). An entry of `--models` that
  names nothing is a `ModelListError` naming it and listing the valid names. `resolve(name, device, dtype)` is
  the only way from user input to a `ModelKey`, and it refuses any name not on that list (a catalog model left
  out by `--models` with a message saying the operator does not offer it, and what is offered), so neither the
  page nor the API can make the server read an arbitrary path or load a model the operator did not offer.
- `ModelKey` names one loaded model: (choice, device, dtype) with "auto" already resolved.
- Memory: catalog entries use `CatalogEntry.memory_bytes(dtype)`; the operator's file is estimated from its
  size (BlinkDL files hold bf16/fp16 weights: 2 bytes per parameter). `free_memory` reads free GPU memory
  (torch.cuda.mem_get_info) or available RAM (psutil, else os.sysconf). `ModelChoice.state_bytes()` is one
  chat's RNN state: the catalog entry's, or for the operator's own local .pth file read from its tensor shapes
  (memory-mapped: no weight is read); None where unknown before a load (a hub id, a directory).
Knows nothing of Gradio; never loads a model or downloads anything.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..loading.catalog import BYTES_PER_PARAM, CATALOG, CatalogEntry, find_entry
from ..loading.loader import ModelLoadError, config_from_state_dict, dtype_name, read_pth, resolve_device_dtype

ALL_MODELS, SMALL_MODELS, NO_MODELS = "all", "small", "none"  # the words --models takes beside catalog names
SMALL_DOWNLOAD_BYTES = 2 * 10**9  # `small`: downloads of at most ~2 GB (every 0.1B and 0.4B model)
SMALL_MEMORY_SHARE = 0.5  # `small`: at most half the device's memory in the chosen precision
FILE_BYTES_PER_PARAM = 2  # published RWKV checkpoints store bf16/fp16 weights
WORKING_ROOM = 1.15  # activations and a few states on top of the weights, for files of unknown shape
WEIGHT_SUFFIXES = (".pth", ".safetensors", ".bin")


@dataclass(frozen=True)
class ModelKey:
    """One model placed on one device in one precision (the pool's key, a session's model)."""

    choice: str  # a ModelChoice.value
    device: str  # "cpu", "cuda", "cuda:1"
    dtype: str  # "fp32", "bf16", "fp16", "int8", "int4"

    @property
    def placement(self) -> str:
        return f"{self.device} {self.dtype}"


@dataclass(frozen=True)
class ModelChoice:
    value: str  # what the picker and the API send: a catalog name, or the operator's file name / hub id
    name: str  # what people read
    source: str  # what load_model gets
    download_bytes: Optional[int]  # None when unknown (a hub id)
    entry: Optional[CatalogEntry] = None

    def memory_bytes(self, dtype: torch.dtype) -> Optional[int]:
        if self.entry is not None:
            return self.entry.memory_bytes(dtype)
        if self.download_bytes is None:
            return None
        params = self.download_bytes / FILE_BYTES_PER_PARAM
        return int(params * BYTES_PER_PARAM[dtype] * WORKING_ROOM)

    def state_bytes(self) -> Optional[int]:
        """Bytes of one chat's fp32 RNN state, or None when unknown before the model loads."""
        if self.entry is not None:
            return self.entry.state_bytes()
        return _pth_state_bytes(self.source)


@functools.lru_cache(maxsize=8)
def _pth_state_bytes(source: str) -> Optional[int]:
    """One chat's state bytes of a local .pth checkpoint, from its tensors' shapes (memory-mapped, weights_only:
    the weights themselves are not read); None for anything else or a file that is not such a checkpoint."""
    path = Path(source).expanduser()
    if path.suffix != ".pth" or not path.is_file():
        return None
    try:
        config = config_from_state_dict(read_pth(path))
    except Exception:  # noqa: BLE001 - the load itself reports what is wrong with the file
        return None
    floats = config.architecture.state_floats_per_layer(config.n_embd, config.dim_att, config.head_size)
    return 4 * config.n_layer * floats


def _local_bytes(source: str) -> Optional[int]:
    path = Path(source).expanduser()
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    return None


def operator_choice(source: str) -> ModelChoice:
    entry = find_entry(source)
    if entry is not None:
        return catalog_choice(entry)
    path = Path(source).expanduser()
    name = path.name if path.exists() and path.name else source  # the page shows no server directories
    return ModelChoice(name, name, source, _local_bytes(source))


def catalog_choice(entry: CatalogEntry) -> ModelChoice:
    return ModelChoice(entry.name, entry.name, entry.name, entry.file_bytes, entry)


class ModelListError(ValueError):
    """An entry of --models is neither a catalog name nor `all` / `small` (a start-up error)."""


def small_entries(device: str, dtype: str, memory: Optional[Callable] = None) -> tuple[CatalogEntry, ...]:
    """The catalog entries `small` means on this machine: a download of at most SMALL_DOWNLOAD_BYTES and memory in
    `dtype` of at most SMALL_MEMORY_SHARE of the device's total (none when the device is not available here)."""
    try:
        placed_on, placed_as = resolve_device_dtype(device, dtype)
    except ModelLoadError:
        return ()
    _free, total = (memory or free_memory)(placed_on)
    return tuple(entry for entry in CATALOG if entry.file_bytes <= SMALL_DOWNLOAD_BYTES
                 and entry.memory_bytes(placed_as) <= total * SMALL_MEMORY_SHARE)


def offered_entries(words: Sequence[str], operator_model: str = "", device: str = "auto", dtype: str = "auto",
                    memory: Optional[Callable] = None) -> tuple[CatalogEntry, ...]:
    """The catalog entries --models `words` offer, in catalog order (the operator's own --model may be named too,
    and adds nothing); ModelListError for an entry that names nothing."""
    wanted: set[str] = set()
    for word in (word.strip() for word in words):
        named = find_entry(word)
        if word.lower() == ALL_MODELS:
            wanted.update(entry.name for entry in CATALOG)
        elif word.lower() == SMALL_MODELS:
            wanted.update(entry.name for entry in small_entries(device, dtype, memory))
        elif word.lower() == NO_MODELS:  # only the operator's --model
            continue
        elif named is not None:
            wanted.add(named.name)
        elif word not in (operator_model, operator_choice(operator_model).value):
            names = ", ".join(entry.name for entry in CATALOG)
            raise ModelListError(f"--models names {word!r}, which is not a catalog model; use "
                                 f"{ALL_MODELS!r}, {SMALL_MODELS!r}, {NO_MODELS!r} (only --model) or catalog names "
                                 f"(--model is always offered): "
                                 f"{names}")
    return tuple(entry for entry in CATALOG if entry.name in wanted)


class ModelChoices:
    """The operator's model plus the catalog models offered (every one unless `offered` says otherwise); the
    default choice is the operator's. `device`/`dtype`/`memory` size `small` (the operator's placement)."""

    def __init__(self, operator_model: str, offered: Sequence[str] = (ALL_MODELS,), device: str = "auto",
                 dtype: str = "auto", memory: Optional[Callable] = None):
        self.default = operator_choice(operator_model)
        entries = offered_entries(offered, operator_model, device, dtype, memory)
        catalog = [catalog_choice(entry) for entry in entries]
        extra = [] if self.default.value in {choice.value for choice in catalog} else [self.default]
        self.choices: tuple[ModelChoice, ...] = tuple(extra + catalog)
        self._by_value = {choice.value: choice for choice in self.choices}

    def __iter__(self):
        return iter(self.choices)

    def get(self, value: str) -> ModelChoice:
        """The choice called `value`; ValueError for anything not offered (arbitrary paths included)."""
        choice = self._by_value.get(value)
        if choice is None:
            entry = find_entry(value) if isinstance(value, str) else None
            choice = self._by_value.get(entry.name) if entry is not None else None
        if choice is None:
            names = ", ".join(c.value for c in self.choices)
            if entry is not None:
                raise ValueError(f"this server does not offer {entry.name!r}: its operator chose the models it "
                                 f"loads (--models); choose one of: {names}")
            raise ValueError(f"unknown model {value!r}; choose one of: {names}")
        return choice

    def resolve(self, value: str, device: str = "auto", dtype: str = "auto") -> ModelKey:
        """Validate a user's choice and settle "auto" (ModelLoadError when e.g. CUDA is missing)."""
        choice = self.get(value)
        placed_on, placed_as = resolve_device_dtype(device, dtype)
        return ModelKey(choice.value, str(placed_on), dtype_name(placed_as))


# ---------------------------------------------------------------------------------------- memory

def free_memory(device: str | torch.device) -> tuple[int, int]:
    """(free, total) bytes on `device`: GPU memory for CUDA, available RAM for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    try:
        import psutil
        memory = psutil.virtual_memory()
        return int(memory.available), int(memory.total)
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_AVPHYS_PAGES"), page * os.sysconf("SC_PHYS_PAGES")


def gigabytes(n_bytes: Optional[int]) -> str:
    return "?" if n_bytes is None else f"{n_bytes / 1e9:.2f} GB" if n_bytes < 10e9 else f"{n_bytes / 1e9:.0f} GB"


def describe(choice: ModelChoice, device: str, dtype: str, reclaimable: int = 0,
             loaded: bool = False) -> str:
    """One picker line: name · download · memory in the chosen precision · fits or not."""
    try:
        placed_on, placed_as = resolve_device_dtype(device, dtype)
    except ModelLoadError:
        why = "int4 runs on CPUs only" if str(dtype).lower() == "int4" else f"{device} not available here"
        return f"{choice.name} · {gigabytes(choice.download_bytes)} download · {why}"
    need = choice.memory_bytes(placed_as)
    where = "GPU" if placed_on.type == "cuda" else "RAM"
    if loaded:
        fit = f"loaded on {placed_on.type} {dtype_name(placed_as)}"
    elif need is None:
        fit = "size unknown"
    else:
        free, _total = free_memory(placed_on)
        fit = "fits" if need <= free + reclaimable else f"too big ({gigabytes(free + reclaimable)} {where} free)"
    name = choice.name if choice.entry is not None else f"{choice.name} (this server's model)"
    return (f"{name} · {gigabytes(choice.download_bytes)} download · needs {gigabytes(need)} "
            f"{dtype_name(placed_as)} · {fit}")
