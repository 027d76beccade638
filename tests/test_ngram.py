"""Tests of the count-based n-gram family (lmlab.models.ngram, lmlab.arpa)."""

from __future__ import annotations

import math
import warnings
from collections import Counter, defaultdict

import numpy as np
from pathlib import Path

import pytest
import torch

from lmlab.arpa import ArpaFormatError, read_arpa
from lmlab.models.base import build_model, families, load_model, save_model
from lmlab.models.ngram import DiscountWarning, NGramConfig, NGramModel, build_vocab

TINY = ["a b c a b", "b c a", "a a b c", "c b a b c a"]

# `lmplz -o 3 --discount_fallback` (KenLM 0.3.0) on TINY, verbatim.
LMPLZ_TINY_ARPA = (Path(__file__).parent / "data" / "lmplz_tiny.arpa").read_text()  # written by KenLM lmplz


def markov_corpus(n_sent=400, n_words=25, seed=0):
    """Sentences from a seeded random bigram chain over 25 words, sprinkled
    with Zipf-distributed rare words: big enough for every count-of-counts
    n1..n4 to be non-zero up to order 5."""
    rng = np.random.default_rng(seed)
    trans = rng.dirichlet(np.full(n_words + 1, 0.3), size=n_words + 1)  # last = </s>
    zipf = 1.0 / np.arange(1, 301) ** 1.1
    zipf /= zipf.sum()
    out = []
    for _ in range(n_sent):
        s, prev = [], n_words
        for _ in range(30):
            if rng.random() < 0.15:
                s.append(f"r{rng.choice(300, p=zipf)}")
                continue
            nxt = rng.choice(n_words + 1, p=trans[prev])
            if nxt == n_words and s:
                break
            if nxt == n_words:
                continue
            s.append(f"w{nxt}")
            prev = nxt
        out.append(" ".join(s))
    return out


def quiet_fit(lines, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiscountWarning)
        return NGramModel.from_text(lines, **kw)


