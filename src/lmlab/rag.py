"""Retrieval-augmented generation: retrievers and the marginal likelihood over retrieved documents.

    docs = load_collection("speeches.jsonl")                  # or a folder of .txt files, or a list of strings
    retriever = BM25Retriever(docs)                            # or DenseRetriever(docs, "path/to/sentence-model")
    hits = retriever.search(["where is Romeo"], k=4, temperature=1.0)
    hits.probs                                                 # (1, 4) P(D | x), rows sum to one

    rag = RAGTokenModel(model, tokenizer, retriever, k=4)      # itself an lmlab model
    logits, state = rag(query_ids)                             # log of the P(D | x)-weighted mixture
    run_setup(rag, tokenizer, ["where is Romeo"], "greedy", 20)  # any decoder works on it unchanged

    scores = rag_sequence_scores(model, tokenizer, retriever, ["where is Romeo"], [["Verona", "Mantua"]], k=4)

Retrieval
---------
A collection is a list of :class:`Document` (id, text, title). ``retriever.scores(queries)``
gives a (B, N) score of every query against every document; ``search`` keeps the
top k (ties broken by collection order) and turns their scores into
``P(D | x) = softmax(score / temperature)`` over those k. The temperature sets how
peaked the prior is (BM25 scores are in the units of a few nats; cosine
similarities are in [-1, 1], so dense retrieval wants temperatures around 0.05).

- :class:`BM25Retriever`: Okapi BM25 written with numpy. Words are ``\\w+`` runs of
  the lower-cased text. With ``f(t, D)`` the count of term t in D, ``|D|`` its
  length in words, ``avgdl`` the mean length, ``N`` the collection size and
  ``n(t)`` the number of documents containing t::

      score(D, Q) = sum over query words t of
                    IDF(t) * f(t, D) (k1 + 1) / (f(t, D) + k1 (1 - b + b |D| / avgdl))
      IDF(t) = ln(1 + (N - n(t) + 0.5) / (n(t) + 0.5))           (never negative)

  with k1 = 1.5, b = 0.75. A word repeated in the query counts once per occurrence;
  a word absent from the collection adds nothing.
- :class:`DenseRetriever`: a sentence-embedding model from a local directory (the
  sentence-transformers layout: a Hugging Face encoder plus ``modules.json`` and
  ``1_Pooling/config.json``). Texts are embedded with the directory's pooling
  (mean, CLS, max, mean-sqrt-len or last token) and normalisation; the score is the
  dot product of the embeddings (the cosine similarity when the model normalises).
  ``sentence_transformers`` is used when installed, ``transformers`` otherwise.

Generation
----------
Each retrieved document D becomes a prefix ``template.format(doc=D.text)`` (default
``"{doc}\\n\\n"``), at most ``max_doc_tokens`` tokens (the document is cut, the
template's own text kept), placed before the query's tokens.

- RAG-sequence: ``P(y | x) = sum_D P(D | x) P(y | D, x)``. :func:`rag_sequence_scores`
  scores candidates exactly under every retrieved document (one right-padded,
  teacher-forced forward pass per (document, candidate) row);
  :func:`rag_sequence_generate` proposes candidates by decoding under each document
  and ranks their union by that exact mixture.
- RAG-token: ``P(y_t | x, y_<t) = sum_D P(D | x) P(y_t | D, x, y_<t)``.
  :class:`RAGTokenModel` is an lmlab model whose logits are the log of that mixture,
  so scoring, greedy, sampling and beam search work on it unchanged. It keeps the k
  per-document states of the wrapped model for the B queries as one B*k-row state and
  advances all of them in one call of the wrapped model per step.

The rows of one lmlab state share one length, so the k document prefixes of a batch
are left-padded to the longest. ``pad="repeat"`` (the default) pads a row with the end
of its own prefix repeated (the row reads "...nt.\\n\\nDocument.\\n\\nquery": in-distribution
text, the same document again); ``pad="filler"`` pads with ``filler_id`` (default: the
tokenizer's id for ``"\\n"``). A batch whose prefixes have equal lengths (one query with
k = 1, or documents cut to the same ``max_doc_tokens``) has no padding, and then
RAG-token is exactly the mixture of the wrapped model conditioned on each document;
padding is a change of context for models that read that far back (not for an n-gram
model of order n when every document has at least n-1 tokens). RAG-sequence scores are
always exact (no left padding: right padding never changes a causal model's outputs).
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from lmlab.data import read_jsonl, read_text
from lmlab.untrusted import refuse_pickled_weights, refuse_remote_code
from lmlab.models.base import LanguageModel, State

__all__ = [
    "Document",
    "load_collection",
    "Retrieval",
    "Retriever",
    "BM25Retriever",
    "DenseRetriever",
    "SentenceEncoder",
    "bm25_words",
    "document_prefix",
    "RAGState",
    "RAGTokenModel",
    "SequenceScore",
    "continuation_logprobs",
    "rag_sequence_scores",
    "rag_sequence_generate",
]


# ================================================================ collections


@dataclass(frozen=True)
class Document:
    """One retrievable document: ``id`` (unique within a collection), ``text``, optional ``title``."""

    id: str
    text: str
    title: str | None = None


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def load_collection(source: str | Path | Sequence[str | Document]) -> list[Document]:
    """A list of documents from ``source``:

    - a list of strings (ids ``"0"``, ``"1"``, ...) or of :class:`Document`;
    - a folder: every ``*.txt`` file below it (sorted), one document each, id = the relative path;
    - a ``.jsonl`` file: one JSON object per line with ``"text"`` (and optionally ``"id"``, ``"title"``);
    - any other text file: one document per blank-line-separated paragraph.

    Blank documents are skipped; a collection with none left raises ``ValueError``.
    """
    docs: list[Document] = []
    where = "the given list"
    if isinstance(source, (str, Path)):
        path = Path(source)
        where = repr(str(path))
        if not path.exists():
            raise FileNotFoundError(
                f"no collection at {where}: give a folder of .txt files, a .jsonl file with a 'text' field, "
                "or a text file of blank-line-separated paragraphs"
            )
        if path.is_dir():
            for f in sorted(path.rglob("*.txt")):
                docs.append(Document(str(f.relative_to(path)), read_text(f, "document").strip()))
        elif path.suffix == ".jsonl":
            for n, obj in read_jsonl(path, "an object with a 'text' string"):
                if not isinstance(obj.get("text"), str):
                    raise ValueError(f"{path}:{n} has no string 'text' field; each line must be an object with 'text'")
                docs.append(Document(str(obj.get("id", n - 1)), obj["text"].strip(), obj.get("title")))
        else:
            docs = [Document(str(i), p) for i, p in enumerate(_paragraphs(read_text(path, "collection file")))]
    else:
        if isinstance(source, (bytes, bytearray)):
            raise ValueError("a collection is a path or a list of strings/Documents, got bytes")
        for i, item in enumerate(source):
            if isinstance(item, Document):
                docs.append(item)
            elif isinstance(item, str):
                docs.append(Document(str(i), item.strip()))
            else:
                raise ValueError(f"collection item {i} is a {type(item).__name__}; accepted: str or Document")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise ValueError(
            f"the collection {where} has no documents (every document is empty or there are none); "
            "a retriever needs at least one non-blank document"
        )
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"document id {dup!r} appears more than once in {where}; ids must be unique")
    return docs


# ================================================================ retrieval


@dataclass
class Retrieval:
    """The top k documents of B queries.

    indices: (B, k) int64 positions in the collection, best first.
    scores: (B, k) the retriever's scores.
    log_probs: (B, k) log P(D | x) = log_softmax(scores / temperature) over the k.
    documents: B lists of k :class:`Document`.
    """

    indices: np.ndarray
    scores: np.ndarray
    log_probs: np.ndarray
    documents: list[list[Document]]

    @property
    def probs(self) -> np.ndarray:
        """(B, k) P(D | x); each row sums to one."""
        return np.exp(self.log_probs)

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def __len__(self) -> int:
        return self.indices.shape[0]

    def repeat(self, n: int) -> "Retrieval":
        """Each row repeated ``n`` times in place (rows r*n .. r*n+n-1 are query r)."""
        rep = lambda a: np.repeat(a, n, axis=0)  # noqa: E731
        return Retrieval(rep(self.indices), rep(self.scores), rep(self.log_probs),
                         [d for d in self.documents for _ in range(n)])


def _check_k(k, n_docs: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k > n_docs:
        raise ValueError(
            f"k={k} is larger than the collection ({n_docs} document{'s' if n_docs != 1 else ''}); "
            f"accepted: 1 <= k <= {n_docs}"
        )
    return int(k)


def _check_temperature(temperature) -> float:
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


class Retriever:
    """Base class: subclasses set ``documents`` and implement ``scores``."""

    documents: list[Document]

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """(B, N) float64 score of each query against each document (higher is better)."""
        raise NotImplementedError

    def search(self, queries: Sequence[str] | str, k: int, temperature: float = 1.0) -> Retrieval:
        """The top ``k`` documents of each query, with P(D | x) = softmax(score / temperature) over them."""
        if isinstance(queries, str):
            queries = [queries]
        queries = list(queries)
        if not queries:
            raise ValueError("no queries given; pass at least one query string")
        k = _check_k(k, len(self.documents))
        temperature = _check_temperature(temperature)
        s = np.asarray(self.scores(queries), dtype=np.float64)
        # Best first; a stable sort keeps collection order among equal scores.
        idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(s, idx, axis=1)
        z = top / temperature
        z = z - z.max(axis=1, keepdims=True)
        log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        docs = [[self.documents[i] for i in row] for row in idx.tolist()]
        return Retrieval(idx.astype(np.int64), top, log_probs, docs)


_WORD = re.compile(r"\w+")


def bm25_words(text: str) -> list[str]:
    """BM25's words: ``\\w+`` runs of the lower-cased text."""
    return _WORD.findall(text.lower())


