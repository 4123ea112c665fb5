"""The oracle: the `rwkv` PyPI package (ChatRWKV's reference implementation) on our test checkpoints.

conftest.py sets RWKV_JIT_ON / RWKV_CUDA_ON before anything imports the package.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=8)
def reference_model(pth: Path, strategy: str = "cpu fp32"):
    from rwkv.model import RWKV

    return RWKV(model=str(pth), strategy=strategy, verbose=False)


def reference_run(pth: Path, tokens: list[int], state=None, strategy: str = "cpu fp32"):
    """(fp32 logits of the last token, reference state) after `tokens`; the state list is copied first."""
    model = reference_model(Path(pth), strategy)
    state = [s.clone() for s in state] if state is not None else None
    logits, state = model.forward(list(tokens), state)
    return logits.float(), state


def random_tokens(n: int, seed: int, vocab: int = 65536) -> list[int]:
    """Ids drawn from the real World id range (1..65529), end-of-text excluded."""
    return torch.randint(1, 65530, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def logits_after(model, prompt: list[int], decode_tokens) -> torch.Tensor:
    """Our model's logits after reading `prompt` whole, then `decode_tokens` one decode step each."""
    logits, state = model.forward(prompt)
    for token in decode_tokens:
        logits, state = model.forward([token], state)
    return logits


def assert_states_passed_in_stay_unchanged(model) -> None:
    """Prefill, one-token and batched calls of `model` (plain or fast path) leave the state they get alone."""
    from rwkv_chat.state import RwkvState

    _, state = model.forward(random_tokens(20, seed=1))
    before = state.clone()
    model.forward(random_tokens(5, seed=2), state)
    model.forward([42], state)
    model.decode_batch(torch.tensor([1, 2]), RwkvState.stack([state, state]))
    assert state.equal(before)
