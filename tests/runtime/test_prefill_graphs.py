"""Prompts read from CUDA graphs (runtime/prefill_graphs.py) equal the direct prefill, for every
architecture's runner; the piece arithmetic runs anywhere, the rest needs CUDA."""

from __future__ import annotations

import warnings

import pytest
import torch

from rwkv_chat import load_model
from rwkv_chat.runtime.prefill_graphs import LONG_PIECE, PIECES, GraphedPrefill, pieces_of
from reference import random_tokens

CUDA = torch.cuda.is_available()


def test_pieces_cover_every_prompt_whole_long_pieces_first_then_each_length_once():
    for length in list(range(1, 3 * LONG_PIECE + 2)) + [100_000]:
        pieces = pieces_of(length)
        assert sum(pieces) == length
        long, rest = pieces[:length // LONG_PIECE], pieces[length // LONG_PIECE:]
        assert long == [LONG_PIECE] * len(long)
        assert rest == sorted(set(rest), reverse=True) and set(rest) <= set(PIECES) - {LONG_PIECE}
    assert pieces_of(2100) == [1024, 1024, 32, 16, 4]
    with pytest.raises(ValueError, match="graphed prompt"):
        pieces_of(0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("version,dtype,tolerance", [("4", "fp32", 1e-3), ("5.2", "fp32", 1e-3), ("6", "fp32", 1e-3),
                                                     ("7", "fp32", 1e-3), ("5.2", "bf16", 0.5), ("7", "bf16", 0.5)])
def test_graphed_prompts_equal_the_direct_prefill(make_checkpoint, version, dtype, tolerance):
    path = make_checkpoint(version, n_layer=3, n_embd=128, seed=4).path
    model = load_model(path, device="cuda", dtype=dtype, fast=True)
    runner = model.runner
    graphs = runner._prompt_graphs
    assert isinstance(graphs, GraphedPrefill)
    start = model.forward(random_tokens(30, seed=2))[1]  # a state that is not empty
    before = start.clone()
    for length in (1, 2, 3, 20, 64, 127, 255, 256, LONG_PIECE, 2 * LONG_PIECE + 519):
        ids = torch.tensor(random_tokens(length, seed=length), device="cuda")
        for state in (None, start):
            state = model.zero_state(1) if state is None else state
            direct_logits, direct = graphs.prefill(ids, state)
            logits, new = runner.prefill(ids, state)
            assert (logits - direct_logits).abs().max().item() <= tolerance, length
            assert (new.wkv - direct.wkv).abs().max().item() <= tolerance, length
            assert (new.shift - direct.shift).abs().max().item() <= tolerance, length
    assert not graphs.failed and set(graphs.pieces) == set(PIECES)
    assert torch.equal(start.wkv, before.wkv) and torch.equal(start.shift, before.shift)  # never changed
    # the results are the caller's: a later prompt does not overwrite them
    first = runner.prefill(torch.tensor(random_tokens(5, seed=9), device="cuda"), model.zero_state(1))
    kept = first[0].clone(), first[1].clone()
    runner.prefill(torch.tensor(random_tokens(7, seed=10), device="cuda"), model.zero_state(1))
    assert torch.equal(first[0], kept[0]) and torch.equal(first[1].wkv, kept[1].wkv)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_a_prefill_that_cannot_be_captured_runs_directly_with_one_warning(make_checkpoint):
    path = make_checkpoint("5.2", n_layer=2, n_embd=64, seed=5).path
    model = load_model(path, device="cuda", dtype="fp32", fast=True)
    direct = model.runner._prefill_last

    def syncing(ids, state):  # a host sync: not capturable
        if ids.sum().item() < 0:
            raise AssertionError
        return direct(ids, state)

    graphs = GraphedPrefill(syncing, model.zero_state, torch.device("cuda"))
    ids = torch.tensor(random_tokens(6, seed=1), device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits, state = graphs(ids, model.zero_state(1))
        again, _ = graphs(ids, model.zero_state(1))
    assert graphs.failed
    assert [str(w.message) for w in caught if "prefill: a CUDA graph capture failed" in str(w.message)].__len__() == 1
    expected, _ = direct(ids, model.zero_state(1))
    assert torch.allclose(logits, expected) and torch.allclose(again, expected)
