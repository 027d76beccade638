"""The cache family: the next word from the decayed counts of the recent history."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.models import build_model, load_model, save_model
from lmlab.models.interpolate import InterpolatedLM, component_target_logprobs, fit_weights, mixture_logprobs

pytestmark = pytest.mark.filterwarnings("ignore::lmlab.models.ngram.DiscountWarning")


def reference_logprobs(ids, vocab_size, order, decay, window):
    """log p(ids[t + 1] | ids[: t + 1]) by the definition, with Python loops."""
    out = []
    for t in range(len(ids) - 1):
        complete = t + 2 - order >= 0
        context = tuple(ids[t + 2 - order : t + 1]) if order > 1 and complete else ()
        target, total = 0.0, 0.0
        for j in range(max(0, t + 1 - window), t + 1):
            if order > 1 and (not complete or j - order + 1 < 0 or tuple(ids[j - order + 1 : j]) != context):
                continue
            total += decay ** (t - j)
            target += decay ** (t - j) if ids[j] == ids[t + 1] else 0.0
        p = target / total if total > 0 else 1.0 / vocab_size
        out.append(math.log(p) if p > 0 else -math.inf)
    return out


def test_hand_computed_unigram_cache():
    model = build_model("cache", {"vocab_size": 4, "decay": 0.5, "window": 3})
    logits, _ = model(torch.tensor([[1, 2, 1, 3]]))
    p = logits.exp()[0].double()
    assert p[0].tolist() == pytest.approx([0, 1, 0, 0])                   # history: 1
    assert p[1].tolist() == pytest.approx([0, 0.5 / 1.5, 1 / 1.5, 0])      # 1 (age 1), 2 (age 0)
    assert p[2].tolist() == pytest.approx([0, 1.25 / 1.75, 0.5 / 1.75, 0])  # 1 (ages 2, 0), 2 (age 1)
    # window 3: the first 1 has left; 2 (age 2), 1 (age 1), 3 (age 0)
    assert p[3].tolist() == pytest.approx([0, 0.5 / 1.75, 0.25 / 1.75, 1 / 1.75])


def test_empty_history_and_unseen_context_are_uniform():
    model = build_model("cache", {"vocab_size": 5, "order": 2})
    logits, _ = model(torch.tensor([[0, 1, 0, 4]]))
    p = logits.exp()[0].double()
    assert p[0].tolist() == pytest.approx([0.2] * 5)   # nothing has followed 0 yet
    assert p[1].tolist() == pytest.approx([0.2] * 5)   # nor 1
    assert p[2].tolist() == pytest.approx([0, 1, 0, 0, 0])  # 0 was followed by 1
    assert p[3].tolist() == pytest.approx([0.2] * 5)


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(0, 5), min_size=2, max_size=40), order=st.integers(1, 3),
       decay=st.sampled_from([1.0, 0.9, 0.5]), window=st.integers(1, 12), split=st.integers(0, 40))
def test_equals_the_definition_in_one_pass_and_in_pieces(ids, order, decay, window, split):
    model = build_model("cache", {"vocab_size": 6, "order": order, "decay": decay, "window": window})
    x = torch.tensor([ids])
    want = reference_logprobs(ids, 6, order, decay, window)
    logits, _ = model(x[:, :-1])
    got = logits[0].double().gather(-1, x[0, 1:, None]).squeeze(-1).tolist()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert torch.allclose(logits.exp().sum(-1), torch.ones(1, len(ids) - 1))
    split = min(split, len(ids) - 1)
    first, state = model(x[:, :split])
    second, _ = model(x[:, split:-1], state)
    assert torch.equal(torch.cat([first, second], 1), logits)


def test_long_inputs_are_read_in_chunks_with_the_same_result():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (2, 1300), generator=g)
    model = build_model("cache", {"vocab_size": 30, "order": 2, "decay": 0.99, "window": 700})
    whole, _ = model(ids)
    pieces, state = [], None
    for s in range(0, 1300, 97):
        out, state = model(ids[:, s : s + 97], state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), whole)
    row = ids[1].tolist()
    want = reference_logprobs(row, 30, 2, 0.99, 700)[-50:]
    got = whole[1, -51:-1].double().gather(-1, ids[1, -50:, None]).squeeze(-1).tolist()
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_bad_settings_and_ids_name_the_value():
    for values, name in (({"order": 0}, "order"), ({"decay": 0.0}, "decay"), ({"decay": 1.5}, "decay"),
                         ({"window": 0}, "window")):
        with pytest.raises(ValueError, match=name):
            build_model("cache", {"vocab_size": 4, **values})
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        build_model("cache", {"vocab_size": 4})(torch.tensor([[1, 4]]))


def test_save_load_and_interpolation_with_a_corpus_model(tmp_path):
    """On text that repeats itself a cache earns weight beside a model of other text, and the
    mixture scores the stream better than either."""
    rng = np.random.default_rng(0)
    V = 20
    train = rng.integers(0, V, 3000)
    ngram = build_model("ngram", {"vocab_size": V, "order": 2, "method": "addk", "k": 0.5})
    ngram.fit(train, add_bos_eos=False)
    cache = build_model("cache", {"vocab_size": V, "order": 1, "decay": 0.98, "window": 100})
    save_model(cache, tmp_path / "cache")
    loaded = load_model(tmp_path / "cache")
    assert loaded.config == cache.config
    topic = rng.choice(V, 4, replace=False)
    held_out = torch.as_tensor(rng.choice(topic, 600))  # a "document" about 4 words
    logps = component_target_logprobs([ngram, loaded], held_out)
    weights, history = fit_weights(logps)
    assert weights[1] > 0.5 and all(a >= b - 1e-12 for a, b in zip(history, history[1:]))
    mixed = -mixture_logprobs(logps, weights).mean()
    assert mixed < min(-logps[:, 0].mean(), -logps[:, 1].mean())
    mixture = InterpolatedLM.from_models([ngram, loaded], weights.tolist())
    with torch.no_grad():
        out, _ = mixture(held_out[None, :-1])
    got = out[0].double().gather(-1, held_out[1:, None]).squeeze(-1).numpy()
    np.testing.assert_allclose(got, mixture_logprobs(logps, weights), rtol=1e-5, atol=1e-5)


def test_cli_mixes_a_checkpoint_with_cache_specs(tmp_path, capsys):
    import json

    from lmlab.checkpoints import load_checkpoint
    from lmlab.cli import main
    from lmlab.tokenizers import WordTokenizer

    train = "the cat sat on the mat . a dog ran in the park .\n" * 20
    tok = WordTokenizer.train(train)
    ngram = build_model("ngram", {"vocab_size": tok.vocab_size, "order": 2, "bos_id": tok.bos_id,
                                  "eos_id": tok.eos_id, "unk_id": tok.unk_id})
    ngram.fit(np.asarray(tok.encode(train)), add_bos_eos=False)
    save_model(ngram, tmp_path / "kn")
    tok.save(tmp_path / "kn" / "tokenizer.json")
    valid = tmp_path / "valid.txt"
    valid.write_text("the dog sat on the park . the dog sat on the park . the dog sat on the park .\n")
    argv = ["interpolate", "--models", str(tmp_path / "kn"), "cache:order=1,decay=0.99,window=50", "cache:order=2",
            "--valid", str(valid), "--out", str(tmp_path / "mix")]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    ppl = report["valid_perplexity"]
    assert ppl["interpolated"] < ppl["components"][0]
    model, _ = load_checkpoint(str(tmp_path / "mix"))
    assert [m.family for m in model.components] == ["ngram", "cache", "cache"]
    assert model.components[1].config.window == 50 and model.components[2].config.order == 2
    for bad, message in (("cache:size=3", "not a cache setting"), ("cache:decay=x", "not a number"),
                         ("cache:decay=2", "decay")):
        assert main(["interpolate", "--models", str(tmp_path / "kn"), bad, "--valid", str(valid),
                     "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
    assert main(["interpolate", "--models", "cache:", "cache:order=2", "--valid", str(valid),
                 "--out", str(tmp_path / "bad")]) == 2
    assert "no trained model" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_the_target_only_path_equals_the_distribution_at_the_targets():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 40, (2, 700), generator=g)
    for order in (1, 2, 3):
        model = build_model("cache", {"vocab_size": 40, "order": order, "decay": 0.97, "window": 300})
        logits, state = model(ids[:, :-1])
        want = logits.double().gather(-1, ids[:, 1:, None]).squeeze(-1)
        got, state2 = model.target_logprobs(ids[:, :-1], ids[:, 1:])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)   # -inf where the cache never saw the target
        assert torch.equal(state2.tensors["history"], state.tensors["history"]) and state2.length == state.length
        stream = component_target_logprobs([model], ids[0], chunk=97)[:, 0]
        np.testing.assert_allclose(stream, want[0].numpy(), rtol=1e-5, atol=1e-5)
