"""Which architecture a checkpoint or a version string belongs to.

`ARCHITECTURES` lists every architecture version this package runs, from the architectures' own modules;
adding one is a new module and a line here. `architecture_for(version)` and `detect(state_dict)` (from an
original checkpoint's keys and shapes alone) are the only places that map names to architectures.
"""

from __future__ import annotations

import torch

from . import rwkv4, rwkv5, rwkv6, rwkv7
from .architecture import Architecture, UnsupportedCheckpoint

# most specific first: a checkpoint is the first architecture that identifies it
ARCHITECTURES: tuple[Architecture, ...] = (rwkv7.ARCHITECTURES + rwkv6.ARCHITECTURES + rwkv5.ARCHITECTURES
                                           + rwkv4.ARCHITECTURES)
SUPPORTED_VERSIONS = tuple(sorted(arch.version for arch in ARCHITECTURES))
_BY_VERSION = {arch.version: arch for arch in ARCHITECTURES}


def architecture_for(version: str) -> Architecture:
    try:
        return _BY_VERSION[version]
    except KeyError:
        raise ValueError(f"unsupported RWKV version {version!r}; supported: {SUPPORTED_VERSIONS}") from None


def detect(state_dict: dict[str, torch.Tensor]) -> Architecture:
    """The architecture of an original (BlinkDL-layout) checkpoint; UnsupportedCheckpoint if none runs it."""
    for arch in ARCHITECTURES:
        if arch.identifies(state_dict):
            return arch
    raise UnsupportedCheckpoint("not an RWKV checkpoint of a supported version")
