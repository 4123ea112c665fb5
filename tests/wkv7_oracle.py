"""RWKV-7's recurrence for the tests of its forms (the chunked WY form, the Triton scan): random inputs at the
model's scales and the float64 loop of the model's own one-token step (`models.rwkv7.wkv7_step`) as their oracle."""

from __future__ import annotations

import torch

from rwkv_chat.models import rwkv7


def wkv7_inputs(batch, length, seed, heads=3, size=16, strongest=False):
    """Random RWKV-7 recurrence inputs [B, H, T, N] (float64) and a start state."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    shape = (batch, heads, length, size)
    log_w = -rwkv7.DECAY_SCALE * torch.sigmoid(rand(*shape) * 3)
    if strongest:  # every decay at its strongest: the largest in-chunk factors
        log_w = torch.full_like(log_w, -rwkv7.DECAY_SCALE)
    kk = torch.nn.functional.normalize(rand(*shape), dim=-1)
    a = torch.sigmoid(rand(*shape))
    return (log_w, rand(*shape), rand(*shape), rand(*shape), kk, a), rand(batch, heads, size, size)


def wkv7_token_loop(inputs, s0):
    state, steps = s0, []
    for t in range(inputs[0].shape[2]):
        out, state = rwkv7.wkv7_step(*(x[:, :, t] for x in inputs), state)
        steps.append(out)
    return torch.stack(steps, 2), state
