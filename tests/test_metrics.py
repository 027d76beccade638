"""Tests of lmlab.metrics on small cases computed by hand."""

from __future__ import annotations

import json
import math

from pathlib import Path

import pytest
import torch

from conftest import BigramTable
from lmlab.metrics import (
    Oracle,
    continuation_span,
    distinct_n,
    diversity,
    load_oracle,
    ngrams,
    next_tokens_nll,
    oracle_perplexity,
    repetition_rate,
    rouge,
    self_bleu,
)
from lmlab.tokenizers import CharTokenizer, WordTokenizer

LN10 = math.log(10.0)


# ---------------------------------------------------------------- diversity


def test_ngrams_and_distinct_n_by_hand():
    assert ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert ngrams(["a"], 2) == []
    texts = ["a b a b", "a c"]
    # unigrams a b a b a c: 6, unique {a, b, c}
    d1 = distinct_n(texts, 1)
    assert (d1.unique, d1.total, d1.ratio) == (3, 6, 0.5)
    # bigrams (a b) (b a) (a b) | (a c): n-grams never cross texts
    d2 = distinct_n(texts, 2)
    assert (d2.unique, d2.total) == (3, 4)
    d3 = distinct_n(texts, 3)
    assert (d3.unique, d3.total) == (2, 2)
    d4 = distinct_n(texts, 4)
    assert (d4.unique, d4.total, d4.ratio) == (1, 1, 1.0)
    assert math.isnan(distinct_n(["a"], 2).ratio)  # no bigram at all
    # characters, and token lists used as they are
    assert (distinct_n(["aab"], 1, unit="char").unique, distinct_n(["aab"], 1, unit="char").total) == (2, 3)
    assert distinct_n([[1, 2, 1]], 1).unique == 2


def test_repetition_rate_by_hand():
    # bigrams of "a b a b a b": ab ba ab ba ab -> 2 unique of 5 -> 1 - 2/5
    assert repetition_rate(["a b a b a b"], n=2) == pytest.approx(0.6)
    # "x y" has one bigram, none repeated; "z" has none and is left out
    assert repetition_rate(["a b a b a b", "x y", "z"], n=2) == pytest.approx(0.3)
    assert math.isnan(repetition_rate(["z"], n=2))


def test_diversity_pooled_and_per_prompt():
    div = diversity([["a b", "a b"], ["c d", "e f"]], max_n=2, repetition_n=2)
    assert (div.distinct[1].unique, div.distinct[1].total) == (6, 8)  # a b a b c d e f
    assert (div.distinct[2].unique, div.distinct[2].total) == (3, 4)
    # within prompt 0: 2 of 4 unigrams unique; within prompt 1: 4 of 4
    assert div.per_prompt_ratio(1) == pytest.approx((0.5 + 1.0) / 2)
    assert div.per_prompt_unique(1) == pytest.approx(3.0)
    assert div.repetition == 0.0
    d = div.as_dict()
    assert d["distinct_1"] == pytest.approx(0.75) and d["unique_2"] == 3 and d["texts"] == 4
    with pytest.raises(ValueError, match="one list of continuation strings per prompt"):
        diversity(["a b", "c d"])
    with pytest.raises(ValueError, match="unit"):
        diversity([["a"]], unit="byte")


def test_self_bleu():
    pytest.importorskip("sacrebleu")
    same = ["the cat sat on the mat today"] * 3
    assert self_bleu(same) == pytest.approx(100.0)
    different = ["the cat sat on the mat today", "a dog ran in the park yesterday", "my bird flew over a tree again"]
    assert self_bleu(different) < 20.0
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu(["only one"])


# ---------------------------------------------------------------- oracle perplexity


@pytest.fixture
def ab_oracle():
    """A bigram table over the char vocabulary {a, b}: ids a=4, b=5 (0..3 are specials)."""
    tok = CharTokenizer(["a", "b"])
    g = torch.Generator().manual_seed(0)
    return Oracle(BigramTable(torch.randn(6, 6, generator=g) * 2), tok)


def test_oracle_perplexity_equals_hand_computation(ab_oracle):
    table = ab_oracle.model.table
    lp = torch.log_softmax(table, dim=-1)
    a, b = 4, 5
    # "ab" + "ba": ids a b | b a; scored: b after b, a after b (the prompt's tokens are context only)
    score = oracle_perplexity(ab_oracle, ["ab"], ["ba"])
    nll = -(lp[b, b] + lp[b, a]).item()
    assert score.tokens == 2 and score.characters == 2
    assert score.nll == pytest.approx(nll, rel=1e-6)
    assert score.perplexity == pytest.approx(math.exp(nll / 2), rel=1e-6)
    # a corpus: exp(total NLL / total tokens), not a mean of per-text perplexities
    two = oracle_perplexity(ab_oracle, ["ab", "a"], ["ba", "a"])
    nll2 = nll - lp[a, a].item()
    assert two.tokens == 3 and two.perplexity == pytest.approx(math.exp(nll2 / 3), rel=1e-6)
    assert two.per_text[1] == (pytest.approx(-lp[a, a].item(), rel=1e-6), 1)


