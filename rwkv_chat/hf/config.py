"""Hugging Face configurations for RWKV World models and the bridge to this package's `RwkvConfig`.

Promises:
- RWKV-4 directories use transformers' own `rwkv` configuration (`transformers.RwkvConfig`) unchanged, so
  plain transformers can read them.
- RWKV-5 (5.0, 5.2), RWKV-6 and RWKV-7 directories use this package's configurations, one per family, all
  sharing `RwkvWorldConfigBase`: `Rwkv5WorldConfig` ("rwkv5_world"), `Rwkv6WorldConfig` ("rwkv6_world"),
  `Rwkv7WorldConfig` ("rwkv7_world"). These names are nobody else's (not transformers' `rwkv`, not the
  remote-code `rwkv5`/`rwkv6`, not flash-linear-attention's `rwkv7`), so nothing ever asks for remote code.
- The published remote-code layouts `rwkv5` (RWKV/rwkv-5-world-*, RWKV/v5-Eagle-7B-HF) and `rwkv6`
  (RWKV/v6-Finch-*-HF) are read by the same classes (hf/register.py maps those model types to them); their
  `auto_map` (remote code) is dropped and their unreliable fields (`num_attention_heads`, `head_size_divisor`)
  are ignored. `model_version` ("5_0"/"5_2") sets an RWKV-5 architecture when present.
- Every configuration carries `rwkv_version`, the head size and the LoRA widths of its time mix (RWKV-6:
  `time_mix_extra_dim`, `time_decay_extra_dim`; RWKV-7: `decay_low_rank_dim`, `a_low_rank_dim`,
  `v_low_rank_dim`, `gate_low_rank_dim`; absent ones default to the published models' widths).
- `core_config(hf_config)` gives the `RwkvConfig` the math runs with; `hf_config_for(core)` the reverse;
  `fit_config_to_weights` corrects a configuration from the tensor shapes of a checkpoint (shapes are the
  truth: published configs carry wrong vocab sizes and head counts, and no LoRA widths).

Knows nothing of weights' values, files or tokenizers.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from transformers import PreTrainedConfig

from ..loading.hf_names import original_key
from ..models import RwkvConfig, architecture_for
from ..tokenizer import VOCAB_SIZE

RWKV5_MODEL_TYPE = "rwkv5_world"
RWKV6_MODEL_TYPE = "rwkv6_world"
RWKV7_MODEL_TYPE = "rwkv7_world"
PUBLISHED_RWKV5_MODEL_TYPE = "rwkv5"  # the remote-code layout published under RWKV/
PUBLISHED_RWKV6_MODEL_TYPE = "rwkv6"  # RWKV/v6-Finch-*-HF (remote code)
DEFAULT_CONTEXT_LENGTH = 4096  # informational only: an RNN reads any length
# config.json fields of the published remote-code layouts that this package does not use or does not trust
IGNORED_PUBLISHED_FIELDS = ("auto_map", "num_attention_heads", "head_size_divisor")

RWKV5_VERSIONS = ("5.0", "5.2")


class RwkvWorldConfigBase(PreTrainedConfig):
    r"""What every RWKV-5/6/7 World configuration holds; a subclass per family sets `versions` (the
    architecture versions it describes, the last one the default) and `lora_fields` (its LoRA width fields, in
    the order of `RwkvConfig.lora`).

    rwkv_version (`str`): the architecture version (one of the class's `versions`).
    hidden_size / attention_hidden_size / intermediate_size: C, A (defaults to C) and F (defaults to the
        version's rule). head_size: 64 for every published model. context_length: informational only.
    rescale_every: the fp16 guard interval of the original code (kept for compatibility; not applied).
    """

    attribute_map = {"max_position_embeddings": "context_length"}
    # class attributes, not fields (no annotations), set by each family
    versions = ()
    lora_fields = ()

    vocab_size: int = VOCAB_SIZE
    context_length: int = DEFAULT_CONTEXT_LENGTH
    hidden_size: int = 768
    num_hidden_layers: int = 12
    attention_hidden_size: int | None = None
    intermediate_size: int | None = None
    head_size: int = 64
    rwkv_version: str | None = None
    layer_norm_epsilon: float = 1e-5
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = 0
    rescale_every: int = 6
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        for field in IGNORED_PUBLISHED_FIELDS:
            kwargs.pop(field, None)
        if self.rwkv_version is None:
            self.rwkv_version = self.versions[-1]
        if self.rwkv_version not in self.versions:
            raise ValueError(f"rwkv_version must be one of {self.versions} for model type {self.model_type!r}, "
                             f"got {self.rwkv_version!r}")
        architecture = architecture_for(self.rwkv_version)
        if self.attention_hidden_size is None:
            self.attention_hidden_size = self.hidden_size
        if self.intermediate_size is None:
            self.intermediate_size = architecture.default_ffn_size(self.hidden_size)
        for field, width in zip(self.lora_fields, architecture.default_lora(self.hidden_size)):
            if getattr(self, field) is None:
                setattr(self, field, width)
        super().__post_init__(**kwargs)

    @staticmethod
    def check_weights(shapes: Mapping[str, Sequence[int]]) -> None:
        """Refuse a checkpoint (transformers key names -> shapes) whose layout the model class cannot hold."""

    def lora(self) -> tuple[int, ...]:
        """The LoRA widths in `RwkvConfig.lora` order."""
        return tuple(getattr(self, field) for field in self.lora_fields)


class Rwkv5WorldConfig(RwkvWorldConfigBase):
    r"""Shape of an RWKV-5 World model (architecture 5.0 or 5.2); see `RwkvWorldConfigBase`.

    rwkv_version: "5.0" or "5.2" (read from `model_version` "5_0"/"5_2" of published configs; "5.2" when absent,
        as for every published v2 model).
    """

    model_type = RWKV5_MODEL_TYPE
    versions = RWKV5_VERSIONS

    def __post_init__(self, **kwargs):
        model_version = kwargs.pop("model_version", None)
        if self.rwkv_version is None:
            self.rwkv_version = {"5_0": "5.0", "5.0": "5.0"}.get(str(model_version), "5.2")
        super().__post_init__(**kwargs)

    @staticmethod
    def check_weights(shapes: Mapping[str, Sequence[int]]) -> None:
        if "rwkv.blocks.0.attention.time_faaaa" not in shapes:
            raise ValueError("this RWKV-5.0 directory stores attention.time_first instead of time_faaaa; convert "
                             "the original .pth with `python -m rwkv_chat.hf.convert` instead")


class Rwkv6WorldConfig(RwkvWorldConfigBase):
    r"""Shape of an RWKV-6 (Finch) World model; see `RwkvWorldConfigBase`.

    time_mix_extra_dim / time_decay_extra_dim: the LoRA widths of the data-dependent token shift (D of
        `time_maa_w1` [C, 5D]) and of the decay (`time_decay_w1` [C, D2]); 32/64 below C = 4096, 64/128 from it.
    """

    model_type = RWKV6_MODEL_TYPE
    versions = ("6",)
    lora_fields = ("time_mix_extra_dim", "time_decay_extra_dim")

    time_mix_extra_dim: int | None = None
    time_decay_extra_dim: int | None = None


class Rwkv7WorldConfig(RwkvWorldConfigBase):
    r"""Shape of an RWKV-7 (Goose) World or G1 model; see `RwkvWorldConfigBase`.

    decay_low_rank_dim / a_low_rank_dim / v_low_rank_dim / gate_low_rank_dim: the widths of the LoRAs of the
        decay (w1), the in-context learning rate (a1), the value residual (v1) and the gate (g1).
    """

    model_type = RWKV7_MODEL_TYPE
    versions = ("7",)
    lora_fields = ("decay_low_rank_dim", "a_low_rank_dim", "v_low_rank_dim", "gate_low_rank_dim")

    decay_low_rank_dim: int | None = None
    a_low_rank_dim: int | None = None
    v_low_rank_dim: int | None = None
    gate_low_rank_dim: int | None = None


WORLD_CONFIG_CLASSES: tuple[type[RwkvWorldConfigBase], ...] = (Rwkv5WorldConfig, Rwkv6WorldConfig, Rwkv7WorldConfig)


def core_config(config: PreTrainedConfig) -> RwkvConfig:
    """The `RwkvConfig` of a transformers `rwkv` config or one of this package's World configs."""
    if isinstance(config, RwkvWorldConfigBase):
        return RwkvConfig(config.rwkv_version, config.num_hidden_layers, config.hidden_size,
                          config.attention_hidden_size, config.intermediate_size, config.vocab_size,
                          config.head_size, config.lora())
    if config.model_type == "rwkv":
        hidden = config.hidden_size
        return RwkvConfig("4", config.num_hidden_layers, hidden, config.attention_hidden_size or hidden,
                          config.intermediate_size or 4 * hidden, config.vocab_size)
    raise ValueError(f"not an RWKV World configuration: model type {config.model_type!r}")


def world_config_class_for(version: str) -> type[RwkvWorldConfigBase] | None:
    """This package's configuration class for an architecture version; None for RWKV-4 (transformers' own)."""
    architecture_for(version)  # refuses unknown versions
    return next((cls for cls in WORLD_CONFIG_CLASSES if version in cls.versions), None)


def hf_config_for(core: RwkvConfig, **extra) -> PreTrainedConfig:
    """A transformers configuration for `core`: `rwkv` for RWKV-4, this package's World config otherwise."""
    common = dict(vocab_size=core.vocab_size, hidden_size=core.n_embd, num_hidden_layers=core.n_layer,
                  attention_hidden_size=core.dim_att, intermediate_size=core.dim_ffn,
                  context_length=DEFAULT_CONTEXT_LENGTH, bos_token_id=0, eos_token_id=0,
                  tie_word_embeddings=False)
    config_class = world_config_class_for(core.version)
    if config_class is not None:
        return config_class(**common, head_size=core.head_size, rwkv_version=core.version,
                            **dict(zip(config_class.lora_fields, core.lora)), **extra)
    from transformers.models.rwkv.configuration_rwkv import RwkvConfig as TransformersRwkvConfig

    return TransformersRwkvConfig(**common, **extra)


def fit_config_to_weights(config: PreTrainedConfig, shapes: Mapping[str, Sequence[int]]) -> None:
    """Set the shape fields of `config` from a checkpoint's tensor shapes (transformers key names).

    Raises ValueError when the weights are not an RWKV model of the config's family.
    """
    if "rwkv.embeddings.weight" not in shapes:
        raise ValueError("the checkpoint has no rwkv.embeddings.weight: not an RWKV model in transformers' layout")
    # the architecture reads its version and shapes from the original names (meta tensors: shapes only)
    weights = {original_key(key): torch.empty(tuple(shape), device="meta") for key, shape in shapes.items()}
    core = RwkvConfig.from_state_dict(weights)
    world = isinstance(config, RwkvWorldConfigBase)
    if core.version not in (config.versions if world else ("4",)):
        raise ValueError(f"the weights are {core.architecture.family} (architecture {core.version}) but "
                         f"config.json says model type {config.model_type!r}")
    config.vocab_size, config.hidden_size = core.vocab_size, core.n_embd
    config.num_hidden_layers, config.attention_hidden_size = core.n_layer, core.dim_att
    config.intermediate_size = core.dim_ffn
    if world:
        config.check_weights(shapes)
        config.rwkv_version, config.head_size = core.version, core.head_size
        for field, width in zip(config.lora_fields, core.lora):
            setattr(config, field, width)
