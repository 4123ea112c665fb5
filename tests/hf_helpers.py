"""Shared helpers for the Hugging Face tests (test_hf_*.py): converted directories and the reference oracle.

- `register_hf()` registers rwkv_chat's classes with transformers (what `import rwkv_chat` will do once
  rwkv_chat/__init__.py calls hf.register.register_when_transformers_loads()).
- `converted_dir(factory, version, dtype)` converts a tiny checkpoint once per session and returns
  (TinyCheckpoint, output directory).
- `reference_model(pth)` is the `rwkv` pip package's RWKV on that file ("cpu fp32", cached);
  `reference_logits` / `reference_greedy` read it like ChatRWKV does.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import torch  # noqa: E402

from rwkv_chat.hf.register import register_when_transformers_loads  # noqa: E402

PROMPT = "Question: What is the capital of France?\n\nAnswer:"
_converted: dict[tuple, tuple] = {}


def register_hf() -> None:
    register_when_transformers_loads()


def converted_dir(factory, version: str, dtype: str = "fp32", **shape):
    """(TinyCheckpoint, HF directory) for a tiny checkpoint of `version`, converted once per session."""
    key = (str(factory.root), version, dtype, tuple(sorted(shape.items())))
    if key not in _converted:
        from rwkv_chat.hf.convert import convert

        checkpoint = factory.make(version, **{"n_layer": 2, "n_embd": 128, **shape})
        suffix = "".join(f"-{name}{value}" for name, value in sorted(shape.items()))
        out_dir = Path(factory.root) / f"hf-{version}-{dtype}{suffix}"
        convert(str(checkpoint.path), out_dir, dtype=dtype, progress=lambda message: None)
        _converted[key] = (checkpoint, out_dir)
    return _converted[key]


@lru_cache(maxsize=8)
def reference_model(pth: str):
    from unittest import mock

    from rwkv.model import RWKV

    with mock.patch("gc.collect"):  # it collects 4 times per model: seconds on a test process's heap
        return RWKV(model=str(pth), strategy="cpu fp32")


@lru_cache(maxsize=1)
def reference_tokenizer():
    """The rwkv package's TRIE_TOKENIZER on the World vocabulary (slow to build: built once)."""
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from rwkv_chat.tokenizer import find_vocab_file

    return TRIE_TOKENIZER(str(find_vocab_file()))


def reference_logits(pth, tokens: list[int], state=None):
    """(logits [T, V] fp32, state) of the reference package reading `tokens` after `state`."""
    out, state = reference_model(str(pth)).forward(list(tokens), state, full_output=True)
    return out.float().reshape(len(tokens), -1), state


def reference_greedy(pth, prompt: list[int], count: int) -> list[int]:
    """The reference's greedy continuation: argmax, feed it back, `count` times."""
    model = reference_model(str(pth))
    out, state = model.forward(list(prompt), None)
    tokens = []
    for _ in range(count):
        token = int(torch.argmax(out))
        tokens.append(token)
        out, state = model.forward([token], state)
    return tokens