class BM25Retriever(Retriever):
    """Okapi BM25 (k1 = 1.5, b = 0.75 by default) over ``documents``; see the module docstring.

    The index holds, per vocabulary word, its postings (documents and counts) and the
    precomputed BM25 weight of each posting, so a query costs one ``bincount`` over
    the postings of its words.
    """

    def __init__(self, documents: Sequence[str | Document] | str | Path, k1: float = 1.5, b: float = 0.75) -> None:
        if not (k1 >= 0 and 0 <= b <= 1):
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.documents = load_collection(documents)
        self.k1, self.b = float(k1), float(b)
        vocab: dict[str, int] = {}
        doc_col, term_col, tf_col = [], [], []
        lengths = np.zeros(len(self.documents), dtype=np.float64)
        for d, doc in enumerate(self.documents):
            words = bm25_words(doc.text)
            lengths[d] = len(words)
            ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), dtype=np.int64, count=len(words))
            terms, counts = np.unique(ids, return_counts=True)
            doc_col.append(np.full(len(terms), d, dtype=np.int64))
            term_col.append(terms)
            tf_col.append(counts)
        self.vocab = vocab
        N = len(self.documents)
        docs = np.concatenate(doc_col) if doc_col else np.zeros(0, np.int64)
        terms = np.concatenate(term_col) if term_col else np.zeros(0, np.int64)
        tf = np.concatenate(tf_col).astype(np.float64) if tf_col else np.zeros(0)
        order = np.argsort(terms, kind="stable")
        docs, terms, tf = docs[order], terms[order], tf[order]
        df = np.bincount(terms, minlength=len(vocab)).astype(np.float64)
        self.idf = np.log1p((N - df + 0.5) / (df + 0.5))
        self.doc_lengths = lengths
        avgdl = lengths.mean() if lengths.mean() > 0 else 1.0
        norm = self.k1 * (1.0 - self.b + self.b * lengths[docs] / avgdl)
        self.post_docs = docs
        self.post_weights = self.idf[terms] * tf * (self.k1 + 1.0) / (tf + norm)
        self.post_ptr = np.concatenate([[0], np.cumsum(df)]).astype(np.int64)

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        N = len(self.documents)
        out = np.zeros((len(queries), N), dtype=np.float64)
        for r, q in enumerate(queries):
            ids = [self.vocab[w] for w in bm25_words(q) if w in self.vocab]
            if not ids:
                continue
            sel = np.concatenate([np.arange(self.post_ptr[t], self.post_ptr[t + 1]) for t in ids])
            out[r] = np.bincount(self.post_docs[sel], weights=self.post_weights[sel], minlength=N)
        return out


