"""DecodingSetup parsing, run_setup dispatch, and `lmlab generate` end to end."""

import argparse
import dataclasses
import io
import json
import math

import pytest
import torch

from lmlab.decode.commands import add_generate_arguments, format_columns, read_prompt_file, run_generate
from lmlab.decode.setups import DecodingSetup, Result, run_setup, special_ids_to_suppress
from lmlab.models import build_model, save_model
from lmlab.models.transformer import TransformerConfig
from lmlab.tokenizers import CharTokenizer

TEXT = "to be or not to be, that is the question.\n"


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.train(TEXT)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=16)
    return build_model("transformer", cfg).eval()


# ---------------------------------------------------------------- parse


@pytest.mark.parametrize(
    "text, expected",
    [
        ("greedy", dict(do_sample=False, search="greedy")),
        ("sample", dict(do_sample=True, search="sample")),
        ("temperature 0.8", dict(temperature=0.8, do_sample=True, search="sample")),
        ("temperature=0.8", dict(temperature=0.8, search="sample")),
        ("Temperature: 0.8", dict(temperature=0.8)),
        ("temperature 0", dict(temperature=0.0, do_sample=False, search="greedy")),
        ("top-k 20", dict(top_k=20, search="sample")),
        ("top_k=20", dict(top_k=20)),
        ("top-p 0.7", dict(top_p=0.7)),
        ("nucleus 0.7", dict(top_p=0.7)),
        ("min-p 0.1", dict(min_p=0.1)),
        ("typical 0.9", dict(typical_p=0.9)),
        ("epsilon 3e-4", dict(epsilon=3e-4)),
        ("eta 0.001", dict(eta=0.001)),
        ("beam 4", dict(num_beams=4, do_sample=False, search="beam")),
        ("beam 1", dict(num_beams=1, search="beam")),
        ("top-k 50, temperature 0.7", dict(top_k=50, temperature=0.7, search="sample")),
        ("sample, top-p 0.9,temperature 1.2", dict(top_p=0.9, temperature=1.2)),
        ("greedy, repetition-penalty 1.3, no-repeat-ngram-size 3", dict(repetition_penalty=1.3, no_repeat_ngram_size=3)),
        ("presence-penalty 0.5, frequency-penalty 0.2", dict(presence_penalty=0.5, frequency_penalty=0.2)),
        ("beam 4, length-penalty 0.6, num-return-sequences 2, early-stopping never",
         dict(length_penalty=0.6, num_return_sequences=2, early_stopping="never")),
        ("beam 4, num-beam-groups 2, diversity-penalty 0.5", dict(num_beam_groups=2, diversity_penalty=0.5)),
        ("suppress-tokens 5 7", dict(suppress_tokens=(5, 7))),
        ("logit-bias 5:-inf 7:1.5", dict(logit_bias={5: -math.inf, 7: 1.5})),
        ("min-new-tokens 3, force-eos-after 9", dict(min_new_tokens=3, force_eos_after=9)),
        ("specials all", dict(suppress_specials="all")),
        ("sample, num-return-sequences 3", dict(num_return_sequences=3)),
    ],
)
def test_parse_accepts_every_documented_form(text, expected):
    setup = DecodingSetup.parse(text)
    for key, value in expected.items():
        assert getattr(setup, key) == value, key
    assert setup.name == ", ".join(item.strip() for item in text.split(","))
    # the derived description parses back to the same options
    again = DecodingSetup.parse(setup.describe())
    assert dataclasses.replace(again, name="x") == dataclasses.replace(setup, name="x")


