"""What an RWKV architecture must answer, so that nothing outside its module branches on a version.

An `Architecture` is one object per architecture version ("4", "5.0", "5.2", "6", "7"), made by that version's
module and listed in registry.py. The loader, the state, the catalog, the fast runner and the transformers wing
ask it:
- which checkpoints it reads (`identifies`), its shapes from the weights (`head_size_from`, `lora_from`,
  `default_ffn_size`), and what the original key names mean here (`canonical_key`);
- its state (`n_head`, `empty_wkv`, how state files are laid out) and the modules of its reference math
  (`make_time_mix`, `make_channel_mix`);
- its size (`time_mix_params`, `channel_mix_params`, `state_floats_per_layer`) for memory estimates;
- for the fast paths: how its time mix is packed (`pack_time_mix`) and its per-backend cores (`decode_wkv`,
  `triton_decode_wkv`, `prefill_wkv`, the C++ kernels' `cpu_kernel_id`); or, for an architecture the fast
  runner does not pack, the core of the fused decode step (`pack_fused_time_mix`, `fused_time_mix`,
  `fused_channel_mix`: runtime/fused_decode.py) and its whole-layer C++ decode step on CPUs
  (`cpu_layer_tensors` and `cpu_kernel_id`: runtime/cpu_decode.py).

It holds no weights and no state: the methods take the tensors they work on, and `config` is always a
`RwkvConfig` (config.py; not imported here, which would close a loop through the registry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layers import ChannelMix


class UnsupportedCheckpoint(ValueError):
    """A checkpoint of a version this package knows but does not run."""


@dataclass
class TimeMixPack:
    """A time mix as the fast paths read it: the token-shift mixes and the projections they feed, in the same
    order (packed into one matrix), and the recurrence's constants in the layout of the kernels."""

    mixes: list[torch.Tensor]  # [1, 1, C] each
    projections: list[nn.Module]  # the `Projection`s each mix feeds
    decay: torch.Tensor  # fp32, as the architecture's kernels read it
    first: torch.Tensor  # fp32 bonus of the current token (u)
    ln_x: tuple[torch.Tensor, torch.Tensor] | None = None  # GroupNorm of the heads (weight, bias), if any


@dataclass
class FusedTimeMixPack:
    """A time mix as the fused decode step (runtime/fused_decode.py) reads it. The step writes the token-shift
    mixes `xx * m + prev * (1 - m)` of every row of `mixes`: the first `matrix_mixes` in the weight dtype (they
    feed `projections`, which it packs into one matrix), and those from `fp32_from` on also in fp32."""

    mixes: torch.Tensor  # [P, C] fp32
    projections: list[nn.Module]  # equal-shaped `Projection`s
    matrix_mixes: int
    fp32_from: int
    core: Any  # what the architecture's `fused_time_mix` reads besides (packed LoRAs, per-channel constants)


