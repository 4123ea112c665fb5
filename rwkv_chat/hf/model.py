"""RWKV World models as transformers `PreTrainedModel`s: from_pretrained, save_pretrained, generate, pipelines.

Promises:
- `Rwkv4WorldForCausalLM` (transformers' `rwkv` config), `Rwkv5WorldForCausalLM` (`rwkv5_world`),
  `Rwkv6WorldForCausalLM` (`rwkv6_world`) and `Rwkv7WorldForCausalLM` (`rwkv7_world`) run this package's
  `RwkvModel` itself — the same modules, the same numerics as `load_model` — so logits equal the reference
  implementation's. Their parameters carry transformers' key names (`rwkv.embeddings.weight`,
  `rwkv.blocks.0.pre_ln.weight`, `rwkv.blocks.N.attention.time_mix_key`, `rwkv.blocks.N.attention.time_maa_x`,
  `rwkv.blocks.N.attention.w1`, ..., `head.weight`: the original names renamed part by part, hf_names.py), so
  `from_pretrained`/`save_pretrained` read and write the published rwkv/rwkv5/rwkv6 layouts directly.
- Only the projections take a low-precision dtype; every other parameter (embedding, norms, decays, mixes,
  LoRA matrices) is kept in fp32 when loading in bf16/fp16, as the loader does.
- The RNN state is a first-class cache: `forward` returns it as `cache` (an `RwkvCache`; named
  `past_key_values` before transformers 5.24, see `CACHE_NAME`) and as `state` (the `RwkvState`); `generate`
  carries it from step to step (the prompt is read in parallel once, then one token per step) and returns it
  with `return_dict_in_generate=True`. Feeding more text on top of a state:
  `generate(previous_sequences + new_ids, cache=cache)` (transformers' convention: the tokens the cache has
  read are skipped), or `generate(new_ids, cache=RwkvCache(state))` for a state from anywhere
  (`model(ids).state`, `RwkvModel.forward`). Both keyword names are accepted by `forward` on every supported
  transformers version. States passed in are never changed.
- Batches may be padded on either side: positions whose attention_mask is 0 are not read at all.
- Greedy, sampling and beam search work; `labels` give the usual shifted cross-entropy loss.

Not supported: training (the core runs under no_grad), `inputs_embeds`, hidden states/attentions outputs,
fp16 without overflow for RWKV-4 World (use bf16 or fp32), layers spread over several devices or offloaded
(`device_map="auto"` keeps the layers together; they must fit one device). flash-linear-attention's `rwkv7`
directories are not loaded by these classes (their tensors differ, not only their names): `load_model` reads
them, and `python -m rwkv_chat.hf.convert` turns them into `rwkv7_world` directories.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, RwkvConfig as TransformersRwkvConfig
from transformers.generation import utils as generation_utils
from transformers.modeling_outputs import ModelOutput

from ..loading.hf_names import ORIGINAL_TO_HF
from ..models import architecture_for, model as core
from ..models.layers import Projection
from ..state import RwkvState
from .config import (Rwkv5WorldConfig, Rwkv6WorldConfig, Rwkv7WorldConfig, core_config, fit_config_to_weights,
                     hf_config_for)

# The name transformers gives the cache in model outputs and in generate()'s model keyword arguments:
# `cache` from 5.24 on (the old names still work there, with a deprecation warning), `past_key_values` before.
CACHE_NAME = "cache" if "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


# ------------------------------------------------------------------------------------ transformers' names

class _TransformersNames:
    """Mixin for a models/ module whose parameters/children were moved to transformers' names.

    The module's forward code keeps using its own names (`self.att`, `self.time_mix_k`); each alias resolves
    to the new place (a dotted path is followed attribute by attribute).
    """

    ALIASES: dict[str, str] = {}

    def __getattr__(self, name):
        target = type(self).ALIASES.get(name)
        if target is None:
            return super().__getattr__(name)
        return functools.reduce(getattr, target.split("."), self)


class RwkvWorldCore(_TransformersNames, core.RwkvModel):
    """An `RwkvModel` whose embedding is `embeddings`, whose ln0 is `blocks.0.pre_ln` and whose head lives
    on the owning causal-LM model (transformers keeps `head.weight` outside the `rwkv.` prefix)."""

    ALIASES = {"emb": "embeddings", "ln0": "blocks.0.pre_ln", "head": "lm_head_ref"}


@functools.cache
def _renamed_class(cls: type, aliases: tuple[tuple[str, str], ...]) -> type:
    """`cls` with `aliases` (original name -> transformers' name) readable under the original names."""
    return type(f"RwkvWorld{cls.__name__}", (_TransformersNames, cls), {"ALIASES": dict(aliases),
                                                                         "__module__": __name__})


def _move(module: nn.Module, old: str, new: str) -> None:
    """Rename a parameter or child in place, keeping its position (state_dict order follows it)."""
    for table in (module._parameters, module._modules):
        if old in table:
            items = [(new if key == old else key, value) for key, value in table.items()]
            table.clear()
            table.update(items)
            return


def with_transformers_names(model: core.RwkvModel) -> tuple[RwkvWorldCore, nn.Module]:
    """Rename `model`'s parameters in place to transformers' names; returns (the model, its detached head).

    The model keeps working (its code reads the old names through aliases); its state_dict keys become
    `embeddings.weight`, `blocks.0.pre_ln.weight`, `blocks.N.attention.time_mix_key`, ... (hf_names.py) and
    the head is no longer one of its submodules (attach it with `set_head`).
    """
    for module in list(model.modules())[1:]:  # every submodule; the model's own names are moved below
        names = [*module._parameters, *module._modules]
        aliases = tuple((old, ORIGINAL_TO_HF[old]) for old in names if old in ORIGINAL_TO_HF)
        if aliases:
            for old, new in aliases:
                _move(module, old, new)
            module.__class__ = _renamed_class(type(module), aliases)
    model.blocks[0].pre_ln = model._modules.pop("ln0")
    _move(model, "emb", "embeddings")
    head = model._modules.pop("head")
    model.__class__ = RwkvWorldCore
    set_head(model, head)
    return model, head


def set_head(model: RwkvWorldCore, head: nn.Module) -> None:
    """Point the core's head alias at `head` without registering it (its owner registers it)."""
    model.__dict__["lm_head_ref"] = head


# ------------------------------------------------------------------------------------ cache and outputs

class RwkvCache:
    """The RNN state in the role of transformers' `past_key_values`.

    `state` is an `RwkvState` (batch B); `seen_tokens` counts the input positions read so far (padding
    included), which is what `generate` subtracts when it is given a whole sequence plus new tokens. A cache
    is never changed by the model: every forward returns a new one, so a cache can be reused to branch.
    """

    is_compileable = False
    is_croppable = False
    # transformers >= 5.24 slices the positions a cache has read off generate()'s input_ids unless every layer
    # is "linear" (its recurrent caches do not count positions). This cache counts them (`seen_tokens`), so
    # generate(previous + new, cache=...) reads only the new tokens, as on earlier versions.
    is_linear = (False,)

    def __init__(self, state: RwkvState, seen_tokens: int = 0):
        self.state = state
        self.seen_tokens = seen_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    def __repr__(self) -> str:
        return f"RwkvCache(batch={self.batch_size}, seen_tokens={self.seen_tokens})"


RwkvWorldCausalLMOutput = dataclasses.make_dataclass(
    "RwkvWorldCausalLMOutput",
    [("loss", "torch.Tensor | None", None), ("logits", "torch.Tensor | None", None),
     (CACHE_NAME, "RwkvCache | None", None), ("state", "RwkvState | None", None)],
    bases=(ModelOutput,), namespace={"__module__": __name__})
RwkvWorldCausalLMOutput.__doc__ = (
    "loss (with labels), logits [B, T or logits_to_keep, vocab] fp32, the cache (`RwkvCache`, under "
    "`CACHE_NAME`) and state (the same `RwkvState`, for `model(ids, state=out.state)`).")


# ------------------------------------------------------------------------------------ checkpoint shapes

def checkpoint_shapes(directory: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a transformers checkpoint directory (safetensors headers or mmap'd .bin files);
    {} when they cannot be read cheaply."""
    directory = Path(directory)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(directory.glob("*.safetensors")):
        from safetensors import safe_open
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    if not shapes:
        for file in sorted(directory.glob("pytorch_model*.bin")):
            try:
                tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped: not worth a full read
                return {}
            shapes.update({key: tuple(tensor.shape) for key, tensor in tensors.items()})
    return shapes


# ------------------------------------------------------------------------------------ models

def fp32_parameter_patterns(model: nn.Module) -> list[str]:
    """Anchored regexes of `model`'s parameters that stay fp32 when it is loaded in bf16/fp16: all but the
    projections (the matrices that are multiplied), the loader's rule. transformers matches them against the
    checkpoint's key names."""
    projections = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Projection)}
    return [f"^{re.escape(name)}$" for name, _ in model.named_parameters() if name not in projections]


class RwkvWorldPreTrainedModel(PreTrainedModel):
    """Shared plumbing of the causal-LM classes of every version."""

    base_model_prefix = "rwkv"
    main_input_name = "input_ids"
    # The state is stacked across layers on one device, so accelerate must not spread the layers out.
    _no_split_modules = ["RwkvWorldCore"]
    # set per model by `_attach` (fp32_parameter_patterns): which parameters stay fp32 depends on the architecture
    _keep_in_fp32_modules_strict = None
    _is_stateful = True
    supports_gradient_checkpointing = False

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the projections compute in (norms, decays and the embedding stay fp32)."""
        return self.head.weight.dtype

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Plausible values for a model built from a config alone (loaded weights are left untouched)."""
        from transformers import initialization as init

        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        else:  # the time and channel mixes' own vectors (decays, bonuses, token-shift mixes)
            for name, param in module.named_parameters(recurse=False):
                value = {"time_decay": -1.0, "time_first": 0.0, "time_faaaa": 0.5}.get(name, 0.5)
                init.constant_(param, value)


class _RwkvWorldForCausalLM(RwkvWorldPreTrainedModel, GenerationMixin):
    """Causal LM around an `RwkvWorldCore` (attribute `rwkv`) and its head (attribute `head`)."""

    def __init__(self, config):
        super().__init__(config)
        self._attach(core.RwkvModel(core_config(config)))
        self.post_init()

    def _attach(self, model: core.RwkvModel) -> None:
        renamed, head = with_transformers_names(model)
        self.rwkv = renamed
        self.head = head
        self._keep_in_fp32_modules_strict = fp32_parameter_patterns(self)

    @classmethod
    def from_rwkv_model(cls, model: core.RwkvModel):
        """Wrap an already loaded `RwkvModel` (e.g. from `load_model`) without copying its weights.

        The model is adopted: its parameters are renamed in place (it keeps working on its own).
        """
        if isinstance(model, RwkvWorldCore):
            raise ValueError("this RwkvModel already belongs to a transformers model")
        config = hf_config_for(model.config, dtype=model.dtype)
        if not isinstance(config, cls.config_class):
            raise ValueError(f"{cls.__name__} cannot hold an RWKV-{model.config.version} model; use "
                             "causal_lm_class_for(version)")
        with torch.device("meta"):
            wrapper = cls(config)
        wrapper._attach(model)
        wrapper.eval()
        return wrapper

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        """transformers' from_pretrained, with the shape fields of config.json corrected from the weights
        when they are in a local directory (published configs carry wrong vocab sizes and head counts)."""
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():
            if config is None:
                config = cls.config_class.from_pretrained(path)
            shapes = checkpoint_shapes(path / kwargs.get("subfolder", ""))
            if shapes:
                fit_config_to_weights(config, shapes)
        return super().from_pretrained(pretrained_model_name_or_path, *args, config=config, **kwargs)

    # -------------------------------------------------------------------------------- embeddings
    def get_input_embeddings(self) -> nn.Module:
        return self.rwkv.embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.rwkv.embeddings = value

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.head = value
        set_head(self.rwkv, value)

    # -------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: RwkvCache | None = None, state: RwkvState | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                return_dict: bool | None = None, logits_to_keep: int = 0, inputs_embeds=None,
                past_key_values: RwkvCache | None = None, **kwargs):
        """Read `input_ids` [B, T] after the cache's (or `state`'s) state; positions with attention_mask 0 are
        skipped. Returns logits of the last `logits_to_keep` positions (0 = all) and the new state.
        `past_key_values` is the cache's name before transformers 5.24."""
        if inputs_embeds is not None:
            raise ValueError("RWKV World models take input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError("input_ids are required")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the cache once, as `cache` (or `past_key_values` before transformers 5.24)")
        cache = cache if cache is not None else past_key_values
        ids = input_ids.to(self.rwkv.device)
        batch, length = ids.shape
        start = cache.state if cache is not None else state
        start = self._broadcast_state(start, batch)
        keep_all = labels is not None or logits_to_keep != 1
        mask = None if attention_mask is None else attention_mask[:, -length:].to(ids.device).bool()
        if length == 1 and (mask is None or bool(mask.all())):
            logits, new_state = self.rwkv.decode_batch(ids[:, 0], start)
            logits = logits.unsqueeze(1)  # [B, 1, V]
        else:
            logits, new_state = self._read_rows(ids, mask, start, keep_all)
        if keep_all and logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels.to(logits.device),
                                      vocab_size=self.config.vocab_size, **kwargs)
        seen = (cache.seen_tokens if cache is not None else 0) + length
        new_cache = RwkvCache(new_state, seen) if use_cache else None
        output = RwkvWorldCausalLMOutput(loss=loss, logits=logits, state=new_state if use_cache else None,
                                         **{CACHE_NAME: new_cache})
        return output if return_dict else output.to_tuple()

    def _broadcast_state(self, state: RwkvState | None, batch: int) -> RwkvState | None:
        """A state for `batch` rows: a batch of one is shared by every row, a batch of k by batch/k rows each
        (what generate's num_return_sequences and beam search expect)."""
        if state is None or state.batch_size == batch:
            return state
        if batch % state.batch_size:
            raise ValueError(f"the state holds {state.batch_size} sequences but input_ids has {batch} rows")
        repeats = batch // state.batch_size
        return RwkvState(state.shift.repeat_interleave(repeats, dim=0), state.wkv.repeat_interleave(repeats, dim=0))

    def _read_rows(self, ids: torch.Tensor, mask: torch.Tensor | None, start: RwkvState | None, keep_all: bool):
        """Each row read on its own (its unmasked tokens only) -> (logits [B, T or 1, V], batched state)."""
        batch, length = ids.shape
        vocab = self.config.vocab_size
        logits = torch.zeros(batch, length if keep_all else 1, vocab, dtype=torch.float32, device=ids.device)
        states = []
        for row in range(batch):
            row_state = None if start is None else start[row]
            positions = torch.arange(length, device=ids.device)
            if mask is not None:
                positions = positions[mask[row]]
            if positions.numel() == 0:  # nothing to read: the row's state is unchanged
                states.append(row_state.clone() if row_state is not None else self.rwkv.zero_state())
                continue
            row_logits, row_state = self.rwkv.forward(ids[row, positions], row_state, all_logits=keep_all)
            if keep_all:
                logits[row, positions] = row_logits
            else:
                logits[row, 0] = row_logits
            states.append(row_state)
        return logits, RwkvState.stack(states)

    # -------------------------------------------------------------------------------- generation
    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, **kwargs):
        if next_sequence_length is not None and next_sequence_length <= 0:
            seen = input_ids.shape[1] - next_sequence_length
            raise ValueError(
                f"the cache has already read {seen} positions but input_ids holds {input_ids.shape[1]}: pass the "
                "whole sequence (previous output + new tokens), or RwkvCache(state) to read new tokens only")
        return super().prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length,
                                                     **kwargs)

    def _reorder_cache(self, cache: RwkvCache, beam_idx: torch.LongTensor) -> RwkvCache:
        """Beam search: rows of the state follow their beams."""
        index = beam_idx.to(cache.state.device)
        state = RwkvState(cache.state.shift.index_select(0, index), cache.state.wkv.index_select(0, index))
        return RwkvCache(state, cache.seen_tokens)


