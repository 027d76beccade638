"""Masked-LM fill-in: the masked-transformer family, its objective, the filler, HF masked LMs, the CLI."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import save_tiny_hf_bert
from test_processors import chi2_pvalue

from lmlab.cli import main
from lmlab.data import StreamBatches
from lmlab.fill import fill_ids, filler_from_hf, filler_from_lmlab, load_filler
from lmlab.models import build_model, load_model, save_model
from lmlab.tokenizers import CharTokenizer
from lmlab.train import Trainer, TrainConfig, masked_lm_loss, objective_loss

PERIODIC = "abcdefgh " * 400


def tiny_masked(vocab, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = {"vocab_size": vocab, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "mask_prob": 0.3, **kw}
    return build_model("masked-transformer", cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A masked-transformer that has learned the periodic text 'abcdefgh ' (about 3 s)."""
    tok = CharTokenizer.train(PERIODIC)
    ids = np.asarray(tok.encode(PERIODIC), dtype=np.uint16)
    model = tiny_masked(tok.vocab_size)
    config = TrainConfig(max_iters=300, batch_size=16, lr=1e-2, warmup_iters=10, eval_iters=2, eval_interval=1000,
                         progress=False)
    run = tmp_path_factory.mktemp("mlm") / "run"
    summary = Trainer(model, StreamBatches(ids, 32, 16), None, config, run, tokenizer=tok).fit()
    assert summary["train_loss"] < 0.05
    return model.eval(), tok, run


# ---------------------------------------------------------------- the family


def test_every_position_sees_the_whole_text():
    model = tiny_masked(10).eval()
    ids = torch.tensor([[4, 5, 6, 7, 8]])
    changed = ids.clone()
    changed[0, 4] = 9
    a, _ = model(ids)
    b, _ = model(changed)
    assert a.shape == (1, 5, 10)
    assert not torch.allclose(a[0, 0], b[0, 0])  # the first position reads the last one
    causal = build_model("transformer", {"vocab_size": 10, "block_size": 8, "n_layer": 1, "n_head": 2, "n_embd": 8}).eval()
    assert torch.equal(causal(ids)[0][0, :4], causal(changed)[0][0, :4])


def test_mask_is_an_input_past_the_vocabulary_and_never_an_output():
    model = tiny_masked(10)
    assert model.mask_id == 10 and model.body.wte.weight.shape[0] == 11
    logits, _ = model(torch.tensor([[10, 10, 3]]))
    assert logits.shape[-1] == 10
    with pytest.raises(ValueError, match="state=None"):
        model(torch.tensor([[3]]), model(torch.tensor([[3]]))[1])
    with pytest.raises(ValueError, match="causal must be False"):
        tiny_masked(10, causal=True)
    with pytest.raises(ValueError, match="mask_prob"):
        tiny_masked(10, mask_prob=0.0)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_masked(12).eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    ids = torch.tensor([[1, 12, 5, 12]])
    assert torch.equal(model(ids)[0], loaded(ids)[0])


def test_return_attention_rows_cover_every_position():
    model = tiny_masked(10).eval()
    _, state = model(torch.tensor([[1, 2, 3, 4]]), return_attention=True)
    w = state.tensors["attention0"]
    assert w.shape == (1, 2, 4, 4)
    assert torch.allclose(w.sum(-1), torch.ones(1, 2, 4)) and bool((w[0, :, 0, 3] > 0).all())


# ---------------------------------------------------------------- the objective


class _Recorder:
    """Uniform logits over V tokens; remembers the inputs it was shown."""

    def __init__(self, vocab, mask_prob):
        self.config = SimpleNamespace(mask_prob=mask_prob)
        self.vocab_size, self.mask_id, self.inputs = vocab, vocab, None

    def __call__(self, ids):
        self.inputs = ids
        return torch.zeros(*ids.shape, self.vocab_size), None


