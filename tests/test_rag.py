"""Retrieval-augmented generation: retrievers, RAG-token as an lmlab model, exact RAG-sequence."""

import json
import math

import numpy as np
import pytest
import torch

from lmlab.decode import run_setup
from lmlab.models import build_model
from lmlab.rag import (
    BM25Retriever,
    DenseRetriever,
    Document,
    RAGState,
    RAGTokenModel,
    Retriever,
    bm25_words,
    continuation_logprobs,
    document_prefix,
    load_collection,
    rag_sequence_generate,
    rag_sequence_scores,
)
from lmlab.tokenizers import CharTokenizer

DOCS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the sun is hot today",
    "fish swim in the deep sea",
]


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.train(" ".join(DOCS) + "\n?.")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = build_model("transformer", dict(vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=32))
    return m.eval()


class FixedRetriever(Retriever):
    """Scores from a table: query text -> one score per document."""

    def __init__(self, documents, table):
        self.documents = load_collection(documents)
        self.table = table

    def scores(self, queries):
        return np.array([self.table[q] for q in queries], dtype=np.float64)


# ---------------------------------------------------------------- collections and retrievers


def test_load_collection_sources(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second doc")
    (tmp_path / "docs" / "a.txt").write_text("first doc\n")
    (tmp_path / "docs" / "blank.txt").write_text("  \n")
    assert [(d.id, d.text) for d in load_collection(tmp_path / "docs")] == [("a.txt", "first doc"), ("b.txt", "second doc")]
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"id": "x", "text": "hello", "title": "T"}) + "\n\n" + json.dumps({"text": "world"}) + "\n")
    assert load_collection(jl) == [Document("x", "hello", "T"), Document("2", "world")]
    para = tmp_path / "p.txt"
    para.write_text("one\ntwo\n\n\nthree\n")
    assert [d.text for d in load_collection(para)] == ["one\ntwo", "three"]
    assert [d.id for d in load_collection(["a", "b"])] == ["0", "1"]


def test_empty_collection_and_bad_k_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no documents"):
        load_collection(tmp_path / "empty")
    with pytest.raises(ValueError, match="has no documents"):
        BM25Retriever([])
    with pytest.raises(ValueError, match="has no documents"):
        BM25Retriever(["", "  "])
    with pytest.raises(FileNotFoundError, match="no collection"):
        load_collection(tmp_path / "missing")
    r = BM25Retriever(DOCS)
    with pytest.raises(ValueError, match=r"k=5 is larger than the collection \(4 documents\); accepted: 1 <= k <= 4"):
        r.search("cat", k=5)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        r.search("cat", k=0)
    with pytest.raises(ValueError, match="temperature must be"):
        r.search("cat", k=2, temperature=0)


def _bm25_reference(docs, query, k1=1.5, b=0.75):
    words = [bm25_words(d) for d in docs]
    N, avgdl = len(docs), sum(map(len, words)) / len(docs)
    out = []
    for w in words:
        s = 0.0
        for q in bm25_words(query):
            n = sum(q in ws for ws in words)
            f = w.count(q)
            if n == 0:
                continue
            idf = math.log(1 + (N - n + 0.5) / (n + 0.5))
            s += idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len(w) / avgdl))
        out.append(s)
    return out


def test_bm25_matches_the_formula_and_probabilities_sum_to_one():
    r = BM25Retriever(DOCS)
    queries = ["The cat and the mat", "deep sea fish fish", "nothing known here zzz"]
    got = r.scores(queries)
    for q, row in zip(queries, got):
        assert row == pytest.approx(_bm25_reference(DOCS, q), abs=1e-12)
    hits = r.search(queries, k=3, temperature=0.5)
    assert hits.indices[0, 0] == 0 and hits.indices[1, 0] == 3
    assert np.allclose(hits.probs.sum(1), 1.0)
    # no known word: all scores tie, collection order, uniform prior
    assert hits.indices[2].tolist() == [0, 1, 2] and np.allclose(hits.probs[2], 1 / 3)
    top = hits.scores[:, 0:1]
    assert np.allclose(hits.probs, np.exp((hits.scores - top) / 0.5) / np.exp((hits.scores - top) / 0.5).sum(1, keepdims=True))


# ---------------------------------------------------------------- RAG-token