@pytest.mark.parametrize(
    "text, message",
    [
        ("top-q 5", r"unknown decoding option 'top-q'.*accepted: .*greedy.*top-k.*top-p"),
        ("", r"empty decoding setup.*accepted"),
        ("top-k", r"'top-k' needs a value, e.g. 'top-k 20'"),
        ("top-k twenty", r"'top-k' needs an integer, got 'twenty'"),
        ("top-k 2.5", r"needs an integer, got '2.5'"),
        ("temperature hot", r"needs a number, got 'hot'"),
        ("greedy 3", r"'greedy' takes no value"),
        ("temperature -0.5", r"temperature must be a finite number >= 0.*got -0.5"),
        ("top-k 0", r"top_k must be an integer >= 1, got 0"),
        ("top-p 1.5", r"top_p must be a real number in \[0.0, 1.0\], got 1.5"),
        ("min-p -0.1", r"min_p .* got -0.1"),
        ("beam 0", r"num_beams must be an integer >= 1.*got 0"),
        ("beam 4, sample", r"combines 'sample' with 'beam 4': beam sampling is not supported"),
        ("greedy, beam 2", r"greedy search is beam 1"),
        ("greedy, sample", r"both greedy decoding and sampling"),
        ("greedy, temperature 0.8", r"greedy decoding .* ignores temperature=0.8"),
        ("greedy, top-k 5", r"ignores top_k=5"),
        ("beam 4, top-p 0.9", r"beam search \(num_beams=4\) is deterministic and does not use top_p=0.9"),
        ("beam 4, temperature 0.7", r"does not use temperature=0.7"),
        ("length-penalty 0.6", r"length_penalty=0.6 only apply to beam search"),
        ("beam 2, num-return-sequences 3", r"num_return_sequences=3 > num_beams=2"),
        ("greedy, num-return-sequences 2", r"greedy decoding gives one sequence per prompt"),
        ("beam 4, num-beam-groups 3", r"num_beam_groups=3 must divide num_beams=4"),
        ("top-k 5, top-k 6", r"top_k is given twice"),
        ("top-k 5,, top-p 0.5", r"empty item"),
        ("min-new-tokens 5, force-eos-after 2", r"min_new_tokens=5 > force_eos_after=2"),
        ("specials some", r"suppress_specials='some'; accepted: default, all, none"),
    ],
)
def test_parse_errors_name_the_value_and_the_accepted_forms(text, message):
    with pytest.raises(ValueError, match=message):
        DecodingSetup.parse(text)


def test_constructor_resolves_the_search_and_names_itself():
    assert DecodingSetup().search == "sample" and DecodingSetup().name == "sample"
    assert DecodingSetup(num_beams=3).do_sample is False and DecodingSetup(num_beams=3).name == "beam 3"
    assert DecodingSetup(temperature=0).search == "greedy"
    assert DecodingSetup(top_k=5, temperature=0.5).name == "temperature 0.5, top-k 5"
    assert DecodingSetup(temperature=1.0, num_beams=2).search == "beam"  # temperature 1 is the identity
    with pytest.raises(ValueError, match="beam sampling is not supported"):
        DecodingSetup(do_sample=True, num_beams=2)
    with pytest.raises(ValueError, match="accepted: default, all, none"):
        DecodingSetup(suppress_specials="everything")


# ---------------------------------------------------------------- run_setup


def test_greedy_equals_beam_1_equals_top_k_1_equals_temperature_0(model, tok):
    prompts = ["to be", "q", "that is"]
    runs = {s: run_setup(model, tok, prompts, s, 12, seed=1) for s in ("greedy", "beam 1", "top-k 1", "temperature 0")}
    reference = runs["greedy"]
    for name, results in runs.items():
        for got, want in zip(results, reference):
            assert len(got) == 1
            assert got[0].token_ids == want[0].token_ids, name
            assert got[0].text == want[0].text
            assert got[0].logprobs == pytest.approx(want[0].logprobs, abs=1e-4)
            assert got[0].setup == name
    assert runs["beam 1"][0][0].score is not None and runs["greedy"][0][0].score is None


def test_greedy_is_the_argmax_of_the_processed_logits_recomputed(model, tok):
    ids = tok.encode("to be")
    result = run_setup(model, tok, [ids], "greedy", 8)[0][0]
    seq = list(ids)
    for _ in range(8):
        logits = model(torch.tensor([seq]))[0][0, -1]
        logits[[tok.pad_id, tok.bos_id]] = -math.inf  # the default ban
        seq.append(int(logits.argmax()))
        if seq[-1] == tok.eos_id:
            break
    assert result.token_ids == seq[len(ids):]


