"""Sampling and penalties against the reference ChatRWKV PIPELINE (rwkv PyPI package, used only as an oracle)."""
import math

import numpy as np
import pytest
import torch

from rwkv_chat.sampling import (
    PenaltyState,
    SamplingParams,
    is_penalty_exempt,
    penalty_exempt_mask,
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
