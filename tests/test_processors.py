"""Logits processors: exact small cases, limits, tie rules, and sampling checks."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.decode.processors import (
    EpsilonCutoff,
    EtaCutoff,
    ForceEOS,
    FrequencyPenalty,
    LogitBias,
    MinNewTokens,
    MinP,
    NoRepeatNGram,
    PresencePenalty,
    RepetitionPenalty,
    SuppressTokens,
    Temperature,
    TopK,
    TopP,
    TypicalP,
    apply_processors,
    build_processors,
    processors_read_ids,
)
from lmlab.decode.search import greedy_pick, sample_pick

INF = float("inf")


def logits_of(probs):
    """(V,) probabilities -> (1, V) float32 logits (their logs)."""
    return torch.tensor(probs, dtype=torch.float64).log().float()[None]


def kept(out):
    """Indices of the finite entries of a (1, V) result."""
    return torch.isfinite(out[0]).nonzero().flatten().tolist()


def chi2_pvalue(counts: torch.Tensor, target: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; zero-probability categories must have zero counts."""
    n = counts.sum()
    assert counts[target == 0].sum() == 0, "a masked token was drawn"
    mask = target > 0
    expected = n * target[mask]
    stat = ((counts[mask] - expected) ** 2 / expected).sum()
    df = int(mask.sum()) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def draw_counts(logits_row: torch.Tensor, n: int = 20000, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    draws = sample_pick(logits_row.expand(n, -1), gen)
    return torch.bincount(draws, minlength=logits_row.shape[-1]).double()


def renormalised(probs, keep):
    p = torch.tensor(probs, dtype=torch.float64)
    mask = torch.zeros_like(p, dtype=torch.bool)
    mask[keep] = True
    p = torch.where(mask, p, torch.zeros_like(p))
    return p / p.sum()


# ---------------------------------------------------------------- temperature


def test_temperature_divides():
    x = torch.tensor([[1.0, -2.0, 4.0]])
    assert torch.equal(Temperature(2.0)(x, None), x / 2)
    assert torch.equal(Temperature(1)(x, None), x)


def test_temperature_zero_keeps_argmax_set_with_ties():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.0, -1.0, 5.0, 4.0]])
    out = Temperature(0)(x, None)
    assert kept(out[:1]) == [1, 2] and torch.equal(out[0, 1:3], x[0, 1:3])
    assert torch.isfinite(out[1]).tolist() == [False, False, True, False]


def test_temperature_limits():
    torch.manual_seed(0)
    x = torch.randn(16, 50)
    cold = torch.softmax(Temperature(1e-4)(x, None), -1)
    assert torch.equal(cold.argmax(-1), x.argmax(-1))
    assert torch.allclose(cold.max(-1).values, torch.ones(16))
    hot = torch.softmax(Temperature(1e6)(x, None), -1)
    assert torch.allclose(hot, torch.full_like(hot, 1 / 50), atol=1e-6)


@pytest.mark.parametrize("bad", [-1.0, -1e-9, float("nan"), float("inf"), "1", True])
def test_temperature_rejects(bad):
    with pytest.raises(ValueError, match=r"temperature must be a finite number >= 0"):
        Temperature(bad)


# ---------------------------------------------------------------- top-k


def test_top_k_exact_and_ties_at_boundary():
    x = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    assert kept(TopK(1)(x, None)) == [1]
    assert kept(TopK(2)(x, None)) == [1, 2, 3]  # the tie with the 2nd largest is kept (HF)
    assert kept(TopK(3)(x, None)) == [1, 2, 3]
    out = TopK(4)(x, None)
    assert kept(out) == [0, 1, 2, 3] and torch.equal(out[0, :4], x[0, :4])


def test_top_k_errors():
    with pytest.raises(ValueError, match=r"top_k must be an integer >= 1, got 0"):
        TopK(0)
    with pytest.raises(ValueError, match=r"top_k must be an integer >= 1, got 1.5"):
        TopK(1.5)
    with pytest.raises(ValueError, match=r"top_k=6 is larger than the vocabulary size V=5; accepted: 1 <= top_k <= 5"):
        TopK(6)(torch.zeros(1, 5), None)


# ---------------------------------------------------------------- top-p


def test_top_p_exact_and_ties():
    x = logits_of([0.4, 0.2, 0.2, 0.1, 0.1])
    assert kept(TopP(0.3)(x, None)) == [0]
    assert kept(TopP(0.5)(x, None)) == [0, 1, 2]  # 0.4 + 0.2 crosses 0.5; the tied 0.2 is kept too
    assert kept(TopP(0.65)(x, None)) == [0, 1, 2]
    assert kept(TopP(0.85)(x, None)) == [0, 1, 2, 3, 4]
    assert kept(TopP(0.0)(x, None)) == [0]
    assert kept(TopP(1e-9)(x, None)) == [0]