def test_sampling_is_reproducible_and_returns_n_samples_per_prompt(model, tok):
    a = run_setup(model, tok, ["to", "be"], "top-p 0.9, temperature 0.8", 10, seed=3, num_return_sequences=3)
    b = run_setup(model, tok, ["to", "be"], "top-p 0.9, temperature 0.8", 10, seed=3, num_return_sequences=3)
    assert [len(r) for r in a] == [3, 3]
    assert [[r.token_ids for r in rs] for rs in a] == [[r.token_ids for r in rs] for rs in b]
    assert all(isinstance(r, Result) and r.finish_reason in ("eos", "length") for rs in a for r in rs)


def test_beams_are_ranked_and_their_logprobs_are_the_models(model, tok):
    results = run_setup(model, tok, ["to be"], "beam 4, num-return-sequences 3, specials none", 6)[0]
    assert len(results) == 3
    scores = [r.score for r in results]
    assert scores == sorted(scores, reverse=True)
    for r in results:
        ids = tok.encode("to be") + r.token_ids
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0], -1)
        expected = [logp[t - 1, ids[t]].item() for t in range(len(ids) - len(r.token_ids), len(ids))]
        assert r.logprobs == pytest.approx(expected, abs=1e-4)
        assert r.search_logprobs == pytest.approx(expected, abs=1e-4)  # no processors: the same
        assert r.sum_logprob == pytest.approx(sum(expected), abs=1e-3)


def test_special_tokens_policies(model, tok):
    specials = {tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id}
    push = {tok.pad_id: 30.0, tok.bos_id: 30.0, tok.eos_id: 20.0, tok.unk_id: 20.0}
    exact = run_setup(model, tok, ["to", "b"], DecodingSetup(logit_bias=push, suppress_specials="all"), 15, seed=0)
    for (r,) in exact:
        assert len(r.token_ids) == 15 and r.finish_reason == "length"
        assert not specials & set(r.token_ids)
    default = run_setup(model, tok, ["to"], DecodingSetup(logit_bias=push), 15, seed=0)[0][0]
    assert default.token_ids == [tok.eos_id] and default.finish_reason == "eos"  # pad/bos banned, eos allowed
    none = run_setup(model, tok, ["to"], DecodingSetup(logit_bias=push, suppress_specials="none"), 5, seed=0)[0][0]
    assert none.token_ids[0] in (tok.pad_id, tok.bos_id)
    assert special_ids_to_suppress("default", tok) == [tok.pad_id, tok.bos_id]
    assert special_ids_to_suppress("all", tok) == [0, 1, 2, 3]

    class SharedPad:  # Hugging Face tokenizers without a pad token reuse <eos>
        pad_id, bos_id, eos_id, unk_id = 5, 6, 5, 7

    assert special_ids_to_suppress("default", SharedPad()) == [6]


def test_stop_strings_for_sampling_and_beams(model, tok):
    sampled = run_setup(model, tok, ["to"], "specials all", 30, seed=0, stop_strings=["e"])[0][0]
    if "e" in tok.decode(sampled.token_ids):
        assert sampled.finish_reason == "stop" and "e" not in sampled.text
    beams = run_setup(model, tok, ["to"], "beam 3, num-return-sequences 3, specials all", 20, stop_strings=[","])[0]
    for r in beams:
        if r.finish_reason == "stop":
            assert "," not in r.text and tok.decode(r.token_ids).endswith(",")
            assert len(r.logprobs) == len(r.token_ids)