class Architecture:
    """The interface; see the module docstring. Subclasses set the class attributes."""

    version: str  # "4", "5.0", "5.2", "6", "7"
    family: str  # the name users know: "RWKV-4", "RWKV-5", ...
    heads: bool  # whether the time mix is split into heads of `head_size`
    fast_runner: bool = True  # whether runtime.fast_path can pack it (else the plain path runs on every device)
    # whether its time mix takes `real` (a bool [1, T, 1] mask of a padded prompt's real tokens) and leaves the
    # memory as it is for the others, so that RwkvModel.read_padded reads prompts padded at their end
    reads_padded_prompts: bool = False
    # state files (`blocks.N.att.time_state` [H, N, N]) hold the memory transposed against `empty_wkv`'s layout;
    # None: this architecture has no per-head matrix memory, so no state file fits it
    state_file_transposed: bool | None = None
    # Kernels this architecture has beyond PyTorch; the fast runner uses only those that exist:
    # which layer step cpu_kernels' DecodeStack runs: 4, 5 (its RWKV-4/5 step, fed by the fast runner's packing),
    # 6, 7 (fed by `cpu_layer_tensors`); None: the PyTorch step
    cpu_kernel_id: int | None = None
    triton_decode: bool = False  # whether `triton_decode_wkv` exists (else CUDA runs the graphed PyTorch step)
    cpu_wkv_chunk: int  # tokens per chunk of the PyTorch prefill form on CPUs
    # whether `prefill_wkv` takes the time-mix products as the GEMMs gave them (bf16/fp16) when its scans are
    # Triton's (which widen while reading); else they come widened to fp32
    prefill_takes_gemm_dtype: bool = False
    # whether `prefill_wkv` takes `real` (a bool [T, 1] mask of a padded prompt's real tokens) with the scans of
    # `kernels` and leaves the memory as it is for the others (the fast runner's padded prompts)
    prefill_wkv_reads_padding: bool = False
    # time-mix projections (indices into `TimeMixPack.projections`) that the last layer of a prefill computes
    # for every token (the recurrence reads them); the others only for the last two tokens
    projections_for_every_token: tuple[int, ...]

    # ------------------------------------------------------------------------------------- checkpoints
    def identifies(self, state_dict: dict[str, torch.Tensor]) -> bool:
        raise NotImplementedError

    def head_size_from(self, state_dict: dict[str, torch.Tensor], dim_att: int) -> int:
        raise NotImplementedError

    def default_ffn_size(self, n_embd: int) -> int:
        raise NotImplementedError

    def lora_from(self, state_dict: dict[str, torch.Tensor]) -> tuple[int, ...]:
        """The widths of the low-rank (LoRA) parts of the time mix, from the shapes (RwkvConfig.lora)."""
        return ()

    def default_lora(self, n_embd: int) -> tuple[int, ...]:
        """The LoRA widths published models of this width use (for building random models)."""
        return ()

    def canonical_key(self, key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """An original checkpoint's (key, tensor) in this package's names and conventions; None drops it."""
        return key, tensor

    # ------------------------------------------------------------------------------------- shapes and state
    def n_head(self, config) -> int:
        raise NotImplementedError

    def empty_wkv(self, config, batch: int, device) -> torch.Tensor:
        """The time-mix memory of every layer of a model that has read nothing: [B, L, ...] fp32."""
        raise NotImplementedError

    def make_time_mix(self, config, layer_id: int) -> nn.Module:
        """The time mix of layer `layer_id`: forward(xx [B, T, C], prev [B, C], wkv, carry) -> (out, wkv, carry),
        where `carry` flows from layer to layer within one read (RWKV-7's first-layer value; None otherwise)."""
        raise NotImplementedError

    def make_channel_mix(self, config) -> nn.Module:
        return ChannelMix(config.n_embd, config.dim_ffn)

    def time_mix_params(self, n_embd: int, dim_att: int) -> int:
        """Parameters of one layer's time-mix matrices (projections and LoRAs) at the published widths."""
        raise NotImplementedError

    def channel_mix_params(self, n_embd: int, dim_ffn: int) -> int:
        """Parameters of one layer's channel-mix matrices."""
        return 2 * n_embd * dim_ffn + n_embd * n_embd

    def state_floats_per_layer(self, n_embd: int, dim_att: int, head_size: int) -> int:
        """fp32 numbers of one layer's state (token shifts included)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------- fast paths
    def pack_time_mix(self, att: nn.Module, config) -> TimeMixPack:
        raise NotImplementedError

    def decode_wkv(self, layer, proj: list[torch.Tensor], wkv: torch.Tensor, wkv_out: torch.Tensor) -> torch.Tensor:
        """One token of B sequences in PyTorch: the projections (fp32 [B, A] each) and this layer's memory
        -> the input of the output projection (fp32 [B, A]); the new memory is written to wkv_out."""
        raise NotImplementedError

    def triton_decode_wkv(self, kernels, layer, proj, wkv, wkv_out, act_dtype) -> torch.Tensor:
        """The same in the Triton kernels (proj: partial products [S, B, A] each)."""
        raise NotImplementedError

    def prefill_wkv(self, layer, proj: list[torch.Tensor], wkv: torch.Tensor, kernels, chunk: int,
                    kept: slice, real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """T tokens of one sequence: projections [T or 2, A] (fp32, or as `prefill_takes_gemm_dtype` says) -> (the
        output projection's input for the `kept` rows, new memory: fp32, or in the projections' dtype when they
        came in it). `kernels` is a module with the token-by-token scans (Triton or C++) and, where it has them,
        the gates and norms in one pass (`sigmoid_gate`, `group_norm_gate`), or None for the chunked PyTorch
        forms. real: where `prefill_wkv_reads_padding`, None or a bool [T, 1] mask of the prompt's tokens (the
        others are padding after it, which leaves the memory as it is)."""
        raise NotImplementedError

    def pack_fused_time_mix(self, att: nn.Module, config) -> FusedTimeMixPack | None:
        """One layer's time mix for the fused decode step, packed once (sharing memory with the model); None
        where this architecture (or this shape) has no fused core: its decode then runs the plain step."""
        return None

    def fused_time_mix(self, pack: FusedTimeMixPack, projection, project, mixed: torch.Tensor,
                       mixed32: torch.Tensor, xx: torch.Tensor, prev: torch.Tensor, wkv: torch.Tensor,
                       wkv_out: torch.Tensor, carry, act_dtype: torch.dtype, side):
        """One token of B sequences in the Triton kernels: the mixes (`mixed` [matrix_mixes, B, C] in the weight
        dtype, `mixed32` fp32), the LayerNorm output `xx` and the previous token's `prev` ([B, C] fp32), this
        layer's memory -> (the output projection's input [B, A] in act_dtype, carry); the new memory goes to
        wkv_out. `projection` is `pack.projections` packed; `project(x, projection)` its products (partials).
        `side` (runtime.fused_decode.SideStream) may run what does not need the products beside them: launched
        inside `with side.branch():`, its results read after `side.join()`."""
        raise NotImplementedError

    def fused_channel_mix(self, ffn: nn.Module) -> tuple[torch.Tensor, list[nn.Module]]:
        """The channel mix for the fused decode step: its token-shift mixes [Q, C] fp32 (as `xx * m + prev * (1 -
        m)`) and the projections they feed: the key, then the receptance that gates the value, if any."""
        raise NotImplementedError

    def cpu_layer_tensors(self, block: nn.Module) -> list[torch.Tensor] | None:
        """For an architecture the fast runner does not pack: one block's tensors in the order its C++ layer step
        (`cpu_kernel_id`) reads them (views of the model's own, nothing copied), or None where it has no such
        step."""
        return None

    def cpu_decay(self, layer) -> torch.Tensor:
        """The decay as the C++ RWKV-4/5 layer step reads it."""
        return layer.decay

    def __repr__(self) -> str:
        return f"<{self.family} architecture {self.version}>"


class HeadMatrixArchitecture(Architecture):
    """An architecture whose time-mix memory is one N x N matrix per head of `head_size` (RWKV-5, 6 and 7): the
    state shapes and sizes they share. Subclasses say how state files lay that matrix out."""

    heads = True

    def n_head(self, config):
        return config.dim_att // config.head_size

    def empty_wkv(self, config, batch, device):
        h, n = config.n_head, config.head_size
        return torch.zeros(batch, config.n_layer, h, n, n, dtype=torch.float32, device=device)

    def state_floats_per_layer(self, n_embd, dim_att, head_size):
        return 2 * n_embd + dim_att * head_size
