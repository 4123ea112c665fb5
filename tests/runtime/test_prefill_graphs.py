"""Prompts read from CUDA graphs (runtime/prefill_graphs.py) equal the direct prefill, for every
architecture's runner; the piece arithmetic runs anywhere, the rest needs CUDA."""

from __future__ import annotations

import warnings

import pytest
import torch

from rwkv_chat import load_model
from rwkv_chat.runtime.prefill_graphs import LONG_PIECE, PADDED_PIECE, PIECES, GraphedPrefill, pieces_of
from reference import random_tokens

CUDA = torch.cuda.is_available()


def test_pieces_cover_every_prompt_whole_long_pieces_first_then_each_length_once():
    for length in list(range(1, 3 * LONG_PIECE + 2)) + [100_000]:
        pieces = pieces_of(length)
        assert all(size == tokens for size, tokens in pieces) and sum(size for size, _ in pieces) == length
        sizes = [size for size, _ in pieces]
        long, rest = sizes[:length // LONG_PIECE], sizes[length // LONG_PIECE:]
        assert long == [LONG_PIECE] * len(long)
        assert rest == sorted(set(rest), reverse=True) and set(rest) <= set(PIECES) - {LONG_PIECE}
    assert pieces_of(2100) == [(1024, 1024), (1024, 1024), (32, 32), (16, 16), (4, 4)]
    with pytest.raises(ValueError, match="graphed prompt"):
        pieces_of(0)


def test_padded_pieces_read_the_last_part_below_padded_piece_in_one_piece():
    for length in list(range(1, 3 * LONG_PIECE + 2)) + [100_000]:
        pieces = pieces_of(length, padded=True)
        assert sum(tokens for _, tokens in pieces) == length
        assert all(size in PIECES and tokens <= size for size, tokens in pieces)
        tail = length % PADDED_PIECE  # below PADDED_PIECE: one piece, the smallest that holds it
        whole = pieces[:-1] if tail else pieces
        assert whole == (pieces_of(length - tail) if length > tail else [])  # unpadded, as without padding
        if tail:
            size, tokens = pieces[-1]
            assert tokens == tail and size // 2 < tokens <= size
    assert pieces_of(60, padded=True) == [(64, 60)]
    assert pieces_of(2100, padded=True) == [(1024, 1024), (1024, 1024), (64, 52)]
    assert pieces_of(255, padded=True) == [(256, 255)]
    assert pieces_of(1023, padded=True) == [(512, 512), (256, 256), (256, 255)]  # a graph may serve twice
    assert pieces_of(1023) == [(512, 512), (256, 256), (128, 128), (64, 64), (32, 32), (16, 16), (8, 8), (4, 4),
                               (2, 2), (1, 1)]
    assert pieces_of(1, padded=True) == [(1, 1)]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("version,dtype,tolerance", [("4", "fp32", 1e-3), ("5.2", "fp32", 1e-3), ("6", "fp32", 1e-3),
                                                     ("7", "fp32", 1e-3), ("5.2", "bf16", 0.5), ("7", "bf16", 0.5)])
def test_graphed_prompts_equal_the_direct_prefill(make_checkpoint, version, dtype, tolerance):
    path = make_checkpoint(version, n_layer=3, n_embd=128, seed=4).path
    model = load_model(path, device="cuda", dtype=dtype, fast=True)
    runner = model.runner
    graphs = runner._prompt_graphs
    assert isinstance(graphs, GraphedPrefill)
    padded = version != "4"  # the architectures whose recurrence passes padding: their last piece is padded
    assert (graphs.padded is not None) == padded
    start = model.forward(random_tokens(30, seed=2))[1]  # a state that is not empty
    before = start.clone()
    lengths = (1, 2, 3, 20, 60, 64, 127, 129, 255, 256, LONG_PIECE, 2 * LONG_PIECE + 519, 5, 3)  # 5, 3: the padded
    for length in lengths:  # pieces again, over an earlier prompt's ids
        ids = torch.tensor(random_tokens(length, seed=length), device="cuda")
        for state in (None, start):
            state = model.zero_state(1) if state is None else state
            direct_logits, direct = graphs.prefill(ids, state)
            logits, new = runner.prefill(ids, state)
            assert (logits - direct_logits).abs().max().item() <= tolerance, length
            assert (new.wkv - direct.wkv).abs().max().item() <= tolerance, length
            assert (new.shift - direct.shift).abs().max().item() <= tolerance, length
    assert not graphs.failed
    assert set(graphs.pieces) == {size for length in lengths for size, _ in pieces_of(length, padded)}
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
