"""N-gram language models estimated from counts, any order, on numpy alone.

:class:`NGramLM` builds, reads, writes and scores backoff n-gram models
without importing torch (a KenLM-sized process: numpy's few tens of MB plus
the tables). :class:`lmlab.models.ngram.NGramModel` (family ``"ngram"``) is
the same model behind lmlab's torch interface; every method below is shared.

Three estimators share one representation, the ARPA backoff table:

* ``"kneser_ney"``: interpolated modified Kneser-Ney (Chen & Goodman 1998) as
  KenLM's ``lmplz`` computes it: three discounts D1, D2, D3+ per order from
  the count-of-counts of *adjusted* counts, continuation counts (number of
  distinct left extensions) for lower orders, raw counts for the highest
  order and for n-grams that start with ``<s>``, interpolation all the way
  down to the uniform distribution over the vocabulary (all ids but ``<s>``).
* ``"mle"``: maximum likelihood, p(w | h) = c(h w) / c(h .).
* ``"addk"``: add-k (Laplace for k=1), p(w | h) = (c(h w) + k) / (c(h .) + k V')
  with V' the number of predictable ids (all but ``<s>``).

A model read from an ARPA file has method ``"backoff"``: whatever tool wrote
it, the file's probabilities and backoff weights are used as they are.

Querying (KenLM's and SRILM's rule, shared by every method):

    log p(w | h) = prob(h w)                        if the n-gram h w is in the table
                 = backoff(h) + log p(w | h minus its oldest word)   otherwise

where ``backoff(h)`` is 0 (log10 1) when ``h`` is not in the table.

* Unseen contexts: a context never seen in training backs off to its longest
  seen suffix with no penalty, for every method. For MLE and add-k that means
  the estimate of the longest *seen* context is used; for Kneser-Ney it is
  the usual backoff.
* MLE gives probability 0 (log-prob ``-inf``, never NaN) to a word never seen
  after a seen context; ARPA files write that as -99.
* add-k is not a backoff model: after a seen context h every unseen word gets
  k / (c(h .) + k V'). It is stored as the explicit n-grams plus that "floor"
  per seen context (in the backoff array), and :meth:`NGramLM.write_arpa`
  writes it *densely* (every word after every seen context listed), which is
  exact but only feasible for small models (``max_dense_entries``); larger
  ones raise ``ValueError``.

Sentence boundaries follow KenLM: ``fit`` wraps each sequence as
``<s> ... </s>``; ``<s>`` is context only (never predicted: log-prob ``-inf``,
-99 in ARPA), ``</s>`` is predicted. A ``<s>`` token inside a sequence given
with ``add_bos_eos=False`` starts a new sentence (n-grams never span it).

``<unk>``: ids are never out of vocabulary (an id outside ``[0, vocab_size)``
raises ``ValueError``); out-of-vocabulary *words* are mapped to ``unk_id`` by
the word-level helpers (:meth:`NGramLM.encode`, :meth:`score_words`). If
``<unk>`` never occurs in the training data it gets exactly lmplz's
treatment: zero adjusted count, so its probability is the uniform
interpolation mass (gamma / V' at the unigram level). If the training data
does contain ``<unk>`` tokens (PTB does), they are counted as an ordinary word,
as SRILM does; lmplz refuses such a corpus unless given ``--skip_symbols``,
which deletes them (use ``drop_unk=True`` in :meth:`fit` to do the same).
Every id of the vocabulary that never occurs in training is a zeroton like an
unseen ``<unk>``.

Discounts: when a count-of-counts n1..n3 of some order is zero, or a
discount falls outside [0, r] (KenLM's check), the discounts of that order
cannot be estimated (tiny or character-level data). With ``strict=False``
(default) a warning is issued and ``fallback_discounts`` (KenLM's
``--discount_fallback`` defaults 0.5, 1, 1.5) are used; with ``strict=True``
a ``ValueError`` is raised. Discounts can also be given per order.

:meth:`NGramLM.score_sequences` scores a whole corpus in numpy;
:meth:`NGramLM.logprob10` scores given (context, word) pairs.

Storage: per order k a sorted int64 key array, log10 probabilities and
log10 backoffs (float32, as KenLM stores them); ``NGramModel`` registers
them as buffers so ``save_model``/``load_model`` work; the config carries
the table sizes. The
key of the k-gram x1..xk is ``node(x2..xk) * V + x1`` where ``node`` is the
row of an n-gram in its order's table (a unigram's node is its id), so the
suffixes of a history are found by one vectorized lookup per order for a
whole batch of positions (an open-addressing hash of the keys, rebuilt from
the sorted keys when a model is fitted or loaded; see :meth:`prepare`).

Agreement with KenLM (checked with lmplz 0.3.0 on PTB and on a toy corpus):
the tables equal lmplz's to float32 precision, except that lmplz writes 0
for the ``<s>`` unigram where lmlab writes -99 (never used), and that lmplz
files one unigram's count-of-counts entry under its raw instead of its
adjusted count (a quirk of its final flush), which moves its unigram D3+ in
the fourth digit (0.014% of test perplexity on PTB with ``drop_unk``).
Reading ARPA: values <= -99 mean log10(0) and become ``-inf``; n-grams whose
prefix or suffix is missing get the neutral entries described in
:meth:`NGramLM.from_arpa` (KenLM accepts missing suffixes, rejects
missing prefixes; lmlab accepts both).
"""

from __future__ import annotations

import math
import sys
import warnings
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from lmlab.tokenizers import split_words

__all__ = ["NGramConfig", "NGramLM", "DiscountWarning", "build_vocab", "METHODS"]

METHODS = ("kneser_ney", "mle", "addk", "backoff")
LN10 = math.log(10.0)
DEFAULT_FALLBACK = (0.5, 1.0, 1.5)  # KenLM's --discount_fallback defaults


class DiscountWarning(UserWarning):
    """Kneser-Ney discounts could not be estimated; fallback discounts used."""


