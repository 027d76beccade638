"""Which ids decoding treats as special: the tokenizer's or the model's declared ones, never a
position in the vocabulary. Checked by sampling Markov chains with exact stationary distributions."""

import math

import numpy as np
import pytest
import torch

from conftest import BigramTable
from test_processors import chi2_pvalue

from lmlab.decode.setups import run_setup, special_ids_to_suppress
from lmlab.decode.tasks import complete
from lmlab.metrics import next_tokens_nll
from lmlab.models import build_model
from lmlab.models.base import special_token_ids
from lmlab.models.ngram import NGramConfig, NGramModel
from lmlab.sources import MarkovChain
from lmlab.tokenizers import CharTokenizer

CHAIN = MarkovChain.random(6, order=1, seed=11, concentration=0.5)
ROWS = 3000


def _last_tokens(model, tokenizer, prompts, setup="sample", steps=3, **kw) -> list[int]:
    """The token generated at step ``steps`` of every row (rows are independent draws)."""
    out = run_setup(model, tokenizer, prompts, setup, steps, seed=0, **kw)
    return [rs[0].token_ids[-1] for rs in out]


def _stationary_starts() -> list[int]:
    return CHAIN.sample_sequences(ROWS, 1, seed=0)[:, 0].tolist()


def test_chain_without_a_tokenizer_samples_its_stationary_distribution():
    """No tokenizer, no declared specials: every id can be generated. A row started in the
    stationary distribution stays in it, so the last token of each row is a stationary draw."""
    model = BigramTable(torch.from_numpy(np.log(CHAIN.transitions)))
    assert special_token_ids(model) == {}
    assert special_ids_to_suppress("default", None, 6, model=model) == []
    last = _last_tokens(model, None, [[c] for c in _stationary_starts()])
    counts = torch.bincount(torch.tensor(last), minlength=6).double()
    assert (counts > 0).all()
    assert chi2_pvalue(counts, torch.from_numpy(CHAIN.stationary())) > 1e-3


def test_chain_behind_a_tokenizer_bans_the_tokenizer_specials():
    """The chain's symbols are ids 4..9 of a char tokenizer; the model gives <pad> and <bos>
    probability eps each from every context, so banning them (the default) renormalises to
    the chain exactly, and sampling gives its stationary distribution over the symbols."""
    tok = CharTokenizer(list("abcdef"))
    V, eps = tok.vocab_size, 0.05
    assert V == 10 and tok.encode("abcdef") == [4, 5, 6, 7, 8, 9]
    table = torch.full((V, V), -math.inf, dtype=torch.float64)
    table[:, 4:] = torch.from_numpy(np.log((1 - 2 * eps) * np.vstack([CHAIN.transitions[0]] * 4 + [CHAIN.transitions])))
    table[:, [tok.pad_id, tok.bos_id]] = math.log(eps)  # <eos> and <unk> have probability 0
    model = BigramTable(table)
    letters = MarkovChain("abcdef", CHAIN.transitions)
    prompts = [letters.decode([c]) for c in _stationary_starts()]
    last = _last_tokens(model, tok, prompts)
    counts = torch.bincount(torch.tensor(last), minlength=V).double()
    assert counts[:4].sum() == 0
    assert chi2_pvalue(counts[4:], torch.from_numpy(CHAIN.stationary())) > 1e-3
    # with nothing banned, <pad> and <bos> are drawn about 2 * eps of the time
    free = _last_tokens(model, tok, prompts[:1000], "sample, specials none", steps=1)
    assert 0.05 < sum(t in (tok.pad_id, tok.bos_id) for t in free) / 1000 < 0.15


def test_the_model_declares_its_specials_when_there_is_no_tokenizer():
    """Symbols 0..5 and two specials 6, 7 the model declares: 6 and 7 are banned, 0 and 1 are not."""

    class Declaring(BigramTable):
        special_ids = {"pad": 6, "bos": 7}

    table = torch.full((8, 8), math.log(0.05), dtype=torch.float64)
    table[:6, :6] = torch.from_numpy(np.log(0.9 * CHAIN.transitions))
    model = Declaring(table)
    assert special_ids_to_suppress("default", None, 8, model=model) == [6, 7]
    last = _last_tokens(model, None, [[c] for c in _stationary_starts()])
    counts = torch.bincount(torch.tensor(last), minlength=8).double()
    assert counts[6:].sum() == 0
    assert chi2_pvalue(counts[:6], torch.from_numpy(CHAIN.stationary())) > 1e-3


def test_the_two_letter_model_samples_without_error():
    """The A/B bigram of docs/sources.md: V = 2, no tokenizer. Every search runs, and sampling
    gives the chain's stationary distribution (1/3, 2/3)."""
    chain = MarkovChain("AB", [[0.5, 0.5], [0.25, 0.75]])
    model = build_model("bigram", {"vocab_size": 2})
    with torch.no_grad():
        model.E.copy_(torch.from_numpy(np.log(chain.transitions)).T)  # column i = P(. | i)
    starts = chain.sample_sequences(ROWS, 1, seed=1)[:, 0].tolist()
    last = _last_tokens(model, None, [[c] for c in starts])
    counts = torch.bincount(torch.tensor(last), minlength=2).double()
    assert chi2_pvalue(counts, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)) > 1e-3
    # greedy follows the argmax: B after B forever; beam 2 and complete() run too
    assert run_setup(model, None, [[1]], "greedy", 5)[0][0].token_ids == [1] * 5
    assert len(run_setup(model, None, [[0]], "beam 2", 4)[0][0].token_ids) == 4
    assert len(complete(model, [[0]], 4, seed=0)[0]) == 5


def test_an_ngram_model_declares_bos_eos_unk():
    cfg = NGramConfig(vocab_size=5, order=2, bos_id=3, eos_id=4, unk_id=0)
    model = NGramModel(cfg)
    assert model.special_ids == {"bos": 3, "eos": 4, "unk": 0}
    assert special_ids_to_suppress("default", None, 5, model=model) == [3]
    assert special_ids_to_suppress("all", None, 5, model=model) == [3, 4, 0]
    # a tokenizer, when given, is the authority
    tok = CharTokenizer(list("a"))
    assert special_token_ids(model, tok) == {"pad": 0, "bos": 1, "eos": 2, "unk": 3}


class _NoBosTokenizer:
    """A tokenizer with <eos> 0 and <pad> 0 but no <bos> (as many Hugging Face ones)."""

    pad_id, bos_id, eos_id, unk_id = 0, None, 0, None
    vocab_size = 4

    def encode(self, text):
        return [1 + "ab".index(c) for c in text]

    def decode(self, ids):
        return "".join("?ab"[i] if i < 3 else "" for i in ids)


def test_add_bos_needs_a_declared_bos():
    model = BigramTable(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="add_bos=True but no <bos> id is declared"):
        run_setup(model, None, [[2]], "greedy", 2, add_bos=True)
    with pytest.raises(ValueError, match="add_bos=True but no <bos> id is declared"):
        run_setup(model, _NoBosTokenizer(), ["ab"], "greedy", 2, add_bos=True)
    with pytest.raises(ValueError, match="has no <bos> id"):
        next_tokens_nll(model, _NoBosTokenizer(), ["a"], ["b"], add_bos=True)
    # the tokenizer's <eos> 0 doubles as <pad>: "default" keeps it, "all" bans it
    assert special_ids_to_suppress("default", _NoBosTokenizer(), 4) == []
    assert special_ids_to_suppress("all", _NoBosTokenizer(), 4) == [0]