def random_contexts(rng, V, n, L, bos):
    ctx = rng.integers(0, V, size=(n, L))
    ctx[ctx == bos] = 0
    if L:
        ctx[: n // 4, 0] = bos  # some sentence starts; the rest mostly unseen contexts
    return ctx


# ---------------------------------------------------------------- exact small cases


def test_mle_tiny_exact():
    m, vocab = NGramModel.from_text(["a b", "a c", "b"], order=2, method="mle")
    ix = {w: i for i, w in enumerate(vocab)}
    lp = lambda ctx, w: m.logprob10(np.array([[ix[ctx]]]), np.array([ix[w]]))[0]  # noqa: E731
    assert lp("<s>", "a") == pytest.approx(math.log10(2 / 3))
    assert lp("<s>", "b") == pytest.approx(math.log10(1 / 3))
    assert lp("a", "b") == pytest.approx(math.log10(1 / 2))
    assert lp("b", "</s>") == pytest.approx(0.0)
    assert lp("<s>", "c") == -math.inf  # seen context, unseen word: probability 0
    # "</s>" never precedes anything: unseen context -> the unigram estimate 2/8
    assert lp("</s>", "a") == pytest.approx(math.log10(2 / 8))
    assert m.score_words("a b") == pytest.approx(math.log10(1 / 3))
    logits, _ = m(torch.tensor([[ix["<s>"], ix["a"]]]))
    assert not torch.isnan(logits).any()
    assert torch.exp(logits).sum(-1)[0].numpy() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_addk_tiny_exact():
    m, vocab = NGramModel.from_text(["a b", "a c", "b"], order=2, method="addk", k=1.0)
    ix = {w: i for i, w in enumerate(vocab)}
    lp = lambda ctx, w: m.logprob10(np.array([[ix[ctx]]]), np.array([ix[w]]))[0]  # noqa: E731
    # V' = 5 predictable ids (<unk>, </s>, a, b, c); 8 predicted tokens
    assert lp("<s>", "a") == pytest.approx(math.log10(3 / 8), abs=1e-6)
    assert lp("<s>", "c") == pytest.approx(math.log10(1 / 8), abs=1e-6)
    assert lp("<s>", "<unk>") == pytest.approx(math.log10(1 / 8), abs=1e-6)
    assert lp("a", "b") == pytest.approx(math.log10(2 / 7), abs=1e-6)
    assert lp("b", "</s>") == pytest.approx(math.log10(3 / 7), abs=1e-6)
    assert lp("</s>", "a") == pytest.approx(math.log10(3 / 13), abs=1e-6)  # unseen context: add-k unigram
    m2, _ = NGramModel.from_text(["a b", "a c", "b"], order=2, method="addk", k=0.5)
    assert m2.logprob10(np.array([[ix["a"]]]), np.array([ix["b"]]))[0] == pytest.approx(
        math.log10(1.5 / (2 + 0.5 * 5)), abs=1e-6
    )


def test_kn_matches_lmplz_on_tiny_corpus(tmp_path):
    path = tmp_path / "lmplz.arpa"
    path.write_text(LMPLZ_TINY_ARPA)
    ref = read_arpa(path)
    with pytest.warns(DiscountWarning):
        m, vocab = NGramModel.from_text(TINY, order=3)
    assert vocab == ref.vocab  # same id order as KenLM: <unk> <s> </s> then first occurrence
    out = tmp_path / "ours.arpa"
    m.write_arpa(out)
    ours = read_arpa(out)

    def table(t):
        d = {}
        for k in range(t.order):
            for g, p, b in zip(t.ngrams[k].tolist(), t.probs[k], t.backoffs[k]):
                d[tuple(g)] = (p, b)
        return d

    a, b = table(ours), table(ref)
    assert set(a) == set(b)
    bos = vocab.index("<s>")
    for g in a:
        if g != (bos,):  # lmplz writes 0 for <s>, lmlab -99 (SRILM); never used
            assert a[g][0] == pytest.approx(b[g][0], abs=2e-6), g
        assert a[g][1] == pytest.approx(b[g][1], abs=2e-6), g


def reference_kn(lines, N):
    """Plain-dict interpolated modified Kneser-Ney with KenLM's conventions,
    returns p(w | h) as a function of word tuples."""
    sents = [["<s>"] + ln.split() + ["</s>"] for ln in lines]
    raw = [Counter() for _ in range(N + 1)]
    for s in sents:
        for k in range(1, N + 1):
            for j in range(len(s) - k + 1):
                g = tuple(s[j:j + k])
                if g != ("<s>",):
                    raw[k][g] += 1
    left = [defaultdict(set) for _ in range(N + 2)]
    for k in range(2, N + 1):
        for h in raw[k]:
            left[k - 1][h[1:]].add(h[0])
    adj = [Counter() for _ in range(N + 1)]
    for k in range(1, N + 1):
        for g, c in raw[k].items():
            adj[k][g] = c if k == N or g[0] == "<s>" else len(left[k][g])
    D = {}
    for k in range(1, N + 1):
        n = Counter(adj[k].values())
        y = n[1] / (n[1] + 2 * n[2])
        D[k] = [0.0] + [r - (r + 1) * y * n[r + 1] / n[r] for r in (1, 2, 3)]
    ctx_tot = [defaultdict(float) for _ in range(N + 1)]
    ctx_gam = [defaultdict(float) for _ in range(N + 1)]
    for k in range(1, N + 1):
        for g, a in adj[k].items():
            ctx_tot[k][g[:-1]] += a
            ctx_gam[k][g[:-1]] += D[k][min(a, 3)]
    words = {w for s in sents for w in s} | {"<unk>"}
    Vp = len(words) - 1  # all but <s>

    def p(w, h):
        k = len(h) + 1
        if k == 1:
            lower = 1.0 / Vp
        else:
            lower = p(w, h[1:])
        if k > 1 and ctx_tot[k].get(h, 0) == 0:
            return lower
        a = adj[k].get(h + (w,), 0)
        tot = ctx_tot[k][h]
        return (a - D[k][min(a, 3)]) / tot + ctx_gam[k][h] / tot * lower if a else ctx_gam[k][h] / tot * lower

    return p, D


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_kn_matches_reference_implementation(order):
    lines = markov_corpus()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiscountWarning)  # discounts are estimable here
        m, vocab = NGramModel.from_text(lines, order=order)
    p, D = reference_kn(lines, order)
    for k in range(order):
        assert m.config.discounts_used[k] == pytest.approx(D[k + 1][1:], rel=1e-9)
    rng = np.random.default_rng(order)
    bos = vocab.index("<s>")
    ctx = random_contexts(rng, len(vocab), 60, order - 1, bos)
    # include contexts from the data (seen n-grams) too
    seq = m.encode(lines[3])
    for j in range(min(len(seq), 10)):
        row = ([bos] * order + [bos] + seq[:j].tolist())[-(order - 1):] if order > 1 else []
        ctx = np.vstack([ctx, np.array(row, dtype=np.int64).reshape(1, order - 1)])
    dist = m._tables().dist10(ctx)
    for i in range(ctx.shape[0]):
        h = tuple(vocab[c] for c in ctx[i])  # "<s> <s> a" is never seen: the reference backs off too
        for w in range(len(vocab)):
            if w == bos:
                assert dist[i, w] == -math.inf
                continue
            assert 10 ** dist[i, w] == pytest.approx(p(vocab[w], h), rel=2e-6), (h, vocab[w])


@pytest.mark.parametrize("method", ["kneser_ney", "mle", "addk"])
@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_distributions_sum_to_one(method, order):
    lines = markov_corpus(n_sent=150, seed=order)
    m, vocab = quiet_fit(lines + ["<unk> w1 <unk>"], order=order, method=method, vocab=build_vocab(lines) + ["never"])
    rng = np.random.default_rng(0)
    ctx = random_contexts(rng, len(vocab), 200, order - 1, vocab.index("<s>"))
    logits, _ = m(torch.from_numpy(np.concatenate([ctx, rng.integers(3, len(vocab), (200, 1))], 1)))
    assert not torch.isnan(logits).any()
    sums = torch.exp(logits.double()).sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)


# ---------------------------------------------------------------- interface


