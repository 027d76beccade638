"""Synthetic Markov sources: exact quantities, sampling, empirical estimates, KL, and ground-truth training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab import sources
from lmlab.models import build_model
from lmlab.sources import (
    MarkovChain,
    bigram_pairs,
    empirical_conditional,
    empirical_counts,
    empirical_marginal,
    entropy,
    kl_divergence,
    ngram_windows,
    sample_kl_divergence,
)

# The worked example of docs/sources.md.
AB = MarkovChain("AB", [[0.5, 0.5], [0.25, 0.75]])
CORPUS = "ABABAABBABBBBAAABBBB"


def train(model, ids: torch.Tensor, steps: int, lr: float) -> float:
    """Full-batch AdamW (no weight decay) on next-token cross-entropy; returns the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        logits, _ = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def nll(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits, _ = model(ids[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


# ---------------------------------------------------------------- the worked example


def test_ab_chain_exact_quantities():
    np.testing.assert_allclose(AB.stationary(), [1 / 3, 2 / 3], atol=1e-12)
    h_b = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    expected = (1 / 3) * math.log(2) + (2 / 3) * h_b
    assert AB.entropy_rate() == pytest.approx(expected, abs=1e-12)
    assert AB.entropy_rate() == pytest.approx(0.6059391565991873, abs=1e-12)
    assert AB.entropy_rate("bits") == pytest.approx(expected / math.log(2), abs=1e-12)
    assert AB.order == 1 and AB.vocab_size == 2 and AB.num_contexts == 2
    np.testing.assert_allclose(AB.conditional("B"), [0.25, 0.75])


def test_ab_corpus_pairs_and_empirical_conditional():
    ids = AB.encode(CORPUS)
    assert AB.decode(ids) == CORPUS
    pairs = bigram_pairs(ids)
    assert pairs.shape == (19, 2)
    assert ["".join(AB.alphabet[i] for i in p) for p in pairs] == [CORPUS[t : t + 2] for t in range(19)]
    np.testing.assert_array_equal(empirical_counts(ids, 2), [[3, 5], [4, 7]])
    q = empirical_conditional(ids, 2)
    np.testing.assert_allclose(q, [[3 / 8, 5 / 8], [4 / 11, 7 / 11]], atol=1e-15)
    np.testing.assert_allclose(empirical_marginal(ids, 2), [8 / 19, 11 / 19], atol=1e-15)
    np.testing.assert_allclose(MarkovChain.from_corpus(CORPUS, "AB").transitions, q)


def test_ab_kl_numbers():
    ids = AB.encode(CORPUS)
    q = empirical_conditional(ids, 2)
    kl_a = 0.5 * math.log(0.5 / (3 / 8)) + 0.5 * math.log(0.5 / (5 / 8))
    kl_b = 0.25 * math.log(0.25 / (4 / 11)) + 0.75 * math.log(0.75 / (7 / 11))
    exact = kl_divergence(AB.transitions, q, AB.stationary())
    assert exact == pytest.approx(kl_a / 3 + 2 * kl_b / 3, abs=1e-12)
    assert exact == pytest.approx(0.030459037594998, abs=1e-12)
    assert AB.kl_divergence(q) == pytest.approx(exact, abs=1e-15)
    with_empirical = kl_divergence(AB.transitions, q, empirical_marginal(ids, 2))
    assert with_empirical == pytest.approx(8 / 19 * kl_a + 11 / 19 * kl_b, abs=1e-12)
    assert with_empirical == pytest.approx(0.030697224828391, abs=1e-12)
    # On the corpus Q was fitted to, Q is the maximum-likelihood table, so log Q >= log P on
    # average: the sample estimate is negative (biased), unlike the exact KL.
    sample = sample_kl_divergence(bigram_pairs(ids), AB.transitions, q)
    by_hand = (3 * math.log(0.5 / (3 / 8)) + 5 * math.log(0.5 / (5 / 8))
               + 4 * math.log(0.25 / (4 / 11)) + 7 * math.log(0.75 / (7 / 11))) / 19
    assert sample == pytest.approx(by_hand, abs=1e-12)
    assert sample == pytest.approx(-0.031648630418022, abs=1e-12)
    assert kl_divergence(AB.transitions, q, AB.stationary(), unit="bits") == pytest.approx(exact / math.log(2))


def test_trained_bigram_table_reproduces_empirical_conditionals():
    torch.manual_seed(0)
    ids = torch.from_numpy(AB.encode(CORPUS))[None]  # (1, 20)
    model = build_model("bigram", {"vocab_size": 2})
    train(model, ids, steps=200, lr=0.1)
    q_model = model.conditional().detach().double().numpy().T  # row i = P(. | previous i)
    q = empirical_conditional(AB.encode(CORPUS), 2)
    np.testing.assert_allclose(q_model, q, atol=1e-3)
    # ... so its KL numbers are the empirical table's.
    assert kl_divergence(AB.transitions, q_model, AB.stationary()) == pytest.approx(0.030459, abs=2e-4)


def test_fresh_sample_kl_estimate_approaches_exact():
    q = empirical_conditional(AB.encode(CORPUS), 2)
    fresh = AB.sample(200_000, seed=1)
    est = sample_kl_divergence(bigram_pairs(fresh), AB.transitions, q)
    assert est == pytest.approx(AB.kl_divergence(q), abs=0.004)


# ---------------------------------------------------------------- construction and validation


def test_validation_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="sums to 0.9"):
        MarkovChain("AB", [[0.5, 0.4], [0.5, 0.5]])
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        MarkovChain("AB", [[0.5, 0.2, 0.3], [0.5, 0.3, 0.2]])
    with pytest.raises(ValueError, match="order=2"):
        MarkovChain("AB", [[0.5, 0.5], [0.5, 0.5]], order=2)
    with pytest.raises(ValueError, match="non-negative"):
        MarkovChain("AB", [[1.5, -0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="repeated"):
        MarkovChain("AA", [[0.5, 0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="'C' is not in the alphabet"):
        AB.encode("ABC")
    with pytest.raises(ValueError, match="unit='bit'"):
        AB.entropy_rate("bit")
    with pytest.raises(ValueError, match="reducible"):
        MarkovChain("AB", [[1.0, 0.0], [0.0, 1.0]]).stationary()
    # Periodic but irreducible: the stationary distribution is still unique.
    np.testing.assert_allclose(MarkovChain("AB", [[0.0, 1.0], [1.0, 0.0]]).stationary(), [0.5, 0.5])
    assert repr(AB) == "MarkovChain(alphabet='AB', order=1)"
    with pytest.raises(ValueError, match="read-only"):
        AB.transitions[0, 0] = 1.0


def test_order_zero_is_iid():
    chain = MarkovChain("abc", [0.2, 0.3, 0.5])
    assert chain.order == 0 and float(chain.stationary()) == 1.0
    assert chain.entropy_rate() == pytest.approx(float(entropy(np.array([0.2, 0.3, 0.5]))))
    ids = chain.sample(50_000, seed=0)
    np.testing.assert_allclose(np.bincount(ids, minlength=3) / ids.size, [0.2, 0.3, 0.5], atol=0.01)


def test_alphabet_of_words():
    chain = MarkovChain(["the", "cat", "sat"], np.full((3, 3), 1 / 3))
    assert chain.decode(chain.encode(["the", "cat"])) == "thecat"
    assert chain.entropy_rate() == pytest.approx(math.log(3))


# ---------------------------------------------------------------- sampling


def test_sampling_is_seeded_and_shaped():
    chain = MarkovChain.random(5, order=2, seed=3)
    a, b = chain.sample(1000, seed=7), chain.sample(1000, seed=7)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int64 and a.shape == (1000,)
    assert not np.array_equal(a, chain.sample(1000, seed=8))
    seqs = chain.sample_sequences(16, 40, seed=np.random.default_rng(0))
    assert seqs.shape == (16, 40) and seqs.min() >= 0 and seqs.max() < 5
    np.testing.assert_array_equal(seqs, chain.sample_sequences(16, 40, seed=0))
    started = chain.sample_sequences(4, 10, seed=0, start=[2, 4])
    assert (started[:, :2] == [2, 4]).all()
    assert chain.sample(1, seed=0).shape == (1,)  # shorter than the order: a prefix of the start context


def test_samples_follow_the_chain():
    chain = MarkovChain.random(3, order=2, seed=0)
    stream = chain.sample(150_000, seed=1)
    # KL(empirical || true) weighted by the empirical marginal: ~ (#free parameters) / (2 N) = 1e-4.
    marginal = empirical_marginal(stream, 3, order=2)
    assert kl_divergence(empirical_conditional(stream, 3, order=2), chain.transitions, marginal) < 1e-3
    np.testing.assert_allclose(marginal, chain.stationary(), atol=0.01)
    seqs = chain.sample_sequences(3000, 50, seed=2)
    marginal = empirical_marginal(seqs, 3, order=2)
    assert kl_divergence(empirical_conditional(seqs, 3, order=2), chain.transitions, marginal) < 1e-3
    # Sequences start in the stationary distribution.
    np.testing.assert_allclose(empirical_marginal(seqs[:, :3], 3, order=2), chain.stationary(), atol=0.03)
    # The oracle's loss on its own samples is the entropy rate (law of large numbers).
    assert chain.cross_entropy(stream) == pytest.approx(chain.entropy_rate(), abs=0.01)


def test_windows_never_cross_rows():
    ids = np.array([[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(bigram_pairs(ids), [[0, 1], [1, 2], [3, 4], [4, 5]])
    np.testing.assert_array_equal(ngram_windows(ids, 2), [[0, 1, 2], [3, 4, 5]])
    assert ngram_windows(np.array([1, 2]), 2).shape == (0, 3)
    counts = empirical_counts(ids, 6)
    assert counts.sum() == 4 and counts[2, 3] == 0


def test_unseen_contexts_are_uniform():
    q = empirical_conditional(np.array([0, 1, 0, 1]), 3)
    np.testing.assert_allclose(q[2], [1 / 3] * 3)
    np.testing.assert_allclose(empirical_conditional(np.array([0, 1]), 2, smoothing=1.0)[0], [1 / 3, 2 / 3])


def test_power_iteration_agrees_with_linear_solve(monkeypatch):
    chain = MarkovChain.random(4, order=3, seed=5, concentration=0.3)
    exact = chain.stationary()
    monkeypatch.setattr(sources, "_DENSE_LIMIT", 0)
    iterated = MarkovChain(chain.alphabet, chain.transitions).stationary()
    np.testing.assert_allclose(iterated, exact, atol=1e-10)


@st.composite
def chains(draw):
    V = draw(st.integers(1, 4))
    order = draw(st.integers(0, 2))
    rows = draw(
        st.lists(
            st.lists(st.floats(0.05, 1.0), min_size=V, max_size=V), min_size=V**order, max_size=V**order
        )
    )
    table = np.array(rows).reshape((V,) * (order + 1))
    return MarkovChain([str(i) for i in range(V)], table / table.sum(-1, keepdims=True))


@settings(max_examples=40, deadline=None)
@given(chains(), st.integers(0, 2**32 - 1))
def test_exact_quantities_are_consistent(chain, seed):
    pi = chain.stationary()
    assert pi.shape == (chain.vocab_size,) * chain.order
    assert pi.sum() == pytest.approx(1.0) and (pi >= 0).all()
    # Stationary: one step of the chain leaves the context distribution unchanged.
    step = (pi[..., None] * chain.transitions).sum(0) if chain.order else pi
    np.testing.assert_allclose(step, pi, atol=1e-9)
    h = chain.entropy_rate()
    assert -1e-12 <= h <= math.log(chain.vocab_size) + 1e-12
    assert chain.entropy_rate("bits") == pytest.approx(h / math.log(2))
    other = MarkovChain.random(chain.alphabet, chain.order, seed=seed)
    assert chain.kl_divergence(chain) == pytest.approx(0.0, abs=1e-12)
    assert chain.kl_divergence(other) >= -1e-12
    # Cross-entropy of Q on P's process = entropy rate + KL: the identity behind "loss -> entropy rate".
    ce = float((pi * -(chain.transitions * np.log(other.transitions)).sum(-1)).sum())
    assert ce == pytest.approx(h + chain.kl_divergence(other), abs=1e-9)


# ---------------------------------------------------------------- ground truth for training


def test_bigram_table_cross_entropy_approaches_entropy_rate():
    """A bigram table trained on 10k tokens of a 6-symbol order-1 chain.

    Tolerances: the excess loss of a maximum-likelihood table is about
    (#free parameters) / (2 N) = 30 / 20000 = 0.0015 nats; we allow 0.01 nats over the
    oracle's loss on the same fresh 20k tokens, and 0.02 nats from the entropy rate
    (the fresh set's own sampling noise is ~0.005 nats).
    """
    torch.manual_seed(0)
    chain = MarkovChain.random(6, order=1, seed=11, concentration=0.5)
    train_ids = torch.from_numpy(chain.sample_sequences(50, 200, seed=1))
    test_ids = chain.sample_sequences(100, 200, seed=2)
    model = build_model("bigram", {"vocab_size": 6})
    train(model, train_ids, steps=150, lr=0.2)
    model_ce = nll(model, torch.from_numpy(test_ids))
    oracle_ce = chain.cross_entropy(test_ids)
    assert model_ce - oracle_ce == pytest.approx(0.0, abs=0.01)
    assert model_ce == pytest.approx(chain.entropy_rate(), abs=0.02)
    # The exact excess loss of the trained table: KL(P || Q_model) under P's stationary marginal.
    assert chain.kl_divergence(model.conditional().detach().double().numpy().T) < 0.005
