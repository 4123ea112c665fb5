"""`RwkvConfig`: the shape and architecture version of a model; everything else about it is in its weights.

Its `architecture` (from registry.py) answers every version question; the config itself holds only numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .architecture import Architecture, UnsupportedCheckpoint
from .registry import architecture_for, detect


@dataclass(frozen=True)
class RwkvConfig:
    version: str
    n_layer: int
    n_embd: int
    dim_att: int
    dim_ffn: int
    vocab_size: int
    head_size: int = 64
    lora: tuple[int, ...] = ()  # widths of the time mix's low-rank parts (RWKV-6/7; the architecture names them)

    def __post_init__(self):
        architecture_for(self.version)  # refuses unknown versions
        if self.architecture.heads and self.dim_att % self.head_size:
            raise ValueError(f"dim_att {self.dim_att} is not a multiple of head size {self.head_size}")
        object.__setattr__(self, "lora", tuple(int(width) for width in self.lora))
        expected = len(self.architecture.default_lora(self.n_embd))
        if len(self.lora) != expected:
            raise ValueError(f"RWKV-{self.version} has {expected} LoRA widths; got lora={self.lora}")

    @property
    def architecture(self) -> Architecture:
        return architecture_for(self.version)

    @property
    def n_head(self) -> int:
        return self.architecture.n_head(self)

    @staticmethod
    def from_state_dict(state_dict: dict[str, torch.Tensor]) -> "RwkvConfig":
        """The config of an original (BlinkDL-layout) checkpoint, from its keys and shapes."""
        arch = detect(state_dict)
        try:
            n_layer = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
            vocab_size, n_embd = state_dict["emb.weight"].shape
            dim_att = state_dict["blocks.0.att.key.weight"].shape[0]
            dim_ffn = state_dict["blocks.0.ffn.key.weight"].shape[0]
            return RwkvConfig(arch.version, n_layer, n_embd, dim_att, dim_ffn, vocab_size,
                              arch.head_size_from(state_dict, dim_att), arch.lora_from(state_dict))
        except (KeyError, IndexError, ValueError) as error:
            raise UnsupportedCheckpoint(f"this looks like an {arch.family} checkpoint, but its weights do not fit "
                                        f"one: {error}") from None
