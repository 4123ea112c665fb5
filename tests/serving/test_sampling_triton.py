"""kernels/sampling_triton.py (the fused per-row draw SamplingRows uses on CUDA), run under Triton's interpreter on
CPU tensors, against the sorted PyTorch computation (`_draw_rows` through SamplingRows' own path) and against
`sample_token` itself. On a CUDA machine the GPU suite runs the same checks on the device (test_sampling.py's
SamplingRows tests take the kernel there)."""

from __future__ import annotations

import textwrap

import pytest

from rwkv_chat.kernels import triton_kernels
from runtime.triton_interpreter import run_interpreted

pytestmark = pytest.mark.skipif(not triton_kernels.AVAILABLE, reason="Triton is not installed")


def test_the_tables_draw_what_sample_token_draws_through_the_kernel():
    """test_sampling.py's 40 steps of rows joining, leaving and drawing (ties at the top of every row), with
    the kernel doing SamplingRows' draws."""
    out = run_interpreted("""
        from rwkv_chat.kernels import sampling_triton
        assert sampling_triton.usable("cpu")
        calls = []
        original = sampling_triton.draw
        sampling_triton.draw = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
        from serving.test_sampling import rows_and_oracles
        rows_and_oracles("cpu")
        print(len(calls))
    """)
    assert int(out.split()[-1]) >= 40


CASES = """
    import math
    import torch
    from rwkv_chat.kernels import sampling_triton
    from rwkv_chat.serving.sampling import PenaltyState, Sampler, SamplingParams, SamplingRows

    def table(vocab, rows, seed):
        generator = torch.Generator().manual_seed(seed)
        samplers = []
        for i, (params, penalised, bans) in enumerate(rows):
            penalties = None
            if penalised:
                penalties = PenaltyState(vocab, 0.4, 0.7, 0.9)
                for token in torch.randint(0, vocab, (12,), generator=generator).tolist():
                    penalties.update(token)
            samplers.append(Sampler(params, torch.Generator().manual_seed(seed + i), penalties, bans))
        rows_table = SamplingRows(vocab, "cpu", graphs=False)
        rows_table.add(samplers)
        return rows_table

    def compare(logits, rows_table, block):
        tables = rows_table._rows
        got = sampling_triton.draw(logits, tables["counts"], tables["seen"], tables["banned"], tables["presence"],
                                   tables["frequency"], tables["temperature"], tables["top_p"], tables["top_k"],
                                   tables["has_top_k"], tables["greedy"], tables["uniforms"], tables["cursor"],
                                   True, True, block=block)
        usable = sampling_triton.usable
        sampling_triton.usable = lambda device: False  # SamplingRows' sorted PyTorch path
        try:
            want = SamplingRows._draw(logits, tables, True, True, False, True, True)
        finally:
            sampling_triton.usable = usable
        return got.tolist(), want.tolist()
"""


def test_the_kernel_draws_what_the_sorted_computation_draws():
    """Rows of several blocks (128 logits a block, 700 a row: the last block partial) whose logits are rounded
    to bf16 (exact ties everywhere, at the top-p and top-k cuts too), every filter and its extremes, penalties
    and bans, invalid rows; each row drawn on 10 uniforms and logits."""
    out = run_interpreted(textwrap.dedent(CASES) + textwrap.dedent("""
        vocab = 700
        P = SamplingParams
        rows = [(P(temperature=0.0), True, (3,)), (P(), True, (0,)), (P(top_p=1e-6), False, ()),
                (P(top_p=0.999999, temperature=1.0), False, ()), (P(top_p=1.0, top_k=0, temperature=0.7), True, ()),
                (P(top_k=1, top_p=1.0), False, ()), (P(top_k=5, top_p=1.0, temperature=2.0), False, ()),
                (P(top_k=37, top_p=0.9, temperature=0.3), True, (5, 6, 7)), (P(top_k=700, top_p=0.5), False, ()),
                (P(top_k=2000, top_p=1.0), False, ()), (P(temperature=0.05, top_p=0.95), False, ()),
                (P(temperature=5.0, top_p=0.6, top_k=12), True, ()), (P(), False, ()), (P(), False, ()),
                (P(), False, tuple(range(700))), (P(temperature=0.0), False, ())]
        generator = torch.Generator().manual_seed(1)
        mismatches, draws = 0, 0
        for trial in range(10):
            rows_table = table(vocab, rows, 100 + trial)
            logits = (torch.randn(len(rows), vocab, generator=generator) * (0.5 + trial % 4)).bfloat16().float()
            logits[1, 10:30] = logits[1].max()  # a wide tie at the top
            logits[12, 3] = math.nan  # invalid rows
            logits[13, 5] = math.inf
            got, want = compare(logits, rows_table, 128)
            draws += len(got)
            mismatches += sum(g != w for g, w in zip(got, want))
            assert got[12] == got[13] == got[14] == -1 and want[14] == -1
        print(mismatches, draws)
    """))
    mismatches, draws = map(int, out.split()[-2:])
    assert draws == 160 and mismatches == 0


