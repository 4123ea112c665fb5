"""Sampling and penalties against the reference ChatRWKV PIPELINE (rwkv PyPI package, used only as an oracle);
batched sampling against the one-row sampler, row by row; sparse penalties against a plain dict oracle."""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkv_chat.serving.sampling import (
    PenaltyState,
    Sampler,
    SamplingParams,
    is_penalty_exempt,
    penalty_exempt_mask,
    SamplingRows,
    sample_batch,
    sample_token,
    sampling_distribution,
)

VOCAB = 65536


@pytest.fixture(scope="module")
def pipeline():
    from rwkv.utils import PIPELINE

    return PIPELINE(None, "rwkv_vocab_v20230424")  # no model needed for sample_logits / decode


def reference_distribution(pipeline, logits, params, monkeypatch):
    """The exact distribution the reference CPU sampler hands to np.random.choice."""
    captured = {}

    def fake_choice(a, p):
        captured["p"] = np.array(p, dtype=np.float64)
        return 0

    monkeypatch.setattr(np.random, "choice", fake_choice)
    pipeline.sample_logits(logits.clone(), temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    monkeypatch.undo()
    return torch.from_numpy(captured["p"])


def chi_square_critical(df, z=3.719):
    """Upper chi-square quantile (p ~ 1e-4) by the Wilson-Hilferty approximation."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


PARAM_GRID = [
    SamplingParams(temperature=1.0, top_p=0.3, top_k=0),
    SamplingParams(temperature=1.0, top_p=0.85, top_k=0),
    SamplingParams(temperature=0.7, top_p=0.5, top_k=0),
    SamplingParams(temperature=1.5, top_p=0.9, top_k=0),
    SamplingParams(temperature=1.0, top_p=0.95, top_k=5),
    SamplingParams(temperature=0.5, top_p=0.99, top_k=40),
    SamplingParams(temperature=2.0, top_p=0.2, top_k=3),
    SamplingParams(temperature=0.0, top_p=0.5, top_k=0),
]


@pytest.mark.parametrize("params", PARAM_GRID, ids=lambda p: f"T{p.temperature}-p{p.top_p}-k{p.top_k}")
@pytest.mark.parametrize("seed,vocab,scale", [(0, 1000, 2.0), (1, 1000, 4.0), (2, 5000, 3.0), (3, 65536, 0.7)])
def test_distribution_matches_reference_sample_logits(pipeline, monkeypatch, params, seed, vocab, scale):
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale
    expected = reference_distribution(pipeline, logits, params, monkeypatch)
    ours = sampling_distribution(logits, params).double()
    assert torch.equal(ours > 0, expected > 0), "kept token sets differ"
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-6)


def test_empirical_frequencies_match_reference_distribution(pipeline, monkeypatch):
    logits = torch.tensor([2.0, 1.7, 1.5, 1.2, 1.0, 0.6, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0])
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=6)
    expected = reference_distribution(pipeline, logits, params, monkeypatch)
    generator = torch.Generator().manual_seed(1234)
    n = 6000
    counts = torch.zeros(len(logits), dtype=torch.float64)
    for _ in range(n):
        counts[sample_token(logits, params, generator)] += 1
    kept = expected > 0
    assert counts[~kept].sum() == 0, "sampled a token outside the kept set"
    observed, wanted = counts[kept], expected[kept] * n
    chi2 = float(((observed - wanted) ** 2 / wanted).sum())
    assert chi2 < chi_square_critical(int(kept.sum()) - 1), (chi2, observed, wanted)


def test_top_p_keeps_head_until_mass_reached_and_ties_at_cutoff():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = probs.log().float()
    for top_p, kept in [(0.3, 1), (0.6, 2), (0.85, 3), (0.97, 4)]:
        dist = sampling_distribution(logits, SamplingParams(top_p=top_p, top_k=0))
        assert (dist > 0).tolist() == [True] * kept + [False] * (4 - kept)
        torch.testing.assert_close(dist[:kept].double(), probs[:kept] / probs[:kept].sum(), rtol=1e-5, atol=1e-6)
    exact = torch.tensor([4.0, 2.0, 1.0, 1.0]).log()  # probs 0.5, 0.25, 0.125, 0.125 exactly in fp32
    reached = sampling_distribution(exact, SamplingParams(top_p=0.75, top_k=0))  # cumulative hits 0.75 exactly
    assert (reached > 0).tolist() == [True, True, False, False]
    tied = sampling_distribution(torch.tensor([1.0, 1.0, 1.0, 0.0]), SamplingParams(top_p=0.1, top_k=0))
    torch.testing.assert_close(tied, torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))


def test_top_p_boundary_reached_exactly_matches_reference(pipeline, monkeypatch):
    logits = torch.tensor([4.0, 2.0, 1.0, 1.0]).log()
    for top_p in (0.5, 0.75, 0.875):
        params = SamplingParams(top_p=top_p, top_k=0)
        expected = reference_distribution(pipeline, logits, params, monkeypatch)
        torch.testing.assert_close(sampling_distribution(logits, params).double(), expected)


def test_top_p_one_keeps_every_token():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(5)) * 3
    dist = sampling_distribution(logits, SamplingParams(top_p=1.0, top_k=0))
    assert bool((dist > 0).all())
    torch.testing.assert_close(dist, torch.softmax(logits, 0))


def test_temperature_reweights_kept_tokens_without_changing_the_set():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    base = sampling_distribution(logits, SamplingParams(temperature=1.0, top_p=0.9, top_k=0))
    hot = sampling_distribution(logits, SamplingParams(temperature=3.0, top_p=0.9, top_k=0))
    assert torch.equal(base > 0, hot > 0)
    kept = base > 0
    want = torch.softmax(logits[kept] / 3.0, 0)
    torch.testing.assert_close(hot[kept], want)


def test_tiny_temperature_does_not_underflow():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3)) * 0.01
    params = SamplingParams(temperature=0.01, top_p=1.0, top_k=0)
    dist = sampling_distribution(logits, params)
    assert bool(torch.isfinite(dist).all()) and abs(float(dist.sum()) - 1) < 1e-4
    assert 0 <= sample_token(logits, params, torch.Generator().manual_seed(0)) < VOCAB


def test_temperature_zero_is_greedy():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(7))
    params = SamplingParams(temperature=0.0, top_p=1.0)
    generator = torch.Generator().manual_seed(0)
    assert {sample_token(logits, params, generator) for _ in range(20)} == {int(logits.argmax())}


def test_same_seed_gives_same_tokens_and_other_seeds_differ():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(11))
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0)

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return [sample_token(logits, params, generator) for _ in range(30)]

    assert draw(42) == draw(42)
    assert draw(42) != draw(43)


def test_inputs_are_not_mutated():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    penalties = PenaltyState(VOCAB)
    for token in (5, 6, 5):
        penalties.update(token)
    counts_before = penalties.counts.clone()
    sample_token(logits, SamplingParams(), torch.Generator().manual_seed(0), penalties, ban_tokens=(0, 5))
    sampling_distribution(logits, SamplingParams(), penalties, ban_tokens=(0,))
    penalties.apply(logits)
    assert torch.equal(logits, before)
    assert torch.equal(penalties.counts, counts_before)


def test_ban_tokens_are_never_sampled():
    logits = torch.zeros(100)
    logits[0] = 50.0
    assert sample_token(logits, SamplingParams(temperature=0.0), ban_tokens=(0,)) != 0
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_p=1.0)
    assert all(sample_token(logits, params, generator, ban_tokens=(0,)) != 0 for _ in range(50))
    with pytest.raises(ValueError, match="-inf|banned"):
        sample_token(torch.zeros(3), params, ban_tokens=(0, 1, 2))


def test_bad_logits_raise():
    with pytest.raises(ValueError, match="NaN"):
        sample_token(torch.tensor([0.0, float("nan")]), SamplingParams())
    with pytest.raises(ValueError, match="1-D"):
        sample_token(torch.zeros(2, 3), SamplingParams())


def test_penalty_formula_and_per_step_decay():
    penalties = PenaltyState(10, presence=0.4, frequency=0.5, decay=0.9)
    for token in (3, 3, 5):
        penalties.update(token)
    count3 = ((0 * 0.9 + 1) * 0.9 + 1) * 0.9  # each update decays every count, then counts the new token
    count5 = 1.0
    logits = torch.arange(10, dtype=torch.float32)
    expected = logits.clone().double()
    expected[3] -= 0.4 + count3 * 0.5
    expected[5] -= 0.4 + count5 * 0.5
    torch.testing.assert_close(penalties.apply(logits).double(), expected)
    assert penalties.apply(logits).dtype == torch.float32


def test_exempt_tokens_pay_presence_but_never_accumulate_count():
    exempt = torch.zeros(10, dtype=torch.bool)
    exempt[2] = True
    penalties = PenaltyState(10, presence=0.4, frequency=0.5, decay=0.9, exempt=exempt)
    for _ in range(3):
        penalties.update(2)
    assert float(penalties.counts[2]) == 0.0
    torch.testing.assert_close(penalties.penalty()[2], torch.tensor(0.4))
    assert float(penalties.penalty()[1]) == 0.0


def test_penalties_match_reference_generate_loop(pipeline, monkeypatch):
    """Drive the reference generate() with a fixed-logits model and record what it samples from."""
    base = torch.randn(VOCAB, generator=torch.Generator().manual_seed(9))
    script = [500, 33, 500, 49, 11, 129, 500, 33, 7000, 11, 632, 632, 500]  # ' ', '0', '12' exempt; 129 bad UTF-8

    class FixedModel:
        def forward(self, tokens, state):
            return base.clone(), state

    from rwkv.utils import PIPELINE, PIPELINE_ARGS

    reference = PIPELINE.__new__(PIPELINE)
    reference.model, reference.tokenizer = FixedModel(), pipeline.tokenizer
    seen_logits = []

    def record(out, temperature, top_p, top_k):
        seen_logits.append(out.clone())
        return script[len(seen_logits) - 1]

    monkeypatch.setattr(reference, "sample_logits", record, raising=False)
    args = PIPELINE_ARGS(alpha_frequency=0.45, alpha_presence=0.35, alpha_decay=0.99, token_ban=[], token_stop=[])
    reference.generate("Hello", token_count=len(script), args=args)

    exempt = penalty_exempt_mask(pipeline.tokenizer.idx2token.items(), VOCAB)
    ours = PenaltyState(VOCAB, presence=0.35, frequency=0.45, decay=0.99, exempt=exempt)
    assert len(seen_logits) == len(script)
    for step, token in enumerate(script):
        torch.testing.assert_close(ours.apply(base), seen_logits[step], rtol=0, atol=1e-5, msg=f"step {step}")
        ours.update(token)


def test_exempt_mask_equals_reference_rule_on_real_vocab(pipeline):
    mask = penalty_exempt_mask(pipeline.tokenizer.idx2token.items(), VOCAB)
    reference = {t for t in pipeline.tokenizer.idx2token if pipeline.decode([t]) in " \t0123456789"}
    assert set(torch.nonzero(mask).flatten().tolist()) == reference
    assert {10, 33, 49, 58}.issubset(reference) and 11 not in reference  # '\t', ' ', '0', '9'; '\n' is not exempt


def test_is_penalty_exempt_is_the_substring_rule():
    assert all(is_penalty_exempt(t) for t in (" ", "\t", "7", "12", "789", " \t"))
    assert not any(is_penalty_exempt(t) for t in ("\n", "  ", "2023", " 1", "a", "\ufffd"))


def test_clone_is_independent():
    penalties = PenaltyState(10)
    penalties.update(1)
    copy = penalties.clone()
    copy.update(2)
    assert float(penalties.counts[2]) == 0.0 and not bool(penalties.seen[2])
    assert float(copy.counts[2]) == 1.0 and bool(copy.seen[1])


def test_from_params_takes_the_penalty_fields():
    params = SamplingParams(presence_penalty=0.1, frequency_penalty=0.2, penalty_decay=0.5)
    penalties = PenaltyState.from_params(params, 7)
    assert (penalties.presence, penalties.frequency, penalties.decay, penalties.vocab_size) == (0.1, 0.2, 0.5, 7)


def test_penalties_shift_the_sampled_distribution():
    logits = torch.tensor([1.0, 1.0, 0.0])
    penalties = PenaltyState(3, presence=10.0, frequency=0.0)
    penalties.update(0)
    assert sample_token(logits, SamplingParams(temperature=0.0), penalties=penalties) == 1


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.01),
        ("top_k", -1), ("top_k", 2.5), ("presence_penalty", -1.0), ("frequency_penalty", -0.01),
        ("penalty_decay", 0.0), ("penalty_decay", 1.5),
    ],
)
def test_invalid_params_raise_with_field_name(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_default_params_are_chat_defaults():
    params = SamplingParams()
    assert (params.temperature, params.top_p, params.top_k) == (1.0, 0.3, 0)
    assert (params.presence_penalty, params.frequency_penalty, params.penalty_decay) == (0.4, 0.4, 0.996)
    assert SamplingParams(temperature=0).greedy and not params.greedy


def test_invalid_penalty_state_arguments_raise():
    with pytest.raises(ValueError, match="penalty_decay"):
        PenaltyState(10, decay=0.0)
    with pytest.raises(ValueError, match="exempt"):
        PenaltyState(10, exempt=torch.zeros(9, dtype=torch.bool))
    with pytest.raises(ValueError, match="outside"):
        PenaltyState(10).update(10)


# ------------------------------------------------------------------------------------ sparse penalties

def dict_penalties(history, vocab, presence, frequency, decay, exempt=()):
    """ChatRWKV's chat loop, literally: a dict of counts, every count decays each step. [V] float64"""
    occurrence = {}
    for token in history:
        for t in occurrence:
            occurrence[t] *= decay
        occurrence[token] = occurrence.get(token, 0.0) + (0.0 if token in exempt else 1.0)
    dense = torch.zeros(vocab, dtype=torch.float64)
    for t, count in occurrence.items():
        dense[t] = presence + count * frequency
    return dense


@pytest.mark.parametrize("presence,frequency,decay,steps", [
    (0.4, 0.4, 0.996, 300), (0.0, 0.7, 0.9, 200), (0.3, 0.0, 1.0, 100), (0.2, 0.5, 0.5, 2500)])
def test_sparse_penalties_equal_dense_and_the_dict_loop(presence, frequency, decay, steps):
    vocab = 50
    exempt = torch.zeros(vocab, dtype=torch.bool)
    exempt[[3, 7]] = True
    history = torch.randint(0, vocab, (steps,), generator=torch.Generator().manual_seed(steps)).tolist()
    penalties = PenaltyState(vocab, presence, frequency, decay, exempt=exempt)
    for token in history:  # decay 0.5 over 2500 steps folds the running scale back several times
        penalties.update(token)
    ids, amounts = penalties.sparse()
    assert ids.dtype == torch.long and amounts.dtype == torch.float32 and len(set(ids.tolist())) == len(ids)
    assert bool((amounts != 0).all())
    dense = penalties.penalty()
    assert torch.equal(torch.zeros(vocab).index_put_((ids,), amounts), dense)
    want = dict_penalties(history, vocab, presence, frequency, decay, exempt={3, 7})
    torch.testing.assert_close(dense.double(), want, rtol=1e-6, atol=1e-30)
    assert set(torch.nonzero(penalties.seen).flatten().tolist()) == set(history)


def test_sparse_penalties_skip_zero_amounts():
    exempt = torch.zeros(10, dtype=torch.bool)
    exempt[4] = True
    penalties = PenaltyState(10, presence=0.0, frequency=0.5, exempt=exempt)
    for token in (4, 4, 6):
        penalties.update(token)
    ids, amounts = penalties.sparse()
    assert ids.tolist() == [6] and amounts.tolist() == [0.5]
    assert PenaltyState(10, presence=0.0, frequency=0.0).sparse()[0].numel() == 0


# ------------------------------------------------------------------------------------ batched sampling

def make_rows(cases):
    """Fresh Samplers (fresh generators from the seeds, penalties rebuilt from the history) for each case."""
    rows = []
    for case in cases:
        penalties = None
        if case["penalties"] is not None:
            presence, frequency, decay, history = case["penalties"]
            penalties = PenaltyState(case["vocab"], presence, frequency, decay, exempt=case["exempt"])
            for token in history:
                penalties.update(token)
        seed = case["seed"]
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        rows.append(Sampler(case["params"], generator, penalties, case["bans"]))
    return rows


def one_by_one(logits, cases):
    """sample_token on each row, with generators in the same starting states; the generators after it."""
    rows, tokens = make_rows(cases), []
    for b, row in enumerate(rows):
        if row.generator is None:
            torch.manual_seed(1000 + b)
        tokens.append(sample_token(logits[b], row.params, row.generator, row.penalties, row.ban_tokens))
    return tokens, rows


def batched(logits, cases, vectorised):
    rows = make_rows(cases)
    if any(row.generator is None for row in rows):  # rows without a generator share the default one
        assert sum(row.generator is None for row in rows) == 1
        torch.manual_seed(1000 + next(b for b, row in enumerate(rows) if row.generator is None))
    return sample_batch(logits, rows, vectorised=vectorised), rows


def next_uniforms(rows):
    return [float(torch.rand(1, generator=row.generator, dtype=torch.float64)) for row in rows
            if row.generator is not None]


def assert_batch_equals_rows(logits, cases):
    want, want_rows = one_by_one(logits, cases)
    want_next = next_uniforms(want_rows)
    for vectorised in (True, False):
        got, rows = batched(logits, cases, vectorised)
        assert got == want, f"vectorised={vectorised}"
        assert next_uniforms(rows) == want_next, "a row took a different number of uniforms"
    return want


def logits_rows(draw, batch, vocab):
    """Random rows, some with exact ties (coarse values), near ties (one ulp apart) or a flat region."""
    rows = []
    for _ in range(batch):
        seed = draw(st.integers(0, 2**31 - 1))
        scale = draw(st.sampled_from([0.01, 0.5, 2.0, 8.0]))
        row = torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * scale
        kind = draw(st.sampled_from(["plain", "ties", "near_ties", "flat"]))
        if kind == "ties":
            row = torch.round(row * 2) / 2
        elif kind == "near_ties":
            row[1::2] = torch.nextafter(row[0::2][: row[1::2].numel()], torch.tensor(math.inf))
        elif kind == "flat":
            row[: vocab // 2] = 1.0
        rows.append(row)
    return torch.stack(rows)


@st.composite
def batch_cases(draw):
    vocab = draw(st.sampled_from([7, 64, 300, 1000]))
    batch = draw(st.integers(1, 6))
    logits = logits_rows(draw, batch, vocab)
    exempt = torch.zeros(vocab, dtype=torch.bool)
    exempt[: vocab // 10] = True
    none_used = False
    cases = []
    for _ in range(batch):
        params = SamplingParams(
            temperature=draw(st.sampled_from([0.0, 0.05, 0.7, 1.0, 1.7])),
            top_p=draw(st.sampled_from([0.05, 0.3, 0.5, 0.85, 0.999, 1.0])),
            top_k=draw(st.sampled_from([0, 0, 1, 3, 50, vocab + 5])))
        penalties = None
        if draw(st.booleans()):
            history = draw(st.lists(st.integers(0, vocab - 1), max_size=40))
            penalties = (draw(st.sampled_from([0.0, 0.4, 3.0])), draw(st.sampled_from([0.0, 0.4, 2.0])),
                         draw(st.sampled_from([0.5, 0.996, 1.0])), history)
        bans = tuple(draw(st.lists(st.integers(0, vocab - 1), max_size=3, unique=True)))
        seed = draw(st.integers(0, 2**32 - 1))
        if not none_used and draw(st.integers(0, 9)) == 0:
            seed, none_used = None, True
        cases.append(dict(vocab=vocab, params=params, penalties=penalties, bans=bans, seed=seed, exempt=exempt))
    return logits, cases


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch_cases())
def test_sample_batch_equals_sample_token_row_by_row(case):
    logits, cases = case
    before = logits.clone()
    assert_batch_equals_rows(logits, cases)
    assert torch.equal(logits, before)


def test_sample_batch_equals_sample_token_on_full_vocabularies():
    """Realistic rows: 65536 tokens, the chat defaults with a long penalty history, and a mix of others."""
    vocab, batch = VOCAB, 12
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(batch, vocab, generator=generator) * 3
    logits[3, 100:200] = logits[3].max()  # a hundred-way tie at the top
    exempt = torch.zeros(vocab, dtype=torch.bool)
    exempt[33] = True
    grid = PARAM_GRID + [SamplingParams(), SamplingParams(top_p=1.0, top_k=0), SamplingParams(top_p=1.0, top_k=7),
                         SamplingParams(temperature=0.3, top_p=0.6, top_k=2)]
    history = torch.randint(0, vocab, (400,), generator=generator).tolist()
    cases = [dict(vocab=vocab, params=grid[b], penalties=(0.4, 0.4, 0.996, history[: 40 * b]) if b % 3 else None,
                  bans=tuple(range(65530, 65536)) + (0,), seed=b, exempt=exempt) for b in range(batch)]
    for _ in range(3):
        tokens = assert_batch_equals_rows(logits, cases)
        assert all(0 < t < 65530 for t in tokens)
        for case, token in zip(cases, tokens):
            case["seed"] += 100
            if case["penalties"] is not None:
                case["penalties"] = case["penalties"][:3] + (case["penalties"][3] + [token],)


def test_greedy_rows_take_no_uniform_and_sampled_rows_take_one():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    rows = [Sampler(SamplingParams(temperature=0.0), torch.Generator().manual_seed(1)),
            Sampler(SamplingParams(), torch.Generator().manual_seed(1)),
            Sampler(SamplingParams(top_p=1.0), torch.Generator().manual_seed(1))]
    sample_batch(logits, rows, vectorised=True)
    fresh = torch.Generator().manual_seed(1)
    first, second = (float(torch.rand(1, generator=fresh, dtype=torch.float64)) for _ in range(2))
    assert [float(torch.rand(1, generator=r.generator, dtype=torch.float64)) for r in rows] == [first, second, second]


@pytest.mark.parametrize("vectorised", [True, False])
def test_a_bad_row_fails_alone(vectorised):
    logits = torch.randn(5, 20, generator=torch.Generator().manual_seed(2))
    logits[1, 3] = float("nan")
    params = SamplingParams(temperature=0.8, top_p=0.9)
    rows = [Sampler(params, torch.Generator().manual_seed(b)) for b in range(5)]
    rows[2] = Sampler(params, torch.Generator().manual_seed(2), ban_tokens=range(20))  # all banned
    rows[3] = Sampler(params, torch.Generator().manual_seed(3), penalties=PenaltyState(21))  # wrong vocabulary
    got = sample_batch(logits, rows, errors="return", vectorised=vectorised)
    assert isinstance(got[1], ValueError) and "row 1" in str(got[1]) and "NaN" in str(got[1])
    assert isinstance(got[2], ValueError) and "banned" in str(got[2])
    assert isinstance(got[3], ValueError) and "penalties expect 21" in str(got[3])
    for b in (0, 4):
        assert got[b] == sample_token(logits[b], params, torch.Generator().manual_seed(b))
    with pytest.raises(ValueError, match="row 1: .*NaN"):
        sample_batch(logits, [Sampler(params) for _ in range(5)], vectorised=vectorised)


def test_sample_batch_rejects_bad_shapes_and_arguments():
    rows = [Sampler(SamplingParams()) for _ in range(2)]
    with pytest.raises(ValueError, match="one row per sampler"):
        sample_batch(torch.zeros(3, 10), rows)
    with pytest.raises(ValueError, match="rows, vocab"):
        sample_batch(torch.zeros(10), rows)
    with pytest.raises(ValueError, match="ban token ids"):
        sample_batch(torch.zeros(2, 10), [rows[0], Sampler(SamplingParams(), ban_tokens=(10,))])
    with pytest.raises(ValueError, match="generator"):
        Sampler(SamplingParams(), generator=object())
    assert sample_batch(torch.zeros(0, 10), []) == []


def test_sampler_sample_equals_sample_token():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(8))
    penalties = PenaltyState(1000)
    penalties.update(int(logits.argmax()))
    sampler = Sampler(SamplingParams(top_p=0.5), torch.Generator().manual_seed(3), penalties, (0,))
    want = sample_token(logits, SamplingParams(top_p=0.5), torch.Generator().manual_seed(3), penalties, (0,))
    assert sampler.sample(logits) == want


@pytest.mark.parametrize("vocab", [65536, 50277, 1000])
def test_one_row_softmax_of_the_kept_width_equals_the_full_rows(vocab):
    """sample_token softmaxes its kept tokens over a 16-aligned width, sample_batch over full rows (-inf after
    the kept ones): PyTorch's CPU softmax must give the same bits both ways, for every kept count."""
    from rwkv_chat.serving.sampling import _SOFTMAX_WIDTH

    generator = torch.Generator().manual_seed(vocab)
    counts = list(range(1, 70)) + [127, 128, 129, 255, 256, 257, 1000, 4097]
    for kept in [k for k in counts if k <= vocab]:
        row = torch.full((vocab,), -math.inf)
        row[:kept] = torch.randn(kept, generator=generator).sort(descending=True).values * 4
        width = min(vocab, -(-kept // _SOFTMAX_WIDTH) * _SOFTMAX_WIDTH)
        full = torch.softmax(row.unsqueeze(0).repeat(3, 1), dim=1)[1]  # a row of a batch, as sample_batch has
        assert torch.equal(torch.softmax(row[:width], dim=0), full[:width]), kept
        assert not full[width:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_row_prefix_sums_equal_the_batched_ones(dtype):
    from rwkv_chat.serving.sampling import _host_prefix_sums, _prefix_sums

    generator = torch.Generator().manual_seed(5)
    for n in [1, 2, 100, 255, 256, 257, 600, 65536]:
        values = torch.rand(n, generator=generator) ** 6  # probabilities spread over many binades
        batched = _prefix_sums(torch.stack([values, values.flip(0)]), dtype)[0]
        host = _host_prefix_sums(values.numpy(), np.float32 if dtype == torch.float32 else np.float64)
        assert host.dtype == batched.numpy().dtype and np.array_equal(host, batched.numpy()), n


ROW_CHATS = [  # (params, presence, frequency, decay, bans) of the chats SamplingRows serves below
    (SamplingParams(), 0.4, 0.4, 0.996, (0,)),
    (SamplingParams(temperature=0.0), 1.0, 0.2, 0.9, ()),
    (SamplingParams(temperature=1.3, top_p=0.9, top_k=40), 0.0, 2.0, 0.5, (5, 6)),
    (SamplingParams(temperature=0.6, top_p=1.0, top_k=0), 0.3, 0.0, 1.0, ()),
    (SamplingParams(temperature=1.0, top_p=0.6, top_k=5), 0.4, 0.4, 0.996, (1, 2, 3)),
    (SamplingParams(temperature=2.0, top_p=0.95), 0.0, 0.0, 1.0, ()),
    (SamplingParams(temperature=0.8, top_p=0.999, top_k=3), 3.0, 0.4, 0.9, ()),
    (SamplingParams(temperature=0.0, top_p=0.3), 0.0, 0.0, 1.0, (0,)),
    (SamplingParams(temperature=1.0, top_p=0.3), 0.4, 0.4, 0.996, ()),
]


def rows_and_oracles(device: str):
    """Drive SamplingRows as the batcher does (rows put into freed slots or appended, released in place, the
    tail dropped) for 40 steps, and check every live row's draw against sample_token with its own generator
    (same seed) and a PenaltyState updated with the same tokens (the exempt ones included)."""
    vocab = 300
    exempt = torch.zeros(vocab, dtype=torch.bool)
    exempt[[7, 8, 9, 40]] = True
    table = SamplingRows(vocab, device, block=3)  # small blocks: rows refill their uniforms often
    live: dict[int, tuple] = {}  # slot -> (params, bans, oracle generator, oracle penalties)
    joined = [0]

    def chat():
        i = joined[0]
        joined[0] += 1
        params, presence, frequency, decay, bans = ROW_CHATS[i % len(ROW_CHATS)]
        penalties = PenaltyState(vocab, presence, frequency, decay, exempt=exempt)
        for token in (7, 11, 11, 12 + i):  # a history before joining: read when the row joins
            penalties.update(token)
        sampler = Sampler(params, torch.Generator().manual_seed(50 + i), penalties.clone(), bans)
        return sampler, (params, bans, torch.Generator().manual_seed(50 + i), penalties)

    def put(slots):
        made = [chat() for _ in slots]
        table.put(slots, [sampler for sampler, _ in made])
        live.update((slot, oracle) for slot, (_, oracle) in zip(slots, made))

    def release(slots):
        table.release(slots)
        for slot in slots:
            del live[slot]
        size = max(live) + 1 if live else 0
        table.truncate(size)
    schedule = {0: lambda: put(range(5)), 6: lambda: release([1, 3]), 9: lambda: put([1, 3, 5]),
                15: lambda: release([4, 5]), 20: lambda: release([0, 2]), 22: lambda: put([0, 2, 4, 5]),
                30: lambda: release([1, 2, 3, 4, 5]), 31: lambda: put([1])}
    generator = torch.Generator().manual_seed(9)
    drawn, capacities = 0, []
    for step in range(40):
        if step in schedule:
            schedule[step]()
            capacities.append(table.capacity)
        logits = torch.randn(len(table), vocab, generator=generator) * 2
        logits[:, 100:110] = logits.max()  # ties at the top
        if step % 2:  # draw and count as two calls, or as one step (a CUDA graph replay on CUDA)
            drawn_tokens = table.draw(logits.to(device))
            tokens = drawn_tokens.tolist()
            table.count(drawn_tokens)
        else:
            tokens = table.step(logits.to(device)).tolist()
        for slot, (params, bans, oracle_generator, penalties) in live.items():
            want = sample_token(logits[slot], params, oracle_generator, penalties, bans)
            assert tokens[slot] == want, f"step {step}, slot {slot}"
            penalties.update(want)
            drawn += 1
    # tables of a power-of-two number of rows, kept while rows come and go, shrunk when mostly empty
    assert capacities == [8, 8, 8, 8, 8, 8, 1, 2]
    return drawn


def test_sampling_rows_kept_across_steps_draw_what_sample_token_draws():
    assert rows_and_oracles("cpu") > 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampling_rows_on_cuda_draw_what_sample_token_draws():
    assert rows_and_oracles("cuda") > 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_batched_kernels_draw_what_the_cpu_draws():
    """Exact equality is a CPU promise; on a GPU the reductions may round differently, which can move a
    draw only when its uniform falls within a rounding error of a boundary (never in these rows)."""
    batch = 16
    logits = torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(6)) * 2
    cases = [dict(vocab=VOCAB, params=PARAM_GRID[b % len(PARAM_GRID)], penalties=(0.4, 0.4, 0.996, [5, 6, b]),
                  bans=(0,), seed=b, exempt=None) for b in range(batch)]
    together = sample_batch(logits.cuda(), make_rows(cases))
    alone = [make_rows([case])[0].sample(logits[b].cuda()) for b, case in enumerate(cases)]
    on_cpu = [make_rows([case])[0].sample(logits[b]) for b, case in enumerate(cases)]
    assert together == alone == on_cpu