def test_masked_loss_of_uniform_logits_is_log_v():
    rec = _Recorder(7, 0.15)
    x = torch.randint(0, 7, (4, 20), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    assert masked_lm_loss(rec, x, x).item() == pytest.approx(math.log(7), abs=1e-6)


def test_masking_follows_bert_80_10_10():
    V, p, B, T = 50, 0.2, 200, 100
    rec = _Recorder(V, p)
    x = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    masked_lm_loss(rec, x, x)
    n = B * T
    shown_mask = int((rec.inputs == V).sum())
    replaced = int(((rec.inputs != V) & (rec.inputs != x)).sum())
    # Each position is chosen with p (plus one forced per row, negligible): mask 80%, random 10% (of which 1/V keeps x).
    for count, prob in ((shown_mask, p * 0.8), (replaced, p * 0.1 * (V - 1) / V)):
        z = (count - n * prob) / math.sqrt(n * prob * (1 - prob))
        assert abs(z) < 4, (count, n * prob)


def test_every_row_has_a_masked_position():
    rec = _Recorder(5, 1e-9)
    x = torch.randint(0, 5, (8, 6), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    masked_lm_loss(rec, x, x)
    assert ((rec.inputs == 5).sum(1) <= 1).all() and torch.isfinite(masked_lm_loss(rec, x, x))


def test_trainer_picks_the_objective_and_resume_is_exact(tmp_path):
    tok = CharTokenizer.train(PERIODIC)
    ids = np.asarray(tok.encode(PERIODIC), dtype=np.uint16)
    assert objective_loss(tiny_masked(tok.vocab_size)) is masked_lm_loss
    cfg = dict(batch_size=4, lr=3e-3, warmup_iters=1, eval_iters=2, eval_interval=3, lr_decay_iters=6, progress=False)
    straight = tiny_masked(tok.vocab_size)
    Trainer(straight, StreamBatches(ids, 16, 4), StreamBatches(ids, 16, 4), TrainConfig(max_iters=6, **cfg),
            tmp_path / "a").fit()
    first = tiny_masked(tok.vocab_size)
    Trainer(first, StreamBatches(ids, 16, 4), StreamBatches(ids, 16, 4), TrainConfig(max_iters=3, **cfg),
            tmp_path / "b").fit()
    resumed = tiny_masked(tok.vocab_size)
    Trainer(resumed, StreamBatches(ids, 16, 4), StreamBatches(ids, 16, 4), TrainConfig(max_iters=6, **cfg),
            tmp_path / "b", resume=True).fit()
    for name, t in straight.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[name]), name


# ---------------------------------------------------------------- the fill loop


def table_logits(table):
    """A fake model: logits (1, T, V) from a fixed (T, V) table whatever the input; counts calls."""
    calls = []

    def fn(ids):
        calls.append(ids.clone())
        return table[None, : ids.shape[1]].clone()

    return fn, calls


def test_orders_pick_positions_as_documented():
    table = torch.full((4, 5), -5.0)
    table[1, 2] = 1.0   # position 1: token 2, less sure
    table[3, 4] = 6.0   # position 3: token 4, very sure
    ids = torch.tensor([0, 9, 0, 9])
    fn, calls = table_logits(table)
    out, steps = fill_ids(fn, ids, 9, order="confidence")
    assert out.tolist() == [0, 2, 0, 4] and [s.position for s in steps] == [3, 1] and len(calls) == 2
    assert steps[0].probability == pytest.approx(torch.softmax(table[3], -1)[4].item())
    _, steps = fill_ids(fn, ids, 9, order="left-to-right")
    assert [s.position for s in steps] == [1, 3]
    fn, calls = table_logits(table)
    out, steps = fill_ids(fn, ids, 9, order="parallel")
    assert out.tolist() == [0, 2, 0, 4] and len(calls) == 1 and len(steps) == 2
    with pytest.raises(ValueError, match="accepted: confidence"):
        fill_ids(fn, ids, 9, order="random")


def test_forbidden_tokens_are_never_chosen():
    table = torch.zeros(2, 5)
    table[1, 4] = 10.0
    table[1, 3] = 5.0
    fn, _ = table_logits(table)
    out, _ = fill_ids(fn, torch.tensor([0, 9]), 9, forbidden_ids=[4])
    assert out.tolist() == [0, 3]


def test_sampled_fills_follow_the_tempered_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0])
    fn, _ = table_logits(logits[None].repeat(2, 1))
    gen = torch.Generator().manual_seed(0)
    draws = [int(fill_ids(fn, torch.tensor([1, 9]), 9, sample=True, temperature=2.0, generator=gen)[0][1])
             for _ in range(3000)]
    observed = torch.bincount(torch.tensor(draws), minlength=4).double()
    assert chi2_pvalue(observed, torch.softmax(logits.double() / 2.0, -1)) > 0.001
    draws = {int(fill_ids(fn, torch.tensor([1, 9]), 9, sample=True, top_k=2, generator=gen)[0][1]) for _ in range(200)}
    assert draws == {1, 2}


# ---------------------------------------------------------------- a trained lmlab model


def test_trained_model_fills_extends_and_scores(trained):
    model, tok, _ = trained
    filler = filler_from_lmlab(model, tok)
    result = filler.fill("abc<mask>efg<mask> ab<mask><mask>ef")
    assert result.text == "abcdefgh abcdef"
    assert sorted(s.position for s in result.steps) == [3, 7, 11, 12] and all(s.probability > 0.9 for s in result.steps)
    assert [s.token for s in sorted(result.steps, key=lambda s: s.position)] == ["d", "h", "c", "d"]
    assert filler.extend("abcd", 10).text == "abcdefgh abcde"
    assert filler.pseudo_log_likelihood("abcdefgh abc") > filler.pseudo_log_likelihood("abcdhgfe abc") + 10


def test_pseudo_log_likelihood_is_the_sum_of_one_mask_scores(trained):
    model, tok, _ = trained
    filler = filler_from_lmlab(model, tok)
    ids = tok.encode("bcdefg")
    expected = 0.0
    for t in range(len(ids)):
        x = torch.tensor([ids])
        x[0, t] = model.mask_id
        expected += model(x)[0][0, t].log_softmax(-1)[ids[t]].item()
    assert filler.pseudo_log_likelihood("bcdefg", batch_size=4) == pytest.approx(expected, rel=1e-5)


