"""Tests of the eval-generation study (lmlab.study) with tiny models."""

from __future__ import annotations

import argparse
import csv
import io
import json

import pytest
import torch

from conftest import BigramTable
from lmlab.metrics import Oracle, distinct_n, repetition_rate, self_bleu
from lmlab.models import build_model, save_model
from lmlab.models.transformer import TransformerConfig
from lmlab.study import (
    DEFAULT_SETUPS,
    add_eval_generation_arguments,
    parse_setups,
    read_prompts,
    run_eval_generation,
    run_study,
)
from lmlab.tokenizers import CharTokenizer

ALPHABET = list("abcdefghijklmnopqrstuvwxyz :\n")


@pytest.fixture(scope="module")
def generator():
    tok = CharTokenizer(ALPHABET)
    torch.manual_seed(0)
    model = build_model("transformer", TransformerConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1,
                                                         n_head=2, n_embd=16)).eval()
    return model, tok


@pytest.fixture(scope="module")
def oracle():
    """A bigram oracle with its own character tokenizer (other ids than the generator's)."""
    tok = CharTokenizer(list(reversed(ALPHABET)))
    g = torch.Generator().manual_seed(1)
    return Oracle(BigramTable(torch.randn(tok.vocab_size, tok.vocab_size, generator=g)), tok, name="bigram")


def _save(model, tok, directory):
    save_model(model, directory)
    tok.save(directory / "tokenizer.json")
    return directory


# ---------------------------------------------------------------- inputs


def test_read_prompts_lines_and_jsonl(tmp_path):
    lines = tmp_path / "p.txt"
    lines.write_text("ROMEO:\n\nJULIET:\n")
    assert read_prompts(lines) == (["ROMEO:", "JULIET:"], [None, None])
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a b", "reference": "c d"}\n{"prompt": "e"}\n')
    assert read_prompts(jl) == (["a b", "e"], ["c d", None])


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_an_empty_prompt_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(path)


def test_bad_prompt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 needs a JSON object with a \"prompt\" string"):
        read_prompts(bad)
    empty = tmp_path / "e.jsonl"
    empty.write_text('{"prompt": ""}\n')
    with pytest.raises(ValueError, match="empty \"prompt\""):
        read_prompts(empty)


def test_parse_setups():
    setups = parse_setups(["greedy; top-k 20, temperature 0.7", "beam 4"])
    assert [s.name for s in setups] == ["greedy", "top-k 20, temperature 0.7", "beam 4"]
    assert [s.search for s in setups] == ["greedy", "sample", "beam"]
    assert [s.name for s in parse_setups(DEFAULT_SETUPS)] == list(DEFAULT_SETUPS)


def test_an_unknown_setup_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"decoding setup 'top-z 20': unknown decoding option 'top-z'.*accepted:"):
        parse_setups(["greedy", "top-z 20"])
    with pytest.raises(ValueError, match="given twice"):
        parse_setups(["greedy", "greedy"])
    with pytest.raises(ValueError, match="no decoding setups"):
        parse_setups([" ; "])


# ---------------------------------------------------------------- the study


