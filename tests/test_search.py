"""Searches: greedy/sample picks and beam search on tiny exact models."""

import itertools
import math
from dataclasses import dataclass

import pytest
import torch

from lmlab.decode.processors import (
    FrequencyPenalty,
    LogitBias,
    NoRepeatNGram,
    RepetitionPenalty,
    TopK,
    apply_processors,
)
from lmlab.decode.search import beam_search, draw, greedy_pick, sample_pick, sampling_noise
from lmlab.models.base import LanguageModel, State


@dataclass
class TableConfig:
    vocab_size: int
    seed: int = 0
    scale: float = 2.0
    max_context: int | None = None


class TrigramTable(LanguageModel):
    """Logits from a fixed random table indexed by the last two tokens (a start
    symbol V stands before the first). State: the last token fed, (B, 1)."""

    def __init__(self, config: TableConfig) -> None:
        super().__init__()
        self.config = config
        V = config.vocab_size
        g = torch.Generator().manual_seed(config.seed)
        self.register_buffer("table", torch.randn(V + 1, V, V, generator=g) * config.scale)
        self.calls: list[tuple[int, int]] = []

    @property
    def max_context(self):
        return self.config.max_context

    def forward(self, ids, state=None):
        B, T = ids.shape
        V = self.config.vocab_size
        first = state.tensors["last"] if state is not None else torch.full((B, 1), V, dtype=torch.long)
        prev = torch.cat([first, ids[:, :-1]], 1)
        self.calls.append((B, T))
        length = (state.length if state is not None else 0) + T
        return self.table[prev, ids], State({"last": ids[:, -1:]}, length)


def token_logprobs(model, prompt, tokens, processors=None):
    """Per-token scores of ``tokens`` after ``prompt`` as beam search ranks them (recomputed with
    full forwards): ``processors(log_softmax(logits))``, Hugging Face's beam order."""
    seq = torch.tensor([prompt + tokens])
    logits, _ = model(seq)
    out = []
    for j, t in enumerate(tokens):
        pos = len(prompt) + j - 1
        logp = torch.log_softmax(logits[:, pos].float(), -1)
        out.append(float(apply_processors(processors, logp, seq[:, : pos + 1], num_generated=j)[0, t]))
    return out


def reference_beam(model, prompt, K, steps):
    """Plain beam search without EOS: keep the K best prefixes by summed log-prob."""
    beams = [(0.0, [])]
    for _ in range(steps):
        with torch.no_grad():
            logits, _ = model(torch.tensor([prompt + toks for _, toks in beams]))  # one call, full forward
        lps = torch.log_softmax(logits[:, -1].float(), -1).tolist()
        cands = [(s + v, toks + [t]) for (s, toks), lp in zip(beams, lps) for t, v in enumerate(lp)]
        cands.sort(key=lambda c: c[0], reverse=True)
        beams = cands[:K]
    return beams


def greedy_loop(model, prompt, steps, eos=None, processors=None, on_logprobs=False):
    """Greedy with ``processors`` on the logits (the generation loop's order) or, with
    ``on_logprobs``, on ``log_softmax(logits)`` (beam search's order)."""
    ids = torch.tensor([prompt])
    logits, state = model(ids)
    out = []
    for j in range(steps):
        scores = torch.log_softmax(logits[:, -1], -1) if on_logprobs else logits[:, -1]
        tok = greedy_pick(apply_processors(processors, scores, ids, num_generated=j))
        out.append(int(tok))
        if out[-1] == eos:
            break
        ids = torch.cat([ids, tok[:, None]], 1)
        logits, state = model(tok[:, None], state)
    return out


# ---------------------------------------------------------------- picks


def test_greedy_pick_and_sample_pick_shapes():
    x = torch.tensor([[0.0, 2.0, 1.0], [5.0, -float("inf"), 4.0]])
    assert greedy_pick(x).tolist() == [1, 0]
    s = sample_pick(x, torch.Generator().manual_seed(0))
    assert s.shape == (2,) and s.dtype == torch.int64
    assert s[1] != 1
    with pytest.raises(ValueError, match=r"logits must have shape \(B, V\)"):
        greedy_pick(torch.zeros(3))


