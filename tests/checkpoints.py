"""Tiny random-weight RWKV checkpoints, built at test time in every on-disk layout the loader reads.

Promises:
- `make_state_dict` returns exactly the original BlinkDL `.pth` layout (key names, shapes, raw time_* values)
  for RWKV "4", "5.0", "5.2", "6" and "7", deterministic in `seed`, with distributions chosen so logits are well
  separated (a few units apart) and every nonlinearity is exercised.
- `save_pth` writes it the way BlinkDL files are written (a plain `torch.save` of the dict).
- `save_hf_rwkv4` / `save_hf_rwkv5` write the Hugging Face layouts published as RWKV/rwkv-4-world-* (transformers
  `rwkv`) and RWKV/rwkv-5-world-*, RWKV/v5-Eagle-7B-HF (`rwkv5` remote code): renamed keys, untouched values,
  config.json as published (auto_map included), safetensors or .bin, optionally sharded with an index.
- `CheckpointFactory` builds and caches such files under one directory, for fixtures.

Knows nothing of rwkv_chat; the reference for these layouts is /tmp/team/HF_LAYOUTS.md (research notes).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

VERSIONS = ("4", "5.0", "5.2")
NEW_VERSIONS = ("6", "7")  # original .pth layout only so far
ALL_VERSIONS = VERSIONS + NEW_VERSIONS
# LoRA widths of the random RWKV-6/7 models (small, unlike every published model's, and all different, so a
# mixed-up shape fails loudly): v6 (maa, decay), v7 (w, a, v, g)
RANDOM_LORA = {"6": (8, 16), "7": (8, 12, 16, 20)}
WORLD_VOCAB_SIZE = 65536
HEAD_SIZE = 64
DROP = object()  # a config_overrides value that removes the key from config.json

# transformers' names for the original names, applied per dotted part (HF_LAYOUTS.md section 1-2)
HF_PART_NAMES = {"emb": "embeddings", "ln0": "pre_ln", "att": "attention", "ffn": "feed_forward",
                 "time_mix_k": "time_mix_key", "time_mix_v": "time_mix_value",
                 "time_mix_r": "time_mix_receptance", "time_mix_g": "time_mix_gate"}

RWKV5_AUTO_MAP = {"AutoConfig": "configuration_rwkv5.Rwkv5Config",
                  "AutoModelForCausalLM": "modeling_rwkv5.Rwkv5ForCausalLM"}
RWKV4_TOKENIZER_CONFIG = {"name_or_path": "rwkv-world", "add_prefix_space": False,
                          "tokenizer_class": "RWKVWorldTokenizer", "use_fast": False,
                          "auto_map": {"AutoTokenizer": ["tokenization_rwkv_world.RWKVWorldTokenizer", None]}}
RWKV5_TOKENIZER_CONFIG = {"auto_map": {"AutoTokenizer": ["tokenization_rwkv5.Rwkv5Tokenizer", None]},
                          "bos_token": "<s>", "clean_up_tokenization_spaces": True, "eos_token": "<s>",
                          "unk_token": "<s>"}


# ---------------------------------------------------------------------------------------- shapes

def ffn_dim(version: str, n_embd: int) -> int:
    """Channel-mix width as in the released files: 4C for RWKV-4 and 5.0, int(3.5C)//32*32 for 5.2.

    5.0 has no gate and keeps 4C: RWKV-5-World-0.1B-v1 (5.0) is 385,598,386 bytes vs 385,594,610 for
    RWKV-4-World-0.1B (same L12 D768), and BBuf's 5.0 HF port defaults to 4C. 5.2 trades 0.5C of FFN for the gate.
    """
    return int(3.5 * n_embd) // 32 * 32 if version in ("5.2", "6") else 4 * n_embd


def _check_version(version: str) -> None:
    if version not in ALL_VERSIONS:
        raise ValueError(f"version must be one of {ALL_VERSIONS}, got {version!r}")


# ---------------------------------------------------------------------------------------- weights

class _Draw:
    """Seeded draws of the distributions the checkpoints use."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float = 1.0, mean: float = 0.0) -> Tensor:
        return torch.randn(shape, generator=self.generator) * std + mean

    def uniform(self, *shape: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        return torch.rand(shape, generator=self.generator) * (high - low) + low

    def linear(self, out_features: int, in_features: int, gain: float = 1.0) -> Tensor:
        return self.normal(out_features, in_features, std=gain / in_features ** 0.5)  # [out, in]

    def norm(self, prefix: str, size: int) -> dict[str, Tensor]:
        return {f"{prefix}.weight": self.normal(size, std=0.1, mean=1.0), f"{prefix}.bias": self.normal(size, std=0.1)}

    def mix(self, n_embd: int) -> Tensor:
        return self.uniform(1, 1, n_embd)  # [1, 1, C]


def _time_mix_v4(draw: _Draw, prefix: str, n_embd: int) -> dict[str, Tensor]:
    return {
        f"{prefix}.time_decay": draw.uniform(n_embd, low=-6.0, high=1.0),  # raw: w = -exp(time_decay)
        f"{prefix}.time_first": draw.uniform(n_embd, low=-1.0, high=1.0),  # raw: u = time_first
        f"{prefix}.time_mix_k": draw.mix(n_embd),
        f"{prefix}.time_mix_v": draw.mix(n_embd),
        f"{prefix}.time_mix_r": draw.mix(n_embd),
        f"{prefix}.key.weight": draw.linear(n_embd, n_embd),
        f"{prefix}.value.weight": draw.linear(n_embd, n_embd),
        f"{prefix}.receptance.weight": draw.linear(n_embd, n_embd),
        f"{prefix}.output.weight": draw.linear(n_embd, n_embd),
    }


def _time_mix_v5(draw: _Draw, prefix: str, version: str, n_embd: int, head_size: int,
                 v50_time_first: bool) -> dict[str, Tensor]:
    n_head = n_embd // head_size
    out = {f"{prefix}.time_mix_k": draw.mix(n_embd), f"{prefix}.time_mix_v": draw.mix(n_embd),
           f"{prefix}.time_mix_r": draw.mix(n_embd)}
    if version == "5.2":
        out[f"{prefix}.time_mix_g"] = draw.mix(n_embd)
        out[f"{prefix}.time_decay"] = draw.uniform(n_head, head_size, low=-6.0, high=1.0)  # w = exp(-exp(td))
        out[f"{prefix}.time_faaaa"] = draw.uniform(n_head, head_size)  # u = time_faaaa
    else:
        out[f"{prefix}.time_decay"] = draw.uniform(n_head, low=-6.0, high=1.0)  # [H]
        if v50_time_first:
            out[f"{prefix}.time_first"] = draw.uniform(n_head, low=-1.0, high=0.5)  # u = exp(time_first)
        else:
            out[f"{prefix}.time_faaaa"] = draw.uniform(n_head)
    for name in ("receptance", "key", "value"):
        out[f"{prefix}.{name}.weight"] = draw.linear(n_embd, n_embd)
    out[f"{prefix}.output.weight"] = draw.linear(n_embd, n_embd)
    if version == "5.2":
        out[f"{prefix}.gate.weight"] = draw.linear(n_embd, n_embd)
    out.update(draw.norm(f"{prefix}.ln_x", n_embd))
    return out


def _time_mix_v6(draw: _Draw, prefix: str, n_embd: int, head_size: int) -> dict[str, Tensor]:
    """As in the x060 files: the token-shift LoRA feeds w, k, v, r, g; the decay is per token and channel."""
    n_head = n_embd // head_size
    maa, decay = RANDOM_LORA["6"]
    out = {f"{prefix}.time_maa_{name}": draw.mix(n_embd) for name in ("x", "w", "k", "v", "r", "g")}
    out[f"{prefix}.time_maa_w1"] = draw.normal(n_embd, 5 * maa, std=0.3)
    out[f"{prefix}.time_maa_w2"] = draw.normal(5, maa, n_embd, std=0.3)
    out[f"{prefix}.time_decay"] = draw.uniform(1, 1, n_embd, low=-6.0, high=1.0)  # log_w = -exp(td + lora)
    out[f"{prefix}.time_decay_w1"] = draw.normal(n_embd, decay, std=0.3)
    out[f"{prefix}.time_decay_w2"] = draw.normal(decay, n_embd, std=0.3)
    out[f"{prefix}.time_faaaa"] = draw.uniform(n_head, head_size)
    for name in ("receptance", "key", "value", "gate", "output"):
        out[f"{prefix}.{name}.weight"] = draw.linear(n_embd, n_embd)
    out.update(draw.norm(f"{prefix}.ln_x", n_embd))
    return out


def _time_mix_v7(draw: _Draw, prefix: str, layer: int, n_embd: int, head_size: int,
                 v_in_first_layer: bool) -> dict[str, Tensor]:
    """As in the x070 files (key order of BlinkDL's); layer 0 has no v0/v1/v2 unless `v_in_first_layer`."""
    n_head = n_embd // head_size
    w_rank, a_rank, v_rank, g_rank = RANDOM_LORA["7"]
    out = {f"{prefix}.x_{name}": draw.mix(n_embd) for name in ("r", "w", "k", "v", "a", "g")}
    out[f"{prefix}.w1"] = draw.normal(n_embd, w_rank, std=0.3)
    out[f"{prefix}.w2"] = draw.normal(w_rank, n_embd, std=0.3)
    out[f"{prefix}.w0"] = draw.uniform(1, 1, n_embd, low=-3.0, high=2.0)
    out[f"{prefix}.a1"] = draw.normal(n_embd, a_rank, std=0.3)
    out[f"{prefix}.a2"] = draw.normal(a_rank, n_embd, std=0.3)
    out[f"{prefix}.a0"] = draw.uniform(1, 1, n_embd, low=-1.0, high=1.0)
    if layer > 0 or v_in_first_layer:
        out[f"{prefix}.v1"] = draw.normal(n_embd, v_rank, std=0.3)
        out[f"{prefix}.v2"] = draw.normal(v_rank, n_embd, std=0.3)
        out[f"{prefix}.v0"] = draw.uniform(1, 1, n_embd, low=-1.0, high=1.0)
    out[f"{prefix}.g1"] = draw.normal(n_embd, g_rank, std=0.3)
    out[f"{prefix}.g2"] = draw.normal(g_rank, n_embd, std=0.3)
    out[f"{prefix}.k_k"] = draw.uniform(1, 1, n_embd, low=0.5, high=1.5)
    out[f"{prefix}.k_a"] = draw.uniform(1, 1, n_embd)
    out[f"{prefix}.r_k"] = draw.normal(n_head, head_size, std=0.5)
    for name in ("receptance", "key", "value", "output"):
        out[f"{prefix}.{name}.weight"] = draw.linear(n_embd, n_embd)
    out.update(draw.norm(f"{prefix}.ln_x", n_embd))
    return out


def _channel_mix(draw: _Draw, prefix: str, n_embd: int, n_ffn: int) -> dict[str, Tensor]:
    return {
        f"{prefix}.time_mix_k": draw.mix(n_embd),
        f"{prefix}.time_mix_r": draw.mix(n_embd),
        f"{prefix}.key.weight": draw.linear(n_ffn, n_embd),
        f"{prefix}.receptance.weight": draw.linear(n_embd, n_embd),
        f"{prefix}.value.weight": draw.linear(n_embd, n_ffn),
    }


def make_state_dict(version: str, n_layer: int, n_embd: int, vocab_size: int = WORLD_VOCAB_SIZE,
                    head_size: int = HEAD_SIZE, seed: int = 0, dtype: torch.dtype = torch.float32,
                    v50_time_first: bool = False, n_ffn: int | None = None,
                    v7_v_in_first_layer: bool = False) -> dict[str, Tensor]:
    """A random RWKV checkpoint in the original `.pth` layout (key order as BlinkDL files have it).

    `v50_time_first` gives a 5.0 checkpoint `att.time_first [H]` (u = exp(time_first)) instead of
    `att.time_faaaa [H]`. `n_ffn` overrides the channel-mix width (default `ffn_dim(version, n_embd)`).
    Every tensor is contiguous, owns its storage and has `dtype`.
    Oracle caveat: the rwkv package detects 5.2 from key order (time_decay seen after some ln_x), so with the
    real order a 1-layer 5.2 file is reported as 5.1 there; use n_layer >= 2 for parity with it.
    """
    _check_version(version)
    if version != "4" and n_embd % head_size:
        raise ValueError(f"n_embd {n_embd} is not a multiple of head_size {head_size}")
    if v50_time_first and version != "5.0":
        raise ValueError("v50_time_first only applies to version '5.0'")
    draw = _Draw(seed)
    n_ffn = n_ffn or ffn_dim(version, n_embd)
    state = {"emb.weight": draw.normal(vocab_size, n_embd, std=0.5)}
    for layer in range(n_layer):
        block = f"blocks.{layer}"
        state.update(draw.norm(f"{block}.ln1", n_embd))
        state.update(draw.norm(f"{block}.ln2", n_embd))
        if layer == 0:
            state.update(draw.norm(f"{block}.ln0", n_embd))
        if version == "4":
            state.update(_time_mix_v4(draw, f"{block}.att", n_embd))
        elif version == "6":
            state.update(_time_mix_v6(draw, f"{block}.att", n_embd, head_size))
        elif version == "7":
            state.update(_time_mix_v7(draw, f"{block}.att", layer, n_embd, head_size, v7_v_in_first_layer))
        else:
            state.update(_time_mix_v5(draw, f"{block}.att", version, n_embd, head_size, v50_time_first))
        if version == "6":
            mixes = _channel_mix(draw, f"{block}.ffn", n_embd, n_ffn)
            state.update({key.replace("time_mix", "time_maa"): value for key, value in mixes.items()})
        elif version == "7":
            state[f"{block}.ffn.x_k"] = draw.mix(n_embd)
            state[f"{block}.ffn.key.weight"] = draw.linear(n_ffn, n_embd)
            state[f"{block}.ffn.value.weight"] = draw.linear(n_embd, n_ffn)
        else:
            state.update(_channel_mix(draw, f"{block}.ffn", n_embd, n_ffn))
    state.update(draw.norm("ln_out", n_embd))
    state["head.weight"] = draw.linear(vocab_size, n_embd, gain=4.0)  # logits span a few units
    return {key: tensor.to(dtype).contiguous() for key, tensor in state.items()}


def detect_shape(state_dict: Mapping[str, Tensor]) -> dict[str, int]:
    """n_layer, n_embd, vocab_size of an original-layout state dict (for config.json)."""
    vocab_size, n_embd = state_dict["emb.weight"].shape
    n_layer = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("blocks."))
    return {"n_layer": n_layer, "n_embd": int(n_embd), "vocab_size": int(vocab_size),
            "dim_att": int(state_dict["blocks.0.att.key.weight"].shape[0])}