def test_top_p_one_is_identity():
    torch.manual_seed(1)
    x = torch.randn(4, 1000) * 8  # a long tail of tiny probabilities
    assert torch.equal(TopP(1.0)(x, None), x)
    assert torch.equal(TopK(1000)(x, None), x)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), None])
def test_top_p_rejects(bad):
    with pytest.raises(ValueError, match=r"top_p must be a real number in \[0.0, 1.0\]"):
        TopP(bad)


# ---------------------------------------------------------------- min-p, typical, epsilon, eta


def test_min_p():
    x = logits_of([0.5, 0.2, 0.15, 0.1, 0.05])
    assert kept(MinP(0.25)(x, None)) == [0, 1, 2]  # threshold 0.125
    assert kept(MinP(1.0)(x, None)) == [0]
    assert torch.equal(MinP(0.0)(x, None), x)
    assert kept(MinP(1.0)(torch.tensor([[2.0, 2.0, 1.0]]), None)) == [0, 1]


def test_typical_p():
    # probs (0.5, 0.3, 0.2): entropy 1.0297; |-log p - H| = 0.336, 0.174, 0.580 -> order 1, 0, 2
    x = logits_of([0.5, 0.3, 0.2])
    assert kept(TypicalP(0.2)(x, None)) == [1]  # the most typical token is not the argmax
    assert kept(TypicalP(0.5)(x, None)) == [0, 1]
    assert kept(TypicalP(0.85)(x, None)) == [0, 1, 2]
    assert kept(TypicalP(0.0)(x, None)) == [1]
    # (0.5, 0.25, 0.25): all three are equally typical -> ties keep everything
    assert kept(TypicalP(0.1)(logits_of([0.5, 0.25, 0.25]), None)) == [0, 1, 2]
    x = logits_of([0.7, 0.2, 0.1])
    assert kept(TypicalP(0.5)(x, None)) == [0]
    assert kept(TypicalP(0.8)(x, None)) == [0, 1]
    assert torch.equal(TypicalP(1.0)(x, None), x)


def test_epsilon_cutoff():
    x = logits_of([0.5, 0.3, 0.12, 0.08])
    assert kept(EpsilonCutoff(0.15)(x, None)) == [0, 1]
    assert kept(EpsilonCutoff(0.1)(x, None)) == [0, 1, 2]
    assert kept(EpsilonCutoff(0.3)(logits_of([0.28, 0.26, 0.24, 0.22]), None)) == [0]  # argmax always kept
    assert kept(EpsilonCutoff(0.3)(logits_of([0.25] * 4), None)) == [0, 1, 2, 3]  # tied argmax set


def test_eta_cutoff():
    probs = [0.5, 0.3, 0.12, 0.08]
    x = logits_of(probs)
    p = torch.tensor(probs, dtype=torch.float64)
    entropy = float(-(p * p.log()).sum())
    for eta, expect in [(0.1, [0, 1, 2]), (0.2, [0, 1]), (0.9, [0, 1])]:
        cutoff = min(eta, math.sqrt(eta) * math.exp(-entropy))
        assert [i for i, q in enumerate(probs) if q >= cutoff] == expect
        assert kept(EtaCutoff(eta)(x, None)) == expect
    assert kept(EtaCutoff(1.0)(logits_of([0.9, 0.05, 0.05]), None)) == [0]


@pytest.mark.parametrize(
    "make, name",
    [(MinP, "min_p"), (TypicalP, "typical_p"), (EpsilonCutoff, "epsilon"), (EtaCutoff, "eta")],
)
@pytest.mark.parametrize("bad", [-0.5, 1.01, float("nan")])
def test_truncation_ranges(make, name, bad):
    with pytest.raises(ValueError, match=rf"{name} must be a real number in \[0.0, 1.0\], got"):
        make(bad)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-4, 4), min_size=2, max_size=12),
    st.floats(0.0, 1.0),
    st.sampled_from([TopP, MinP, TypicalP, EpsilonCutoff, EtaCutoff]),
)
def test_truncations_keep_a_subset_and_whole_tie_classes(values, p, make):
    # integer logits make ties frequent
    x = torch.tensor([values], dtype=torch.float32)
    out = make(p)(x, None)
    fin = torch.isfinite(out[0])
    assert fin.any()
    assert torch.equal(out[0][fin], x[0][fin])  # kept logits unchanged
    for v in x[0].unique():  # a tie class is either all kept or all masked
        cls = fin[x[0] == v]
        assert cls.all() or not cls.any()
    if make is not TypicalP:
        assert fin[x[0].argmax()]
    if make is TopP:
        assert torch.softmax(x[0].double(), -1)[fin].sum() >= p - 1e-6


# ---------------------------------------------------------------- greedy equivalences and sampling