@dataclass
class NGramConfig:
    vocab_size: int
    order: int = 3
    method: str = "kneser_ney"        # "kneser_ney" | "mle" | "addk" | "backoff" (read from ARPA)
    k: float = 1.0                    # add-k constant (method "addk")
    bos_id: int | None = None         # <s>: context only, never predicted
    eos_id: int | None = None         # </s>: predicted at the end of every sentence
    unk_id: int | None = None         # <unk>: where out-of-vocabulary words go
    discounts: list[list[float]] | None = None  # per order [D1, D2, D3+]; None: estimate (Chen & Goodman)
    strict: bool = False              # raise instead of falling back when discounts can't be estimated
    fallback_discounts: list[float] = field(default_factory=lambda: list(DEFAULT_FALLBACK))
    sizes: list[int] | None = None    # entries per order (set by fit / from_arpa; sizes[0] == vocab_size)
    discounts_used: list[list[float]] | None = None  # filled by fit for kneser_ney (for the record)

    def __post_init__(self) -> None:
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order < 1:
            raise ValueError(f"order must be an integer >= 1 (1 = unigram), got {self.order!r}")
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1, got {self.vocab_size!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown n-gram method {self.method!r}; accepted: {', '.join(METHODS)}")
        if self.method == "addk" and not (self.k > 0 and math.isfinite(self.k)):
            raise ValueError(f"add-k needs a finite k > 0, got k={self.k!r} (use method='mle' for k=0)")
        for name in ("bos_id", "eos_id", "unk_id"):
            v = getattr(self, name)
            if v is not None and not (0 <= v < self.vocab_size):
                raise ValueError(f"{name}={v} is outside the vocabulary [0, {self.vocab_size})")
        if self.bos_id is not None and self.bos_id == self.eos_id:
            raise ValueError(f"bos_id and eos_id must differ, both are {self.bos_id}")
        if self.bos_id is not None and self.vocab_size < 2:
            raise ValueError("a vocabulary with <s> needs at least one other id to predict")
        if self.sizes is not None:
            if len(self.sizes) != self.order or self.sizes[0] != self.vocab_size or min(self.sizes) < 0:
                raise ValueError(
                    f"sizes {self.sizes} must list one non-negative table size per order "
                    f"({self.order}) and start with vocab_size ({self.vocab_size})"
                )
        if self.discounts is not None:
            self.discounts = [list(map(float, d)) for d in self.discounts]
            if len(self.discounts) != self.order or any(len(d) != 3 for d in self.discounts):
                raise ValueError(
                    f"discounts must give [D1, D2, D3+] for each of the {self.order} orders, got {self.discounts}"
                )
            for i, d in enumerate(self.discounts):
                for r, x in enumerate(d, start=1):
                    if not (0.0 <= x <= r):
                        raise ValueError(f"discount D{r} of order {i + 1} is {x}; it must lie in [0, {r}]")
        fb = list(map(float, self.fallback_discounts))
        if len(fb) != 3 or not all(0.0 <= x <= r for r, x in zip((1, 2, 3), fb)):
            raise ValueError(f"fallback_discounts must be [D1, D2, D3+] with 0 <= Dr <= r, got {self.fallback_discounts}")
        self.fallback_discounts = fb

    @property
    def num_predictable(self) -> int:
        """V': ids that can be predicted (all but <s>)."""
        return self.vocab_size - (1 if self.bos_id is not None else 0)


# ---------------------------------------------------------------- tables


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_LOOKUP_ROWS = 1 << 16  # n-grams looked up or renumbered at a time (bounded temporaries)


def _bucket_of(keys: np.ndarray, buckets: int) -> np.ndarray:
    """Hash bucket in [0, buckets) of each int64 key (>= 0): the top 32 bits of
    a multiplicative hash, scaled."""
    h = np.ascontiguousarray(keys, dtype=np.int64).view(np.uint64) * _GOLDEN
    h >>= np.uint64(32)
    h *= np.uint64(buckets)
    h >>= np.uint64(32)
    return h.view(np.int64)


def _bucket_order(keys: np.ndarray, home: np.ndarray) -> np.ndarray | None:
    """The permutation that stores ``keys`` bucket after bucket (``home``, their
    buckets, is overwritten), ascending within a bucket; None when they are
    stored so already."""
    if not ((home[1:] < home[:-1]) | ((home[1:] == home[:-1]) & (keys[1:] <= keys[:-1]))).any():
        return None
    if (keys[1:] > keys[:-1]).all():
        return _by_bucket(home)
    return np.lexsort((keys, home))


def _by_bucket(home: np.ndarray) -> np.ndarray:
    """The stable order of ``home`` (int64 buckets in [0, n), overwritten), by
    sorting the unique values bucket * n + position (numpy's quicksort, twice
    as fast as its stable sort)."""
    n = home.size
    home *= n
    home += np.arange(n, dtype=np.int64)
    return np.argsort(home)


def _in_bucket_order(keys: list, prob: list, bo: list, V: int) -> None:
    """Store each order's entries bucket after bucket of its hash index (see
    :class:`_HashIndex`), renumbering the node ids in the next order's keys to
    match. Works on the lists in place (an order's old arrays are dropped as
    its new ones come, and the next order's keys are renumbered in place, in
    blocks); orders already so stored are left as they are."""
    for k in range(2, len(keys) + 1):
        perm = _bucket_order(keys[k - 1], _bucket_of(keys[k - 1], max(1, keys[k - 1].size)))
        if perm is None:
            continue
        keys[k - 1] = keys[k - 1][perm]
        prob[k - 1] = prob[k - 1][perm]
        bo[k - 1] = bo[k - 1][perm]
        if k < len(keys):
            new_row = np.empty(perm.size, dtype=_index_dtype(perm.size))
            new_row[perm] = np.arange(perm.size, dtype=new_row.dtype)
            del perm
            nxt = keys[k]
            for s in range(0, nxt.size, _LOOKUP_ROWS):
                block = nxt[s:s + _LOOKUP_ROWS]
                block[:] = new_row[block // V].astype(np.int64) * V + block % V


class _HashIndex:
    """Bucketed hash of an int64 key array, for vectorized exact lookups:
    ``find(q)`` gives the row of each query key or -1. One bucket per key on
    average; within a bucket the keys ascend, so a lookup reads the bucket's
    first key and, for the few queries that need more, binary-searches the
    rest (a miss costs no more than a hit). The model's tables store their
    keys bucket after bucket (:func:`_in_bucket_order`): bucket b is rows
    ``start[b]:start[b + 1]`` and the index costs 4 bytes per key. Keys in any
    other order get ``rows``, their rows in that order (4 bytes more per key,
    one read more per probe)."""

    def __init__(self, keys: np.ndarray):
        n = keys.size
        self.keys = keys
        self.buckets = max(1, n)
        home = _bucket_of(keys, self.buckets)
        dt = np.int32 if n < 2**31 else np.int64
        sizes = np.bincount(home, minlength=self.buckets)
        rows = _bucket_order(keys, home)
        self.rows = None if rows is None else rows.astype(dt)
        self.steps = int(sizes.max()).bit_length() if n else 0  # binary search steps for a whole bucket
        self.start = np.zeros(self.buckets + 1, dtype=dt)
        np.cumsum(sizes, out=self.start[1:])

    def _key_at(self, pos: np.ndarray) -> np.ndarray:
        r = pos if self.rows is None else np.take(self.rows, pos, mode="clip")
        return np.take(self.keys, r, mode="clip"), r

    def find(self, q: np.ndarray) -> np.ndarray:
        if self.keys.size == 0:
            return np.full(q.size, -1, dtype=np.int64)
        h = _bucket_of(q, self.buckets)
        lo = self.start[h]
        h += 1
        hi = self.start[h]
        del h
        v, r = self._key_at(lo)  # an empty bucket's probe (lo == hi) is clipped, then ignored
        hit = v == q
        hit &= lo < hi
        out = np.where(hit, r, -1).astype(np.int64, copy=False)
        rest = v < q
        rest &= lo + 1 < hi
        rest = np.flatnonzero(rest)  # keys ascend: the key can only be further on
        if rest.size:
            lo, hi, q = lo[rest] + 1, hi[rest], q[rest]
            end = hi.copy()
            for _ in range(self.steps):  # lower bound of q in [lo, hi)
                mid = (lo + hi) >> 1
                active = lo < hi
                right = (self._key_at(mid)[0] < q) & active
                lo = np.where(right, mid + 1, lo)
                hi = np.where(active & ~right, mid, hi)
            v, r = self._key_at(lo)
            found = (v == q) & (lo < end)
            out[rest[found]] = r[found]
        return out


class _Tables:
    """numpy views of the model's tables (order k at index k-1)."""

    def __init__(self, V: int, keys: list, prob: list, bo: list, method: str, bos_id: int | None):
        self.V = V
        self.keys = keys    # keys[0] is None (unigrams are dense)
        self.prob = prob    # log10, float32
        self.bo = bo        # log10, float32 (add-k: the floor of a seen context)
        self.method = method
        self.bos_id = bos_id
        self._csr: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._words: dict[int, np.ndarray] = {}
        self._seen: dict[int, np.ndarray] = {}
        self._hash: dict[int, _HashIndex] = {}

    @property
    def order(self) -> int:
        return len(self.prob)

    # -- lookups
    def chain(self, windows: np.ndarray) -> np.ndarray:
        """Nodes of the suffixes of each row of ``windows`` (M, L), anchored at
        its last column: out[j, i] is the row of the (j+1)-gram made of the
        last j+1 entries of row i in order j+1's table, or -1 if absent."""
        M, L = windows.shape
        out = np.full((L, M), -1, dtype=np.int64)
        if L == 0 or M == 0:
            return out
        V = self.V
        last = windows[:, -1]
        alive = np.flatnonzero(last >= 0)
        cur = last[alive]
        out[0, alive] = cur
        for k in range(2, min(L, self.order) + 1):
            if alive.size == 0:
                break
            keys = self.keys[k - 1]
            if keys.size == 0:
                break
            first = windows[alive, L - k]
            ok = first >= 0
            if not ok.all():
                alive, cur, first = alive[ok], cur[ok], first[ok]
            pos = self.index(k).find(cur * V + first)
            hit = pos >= 0
            alive, cur = alive[hit], pos[hit]
            out[k - 1, alive] = cur
        return out

    def lookup(self, windows: np.ndarray) -> np.ndarray:
        """Row of each row of ``windows`` (M, L) as an L-gram in order L's
        table, or -1 (what ``chain(windows)[L - 1]`` gives, in O(M) memory)."""
        M, L = windows.shape
        cur = windows[:, -1].astype(np.int64)
        alive = np.flatnonzero(cur >= 0)
        cur = cur[alive]
        for k in range(2, L + 1):
            if alive.size == 0:
                break
            first = windows[alive, L - k].astype(np.int64)
            ok = first >= 0
            pos = self.index(k).find(cur[ok] * self.V + first[ok])
            hit = pos >= 0
            alive, cur = alive[ok][hit], pos[hit]
        out = np.full(M, -1, dtype=np.int64)
        out[alive] = cur
        return out

    def index(self, k: int) -> _HashIndex:
        if k not in self._hash:
            self._hash[k] = _HashIndex(self.keys[k - 1])
        return self._hash[k]

    def ngram_words(self, k: int) -> np.ndarray:
        """(n_k, k) word ids of order k's entries, in table order."""
        if k == 1:
            return np.arange(self.V, dtype=np.int64)[:, None]
        if k not in self._words:
            self._words[k] = self.words_of(k, np.arange(self.prob[k - 1].shape[0]))
        return self._words[k]

    def words_of(self, k: int, rows: np.ndarray) -> np.ndarray:
        """(len(rows), k) word ids of the entries ``rows`` of order k: a key is
        suffix node * V + first word, and a unigram's node is its word."""
        out = np.empty((rows.size, k), dtype=np.int64)
        node = rows
        for j in range(k - 1):
            key = self.keys[k - 1 - j][node]
            out[:, j] = key % self.V
            node = key // self.V
        out[:, k - 1] = node
        return out

    def csr(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Continuations of the contexts of order k-1 in order k's table:
        (offsets (n_{k-1}+1,), rows of order k sorted by context, their last words)."""
        if k not in self._csr:
            words = self.ngram_words(k)
            n_ctx = self.prob[k - 2].shape[0]
            prefix = self.chain(words[:, :-1])[k - 2]
            if (prefix < 0).any():
                raise RuntimeError("n-gram table is not closed under prefixes")  # guarded by the builders
            rows = np.argsort(prefix, kind="stable")
            offsets = np.zeros(n_ctx + 1, dtype=np.int64)
            np.cumsum(np.bincount(prefix, minlength=n_ctx), out=offsets[1:])
            self._csr[k] = (offsets, rows, words[rows, -1])
        return self._csr[k]

    def seen_context(self, k: int) -> np.ndarray:
        """Boolean (n_k,): order-k entries followed by something in order k+1."""
        if k not in self._seen:
            n = self.prob[k - 1].shape[0]
            if k >= self.order:
                self._seen[k] = np.zeros(n, dtype=bool)
            else:
                off = self.csr(k + 1)[0]
                self._seen[k] = off[1:] > off[:-1]
        return self._seen[k]

    # -- scoring
    def logprob10(self, ctx: np.ndarray, tgt: np.ndarray) -> np.ndarray:
        """log10 p(tgt | ctx) for each row; ctx (M, L) (-1 = nothing), tgt (M,)."""
        L = min(ctx.shape[1], self.order - 1)
        ctx = ctx[:, ctx.shape[1] - L:] if L > 0 else ctx[:, :0]
        tnodes = self.chain(np.concatenate([ctx, tgt[:, None]], axis=1))  # (L+1, M)
        return self.combine(tnodes, self.chain(ctx))

    def combine(self, tnodes: np.ndarray, cnodes: np.ndarray) -> np.ndarray:
        """log10 p from the nodes of the target's suffixes ``tnodes`` (L+1, M)
        (row j: the (j+1)-gram ending at the target) and of the context's
        suffixes ``cnodes`` (L, M) (row j: the last j+1 context tokens)."""
        L, M = cnodes.shape
        m = (tnodes >= 0).sum(axis=0)  # longest match (chains are prefix-contiguous)
        out = np.empty(M, dtype=np.float64)
        for j in range(1, L + 2):
            sel = np.flatnonzero(m == j)
            if sel.size:
                out[sel] = self.prob[j - 1][tnodes[j - 1, sel]]
        if L == 0:
            return out
        if self.method == "addk":
            # longest seen context Ls; if longer than m-1, the floor of that context
            Ls = np.zeros(M, dtype=np.int64)
            for j in range(1, L + 1):
                c = cnodes[j - 1]
                ok = np.flatnonzero(c >= 0)
                if ok.size:
                    seen = self.seen_context(j)[c[ok]]
                    Ls[ok[seen]] = j
            fl = np.flatnonzero(Ls > m - 1)
            for j in range(1, L + 1):
                sel = fl[Ls[fl] == j]
                if sel.size:
                    out[sel] = self.bo[j - 1][cnodes[j - 1, sel]]
            return out
        for j in range(1, L + 1):
            c = cnodes[j - 1]
            sel = np.flatnonzero((c >= 0) & (m <= j))
            if sel.size:
                out[sel] += self.bo[j - 1][c[sel]]
        return out

    def score_rows(self, X: np.ndarray, first: int) -> np.ndarray:
        """log10 p(X[b, t] | X[b, :t]) for t >= first, each row an independent
        stream (-1 = no token; the chains stop there). Every position's
        suffix chain is computed once and serves as the next position's
        context chain. Returns (B, W - first)."""
        B, W = X.shape
        N = self.order
        n1 = N - 1
        if W <= first:
            return np.zeros((B, 0))
        Xp = np.concatenate([np.full((B, n1), -1, dtype=np.int64), X], axis=1)
        lo = max(first - 1, 0)
        win = np.lib.stride_tricks.sliding_window_view(Xp, N, axis=1)[:, lo:]  # window ending at X[:, lo + i]
        nodes = self.chain(np.ascontiguousarray(win.reshape(-1, N)))  # (N, B * (W - lo))
        nodes = nodes.reshape(N, B, W - lo)
        t0 = first - lo
        tnodes = nodes[:, :, t0:].reshape(N, -1)
        if first == 0:
            cn = np.concatenate([np.full((n1, B, 1), -1, dtype=np.int64), nodes[:n1, :, :-1]], axis=2)
        else:
            cn = nodes[:n1, :, t0 - 1:-1]
        return self.combine(tnodes, cn.reshape(n1, tnodes.shape[1])).reshape(B, W - first)

    def dist10(self, ctx: np.ndarray) -> np.ndarray:
        """(M, V) float64 log10 p(. | ctx) for each row of ctx (M, L)."""
        M, L = ctx.shape
        N = self.order
        L = min(L, N - 1)
        ctx = ctx[:, ctx.shape[1] - L:] if L > 0 else ctx[:, :0]
        D = np.repeat(self.prob[0].astype(np.float64)[None, :], M, axis=0)
        if L > 0:
            cnodes = self.chain(ctx)
            for k in range(2, L + 2):
                c = cnodes[k - 2]
                rows = np.flatnonzero(c >= 0)
                if rows.size == 0:
                    break
                cn = c[rows]
                offsets, grows, gwords = self.csr(k)
                start, stop = offsets[cn], offsets[cn + 1]
                counts = stop - start
                if self.method == "addk":
                    seen = counts > 0
                    D[rows[seen]] = self.bo[k - 2][cn[seen]].astype(np.float64)[:, None]
                else:
                    D[rows] += self.bo[k - 2][cn].astype(np.float64)[:, None]
                total = int(counts.sum())
                if total:
                    rep = np.repeat(np.arange(rows.size), counts)
                    within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
                    g = np.repeat(start, counts) + within
                    D[rows[rep], gwords[g]] = self.prob[k - 1][grows[g]]
        if self.bos_id is not None:
            D[:, self.bos_id] = -np.inf
        return D


def _stable_log10(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log10(x)


# ---------------------------------------------------------------- estimation


class _Counts:
    """Counts of every order from a corpus of id sequences (see ``_count``)."""

    keys: list       # keys[k-1]: sorted unique keys of order k (None for k=1)
    raw: list        # raw counts (dense (V,) for k=1)
    nonext: list     # occurrences with no left neighbour (sentence start / after <s>)
    prefix: list     # prefix node (order k-1) of each entry (None for k=1)


@dataclass
class _Packed:
    """Sequences already concatenated: ids (int, total,), lens (num_sequences,)."""

    ids: np.ndarray
    lens: np.ndarray


def _encode_lines(lines, vocab: Sequence[str] | None) -> tuple[_Packed, list[str], dict[str, int]]:
    """Word lines (strings or token lists) as packed ids, in one pass; the
    vocabulary grows by first occurrence unless given (then unknown words
    are <unk>, or an error without one)."""

    given = vocab is not None
    index = _index(vocab) if given else _index(("<unk>", "<s>", "</s>"))
    unk = index.get("<unk>")
    ids, lens = array("i"), array("q")
    for ln in lines:
        words = split_words(ln) if isinstance(ln, str) else ln
        if given:
            row = [index.get(w, -1) for w in words]
            if -1 in row:
                if unk is None:
                    w = next(w for w in words if w not in index)
                    raise ValueError(f"word {w!r} is not in the vocabulary and the model has no <unk>")
                row = [unk if i < 0 else i for i in row]
        else:
            row = [index.setdefault(w, len(index)) for w in words]
        ids.extend(row)
        lens.append(len(row))
    packed = _Packed(np.frombuffer(ids, dtype=np.int32) if ids else np.zeros(0, dtype=np.int32),
                     np.frombuffer(lens, dtype=np.int64) if lens else np.zeros(0, dtype=np.int64))
    return packed, (list(vocab) if given else list(index)), index


def _flatten(sequences, V: int, bos: int | None, eos: int | None, add_bos_eos: bool, drop: int | None):
    """One int64 array of all tokens (wrapped in <s> ... </s> if asked) and a
    flag marking the first token of each non-empty sequence."""
    if isinstance(sequences, _Packed):
        if sequences.lens.size == 0:
            raise ValueError("no sequences to count: give at least one sequence of token ids")
        return _wrap(sequences.ids.astype(np.int64), sequences.lens, V, bos, eos, add_bos_eos, drop)
    sequences = _from_torch(sequences)
    if isinstance(sequences, np.ndarray) and sequences.ndim == 1:
        seqs = [sequences]  # a single stream
    else:
        seqs = list(sequences)
    if not seqs:
        raise ValueError("no sequences to count: give at least one sequence of token ids")
    if all(type(s) is np.ndarray for s in seqs):  # the common case, without a Python step per sequence
        try:
            lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
            flat = np.concatenate(seqs)
        except (TypeError, ValueError):  # a 0-d array or mixed dimensions: the loop below names it
            pass
        else:
            if flat.ndim == 1 and flat.size == lens.sum() and (flat.size == 0 or flat.dtype.kind in "iu"):
                return _wrap(flat.astype(np.int64, copy=False), lens, V, bos, eos, add_bos_eos, drop)
    arrs = []
    for i, s in enumerate(seqs):
        if type(s) is not np.ndarray:
            a = np.asarray(_from_torch(s))
        else:
            a = s
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):  # kind: np.issubdtype(dtype, np.integer), cheaper
            raise ValueError(f"sequence {i} must be a 1-D sequence of integer token ids, got shape {a.shape} dtype {a.dtype}")
        arrs.append(a)
    lens = np.fromiter((a.size for a in arrs), dtype=np.int64, count=len(arrs))
    flat = np.concatenate(arrs).astype(np.int64, copy=False) if lens.sum() else np.zeros(0, dtype=np.int64)
    return _wrap(flat, lens, V, bos, eos, add_bos_eos, drop)


def _wrap(flat: np.ndarray, lens: np.ndarray, V: int, bos, eos, add_bos_eos: bool, drop):
    """Checks, <unk> dropping and <s> ... </s> wrapping of packed sequences (see ``_flatten``)."""
    ends = np.cumsum(lens)

    def where(mask: np.ndarray) -> tuple[int, int]:
        j = int(np.flatnonzero(mask)[0])
        return int(np.searchsorted(ends, j, side="right")), int(flat[j])

    if flat.size and (flat.min() < 0 or flat.max() >= V):
        i, bad = where((flat < 0) | (flat >= V))
        raise ValueError(f"sequence {i} has token id {bad}, outside the vocabulary [0, {V})")
    if add_bos_eos and flat.size:
        m = (flat == bos) | (flat == eos)
        if m.any():
            i, _ = where(m)
            raise ValueError(
                f"sequence {i} already contains <s> (id {bos}) or </s> (id {eos}); "
                "pass add_bos_eos=False for sequences that carry their own boundaries"
            )
    if drop is not None and flat.size:
        keep = flat != drop
        seq_of = np.repeat(np.arange(lens.size), lens)
        lens = np.bincount(seq_of[keep], minlength=lens.size).astype(np.int64)
        flat = flat[keep]
    if add_bos_eos:
        tot = lens + 2
        starts = np.cumsum(tot) - tot
        tok = np.empty(int(tot.sum()), dtype=np.int64)
        mid = np.ones(tok.size, dtype=bool)
        mid[starts] = False
        mid[starts + lens + 1] = False
        tok[starts] = bos
        tok[starts + lens + 1] = eos
        tok[mid] = flat
    else:
        tok = flat
        starts = (np.cumsum(lens) - lens)[lens > 0]
    seg_start = np.zeros(tok.size, dtype=bool)
    seg_start[starts] = True
    return tok, seg_start


def _count(tok: np.ndarray, seg_start: np.ndarray, N: int, V: int, bos: int | None) -> _Counts:
    """Counts of every order. Per n-gram it keeps the int64 key and int32
    raw count, left-less count and prefix node (20 bytes); per corpus
    position one node array of the current order at a time."""
    n = tok.size
    pos = np.arange(n, dtype=np.int64)
    boundary = seg_start.copy()
    if bos is not None:
        boundary |= tok == bos
    run_start = np.maximum.accumulate(np.where(boundary, pos, 0)) if n else pos
    # length of the longest valid n-gram ending here, capped at N + 1 (only "== k" and ">= k" for k <= N are asked)
    span = np.minimum(pos - run_start + 1, N + 1).astype(np.uint8 if N < 255 else np.int64)
    del pos, run_start, boundary
    pred = np.ones(n, dtype=bool) if bos is None else tok != bos
    if not pred.any():
        raise ValueError("no tokens to count: every sequence is empty (and add_bos_eos=False)")
    C = _Counts()
    C.keys, C.raw, C.nonext, C.prefix = [None], [], [], [None]
    C.raw.append(np.bincount(tok[pred], minlength=V).astype(np.int64))
    C.nonext.append(np.bincount(tok[pred & (span == 1)], minlength=V).astype(np.int64))
    node = tok  # node of the k-gram ending at each position (a unigram's node is its id; <s> included)
    for k in range(2, N + 1):
        at = np.flatnonzero(pred & (span >= k))
        if at.size == 0:
            C.keys.append(np.zeros(0, dtype=np.int64))
            C.raw.append(np.zeros(0, dtype=np.int32))
            C.nonext.append(np.zeros(0, dtype=np.int32))
            C.prefix.append(np.zeros(0, dtype=np.int32))
            node = np.full(n, -1, dtype=np.int32)
            continue
        q = np.multiply(node[at], V, dtype=np.int64)
        q += tok[at - (k - 1)]
        uniq, inv, cnt = _unique_inverse_counts(q)
        del q
        C.keys.append(uniq)
        C.raw.append(cnt)
        C.nonext.append(np.bincount(inv[span[at] == k], minlength=uniq.size).astype(np.int32))
        # the prefix x1..x_{k-1} of the k-gram ending at j ends at j-1: its node is node_{k-1}[j-1]
        prefix = np.empty(uniq.size, dtype=_index_dtype(C.raw[k - 2].size))
        prefix[inv] = node[at - 1]
        C.prefix.append(prefix)
        node = np.full(n, -1, dtype=inv.dtype)
        node[at] = inv
        del at, inv
    return C


def _index_dtype(n: int):
    return np.int32 if n < 2**31 else np.int64


def _unique_inverse_counts(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """np.unique(q, return_inverse=True, return_counts=True) with int32
    inverse and counts, in less memory."""
    perm = np.argsort(q)
    qs = q[perm]
    first = np.empty(qs.size, dtype=bool)
    first[0] = True
    np.not_equal(qs[1:], qs[:-1], out=first[1:])
    uniq = qs[first]
    del qs
    dt = _index_dtype(uniq.size)
    inv = np.empty(q.size, dtype=dt)
    inv[perm] = np.cumsum(first, dtype=dt) - 1
    del perm
    starts = np.flatnonzero(first)
    cnt = np.diff(starts, append=q.size).astype(np.int32 if q.size < 2**31 else np.int64)
    return uniq, inv, cnt


def _estimate_discounts(a: np.ndarray, k: int, cfg: NGramConfig) -> list[float]:
    """Chen & Goodman's D1, D2, D3+ for order k from adjusted counts ``a``."""
    if cfg.discounts is not None:
        return list(cfg.discounts[k - 1])
    n = [int(np.count_nonzero(a == r)) for r in range(5)]
    problem = None
    for r in (1, 2, 3):
        if n[r] == 0:
            problem = (
                f"no {k}-grams have adjusted count {r} (count-of-counts n{r} = 0), so D{r} "
                f"{'and D' + str(r + 1) + '+ ' if r < 3 else ''}cannot be estimated"
            )
            break
    D = [0.0, 0.0, 0.0]
    if problem is None:
        y = n[1] / (n[1] + 2.0 * n[2])
        for r in (1, 2, 3):
            D[r - 1] = r - (r + 1) * y * n[r + 1] / n[r]
            if not (0.0 <= D[r - 1] <= r):
                problem = (
                    f"the {k}-gram discount D{r}{'+' if r == 3 else ''} = {D[r - 1]:.4g} is outside [0, {r}] "
                    f"(count-of-counts n1..n4 = {n[1:]})"
                )
                break
    if problem is None:
        return D
    msg = f"Kneser-Ney: {problem}; this happens on tiny, artificial or character-level data."
    if cfg.strict:
        raise ValueError(
            msg + " Pass strict=False to use fallback discounts "
            f"{cfg.fallback_discounts} (KenLM's --discount_fallback), or give discounts=[[D1, D2, D3+], ...] per order."
        )
    warnings.warn(
        msg + f" Using the fallback discounts D1, D2, D3+ = {cfg.fallback_discounts} for order {k} "
        "(KenLM's --discount_fallback defaults); pass strict=True to make this an error.",
        DiscountWarning,
        stacklevel=4,
    )
    return list(cfg.fallback_discounts)


def _estimate(C: _Counts, cfg: NGramConfig):
    """Tables (keys, log10 prob, log10 backoff) of the chosen estimator.
    Consumes ``C``: the counts of an order are dropped once its table is
    made, and a table is kept in float64 only while the next order needs it."""
    N, V, Vp, bos = cfg.order, cfg.vocab_size, cfg.num_predictable, cfg.bos_id
    sizes = [V] + [C.keys[k].size for k in range(1, N)]
    keys = [None] + [C.keys[k] for k in range(1, N)]
    probs: list = []
    bos_: list = [None] * N  # log10 backoff / floor, float32
    used: list[list[float]] = []
    method = cfg.method

    def finish(k: int, p: np.ndarray, kn: bool) -> None:
        """Order k's probabilities are no longer needed in float64."""
        lp = np.minimum(_stable_log10(p), 0.0) if kn else _stable_log10(p)
        probs[k - 1] = lp.astype(np.float32)
        if bos_[k - 1] is None:
            bos_[k - 1] = np.zeros(sizes[k - 1], dtype=np.float32)

    if method == "kneser_ney":
        adj = []
        for k in range(1, N + 1):
            if k == N:
                a = C.raw[k - 1]
            else:
                a = np.bincount(keys[k] // V, minlength=sizes[k - 1]).astype(np.int64) + C.nonext[k - 1]
            if k == 1 and bos is not None:
                a = a.copy()
                a[bos] = 0
            adj.append(a)
            C.raw[k - 1] = C.nonext[k - 1] = None
        for k in range(1, N + 1):
            a = adj[k - 1]
            D = _estimate_discounts(a, k, cfg)
            used.append(D)
            Dk = np.array([0.0] + D)
            disc = Dk[np.minimum(a, 3)]
            if k == 1:
                denom = float(a.sum())
                c = [np.count_nonzero(a == 1), np.count_nonzero(a == 2), np.count_nonzero(a >= 3)]
                gamma0 = (D[0] * c[0] + D[1] * c[1] + D[2] * c[2]) / denom
                p = (a - disc) / denom + gamma0 / Vp
                if bos is not None:
                    p[bos] = 0.0
            else:
                pre = C.prefix[k - 1]
                n_ctx = sizes[k - 2]
                denom = np.bincount(pre, weights=a, minlength=n_ctx)
                g = (
                    D[0] * np.bincount(pre, weights=(a == 1), minlength=n_ctx)
                    + D[1] * np.bincount(pre, weights=(a == 2), minlength=n_ctx)
                    + D[2] * np.bincount(pre, weights=(a >= 3), minlength=n_ctx)
                )
                has = denom > 0
                gamma = np.zeros(n_ctx)
                gamma[has] = g[has] / denom[has]
                del g
                p = (a - disc) / denom[pre] + gamma[pre] * probs[k - 2][keys[k - 1] // V]
                bos_[k - 2] = np.where(has, _stable_log10(np.where(has, gamma, 1.0)), 0.0).astype(np.float32)
                del denom, gamma, has, pre
                C.prefix[k - 1] = None
                finish(k - 1, probs[k - 2], kn=True)
            del disc
            adj[k - 1] = None
            probs.append(p)
        finish(N, probs[N - 1], kn=True)
    elif method in ("mle", "addk"):
        kk = cfg.k if method == "addk" else 0.0
        for k in range(1, N + 1):
            raw = C.raw[k - 1].astype(np.float64)
            if k == 1:
                p = (raw + kk) / (raw.sum() + kk * Vp)
                if bos is not None:
                    p[bos] = 0.0
            else:
                pre = C.prefix[k - 1]
                tot = np.bincount(pre, weights=raw, minlength=sizes[k - 2])
                p = (raw + kk) / (tot[pre] + kk * Vp)
                has = tot > 0
                if method == "mle":
                    bos_[k - 2] = np.where(has, -np.inf, 0.0).astype(np.float32)
                else:
                    bos_[k - 2] = np.where(has, _stable_log10(kk / (tot + kk * Vp)), 0.0).astype(np.float32)
            C.raw[k - 1] = C.prefix[k - 1] = C.nonext[k - 1] = None
            probs.append(p)
            finish(k, p, kn=False)
    else:
        raise ValueError(f"method {method!r} cannot be estimated from counts; use kneser_ney, mle or addk")
    return keys, probs, bos_, used


# ---------------------------------------------------------------- vocabulary helpers


def build_vocab(
    sentences: Iterable[str | Sequence[str]], specials: Sequence[str] = ("<unk>", "<s>", "</s>")
) -> list[str]:
    """Specials first (KenLM's order: <unk>=0, <s>=1, </s>=2), then the words
    of ``sentences`` (strings split on whitespace, or token lists) in order of
    first occurrence."""
    vocab = list(specials)
    seen = set(vocab)
    for s in sentences:
        for w in split_words(s) if isinstance(s, str) else s:
            if w not in seen:
                seen.add(w)
                vocab.append(w)
    return vocab


def _index(vocab: Sequence[str]) -> dict[str, int]:
    return {w: i for i, w in enumerate(vocab)}


# ---------------------------------------------------------------- the model


class NGramLM:
    """Backoff n-gram model on numpy alone; see the module docstring for the
    conventions. :class:`lmlab.models.ngram.NGramModel` is this model behind
    the torch interface (``logits, state = model(ids, state)``)."""

    def __init__(self, config: NGramConfig):
        self.config = config
        self.vocab: list[str] | None = None  # set by from_arpa / from_text; not saved
        self._cache_key = None
        self._cache: _Tables | None = None
        self._allocate(config.sizes or [config.vocab_size] + [0] * (config.order - 1))

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def special_ids(self) -> dict[str, int]:
        """<s>, </s> and <unk> as the config names them (roles "bos", "eos", "unk")."""
        c = self.config
        return {role: int(i) for role, i in (("bos", c.bos_id), ("eos", c.eos_id), ("unk", c.unk_id)) if i is not None}

    # ------------------------------------------------------------ storage
    # Order k's arrays are named keys_k (k >= 2), prob_k and backoff_k. The
    # four methods below are where they live (NGramModel keeps torch buffers).
    def _allocate(self, sizes: list[int]) -> None:
        """Tables of ``sizes`` entries per order, every word uniform."""
        V = self.config.vocab_size
        p1 = np.full(V, -math.log10(self.config.num_predictable), dtype=np.float32)
        if self.config.bos_id is not None:
            p1[self.config.bos_id] = -np.inf
        arrays = {"prob_1": p1, "backoff_1": np.zeros(V, dtype=np.float32)}
        for k in range(2, self.config.order + 1):
            arrays[f"keys_{k}"] = np.zeros(sizes[k - 1], dtype=np.int64)
            arrays[f"prob_{k}"] = np.zeros(sizes[k - 1], dtype=np.float32)
            arrays[f"backoff_{k}"] = np.zeros(sizes[k - 1], dtype=np.float32)
        self._arrays = arrays

    def _store(self, arrays: dict[str, np.ndarray]) -> None:
        self._arrays = arrays

    def _stored(self) -> dict[str, np.ndarray]:
        return self._arrays

    def _stored_version(self):
        """Changes whenever the stored arrays may have (then the lookup tables are rebuilt)."""
        return tuple(id(a) for a in self._arrays.values())

    def _tables(self) -> _Tables:
        key = self._stored_version()
        if key != self._cache_key or self._cache is None:
            a, N = self._stored(), self.config.order
            keys = [None] + [a[f"keys_{k}"] for k in range(2, N + 1)]
            prob = [a[f"prob_{k}"].astype(np.float32, copy=False) for k in range(1, N + 1)]
            bo = [a[f"backoff_{k}"].astype(np.float32, copy=False) for k in range(1, N + 1)]
            self._cache = _Tables(self.config.vocab_size, keys, prob, bo, self.config.method, self.config.bos_id)
            self._cache_key = key
        return self._cache

    def _set_tables(self, keys: list, prob: list, bo: list) -> None:
        """Store the tables (lists of arrays per order, consumed: see _in_bucket_order)."""
        _in_bucket_order(keys, prob, bo, self.config.vocab_size)
        arrays = {}
        for k in range(1, self.config.order + 1):
            if k > 1:
                arrays[f"keys_{k}"] = np.ascontiguousarray(keys[k - 1], dtype=np.int64)
            arrays[f"prob_{k}"] = np.ascontiguousarray(prob[k - 1], dtype=np.float32)
            arrays[f"backoff_{k}"] = np.ascontiguousarray(bo[k - 1], dtype=np.float32)
        self._store(arrays)
        self.config.sizes = [int(p.shape[0]) for p in prob]
        self._cache_key = None
        self._cache = None

    def prepare(self) -> "NGramLM":
        """Build the lookup indexes now (otherwise built on first use); ``fit``
        and ``from_arpa`` call it, so their timings include it."""
        T = self._tables()
        for k in range(2, self.order + 1):
            T.index(k)
        return self

    @property
    def order(self) -> int:
        return self.config.order

    @property
    def sizes(self) -> list[int]:
        """Number of n-grams stored per order."""
        a = self._stored()
        return [int(a[f"prob_{k}"].shape[0]) for k in range(1, self.order + 1)]

    # ------------------------------------------------------------ estimation
    def fit(self, sequences, *, add_bos_eos: bool = True, drop_unk: bool = False) -> "NGramLM":
        """Estimate the tables from ``sequences`` (a list of 1-D id sequences,
        one per sentence, or a single 1-D array = one stream). With
        ``add_bos_eos`` each is wrapped in ``<s> ... </s>`` (needs ``bos_id``
        and ``eos_id``); otherwise sequences are used as given and a ``<s>``
        inside one starts a new sentence. ``drop_unk`` deletes ``unk_id``
        tokens first (lmplz ``--skip_symbols``). Returns ``self``."""
        cfg = self.config
        if cfg.method == "backoff":
            raise ValueError("method 'backoff' is for models read from ARPA files; fit with kneser_ney, mle or addk")
        if add_bos_eos and (cfg.bos_id is None or cfg.eos_id is None):
            raise ValueError(
                f"add_bos_eos=True needs bos_id and eos_id in the config (got {cfg.bos_id}, {cfg.eos_id}); "
                "set them or pass add_bos_eos=False"
            )
        if drop_unk and cfg.unk_id is None:
            raise ValueError("drop_unk=True needs unk_id in the config")
        tok, seg_start = _flatten(
            sequences, cfg.vocab_size, cfg.bos_id, cfg.eos_id, add_bos_eos, cfg.unk_id if drop_unk else None
        )
        C = _count(tok, seg_start, cfg.order, cfg.vocab_size, cfg.bos_id)
        del tok, seg_start
        for k in range(2, cfg.order + 1):
            if C.keys[k - 1].size and C.keys[k - 1][-1] >= np.iinfo(np.int64).max // 2:
                raise ValueError("n-gram keys overflow int64; the vocabulary or the corpus is too large")
        keys, prob, bo, used = _estimate(C, cfg)
        del C  # holds the key arrays too: the old order must go as the tables are rearranged
        self._set_tables(keys, prob, bo)
        cfg.discounts_used = used if cfg.method == "kneser_ney" else None
        return self.prepare()

    @classmethod
    def from_text(
        cls,
        lines: Iterable[str | Sequence[str]],
        *,
        order: int = 3,
        method: str = "kneser_ney",
        vocab: Sequence[str] | None = None,
        **config,
    ) -> tuple["NGramLM", list[str]]:
        """Build from whitespace-tokenized lines (one sentence each, as lmplz
        reads them; words split on ASCII whitespace, see
        :func:`lmlab.tokenizers.split_words`), read once and kept as ids only, so
        an open file can be given. The vocabulary is ``vocab`` or
        ``build_vocab(lines)`` (<unk>, <s>, </s>, then words by first
        occurrence); words outside a given vocabulary become <unk>. Returns
        (model, vocabulary)."""
        fit_kw = {k: config.pop(k) for k in ("add_bos_eos", "drop_unk") if k in config}
        packed, vocab, index = _encode_lines(lines, vocab)
        cfg = NGramConfig(
            vocab_size=len(vocab),
            order=order,
            method=method,
            bos_id=index.get("<s>"),
            eos_id=index.get("</s>"),
            unk_id=index.get("<unk>"),
            **config,
        )
        model = cls(cfg)
        model.fit(packed, **fit_kw)
        model.vocab = vocab
        return model, vocab

    # ------------------------------------------------------------ ARPA
    @classmethod
    def from_arpa(
        cls, path: str | Path, *, bos: str = "<s>", eos: str = "</s>", unk: str = "<unk>"
    ) -> tuple["NGramLM", list[str]]:
        """Load an ARPA file (from lmlab, KenLM, SRILM ...). Returns
        (model, vocabulary): word id i is the i-th unigram of the file. The
        model's method is ``"backoff"``. n-grams whose prefix or suffix is
        missing from the file (pruned SRILM models) are added with backoff 0
        and the probability the model gives them, which changes no score."""
        from lmlab.arpa import iter_arpa, read_arpa

        sections = iter_arpa(path, dtype=np.float32)  # the tables keep float32
        try:
            counts = next(sections)
            unigrams = next(sections)
            vocab = unigrams.vocab
            index = _index(vocab)
            cfg = NGramConfig(
                vocab_size=len(vocab),
                order=len(counts),
                method="backoff",
                bos_id=index.get(bos),
                eos_id=index.get(eos),
                unk_id=index.get(unk),
            )
            built = _tables_from_sections(unigrams, sections, cfg, path)
        finally:
            sections.close()
        model = cls(cfg)
        if built is not None:
            keys, prob, bo, T = built
            model._set_tables(keys, prob, bo)
            model._tables()._hash.update(T._hash)  # the same key arrays: keep their indexes
        else:  # some n-gram lacks its prefix or suffix: read it all, then close the table
            model._set_tables(*_tables_from_arpa(read_arpa(path), cfg, path))
        model.vocab = vocab
        return model.prepare(), vocab

    def write_arpa(self, path: str | Path, vocab: Sequence[str] | None = None, *, max_dense_entries: int = 5_000_000) -> None:
        """Write the model as an ARPA file that KenLM and SRILM can query with
        the same probabilities. ``vocab[i]`` is the word of id i (default: the
        vocabulary the model was built or loaded with). Add-k models are
        written densely (every word after every seen context); if that needs
        more than ``max_dense_entries`` n-grams a ``ValueError`` is raised."""
        from lmlab.arpa import write_arpa

        vocab = list(vocab) if vocab is not None else self.vocab
        if vocab is None:
            raise ValueError("write_arpa needs the vocabulary (vocab[i] = word of id i)")
        if len(vocab) != self.config.vocab_size:
            raise ValueError(f"vocabulary has {len(vocab)} words, the model has vocab_size {self.config.vocab_size}")
        T = self._tables()
        if self.config.method == "addk":
            grams, probs, bos_ = _dense_addk(T, self.config, max_dense_entries)
        else:
            grams = [_OrderWords(T, k) for k in range(1, self.order + 1)]  # made block by block as written
            probs = list(T.prob)
            bos_ = list(T.bo)
        if self.config.bos_id is not None:
            probs[0] = probs[0].copy()
            probs[0][self.config.bos_id] = -np.inf
        write_arpa(path, vocab, grams, probs, bos_)

    # ------------------------------------------------------------ numpy scoring
    def logprob10(self, contexts: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """log10 p(target | context) for M queries: contexts (M, L) of ids,
        oldest first (-1 = no token; only the last n-1 are used), targets (M,)."""
        contexts = np.asarray(contexts, dtype=np.int64)
        targets = np.asarray(targets, dtype=np.int64)
        if contexts.ndim != 2 or targets.shape != (contexts.shape[0],):
            raise ValueError(f"contexts must be (M, L) and targets (M,), got {contexts.shape} and {targets.shape}")
        V = self.config.vocab_size
        if targets.size and (targets.min() < 0 or targets.max() >= V):
            raise ValueError(f"target ids must lie in [0, {V})")
        if contexts.size and contexts.max() >= V:
            raise ValueError(f"context ids must lie in [0, {V}) (or -1 for no token)")
        return self._tables().logprob10(contexts, targets)

    def score_sequences(self, sequences, *, add_bos_eos: bool = True) -> np.ndarray:
        """log10 probability of each sequence (KenLM's ``score(s, bos, eos)``
        for all of them at once): with ``add_bos_eos``, <s> is context and
        </s> is predicted. Returns float64 (num_sequences,)."""
        cfg = self.config
        if add_bos_eos and (cfg.bos_id is None or cfg.eos_id is None):
            raise ValueError("add_bos_eos=True needs bos_id and eos_id in the config")
        seqs = _as_list(sequences)
        if not seqs:
            return np.zeros(0)
        tok, seg_start = _flatten(seqs, cfg.vocab_size, cfg.bos_id, cfg.eos_id, add_bos_eos, None)
        seg = np.cumsum(seg_start) - 1
        lp, at = _score_flat(self._tables(), tok, seg_start, cfg.bos_id)
        out = np.zeros(len(seqs))
        if add_bos_eos:
            idx = np.arange(len(seqs))
        else:  # an empty sequence scores 0 and has no segment
            idx = np.flatnonzero(np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs)))
        out[idx] = np.bincount(seg[at], weights=lp, minlength=idx.size)
        return out

    def perplexity(self, sequences, *, add_bos_eos: bool = True) -> float:
        """KenLM-style perplexity: 10 ** (-total log10 / predicted tokens),
        counting </s> and not <s>."""
        seqs = _as_list(sequences)
        total = float(self.score_sequences(seqs, add_bos_eos=add_bos_eos).sum())
        n = sum(len(s) for s in seqs) + (len(seqs) if add_bos_eos else 0)
        if not add_bos_eos and self.config.bos_id is not None:
            n -= sum(int(np.count_nonzero(np.asarray(s) == self.config.bos_id)) for s in seqs)
        if n == 0:
            raise ValueError("perplexity of no tokens is undefined")
        return float(10.0 ** (-total / n))

    # ------------------------------------------------------------ words
    def encode(self, words: str | Sequence[str], vocab: Sequence[str] | None = None, *, index: dict | None = None) -> np.ndarray:
        """Word ids of ``words`` (a whitespace-separated string or a list);
        words outside the vocabulary become ``unk_id`` (``ValueError`` if the
        model has no <unk>)."""
        vocab = vocab if vocab is not None else self.vocab
        if vocab is None:
            raise ValueError("encode needs the vocabulary (vocab[i] = word of id i)")
        if index is None:
            index = _index(vocab)
        unk = self.config.unk_id
        out = []
        for w in split_words(words) if isinstance(words, str) else words:
            i = index.get(w)
            if i is None:
                if unk is None:
                    raise ValueError(f"word {w!r} is not in the vocabulary and the model has no <unk>")
                i = unk
            out.append(i)
        return np.array(out, dtype=np.int64)

    def score_words(self, words: str | Sequence[str], vocab: Sequence[str] | None = None, *, bos: bool = True, eos: bool = True) -> float:
        """log10 probability of a sentence, like ``kenlm.Model.score(sentence,
        bos=bos, eos=eos)``; out-of-vocabulary words are scored as <unk>."""
        ids = self.encode(words, vocab)
        cfg = self.config
        if (bos and cfg.bos_id is None) or (eos and cfg.eos_id is None):
            raise ValueError("bos/eos scoring needs bos_id/eos_id in the config")
        seq = ([cfg.bos_id] if bos else []) + ids.tolist() + ([cfg.eos_id] if eos else [])
        start = 1 if bos else 0
        if len(seq) <= start:
            return 0.0
        n1 = self.order - 1
        padded = [-1] * n1 + seq
        ctx = np.array([padded[i:i + n1] for i in range(start, len(seq))], dtype=np.int64).reshape(len(seq) - start, n1)
        return float(self._tables().logprob10(ctx, np.array(seq[start:], dtype=np.int64)).sum())


def _from_torch(x):
    """A torch tensor as a numpy array; anything else as it is. (Only a
    caller that imported torch can hold a tensor, so torch is never imported here.)"""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return x


class _OrderWords:
    """The (n_k, k) word ids of order k's entries, made only for the rows a
    slice asks for (``write_arpa`` writes a block of entries at a time)."""

    def __init__(self, T: _Tables, k: int):
        self.T, self.k = T, k

    def __len__(self) -> int:
        return self.T.prob[self.k - 1].shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.T.words_of(self.k, np.arange(len(self))[rows])


def _as_list(sequences) -> list:
    sequences = _from_torch(sequences)
    if isinstance(sequences, np.ndarray) and sequences.ndim == 1:
        return [sequences]
    return list(sequences)


def _score_flat(T: _Tables, tok: np.ndarray, seg_start: np.ndarray, bos: int | None):
    """log10 p of every predicted token of a flattened corpus and its position;
    n-grams never cross a sequence start or a <s>.

    Order by order, the k-grams ending at each position are looked up
    straight from ``tok``, only where the (k-1)-gram was found. The longest match m gives prob_m; the backoffs of
    the context's j-grams for j >= m are then added in increasing j (the sum
    ``combine`` makes, term for term, so the results are identical)."""
    n, N, V = tok.size, T.order, T.V
    pos = np.arange(n, dtype=np.int64)
    boundary = seg_start.copy()
    if bos is not None:
        boundary |= tok == bos
    span = pos - np.maximum.accumulate(np.where(boundary, pos, 0)) if n else pos  # tokens before i in its run
    at = np.flatnonzero(tok != bos) if bos is not None else pos
    addk = T.method == "addk"  # its floors need every node (combine); the backoff rule needs the values only
    nodes = np.full((N, n), -1, dtype=np.int64) if addk else None
    if addk:
        nodes[0] = tok
    logp = T.prob[0][tok].astype(np.float64)  # prob of the longest match so far
    match = np.ones(n, dtype=np.int8)
    bov = np.zeros((N - 1, n), dtype=np.float32)  # backoff of the j-gram ending at i (0: absent)
    if N > 1:
        bov[0] = T.bo[0][tok]
    alive = np.flatnonzero(span >= 1)
    cur = tok[alive]
    for k in range(2, N + 1):
        if k > 2:
            keep = span[alive] >= k - 1
            alive, cur = alive[keep], cur[keep]
        found = T.index(k).find(cur * V + tok[alive - (k - 1)])
        hit = found >= 0
        alive, cur = alive[hit], found[hit]
        if not alive.size:
            break
        if addk:
            nodes[k - 1, alive] = cur
            continue
        logp[alive] = T.prob[k - 1][cur]
        match[alive] = k
        if k < N:
            bov[k - 1, alive] = T.bo[k - 1][cur]
    if addk:
        cn = nodes[: N - 1, at - 1]
        cn[:, span[at] == 0] = -1  # no context at the start of a run
        return T.combine(nodes[:, at], cn), at
    out = logp[at]
    m = match[at]
    m[span[at] == 0] = N  # no context: no backoff
    prev = at - 1
    for j in range(1, N):
        out += np.where(m <= j, bov[j - 1, prev], np.float32(0))
    return out, at


def _release_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``).
    Reading an ARPA file frees each section's temporaries in the middle of the
    heap, where they stay resident (glibc returns only the top of the heap);
    trimming between sections keeps them out of the peak. A no-op where the
    C library has no ``malloc_trim``."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _tables_from_sections(unigrams, sections, cfg: NGramConfig, path):
    """Tables of an ARPA file built order by order as :func:`iter_arpa`
    parses it (one section's word ids in memory at a time). Returns (keys,
    prob, backoff, the _Tables with their hash indexes), or None when an
    n-gram's prefix or suffix is missing (then ``_tables_from_arpa`` closes
    the table)."""
    from lmlab.arpa import ArpaFormatError

    V = cfg.vocab_size
    keys: list = [None]
    prob = [unigrams.probs.astype(np.float32)]
    bo = [unigrams.backoffs.astype(np.float32)]
    T = _Tables(V, keys, prob, bo, "backoff", cfg.bos_id)  # grows with the lists
    prefix_of = None  # node of each entry's prefix, for the order just built
    for sec in sections:
        _release_freed_memory()  # the parser's temporaries
        k, n = sec.order, sec.ids.shape[0]
        key = np.empty(n, dtype=np.int64)
        prefix = np.empty(n, dtype=_index_dtype(prob[k - 2].shape[0]))
        for s in range(0, n, _LOOKUP_ROWS):  # in blocks: the lookups' temporaries stay small
            g = sec.ids[s:s + _LOOKUP_ROWS]
            suffix = T.lookup(g[:, 1:])
            if (suffix < 0).any():
                return None
            if k == 2:
                prefix[s:s + _LOOKUP_ROWS] = g[:, 0]
            else:  # x1..x_{k-1} = x1 before x2..x_{k-1}, the prefix of the suffix x2..xk
                pre = T.index(k - 1).find(prefix_of[suffix].astype(np.int64) * V + g[:, 0])
                if (pre < 0).any():
                    return None
                prefix[s:s + _LOOKUP_ROWS] = pre
            key[s:s + _LOOKUP_ROWS] = suffix * V + g[:, 0]
        sec.ids = None
        order = np.argsort(key)
        key = key[order]
        dup = np.flatnonzero(key[1:] == key[:-1])
        if dup.size:
            a, b = sorted((int(order[dup[0]]), int(order[dup[0] + 1])))
            raise ArpaFormatError(path, sec.first_line + b, f"duplicate {k}-gram (first given on line {sec.first_line + a})")
        del dup
        by_bucket = _by_bucket(_bucket_of(key, max(1, n)))  # key ascends: as _in_bucket_order stores it
        key = key[by_bucket]
        order = order[by_bucket]
        del by_bucket
        prefix_of = prefix[order] if k < cfg.order else None  # the next order's lookups need it
        del prefix
        keys.append(key)
        prob.append(sec.probs[order].astype(np.float32, copy=False))
        bo.append(sec.backoffs[order].astype(np.float32, copy=False))
        sec.probs = sec.backoffs = None
        del order, sec
        T.index(k)
        _release_freed_memory()  # this order's temporaries
    if cfg.bos_id is not None:
        prob[0][cfg.bos_id] = -np.inf
    return keys, prob, bo, T


def _tables_from_arpa(t, cfg: NGramConfig, path):
    from lmlab.arpa import ArpaFormatError

    V, N = cfg.vocab_size, t.order
    grams = [g for g in t.ngrams]
    probs = [p for p in t.probs]
    bos_ = [b for b in t.backoffs]
    for attempt in range(2):
        keys = [None]
        prob = [probs[0].astype(np.float32)]
        bo = [bos_[0].astype(np.float32)]
        closed = True
        for k in range(2, N + 1):
            T = _Tables(V, keys, prob, bo, "backoff", cfg.bos_id)
            g = grams[k - 1]
            suffix = T.chain(g[:, 1:])[k - 2]
            prefix = T.chain(g[:, :-1])[k - 2]
            if (suffix < 0).any() or (prefix < 0).any():
                closed = False
                break
            key = suffix * V + g[:, 0]
            order = np.argsort(key, kind="stable")
            key = key[order]
            dup = np.flatnonzero(key[1:] == key[:-1])
            if dup.size:  # read_arpa checks this already; keep the guard
                line = int(t.lines[k - 1][order[dup[0] + 1]]) if attempt == 0 else None
                raise ArpaFormatError(path, line, f"duplicate {k}-gram")
            p = probs[k - 1][order].astype(np.float64)
            todo = np.flatnonzero(np.isnan(p))
            if todo.size:
                gg = g[order][todo]
                p[todo] = T.logprob10(gg[:, 1:-1], gg[:, -1]) + bo[k - 2][prefix[order][todo]]
            keys.append(key)
            prob.append(p.astype(np.float32))
            bo.append(bos_[k - 1][order].astype(np.float32))
        if closed:
            if cfg.bos_id is not None:
                prob[0][cfg.bos_id] = -np.inf
            return keys, prob, bo
        if attempt == 1:
            raise RuntimeError("internal error: closing the ARPA n-gram table failed")
        grams, probs, bos_, added = _close_grams(grams, probs, bos_)
        warnings.warn(
            f"{path}: {added} n-grams are prefixes or suffixes of listed n-grams but missing from the file "
            "(a pruned model?); added them with backoff 0 and the probability the model already gives them, "
            "which changes no probability",
            stacklevel=3,
        )
    raise AssertionError("unreachable")


def _close_grams(grams, probs, bos_):
    """Add the missing prefixes and suffixes of every n-gram (prob NaN = to
    compute, backoff 0), from the highest order down."""
    grams, probs, bos_ = list(grams), list(probs), list(bos_)
    N = len(grams)
    added = 0
    for k in range(N, 1, -1):
        have = set(map(tuple, grams[k - 2].tolist()))
        need = set(map(tuple, grams[k - 1][:, :-1].tolist())) | set(map(tuple, grams[k - 1][:, 1:].tolist()))
        missing = sorted(need - have)
        if missing:
            if k - 1 == 1:
                raise RuntimeError("a word of a higher order is missing from the unigrams")  # read_arpa checks
            added += len(missing)
            grams[k - 2] = np.concatenate([grams[k - 2], np.array(missing, dtype=np.int64)])
            probs[k - 2] = np.concatenate([probs[k - 2], np.full(len(missing), np.nan)])
            bos_[k - 2] = np.concatenate([bos_[k - 2], np.zeros(len(missing))])
    return grams, probs, bos_, added


def _dense_addk(T: _Tables, cfg: NGramConfig, limit: int):
    """Every word after every seen context, for writing add-k as ARPA."""
    V, N, bos = cfg.vocab_size, cfg.order, cfg.bos_id
    words = np.arange(V, dtype=np.int64)
    if bos is not None:
        words = words[words != bos]
    Vp = words.size
    rank = np.full(V, -1, dtype=np.int64)
    rank[words] = np.arange(Vp)
    total = V
    seen_nodes = {}
    for k in range(2, N + 1):
        seen_nodes[k] = np.flatnonzero(T.seen_context(k - 1))
        total += seen_nodes[k].size * Vp
    if total > limit:
        raise ValueError(
            f"an add-k model is not a backoff model, so its ARPA file must list every word after every seen "
            f"context: {total} n-grams, more than max_dense_entries={limit}. Raise max_dense_entries, "
            "or write a kneser_ney or mle model instead"
        )
    grams = [np.arange(V, dtype=np.int64)[:, None]]
    probs = [T.prob[0].astype(np.float64)]
    bos_ = [np.zeros(V)]
    for k in range(2, N + 1):
        ctx_nodes = seen_nodes[k]
        ctx_words = T.ngram_words(k - 1)[ctx_nodes]
        g = np.concatenate([np.repeat(ctx_words, Vp, axis=0), np.tile(words, ctx_nodes.size)[:, None]], axis=1)
        p = np.repeat(T.bo[k - 2][ctx_nodes].astype(np.float64), Vp)
        where = np.full(T.prob[k - 2].shape[0], -1, dtype=np.int64)
        where[ctx_nodes] = np.arange(ctx_nodes.size)
        offsets, rows, last = T.csr(k)
        ctx_of_row = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
        p[where[ctx_of_row] * Vp + rank[last]] = T.prob[k - 1][rows]
        grams.append(g)
        probs.append(p)
        bos_.append(np.zeros(g.shape[0]))
    return grams, probs, bos_
