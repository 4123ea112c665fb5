"""Teach transformers' Auto classes this package's RWKV World classes, so no remote code is ever needed.

After registration:
- AutoConfig reads this package's model types "rwkv5_world", "rwkv6_world" and "rwkv7_world" and the published
  remote-code layouts "rwkv5" (with `Rwkv5WorldConfig`) and "rwkv6" (RWKV/v6-Finch-*-HF, with
  `Rwkv6WorldConfig`); the remote-code `auto_map` of published configs is ignored. flash-linear-attention's
  "rwkv7" is left to fla (its tensors differ from ours: `load_model` and the converter read those directories).
- AutoModelForCausalLM builds `Rwkv5/6/7WorldForCausalLM` for those configs and `Rwkv4WorldForCausalLM` for
  every transformers `rwkv` config (World and Pile RWKV-4 alike): exact reference numerics and a reusable state.
  `transformers.RwkvForCausalLM.from_pretrained(...)` still gives transformers' own class (e.g. to train).
- AutoTokenizer builds `RwkvWorldTokenizer` for RWKV-5/6/7 configs and for every directory whose
  tokenizer_config.json names a World tokenizer ("RwkvWorldTokenizer", or the published remote-code names
  "RWKVWorldTokenizer", "Rwkv5Tokenizer" and "Rwkv6Tokenizer"); other `rwkv` directories keep their GPT-NeoX
  tokenizer.

`register_when_transformers_loads()` is what `import rwkv_chat` runs. Importing rwkv_chat never imports
transformers: each part is registered as soon as the transformers modules it extends are fully loaded (an
import hook watches them), and the model and tokenizer classes enter the mappings as stand-ins that import
the real class on first use. transformers imports its auto modules from inside other imports (class
decorators), so a part waits until every module it needs has finished executing. `register()` does it all
now. Each part registers once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
import warnings

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODEL_AUTO = "transformers.models.auto.modeling_auto"
TOKENIZER_AUTO = "transformers.models.auto.tokenization_auto"
RWKV_CONFIG = "transformers.models.rwkv.configuration_rwkv"
TOKENIZER_NAMES = ("RwkvWorldTokenizer", "RWKVWorldTokenizer", "Rwkv5Tokenizer", "Rwkv6Tokenizer")
# this package's model classes, by the name of their configuration class in hf/config.py
WORLD_MODEL_CLASSES = {"Rwkv5WorldConfig": "Rwkv5WorldForCausalLM", "Rwkv6WorldConfig": "Rwkv6WorldForCausalLM",
                       "Rwkv7WorldConfig": "Rwkv7WorldForCausalLM"}

_lock = threading.RLock()
_done: set[str] = set()


# ------------------------------------------------------------------------------------ stand-in classes

class _Deferred(type):
    """Metaclass of a stand-in for a class imported on first use: attribute access (from_pretrained, ...),
    calls and isinstance checks go to the real class."""

    def __getattr__(cls, name):
        return getattr(cls.load(), name)

    def __call__(cls, *args, **kwargs):
        return cls.load()(*args, **kwargs)

    def __instancecheck__(cls, instance):
        return isinstance(instance, cls.load())

    def __subclasscheck__(cls, subclass):
        return issubclass(subclass, cls.load())


def deferred_class(module: str, name: str, **attributes) -> type:
    """A stand-in named `name` for `module.name`; `attributes` are answered without importing it."""

    def load():
        return getattr(importlib.import_module(module), name)

    return _Deferred(name, (), {"__module__": module, "load": staticmethod(load), **attributes})


# ------------------------------------------------------------------------------------ the parts

def _register_configs() -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .config import (PUBLISHED_RWKV5_MODEL_TYPE, PUBLISHED_RWKV6_MODEL_TYPE, WORLD_CONFIG_CLASSES,
                         Rwkv5WorldConfig, Rwkv6WorldConfig)

    for config_class in WORLD_CONFIG_CLASSES:
        CONFIG_MAPPING.register(config_class.model_type, config_class, exist_ok=True)
    CONFIG_MAPPING.register(PUBLISHED_RWKV5_MODEL_TYPE, Rwkv5WorldConfig, exist_ok=True)
    CONFIG_MAPPING.register(PUBLISHED_RWKV6_MODEL_TYPE, Rwkv6WorldConfig, exist_ok=True)


def _register_models() -> None:
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM
    from transformers.models.rwkv.configuration_rwkv import RwkvConfig

    from .config import WORLD_CONFIG_CLASSES

    pairs = [(RwkvConfig, "Rwkv4WorldForCausalLM")]
    pairs += [(config_class, WORLD_MODEL_CLASSES[config_class.__name__]) for config_class in WORLD_CONFIG_CLASSES]
    for config_class, name in pairs:
        stand_in = deferred_class("rwkv_chat.hf.model", name, config_class=config_class)
        AutoModelForCausalLM.register(config_class, stand_in, exist_ok=True)
        mapping = AutoModelForCausalLM._model_mapping
        if config_class not in mapping._extra_content:  # transformers < 5.23 ignores exist_ok for its configs
            mapping._extra_content[config_class] = stand_in


def _register_tokenizers() -> None:
    from transformers.models.auto import tokenization_auto

    from .config import WORLD_CONFIG_CLASSES

    stand_in = deferred_class("rwkv_chat.hf.tokenizer", "RwkvWorldTokenizer")
    for config_class in WORLD_CONFIG_CLASSES:
        tokenization_auto.AutoTokenizer.register(config_class, tokenizer_class=stand_in, exist_ok=True)
    for name in TOKENIZER_NAMES:  # class names written in tokenizer_config.json files
        tokenization_auto.REGISTERED_TOKENIZER_CLASSES[name] = stand_in


# part -> (modules that must be fully loaded first, registration)
PARTS = {
    "configs": ((CONFIG_AUTO,), _register_configs),
    "models": ((CONFIG_AUTO, MODEL_AUTO, RWKV_CONFIG), _register_models),
    "tokenizers": ((CONFIG_AUTO, TOKENIZER_AUTO), _register_tokenizers),
}
WATCHED = {module for requirements, _ in PARTS.values() for module in requirements}


def _run_part(part: str) -> None:
    with _lock:
        if part in _done:
            return
        _done.add(part)
        try:
            PARTS[part][1]()
        except Exception:
            _done.discard(part)
            raise


def register() -> None:
    """Register everything now (imports the transformers auto modules, not the model classes)."""
    for part in PARTS:
        _run_part(part)


# ------------------------------------------------------------------------------------ deferred registration

def _loaded(module: str) -> bool:
    """In sys.modules and done executing (not an import in progress further up the stack)."""
    loaded = sys.modules.get(module)
    spec = getattr(loaded, "__spec__", None)
    return loaded is not None and not getattr(spec, "_initializing", False)


def _register_ready_parts() -> bool:
    """Run every pending part whose modules are loaded; True when nothing is left pending."""
    with _lock:
        if _loaded(MODEL_AUTO) and RWKV_CONFIG not in sys.modules:
            importlib.import_module(RWKV_CONFIG)  # small; the models part needs its class
        for part, (requirements, _) in PARTS.items():
            if part not in _done and all(_loaded(module) for module in requirements):
                try:
                    _run_part(part)
                except Exception as error:  # never break the user's transformers import
                    warnings.warn(f"rwkv_chat could not register its transformers classes ({part}): {error!r}",
                                  stacklevel=3)
        return all(part in _done for part in PARTS)


class _AfterImportHook(importlib.abc.MetaPathFinder):
    """Calls `_register_ready_parts` right after a watched transformers module has executed."""

    def find_spec(self, name, path, target=None):
        if name not in WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is not None and hasattr(loader, "exec_module"):
            original_exec = loader.exec_module

            def exec_module(module):
                original_exec(module)
                spec._initializing = False  # importlib clears it only after we return
                if _register_ready_parts() and self in sys.meta_path:
                    sys.meta_path.remove(self)

            loader.exec_module = exec_module
        return spec


def register_when_transformers_loads() -> None:
    """Register each part now if transformers has loaded what it needs, else as soon as it has."""
    if _register_ready_parts():
        return
    if not any(isinstance(finder, _AfterImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImportHook())