def test_conditioning_on_the_prompt_changes_the_number(ab_oracle):
    after_a = oracle_perplexity(ab_oracle, ["a"], ["ab"]).perplexity
    after_b = oracle_perplexity(ab_oracle, ["b"], ["ab"]).perplexity
    assert after_a != pytest.approx(after_b)
    lp = torch.log_softmax(ab_oracle.model.table, dim=-1)
    assert after_b == pytest.approx(math.exp(-(lp[5, 4] + lp[4, 5]).item() / 2), rel=1e-6)
    # <bos> before the prompt is one more token of context, never a scored one
    with_bos = oracle_perplexity(Oracle(ab_oracle.model, ab_oracle.tokenizer, add_bos=True), ["b"], ["ab"])
    assert with_bos.tokens == 2 and with_bos.perplexity == pytest.approx(after_b)


def test_padding_is_excluded():
    """Rows of different lengths in one right-padded batch score exactly as alone (attention model)."""
    from lmlab.models import build_model
    from lmlab.models.transformer import TransformerConfig

    tok = CharTokenizer(list("abcdefgh "))
    torch.manual_seed(0)
    model = build_model("transformer", TransformerConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1,
                                                         n_head=2, n_embd=16)).eval()
    oracle = Oracle(model, tok)
    prompts = ["abc", "h", "gg ab", "d"]
    conts = ["defgh abc", "a", "", "bbbbbbbbbbbbbbbb"]
    together = oracle_perplexity(oracle, prompts, conts, batch_size=8)
    alone = [oracle_perplexity(oracle, [p], [c], batch_size=1) for p, c in zip(prompts, conts)]
    assert together.tokens == sum(len(c) for c in conts)  # continuation tokens only, no padding
    for (nll, n), single in zip(together.per_text, alone):
        assert n == single.tokens
        assert nll == pytest.approx(single.nll, abs=1e-4)
    assert together.per_text[2] == (0.0, 0)  # an empty continuation scores nothing


class _ShortContext(BigramTable):
    @property
    def max_context(self):
        return 3


def test_long_texts_slide_and_score_every_token_once(ab_oracle):
    """A bigram needs one token of context, so windows of 3 give the unbounded numbers exactly."""
    short = Oracle(_ShortContext(ab_oracle.model.table), ab_oracle.tokenizer)
    prompts, conts = ["ab", "b"], ["abbabaabba", "aaaaabbbbbab"]
    full = oracle_perplexity(ab_oracle, prompts, conts)
    slid = oracle_perplexity(short, prompts, conts, batch_size=3)
    assert slid.tokens == full.tokens == 22
    assert slid.nll == pytest.approx(full.nll, rel=1e-6)


def test_a_different_tokenizer_is_handled_by_retokenizing(ab_oracle):
    """The same distribution behind a tokenizer with other ids gives the same perplexity of the same text."""
    tok2 = CharTokenizer(["b", "a"])  # a=5, b=4
    perm = torch.tensor([0, 1, 2, 3, 5, 4])
    table2 = ab_oracle.model.table[perm][:, perm]
    other = Oracle(BigramTable(table2), tok2)
    prompts, conts = ["ab", "ba"], ["bbab", "a"]
    same = oracle_perplexity(ab_oracle, prompts, conts)
    assert oracle_perplexity(other, prompts, conts).nll == pytest.approx(same.nll)


class _MergingTokenizer:
    """Greedy longest match over {a, b, ab}: "a" + "b" becomes the one token "ab"."""

    vocab = {"a": 0, "b": 1, "ab": 2}
    vocab_size, bos_id, pad_id, unk_id = 3, None, 0, None

    def encode(self, text):
        out, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                out.append(2)
                i += 2
            else:
                out.append(self.vocab[text[i]])
                i += 1
        return out


def test_continuation_span_at_a_merged_boundary():
    tok = _MergingTokenizer()
    # "ba" -> [b, a]; "ba" + "bb" -> [b, ab, b]: the merged token "ab" is the first scored one
    ids, start = continuation_span(tok, "ba", "bb")
    assert ids == [1, 2, 1] and start == 1
    ids, start = continuation_span(tok, "bb", "a")  # no merge: starts right after the prompt
    assert ids == [1, 1, 0] and start == 2