@pytest.mark.parametrize("order", [1, 2, 4])
def test_forward_incremental_state_equals_full(order):
    lines = markov_corpus(n_sent=200)
    m, vocab = quiet_fit(lines, order=order)
    rng = np.random.default_rng(1)
    ids = torch.from_numpy(rng.integers(0, len(vocab), size=(3, 17)))
    ids[:, 0] = vocab.index("<s>")
    full, st_full = m(ids)
    assert full.shape == (3, 17, len(vocab)) and st_full.tensors["context"].shape == (3, order - 1)
    state, parts = None, []
    for a, b in [(0, 1), (1, 5), (5, 6), (6, 17)]:
        lg, state = m(ids[:, a:b], state)
        parts.append(lg)
    assert torch.equal(torch.cat(parts, 1), full)
    assert state.length == 17 and torch.equal(state.tensors["context"], st_full.tensors["context"])
    # fast path = gather of the full logits
    tl = m.token_logprobs(ids)
    ref = torch.log_softmax(full.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    assert torch.allclose(tl.double(), ref, atol=1e-5)
    # continuing from a state, and re-indexing it (beam search)
    _, st = m(ids[:, :8])
    tl2 = m.token_logprobs(ids[[2, 0, 1], 8:], st.select(torch.tensor([2, 0, 1])))
    assert torch.allclose(tl2, m.token_logprobs(ids[[2, 0, 1]])[:, 8:], atol=1e-6)
    # empty inputs
    lg0, st0 = m(ids[:, :0])
    assert lg0.shape == (3, 0, len(vocab)) and st0.length == 0
    assert m.token_logprobs(ids[:, :1]).shape == (3, 0)


def test_score_sequences_matches_token_logprobs():
    lines = markov_corpus(n_sent=100)
    m, vocab = quiet_fit(lines, order=3)
    seqs = [m.encode(s) for s in lines[:20]]
    per_seq = m.score_sequences(seqs)
    bos, eos = vocab.index("<s>"), vocab.index("</s>")
    for s, v in zip(seqs, per_seq):
        ids = torch.tensor([[bos] + s.tolist() + [eos]])
        assert v == pytest.approx(m.token_logprobs(ids).double().sum().item() / math.log(10), abs=1e-4)
        assert v == pytest.approx(m.score_words(" ".join(vocab[i] for i in s)), abs=1e-9)
    n = sum(len(s) + 1 for s in seqs)
    assert m.perplexity(seqs) == pytest.approx(10 ** (-per_seq.sum() / n))


def test_registered_and_save_load(tmp_path):
    assert "ngram" in families()
    m, vocab = quiet_fit(markov_corpus(n_sent=80), order=3)
    save_model(m, tmp_path / "m")
    m2 = load_model(tmp_path / "m")
    assert isinstance(m2, NGramModel) and m2.config.sizes == m.config.sizes
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    assert torch.equal(m(ids)[0], m2(ids)[0])
    fresh = build_model("ngram", {"vocab_size": 7, "order": 2, "bos_id": 1})
    lg, _ = fresh(torch.tensor([[1, 2]]))
    assert torch.allclose(lg[0, 0].exp().sum(), torch.tensor(1.0)) and lg[0, 0, 1] == -math.inf  # uniform


# ---------------------------------------------------------------- ARPA and KenLM


@pytest.mark.parametrize("order", [2, 3, 4])  # KenLM refuses unigram-only models
def test_written_arpa_gives_kenlm_the_same_scores(tmp_path, order):
    kenlm = pytest.importorskip("kenlm")
    lines = markov_corpus(n_sent=300)
    m, vocab = quiet_fit(lines + ["w3 <unk> w4"], order=order)
    path = tmp_path / "m.arpa"
    m.write_arpa(path)
    km = kenlm.Model(str(path))
    tests = lines[:30] + ["", "w1", "w1 w2 unseenword w3", "w5 w5 w5 w5 w5 w5", "zzz yyy"]
    for s in tests:
        for bos, eos in [(True, True), (False, True), (True, False)]:
            assert m.score_words(s, bos=bos, eos=eos) == pytest.approx(km.score(s, bos=bos, eos=eos), abs=1e-4), s


@pytest.mark.parametrize("order", [1, 3])
def test_arpa_round_trip(tmp_path, order):
    m, vocab = quiet_fit(markov_corpus(n_sent=200), order=order)
    path = tmp_path / "m.arpa"
    m.write_arpa(path)
    m2, vocab2 = NGramModel.from_arpa(path)
    assert vocab2 == vocab and m2.config.method == "backoff" and m2.sizes == m.sizes
    for name, _ in m.named_buffers():
        assert torch.equal(getattr(m, name), getattr(m2, name)), name
    path2 = tmp_path / "m2.arpa"
    m2.write_arpa(path2)
    assert path.read_text() == path2.read_text()


def test_read_lmplz_arpa_and_score_like_kenlm(tmp_path):
    kenlm = pytest.importorskip("kenlm")
    path = tmp_path / "lmplz.arpa"
    path.write_text(LMPLZ_TINY_ARPA)
    m, vocab = NGramModel.from_arpa(path)
    km = kenlm.Model(str(path))
    for s in TINY + ["a", "", "c c c", "a q b"]:
        assert m.score_words(s) == pytest.approx(km.score(s), abs=1e-5)
    # generation works on a loaded model
    logits, state = m(torch.tensor([[vocab.index("<s>"), vocab.index("a")]]))
    nxt = int(torch.multinomial(logits[0, -1].exp(), 1, generator=torch.Generator().manual_seed(0)))
    assert nxt != vocab.index("<s>")
    logits2, _ = m(torch.tensor([[nxt]]), state)
    assert logits2.shape == (1, 1, len(vocab))


def test_mle_arpa_kenlm(tmp_path):
    kenlm = pytest.importorskip("kenlm")
    lines = markov_corpus(n_sent=100)
    m, vocab = NGramModel.from_text(lines, order=3, method="mle")
    path = tmp_path / "mle.arpa"
    m.write_arpa(path)
    km = kenlm.Model(str(path))
    for s in lines[:20]:  # training sentences: no zero-probability event
        assert m.score_words(s) == pytest.approx(km.score(s), abs=1e-4)


def test_addk_arpa_is_dense_and_exact(tmp_path):
    kenlm = pytest.importorskip("kenlm")
    lines = ["a b c", "b c a", "c c b a", "a"]
    m, vocab = NGramModel.from_text(lines, order=3, method="addk", k=0.5)
    path = tmp_path / "addk.arpa"
    m.write_arpa(path)
    km = kenlm.Model(str(path))
    for s in lines + ["a a a", "c b", "", "b x a"]:
        assert m.score_words(s) == pytest.approx(km.score(s), abs=1e-5)
    m2, _ = NGramModel.from_arpa(path)
    ids = torch.tensor([[vocab.index("<s>"), vocab.index("a"), vocab.index("c")]])
    assert torch.allclose(m(ids)[0], m2(ids)[0], atol=1e-5)
    with pytest.raises(ValueError, match="max_dense_entries"):
        m.write_arpa(tmp_path / "big.arpa", max_dense_entries=10)


GOOD = LMPLZ_TINY_ARPA


def corrupt(kind):
    lines = GOOD.split("\n")
    if kind == "truncated":
        return "\n".join(lines[:25]) + "\n", 25, "truncated"
    if kind == "no_end":
        return "\n".join(lines[:-3]) + "\n", None, "\\end\\"
    if kind == "bad_float":
        lines[8] = "-0.5x\ta\t0"
        return "\n".join(lines), 9, "not a number"
    if kind == "nan":
        lines[8] = "nan\ta\t0"
        return "\n".join(lines), 9, "NaN"
    if kind == "fields":
        lines[30] = "-0.1\tc a"
        return "\n".join(lines), 31, "fields"
    if kind == "unknown_word":
        lines[16] = "-0.1\ta zebra\t0"
        return "\n".join(lines), 17, "zebra"
    if kind == "duplicate":
        lines[17] = lines[16]
        return "\n".join(lines), 18, "duplicate"
    if kind == "count":
        lines[2] = "ngram 2=13"
        return "\n".join(lines), None, "13"
    if kind == "header":
        return "hello\nworld\n", None, "\\data\\"
    if kind == "bad_ngram_line":
        lines[1] = "ngram one=6"
        return "\n".join(lines), 2, "ngram"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["truncated", "no_end", "bad_float", "nan", "fields", "unknown_word", "duplicate", "count", "header", "bad_ngram_line"]
)
def test_malformed_arpa_names_the_line(tmp_path, kind):
    text, line, fragment = corrupt(kind)
    path = tmp_path / f"{kind}.arpa"
    path.write_text(text)
    with pytest.raises(ArpaFormatError) as e:
        NGramModel.from_arpa(path)
    msg = str(e.value)
    assert str(path) in msg and "line " in msg and fragment in msg
    if line is not None:
        assert f"line {line}:" in msg and e.value.line == line