def test_run_setup_errors_name_the_bad_value(model, tok):
    V = tok.vocab_size
    with pytest.raises(ValueError, match=f"top_k=999 is larger than the vocabulary size V={V}"):
        run_setup(model, tok, ["to"], "top-k 999", 5)
    with pytest.raises(ValueError, match=r"prompt 1 is empty \(''\)"):
        run_setup(model, tok, ["to", ""], "greedy", 5)
    with pytest.raises(ValueError, match="prompt 0 has 40 tokens, more than the model's context of 32"):
        run_setup(model, tok, ["a" * 40], "greedy", 5, context_policy="error")
    with pytest.raises(ValueError, match="plus max_new_tokens=30 needs 34 positions"):
        run_setup(model, tok, ["to be"], "beam 2", 30)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
        run_setup(model, tok, ["to"], "greedy", 0)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        run_setup(model, tok, [[1, 2, 500]], "greedy", 3)
    # sliding context: a long prompt is fine
    assert len(run_setup(model, tok, ["a" * 40], "greedy, specials all", 5)[0][0].token_ids) == 5


# ---------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model, tok):
    directory = tmp_path_factory.mktemp("ckpt")
    save_model(model, directory)
    tok.save(directory / "tokenizer.json")
    return directory


def parser():
    p = argparse.ArgumentParser(prog="lmlab generate")
    add_generate_arguments(p)
    return p


def run(checkpoint, *argv):
    args = parser().parse_args(["--model", str(checkpoint), *argv])
    out = io.StringIO()
    assert run_generate(args, out) == 0
    return out.getvalue()


def test_every_setup_field_is_a_flag():
    options = {a.dest for a in parser()._actions}
    assert {f.name for f in dataclasses.fields(DecodingSetup)} <= options


def test_generate_text_json_and_flags(checkpoint, tok):
    out = run(checkpoint, "--prompt", "to be", "--max-new-tokens", "10", "--top-k", "5", "--temperature", "0.7")
    assert out.startswith("--- sample 0 (prompt 0, temperature 0.7, top-k 5:") and "\nto be" in out
    data = json.loads(run(checkpoint, "--prompt", "to", "--prompt", "be", "--max-new-tokens", "6", "--json",
                          "--setup", "top-p 0.9", "--num-samples", "2", "--repetition-penalty", "1.2",
                          "--suppress-specials", "all", "--logit-bias", "5:-inf"))
    assert data["setup"]["top_p"] == 0.9 and data["setup"]["repetition_penalty"] == 1.2
    assert data["setup"]["logit_bias"] == {"5": -math.inf}
    assert [len(r) for r in data["results"]] == [2, 2]
    assert all(len(r["token_ids"]) == 6 and 5 not in r["token_ids"] for rs in data["results"] for r in rs)
    beams = json.loads(run(checkpoint, "--prompt", "to", "--max-new-tokens", "5", "--num-beams", "3",
                           "--num-samples", "2", "--length-penalty", "0.5", "--json"))
    assert len(beams["results"][0]) == 2 and beams["results"][0][0]["score"] is not None


def test_stream_prints_the_same_text_as_batched(checkpoint):
    common = ["--prompt", "to", "--prompt", "be", "--num-samples", "2", "--max-new-tokens", "12", "--seed", "5"]
    batched = json.loads(run(checkpoint, *common, "--json"))
    streamed = run(checkpoint, *common, "--stream")
    texts = [r["prompt"] + r["text"] for rs in batched["results"] for r in rs]
    for i, text in enumerate(texts):
        assert f"--- sample {i} (sample)\n{text}\n[" in streamed


def test_stream_with_stop_strings_prints_the_same_text_as_batched(checkpoint):
    common = ["--prompt", "to", "--num-samples", "3", "--max-new-tokens", "30", "--seed", "2", "--stop", "e",
              "--stop", "o "]
    batched = json.loads(run(checkpoint, *common, "--json"))
    streamed = run(checkpoint, *common, "--stream")
    results = [r for rs in batched["results"] for r in rs]
    assert any(r["finish_reason"] == "stop" for r in results)
    for i, r in enumerate(results):
        assert f"--- sample {i} (sample)\n{r['prompt'] + r['text']}\n[{r['finish_reason']}, " in streamed