def test_limits_give_greedy():
    torch.manual_seed(3)
    x = torch.randn(64, 30)
    greedy = greedy_pick(x)
    gen = torch.Generator().manual_seed(0)
    for proc in [TopK(1), TopP(1e-9), Temperature(1e-4), Temperature(0), MinP(1.0)]:
        for _ in range(3):
            assert torch.equal(sample_pick(proc(x, None), gen), greedy), proc


PROBS = [0.3, 0.2, 0.2, 0.1, 0.1, 0.05, 0.05]


@pytest.mark.parametrize(
    "proc, keep",
    [
        (TopK(2), [0, 1, 2]),  # tie at the boundary: both 0.2 kept
        (TopK(4), [0, 1, 2, 3, 4]),
        (TopP(0.4), [0, 1, 2]),  # tie inside the nucleus boundary
        (TopP(0.75), [0, 1, 2, 3, 4]),
        (MinP(0.5), [0, 1, 2]),
        (TypicalP(0.5), None),
        (EpsilonCutoff(0.08), [0, 1, 2, 3, 4]),
        (EtaCutoff(0.3), None),
    ],
)
def test_sampling_matches_renormalised_target(proc, keep):
    x = logits_of(PROBS)
    out = proc(x, None)
    if keep is None:
        keep = kept(out)
        assert 0 < len(keep) < len(PROBS)
    assert kept(out) == keep
    target = renormalised(PROBS, keep)
    assert torch.allclose(torch.softmax(out[0].double(), -1), target, atol=1e-6)
    assert chi2_pvalue(draw_counts(out[0]), target) > 1e-3


def test_sampling_with_temperature():
    x = logits_of(PROBS)
    for t in (0.5, 2.0):
        target = torch.softmax(torch.tensor(PROBS, dtype=torch.float64).log() / t, -1)
        assert chi2_pvalue(draw_counts(Temperature(t)(x, None), seed=1), target) > 1e-3


def test_sample_pick_is_deterministic_given_generator_and_rejects_dead_rows():
    x = torch.randn(8, 10)
    a = sample_pick(x, torch.Generator().manual_seed(5))
    b = sample_pick(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    dead = torch.tensor([[0.0, 1.0], [-INF, -INF]])
    with pytest.raises(ValueError, match=r"rows \[1\] of the logits have no token to pick"):
        sample_pick(dead, None)
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        greedy_pick(torch.tensor([[float("nan"), 1.0]]))


# ---------------------------------------------------------------- penalties and bans


def test_repetition_penalty():
    x = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    ids = torch.tensor([[0, 1, 1], [3, -1, -1]])  # -1 is padding
    out = RepetitionPenalty(2.0)(x, ids)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.25]]
    with pytest.raises(ValueError, match="repetition_penalty must be a real number in"):
        RepetitionPenalty(0.0)