PRUNED = """\\data\\
ngram 1=5
ngram 2=3
ngram 3=1

\\1-grams:
-1.0\t<unk>\t0
-99\t<s>\t-0.2
-0.7\t</s>\t0
-0.5\ta\t-0.3
-0.6\tb\t-0.1

\\2-grams:
-0.3\t<s> a\t-0.25
{bigram}
-0.2\tb </s>\t0

\\3-grams:
-0.1\ta b a

\\end\\
"""


@pytest.mark.parametrize("missing", ["suffix", "prefix"])
def test_arpa_with_missing_suffix_or_prefix_is_closed(tmp_path, missing):
    # "a b a" needs its suffix "b a" and its prefix "a b"; one of them is missing
    present = "-0.4\ta b\t-0.15" if missing == "suffix" else "-0.4\tb a\t-0.15"
    path = tmp_path / "pruned.arpa"
    path.write_text(PRUNED.format(bigram=present))
    with pytest.warns(UserWarning, match="missing from the file"):
        m, vocab = NGramModel.from_arpa(path)
    ix = {w: i for i, w in enumerate(vocab)}
    lp = lambda ctx, w: m.logprob10(np.array([[ix[c] for c in ctx]]), np.array([ix[w]]))[0]  # noqa: E731
    assert lp(["a", "b"], "a") == pytest.approx(-0.1)  # the trigram is reachable
    if missing == "suffix":
        assert lp(["<s>", "b"], "a") == pytest.approx(-0.1 - 0.5)  # bo(b) + p(a): the added "b a" changes nothing
        assert lp(["a", "b"], "b") == pytest.approx(-0.15 - 0.1 - 0.6)
    else:
        assert lp(["<s>", "a"], "b") == pytest.approx(-0.25 - 0.3 - 0.6)  # added "a b": bo(a) + p(b)
        assert lp(["a", "b"], "b") == pytest.approx(-0.1 - 0.6)


def test_arpa_with_missing_suffixes_scores_like_kenlm(tmp_path):
    # KenLM accepts n-grams whose suffix was pruned (it rejects a missing prefix)
    kenlm = pytest.importorskip("kenlm")
    lines = markov_corpus(n_sent=300)
    m, vocab = quiet_fit(lines, order=3)
    path = tmp_path / "full.arpa"
    m.write_arpa(path)
    text = path.read_text().split("\n")
    drop = [i for i, ln in enumerate(text) if ln.endswith(" </s>\t0") and ln.count(" ") == 1][:3]
    assert len(drop) == 3
    text = [ln for i, ln in enumerate(text) if i not in drop]
    n2 = m.sizes[1]
    text = [f"ngram 2={n2 - 3}" if ln == f"ngram 2={n2}" else ln for ln in text]
    pruned = tmp_path / "pruned.arpa"
    pruned.write_text("\n".join(text))
    with pytest.warns(UserWarning, match="3 n-grams"):
        m2, _ = NGramModel.from_arpa(pruned)
    km = kenlm.Model(str(pruned))
    for s in lines[:40]:
        assert m2.score_words(s) == pytest.approx(km.score(s), abs=1e-4), s


# ---------------------------------------------------------------- discounts and bad input