@pytest.mark.parametrize("vocab", [2, 68, 1000, 49152])
def test_sample_pick_draws_what_torch_multinomial_draws(vocab):
    """sample_pick (noise, then draw) makes torch.multinomial's draw with the same generator,
    token for token, zero-probability tokens included: the serving loop and generate rely on it."""
    for seed in range(25):
        g = torch.Generator().manual_seed(1000 + seed)
        logits = 3 * torch.randn(1 + seed % 4, vocab, generator=g)
        logits[:, ::3] = -float("inf")
        logits[:, 1] = 0.0
        probs = torch.softmax(logits, dim=-1)
        expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
        assert torch.equal(sample_pick(logits, torch.Generator().manual_seed(seed)), expected)


def test_draw_takes_each_blocks_noise_from_its_own_generator():
    """Rows of one batch drawn at once, each block's noise from its own generator, get the
    tokens each block gets alone (what continuous batching needs)."""
    g = torch.Generator().manual_seed(7)
    probs = torch.softmax(2 * torch.randn(5, 50, generator=g), dim=-1)
    blocks, seeds = [(0, 2), (2, 3), (3, 5)], [11, 12, 13]
    noise = torch.cat([sampling_noise(hi - lo, 50, torch.Generator().manual_seed(s)) for (lo, hi), s in zip(blocks, seeds)])
    together = draw(probs, noise)
    for (lo, hi), s in zip(blocks, seeds):
        alone = torch.multinomial(probs[lo:hi], 1, generator=torch.Generator().manual_seed(s)).squeeze(1)
        assert torch.equal(together[lo:hi], alone)


