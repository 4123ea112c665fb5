"""The oracle: the `rwkv` PyPI package (ChatRWKV's reference implementation) on our test checkpoints; and the
float64 product of dequantised int8 weights that the one-row int8 kernels are held to.

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


def assert_decode_into_equals_decode(model, tolerance: float) -> None:
    """`model.runner.decode_into`, from the leading rows of one state buffer into another's (as the batcher steps),
    gives decode_batch's logits and new states for those rows and leaves the source alone: for batches of several
    graph buckets, twice on the same buffers with new contents (a replay must read what they hold now), and with
    buffers too small for the batch's bucket (the step runs unreplayed)."""
    from rwkv_chat.state import RwkvState

    for batch, capacity in ((1, 64), (3, 64), (8, 64), (40, 64), (3, 3)):
        source, target = model.zero_state(capacity), model.zero_state(capacity)
        for turn in range(2):
            stacked = RwkvState.stack([model.forward(random_tokens(4 + i + turn, seed=10 * turn + i))[1]
                                       for i in range(batch)])
            source.shift[:batch].copy_(stacked.shift)
            source.wkv[:batch].copy_(stacked.wkv)
            kept = source.clone()
            ids = torch.randint(1, 65530, (batch,), generator=torch.Generator().manual_seed(turn))
            logits = model.runner.decode_into(ids.to(model.device), source, target)
            expected, new = model.decode_batch(ids, stacked)
            assert logits.shape == expected.shape
            assert (logits - expected).abs().max().item() <= tolerance
            assert (target.shift[:batch] - new.shift).abs().max().item() <= tolerance
            assert (target.wkv[:batch] - new.wkv).abs().max().item() <= tolerance
            assert source.equal(kept)


def int8_one_row_case(gen: torch.Generator, n: int, k: int, segments: int):
    """(q, scale, x, seg, want): int8 rows [n, k] with their scales, `segments` stacked bf16 inputs [P, 1, k], the
    segment length (None for one) and the float64 product of row block n with input n // seg, dequantised."""
    from rwkv_chat.kernels import quant
    weight = torch.randn(n, k, generator=gen) * 0.05
    weight[0, :256] = torch.linspace(-1, 1, min(k, 256))  # the whole byte range in one row
    q, scale = quant.quantize_rows(weight)
    x = torch.randn(segments, 1, k, generator=gen).to(torch.bfloat16)
    seg = n // segments
    rows = torch.arange(n) // seg
    want = torch.einsum("nk,nk->n", x[rows.clamp(max=segments - 1), 0].double(), q.double() * scale.double()[:, None])
    return q, scale, x, (seg if segments > 1 else None), want