def test_presence_and_frequency_penalties():
    x = torch.zeros(1, 4)
    ids = torch.tensor([[1, 0, 1, -1]])
    assert FrequencyPenalty(0.5)(x, ids).tolist() == [[-0.5, -1.0, 0.0, 0.0]]
    assert PresencePenalty(1.0)(x, ids).tolist() == [[-1.0, -1.0, 0.0, 0.0]]
    assert PresencePenalty(-1.0)(x, ids).tolist() == [[1.0, 1.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match=r"frequency_penalty must be a finite real number, got nan"):
        FrequencyPenalty(float("nan"))


def test_no_repeat_ngram():
    x = torch.zeros(3, 5)
    ids = torch.tensor([[1, 2, 3, 1, 2], [4, 1, 2, 3, 1], [0, 0, 0, 0, 0]])
    out = NoRepeatNGram(2)(x, ids)
    assert torch.isinf(out).tolist() == [
        [False, False, False, True, False],  # after "2": (2, 3) seen
        [False, False, True, False, False],  # after "1": (1, 2) seen
        [True, False, False, False, False],
    ]
    out = NoRepeatNGram(3)(x[:1], ids[:1])  # (1, 2) -> 3 seen
    assert kept(out) == [0, 1, 2, 4]
    assert kept(NoRepeatNGram(1)(x[:1], ids[:1])) == [0, 4]
    assert torch.equal(NoRepeatNGram(6)(x[:1], ids[:1]), x[:1])  # sequence shorter than n
    padded = torch.tensor([[-1, -1, 2, 3, 2]])
    assert kept(NoRepeatNGram(2)(x[:1], padded)) == [0, 1, 2, 4]
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be an integer >= 1, got 0"):
        NoRepeatNGram(0)


def test_suppress_and_logit_bias():
    x = torch.zeros(2, 4)
    assert kept(SuppressTokens([0, 2])(x, None)[:1]) == [1, 3]
    out = LogitBias({1: 5.0, 3: -INF})(x, None)
    assert out[0].tolist() == [0.0, 5.0, 0.0, -INF]
    with pytest.raises(ValueError, match=r"suppress_tokens holds token id 7, outside the vocabulary of size V=4"):
        SuppressTokens([7])(x, None)
    with pytest.raises(ValueError, match=r"logit_bias\[1\] must be a finite number or -inf, got nan"):
        LogitBias({1: float("nan")})


def test_min_new_tokens_and_force_eos():
    x = torch.zeros(3, 4)
    ids = torch.zeros(3, 5, dtype=torch.long)
    n = torch.tensor([0, 1, 2])
    out = MinNewTokens(2, eos_id=3)(x, ids, num_generated=n)
    assert torch.isinf(out[:, 3]).tolist() == [True, True, False]
    out = ForceEOS(3, after=1)(x, ids, num_generated=n)
    assert [kept(out[i : i + 1]) for i in range(3)] == [[0, 1, 2, 3], [3], [3]]
    out = ForceEOS([2, 3], after=0, prompt_length=4)(x, ids)  # 5 - 4 = 1 generated
    assert kept(out[:1]) == [2, 3]
    with pytest.raises(ValueError, match="ForceEOS needs the number of generated tokens"):
        ForceEOS(3, after=1)(x, ids)


# ---------------------------------------------------------------- builder


def test_build_processors_order_and_identities():
    procs = build_processors(
        temperature=0.7,
        top_k=5,
        top_p=0.9,
        min_p=0.05,
        typical_p=0.95,
        epsilon=1e-4,
        eta=1e-3,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=0.1,
        no_repeat_ngram_size=3,
        suppress_tokens=[0],
        logit_bias={1: 1.0},
        eos_id=2,
        min_new_tokens=1,
        force_eos_after=10,
    )
    assert [type(p).__name__ for p in procs] == [
        "LogitBias", "RepetitionPenalty", "FrequencyPenalty", "PresencePenalty", "NoRepeatNGram",
        "SuppressTokens", "MinNewTokens", "ForceEOS", "Temperature",
        "TopK", "TopP", "MinP", "TypicalP", "EpsilonCutoff", "EtaCutoff",
    ]  # fmt: skip
    assert build_processors() == []
    assert build_processors(temperature=1.0, top_p=1.0, repetition_penalty=1.0, presence_penalty=0.0) == []


def test_build_processors_temperature_zero_and_contradictions():
    procs = build_processors(temperature=0, top_k=3, top_p=0.5)
    assert [type(p).__name__ for p in procs] == ["Temperature"]
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert kept(apply_processors(procs, x, None)) == [1, 2]
    with pytest.raises(ValueError, match="top_p must be a real number"):
        build_processors(temperature=0, top_p=2.0)  # still validated
    with pytest.raises(ValueError, match="min_new_tokens=5 > force_eos_after=2"):
        build_processors(eos_id=1, min_new_tokens=5, force_eos_after=2)
    with pytest.raises(ValueError, match="need eos_id"):
        build_processors(min_new_tokens=5)


def test_processors_work_with_batch_and_plain_callables():
    x = torch.randn(5, 12)
    ids = torch.randint(0, 12, (5, 7))
    x0 = x.clone()
    procs = build_processors(temperature=0.8, top_k=4, repetition_penalty=1.3) + [lambda l, i: l + 1.0]
    out = apply_processors(procs, x, ids, num_generated=3)
    assert out.shape == (5, 12)
    assert (torch.isfinite(out).sum(-1) >= 4).all()
    assert torch.equal(x, x0)  # input not modified


def test_processors_that_say_they_read_no_ids_give_the_same_without_them():
    """``reads_ids = False`` (the serving loop then keeps no history for them) is true of each:
    with ``num_generated`` given, ids=None gives what the real ids give; the penalties read them."""
    torch.manual_seed(0)
    logits, ids, num_generated = torch.randn(3, 12), torch.randint(0, 12, (3, 5)), torch.tensor([0, 2, 7])
    blind = [Temperature(0.7), TopK(3), TopP(0.8), MinP(0.1), TypicalP(0.9), EpsilonCutoff(0.02), EtaCutoff(0.02),
             SuppressTokens((1, 2)), LogitBias({3: 2.0}), MinNewTokens(3, 4), ForceEOS(4, 5)]
    for proc in blind:
        assert not processors_read_ids([proc])
        assert torch.equal(proc(logits, None, num_generated=num_generated),
                           proc(logits, ids, num_generated=num_generated)), proc
    reading = [RepetitionPenalty(1.3), PresencePenalty(0.5), FrequencyPenalty(0.5), NoRepeatNGram(2)]
    assert all(processors_read_ids([proc]) for proc in reading)
    assert processors_read_ids([lambda scores, ids: scores])  # a plain callable may read them
    assert not processors_read_ids([])