def test_study_rows_metrics_and_files(generator, oracle, tmp_path):
    model, tok = generator
    prompts = ["romeo:", "juliet:", "king:"]
    setups = ["greedy", "top-k 5", "beam 2"]
    study = run_study(model, tok, prompts, setups, num_continuations=3, max_new_tokens=8, seed=1,
                      oracle=oracle, progress=False)
    assert [r.setup.name for r in study.results] == setups
    greedy, topk, beam = study.results
    assert greedy.deterministic and beam.deterministic and not topk.deterministic
    for r in study.results:
        assert len(r.continuations) == 3 and all(len(t) == 3 for t in r.continuations)
        assert r.diversity.texts == (3 if r.deterministic else 9)  # one text per prompt for greedy and beams
        runs = [row[:1] if r.deterministic else row for row in r.token_counts]
        assert r.generated_tokens == sum(n for row in runs for n in row) and r.tokens_per_second > 0
    # a deterministic setup is run once and its text counted k times
    assert all(len(set(t)) == 1 for t in greedy.continuations)
    # oracle perplexity over the generated texts, re-tokenized with the oracle's own tokenizer
    assert greedy.oracle.tokens == sum(len(t[0]) for t in greedy.continuations)
    assert topk.oracle.tokens == sum(len(x) for t in topk.continuations for x in t)
    row = study.rows()[1]
    assert list(row) == ["setup", "oracle_ppl", "distinct_1", "distinct_2", "distinct_3", "distinct_4",
                         "repetition", "self_bleu", "mean_tokens", "tokens_per_s"]
    paths = study.write(tmp_path / "out")
    assert set(paths) == {"markdown", "csv", "json", "generations", "plot"}
    md = paths["markdown"].read_text()
    assert md.startswith("| setup | oracle PPL | distinct-1") and md.count("\n") == 2 + len(setups) + 2
    assert md.endswith("- greedy, beam 2: deterministic (one continuation per prompt); diversity (distinct-n, "
                       "repetition, self-BLEU) computed across the 3 prompts, over that one continuation each "
                       "(the sampling rows pool their 3 continuations per prompt)\n")
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert [r["setup"] for r in rows] == setups
    report = json.loads(paths["json"].read_text())
    assert report["config"]["num_continuations"] == 3 and report["config"]["oracle"] == "bigram"
    assert len(report["details"]) == 3 and "distinct_4_per_prompt" in report["details"][0]["diversity"]
    gens = [json.loads(line) for line in paths["generations"].read_text().splitlines()]
    assert len(gens) == 3 * 3 * 3
    first = gens[0]
    assert first["setup"] == "greedy" and first["prompt"] == "romeo:" and "oracle_ppl" in first
    assert gens[1]["copy_of_sample"] == 0 and gens[1]["continuation"] == first["continuation"]
    assert paths["plot"].stat().st_size > 0


def test_deterministic_rows_measure_diversity_across_prompts(generator):
    """Greedy's distinct-n is that of its one continuation per prompt, pooled across prompts:
    the same whatever num_continuations, never divided by the number of copies."""
    model, tok = generator
    prompts = ["romeo:", "juliet:", "king:", "ab"]
    one, five = (run_study(model, tok, prompts, ["greedy", "beam 2"], num_continuations=k, max_new_tokens=12,
                           unit="char", progress=False) for k in (1, 5))
    for r1, r5 in zip(one.results, five.results):
        texts = [t[0] for t in r5.continuations]
        assert [t[0] for t in r1.continuations] == texts
        for n in (1, 2, 3, 4):
            by_hand = distinct_n(texts, n, "char")
            assert (r5.diversity.distinct[n].unique, r5.diversity.distinct[n].total) == (by_hand.unique, by_hand.total)
            assert r5.row()[f"distinct_{n}"] == r1.row()[f"distinct_{n}"] == by_hand.ratio
        assert r5.diversity.self_bleu == pytest.approx(self_bleu(texts))  # across prompts, not 100 from copies
        assert r5.diversity.repetition == pytest.approx(repetition_rate(texts, 4, "char"))
        assert r5.diversity.texts == len(prompts)
    assert "–" not in five.markdown().split("\n")[2]  # the greedy row has every diversity number
    assert five.to_json()["notes"] == five.notes() and "across the 4 prompts" in five.notes()[0]


def test_study_is_seeded_and_reproducible(generator):
    model, tok = generator
    kw = dict(num_continuations=2, max_new_tokens=6, progress=False)
    a = run_study(model, tok, ["ab", "c"], ["sample", "top-p 0.7"], seed=3, **kw)
    b = run_study(model, tok, ["ab", "c"], ["sample", "top-p 0.7"], seed=3, **kw)
    c = run_study(model, tok, ["ab", "c"], ["sample", "top-p 0.7"], seed=4, **kw)
    texts = lambda s: [r.continuations for r in s.results]  # noqa: E731
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    # a setup's draws do not depend on which other setups run
    alone = run_study(model, tok, ["ab", "c"], ["top-p 0.7"], seed=3, **kw)
    assert alone.results[0].continuations == a.results[1].continuations
    assert "oracle_ppl" not in a.rows()[0]  # no oracle, no perplexity column