def test_discount_fallback_warns_and_strict_raises():
    chars = [" ".join("abab")] * 3  # character-level toy data: count-of-counts have holes
    with pytest.warns(DiscountWarning, match="fallback"):
        m, _ = NGramModel.from_text(chars, order=3)
    assert m.config.discounts_used[0] == [0.5, 1.0, 1.5]
    with pytest.raises(ValueError, match="Kneser-Ney.*strict=False"):
        NGramModel.from_text(chars, order=3, strict=True)
    # explicit discounts: no estimation, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m2, _ = NGramModel.from_text(chars, order=2, discounts=[[0.4, 0.8, 1.2], [0.6, 1.0, 1.4]])
    assert m2.config.discounts_used == [[0.4, 0.8, 1.2], [0.6, 1.0, 1.4]]
    with pytest.raises(ValueError, match="D2 of order 1"):
        NGramConfig(vocab_size=5, order=1, discounts=[[0.5, 2.5, 1.0]])


@pytest.mark.parametrize("order", [0, -1, 1.5, True])
def test_order_below_one_raises(order):
    with pytest.raises(ValueError, match="order must be an integer >= 1"):
        NGramConfig(vocab_size=10, order=order)
    with pytest.raises(ValueError, match="order"):
        build_model("ngram", {"vocab_size": 10, "order": order})


def test_bad_config_and_ids():
    with pytest.raises(ValueError, match="unknown n-gram method"):
        NGramConfig(vocab_size=5, method="witten_bell")
    with pytest.raises(ValueError, match="k > 0"):
        NGramConfig(vocab_size=5, method="addk", k=0)
    m, vocab = quiet_fit(TINY, order=2)
    with pytest.raises(ValueError, match="token id 99 is outside"):
        m(torch.tensor([[1, 99]]))
    with pytest.raises(ValueError, match="token id -1 is outside"):
        m.token_logprobs(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match="sequence 1 has token id 50"):
        NGramModel(NGramConfig(vocab_size=6, order=2, bos_id=1, eos_id=2)).fit([[3, 4], [50]])
    with pytest.raises(ValueError, match="already contains <s>"):
        NGramModel(NGramConfig(vocab_size=6, order=2, bos_id=1, eos_id=2)).fit([[1, 3, 4]])
    with pytest.raises(ValueError, match="shape"):
        m(torch.tensor([1, 2, 3]))


def test_oov_words_score_as_unk():
    m, vocab = quiet_fit(TINY + ["a <unk> b"], order=3)
    assert m.score_words("a zebra b") == m.score_words("a <unk> b")
    assert m.encode("a zebra").tolist() == [vocab.index("a"), vocab.index("<unk>")]
    no_unk, v2 = quiet_fit(TINY, order=2, vocab=["<s>", "</s>", "a", "b", "c"])
    assert no_unk.config.unk_id is None
    with pytest.raises(ValueError, match="'zebra' is not in the vocabulary and the model has no <unk>"):
        no_unk.score_words("a zebra")


def test_unseen_unk_is_a_zeroton_like_lmplz():
    # an <unk> that never occurs gets the uniform interpolation mass: gamma / V'
    lines = markov_corpus(n_sent=200)
    m, vocab = NGramModel.from_text(lines, order=2)
    p, _ = reference_kn(lines, 2)
    assert 10 ** float(m.prob_1[vocab.index("<unk>")]) == pytest.approx(p("<unk>", ()), rel=1e-6)
    assert 10 ** float(m.prob_1[vocab.index("w1")]) == pytest.approx(p("w1", ()), rel=1e-6)
    # dropping <unk> tokens (lmplz --skip_symbols) gives the same model as data without them
    m_drop, _ = NGramModel.from_text([s + " <unk>" for s in lines], order=2, drop_unk=True, vocab=vocab)
    assert torch.equal(m_drop.prob_2, m.prob_2) and torch.equal(m_drop.prob_1, m.prob_1)


def test_empty_inputs():
    with pytest.raises(ValueError, match="no sequences"):
        NGramModel(NGramConfig(vocab_size=5, order=2, bos_id=1, eos_id=2)).fit([])
    with pytest.raises(ValueError, match="no tokens"):
        NGramModel(NGramConfig(vocab_size=5, order=2)).fit([[], []], add_bos_eos=False)
    m, vocab = quiet_fit(["", "a", ""], order=3)  # empty lines are "<s> </s>", as for lmplz
    assert m.score_words("") == pytest.approx(m.logprob10(np.array([[-1, 1]]), np.array([2]))[0])  # p(</s> | <s>)
    assert m.score_words("", bos=False, eos=False) == 0.0
    assert m.score_sequences([]).shape == (0,)


def test_stream_mode_without_boundaries():
    # one stream of ids, no <s>/</s>: n-grams run across the whole stream
    ids = np.array([0, 1, 2, 0, 1, 2, 0, 1, 3, 0, 1, 2])
    m = NGramModel(NGramConfig(vocab_size=4, order=2, method="mle")).fit(ids, add_bos_eos=False)
    assert m.logprob10(np.array([[1]]), np.array([2]))[0] == pytest.approx(math.log10(3 / 4))
    assert m.logprob10(np.array([[-1]]), np.array([0]))[0] == pytest.approx(math.log10(4 / 12))
    lg, st = m(torch.tensor([[0, 1]]))
    assert st.tensors["context"].tolist() == [[1]] and torch.isfinite(lg[0, 0, 1])


# ---------------------------------------------------------------- scale: data structures, file formats, whitespace

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lmlab import arpa as arpa_mod  # noqa: E402
from lmlab import tokenizers  # noqa: E402
from lmlab.arpa import KENLM_BINARY_MAGIC  # noqa: E402
from lmlab.tokenizers import ASCII_WHITESPACE, split_words  # noqa: E402
from lmlab import ngram as ngram_mod  # noqa: E402


def buffers_equal(a, b):
    return all(torch.equal(x, y) for (_, x), (_, y) in zip(a.named_buffers(), b.named_buffers()))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=300))
