"""The graphed decode step (runtime/cuda_graphs.py) when a caller chains its states: a state passed back unchanged
is read where the graph left it, anything else is copied in, and no state handed out changes (needs CUDA)."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat import load_model
from reference import random_tokens

CUDA = torch.cuda.is_available()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("version", ["5.2", "7"])  # the fast path's graphs and the plain step's (GraphedPlainRunner)
def test_chained_graphed_steps_equal_the_plain_path_and_keep_every_state_handed_out(make_checkpoint, version):
    path = make_checkpoint(version, n_layer=3, n_embd=128, seed=5).path
    plain = load_model(path, device="cuda", dtype="fp32", fast=False)
    graphed = load_model(path, device="cuda", dtype="fp32")
    decoder = graphed.runner._graphs
    tokens = random_tokens(14, seed=2)
    _, want = plain.forward(tokens[:4])
    _, got = graphed.forward(tokens[:4])
    handed = []
    for token in tokens[4:10]:  # each step from the state the one before returned: no copy into the graph
        a, want = plain.forward([token], want)
        b, got = graphed.forward([token], got)
        assert _close(a, b)
        handed.append((want, got))
    graph = decoder.graphs[1]
    assert isinstance(graph.back, tuple)  # the steps went back and forth between the graph's two buffers
    for want_t, got_t in handed:  # none of the states handed out was overwritten by a later step
        assert _close(want_t.wkv, got_t.wkv) and _close(want_t.shift, got_t.shift)

    # a retry from an older state (copied in), then on from what it returned (read in place)
    (old_want, old_got) = handed[2]
    for token in tokens[10:12]:
        a, old_want = plain.forward([token], old_want)
        b, old_got = graphed.forward([token], old_got)
        assert _close(a, b)
    # the state just returned, changed in place by its owner: its new values are copied in, not the graph's
    old_want.wkv.mul_(0.5)
    old_got.wkv.mul_(0.5)
    old_want.shift[:, 0].zero_()
    old_got.shift[:, 0].zero_()
    for token in tokens[12:]:
        a, old_want = plain.forward([token], old_want)
        b, old_got = graphed.forward([token], old_got)
        assert _close(a, b)
    assert _close(old_want.wkv, old_got.wkv)
