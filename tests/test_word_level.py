"""Word-level language modeling from the command line: whitespace words, given
vocabularies and splits, per-word scores equal to the n-gram API (and so to KenLM)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.metrics import distinct_n
from lmlab.models.ngram import DiscountWarning, NGramModel
from lmlab.score import Score, score_sequences
from lmlab.tokenizers import WordTokenizer, load_tokenizer

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--max-iters", "4", "--eval-interval", "2",
        "--eval-iters", "1", "--batch-size", "4", "--no-progress", "--device", "cpu"]


def sentences(n: int, seed: int) -> list[str]:
    """Random sentences over a small vocabulary, some with PTB's literal <unk>."""
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "dog", "sat", "on", "a", "mat", "log", "<unk>", "and", "ran", "N"]
    p = np.linspace(2.0, 0.5, len(words))
    p /= p.sum()
    return [" ".join(rng.choice(words, size=rng.integers(1, 9), p=p)) for _ in range(n)]


@pytest.fixture
def splits(tmp_path):
    paths = {}
    for name, n, seed in (("train", 300, 0), ("valid", 30, 1), ("test", 40, 2)):
        lines = sentences(n, seed)
        if name == "test":
            lines[3] += " zebra"  # out of the training vocabulary: <unk>
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text("\n".join(lines) + "\n")
    return paths


def run(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


@pytest.mark.parametrize("order", [2, 3, 5])
def test_cli_kneser_ney_equals_the_python_api(tmp_path, splits, capsys, order):
    train = splits["train"].read_text().splitlines()
    test = splits["test"].read_text().splitlines()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiscountWarning)
        model, vocab = NGramModel.from_text(train, order=order)
        expected = model.perplexity([model.encode(s) for s in test])
        out = run(capsys, "train", "--model", "ngram", "--set", f"order={order}", "--tokenizer", "word", "--sequences",
                  "--train", splits["train"], "--valid", splits["valid"], "--test", splits["test"],
                  "--out", tmp_path / "kn")
    summary = json.loads(out)
    assert summary["vocab_size"] == len(vocab) and summary["ngrams"] == model.sizes
    assert summary["test"]["unit"] == "word"
    assert summary["test"]["words"] == sum(len(s.split()) + 1 for s in test)  # </s> once per line
    assert summary["test"]["perplexity_per_word"] == pytest.approx(expected, rel=1e-9, abs=0)
    scored = json.loads(run(capsys, "score", "--model", tmp_path / "kn", "--text", splits["test"], "--sequences",
                            "--json"))
    assert scored["perplexity_per_word"] == pytest.approx(expected, rel=1e-9, abs=0)
    assert scored["perplexity"] == scored["perplexity_per_word"]


def test_prepare_word_stream_with_val_fraction_zero(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat  sat\non\u00a0the mat\n<unk> cat\n")
    meta = json.loads(run(capsys, "prepare", "--corpus", corpus, "--tokenizer", "word", "--val-fraction", "0",
                          "--out", tmp_path / "d"))
    tok = load_tokenizer(tmp_path / "d" / "tokenizer.json")
    assert tok.words == ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on\u00a0the", "mat"]
    ids = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16).tolist()
    assert ids == [3, 4, 5, 2, 6, 7, 2, 0, 4, 2]  # every word, one </s> per line, <unk> as given
    assert meta["train_tokens"] == 10 and "val_tokens" not in meta
    assert not (tmp_path / "d" / "val.bin").exists()


def test_prepare_given_vocabulary_and_splits_keep_ids(tmp_path, capsys):
    (tmp_path / "vocab.txt").write_text("cat\nthe\n<eos>\nsat\n<unk>\n")
    (tmp_path / "train.txt").write_text("the cat sat\n")
    (tmp_path / "valid.txt").write_text("the dog\n")
    (tmp_path / "test.txt").write_text("cat </s> <eos> sat")
    meta = json.loads(run(capsys, "prepare", "--train", tmp_path / "train.txt", "--valid", tmp_path / "valid.txt",
                          "--test", tmp_path / "test.txt", "--tokenizer", "word", "--vocab", tmp_path / "vocab.txt",
                          "--out", tmp_path / "d"))
    d = tmp_path / "d"
    assert load_tokenizer(d / "tokenizer.json").words == ["cat", "the", "<eos>", "sat", "<unk>", "<s>"]
    read = lambda name: np.fromfile(d / f"{name}.bin", dtype=np.uint16).tolist()  # noqa: E731
    assert (read("train"), read("val"), read("test")) == ([1, 0, 3, 2], [1, 4, 2], [0, 2, 2, 3])
    assert (meta["train_tokens"], meta["val_tokens"], meta["test_tokens"], meta["vocab_size"]) == (4, 3, 4, 6)