def test_study_rouge_and_fluency_columns(generator, tmp_path):
    model, tok = generator
    study = run_study(model, tok, ["ab", "c"], ["greedy"], num_continuations=2, max_new_tokens=5,
                      references=["a b c", "d e"], progress=False)
    assert {"rouge1", "rouge2", "rougeL"} <= set(study.rows()[0])
    from test_metrics import _tiny_cola

    from lmlab.metrics import load_classifier

    path, *_ = _tiny_cola(tmp_path)
    clf = load_classifier(path)
    study = run_study(model, tok, ["ab"], ["sample"], num_continuations=2, max_new_tokens=5, classifier=clf,
                      progress=False)
    assert 0.0 <= study.rows()[0]["fluency"] <= 1.0
    with pytest.raises(ValueError, match="not a class of the classifier"):
        run_study(model, tok, ["ab"], ["sample"], classifier=clf, fluency_label="fluent", progress=False)


def test_study_bad_input(generator):
    model, tok = generator
    with pytest.raises(ValueError, match="no prompts"):
        run_study(model, tok, [], progress=False)
    with pytest.raises(ValueError, match=r"decoding setup 'top-k 99': top_k=99 is larger than the vocabulary"):
        run_study(model, tok, ["ab"], ["top-k 99"], progress=False)
    # beam search needs prompt + length inside the context (32): refused before anything runs
    with pytest.raises(ValueError, match=r"beam search \(beam 2\).*accepted: length <= 31"):
        run_study(model, tok, ["ab"], ["greedy", "beam 2"], max_new_tokens=40, progress=False)
    with pytest.raises(ValueError, match="num_continuations"):
        run_study(model, tok, ["ab"], ["greedy"], num_continuations=0, progress=False)
    with pytest.raises(ValueError, match="one per prompt"):
        run_study(model, tok, ["ab"], ["greedy"], references=["x", "y"], progress=False)


# ---------------------------------------------------------------- command line


def _parse(argv):
    return add_eval_generation_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_run_eval_generation_end_to_end(generator, tmp_path, capsys):
    model, tok = generator
    ckpt = _save(model, tok, tmp_path / "gen")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("romeo:\njuliet:\n")
    out = tmp_path / "study"
    args = _parse(["--model", str(ckpt), "--oracle", str(ckpt), "--prompts", str(prompts), "--setup", "greedy",
                   "--setup", "sample; top-k 5", "-k", "2", "--length", "6", "--out", str(out), "--no-progress"])
    assert args.length == 6 and args.num_continuations == 2
    assert run_eval_generation(args) == 0
    printed = capsys.readouterr().out
    assert "| greedy |" in printed and "| top-k 5 |" in printed
    assert (out / "table.md").read_text() in printed
    for name in ("table.csv", "table.json", "generations.jsonl", "diversity_vs_perplexity.png"):
        assert (out / name).is_file()
    defaults = _parse(["--model", "m", "--prompts", "p"])
    assert defaults.setup is None and defaults.num_continuations == 5 and defaults.length == 100


def test_run_eval_generation_errors(generator, tmp_path):
    model, tok = generator
    ckpt = _save(model, tok, tmp_path / "gen")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        run_eval_generation(_parse(["--model", str(ckpt), "--prompts", str(empty), "--no-progress"]))
    # an unknown setup is reported before any file or model is read
    with pytest.raises(ValueError, match="unknown decoding option 'nucleus-sampling'"):
        run_eval_generation(_parse(["--model", "nowhere", "--prompts", "nowhere", "--setup", "nucleus-sampling 0.9"]))