def test_filler_errors(trained):
    model, tok, _ = trained
    filler = filler_from_lmlab(model, tok)
    with pytest.raises(ValueError, match="no mask"):
        filler.fill("abc")
    with pytest.raises(ValueError, match="at most 32"):
        filler.fill("a" * 40 + "<mask>")
    causal = build_model("transformer", {"vocab_size": tok.vocab_size, "block_size": 8, "n_layer": 1, "n_head": 1, "n_embd": 8})
    with pytest.raises(ValueError, match="masked-transformer"):
        filler_from_lmlab(causal, tok)


# ---------------------------------------------------------------- Hugging Face masked LMs


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bert")
    save_tiny_hf_bert(directory, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "dog", "sat", "on", "mat", "a", "log", "."])
    return directory


def test_hf_masked_lm_fill_matches_its_logits(hf_bert):
    filler = load_filler(f"hf:{hf_bert}")
    text = "the [MASK] sat on the [MASK] ."
    ids = torch.tensor(filler.encode(text))
    assert ids[0].item() == 2 and ids[-1].item() == 3  # [CLS] ... [SEP]
    logits = filler.logits_fn(ids[None])[0].clone()
    logits[:, filler.forbidden_ids] = -math.inf
    masked = (ids == filler.mask_id).nonzero().flatten()
    result = filler.fill(text, order="parallel")
    assert [result.ids[p] for p in masked.tolist()] == logits[masked].argmax(-1).tolist()
    assert result.text.startswith("the ") and "[MASK]" not in result.text
    # the generic marker works too
    assert load_filler(f"hf:{hf_bert}", mask_text="<mask>").fill("the <mask> sat", order="parallel").ids == \
        filler.fill("the [MASK] sat", order="parallel").ids


def test_hf_pseudo_log_likelihood_skips_special_tokens(hf_bert):
    import transformers

    filler = load_filler(f"hf:{hf_bert}")
    model = transformers.AutoModelForMaskedLM.from_pretrained(hf_bert).eval()
    ids = filler.encode("the cat sat")
    expected = 0.0
    for t in range(1, len(ids) - 1):
        x = torch.tensor([ids])
        x[0, t] = filler.mask_id
        with torch.no_grad():
            expected += model(input_ids=x).logits[0, t].log_softmax(-1)[ids[t]].item()
    assert filler.pseudo_log_likelihood("the cat sat") == pytest.approx(expected, rel=1e-5)


def test_hf_directory_errors(tmp_path, hf_bert):
    import transformers

    with pytest.raises(FileNotFoundError, match="no Hugging Face model directory"):
        load_filler(f"hf:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_filler(f"hf:{tmp_path / 'empty'}")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=20, n_positions=16))
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="not a masked language model"):
        load_filler(f"hf:{tmp_path / 'gpt2'}")
    assert filler_from_hf  # the constructor used by load_filler is public


# ---------------------------------------------------------------- command line


def test_cli_trains_a_masked_transformer_and_fills(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(PERIODIC)
    rc = main(["train", "--model", "masked-transformer", "--corpus", str(corpus), "--out", str(tmp_path / "run"),
               "--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--max-iters", "3",
               "--batch-size", "4", "--eval-iters", "1", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3
    rc = main(["fill", "--model", str(tmp_path / "run"), "--text", "abc<mask>e", "--show-steps"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and len(out[0]) == 5 and out[0][:3] == "abc" and out[1].startswith("step 0: position 3")
    rc = main(["fill", "--model", str(tmp_path / "run"), "--text", "ab", "--extend", "3", "--sample", "--seed", "1"])
    assert rc == 0 and len(capsys.readouterr().out.strip()) == 5


def test_cli_errors(tmp_path, trained, capsys):
    _, _, run = trained
    corpus = tmp_path / "c.txt"
    corpus.write_text("ab\ncd\n" * 20)
    assert main(["train", "--model", "masked-transformer", "--corpus", str(corpus), "--sequences",
                 "--out", str(tmp_path / "r")]) == 2
    assert "--sequences is not supported" in capsys.readouterr().err
    assert main(["fill", "--model", str(run), "--text", "abc"]) == 2
    assert "no mask" in capsys.readouterr().err


def test_next_token_tools_refuse_a_masked_model(trained):
    from lmlab.decode.generate import generate
    from lmlab.decode.search import beam_search
    from lmlab.score import score_text

    model, tok, _ = trained
    with pytest.raises(ValueError, match="scoring needs a model that predicts the next token"):
        score_text(model, tok, "abcdefgh")
    with pytest.raises(ValueError, match="generation needs"):
        generate(model, [tok.encode("abc")], 3)
    with pytest.raises(ValueError, match="beam search needs"):
        beam_search(model, [tok.encode("abc")], num_beams=2, max_new_tokens=3)