def test_unique_inverse_counts_equals_np_unique(values):
    q = np.array(values, dtype=np.int64)
    uniq, inv, cnt = ngram_mod._unique_inverse_counts(q)
    u2, i2, c2 = np.unique(q, return_inverse=True, return_counts=True)
    assert np.array_equal(uniq, u2) and np.array_equal(inv, i2) and np.array_equal(cnt, c2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**50), max_size=400, unique=True), st.lists(st.integers(0, 2**50), max_size=200))
def test_hash_index_finds_exactly_the_keys(keys, queries):
    keys = np.array(sorted(keys), dtype=np.int64)
    q = np.array(queries + keys[::3].tolist(), dtype=np.int64)
    found = ngram_mod._HashIndex(keys).find(q)
    pos = np.searchsorted(keys, q)
    present = (pos < keys.size) & (keys[np.minimum(pos, max(keys.size - 1, 0))] == q) if keys.size else np.zeros(q.size, bool)
    assert np.array_equal(found, np.where(present, pos, -1))


def test_counts_equal_a_plain_reference():
    # <s> inside a sequence (add_bos_eos=False) starts a new sentence; counts, left-less counts and prefixes exact
    seqs = [[1, 3, 4, 3, 4, 5, 2], [1, 4, 4, 2, 1, 3, 2], [3, 3, 3]]
    tok, seg = ngram_mod._flatten(seqs, 6, 1, 2, False, None)
    N = 4
    C = ngram_mod._count(tok, seg, N, 6, 1)
    runs = []
    for s in seqs:
        cur = []
        for t in s:
            if t == 1 and cur:
                runs.append(cur)
                cur = []
            cur.append(t)
        runs.append(cur)
    raw, nonext = [Counter() for _ in range(N + 1)], [Counter() for _ in range(N + 1)]
    for r in runs:
        for j, t in enumerate(r):
            if t == 1:
                continue
            for k in range(1, min(N, j + 1) + 1):
                g = tuple(r[j - k + 1:j + 1])
                raw[k][g] += 1
                nonext[k][g] += j - k + 1 == 0
    words_of = {1: {w: (w,) for w in range(6)}}  # node -> word tuple, per order
    for k in range(2, N + 1):
        words_of[k] = {}
        for i, key in enumerate(C.keys[k - 1].tolist()):
            node, first = divmod(key, 6)  # key = node(suffix) * V + first word
            words_of[k][i] = (first,) + words_of[k - 1][node]
        got = {g: (int(C.raw[k - 1][i]), int(C.nonext[k - 1][i])) for i, g in words_of[k].items()}
        assert got == {g: (raw[k][g], nonext[k][g]) for g in raw[k]}
        for i, g in words_of[k].items():  # the prefix node is the (k-1)-gram without the last word
            assert words_of[k - 1][int(C.prefix[k - 1][i])] == g[:-1]
    assert C.raw[0].tolist() == [raw[1][(w,)] for w in range(6)]
    assert C.nonext[0].tolist() == [nonext[1][(w,)] for w in range(6)]


def test_from_text_streams_a_file_with_the_same_result(tmp_path):
    lines = markov_corpus(n_sent=200) + ["", "w1 <unk> w2"]
    path = tmp_path / "train.txt"
    path.write_text("\n".join(lines) + "\n")
    m1, v1 = quiet_fit(lines, order=4)
    with open(path) as f:
        m2, v2 = quiet_fit(f, order=4)
    assert v1 == v2 and buffers_equal(m1, m2)
    m3 = NGramModel(m1.config.__class__(**{**m1.config.__dict__, "sizes": None, "discounts_used": None}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiscountWarning)
        m3.fit([m1.encode(s) for s in lines])
    assert buffers_equal(m1, m3)


def test_arpa_sections_build_the_same_tables_as_the_closing_path(tmp_path):
    m, vocab = quiet_fit(markov_corpus(n_sent=300), order=4)
    path = tmp_path / "m.arpa"
    m.write_arpa(path)
    loaded, _ = NGramModel.from_arpa(path)  # order by order, as the file is parsed
    cfg = loaded.config
    ref = NGramModel(NGramConfig(**{**cfg.__dict__, "sizes": None}))
    ref._set_tables(*ngram_mod._tables_from_arpa(read_arpa(path), cfg, path))
    assert buffers_equal(loaded, ref)


IRREGULAR = """junk before the header

\\data\\
ngram 1=6
ngram 2=4

\\1-grams:
-1.0\t<unk>
-99\t<s>\t-0.30103
-0.7  </s>   0
-5E-01\ta\t+1.5e-1\r
-0.6\tb\t-0
-1.25e+00\tc d

\\2-grams:
-0.3\t<s> a
-0.2\ta\tb
-0.1 b </s>
-0.0625\tc d a

\\end\\
"""


def test_vectorized_parser_equals_the_line_parser(tmp_path, monkeypatch):
    path = tmp_path / "irregular.arpa"
    path.write_bytes(IRREGULAR.replace("c d a", "c\u00a0d a").replace("c d\n", "c\u00a0d\n").encode())
    fast = read_arpa(path)
    assert fast.vocab[-1] == "c\u00a0d" and fast.backoffs[0][3] == pytest.approx(0.15)
    monkeypatch.setattr(arpa_mod, "_parse_block_fast", lambda *a: None)
    slow = read_arpa(path)
    assert fast.vocab == slow.vocab
    for k in range(2):
        for a, b in [(fast.ngrams, slow.ngrams), (fast.probs, slow.probs), (fast.backoffs, slow.backoffs), (fast.lines, slow.lines)]:
            assert np.array_equal(a[k], b[k])


def test_vectorized_parser_on_a_real_model(tmp_path, monkeypatch):
    m, vocab = quiet_fit(markov_corpus(n_sent=300), order=3)
    path = tmp_path / "m.arpa"
    m.write_arpa(path)
    monkeypatch.setattr(arpa_mod, "_BLOCK_BYTES", 4096)  # many blocks, lines cut across reads
    fast, _ = NGramModel.from_arpa(path)
    monkeypatch.setattr(arpa_mod, "_parse_block_fast", lambda *a: None)
    slow, _ = NGramModel.from_arpa(path)
    assert buffers_equal(fast, slow) and buffers_equal(fast, NGramModel.from_arpa(path)[0])


@pytest.mark.parametrize("fmt", ["gzip", "bz2", "xz"])
def test_compressed_arpa_is_read(tmp_path, fmt):
    import bz2
    import gzip
    import lzma

    opener = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}[fmt]
    path = tmp_path / "m.arpa.any"  # detected by content, not by name
    with opener(path, "wt") as f:
        f.write(GOOD)
    plain = tmp_path / "m.arpa"
    plain.write_text(GOOD)
    m, v = NGramModel.from_arpa(path)
    m2, v2 = NGramModel.from_arpa(plain)
    assert v == v2 and buffers_equal(m, m2)
    if fmt == "gzip":
        kenlm = pytest.importorskip("kenlm")
        km = kenlm.Model(str(path))  # KenLM reads gzip too
        assert m.score_words("a b c") == pytest.approx(km.score("a b c"), abs=1e-5)
    truncated = tmp_path / "cut.arpa.gz"
    truncated.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ArpaFormatError, match="cut.arpa.gz"):
        NGramModel.from_arpa(truncated)