# ---------------------------------------------------------------------------------------- .pth

def save_pth(state_dict: Mapping[str, Tensor], path: str | Path) -> Path:
    """Write the dict with torch.save, as BlinkDL's files are (each tensor saved with its own storage)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({key: tensor.detach().clone().contiguous() for key, tensor in state_dict.items()}, path)
    return path


# ---------------------------------------------------------------------------------------- HF layouts

def hf_key(name: str) -> str:
    """Original key -> transformers rwkv/rwkv5 key ('rwkv.' prefix on everything except head.weight)."""
    renamed = ".".join(HF_PART_NAMES.get(part, part) for part in name.split("."))
    return renamed if name == "head.weight" else f"rwkv.{renamed}"


def hf_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename only: HF conversions never transform or reshape a tensor."""
    return {hf_key(key): tensor for key, tensor in state_dict.items()}


def hf_rwkv4_config(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """config.json as published in RWKV/rwkv-4-world-169m (plus the architectures re-saved copies carry)."""
    shape = detect_shape(state_dict)
    return {
        "architectures": ["RwkvForCausalLM"],
        "attention_hidden_size": shape["dim_att"],
        "bos_token_id": 0,
        "context_length": 1024,
        "eos_token_id": 0,
        "hidden_size": shape["n_embd"],
        "intermediate_size": int(state_dict["blocks.0.ffn.key.weight"].shape[0]),
        "layer_norm_epsilon": 1e-05,
        "model_type": "rwkv",
        "num_hidden_layers": shape["n_layer"],
        "rescale_every": 6,
        "tie_word_embeddings": False,
        "transformers_version": "4.33.1",
        "use_cache": True,
        "vocab_size": shape["vocab_size"],
    }


def hf_rwkv5_config(state_dict: Mapping[str, Tensor], flavor: str = "world") -> dict[str, Any]:
    """config.json of RWKV/rwkv-5-world-1b5 @736bfe8 ("world") or RWKV/v5-Eagle-7B-HF @194fd29 ("eagle").

    The eagle flavor really says `"architectures": ["RwkvForCausalLM"]` with model_type "rwkv5", carries
    `model_version` ("5_2", or "5_0" for a 5.0 checkpoint as BBuf's 5.0 port expects) and `context_length`.
    """
    shape = detect_shape(state_dict)
    n_head = int(state_dict["blocks.0.att.time_decay"].shape[0])
    config: dict[str, Any] = {
        "architectures": ["Rwkv5ForCausalLM"],
        "auto_map": dict(RWKV5_AUTO_MAP),
        "attention_hidden_size": shape["dim_att"],
        "bos_token_id": 0,
        "eos_token_id": 0,
        "head_size": shape["dim_att"] // n_head,
        "hidden_size": shape["n_embd"],
        "intermediate_size": None,
        "layer_norm_epsilon": 1e-05,
        "model_type": "rwkv5",
        "num_attention_heads": n_head,
        "num_hidden_layers": shape["n_layer"],
        "rescale_every": 6,
        "tie_word_embeddings": False,
        "transformers_version": "4.34.0",
        "use_cache": True,
        "vocab_size": shape["vocab_size"],
    }
    if flavor == "eagle":
        del config["num_attention_heads"]
        gated = any(key.endswith(".att.gate.weight") for key in state_dict)
        config.update(architectures=["RwkvForCausalLM"], context_length=4096,
                      model_version="5_2" if gated else "5_0")
        config = dict(sorted(config.items()))
    elif flavor != "world":
        raise ValueError(f"flavor must be 'world' or 'eagle', got {flavor!r}")
    return config


def _apply_overrides(config: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    for key, value in (overrides or {}).items():
        if value is DROP:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def _split_shards(tensors: Mapping[str, Tensor], shards: int) -> list[dict[str, Tensor]]:
    """Consecutive groups of keys with roughly equal bytes; every group non-empty."""
    keys = list(tensors)
    if not 1 <= shards <= len(keys):
        raise ValueError(f"shards must be between 1 and {len(keys)}, got {shards}")
    sizes = [tensors[key].numel() * tensors[key].element_size() for key in keys]
    total, groups, start, running = sum(sizes), [], 0, 0
    for index, size in enumerate(sizes):
        running += size
        remaining_keys, remaining_groups = len(keys) - index - 1, shards - len(groups) - 1
        full = running >= total * (len(groups) + 1) / shards
        if remaining_groups and (full or remaining_keys == remaining_groups):
            groups.append(keys[start:index + 1])
            start = index + 1
    groups.append(keys[start:])
    return [{key: tensors[key] for key in group} for group in groups]


def _write_weights(tensors: Mapping[str, Tensor], out_dir: Path, fmt: str, shards: int) -> list[Path]:
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    stem, suffix = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    groups = _split_shards(tensors, shards)
    names = ([f"{stem}.{suffix}"] if shards == 1 else
             [f"{stem}-{i + 1:05d}-of-{shards:05d}.{suffix}" for i in range(shards)])
    for name, group in zip(names, groups):
        group = {key: tensor.detach().clone().contiguous() for key, tensor in group.items()}
        if fmt == "safetensors":
            from safetensors.torch import save_file
            save_file(group, str(out_dir / name), metadata={"format": "pt"})
        else:
            torch.save(group, out_dir / name)
    if shards > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {key: name for name, group in zip(names, groups) for key in group}}
        (out_dir / f"{stem}.{suffix}.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [out_dir / name for name in names]


def _write_json(path: Path, content: Any) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _save_hf(state_dict: Mapping[str, Tensor], out_dir: str | Path, fmt: str, shards: int,
             config: dict[str, Any], tokenizer_config: dict[str, Any]) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_weights(hf_state_dict(state_dict), out_dir, fmt, shards)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "special_tokens_map.json", {})
    return out_dir


def save_hf_rwkv4(state_dict: Mapping[str, Tensor], out_dir: str | Path, fmt: str = "safetensors",
                  shards: int = 1, config_overrides: Mapping[str, Any] | None = None) -> Path:
    """A transformers `rwkv` directory (RWKV/rwkv-4-world-* layout) for an RWKV-4 state dict.

    `config_overrides` replaces config.json fields (value DROP removes one), e.g. to reproduce the RWKV/ org's
    configs, which have no "architectures": `{"architectures": DROP}`.
    """
    if "blocks.0.att.time_first" not in state_dict or any(".ln_x." in key for key in state_dict):
        raise ValueError("save_hf_rwkv4 needs an RWKV-4 state dict")
    config = _apply_overrides(hf_rwkv4_config(state_dict), config_overrides)
    return _save_hf(state_dict, out_dir, fmt, shards, config, dict(RWKV4_TOKENIZER_CONFIG))


def save_hf_rwkv5(state_dict: Mapping[str, Tensor], out_dir: str | Path, fmt: str = "safetensors",
                  shards: int = 1, flavor: str = "world",
                  config_overrides: Mapping[str, Any] | None = None) -> Path:
    """An `rwkv5` remote-code directory (RWKV/rwkv-5-world-1b5 "world" or RWKV/v5-Eagle-7B-HF "eagle" config).

    The published repos ship one bf16 pytorch_model.bin; safetensors/shards are offered for loader coverage.
    `config_overrides` as in save_hf_rwkv4, e.g. the 3B's wrong head count: `{"num_attention_heads": 64}`.
    """
    if not any(".ln_x." in key for key in state_dict):
        raise ValueError("save_hf_rwkv5 needs an RWKV-5 state dict")
    config = _apply_overrides(hf_rwkv5_config(state_dict, flavor), config_overrides)
    tokenizer = dict(RWKV4_TOKENIZER_CONFIG if flavor == "eagle" else RWKV5_TOKENIZER_CONFIG)
    return _save_hf(state_dict, out_dir, fmt, shards, config, tokenizer)


def save_hf(state_dict: Mapping[str, Tensor], out_dir: str | Path, fmt: str = "safetensors",
            shards: int = 1, **options: Any) -> Path:
    """save_hf_rwkv4 or save_hf_rwkv5, whichever fits the state dict."""
    if any(".ln_x." in key for key in state_dict):
        return save_hf_rwkv5(state_dict, out_dir, fmt, shards, **options)
    return save_hf_rwkv4(state_dict, out_dir, fmt, shards, **options)


# ---------------------------------------------------------------------------------------- factory

@dataclass(frozen=True)
class TinyCheckpoint:
    """One built checkpoint. `path` is the .pth file or the HF directory; `oracle_pth` is always a .pth of the
    same weights (for the rwkv package). `state_dict()` returns a fresh copy of the original-layout weights."""

    version: str
    layout: str  # "pth" or "hf"
    path: Path
    oracle_pth: Path
    n_layer: int
    n_embd: int
    vocab_size: int
    head_size: int
    fmt: str = "pth"
    shards: int = 1
    _weights: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def state_dict(self) -> dict[str, Tensor]:
        return {key: tensor.clone() for key, tensor in self._weights.items()}


class CheckpointFactory:
    """Builds checkpoints under `root` on demand, once per distinct spec."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._built: dict[tuple, TinyCheckpoint] = {}

    def make(self, version: str, n_layer: int = 2, n_embd: int = 128, vocab_size: int = WORLD_VOCAB_SIZE,
             *, layout: str = "pth", fmt: str = "safetensors", shards: int = 1, seed: int = 0,
             dtype: torch.dtype = torch.float32, head_size: int = HEAD_SIZE, v50_time_first: bool = False,
             n_ffn: int | None = None, **hf_options: Any) -> TinyCheckpoint:
        """layout "pth" (fmt/shards ignored) or "hf" (fmt "safetensors"/"bin", shards, flavor=..., config_overrides=...)."""
        if layout not in ("pth", "hf"):
            raise ValueError(f"layout must be 'pth' or 'hf', got {layout!r}")
        weights_spec = (version, n_layer, n_embd, vocab_size, head_size, seed, str(dtype), v50_time_first, n_ffn)
        pth = self._pth(weights_spec)
        if layout == "pth":
            return pth
        spec = weights_spec + ("hf", fmt, shards, repr(sorted(hf_options.items(), key=str)))
        if spec not in self._built:
            out_dir = self.root / self._name(spec)
            save_hf(pth._weights, out_dir, fmt, shards, **hf_options)
            self._built[spec] = TinyCheckpoint(version, "hf", out_dir, pth.path, n_layer, n_embd, vocab_size,
                                               head_size, fmt, shards, pth._weights)
        return self._built[spec]

    def _pth(self, weights_spec: tuple) -> TinyCheckpoint:
        if weights_spec not in self._built:
            version, n_layer, n_embd, vocab_size, head_size, seed, dtype_name, v50_time_first, n_ffn = weights_spec
            dtype = getattr(torch, dtype_name.removeprefix("torch."))
            weights = make_state_dict(version, n_layer, n_embd, vocab_size, head_size, seed, dtype, v50_time_first,
                                      n_ffn)
            path = save_pth(weights, self.root / f"{self._name(weights_spec)}.pth")
            self._built[weights_spec] = TinyCheckpoint(version, "pth", path, path, n_layer, n_embd, vocab_size,
                                                       head_size, "pth", 1, weights)
        return self._built[weights_spec]

    @staticmethod
    def _name(spec: tuple) -> str:
        text = "-".join(str(part) for part in spec)
        digest = hashlib.sha1(text.encode()).hexdigest()[:10]
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60] + f"-{digest}"


# ---------------------------------------------------------------------------------------- RWKV-6/7 HF layouts
# The published layouts of the newer versions, written independently of rwkv_chat from the public converters:
# BBuf/RWKV-World-HF-Tokenizer scripts/convert_rwkv6_checkpoint_to_hf.py (RWKV/v6-Finch-*-HF: the v5 renames,
# values untouched) and fla-org/flash-linear-attention utils/convert_from_rwkv7.py (fla-hub/rwkv7-*).

RWKV6_AUTO_MAP = {"AutoConfig": "configuration_rwkv6.Rwkv6Config",
                  "AutoModelForCausalLM": "modeling_rwkv6.Rwkv6ForCausalLM"}
RWKV6_TOKENIZER_CONFIG = {"auto_map": {"AutoTokenizer": ["hf_rwkv_tokenizer.Rwkv6Tokenizer", None]},
                          "tokenizer_class": "Rwkv6Tokenizer", "bos_token": "<s>", "eos_token": "<s>",
                          "unk_token": "<s>", "add_bos_token": False}
FLA_RWKV7_BLOCK_PARTS = {"att": "attn", "ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
FLA_RWKV7_ATTN_PARTS = {"ln_x": "g_norm", "receptance": "r_proj", "key": "k_proj", "value": "v_proj",
                        "output": "o_proj"}  # the channel mix keeps `key`/`value`
FLA_RWKV7_MIXES = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")  # the rows of fla v1's stacked `attn.x_x`


def hf_rwkv6_config(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """config.json as in BBuf's rwkv6_model/config.json (the RWKV/v6-Finch-*-HF configs): no LoRA widths, an
    `intermediate_size` of null, remote code in `auto_map`."""
    shape = detect_shape(state_dict)
    return {"architectures": ["Rwkv6ForCausalLM"], "auto_map": dict(RWKV6_AUTO_MAP),
            "attention_hidden_size": shape["dim_att"], "bos_token_id": 0, "context_length": 4096, "eos_token_id": 0,
            "head_size": int(state_dict["blocks.0.att.time_faaaa"].shape[-1]), "hidden_size": shape["n_embd"],
            "intermediate_size": None, "layer_norm_epsilon": 1e-05, "model_type": "rwkv6",
            "num_hidden_layers": shape["n_layer"], "rescale_every": 6, "tie_word_embeddings": False,
            "transformers_version": "4.33.1", "use_cache": True, "vocab_size": shape["vocab_size"]}


def save_hf_rwkv6(state_dict: Mapping[str, Tensor], out_dir: str | Path, fmt: str = "bin", shards: int = 1,
                  config_overrides: Mapping[str, Any] | None = None) -> Path:
    """An RWKV/v6-Finch-*-HF directory (remote-code `rwkv6`) for an RWKV-6 state dict: the published repos ship
    pytorch_model.bin files; safetensors/shards are offered for loader coverage."""
    if "blocks.0.att.time_maa_x" not in state_dict:
        raise ValueError("save_hf_rwkv6 needs an RWKV-6 state dict")
    config = _apply_overrides(hf_rwkv6_config(state_dict), config_overrides)
    return _save_hf(state_dict, out_dir, fmt, shards, config, dict(RWKV6_TOKENIZER_CONFIG))


def fla_rwkv7_state_dict(state_dict: Mapping[str, Tensor], stacked_mixes: bool = False) -> dict[str, Tensor]:
    """An RWKV-7 state dict in fla's names and conventions: LoRAs as two Linear layers (`{w,a,v,g}_lora.lora.0`
    [D, C] = w1ᵀ, `lora.2` [C, D] = w2ᵀ, bias = w0/a0/v0), [1, 1, C] vectors as [C] (the token-shift mixes stay
    [1, 1, C], or are stacked into `attn.x_x` [6, C] as in fla's first version with `stacked_mixes`). Layer 0's
    v0/v1/v2, when the dict has them, are written too (fla's converter drops them; the loader must)."""
    out: dict[str, Tensor] = {}
    for key, tensor in state_dict.items():
        if key in ("emb.weight", "head.weight") or key.startswith("ln_out."):
            out[{"emb.weight": "model.embeddings.weight", "head.weight": "lm_head.weight"}.get(
                key, key.replace("ln_out.", "model.norm."))] = tensor
            continue
        parts = key.split(".")  # blocks, N, att|ffn|lnX, name, ...
        parts = ["model", "layers", parts[1], FLA_RWKV7_BLOCK_PARTS.get(parts[2], parts[2]), *parts[3:]]
        if parts[3] == "attn":
            parts[4] = FLA_RWKV7_ATTN_PARTS.get(parts[4], parts[4])
        name = parts[4] if len(parts) > 4 else ""
        if parts[3] == "attn" and re.fullmatch(r"[wavg][012]", name):
            lora, digit = name
            parts[4:] = [f"{lora}_lora", "lora", *{"0": ("2", "bias"), "1": ("0", "weight"), "2": ("2", "weight")}[digit]]
            tensor = tensor.reshape(-1) if digit == "0" else tensor.t()
        elif tuple(tensor.shape[:2]) == (1, 1) and not name.startswith("x_") or key.endswith(".ffn.x_k"):
            tensor = tensor.reshape(-1)  # k_k, k_a, ffn.x_k
        out[".".join(parts)] = tensor
    if stacked_mixes:
        for layer in sorted({key.split(".")[2] for key in out if key.startswith("model.layers.")}, key=int):
            prefix = f"model.layers.{layer}.attn"
            out[f"{prefix}.x_x"] = torch.cat([out.pop(f"{prefix}.{mix}").reshape(1, -1) for mix in FLA_RWKV7_MIXES])
    return out


def fla_rwkv7_config(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """config.json of an fla `rwkv7` model as fla's converter fills it (widths from the shapes)."""
    shape = detect_shape(state_dict)
    v1 = state_dict.get("blocks.1.att.v1")
    return {"architectures": ["RWKV7ForCausalLM"], "model_type": "rwkv7", "attn_mode": "chunk",
            "hidden_size": shape["n_embd"], "num_hidden_layers": shape["n_layer"], "vocab_size": shape["vocab_size"],
            "head_dim": int(state_dict["blocks.0.att.r_k"].shape[-1]), "num_heads": None,
            "intermediate_size": int(state_dict["blocks.0.ffn.key.weight"].shape[0]), "hidden_ratio": 4.0,
            "decay_low_rank_dim": int(state_dict["blocks.0.att.w1"].shape[1]),
            "a_low_rank_dim": int(state_dict["blocks.0.att.a1"].shape[1]),
            "v_low_rank_dim": int(v1.shape[1]) if v1 is not None else 32,
            "gate_low_rank_dim": int(state_dict["blocks.0.att.g1"].shape[1]),
            "value_dim": [shape["n_embd"]] * shape["n_layer"], "norm_first": True, "norm_bias": True,
            "norm_eps": 1e-05, "fuse_norm": True, "hidden_act": "sqrelu", "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "use_cache": True, "torch_dtype": "float32"}


def save_fla_rwkv7(state_dict: Mapping[str, Tensor], out_dir: str | Path, fmt: str = "safetensors",
                   shards: int = 1, stacked_mixes: bool = False) -> Path:
    """An fla-hub/rwkv7-* style directory (flash-linear-attention's `rwkv7` model type) for an RWKV-7 state dict."""
    if "blocks.0.att.r_k" not in state_dict:
        raise ValueError("save_fla_rwkv7 needs an RWKV-7 state dict")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_weights(fla_rwkv7_state_dict(state_dict, stacked_mixes), out_dir, fmt, shards)
    _write_json(out_dir / "config.json", fla_rwkv7_config(state_dict))
    return out_dir
