"""Hugging Face configurations for RWKV World models and the bridge to this package's `RwkvConfig`.

Promises:
- RWKV-4 directories use transformers' own `rwkv` configuration (`transformers.RwkvConfig`) unchanged, so
  plain transformers can read them.
- RWKV-5 (5.0, 5.2) directories use `Rwkv5WorldConfig`, model type "rwkv5_world". The published `rwkv5`
  layout (RWKV/rwkv-5-world-*, RWKV/v5-Eagle-7B-HF) is read by the same class (hf/register.py maps "rwkv5" to it);
  its `auto_map` (remote code) is dropped, and its unreliable fields (`num_attention_heads`,
  `head_size_divisor`) are ignored. `model_version` ("5_0"/"5_2") sets the architecture when present.
- `core_config(hf_config)` gives the `RwkvConfig` the math runs with; `hf_config_for(core)` the reverse;
  `fit_config_to_weights` corrects a configuration from the tensor shapes of a checkpoint (shapes are the
  truth: published configs carry wrong vocab sizes and head counts).

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
PUBLISHED_RWKV5_MODEL_TYPE = "rwkv5"  # the remote-code layout published under RWKV/
DEFAULT_CONTEXT_LENGTH = 4096  # informational only: an RNN reads any length
# config.json fields of the published rwkv5 layout that this package does not use or does not trust
IGNORED_RWKV5_FIELDS = ("auto_map", "num_attention_heads", "head_size_divisor", "model_version")


RWKV5_VERSIONS = ("5.0", "5.2")


class Rwkv5WorldConfig(PreTrainedConfig):
    r"""Shape of an RWKV-5 World model (architecture 5.0 or 5.2) in transformers' conventions.

    rwkv_version (`str`): "5.0" or "5.2" (read from `model_version` "5_0"/"5_2" of published configs;
        "5.2" when absent, as for every published v2 model).
    hidden_size / attention_hidden_size / intermediate_size: C, A (defaults to C) and F (defaults to the
        version's rule). head_size: 64 for every World model. context_length: informational only.
    rescale_every: the fp16 guard interval of the original code (kept for compatibility; not applied).
    """

    model_type = RWKV5_MODEL_TYPE
    attribute_map = {"max_position_embeddings": "context_length"}

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
        model_version = kwargs.get("model_version")
        for field in IGNORED_RWKV5_FIELDS:
            kwargs.pop(field, None)
        if self.rwkv_version is None:
            self.rwkv_version = {"5_0": "5.0", "5.0": "5.0"}.get(str(model_version), "5.2")
        if self.rwkv_version not in RWKV5_VERSIONS:
            raise ValueError(f"rwkv_version must be one of {RWKV5_VERSIONS}, got {self.rwkv_version!r}")
        if self.attention_hidden_size is None:
            self.attention_hidden_size = self.hidden_size
        if self.intermediate_size is None:
            self.intermediate_size = architecture_for(self.rwkv_version).default_ffn_size(self.hidden_size)
        super().__post_init__(**kwargs)


def core_config(config: PreTrainedConfig) -> RwkvConfig:
    """The `RwkvConfig` of a transformers `rwkv` config or an `Rwkv5WorldConfig`."""
    if isinstance(config, Rwkv5WorldConfig):
        return RwkvConfig(config.rwkv_version, config.num_hidden_layers, config.hidden_size,
                          config.attention_hidden_size, config.intermediate_size, config.vocab_size,
                          config.head_size)
    if config.model_type == "rwkv":
        hidden = config.hidden_size
        return RwkvConfig("4", config.num_hidden_layers, hidden, config.attention_hidden_size or hidden,
                          config.intermediate_size or 4 * hidden, config.vocab_size)
    raise ValueError(f"not an RWKV World configuration: model type {config.model_type!r}")


def hf_config_for(core: RwkvConfig, **extra) -> PreTrainedConfig:
    """A transformers configuration for `core`: `rwkv` for RWKV-4, `rwkv5_world` for RWKV-5."""
    common = dict(vocab_size=core.vocab_size, hidden_size=core.n_embd, num_hidden_layers=core.n_layer,
                  attention_hidden_size=core.dim_att, intermediate_size=core.dim_ffn,
                  context_length=DEFAULT_CONTEXT_LENGTH, bos_token_id=0, eos_token_id=0,
                  tie_word_embeddings=False)
    if core.version in RWKV5_VERSIONS:
        return Rwkv5WorldConfig(**common, head_size=core.head_size, rwkv_version=core.version, **extra)
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
    rwkv5_family = core.version in RWKV5_VERSIONS
    if rwkv5_family != isinstance(config, Rwkv5WorldConfig):
        raise ValueError(f"the weights are {core.architecture.family} but config.json says model type "
                         f"{config.model_type!r}")
    config.vocab_size, config.hidden_size = core.vocab_size, core.n_embd
    config.num_hidden_layers, config.attention_hidden_size = core.n_layer, core.dim_att
    config.intermediate_size = core.dim_ffn
    if rwkv5_family:
        if "rwkv.blocks.0.attention.time_faaaa" not in shapes:
            raise ValueError("this RWKV-5.0 directory stores attention.time_first instead of time_faaaa; convert "
                             "the original .pth with `python -m rwkv_chat.hf.convert` instead")
        config.rwkv_version, config.head_size = core.version, core.head_size