def test_compare_prints_setups_side_by_side(checkpoint):
    out = run(checkpoint, "--prompt", "to be", "--prompt", "q", "--max-new-tokens", "8", "--width", "90",
              "--compare", "greedy", "top-k 20", "beam 3, num-return-sequences 2")
    assert out.count("=== prompt") == 2
    header = out.splitlines()[1]
    assert "greedy" in header and "top-k 20" in header and "beam 3" in header and "│" in header
    assert all(len(line) <= 90 for line in out.splitlines())
    data = json.loads(run(checkpoint, "--prompt", "to", "--max-new-tokens", "5", "--json",
                          "--compare", "greedy", "beam 2"))
    assert set(data["prompts"][0]["results"]) == {"greedy", "beam 2"}
    table = format_columns(["a", "b"], [[("x\ny", "[f]")], [("z", "[g]")]], width=30)
    assert table.splitlines()[1] == "─" * 13 + "─┼─" + "─" * 13


def test_tasks_from_the_command_line(checkpoint, tok):
    out = run(checkpoint, "--prompt", "to be", "--task", "predict", "--target", " or not")
    assert f"logits: (1, 7, {tok.vocab_size})" in out and "greedy continuation:" in out
    assert "NLL teacher-forced" in out and "mean NLL per token" in out
    data = json.loads(run(checkpoint, "--prompt", "to be", "--task", "predict", "--max-new-tokens", "4", "--json"))
    assert data["results"][0]["logits_shape"] == [1, 4, tok.vocab_size]
    data = json.loads(run(checkpoint, "--prompt", "to", "--task", "complete", "--max-new-tokens", "9",
                          "--num-samples", "3", "--json"))
    assert len(data["results"]) == 3
    assert all(len(r["token_ids"]) == 9 and min(r["token_ids"]) > 3 for r in data["results"])


def test_prompt_files(checkpoint, tmp_path):
    plain = tmp_path / "p.txt"
    plain.write_text("to be\n\nthat\n")
    assert read_prompt_file(plain) == (["to be", "that"], [None, None])
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "to\\nbe", "target": " or"}\n{"prompt": "q"}\n')
    assert read_prompt_file(jsonl) == (["to\nbe", "q"], [" or", None])
    data = json.loads(run(checkpoint, "--prompt-file", str(jsonl), "--greedy", "--max-new-tokens", "3", "--json"))
    assert [r[0]["prompt"] for r in data["results"]] == ["to\nbe", "q"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match='bad.jsonl:1 needs a JSON object with a "prompt" string'):
        read_prompt_file(bad)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_prompt_file(tmp_path / "missing.txt")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--temperature", "-1"], r"temperature must be a finite number >= 0.*got -1.0"),
        (["--top-k", "0"], r"top_k must be an integer >= 1, got 0"),
        (["--top-k", "500"], r"top_k=500 is larger than the vocabulary size V=\d+"),
        (["--top-p", "1.5"], r"top_p must be a real number in \[0.0, 1.0\], got 1.5"),
        (["--top-p", "-0.2"], r"got -0.2"),
        (["--prompt", ""], r"prompt 0 is empty \(''\)"),
        (["--prompt", "a" * 40, "--context-policy", "error"], r"prompt 0 has 40 tokens, more than the model's context of 32"),
        (["--compare", "greedy", "top-z 3"], r"unknown decoding option 'top-z'"),
        (["--num-beams", "2", "--top-k", "5"], r"does not use top_k=5"),
        (["--greedy", "--num-samples", "2"], r"greedy decoding gives one sequence per prompt"),
        (["--stream", "--num-beams", "2"], r"--stream needs greedy or sampling"),
        (["--max-new-tokens", "0"], r"--max-new-tokens must be >= 1, got 0"),
        (["--target", "x"], r"--target is the true continuation scored by --task predict"),
        (["--task", "predict", "--target", "a", "--target", "b"], r"2 --target value\(s\) for 1 prompt"),
        (["--task", "complete", "--greedy"], r"--task complete samples"),
    ],
)
def test_generate_errors_name_the_value(checkpoint, argv, message):
    args = parser().parse_args(["--model", str(checkpoint), *argv])
    with pytest.raises(ValueError, match=message):
        run_generate(args, io.StringIO())