def test_positive_log_probability_is_an_error_naming_the_line(tmp_path):
    lines = GOOD.split("\n")
    assert lines[16].startswith("-")
    lines[16] = "0.25" + lines[16][lines[16].index("\t"):]
    path = tmp_path / "pos.arpa"
    path.write_text("\n".join(lines))
    with pytest.raises(ArpaFormatError, match="line 17: log10 probability 0.25 is positive") as e:
        NGramModel.from_arpa(path)
    assert e.value.line == 17
    lines[16] = "0" + lines[16][lines[16].index("\t"):]  # log10 p = 0 (p = 1) is allowed, as a positive backoff is
    lines[8] = lines[8].rsplit("\t", 1)[0] + "\t0.5"
    path.write_text("\n".join(lines))
    NGramModel.from_arpa(path)
    kenlm = pytest.importorskip("kenlm")
    lines[16] = "0.25" + lines[16][lines[16].index("\t"):]
    path.write_text("\n".join(lines))
    with pytest.raises(Exception, match="Positive log probability"):
        kenlm.Model(str(path))


def test_kenlm_binary_file_gets_an_error_saying_what_it_is(tmp_path):
    # lm/binary_format.cc: every KenLM binary starts with "mmap lm http://kheafield.com/code format version 5\n\0"
    path = tmp_path / "model.binary"
    path.write_bytes(KENLM_BINARY_MAGIC + b" format version 5\n\0" + bytes(range(256)) * 4)
    with pytest.raises(ArpaFormatError, match="KenLM binary model.*build_binary.*ARPA") as e:
        NGramModel.from_arpa(path)
    assert str(path) in str(e.value)
    with pytest.raises(ArpaFormatError, match="KenLM binary model"):
        read_arpa(path)


def test_split_words_is_ascii_whitespace_only():
    import sys

    other = {chr(i) for i in range(sys.maxunicode + 1) if chr(i).isspace()} - set(ASCII_WHITESPACE)
    assert other == {c for c in map(chr, range(sys.maxunicode + 1)) if tokenizers._OTHER_SPACE.match(c)}
    for c in other:
        assert split_words(f" a{c}b \t c\n") == [f"a{c}b", "c"]
    assert split_words("a\x0bb\x0cc\rd") == ["a", "b", "c", "d"] == "a\x0bb\x0cc\rd".encode().decode().split()


def test_nbsp_word_scores_like_kenlm(tmp_path):
    word = "a\u00a0b"
    lines = TINY + [f"{word} c a", f"b {word}"]
    m, vocab = quiet_fit(lines, order=3)
    assert word in vocab and m.encode(f"{word} c").tolist() == [vocab.index(word), vocab.index("c")]
    path = tmp_path / "nbsp.arpa"
    m.write_arpa(path)
    m2, v2 = NGramModel.from_arpa(path)
    assert v2 == vocab and buffers_equal(m, m2)
    kenlm = pytest.importorskip("kenlm")
    km = kenlm.Model(str(path))
    for s in [f"{word} c a", f"b {word}", "a b", f"a {word}\u00a0b"]:
        assert m2.score_words(s) == pytest.approx(km.score(s), abs=1e-5), s
    assert m2.score_words(f"{word} c") != pytest.approx(m2.score_words("a b c"), abs=1e-3)


# ---------------------------------------------------------------- numpy only, storage layout, writing