def test_min_count_and_max_vocab_from_the_training_file_only(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("a b a c a b d\n")
    (tmp_path / "valid.txt").write_text("e e e e e e\n")
    common = ["prepare", "--train", tmp_path / "train.txt", "--valid", tmp_path / "valid.txt", "--tokenizer", "word"]
    run(capsys, *common, "--min-count", "2", "--out", tmp_path / "m")
    assert load_tokenizer(tmp_path / "m" / "tokenizer.json").words == ["<unk>", "<s>", "</s>", "a", "b"]
    run(capsys, *common, "--max-vocab", "4", "--out", tmp_path / "x")
    assert load_tokenizer(tmp_path / "x" / "tokenizer.json").words == ["<unk>", "<s>", "</s>", "a"]


@pytest.mark.parametrize("argv, message", [
    (["--tokenizer", "char", "--min-count", "2"], "--min-count is an option of --tokenizer word"),
    (["--tokenizer", "bpe", "--vocab", "v.txt"], "--vocab is an option of --tokenizer word"),
    (["--tokenizer", "word", "--vocab", "v.txt", "--max-vocab", "9"], "--max-vocab does not combine"),
    (["--tokenizer", "word", "--valid", "c.txt", "--val-fraction", "0.2"], "--valid .* gives it already"),
    (["--tokenizer", "word", "--val-fraction", "1"], r"must be in \[0, 1\)"),
    (["--tokenizer", "word", "--max-vocab", "3"], "max_size must be an int >= 4"),
])
def test_prepare_option_errors(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text("a b\n")
    (tmp_path / "v.txt").write_text("a\n")
    assert main(["prepare", "--corpus", "c.txt", "--out", "d", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "d").exists()


def test_valid_needs_train_and_per_text_needs_sequences(tmp_path, splits, capsys):
    assert main(["train", "--valid", str(splits["valid"]), "--out", str(tmp_path / "r")]) == 2
    assert "--valid needs the training file too: give --train FILE" in capsys.readouterr().err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiscountWarning)
        run(capsys, "train", "--model", "ngram", "--tokenizer", "word", "--train", splits["train"], "--out", tmp_path / "kn")
    assert main(["score", "--model", str(tmp_path / "kn"), "--text", str(splits["test"]), "--per-text"]) == 2
    assert "--per-text averages the perplexities of the lines" in capsys.readouterr().err


def test_neural_word_model_on_given_splits(tmp_path, splits, capsys):
    summary = json.loads(run(capsys, "train", "--model", "transformer", "--tokenizer", "word", "--sequences",
                             "--train", splits["train"], "--valid", splits["valid"], "--test", splits["test"],
                             "--out", tmp_path / "r", *TINY))
    test_lines = splits["test"].read_text().splitlines()
    assert summary["test"]["unit"] == "word" and summary["test"]["words"] == sum(len(s.split()) + 1 for s in test_lines)
    assert summary["test"]["perplexity_per_word"] == pytest.approx(math.exp(summary["test"]["nll"] / summary["test"]["words"]))
    # --val-fraction 0: every line trains, no validation split
    run(capsys, "train", "--model", "transformer", "--tokenizer", "word", "--sequences", "--val-fraction", "0",
        "--train", splits["train"], "--out", tmp_path / "r0", *TINY)


def test_score_says_its_unit_in_text_and_json(tmp_path, splits, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiscountWarning)
        run(capsys, "train", "--model", "ngram", "--set", "order=2", "--tokenizer", "word", "--sequences",
            "--train", splits["train"], "--out", tmp_path / "w")
        run(capsys, "train", "--model", "ngram", "--set", "order=2", "--tokenizer", "char",
            "--train", splits["train"], "--out", tmp_path / "c")
    text = run(capsys, "score", "--model", tmp_path / "w", "--text", splits["test"], "--sequences", "--per-text")
    assert text.startswith("corpus perplexity per word ") and "mean of the word-level perplexities of each text" in text
    text = run(capsys, "score", "--model", tmp_path / "c", "--text", splits["test"])
    assert " bits per character, " in text and " bits per byte " in text and "per word" not in text
    js = json.loads(run(capsys, "score", "--model", tmp_path / "c", "--text", splits["test"], "--json"))
    assert js["unit"] == "character" and "words" not in js and "mean_text_perplexity_per_token" not in js
    assert js["perplexity"] == js["perplexity_per_character"] == pytest.approx(2 ** js["bits_per_character"])


def test_corpus_and_mean_per_text_perplexity_exact():
    from conftest import BigramTable

    tok = WordTokenizer(["a"])  # <unk> 1, <s> 2, </s> 3 appended after "a" (id 0)
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (1, 2, 3)
    row = torch.tensor([math.log(0.75), -1e4, -1e4, math.log(0.25)])
    model = BigramTable(row.repeat(4, 1))
    score = score_sequences(model, tok, ["a", "a a  a"])
    # texts: a </s> (2 tokens) and a a a </s> (4 tokens)
    assert score.tokens == 6 and score.unit == "word"
    assert score.perplexity == pytest.approx((0.75 ** 4 * 0.25 ** 2) ** (-1 / 6), rel=1e-6)
    expected_mean = ((0.75 * 0.25) ** -0.5 + (0.75 ** 3 * 0.25) ** -0.25) / 2
    assert score.mean_text_perplexity == pytest.approx(expected_mean, rel=1e-6)
    d = score.as_dict()
    assert d["mean_text_perplexity_per_word"] == score.mean_text_perplexity
    assert d["words"] == 6 and d["characters"] == 2 + 7 and d["bytes"] == 9


def test_score_bytes_count_utf8():
    s = Score(nll=math.log(2) * 12, tokens=4, characters=6, bytes=12)
    assert (s.bits_per_character, s.bits_per_byte, s.bits_per_token) == (2.0, 1.0, 3.0)
    assert s.as_dict()["unit"] == "character" and s.as_dict()["perplexity"] == 4.0


def test_metrics_words_split_like_kenlm():
    assert distinct_n(["a\u00a0b a\u00a0b c"], 1).as_dict() == {"n": 1, "unique": 2, "total": 3, "ratio": 2 / 3}


@pytest.mark.parametrize("tokenizer", ["word", "char"])
def test_predict_and_complete_ignore_a_prompts_trailing_whitespace(tmp_path, splits, capsys, tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiscountWarning)
        run(capsys, "train", "--model", "ngram", "--set", "order=3", "--tokenizer", tokenizer,
            "--train", splits["train"], "--out", tmp_path / "m")

    def predict(prompt, target):
        return json.loads(run(capsys, "generate", "--model", tmp_path / "m", "--task", "predict", "--prompt", prompt,
                              "--target", target, "--json"))["results"][0]

    # the same text split after or before the blank: the same context and the same scores
    a, b = predict("the cat", " sat on"), predict("the cat ", "sat on")
    assert a["prompt"] == b["prompt"] == "the cat"
    assert a["nll_teacher_forced"] == b["nll_teacher_forced"] and a["greedy_ids"] == b["greedy_ids"]
    if tokenizer == "word":  # blanks are not words: any blanks give the same
        c = predict("the cat \t", "sat on")
        assert c["nll_teacher_forced"] == a["nll_teacher_forced"] and len(a["target_ids"]) == 2
    else:  # the blank is a character the model predicts
        assert a["target_ids"][0] == load_tokenizer(tmp_path / "m" / "best" / "tokenizer.json").encode(" ")[0]

    def complete(prompt):
        return json.loads(run(capsys, "generate", "--model", tmp_path / "m", "--task", "complete", "--prompt", prompt,
                              "--max-new-tokens", "4", "--seed", "5", "--json"))["results"][0]

    c, d = complete("the cat"), complete("the cat  ")
    assert c == d
    if tokenizer == "word":
        assert c["text"].startswith(" ") and len(c["text"].split()) == 4  # words keep their spaces after the prompt


def test_oracle_scores_of_arpa_models_are_per_word():
    from pathlib import Path

    from lmlab.metrics import oracle_perplexity

    arpa = Path(__file__).parent / "data" / "lmplz_tiny.arpa"
    score = oracle_perplexity(str(arpa), ["a"], [" b c"])  # continuations start with their space
    assert score.unit == "word" and score.tokens == 2 and score.bytes == 4
    assert score.as_dict()["perplexity_per_word"] == score.perplexity
