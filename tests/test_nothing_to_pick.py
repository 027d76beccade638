"""When processors leave a row nothing to choose, every search says so with the picks' clear error."""

import math

import pytest
import torch

from conftest import BigramTable
from lmlab.cli import main
from lmlab.decode.generate import generate
from lmlab.decode.processors import LogitBias, NoRepeatNGram, SuppressTokens
from lmlab.decode.search import beam_search
from lmlab.decode.setups import DecodingSetup, run_setup
from lmlab.models import build_model, save_model
from lmlab.tokenizers import CharTokenizer

NOTHING = "have no token to pick"


@pytest.fixture
def table():
    return BigramTable(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))


def test_greedy_and_sampling_refuse_a_row_with_every_token_banned(table):
    ban_all = [LogitBias({t: -math.inf for t in range(6)})]
    for do_sample in (False, True):
        with pytest.raises(ValueError, match=rf"rows \[0, 1\] of the logits {NOTHING}"):
            generate(table, [[1], [2]], 3, processors=ban_all, do_sample=do_sample, seed=0)
    # everything banned after a few tokens (no token may repeat): the row that runs out says so
    with pytest.raises(ValueError, match=rf"rows \[0\] of the logits {NOTHING}"):
        generate(table, [[1]], 7, processors=[NoRepeatNGram(1)], do_sample=False)
    assert len(generate(table, [[1]], 5, processors=[NoRepeatNGram(1)], do_sample=False)[0].token_ids) == 5


def test_only_rows_that_choose_are_checked():
    """A row still reading its prompt, or one that has ended, discards its pick: nothing to raise.
    The table sends 1 -> 0 (the <eos> here) and 2 -> 3 -> 4 -> 2; after a 0 every token is banned."""
    table = torch.full((6, 6), -1.0)
    for a, b in [(1, 0), (2, 3), (3, 4), (4, 2), (5, 2), (0, 2)]:
        table[a, b] = 5.0
    model = BigramTable(table)
    ban_after_eos = [_BanAllAfter(0)]
    # row 1 reads 0 from its prompt (nothing allowed after it, but the next token is forced)
    gens = generate(model, [[2], [2, 0, 3]], 3, processors=ban_after_eos, do_sample=False)
    assert [g.token_ids for g in gens] == [[3, 4, 2], [4, 2, 3]]
    # row 0 ends at <eos> at once, then has nothing allowed while row 1 goes on
    gens = generate(model, [[1], [2]], 4, processors=ban_after_eos, do_sample=False, eos_id=0)
    assert [g.token_ids for g in gens] == [[0], [3, 4, 2, 3]]
    assert gens[0].finish_reason == "eos"
    with pytest.raises(ValueError, match=rf"rows \[1\] of the logits {NOTHING}"):
        generate(model, [[2], [1]], 3, processors=ban_after_eos, do_sample=False)  # no <eos>: row 1 must go on


class _BanAllAfter:
    """Bans every token in rows whose last token is ``token``."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, logits, ids):
        return logits.masked_fill(ids[:, -1:] == self.token, -math.inf)


def test_beam_search_refuses_a_live_beam_with_every_token_banned(table):
    ban_all = [SuppressTokens(tuple(range(6)))]
    for k in (1, 3):
        with pytest.raises(ValueError, match=NOTHING):
            beam_search(table, [[1]], num_beams=k, max_new_tokens=3, processors=ban_all)
    with pytest.raises(ValueError, match=NOTHING):
        run_setup(table, None, [[1]], DecodingSetup(num_beams=2, logit_bias={t: -math.inf for t in range(6)}), 3)


@pytest.mark.parametrize("setup", ["greedy", "sample", "beam 2"])
def test_run_setup_every_search(table, setup):
    ban = DecodingSetup.parse(setup).with_options(suppress_tokens=tuple(range(6)))
    with pytest.raises(ValueError, match=NOTHING):
        run_setup(table, None, [[1], [3]], ban, 4, seed=0)


def test_the_cli_prints_one_error_line(tmp_path, capsys):
    tok = CharTokenizer(list("ab"))
    directory = tmp_path / "ckpt"
    save_model(build_model("bigram", {"vocab_size": tok.vocab_size}), directory)
    tok.save(directory / "tokenizer.json")
    bias = [f"{t}:-inf" for t in range(tok.vocab_size)]
    for search in (["--greedy"], ["--sample"], ["--num-beams", "2"]):
        code = main(["generate", "--model", str(directory), "--prompt", "ab", "--max-new-tokens", "3",
                     *search, "--logit-bias", *bias])
        err = capsys.readouterr().err
        assert code != 0
        assert err.count("\n") == 1 and err.startswith("error: rows [0] of the logits have no token to pick")