def test_ngram_lm_builds_reads_writes_and_scores_without_torch(tmp_path):
    """lmlab.ngram never imports torch, and its scores are NGramModel's exactly."""
    import json
    import subprocess
    import sys

    lines = markov_corpus(n_sent=200)
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    code = f"""
import json, sys, warnings
from lmlab.ngram import NGramLM
warnings.simplefilter("ignore")
with open({str(tmp_path / 'train.txt')!r}) as f:
    m, vocab = NGramLM.from_text(f, order=4)
m.write_arpa({str(tmp_path / 'm.arpa')!r})
back, _ = NGramLM.from_arpa({str(tmp_path / 'm.arpa')!r})
ids = [m.encode(s) for s in {lines[:20]!r}]
print(json.dumps([m.score_sequences(ids).tolist(), back.score_sequences(ids).tolist(), "torch" in sys.modules]))
"""
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(ngram_mod.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    built, read, imported_torch = json.loads(done.stdout)
    assert not imported_torch
    model, _ = quiet_fit(lines, order=4)
    ids = [model.encode(s) for s in lines[:20]]
    assert built == model.score_sequences(ids).tolist() == read


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**50), max_size=400, unique=True), st.lists(st.integers(0, 2**50), max_size=200))
def test_hash_index_on_keys_stored_bucket_after_bucket(keys, queries):
    keys = np.array(keys, dtype=np.int64)
    perm = ngram_mod._bucket_order(keys, ngram_mod._bucket_of(keys, max(1, keys.size)))
    if perm is not None:
        keys = keys[perm]
    index = ngram_mod._HashIndex(keys)
    assert index.rows is None  # the row of a key is its position: no row array
    q = np.array(queries + keys[::3].tolist(), dtype=np.int64)
    where = {int(k): i for i, k in enumerate(keys)}
    assert index.find(q).tolist() == [where.get(int(x), -1) for x in q]


def _key_sorted(model):
    """The model's tables with every order sorted by key (the layout of models saved
    before tables were stored bucket after bucket), node ids renumbered to match."""
    T, V = model._tables(), model.config.vocab_size
    keys, prob, bo = list(T.keys), list(T.prob), list(T.bo)
    for k in range(2, model.order + 1):
        perm = np.argsort(keys[k - 1], kind="stable")
        keys[k - 1], prob[k - 1], bo[k - 1] = keys[k - 1][perm], prob[k - 1][perm], bo[k - 1][perm]
        if k < model.order:
            new_row = np.empty(perm.size, dtype=np.int64)
            new_row[perm] = np.arange(perm.size)
            keys[k] = new_row[keys[k] // V] * V + keys[k] % V
    return keys, prob, bo


def test_tables_in_any_order_score_the_same():
    model, vocab = quiet_fit(markov_corpus(n_sent=300), order=4)
    T = model._tables()
    assert all(T.index(k).rows is None for k in range(2, 5))  # fit stores them bucket after bucket
    keys, prob, bo = _key_sorted(model)
    old = NGramModel(NGramConfig(**{**model.config.__dict__}))
    state = {"prob_1": prob[0], "backoff_1": bo[0]}
    for k in range(2, 5):
        state.update({f"keys_{k}": keys[k - 1], f"prob_{k}": prob[k - 1], f"backoff_{k}": bo[k - 1]})
    old.load_state_dict({name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in state.items()})
    assert old._tables().index(3).rows is not None  # a key-sorted table is indexed through its rows
    ids = [model.encode(s) for s in markov_corpus(n_sent=40, seed=3)]
    assert np.array_equal(old.score_sequences(ids), model.score_sequences(ids))
    x = torch.tensor(np.concatenate(ids[:3])[None, :60])
    assert torch.equal(old.token_logprobs(x), model.token_logprobs(x))
    assert torch.equal(old(x)[0], model(x)[0])


NUMBER_TEXTS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64).flatmap(
        lambda v: st.sampled_from([repr(v), f"{v:.9g}", f"{v:.7f}", f"{v:e}", f"{v:.17g}", f"{v:.3f}"])),
    st.integers(-(10**20), 10**20).map(str),
    st.from_regex(r"-?[0-9]{0,12}\.[0-9]{0,24}", fullmatch=True),
    st.sampled_from(["-0", "-0.0", ".5", "-.5", "5.", "-99", "1e-5", "-1.5E+3", "inf", "-inf", "nan", "-", ".", "1.2.3",
                     "--1", "+1", "1-", "0x10", "١"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(NUMBER_TEXTS, min_size=1, max_size=30))
def test_vectorized_number_parser_equals_float(texts):
    blk = " ".join(texts).encode()
    x = np.frombuffer(blk, dtype=np.uint8)
    lengths = np.array([len(t.encode()) for t in texts])
    starts = np.cumsum(lengths + 1) - lengths - 1
    try:
        expected = np.array([float(t.encode()) for t in texts])  # what the line-by-line parser reads
    except ValueError:
        expected = None
    got = arpa_mod._parse_numbers(x, starts, starts + lengths)
    if expected is None:
        assert got is None
    else:  # bit for bit (the sign of zero too); NaN where float() gives NaN
        nan = np.isnan(expected)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(got[~nan].view(np.int64), expected[~nan].view(np.int64))


def test_write_arpa_streams_blocks_and_replaces_the_file_whole(tmp_path, monkeypatch):
    model, vocab = quiet_fit(markov_corpus(n_sent=150), order=3)
    whole, blocks = tmp_path / "whole.arpa", tmp_path / "blocks.arpa"
    model.write_arpa(whole)
    monkeypatch.setattr(arpa_mod, "_WRITE_ROWS", 7)  # many blocks per section
    model.write_arpa(blocks)
    assert blocks.read_bytes() == whole.read_bytes()
    calls = []

    def fail_on_the_third_block(values):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return arpa_mod._format_values.__wrapped__(values)

    fail_on_the_third_block.__wrapped__ = arpa_mod._format_values
    monkeypatch.setattr(arpa_mod, "_format_values", fail_on_the_third_block)
    with pytest.raises(OSError, match="disk full"):
        model.write_arpa(blocks)
    assert blocks.read_bytes() == whole.read_bytes()  # the old file, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocks.arpa", "whole.arpa"]  # no temporary left