# ---------------------------------------------------------------- dense


class SentenceEncoder:
    """Texts -> embeddings with a sentence-embedding model in a local directory.

    With ``sentence_transformers`` installed, ``SentenceTransformer(model_dir)`` does
    the work. Otherwise the directory is read as sentence-transformers lays it out:
    the Hugging Face encoder (``AutoModel``) at the path of its Transformer module
    (the root by default), the pooling of ``<pooling path>/config.json`` (default:
    mean over the non-padding tokens) and L2 normalisation when ``modules.json``
    lists a Normalize module. ``normalize`` overrides the latter.
    """

    def __init__(self, model_dir: str | Path, *, device: str | torch.device = "cpu", batch_size: int = 32,
                 max_length: int | None = None, normalize: bool | None = None,
                 use_sentence_transformers: bool | None = None) -> None:
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(
                f"no sentence-embedding model directory at {str(model_dir)!r}; expected a local directory "
                "(sentence-transformers layout, or a Hugging Face encoder with config.json)"
            )
        self.device, self.batch_size = torch.device(device), int(batch_size)
        modules = self._modules()
        self.normalize = normalize if normalize is not None else any(m.get("type", "").endswith("Normalize") for m in modules)
        st = None
        if use_sentence_transformers is not False and (self.dir / "modules.json").is_file():
            try:
                import sentence_transformers as st  # type: ignore
            except ImportError:
                if use_sentence_transformers:
                    raise
        self._st = None
        if st is not None:
            refuse_remote_code(self.dir)
            self._st = st.SentenceTransformer(str(self.dir), device=str(self.device), trust_remote_code=False)
            return
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:  # pragma: no cover - exercised only without the extra
            raise ImportError("dense retrieval needs 'transformers' (or 'sentence-transformers') installed") from e
        body = self.dir
        for m in modules:
            if m.get("type", "").endswith("models.Transformer"):
                body = self.dir / m.get("path", "")
        if not (body / "config.json").is_file():
            raise FileNotFoundError(f"no encoder config.json in {str(body)!r}")
        self.pooling = self._pooling(modules)
        self.max_length = max_length or self._max_seq_length(body)
        refuse_remote_code(body)  # no code from the directory runs
        refuse_pickled_weights(body)
        self.tokenizer = AutoTokenizer.from_pretrained(str(body), local_files_only=True, trust_remote_code=False)
        self.model = AutoModel.from_pretrained(str(body), local_files_only=True, trust_remote_code=False,
                                               use_safetensors=True).to(self.device).eval()

    def _modules(self) -> list[dict]:
        path = self.dir / "modules.json"
        return json.loads(path.read_text()) if path.is_file() else []

    def _pooling(self, modules: list[dict]) -> list[str]:
        cfg_path = None
        for m in modules:
            if m.get("type", "").endswith("Pooling"):
                cfg_path = self.dir / m.get("path", "1_Pooling") / "config.json"
        if cfg_path is None and (self.dir / "1_Pooling" / "config.json").is_file():
            cfg_path = self.dir / "1_Pooling" / "config.json"
        if cfg_path is None or not cfg_path.is_file():
            return ["mean"]
        cfg = json.loads(cfg_path.read_text())
        known = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_lasttoken": "lasttoken"}
        unsupported = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k not in known]
        if unsupported:
            raise ValueError(f"pooling {unsupported} in {cfg_path} is not supported; accepted: {sorted(known)}")
        modes = [name for key, name in known.items() if cfg.get(key)]  # sentence-transformers' order
        if not modes:
            raise ValueError(f"{cfg_path} turns on no pooling mode; accepted: {sorted(known)}")
        return modes

    def _max_seq_length(self, body: Path) -> int:
        for path in (self.dir / "sentence_bert_config.json", body / "sentence_bert_config.json"):
            if path.is_file():
                n = json.loads(path.read_text()).get("max_seq_length")
                if n:
                    return int(n)
        return 512

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), H) float32 embeddings."""
        texts = list(texts)
        if self._st is not None:
            return np.asarray(self._st.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                              normalize_embeddings=False), dtype=np.float32)
        out = []
        for lo in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[lo : lo + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state.float()  # (B, T, H)
            mask = enc["attention_mask"].unsqueeze(-1).float()
            parts = []
            for mode in self.pooling:
                if mode == "cls":
                    parts.append(hidden[:, 0])
                elif mode == "max":
                    parts.append(hidden.masked_fill(mask == 0, float("-inf")).amax(1))
                elif mode in ("mean", "mean_sqrt_len"):
                    total, count = (hidden * mask).sum(1), mask.sum(1).clamp_min(1.0)
                    parts.append(total / (count if mode == "mean" else count.sqrt()))
                else:  # lasttoken: the last non-padding position of each row (right padding)
                    last = enc["attention_mask"].sum(1) - 1
                    parts.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
            emb = torch.cat(parts, dim=-1)
            if self.normalize:
                emb = torch.nn.functional.normalize(emb, dim=-1)
            out.append(emb.cpu().numpy())
        return np.concatenate(out).astype(np.float32)


class DenseRetriever(Retriever):
    """Dense retrieval: score = <embed(query), embed(document)> with a :class:`SentenceEncoder`.

    Document embeddings are computed once, at construction (``embeddings``: (N, H)).
    """

    def __init__(self, documents: Sequence[str | Document] | str | Path, model_dir: str | Path, **encoder_options) -> None:
        self.documents = load_collection(documents)
        self.encoder = SentenceEncoder(model_dir, **encoder_options)
        self.embeddings = self.encoder.encode([d.text for d in self.documents])

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        return self.encoder.encode(list(queries)).astype(np.float64) @ self.embeddings.T.astype(np.float64)


# ================================================================ documents as prefixes


def document_prefix(tokenizer, text: str, template: str = "{doc}\n\n", max_tokens: int | None = None) -> list[int]:
    """Token ids of ``template.format(doc=text)``: the text before and after ``{doc}`` and the
    document are encoded separately, and the document is cut so the whole prefix has at most
    ``max_tokens`` tokens (the template's own tokens are kept)."""
    if template.count("{doc}") != 1:
        raise ValueError(f"template {template!r} must contain '{{doc}}' exactly once, e.g. '{{doc}}\\n\\n'")
    before, after = template.split("{doc}")
    pre = list(tokenizer.encode(before)) if before else []
    post = list(tokenizer.encode(after)) if after else []
    body = list(tokenizer.encode(text))
    if max_tokens is not None:
        room = int(max_tokens) - len(pre) - len(post)
        if room < 1:
            raise ValueError(
                f"max_doc_tokens={max_tokens} leaves no room for the document after the template's "
                f"{len(pre) + len(post)} tokens; accepted: max_doc_tokens > {len(pre) + len(post)}"
            )
        body = body[:room]
    return pre + body + post


def _default_filler(tokenizer) -> int | None:
    """The tokenizer's one token for "\n", else its <bos>; None when it has neither."""
    try:
        ids = tokenizer.encode("\n")
    except Exception:  # pragma: no cover - a tokenizer that cannot encode a newline
        ids = []
    if len(ids) == 1:
        return int(ids[-1])
    bos = getattr(tokenizer, "bos_id", None)
    return int(bos) if bos is not None else None


def _check_retriever(retriever, k) -> None:
    if not isinstance(retriever, Retriever):
        raise ValueError(f"retriever must be a lmlab.rag.Retriever (BM25Retriever, DenseRetriever), got {type(retriever).__name__}")
    _check_k(k, len(retriever.documents))


# ================================================================ RAG-token


@dataclass
class RAGState(State):
    """State of a :class:`RAGTokenModel` for B queries.

    ``tensors``: ``log_prior`` (B, k) log P(D | x) and ``doc_index`` (B, k) the retrieved
    documents' positions in the collection. ``inner``: the wrapped model's state for
    the B*k (query, document) rows, row ``b * k + j`` holding query b under its j-th
    document. ``length`` counts the query's tokens (not the document prefix).
    ``select(index)`` picks queries and their k rows together, so beam search can
    reorder and prune hypotheses of a RAG-token model like any other.
    """

    inner: State | None = None
    k: int = 1

    def _rows(self, index: torch.Tensor) -> torch.Tensor:
        return (index[:, None] * self.k + torch.arange(self.k, device=index.device)).reshape(-1)

    def select(self, index: torch.Tensor) -> "RAGState":
        tensors = {n: t.index_select(0, index.to(t.device)) for n, t in self.tensors.items()}
        inner = None if self.inner is None else self.inner.select(self._rows(index))
        return RAGState(tensors, self.length, inner, self.k)

    def clone(self) -> "RAGState":
        return RAGState({n: t.clone() for n, t in self.tensors.items()}, self.length,
                        None if self.inner is None else self.inner.clone(), self.k)


class RAGTokenModel(LanguageModel):
    """RAG-token around any lmlab model: next-token distributions mixed over retrieved documents.

    ``logits, state = rag(ids, state=None)``: ids (B, T) are the query's tokens. On the
    first call (``state=None``) each row's text (``tokenizer.decode``) is sent to the
    retriever, each of its k documents becomes a prefix (:func:`document_prefix`), and the
    B*k rows ``prefix_j + ids[b]`` go through the wrapped model in one call; later calls
    feed each new token to all k rows of its query in one call. The logits are
    ``log sum_j P(D_j | x) softmax(model logits under D_j)`` (B, T, V), normalised
    log-probabilities, so every scorer and decoder in lmlab works on the wrapper.

    Prefixes of unequal length are left-padded (``pad``; see the module docstring).
    The decoders feed the prompts' common prefix first, so several prompts of different
    lengths would be retrieved for by that prefix only: wrap such calls in
    ``with rag.retrieving_for(prompts): ...`` (or pass ``retrieval=`` to ``forward``).

    ``max_context`` is the wrapped model's minus ``max_doc_tokens`` (default: half the
    wrapped model's context; no limit for unbounded models).
    """

    family = "rag-token"

    def __init__(self, model: LanguageModel, tokenizer, retriever: Retriever, k: int = 2, temperature: float = 1.0,
                 template: str = "{doc}\n\n", max_doc_tokens: int | None = None, pad: str = "repeat",
                 filler_id: int | None = None) -> None:
        super().__init__()
        _check_retriever(retriever, k)
        self.model = model
        self.tokenizer, self.retriever = tokenizer, retriever
        self.k, self.temperature = int(k), _check_temperature(temperature)
        document_prefix(tokenizer, "", template, None)  # validates the template
        self.template = template
        inner_ctx = model.max_context
        if max_doc_tokens is None and inner_ctx is not None:
            max_doc_tokens = inner_ctx // 2
        if max_doc_tokens is not None and inner_ctx is not None and not 1 <= max_doc_tokens < inner_ctx:
            raise ValueError(f"max_doc_tokens={max_doc_tokens} must be in [1, {inner_ctx - 1}] (the wrapped model's context is {inner_ctx})")
        self.max_doc_tokens = max_doc_tokens
        if pad not in ("repeat", "filler"):
            raise ValueError(f"pad={pad!r}; accepted: 'repeat' (a row's own prefix repeated), 'filler' (filler_id)")
        self.pad = pad
        self.filler_id = _default_filler(tokenizer) if filler_id is None else int(filler_id)
        self._prefix_cache: dict[int, list[int]] = {}
        self._fixed: Retrieval | None = None

    @property
    def config(self):  # the wrapped model's config (vocab_size, ...)
        return self.model.config

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def max_context(self) -> int | None:
        inner = self.model.max_context
        return None if inner is None else inner - self.max_doc_tokens

    def retrieve(self, queries: Sequence[str]) -> Retrieval:
        return self.retriever.search(list(queries), self.k, self.temperature)

    @contextmanager
    def retrieving_for(self, queries: Sequence[str] | str) -> Iterator[Retrieval]:
        """Inside the block, calls with ``state=None`` use the retrieval of ``queries`` (one
        per prompt; a batch of B = len(queries) * n rows takes each query's retrieval for n
        consecutive rows, as ``run_setup`` lays out ``num_return_sequences``)."""
        if isinstance(queries, str):
            queries = [queries]
        previous = self._fixed
        self._fixed = self.retrieve(queries)
        try:
            yield self._fixed
        finally:
            self._fixed = previous

    def prefix_ids(self, doc_index: int) -> list[int]:
        """The prefix of document ``doc_index`` of the collection (cached)."""
        if doc_index not in self._prefix_cache:
            text = self.retriever.documents[doc_index].text
            self._prefix_cache[doc_index] = document_prefix(self.tokenizer, text, self.template, self.max_doc_tokens)
        return self._prefix_cache[doc_index]

    def padded(self, prefix: list[int], length: int) -> list[int]:
        """``prefix`` left-padded to ``length`` tokens as this model pads (see ``pad``)."""
        n = length - len(prefix)
        if n <= 0:
            return list(prefix)
        if self.pad == "filler" or not prefix:
            if self.filler_id is None:
                raise ValueError(
                    "padding needs a filler token: the tokenizer has no single token for '\\n' and no <bos>; "
                    "pass filler_id= (a token id) to the RAG model"
                )
            return [self.filler_id] * n + list(prefix)
        reps = -(-n // len(prefix))
        return (list(prefix) * reps)[len(prefix) * reps - n :] + list(prefix)

    def _retrieval_for(self, ids: torch.Tensor, retrieval: Retrieval | None) -> Retrieval:
        B = ids.shape[0]
        if retrieval is None and self._fixed is not None:
            retrieval = self._fixed
        if retrieval is None:
            return self.retrieve([self.tokenizer.decode(row) for row in ids.tolist()])
        if len(retrieval) != B:
            if B % len(retrieval):
                raise ValueError(f"the retrieval has {len(retrieval)} queries but the batch has {B} rows")
            retrieval = retrieval.repeat(B // len(retrieval))
        if retrieval.k != self.k:
            raise ValueError(f"the retrieval has k={retrieval.k} documents per query, the model k={self.k}")
        return retrieval

    def forward(self, ids: torch.Tensor, state: State | None = None,
                retrieval: Retrieval | None = None) -> tuple[torch.Tensor, RAGState]:
        """ids (B, T) int64 -> log mixture probabilities (B, T, V) and the state."""
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise ValueError(f"ids must have shape (B, T) with T >= 1, got {tuple(ids.shape)}")
        B, T, k = ids.shape[0], ids.shape[1], self.k
        device = ids.device
        rows = ids.repeat_interleave(k, dim=0)  # row b*k + j: query b under document j
        if state is None:
            ret = self._retrieval_for(ids, retrieval)
            prefixes = [self.prefix_ids(int(i)) for i in ret.indices.reshape(-1)]
            P = max(len(p) for p in prefixes)
            pre = torch.tensor([self.padded(p, P) for p in prefixes], dtype=torch.long)  # every query starts at P
            logits, inner = self.model(torch.cat([pre.to(device), rows], dim=1), None)
            logits = logits[:, P:]
            log_prior = torch.as_tensor(ret.log_probs, dtype=torch.float32, device=device)
            doc_index = torch.as_tensor(ret.indices, dtype=torch.long, device=device)
            length = T
        else:
            if not isinstance(state, RAGState):
                raise TypeError(f"a RAGTokenModel continues only its own RAGState, got {type(state).__name__}")
            logits, inner = self.model(rows, state.inner)
            log_prior, doc_index = state.tensors["log_prior"], state.tensors["doc_index"]
            length = state.length + T
        logp = torch.log_softmax(logits.float(), dim=-1).view(B, k, T, -1)
        mixed = torch.logsumexp(logp + log_prior.to(logp.device).view(B, k, 1, 1), dim=1)
        return mixed, RAGState({"log_prior": log_prior, "doc_index": doc_index}, length, inner, k)


# ================================================================ RAG-sequence


@torch.no_grad()
def continuation_logprobs(model: LanguageModel, contexts: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[int]], batch_size: int = 16) -> list[float]:
    """log P(continuation | context) under ``model``, exactly: each row ``context + continuation``
    is one teacher-forced forward pass (right-padded in batches; a causal model's outputs at real
    positions never depend on the padding after them). Contexts must be non-empty."""
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    out: list[float] = []
    ctx_limit = model.max_context
    for lo in range(0, len(contexts), batch_size):
        ctx = [list(map(int, c)) for c in contexts[lo : lo + batch_size]]
        cont = [list(map(int, c)) for c in continuations[lo : lo + batch_size]]
        if any(not c for c in ctx):
            raise ValueError("a context is empty; every scored row needs at least one token before the continuation")
        seqs = [c + y[:-1] if y else c for c, y in zip(ctx, cont)]
        L = max(len(s) for s in seqs)
        if ctx_limit is not None and L > ctx_limit:
            raise ValueError(f"a row of {L} tokens is longer than the model's context of {ctx_limit}; "
                             "shorten the documents (max_doc_tokens), the query or the candidate")
        x = torch.zeros(len(seqs), L, dtype=torch.long)
        for r, s in enumerate(seqs):
            x[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        logp = torch.log_softmax(model(x.to(model.device))[0].float(), dim=-1)
        for r, (c, y) in enumerate(zip(ctx, cont)):
            if not y:
                out.append(0.0)
                continue
            pos = torch.arange(len(c) - 1, len(c) - 1 + len(y), device=logp.device)
            tok = torch.tensor(y, dtype=torch.long, device=logp.device)
            out.append(float(logp[r, pos, tok].double().sum()))
    return out


@dataclass
class SequenceScore:
    """RAG-sequence score of one candidate y for one query x.

    logprob: log P(y | x) = log sum_j P(D_j | x) P(y | D_j, x).
    doc_logprobs: log P(y | D_j, x) per retrieved document; log_prior: log P(D_j | x).
    """

    text: str
    token_ids: list[int]
    logprob: float
    doc_logprobs: list[float]
    log_prior: list[float]
    documents: list[Document] = field(default_factory=list)

    @property
    def posterior(self) -> list[float]:
        """P(D_j | x, y): which documents explain the candidate."""
        z = [a + b - self.logprob for a, b in zip(self.log_prior, self.doc_logprobs)]
        return [math.exp(v) for v in z]


def _as_ids(tokenizer, item) -> list[int]:
    if isinstance(item, str):
        return list(tokenizer.encode(item))
    return [int(t) for t in item]


def rag_sequence_scores(model: LanguageModel, tokenizer, retriever: Retriever, queries: Sequence[str] | str,
                        candidates, k: int = 2, temperature: float = 1.0, template: str = "{doc}\n\n",
                        max_doc_tokens: int | None = None, add_eos: bool = False,
                        batch_size: int = 16) -> list[list[SequenceScore]]:
    """RAG-sequence log P(y | x) of every candidate of every query, exact.

    queries: strings (retrieved for and encoded with ``tokenizer``). candidates: one list
    per query of strings or token-id lists (a single string per query is also accepted).
    ``add_eos``: score ``y <eos>`` (a complete answer) instead of the prefix ``y``.
    ``max_doc_tokens``: as in :class:`RAGTokenModel` (default: half a bounded model's context).
    Returns, per query, one :class:`SequenceScore` per candidate in the given order.
    """
    if isinstance(queries, str):
        queries = [queries]
    queries = list(queries)
    if len(candidates) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(candidates)} candidate lists; give one list per query")
    _check_retriever(retriever, k)
    if max_doc_tokens is None and model.max_context is not None:
        max_doc_tokens = model.max_context // 2
    ret = retriever.search(queries, k, temperature)
    ctxs, conts, where = [], [], []
    cand_ids: list[list[list[int]]] = []
    prefixes: dict[int, list[int]] = {}
    for q, (query, cands) in enumerate(zip(queries, candidates)):
        if isinstance(cands, str):
            cands = [cands]
        ids_q = _as_ids(tokenizer, query)
        ids_c = [_as_ids(tokenizer, c) + ([tokenizer.eos_id] if add_eos else []) for c in cands]
        cand_ids.append(ids_c)
        for j, d in enumerate(ret.indices[q].tolist()):
            if d not in prefixes:
                prefixes[d] = document_prefix(tokenizer, retriever.documents[d].text, template, max_doc_tokens)
            for c, y in enumerate(ids_c):
                ctxs.append(prefixes[d] + ids_q)
                conts.append(y)
                where.append((q, j, c))
    lps = continuation_logprobs(model, ctxs, conts, batch_size)
    table = {w: lp for w, lp in zip(where, lps)}
    out: list[list[SequenceScore]] = []
    for q, cands in enumerate(cand_ids):
        prior = ret.log_probs[q].tolist()
        row = []
        for c, y in enumerate(cands):
            per_doc = [table[(q, j, c)] for j in range(k)]
            total = torch.logsumexp(torch.tensor(prior, dtype=torch.float64) + torch.tensor(per_doc, dtype=torch.float64), 0)
            text = tokenizer.decode(y)
            row.append(SequenceScore(text, y, float(total), per_doc, prior, ret.documents[q]))
        out.append(row)
    return out


def rag_sequence_generate(model: LanguageModel, tokenizer, retriever: Retriever, query: str, setup="greedy",
                          max_new_tokens: int = 32, k: int = 2, temperature: float = 1.0,
                          template: str = "{doc}\n\n", max_doc_tokens: int | None = None, seed: int | None = 0,
                          stop_strings: Sequence[str] = (), num_return_sequences: int | None = None,
                          batch_size: int = 16) -> list[SequenceScore]:
    """RAG-sequence decoding ("thorough decoding" of Lewis et al. 2020) for one query.

    Candidates are decoded with ``setup`` (any :class:`~lmlab.decode.DecodingSetup`, e.g.
    ``"beam 4"`` with ``num_return_sequences=4``) under each of the k retrieved documents;
    their union is scored exactly under every document (:func:`rag_sequence_scores`, with
    the candidate's <eos> when it ended with one) and returned best first by log P(y | x).
    """
    from lmlab.decode.setups import run_setup

    _check_retriever(retriever, k)
    if max_doc_tokens is None and model.max_context is not None:
        max_doc_tokens = model.max_context // 2
    ret = retriever.search([query], k, temperature)
    q = _as_ids(tokenizer, query)
    prompts = [document_prefix(tokenizer, d.text, template, max_doc_tokens) + q for d in ret.documents[0]]
    results = run_setup(model, tokenizer, prompts, setup, max_new_tokens, seed=seed, stop_strings=stop_strings,
                        num_return_sequences=num_return_sequences)
    seen: dict[tuple[int, ...], None] = {}
    for per_doc in results:
        for r in per_doc:
            seen.setdefault(tuple(r.token_ids), None)
    cands = [list(t) for t in seen if t]
    if not cands:
        return []
    scored = rag_sequence_scores(model, tokenizer, retriever, [query], [cands], k, temperature, template,
                                 max_doc_tokens, batch_size=batch_size)[0]
    return sorted(scored, key=lambda s: -s.logprob)