def test_rag_token_mixture_sums_to_one_and_k1_equals_conditioned_model(model, tok):
    r = BM25Retriever(DOCS)
    rag = RAGTokenModel(model, tok, r, k=1)
    query = "dog ran"
    ids = torch.tensor([tok.encode(query)])
    logits, state = rag(ids)
    assert torch.allclose(logits.exp().sum(-1), torch.ones(1, ids.shape[1]), atol=1e-5)
    prefix = document_prefix(tok, DOCS[1], "{doc}\n\n", rag.max_doc_tokens)
    plain, pstate = model(torch.tensor([prefix + tok.encode(query)]))
    expect = torch.log_softmax(plain[:, len(prefix):], -1)
    assert torch.allclose(logits, expect, atol=1e-5)
    # continuing the state = continuing the conditioned model
    nxt = torch.tensor([tok.encode(" in")])
    more, _ = rag(nxt, state)
    plain_more, _ = model(nxt, pstate)
    assert torch.allclose(more, torch.log_softmax(plain_more, -1), atol=1e-5)
    # greedy decoding through the wrapper = greedy decoding of the conditioned prompt
    a = run_setup(rag, tok, [query], "greedy", 8)[0][0]
    b = run_setup(model, tok, [prefix + tok.encode(query)], "greedy", 8)[0][0]
    assert a.token_ids == b.token_ids


def test_rag_token_is_the_prior_weighted_mixture(model, tok):
    docs = ["aaaa cat", "bbbb dog", "cc fish"]  # first two: equal length, no filler
    r = FixedRetriever(docs, {"cat": [2.0, 1.0, -5.0], "sun": [0.0, 0.5, 3.0]})
    rag = RAGTokenModel(model, tok, r, k=2, temperature=0.7)
    ids = torch.tensor([tok.encode("cat"), tok.encode("sun")])
    logits, state = rag(ids)
    assert isinstance(state, RAGState) and state.tensors["log_prior"].shape == (2, 2) and state.length == 3
    assert torch.allclose(logits.exp().sum(-1), torch.ones(2, 3), atol=1e-5)
    hits = r.search(["cat", "sun"], 2, 0.7)
    for b in range(2):
        mix = 0
        prefixes = [rag.prefix_ids(int(i)) for i in hits.indices[b]]
        P = max(len(p) for p in prefixes)
        for j, p in enumerate(prefixes):
            row = rag.padded(p, P) + ids[b].tolist()
            lp = torch.log_softmax(model(torch.tensor([row]))[0][0, P:], -1)
            mix = mix + hits.probs[b, j] * lp.exp()
        assert torch.allclose(logits[b].exp(), mix, atol=1e-5)


def test_rag_token_padding_of_unequal_documents(model, tok):
    r = FixedRetriever(["at", "atone"], {"cat": [1.0, 0.0]})
    rep = RAGTokenModel(model, tok, r, k=2, template="{doc}.")
    fil = RAGTokenModel(model, tok, r, k=2, template="{doc}.", pad="filler")
    p = rep.prefix_ids(0)  # "at."
    assert tok.decode(rep.padded(p, 6)) == "at.at." and tok.decode(rep.padded(p, 5)) == "t.at."
    assert fil.padded(p, 5) == [fil.filler_id] * 2 + p and rep.padded(p, 3) == p
    with pytest.raises(ValueError, match="accepted: 'repeat'"):
        RAGTokenModel(model, tok, r, k=2, pad="zeros")


def test_rag_token_state_select_reindexes_queries_with_their_documents(model, tok):
    r = BM25Retriever(DOCS)
    rag = RAGTokenModel(model, tok, r, k=2)
    ids = torch.tensor([tok.encode("the cat"), tok.encode("sea fis")])
    _, state = rag(ids)
    nxt = torch.tensor([tok.encode("s"), tok.encode("k")])
    swapped = state.clone().select(torch.tensor([1, 0]))
    a, _ = rag(nxt.flip(0), swapped)
    b, _ = rag(nxt, state.clone())
    assert torch.allclose(a, b.flip(0), atol=1e-5)
    dup = state.clone().select(torch.tensor([0, 0, 0]))
    c, _ = rag(nxt[:1].repeat(3, 1), dup)
    assert torch.allclose(c, b[:1].repeat(3, 1, 1), atol=1e-5)


def test_decoders_run_on_rag_token(model, tok):
    rag = RAGTokenModel(model, tok, BM25Retriever(DOCS), k=3)
    beams = run_setup(rag, tok, ["the cat", "dog"], "beam 3", 6, num_return_sequences=2)
    assert [len(b) for b in beams] == [2, 2]
    with rag.retrieving_for(["the cat", "dog"]) as hits:
        samples = run_setup(rag, tok, ["the cat", "dog"], "top-k 5", 6, seed=0, num_return_sequences=2)
    assert hits.indices[0, 0] == 0 and len(samples[1]) == 2
    assert rag.max_context == 96 - rag.max_doc_tokens


