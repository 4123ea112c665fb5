"""Which architecture a checkpoint or a version string belongs to.

`ARCHITECTURES` lists every architecture version this package runs, from the architectures' own modules;
adding one is a new module and a line here. `architecture_for(version)` and `detect(state_dict)` (from an
original checkpoint's keys and shapes alone) are the only places that map names to architectures.
"""

from __future__ import annotations

import torch

from . import rwkv4, rwkv5
from .architecture import Architecture
from .rwkv5 import UnsupportedCheckpoint

ARCHITECTURES: tuple[Architecture, ...] = rwkv4.ARCHITECTURES + rwkv5.ARCHITECTURES
SUPPORTED_VERSIONS = tuple(arch.version for arch in ARCHITECTURES)
_BY_VERSION = {arch.version: arch for arch in ARCHITECTURES}
# keys of architectures this package knows of but does not run yet
_NOT_YET = {"time_maa": "RWKV-6", ".att.r_k": "RWKV-7", ".att.w0": "RWKV-7"}


def architecture_for(version: str) -> Architecture:
    try:
        return _BY_VERSION[version]
    except KeyError:
        raise ValueError(f"unsupported RWKV version {version!r}; supported: {SUPPORTED_VERSIONS}") from None


def detect(state_dict: dict[str, torch.Tensor]) -> Architecture:
    """The architecture of an original (BlinkDL-layout) checkpoint; UnsupportedCheckpoint if none runs it."""
    for fragment, family in _NOT_YET.items():
        if any(fragment in key for key in state_dict):
            raise UnsupportedCheckpoint(f"this is an {family} checkpoint; supported: "
                                        f"RWKV-{', '.join(SUPPORTED_VERSIONS)}")
    for arch in ARCHITECTURES:
        if arch.identifies(state_dict):
            return arch
    raise UnsupportedCheckpoint("not an RWKV checkpoint of a supported version")
