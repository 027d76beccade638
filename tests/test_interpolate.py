"""The interpolate family: a linear mixture of lmlab models, EM-fitted weights, save/load, CLI."""

import json
import math

import numpy as np
import pytest
import torch

from lmlab.checkpoints import load_checkpoint
from lmlab.cli import main
from lmlab.decode.search import beam_search
from lmlab.models import build_model, load_model, save_model
from lmlab.models.interpolate import (InterpolatedLM, check_same_tokenizer, component_target_logprobs, fit_weights,
                                      mixture_logprobs)
from lmlab.score import score_sequences
from lmlab.tokenizers import CharTokenizer

TEXT = "abcab cabba acbca bbacc abcba " * 8
pytestmark = pytest.mark.filterwarnings("ignore::lmlab.models.ngram.DiscountWarning")


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.train(TEXT)


def components(tok, adaptive=False):
    ids = np.asarray(tok.encode(TEXT), dtype=np.int64)
    kn = build_model("ngram", {"vocab_size": tok.vocab_size, "order": 3, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                               "unk_id": tok.unk_id})
    kn.fit(ids, add_bos_eos=False)
    torch.manual_seed(0)
    extra = {"adaptive_cutoffs": [4]} if adaptive else {}
    lstm = build_model("lstm", {"vocab_size": tok.vocab_size, "n_embd": 8, "n_hidden": 8, **extra}).eval()
    return kn, lstm


def test_mixture_equals_the_hand_computed_mixture(tok):
    kn, lstm = components(tok)
    model = InterpolatedLM.from_models([kn, lstm], [0.3, 0.7]).eval()
    ids = torch.tensor([tok.encode("abcab"), tok.encode("cabba")])
    mixed, _ = model(ids)
    p = 0.3 * torch.softmax(kn(ids)[0], -1) + 0.7 * torch.softmax(lstm(ids)[0], -1)
    torch.testing.assert_close(mixed, torch.log(p), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.logsumexp(mixed, -1), torch.zeros(2, 5), atol=1e-5, rtol=0)


def test_state_continues_and_selects(tok):
    kn, lstm = components(tok)
    model = InterpolatedLM.from_models([kn, lstm], [0.5, 0.5]).eval()
    ids = torch.tensor([tok.encode("abcabca"), tok.encode("cabbaac"), tok.encode("bbaccab")])
    full, _ = model(ids)
    a, state = model(ids[:, :3])
    b, _ = model(ids[:, 3:], state)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=1e-5)
    index = torch.tensor([2, 0])
    picked = state.select(index)
    assert picked.batch_size == 2 and picked.length == 3
    c, _ = model(ids[index, 3:], picked)
    torch.testing.assert_close(c, full[index, 3:], atol=1e-5, rtol=1e-5)
    # beam search runs on it and its scores are the mixture's
    (hyps,) = beam_search(model, [tok.encode("ab")], num_beams=3, max_new_tokens=3)
    seq = torch.tensor([tok.encode("ab") + hyps[0].tokens])
    logp, _ = model(seq[:, :-1])
    expected = float(logp[0, 1:].gather(-1, seq[0, 2:, None]).sum())
    assert hyps[0].sum_logprob == pytest.approx(expected, abs=1e-4)


def test_em_is_monotone_and_recovers_known_weights():
    rng = np.random.default_rng(0)
    V, true = 6, np.array([0.2, 0.5, 0.3])
    dists = rng.dirichlet(np.ones(V), size=3)              # three fixed distributions over V words
    which = rng.choice(3, size=40_000, p=true)             # which component emits each token
    tokens = np.array([rng.choice(V, p=dists[k]) for k in which])
    L = np.log(dists[:, tokens].T)                          # (N, K) log p_k(token)
    weights, history = fit_weights(L)
    assert np.all(np.diff(history) <= 1e-12)                # never worse
    assert history[-1] < history[0]
    np.testing.assert_allclose(weights, true, atol=0.03)
    # EM's fixed point is the maximum: no nearby weights do better
    best = -mixture_logprobs(L, weights).mean()
    for d in ([0.01, -0.01, 0], [0, 0.01, -0.01], [-0.01, 0, 0.01]):
        assert -mixture_logprobs(L, weights + np.array(d)).mean() >= best - 1e-9


def test_one_component_that_is_always_better_gets_the_weight():
    L = np.log(np.array([[0.5, 0.1]] * 50))
    weights, _ = fit_weights(L, max_iters=2000)
    assert weights[0] > 0.99


@pytest.mark.parametrize("adaptive", [False, True])
def test_component_target_logprobs_equal_the_forward_pass(tok, adaptive):
    kn, lstm = components(tok, adaptive)
    ids = torch.tensor(tok.encode(TEXT[:40]))
    L = component_target_logprobs([kn, lstm], ids, chunk=7)  # chunks carry each state across
    for k, model in enumerate((kn, lstm)):
        logits, _ = model(ids[None, :-1])
        expected = torch.log_softmax(logits[0].float(), -1).gather(-1, ids[1:, None])[:, 0].double().numpy()
        np.testing.assert_allclose(L[:, k], expected, atol=1e-5)