LMPLZ_TINY_ARPA = (Path(__file__).parent / "data" / "lmplz_tiny.arpa").read_text()  # written by KenLM lmplz


def test_arpa_oracle_reads_probabilities_from_the_file(tmp_path):
    pytest.importorskip("lmlab.models.ngram", reason="the n-gram module (lmlab.models.ngram) is not available")
    path = tmp_path / "tiny.arpa"
    path.write_text(LMPLZ_TINY_ARPA)
    oracle = load_oracle(path)
    assert isinstance(oracle.tokenizer, WordTokenizer) and oracle.add_bos  # <s> starts every prompt
    assert oracle.tokenizer.words == oracle.model.vocab  # the file's words, nothing appended
    # <s> a | b c: log10 p(b | <s> a) and log10 p(c | a b) are 3-grams of the file
    score = oracle_perplexity(oracle, ["a"], [" b c"])
    assert score.tokens == 2
    assert score.nll == pytest.approx((0.2980245 + 0.26460075) * LN10, rel=1e-5)
    # an unknown word is the file's <unk>, counted and reported; p(<unk> | a b) backs off twice:
    # backoff(a b) + backoff(b) + log10 p(<unk>)
    unk = oracle_perplexity(oracle, ["a b"], [" zebra"])
    assert unk.unknown == 1
    assert unk.nll == pytest.approx((0.30103 + 0.30103 + 1.0377885) * LN10, rel=1e-5)
    with pytest.raises(FileNotFoundError, match="ARPA"):
        load_oracle(tmp_path / "missing.arpa")


def test_load_oracle_from_an_lmlab_checkpoint(tmp_path, ab_oracle):
    from lmlab.models import build_model, save_model
    from lmlab.models.transformer import TransformerConfig

    tok = CharTokenizer(list("ab"))
    model = build_model("transformer", TransformerConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1,
                                                         n_head=1, n_embd=8)).eval()
    save_model(model, tmp_path / "ckpt")
    tok.save(tmp_path / "ckpt" / "tokenizer.json")
    oracle = load_oracle(str(tmp_path / "ckpt"))
    assert not oracle.add_bos
    direct = oracle_perplexity((model, tok), ["ab"], ["ba"])
    assert oracle_perplexity(oracle, ["ab"], ["ba"]).nll == pytest.approx(direct.nll, rel=1e-6)


def test_oracle_perplexity_bad_input(ab_oracle):
    with pytest.raises(ValueError, match="one continuation per prompt"):
        oracle_perplexity(ab_oracle, ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one"):
        oracle_perplexity(ab_oracle, [], [])
    with pytest.raises(ValueError, match="re-tokenizes text"):
        oracle_perplexity(ab_oracle, ["a"], [[4, 5]])


# ---------------------------------------------------------------- fluency


def _tiny_cola(tmp_path):
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "dog"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                                     num_labels=2, id2label={0: "unacceptable", 1: "acceptable"},
                                     label2id={"unacceptable": 0, "acceptable": 1})
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    out = tmp_path / "cola"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, model, tokenizer


def test_fluency_is_the_mean_probability_of_the_label(tmp_path):
    from lmlab.metrics import fluency, load_classifier

    path, model, tokenizer = _tiny_cola(tmp_path)
    clf = load_classifier(path)
    texts = ["the cat sat on the mat", "mat the dog", "cat"]
    score = fluency(clf, texts, batch_size=2)
    with torch.no_grad():
        expected = [torch.softmax(model(**tokenizer(t, return_tensors="pt")).logits, -1)[0, 1].item() for t in texts]
    assert score.label == "acceptable"
    assert score.probabilities == pytest.approx(expected, abs=1e-5)
    assert score.mean == pytest.approx(sum(expected) / 3, abs=1e-5)
    other = fluency(clf, texts, label=0)  # by index; the other class
    assert other.label == "unacceptable" and other.mean == pytest.approx(1 - score.mean, abs=1e-5)
    assert fluency(path, texts, label="ACCEPTABLE").mean == pytest.approx(score.mean, abs=1e-6)
    with pytest.raises(ValueError, match="0='unacceptable', 1='acceptable'"):
        fluency(clf, texts, label="grammatical")
    with pytest.raises(FileNotFoundError, match="classifier"):
        load_classifier(tmp_path / "nowhere")


# ---------------------------------------------------------------- ROUGE and next-N NLL