def test_rag_token_decoding_calls_the_wrapped_model_once_per_step(model, tok):
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    try:
        rag = RAGTokenModel(model, tok, BM25Retriever(DOCS), k=4)
        run_setup(rag, tok, ["the cat", "a dog r"], "greedy", 6)
    finally:
        handle.remove()
    assert len(calls) == 6 and all(s[0] == 8 for s in calls)  # B*k rows; the prompt, then one call per new token


# ---------------------------------------------------------------- RAG-sequence


def test_rag_sequence_scores_equal_the_exact_sum(model, tok):
    r = BM25Retriever(DOCS)
    queries, cands = ["cat on", "deep sea"], [["the mat", "x"], ["fish"]]
    got = rag_sequence_scores(model, tok, r, queries, cands, k=3, temperature=2.0, add_eos=True)
    hits = r.search(queries, 3, 2.0)
    for q, query in enumerate(queries):
        for c, cand in enumerate(cands[q]):
            total = 0.0
            for j, d in enumerate(hits.indices[q]):
                prefix = document_prefix(tok, DOCS[d], "{doc}\n\n", 48)
                row = prefix + tok.encode(query) + tok.encode(cand) + [tok.eos_id]
                with torch.no_grad():
                    lp = torch.log_softmax(model(torch.tensor([row[:-1]]))[0][0], -1)
                start = len(prefix) + len(tok.encode(query))
                y = sum(float(lp[t - 1, row[t]]) for t in range(start, len(row)))
                total += hits.probs[q, j] * math.exp(y)
                assert got[q][c].doc_logprobs[j] == pytest.approx(y, abs=1e-4)
            assert got[q][c].logprob == pytest.approx(math.log(total), abs=1e-4)
            assert sum(got[q][c].posterior) == pytest.approx(1.0)


def test_rag_sequence_k1_equals_plain_conditioned_score(model, tok):
    r = BM25Retriever(DOCS)
    s = rag_sequence_scores(model, tok, r, ["hot today"], [["ok"]], k=1)[0][0]
    prefix = document_prefix(tok, DOCS[2], "{doc}\n\n", 48)
    plain = continuation_logprobs(model, [prefix + tok.encode("hot today")], [tok.encode("ok")])[0]
    assert s.logprob == pytest.approx(plain, abs=1e-6) and s.log_prior == [0.0]


def test_rag_sequence_generate_ranks_candidates(model, tok):
    out = rag_sequence_generate(model, tok, BM25Retriever(DOCS), "the cat", "beam 2", 4, k=2, num_return_sequences=2)
    assert 1 <= len(out) <= 4
    assert [o.logprob for o in out] == sorted((o.logprob for o in out), reverse=True)


# ---------------------------------------------------------------- dense retrieval


def _tiny_sentence_model(path):
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w for d in DOCS for w in bm25_words(d)})
    (path).mkdir()
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokz = transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    tokz.save_pretrained(str(path))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64)
    transformers.BertModel(cfg).eval().save_pretrained(str(path))
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16, "pooling_mode_mean_tokens": True}))
    return transformers, tokz


def test_dense_retriever_mean_pools_and_normalizes(tmp_path):
    transformers, tokz = _tiny_sentence_model(tmp_path / "st")
    r = DenseRetriever(DOCS, tmp_path / "st", use_sentence_transformers=False)
    assert r.encoder.pooling == ["mean"] and r.encoder.normalize
    bert = transformers.BertModel.from_pretrained(str(tmp_path / "st")).eval()
    enc = tokz(["the cat sat on the mat", "sun"], padding=True, return_tensors="pt")
    with torch.no_grad():
        h = bert(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    expect = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    assert np.allclose(r.encoder.encode(["the cat sat on the mat", "sun"]), expect, atol=1e-5)
    assert np.allclose(r.scores([DOCS[0]])[0, 0], 1.0, atol=1e-5)  # a document is its own nearest neighbour
    s = r.scores(DOCS)
    assert np.allclose(s.diagonal(), s.max(1), atol=1e-6)  # (a random encoder: near-ties elsewhere)
    hits = r.search([DOCS[2], DOCS[3]], k=2, temperature=0.05)
    assert np.allclose(hits.scores, np.sort(s[[2, 3]], 1)[:, ::-1][:, :2]) and np.allclose(hits.probs.sum(1), 1.0)


def test_dense_retriever_refuses_an_encoder_with_remote_code(tmp_path):
    _tiny_sentence_model(tmp_path / "st")
    (tmp_path / "st" / "tokenizer_config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "st" / "tokenizer_config.json").read_text()), "auto_map": {"AutoTokenizer": ["x.T", None]}}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json has an auto_map"):
        DenseRetriever(DOCS, tmp_path / "st", use_sentence_transformers=False)