def test_the_kernel_on_a_world_sized_vocabulary():
    """65,536 logits a row in the kernel's own blocks (1,024), bf16-rounded, the chat defaults and others."""
    out = run_interpreted(textwrap.dedent(CASES) + textwrap.dedent("""
        vocab = 65536
        P = SamplingParams
        rows = [(P(), True, (0,)), (P(temperature=1.0, top_p=0.85, top_k=0), False, ()),
                (P(temperature=0.8, top_p=1.0, top_k=40), True, ()), (P(temperature=0.0), True, ()),
                (P(temperature=1.2, top_p=1.0), False, ())]
        generator = torch.Generator().manual_seed(2)
        mismatches = 0
        for trial in range(3):
            rows_table = table(vocab, rows, 200 + trial)
            logits = (torch.randn(len(rows), vocab, generator=generator) * 3).bfloat16().float()
            got, want = compare(logits, rows_table, sampling_triton.BLOCK)
            mismatches += sum(g != w for g, w in zip(got, want))
        print(mismatches)
    """))
    assert int(out.split()[-1]) == 0


def test_sample_batch_draws_what_sample_token_draws_through_the_kernel():
    """test_sampling.py's checks of sample_batch's batched path (the one Sampler.sample takes on CUDA) with the
    kernel drawing: full vocabularies with a hundred-way tie at the top, every filter, penalties and bans; a bad
    row failing alone; greedy rows taking no uniform. (Not its hypothesis rows with one-ulp near ties: whether
    two such logits get the same probability depends on the exp implementation, the interpreter's NumPy or
    PyTorch's, so their sorted order, and a draw, can differ there; exact ties are equal everywhere.)"""
    out = run_interpreted("""
        from rwkv_chat.kernels import sampling_triton
        calls = []
        original = sampling_triton.draw
        sampling_triton.draw = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
        from serving import test_sampling as checks
        checks.test_sample_batch_equals_sample_token_on_full_vocabularies()
        checks.test_a_bad_row_fails_alone(True)
        checks.test_greedy_rows_take_no_uniform_and_sampled_rows_take_one()
        print(len(calls))
    """)
    assert int(out.split()[-1]) >= 5


def test_a_kernel_that_fails_leaves_the_sorted_path_drawing_the_same_tokens():
    """A kernel that cannot compile or launch on a device (a GPU or Triton build it does not suit): one warning,
    the sorted path from then on, for the tables and for sample_batch, with the tokens sample_token draws."""
    out = run_interpreted("""
        import warnings
        import torch
        from rwkv_chat.kernels import sampling_triton
        from rwkv_chat.serving.sampling import (PenaltyState, Sampler, SamplingParams, SamplingRows, sample_batch,
                                                sample_token)

        class Refusing:
            launches = 0

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    Refusing.launches += 1
                    raise RuntimeError("out of resources: shared memory")
                return launch
        sampling_triton._draw_kernel = Refusing()
        vocab, params = 300, SamplingParams(temperature=0.9, top_p=0.8, top_k=20)
        logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(5)) * 2
        rows = lambda: [Sampler(params, torch.Generator().manual_seed(i), PenaltyState(vocab)) for i in range(4)]
        want = [sample_token(logits[i], params, torch.Generator().manual_seed(i), PenaltyState(vocab))
                for i in range(4)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            table = SamplingRows(vocab, "cpu")
            table.add(rows())
            got = table.step(logits).tolist()
            again = sample_batch(logits, rows(), vectorised=True)
        assert got == want and again == want, (got, again, want)
        assert not sampling_triton.usable("cpu")
        print(Refusing.launches, sum("the fused draw failed" in str(w.message) for w in caught))
    """)
    launches, warned = map(int, out.split()[-2:])
    assert launches == 1 and warned == 1