def test_refuses_different_vocabularies_and_bad_weights(tok):
    kn, lstm = components(tok)
    other = build_model("lstm", {"vocab_size": tok.vocab_size + 1, "n_embd": 4, "n_hidden": 4})
    with pytest.raises(ValueError, match="share one tokenizer"):
        InterpolatedLM.from_models([kn, other])
    with pytest.raises(ValueError, match="sum to 1"):
        InterpolatedLM.from_models([kn, lstm], [0.5, 0.6])
    with pytest.raises(ValueError, match="one weight per component"):
        InterpolatedLM.from_models([kn, lstm], [1.0])
    with pytest.raises(ValueError, match="differs from that of a"):
        check_same_tokenizer([tok, CharTokenizer.train("xyz")], ["a", "b"])
    with pytest.raises(ValueError, match="made of component models"):
        build_model("interpolate", {"vocab_size": 5, "weights": [1.0], "components": ["c"]})


def test_save_load_round_trip(tok, tmp_path):
    kn, lstm = components(tok, adaptive=True)
    model = InterpolatedLM.from_models([kn, lstm], [0.25, 0.75]).eval()
    save_model(model, tmp_path / "mix")
    assert json.loads((tmp_path / "mix" / "config.json").read_text())["weights"] == [0.25, 0.75]
    again = load_model(tmp_path / "mix").eval()
    ids = torch.tensor([tok.encode("abcabcc")])
    torch.testing.assert_close(again(ids)[0], model(ids)[0])


def _checkpoint(model, tok, directory):
    save_model(model, directory)
    tok.save(directory / "tokenizer.json")
    return str(directory)


def test_cli_fits_saves_and_scores(tok, tmp_path, capsys):
    kn, lstm = components(tok)
    a, b = _checkpoint(kn, tok, tmp_path / "kn"), _checkpoint(lstm, tok, tmp_path / "lstm")
    valid = tmp_path / "valid.txt"
    valid.write_text("abcab cabba\nacbca bbacc\n")
    assert main(["interpolate", "--models", a, b, "--valid", str(valid), "--out", str(tmp_path / "mix")]) == 0
    report = json.loads(capsys.readouterr().out)
    w = report["weights"]
    assert len(w) == 2 and abs(sum(w) - 1) < 1e-9
    ppl = report["valid_perplexity"]
    assert ppl["interpolated"] <= min(ppl["components"]) + 1e-9
    model, tok2 = load_checkpoint(str(tmp_path / "mix"))
    assert model.config.weights == pytest.approx(w)
    # the held-out figure the CLI printed is the mixture's own score of that stream
    ids = torch.tensor(tok2.encode(valid.read_text()))
    logp, _ = model(ids[None, :-1])
    nll = -float(logp[0].gather(-1, ids[1:, None]).sum()) / (len(ids) - 1)
    assert math.exp(nll) == pytest.approx(ppl["interpolated"], rel=1e-5)
    assert score_sequences(model, tok2, ["abc"]).tokens == 4


def test_cli_refuses_models_with_different_tokenizers(tok, tmp_path, capsys):
    kn, _ = components(tok)
    other_tok = CharTokenizer.train("abcdefgh ")
    other = build_model("lstm", {"vocab_size": other_tok.vocab_size, "n_embd": 4, "n_hidden": 4})
    a, b = _checkpoint(kn, tok, tmp_path / "kn"), _checkpoint(other, other_tok, tmp_path / "other")
    valid = tmp_path / "valid.txt"
    valid.write_text("abc\n")
    assert main(["interpolate", "--models", a, b, "--valid", str(valid), "--out", str(tmp_path / "mix")]) == 2
    assert "differs from that of" in capsys.readouterr().err
    assert not (tmp_path / "mix").exists()


def test_cli_sequences_and_given_weights(tok, tmp_path, capsys):
    """--sequences: each line is <bos> line <eos>; the printed figure is the saved mixture's score_sequences."""
    kn, lstm = components(tok)
    a, b = _checkpoint(kn, tok, tmp_path / "kn"), _checkpoint(lstm, tok, tmp_path / "lstm")
    valid = tmp_path / "valid.txt"
    valid.write_text("abcab\ncabba acb\nbb\n")
    args = ["interpolate", "--models", a, b, "--valid", str(valid), "--sequences", "--weights", "0.6", "0.4"]
    assert main([*args, "--out", str(tmp_path / "mix")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == [0.6, 0.4] and report["em_iterations"] == 0
    model, tok2 = load_checkpoint(str(tmp_path / "mix"))
    score = score_sequences(model, tok2, valid.read_text().splitlines())
    assert report["valid_tokens"] == score.tokens
    assert report["valid_nll_per_token"]["interpolated"] == pytest.approx(score.nll_per_token, rel=1e-5)
    assert main([*args[:-2], "0.6", "0.6", "--out", str(tmp_path / "bad")]) == 2
    assert "sum to 1" in capsys.readouterr().err


def test_target_logprobs_of_every_family_equal_the_forward_pass(tok):
    """LanguageModel.target_logprobs (what component_target_logprobs reads): the n-gram's fast path
    when the targets are the stream shifted, the default path for any other targets."""
    kn, lstm = components(tok)
    _, adaptive = components(tok, adaptive=True)
    ids = torch.tensor([tok.encode("abcab cabba acbca")])
    x, shifted = ids[:, :-1], ids[:, 1:]
    other = torch.flip(shifted, dims=[1])
    for model in (kn, lstm, adaptive.eval()):
        _, half = model(x[:, :4])
        for y in (shifted, other):
            logits, state = model(x[:, 4:], half.clone())
            want = torch.log_softmax(logits.double(), -1).gather(-1, y[:, 4:, None]).squeeze(-1)
            got, after = model.target_logprobs(x[:, 4:], y[:, 4:], half.clone())
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
            assert after.length == state.length
            for key, value in state.tensors.items():
                torch.testing.assert_close(after.tensors[key], value)