class Rwkv4WorldForCausalLM(_RwkvWorldForCausalLM):
    """RWKV-4 (World or Pile) with transformers' `rwkv` configuration and key names."""

    config_class = TransformersRwkvConfig


class Rwkv5WorldForCausalLM(_RwkvWorldForCausalLM):
    """RWKV-5.0 / 5.2 World with the `rwkv5_world` configuration and the published `rwkv5` key names."""

    config_class = Rwkv5WorldConfig


class Rwkv6WorldForCausalLM(_RwkvWorldForCausalLM):
    """RWKV-6 (Finch) World with the `rwkv6_world` configuration and the published `rwkv6` key names."""

    config_class = Rwkv6WorldConfig


class Rwkv7WorldForCausalLM(_RwkvWorldForCausalLM):
    """RWKV-7 (Goose) World / G1 with the `rwkv7_world` configuration; its key names are the original ones
    renamed as for the other versions (`rwkv.blocks.N.attention.w1`, `rwkv.blocks.N.feed_forward.x_k`, ...)."""

    config_class = Rwkv7WorldConfig


CAUSAL_LM_CLASSES = {"RWKV-4": Rwkv4WorldForCausalLM, "RWKV-5": Rwkv5WorldForCausalLM,
                     "RWKV-6": Rwkv6WorldForCausalLM, "RWKV-7": Rwkv7WorldForCausalLM}  # by family


def causal_lm_class_for(version: str) -> type[_RwkvWorldForCausalLM]:
    """The transformers class for an architecture version ("4", "5.0", "5.2", "6", "7")."""
    return CAUSAL_LM_CLASSES[architecture_for(version).family]