def test_sample_pick_follows_the_distribution():
    """Chi-square goodness of fit of 20,000 draws from a fixed distribution (fixed seed)."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    draws = sample_pick(probs.log().expand(20000, -1).contiguous(), torch.Generator().manual_seed(3))
    counts = torch.bincount(draws, minlength=5).double()
    assert counts[4] == 0
    expected = 20000 * probs[:4].double()
    chi2 = float(((counts[:4] - expected) ** 2 / expected).sum())
    assert chi2 < 11.34  # the 0.99 quantile of chi-square with 3 degrees of freedom


# ---------------------------------------------------------------- beam search: exactness


def test_beam_search_is_exact_when_wide_enough():
    """V=4, L=4: all 256 continuations enumerated; width 4**3 keeps every prefix."""
    model = TrigramTable(TableConfig(vocab_size=4, seed=1))
    prompt = [2]
    V, L = 4, 4
    all_seqs = []
    for toks in itertools.product(range(V), repeat=L):
        all_seqs.append((sum(token_logprobs(model, prompt, list(toks))), list(toks)))
    all_seqs.sort(key=lambda c: c[0], reverse=True)
    (hyps,) = beam_search(model, [prompt], num_beams=64, max_new_tokens=L, num_return_sequences=64)
    assert [h.tokens for h in hyps] == [t for _, t in all_seqs[:64]]
    for h, (s, _) in zip(hyps, all_seqs):
        assert h.sum_logprob == pytest.approx(s, abs=1e-4)
        assert h.score == pytest.approx(s / L, abs=1e-4)
        assert not h.finished
    # a narrow beam need not find the optimum, but never beats it, and its scores are honest
    (narrow,) = beam_search(model, [prompt], num_beams=2, max_new_tokens=L)
    assert narrow[0].sum_logprob <= all_seqs[0][0] + 1e-5
    assert narrow[0].sum_logprob == pytest.approx(sum(token_logprobs(model, prompt, narrow[0].tokens)), abs=1e-4)


@pytest.mark.parametrize("K", [2, 3, 5])
def test_beam_search_matches_reference(K):
    model = TrigramTable(TableConfig(vocab_size=6, seed=K))
    prompt = [1, 4, 2]
    ref = reference_beam(model, prompt, K, 5)
    (hyps,) = beam_search(model, [prompt], num_beams=K, max_new_tokens=5, num_return_sequences=K)
    assert [h.tokens for h in hyps] == [t for _, t in ref]
    for h, (s, t) in zip(hyps, ref):
        assert h.sum_logprob == pytest.approx(s, abs=1e-4)
        assert math.fsum(h.token_logprobs) == h.sum_logprob
        assert h.token_logprobs == pytest.approx(token_logprobs(model, prompt, t), abs=1e-5)


@pytest.mark.parametrize("eos", [None, 0])
def test_width_one_is_greedy(eos):
    model = TrigramTable(TableConfig(vocab_size=5, seed=7, scale=1.0))
    prompts = [[1], [3, 2, 4], [2, 2], [4, 0, 1, 3]]
    out = beam_search(model, prompts, num_beams=1, max_new_tokens=12, eos_id=eos)
    for p, (h,) in zip(prompts, out):
        assert h.tokens == greedy_loop(model, p, 12, eos)
        assert h.finished == (eos is not None and h.tokens[-1] == eos)
    procs = [RepetitionPenalty(3.0)]
    out = beam_search(model, prompts, num_beams=1, max_new_tokens=12, eos_id=eos, processors=procs)
    differs = 0
    for p, (h,) in zip(prompts, out):
        assert h.tokens == greedy_loop(model, p, 12, eos, procs, on_logprobs=True)
        assert h.token_logprobs == pytest.approx(token_logprobs(model, p, h.tokens, procs), abs=1e-5)
        differs += h.tokens != greedy_loop(model, p, 12, eos, procs)
    # the repetition penalty scales by sign: on log-probs (all < 0) it is another rule than on logits
    assert differs > 0
    procs = [NoRepeatNGram(2), LogitBias({1: -1.5, 3: 0.7}), FrequencyPenalty(0.4)]
    out = beam_search(model, prompts, num_beams=1, max_new_tokens=12, eos_id=eos, processors=procs)
    for p, (h,) in zip(prompts, out):  # shifts and bans: the same argmax in either order
        assert h.tokens == greedy_loop(model, p, 12, eos, procs)
        assert h.token_logprobs == pytest.approx(token_logprobs(model, p, h.tokens, procs), abs=1e-5)


def test_truncated_beams_die_and_top_k_1_is_greedy():
    model = TrigramTable(TableConfig(vocab_size=5, seed=3))
    (hyps,) = beam_search(model, [[1, 2]], num_beams=3, max_new_tokens=6, processors=[TopK(1)], num_return_sequences=3)
    assert len(hyps) == 1  # the other beams have probability 0
    assert hyps[0].tokens == greedy_loop(model, [1, 2], 6)
    # not renormalised after the cut (Hugging Face's order): the model's own log-probs
    assert hyps[0].token_logprobs == pytest.approx(token_logprobs(model, [1, 2], hyps[0].tokens), abs=1e-5)


# ---------------------------------------------------------------- batching


def test_batched_prompts_of_different_lengths_match_single_runs():
    model = TrigramTable(TableConfig(vocab_size=7, seed=11, scale=1.5))
    prompts = [[0], [1, 2, 3], [2, 1], [6, 5, 4, 3]]
    kw = dict(num_beams=3, max_new_tokens=6, eos_id=5, num_return_sequences=3, early_stopping="never")
    model.calls.clear()
    batched = beam_search(model, prompts, **kw)
    calls = list(model.calls)
    assert calls[0] == (4, 1)  # the common prefix in one call
    assert calls[1] == (12, 1)  # then all B * num_beams rows, one token per call
    assert all(T == 1 and B % 3 == 0 and B <= 12 for B, T in calls[1:])
    for p, hyps in zip(prompts, batched):
        (single,) = beam_search(model, [p], **kw)
        assert [h.tokens for h in hyps] == [h.tokens for h in single]
        assert [h.score for h in hyps] == pytest.approx([h.score for h in single], abs=1e-5)
    # a (B, T) tensor works as well
    t = torch.tensor([[1, 2, 3], [6, 5, 4]])
    as_tensor = beam_search(model, t, **kw)
    assert [h.tokens for h in as_tensor[0]] == [h.tokens for h in batched[1]]


# ---------------------------------------------------------------- EOS, scores, early stopping


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_scores_and_eos(length_penalty):
    model = TrigramTable(TableConfig(vocab_size=5, seed=2, scale=1.0))
    prompt = [3, 1]
    (hyps,) = beam_search(
        model, [prompt], num_beams=4, max_new_tokens=8, eos_id=0, length_penalty=length_penalty, num_return_sequences=4
    )
    assert len(hyps) == 4
    assert [h.score for h in hyps] == sorted([h.score for h in hyps], reverse=True)
    for h in hyps:
        assert h.finished == (h.tokens[-1] == 0)
        assert 0 not in h.tokens[:-1]
        assert len(h.tokens) <= 8
        assert h.token_logprobs == pytest.approx(token_logprobs(model, prompt, h.tokens), abs=1e-5)
        assert h.sum_logprob == pytest.approx(sum(h.token_logprobs))
        assert h.score == pytest.approx(h.sum_logprob / len(h.tokens) ** length_penalty)
    assert any(h.finished for h in hyps)


def test_early_stopping_never_is_at_least_as_good():
    model = TrigramTable(TableConfig(vocab_size=6, seed=5, scale=1.0))
    prompts = [[1], [2, 3], [4, 4, 5]]
    best = {}
    for es in (True, False, "never"):
        out = beam_search(model, prompts, num_beams=2, max_new_tokens=10, eos_id=0, early_stopping=es)
        best[es] = [hyps[0].score for hyps in out]
    for a, b, c in zip(best[True], best[False], best["never"]):
        assert c >= a - 1e-6 and c >= b - 1e-6


# ---------------------------------------------------------------- diverse beam search


def test_diverse_groups():
    model = TrigramTable(TableConfig(vocab_size=6, seed=9))
    kw = dict(num_beams=4, max_new_tokens=5, num_return_sequences=4, num_beam_groups=4)
    (same,) = beam_search(model, [[1, 2]], diversity_penalty=0.0, **kw)
    assert len({tuple(h.tokens) for h in same}) == 1  # four independent greedy searches
    (diverse,) = beam_search(model, [[1, 2]], diversity_penalty=100.0, **kw)
    assert len({h.tokens[0] for h in diverse}) == 4  # each group avoids the earlier groups' tokens
    assert sorted(h.group for h in diverse) == [0, 1, 2, 3]
    for h in diverse:  # the penalty steers the search but is not part of the score
        assert h.sum_logprob == pytest.approx(sum(token_logprobs(model, [1, 2], h.tokens)), abs=1e-4)
    (two,) = beam_search(model, [[1, 2]], num_beams=4, max_new_tokens=5, num_return_sequences=4,
                         num_beam_groups=2, diversity_penalty=1.0)  # fmt: skip
    assert len({tuple(h.tokens) for h in two}) == 4


# ---------------------------------------------------------------- a real model with a KV cache


def test_transformer_beam_matches_reference():
    from lmlab.models.transformer import Transformer, TransformerConfig

    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=11, block_size=32, n_layer=2, n_head=2, n_embd=16))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.eval()
    prompts = [[1, 2, 3], [4]]
    out = beam_search(model, prompts, num_beams=3, max_new_tokens=4, num_return_sequences=3)
    for p, hyps in zip(prompts, out):
        ref = reference_beam(model, p, 3, 4)
        assert [h.tokens for h in hyps] == [t for _, t in ref]
        assert [h.sum_logprob for h in hyps] == pytest.approx([s for s, _ in ref], abs=1e-4)


# ---------------------------------------------------------------- errors


def test_beam_search_errors():
    model = TrigramTable(TableConfig(vocab_size=4, max_context=6))
    with pytest.raises(ValueError, match="num_beams must be an integer >= 1, got 0"):
        beam_search(model, [[1]], num_beams=0, max_new_tokens=2)
    with pytest.raises(ValueError, match="num_beam_groups must be an integer >= 1 dividing num_beams=4, got 3"):
        beam_search(model, [[1]], num_beams=4, max_new_tokens=2, num_beam_groups=3)
    with pytest.raises(ValueError, match=r"num_return_sequences must be an integer in \[1, num_beams=2\], got 3"):
        beam_search(model, [[1]], num_beams=2, max_new_tokens=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        beam_search(model, [[1], []], num_beams=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="token id 9 is outside the model's vocabulary of size V=4"):
        beam_search(model, [[9]], num_beams=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="more than the model's max_context=6; accepted: max_new_tokens <= 4"):
        beam_search(model, [[1, 2, 3]], num_beams=2, max_new_tokens=5)
    with pytest.raises(ValueError, match="early_stopping must be True, False or 'never'"):
        beam_search(model, [[1]], num_beams=2, max_new_tokens=2, early_stopping="yes")
    with pytest.raises(ValueError, match="list of token-id lists"):
        beam_search(model, [1, 2], num_beams=2, max_new_tokens=2)