def test_rouge_by_hand():
    pytest.importorskip("rouge_score")
    r = rouge(["the cat sat"], ["the cat ran"], use_stemmer=False)
    assert r["rouge1"] == pytest.approx(2 / 3)  # 2 of 3 unigrams on each side
    assert r["rouge2"] == pytest.approx(1 / 2)  # "the cat" of {the cat, cat sat}
    assert r["rougeL"] == pytest.approx(2 / 3)  # longest common subsequence "the cat"
    both = rouge(["the cat sat", "a dog"], ["the cat sat", "a dog"])
    assert both == {"rouge1": pytest.approx(1.0), "rouge2": pytest.approx(1.0), "rougeL": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="one reference each"):
        rouge(["a"], [])
    with pytest.raises(ValueError, match="unknown ROUGE"):
        rouge(["a"], ["a"], types=("rouge9",))


def test_next_tokens_nll_by_hand(ab_oracle):
    model, tok = ab_oracle.model, ab_oracle.tokenizer
    lp = torch.log_softmax(model.table, dim=-1)
    a, b = 4, 5
    # after "ab" the true next tokens "ba": -log p(b | b), -log p(a | b) teacher-forced
    assert next_tokens_nll(model, tok, ["ab"], ["ba"]) == pytest.approx(-(lp[b, b] + lp[b, a]).item() / 2, rel=1e-6)
    # n=1 keeps the first token of each target; two prompts: the mean over all tokens
    got = next_tokens_nll(model, tok, ["ab", "a"], ["ba", "bbb"], n=1)
    assert got == pytest.approx(-(lp[b, b] + lp[a, b]).item() / 2, rel=1e-6)
    with pytest.raises(ValueError, match="accepted: n <= 2"):
        next_tokens_nll(model, tok, ["ab"], ["ba"], n=3)
    with pytest.raises(ValueError, match="target 0 is empty"):
        next_tokens_nll(model, tok, ["ab"], [""])


def test_hf_oracle_with_bpe_boundary_merges(tmp_path):
    """A Hugging Face causal LM from a local directory (hf:<dir>), BPE merging across the boundary."""
    transformers = pytest.importorskip("transformers")
    from lmlab.tokenizers import BPETokenizer

    text = ("the quick brown fox jumps over the lazy dog. " * 3 + "a language model assigns probabilities. ") * 8
    bpe = BPETokenizer.train(text, vocab_size=300)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=bpe.vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=4, bos_token_id=1,
        eos_token_id=2, pad_token_id=0)).eval()
    hf.save_pretrained(str(tmp_path / "gpt2"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe.backend, bos_token="<bos>", eos_token="<eos>",
                                         pad_token="<pad>", unk_token="<unk>").save_pretrained(str(tmp_path / "gpt2"))
    oracle = load_oracle(f"hf:{tmp_path / 'gpt2'}")
    prompt, cont = "the quick bro", "wn fox jumps"
    ids, start = continuation_span(oracle.tokenizer, prompt, cont)
    assert start < len(oracle.tokenizer.encode(prompt))  # "bro" + "wn" merged: the merged token is scored
    assert oracle.tokenizer.decode(ids[start:]).endswith(cont)
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    nll = -sum(lp[t - 1, ids[t]].item() for t in range(start, len(ids)))
    score = oracle_perplexity(oracle, [prompt, "a language"], [cont, " model"], batch_size=2)
    assert score.per_text[0] == (pytest.approx(nll, rel=1e-5), len(ids) - start)
    alone = oracle_perplexity(oracle, ["a language"], [" model"], batch_size=1)
    assert score.per_text[1][0] == pytest.approx(alone.nll, rel=1e-5)  # right padding changed nothing


def test_fluency_classifier_with_remote_code_or_pickles_is_refused(tmp_path):
    from lmlab.metrics import load_classifier

    path, _, _ = _tiny_cola(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "evil.Model"}}))
    with pytest.raises(ValueError, match=r"config.json has an auto_map"):
        load_classifier(path)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin \(pickled weights\)"):
        load_classifier(path)


def test_arpa_oracle_tokenizer_is_the_word_tokenizer_of_the_file_words(tmp_path):
    """An ARPA vocabulary is a WordTokenizer with nothing appended: ids are the file's,
    and a file without <unk> refuses an unknown word by name instead of inventing an id."""
    tok = WordTokenizer(["<s>", "</s>", "a", "b"], append_specials=False)
    assert tok.vocab_size == 4 and (tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, None)
    assert tok.encode("a b\nb") == [2, 3, 1, 3]  # a line end is </s>, as for every word-level model
    with pytest.raises(ValueError, match="'zebra' is not in the vocabulary"):
        tok.encode("a zebra")
    again = WordTokenizer.from_dict(json.loads(tok.to_json()))
    assert again.words == tok.words and again.unk_id is None
    assert WordTokenizer(["a"]).words == ["a", "<unk>", "<s>", "</s>"]  # the default still completes the specials
