"""State files ("state tuning", personas): a trained initial RNN memory that a chat starts from.

A state file is a `.pth` holding `blocks.{i}.att.time_state` [H, N, N] for every layer i of one base model
(nothing else is required; other keys are refused). It is the initial time-mix memory of each layer; the token
shifts start at zero. RWKV-7 files are in this package's memory layout; RWKV-5/6 files hold each head's matrix
transposed (`Architecture.state_file_transposed`, as RWKV-Runner reads them).

Promises: `read_state_file(path)` reads with `torch.load(weights_only=True)` and checks the keys and shapes
(`StateFileError` names what is wrong); `StateFile.fits(config)` says whether it belongs to a model of that
shape (n_layer, H, N, and an architecture with a per-head matrix memory); `StateFile.initial_state(config,
device)` is the `RwkvState` a chat starts from. `parse_state_specs` reads the operator's `NAME=PATH` list.
Only the operator names state files (flags, environment); nothing here takes a path from a page or the API.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..state import RwkvState

_KEY = re.compile(r"blocks\.(\d+)\.att\.time_state")
_NAME = re.compile(r"[\w .+-]{1,64}")


class StateFileError(ValueError):
    """A state file or a state file setting that cannot be used; the message says why."""


@dataclass(frozen=True)
class StateFile:
    name: str  # what the page offers
    path: Path
    memory: torch.Tensor  # [L, H, N, N] fp32, as stored in the file

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_layer, n_head, head_size)."""
        n_layer, n_head, size, _ = self.memory.shape
        return n_layer, n_head, size

    def fits(self, config) -> bool:
        arch = config.architecture
        return arch.state_file_transposed is not None and self.shape == (config.n_layer, config.n_head,
                                                                         config.head_size)

    def why_not(self, config) -> str:
        if config.architecture.state_file_transposed is None:
            return f"{config.architecture.family} has no per-head state to start from"
        n_layer, n_head, size = self.shape
        return (f"state {self.name!r} is for a model of {n_layer} layers and {n_head} heads of {size}; this "
                f"model has {config.n_layer} layers and {config.n_head} heads of {config.head_size}")

    def initial_state(self, config, device) -> RwkvState:
        if not self.fits(config):
            raise StateFileError(self.why_not(config))
        memory = self.memory.transpose(-1, -2) if config.architecture.state_file_transposed else self.memory
        shift = torch.zeros(1, config.n_layer, 2, config.n_embd, dtype=torch.float32, device=device)
        return RwkvState(shift, memory.unsqueeze(0).to(device=device, dtype=torch.float32).contiguous())


def read_state_file(name: str, path: str | os.PathLike) -> StateFile:
    path = Path(path).expanduser()
    if not _NAME.fullmatch(name):
        raise StateFileError(f"state name {name!r} must be 1-64 letters, digits, spaces or . + - _")
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - missing, unreadable or unsafe: all refused the same way
        raise StateFileError(f"cannot read state file {path} ({name}): {error}") from None
    if not isinstance(weights, dict) or not weights:
        raise StateFileError(f"state file {path} ({name}) holds no tensors")
    layers = {}
    for key, tensor in weights.items():
        match = _KEY.fullmatch(str(key))
        if match is None or not isinstance(tensor, torch.Tensor) or tensor.dim() != 3 \
                or tensor.shape[1] != tensor.shape[2]:
            raise StateFileError(f"state file {path} ({name}): {key!r} is not a blocks.N.att.time_state [H, N, N]")
        layers[int(match.group(1))] = tensor.float()
    if sorted(layers) != list(range(len(layers))) or len({t.shape for t in layers.values()}) != 1:
        raise StateFileError(f"state file {path} ({name}) must hold one [H, N, N] time_state for each of "
                             f"layers 0..L-1; it has layers {sorted(layers)}")
    return StateFile(name, path, torch.stack([layers[i] for i in range(len(layers))]))


def parse_state_specs(specs) -> list[StateFile]:
    """`NAME=PATH` strings (the --state flags, then the RWKV_STATES variable's `;`-separated items) -> files."""
    files, names = [], set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path.strip():
            raise StateFileError(f"--state takes NAME=PATH, got {spec!r}")
        if name in names:
            raise StateFileError(f"two state files are called {name!r}")
        names.add(name)
        files.append(read_state_file(name, path.strip()))
    return files
