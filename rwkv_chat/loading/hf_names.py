"""transformers' parameter names <-> the original checkpoints' names: the one table both directions read.

transformers' layout prefixes the model with `rwkv.` (published rwkv5 and fla layouts sometimes `model.`) and
renames some dotted parts; `head.weight` keeps its name. Knows nothing but names.
"""

from __future__ import annotations

ORIGINAL_TO_HF = {"emb": "embeddings", "ln0": "pre_ln", "att": "attention", "ffn": "feed_forward",
                  "time_mix_k": "time_mix_key", "time_mix_v": "time_mix_value",
                  "time_mix_r": "time_mix_receptance", "time_mix_g": "time_mix_gate"}
HF_TO_ORIGINAL = {hf: original for original, hf in ORIGINAL_TO_HF.items()}
HF_PREFIXES = ("rwkv", "model")


def original_key(hf_key: str) -> str:
    """`rwkv.blocks.0.attention.time_mix_key` -> `blocks.0.att.time_mix_k`."""
    parts = hf_key.split(".")
    if parts[0] in HF_PREFIXES:
        parts = parts[1:]
    return ".".join(HF_TO_ORIGINAL.get(part, part) for part in parts)
