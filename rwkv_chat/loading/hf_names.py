"""Hugging Face layouts -> the original checkpoints' names and tensors: one name table per layout.

Layouts (a checkpoint's layout is told from each key's own parts, so the tables never meet):
- transformers' `rwkv` layout and those modelled on it (the published remote-code `rwkv5` and `rwkv6` layouts,
  RWKV/rwkv-5-world-*, RWKV/v5-Eagle-7B-HF, RWKV/v6-Finch-*-HF, and this package's rwkv5/6/7_world
  directories): prefix `rwkv.` (`model.` in some copies; `head.weight` has none), dotted parts renamed by
  `ORIGINAL_TO_HF`; values and shapes untouched. hf/ writes this layout with the same table (both directions
  read it).
- flash-linear-attention's `rwkv7` layout (fla-hub/rwkv7-*, written by fla's utils/convert_from_rwkv7.py):
  `model.layers.N.attn.{r,k,v,o}_proj`, norms `pre_norm`/`attn_norm`/`ffn_norm`/`attn.g_norm`/`model.norm`,
  `lm_head`, and each LoRA as two Linear layers `attn.{w,a,v,g}_lora.lora.{0,2}` (`FLA_TO_ORIGINAL`,
  `FLA_LORA_PARTS`). It is the one layout that also stores tensors differently: Linear weights are [out, in],
  so `lora.0.weight` is the transpose of the original `w1` [C, D] and `lora.2.weight` of `w2` [D, C]; the
  second Linear's bias is `w0`/`a0`/`v0`; the [1, 1, C] vectors are stored as [C]; fla's first version
  stacked the six token-shift mixes as `attn.x_x` [6, C] (rows r, w, k, v, a, g). `original_tensors` undoes
  that: it is the only place a tensor changes on its way from a directory to the original layout.
  (Layer 0's `v_lora`, when a file carries it, maps to `blocks.0.att.v0/v1/v2`, which the RWKV-7 architecture
  drops, as it does for .pth files.)

`original_key` maps a name, `original_tensors` one tensor, `original_state_dict` a whole checkpoint. Knows
nothing but names and these layout conventions: no architecture's math, no shapes beyond the transposes and
reshapes above.
"""

from __future__ import annotations

from typing import Mapping

import torch

ORIGINAL_TO_HF = {"emb": "embeddings", "ln0": "pre_ln", "att": "attention", "ffn": "feed_forward",
                  "time_mix_k": "time_mix_key", "time_mix_v": "time_mix_value",
                  "time_mix_r": "time_mix_receptance", "time_mix_g": "time_mix_gate"}
HF_TO_ORIGINAL = {hf: original for original, hf in ORIGINAL_TO_HF.items()}
HF_PREFIXES = ("rwkv", "model")

# flash-linear-attention's rwkv7 layout, per dotted part (after the `model.` prefix)
FLA_TO_ORIGINAL = {"embeddings": "emb", "layers": "blocks", "norm": "ln_out", "lm_head": "head", "attn": "att",
                   "pre_norm": "ln0", "attn_norm": "ln1", "ffn_norm": "ln2", "g_norm": "ln_x",
                   "r_proj": "receptance", "k_proj": "key", "v_proj": "value", "o_proj": "output"}
FLA_LORA_PARTS = {("0", "weight"): "1", ("2", "weight"): "2", ("2", "bias"): "0"}  # lora.<i>.<p> -> <x><digit>
FLA_STACKED_MIXES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")  # rows of fla's `attn.x_x`
FLA_VECTORS = ("w0", "a0", "v0", "k_k", "k_a", *FLA_STACKED_MIXES)  # [C] in fla, [1, 1, C] originally (ffn.x_k too)
FLA_LORA_MATRICES = tuple(f"{lora}{digit}" for lora in "wavg" for digit in "12")  # stored transposed by fla


def _parts(hf_key: str) -> tuple[list[str], bool]:
    """A key's dotted parts without the prefix, and whether it is in fla's layout (whose blocks are `layers`,
    final norm `norm` and head `lm_head`; its `embeddings` has the same name as transformers')."""
    parts = hf_key.split(".")
    if parts[0] in HF_PREFIXES:
        parts = parts[1:]
    return parts, parts[0] in ("layers", "norm", "lm_head")


def original_key(hf_key: str) -> str:
    """`rwkv.blocks.0.attention.time_mix_key` -> `blocks.0.att.time_mix_k`;
    `model.layers.1.attn.w_lora.lora.0.weight` -> `blocks.1.att.w1` (the tensor needs `original_tensors`).
    fla's stacked `attn.x_x` keeps that name (`original_tensors` splits it)."""
    parts, fla = _parts(hf_key)
    if not fla:
        return ".".join(HF_TO_ORIGINAL.get(part, part) for part in parts)
    renamed = [FLA_TO_ORIGINAL.get(part, part) for part in parts]
    if len(parts) == 7 and parts[3].endswith("_lora") and parts[4] == "lora":  # layers.N.attn.w_lora.lora.0.weight
        digit = FLA_LORA_PARTS.get((parts[5], parts[6]))
        if digit is not None:
            renamed = renamed[:3] + [parts[3].removesuffix("_lora") + digit]
    return ".".join(renamed)


def original_tensors(hf_key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One tensor of a Hugging Face directory -> the original (name, tensor) pairs it holds: one pair, or six
    for fla's stacked token-shift mixes."""
    name = original_key(hf_key)
    if not _parts(hf_key)[1] or not name.startswith("blocks."):
        return [(name, tensor)]
    block, _, last = name.rpartition(".")
    if last == "x_x":
        return [(f"{block}.{mix}", row.reshape(1, 1, -1)) for mix, row in zip(FLA_STACKED_MIXES, tensor)]
    if block.endswith(".att") and last in FLA_LORA_MATRICES:
        return [(name, tensor.t().contiguous())]  # Linear [out, in] -> the original [in, out]
    if last in FLA_VECTORS:
        return [(name, tensor.reshape(1, 1, -1))]
    return [(name, tensor)]


def original_state_dict(raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face directory's tensors (any layout above) -> the original checkpoint's names and tensors."""
    return {name: tensor for key, value in raw.items() for name, tensor in original_tensors(key, value)}
