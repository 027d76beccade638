"""Synthetic languages with known entropy: Markov chains of any order over any alphabet.

A source is ground truth for a language model: its entropy rate is the lowest
cross-entropy any model can reach on its samples, and the KL divergence between
its conditionals and a model's is exactly the model's excess cross-entropy.

    chain = MarkovChain("AB", [[0.5, 0.5], [0.25, 0.75]])   # P(x_t | x_{t-1})
    chain.stationary()            # array([1/3, 2/3]) over contexts of length `order`
    chain.entropy_rate("bits")    # 0.8742...
    ids = chain.sample(10_000, seed=0)              # (10000,) int64 stream
    seqs = chain.sample_sequences(64, 32, seed=1)   # (64, 32) independent sequences

    pairs = bigram_pairs(ids)                        # (9999, 2) (x_{t-1}, x_t)
    q = empirical_conditional(ids, chain.vocab_size) # counts / row sums, shape (V, V)
    kl_divergence(chain.transitions, q, chain.stationary())   # exact, nats
    sample_kl_divergence(pairs, chain.transitions, q)         # mean of log P - log Q

Conventions. A chain of order k has a transition table ``transitions`` of shape
``(V,) * k + (V,)``: ``transitions[c_1, ..., c_k, x]`` = P(x_t = x | x_{t-k} = c_1,
..., x_{t-1} = c_k), oldest context symbol first. Contexts flatten row-major to
an index in ``range(V ** k)``. Every random path takes ``seed``: an int, a
``numpy.random.Generator`` or None. Tables are float64; ``0 log 0 = 0``.
"""

from __future__ import annotations

import bisect
import math
from typing import Sequence

import numpy as np

__all__ = [
    "MarkovChain",
    "bigram_pairs",
    "ngram_windows",
    "empirical_counts",
    "empirical_conditional",
    "empirical_marginal",
    "kl_divergence",
    "sample_kl_divergence",
    "entropy",
]

_UNITS = ("nats", "bits")
Seed = int | np.random.Generator | None

# Dense linear solve for the stationary distribution up to this many contexts;
# beyond it, a structured power iteration that never forms the (V^k, V^k) matrix.
_DENSE_LIMIT = 2048


def _unit_scale(unit: str) -> float:
    if unit not in _UNITS:
        raise ValueError(f"unit={unit!r} is not supported; accepted: {_UNITS}")
    return 1.0 if unit == "nats" else 1.0 / math.log(2.0)


def _xlogy_ratio(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Elementwise p * log(p / q) with 0 log(0/q) = 0 and p log(p/0) = inf for p > 0."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    out = np.zeros(np.broadcast(p, q).shape)
    pos = np.broadcast_to(p > 0, out.shape)
    pb, qb = np.broadcast_to(p, out.shape), np.broadcast_to(q, out.shape)
    with np.errstate(divide="ignore"):
        out[pos] = pb[pos] * (np.log(pb[pos]) - np.log(qb[pos]))
    return out


def entropy(p: np.ndarray, unit: str = "nats") -> np.ndarray:
    """Entropy of the distributions along the last axis of ``p``: shape p.shape[:-1]."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return terms.sum(-1) * _unit_scale(unit)


class MarkovChain:
    """A Markov chain of order ``k >= 0`` over ``alphabet``.

    alphabet: a string (one symbol per character) or a sequence of distinct strings.
    transitions: array-like of shape ``(V,) * k + (V,)``; each last-axis row sums to 1.
    order: optional; checked against the number of axes of ``transitions``.
    """

    def __init__(self, alphabet: str | Sequence[str], transitions, order: int | None = None) -> None:
        symbols = tuple(alphabet)
        if len(symbols) < 1:
            raise ValueError("alphabet is empty; give at least one symbol, e.g. 'AB' or ['a', 'b']")
        if len(set(symbols)) != len(symbols):
            raise ValueError(f"alphabet {symbols!r} has repeated symbols; symbols must be distinct")
        table = np.asarray(transitions, dtype=np.float64)
        V = len(symbols)
        k = table.ndim - 1
        if order is not None and order != k:
            raise ValueError(
                f"order={order} needs a transition table of shape {(V,) * (order + 1)}, got shape {table.shape}"
            )
        if k < 0 or table.shape != (V,) * (k + 1):
            raise ValueError(
                f"transition table of shape {table.shape} does not fit an alphabet of {V} symbols; "
                f"an order-k chain needs shape (V,)*k + (V,), e.g. {(V, V)} for order 1"
            )
        if not np.all(np.isfinite(table)) or np.any(table < 0):
            raise ValueError("transition probabilities must be finite and non-negative")
        sums = table.sum(-1)
        bad = np.argwhere(np.abs(sums - 1.0) > 1e-6)
        if bad.size:
            ctx = tuple(int(i) for i in bad[0])
            raise ValueError(
                f"transition row for context {ctx} sums to {sums[ctx]:.6g}; every row over the next symbol must sum to 1"
            )
        self.alphabet: tuple[str, ...] = symbols
        self.transitions: np.ndarray = table / sums[..., None]
        self.transitions.setflags(write=False)  # the cached stationary distribution depends on it
        self._index = {s: i for i, s in enumerate(symbols)}
        self._stationary: np.ndarray | None = None

    # ------------------------------------------------------------ basics

    @property
    def order(self) -> int:
        return self.transitions.ndim - 1

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    @property
    def num_contexts(self) -> int:
        return self.vocab_size**self.order

    def __repr__(self) -> str:
        single = all(len(s) == 1 for s in self.alphabet)
        alphabet = "".join(self.alphabet) if single else list(self.alphabet)
        return f"MarkovChain(alphabet={alphabet!r}, order={self.order})"

    @classmethod
    def random(
        cls,
        alphabet: int | str | Sequence[str],
        order: int = 1,
        seed: Seed = None,
        concentration: float = 1.0,
    ) -> "MarkovChain":
        """A chain whose rows are drawn from a symmetric Dirichlet(``concentration``).

        ``alphabet`` may be an int V (symbols "0", "1", ..., "V-1"). Small
        concentrations give peaked rows (low entropy), large ones near-uniform rows.
        """
        if isinstance(alphabet, int):
            if alphabet < 1:
                raise ValueError(f"alphabet size {alphabet} must be >= 1")
            alphabet = [str(i) for i in range(alphabet)]
        if order < 0:
            raise ValueError(f"order={order} must be >= 0")
        if concentration <= 0:
            raise ValueError(f"concentration={concentration} must be > 0")
        V = len(tuple(alphabet))
        rng = np.random.default_rng(seed)
        table = rng.dirichlet(np.full(V, float(concentration)), size=V**order).reshape((V,) * (order + 1))
        return cls(alphabet, table)

    @classmethod
    def from_corpus(
        cls, corpus: str | Sequence, alphabet: str | Sequence[str], order: int = 1, smoothing: float = 0.0
    ) -> "MarkovChain":
        """The maximum-likelihood chain of ``corpus`` (see ``empirical_conditional``)."""
        symbols = tuple(alphabet)
        ids = _encode(symbols, {s: i for i, s in enumerate(symbols)}, corpus)
        return cls(symbols, empirical_conditional(ids, len(symbols), order, smoothing))

    def encode(self, text: str | Sequence[str]) -> np.ndarray:
        """Symbols -> (T,) int64 ids. A string is split into characters."""
        return _encode(self.alphabet, self._index, text)

    def decode(self, ids) -> str:
        """(T,) ids -> the string of their symbols joined with ''."""
        return "".join(self.alphabet[int(i)] for i in np.asarray(ids).reshape(-1))

    def conditional(self, context: Sequence[int] | str) -> np.ndarray:
        """P(. | context): (V,) for a context of ``order`` symbols (ids or a string)."""
        ctx = self.encode(context) if isinstance(context, str) else np.asarray(context, dtype=np.int64)
        if ctx.shape != (self.order,):
            raise ValueError(f"context {context!r} has {ctx.size} symbols; this chain needs exactly {self.order}")
        return self.transitions[tuple(ctx)]

    def context_matrix(self) -> np.ndarray:
        """(V^k, V^k) transition matrix between contexts (the chain as an order-1 chain)."""
        V, k = self.vocab_size, self.order
        n = V**k
        flat = self.transitions.reshape(n, V)
        M = np.zeros((n, n))
        rows = np.repeat(np.arange(n), V)
        cols = (rows * V + np.tile(np.arange(V), n)) % n
        np.add.at(M, (rows, cols), flat.reshape(-1))
        return M

    # ------------------------------------------------------------ exact quantities

    def stationary(self) -> np.ndarray:
        """The stationary distribution over contexts, shape ``(V,) * order`` (a 0-d 1.0 for order 0).

        Solved exactly (a linear system) up to 2048 contexts, by power iteration
        on the lazy chain beyond. Raises ValueError if it is not unique (a
        reducible chain: give every context a path to every other).
        """
        if self._stationary is None:
            self._stationary = self._solve_stationary()
        return self._stationary.copy()

    def _solve_stationary(self) -> np.ndarray:
        V, k = self.vocab_size, self.order
        n = V**k
        if n <= _DENSE_LIMIT:
            M = self.context_matrix()
            A = np.vstack([M.T - np.eye(n), np.ones((1, n))])
            b = np.zeros(n + 1)
            b[-1] = 1.0
            if np.linalg.matrix_rank(A, tol=1e-10) < n:
                raise ValueError(
                    f"{self!r} has no unique stationary distribution (it is reducible); "
                    "the entropy rate and the stationary marginal need an irreducible chain"
                )
            pi, *_ = np.linalg.lstsq(A, b, rcond=None)
        else:
            pi = np.full((V,) * k, 1.0 / n)
            for _ in range(100_000):
                step = (pi[..., None] * self.transitions).sum(0)  # (V,)*k: drop the oldest symbol
                new = 0.5 * pi + 0.5 * step
                if np.abs(new - pi).max() < 1e-15:
                    pi = new
                    break
                pi = new
            else:
                raise ValueError(f"power iteration for the stationary distribution of {self!r} did not converge")
        pi = np.clip(np.asarray(pi).reshape((V,) * k), 0.0, None)
        return pi / pi.sum()

    def entropy_rate(self, unit: str = "nats") -> float:
        """H = sum_c pi(c) H(P(. | c)) in ``unit`` ("nats" or "bits")."""
        return float((self.stationary() * entropy(self.transitions, unit)).sum())

    def kl_divergence(self, q, marginal: np.ndarray | None = None, unit: str = "nats") -> float:
        """KL(P || Q) of this chain's conditionals against ``q`` (a table or a chain of the same shape),
        weighted by ``marginal`` over contexts (default: this chain's stationary distribution)."""
        q_table = q.transitions if isinstance(q, MarkovChain) else q
        return kl_divergence(self.transitions, q_table, self.stationary() if marginal is None else marginal, unit)

    # ------------------------------------------------------------ sampling and scoring

    def sample(self, length: int, seed: Seed = None, start: Sequence[int] | str | None = None) -> np.ndarray:
        """A stream of ``length`` symbol ids, (length,) int64.

        The first ``order`` symbols are ``start`` if given (they count in the
        length), else drawn from the stationary distribution, so every window
        of the stream is a draw from the stationary process.
        """
        return self.sample_sequences(1, length, seed=seed, start=start)[0]

    def sample_sequences(
        self, num: int, length: int, seed: Seed = None, start: Sequence[int] | str | None = None
    ) -> np.ndarray:
        """``num`` independent sequences of ``length`` ids each: (num, length) int64."""
        if num < 0 or length < 0:
            raise ValueError(f"num={num} and length={length} must be non-negative")
        rng = np.random.default_rng(seed)
        V, k = self.vocab_size, self.order
        n_ctx = V**k
        out = np.empty((num, length), dtype=np.int64)
        if num == 0 or length == 0:
            return out
        if start is not None:
            first = self.encode(start) if isinstance(start, str) else np.asarray(start, dtype=np.int64).reshape(-1)
            if first.shape != (k,):
                raise ValueError(f"start {start!r} has {first.size} symbols; this chain needs exactly {k}")
            if np.any((first < 0) | (first >= V)):
                raise ValueError(f"start {start!r} has ids outside 0..{V - 1}")
            ctx = np.full(num, int(np.ravel_multi_index(tuple(first), (V,) * k)) if k else 0, dtype=np.int64)
        else:
            cum = np.cumsum(self.stationary().reshape(-1))
            ctx = np.minimum(np.searchsorted(cum, rng.random(num) * cum[-1], side="right"), n_ctx - 1)
        # Unpack the first context into its k symbols (oldest first).
        digits = np.stack(np.unravel_index(ctx, (V,) * k), axis=1) if k else np.zeros((num, 0), np.int64)
        prefix = min(k, length)
        out[:, :prefix] = digits[:, :prefix]
        cum_rows = np.cumsum(self.transitions.reshape(n_ctx, V), axis=1)
        cum_rows[:, -1] = np.inf  # rounding never leaves a draw above the last bin
        uniforms = rng.random((length - prefix, num))
        if num == 1:
            rows = cum_rows.tolist()
            c = int(ctx[0])
            seq = out[0]
            for t, u in enumerate(uniforms[:, 0].tolist(), start=prefix):
                x = bisect.bisect_right(rows[c], u)
                seq[t] = x
                c = (c * V + x) % n_ctx
            return out
        for t in range(prefix, length):
            x = (cum_rows[ctx] <= uniforms[t - prefix][:, None]).sum(1)
            out[:, t] = x
            ctx = (ctx * V + x) % n_ctx
        return out

    def log_probs(self, ids) -> np.ndarray:
        """log P(x_t | previous ``order`` symbols) for every t >= order of each row.

        ids: (T,) or (N, T) -> (T - order,) or (N, T - order) float64, nats.
        """
        windows = ngram_windows(ids, self.order)
        with np.errstate(divide="ignore"):
            lp = np.log(self.transitions[tuple(windows.T)])
        ids = np.asarray(ids)
        return lp.reshape(ids.shape[:-1] + (-1,))

    def cross_entropy(self, ids, unit: str = "nats") -> float:
        """Mean of -log P over the predictable positions of ``ids``: the oracle's loss."""
        return float(-self.log_probs(ids).mean() * _unit_scale(unit))


# ---------------------------------------------------------------- corpora


def _encode(alphabet: tuple[str, ...], index: dict[str, int], text) -> np.ndarray:
    try:
        return np.array([index[s] for s in text], dtype=np.int64)
    except KeyError as e:
        raise ValueError(f"symbol {e.args[0]!r} is not in the alphabet {alphabet!r}") from None


def _as_ids(ids) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"expected integer token ids, got dtype {arr.dtype}; encode text with MarkovChain.encode")
    if arr.ndim not in (1, 2):
        raise ValueError(f"expected ids of shape (T,) or (N, T), got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def ngram_windows(ids, order: int = 1) -> np.ndarray:
    """All windows (x_{t-order}, ..., x_{t-1}, x_t) of ``ids``: (num_windows, order + 1) int64.

    ids: (T,) a stream, or (N, T) independent rows (no window crosses rows).
    """
    arr = _as_ids(ids)
    if order < 0:
        raise ValueError(f"order={order} must be >= 0")
    rows = arr[None] if arr.ndim == 1 else arr
    T = rows.shape[1]
    if T <= order:
        return np.zeros((0, order + 1), dtype=np.int64)
    win = np.lib.stride_tricks.sliding_window_view(rows, order + 1, axis=1)  # (N, T - order, order + 1)
    return np.ascontiguousarray(win.reshape(-1, order + 1))


def bigram_pairs(ids) -> np.ndarray:
    """The (x_{t-1}, x_t) pairs of ``ids``: (num_pairs, 2) int64 (T - 1 per row)."""
    return ngram_windows(ids, 1)


def empirical_counts(ids, vocab_size: int, order: int = 1) -> np.ndarray:
    """counts[c_1, ..., c_k, x] of the windows of ``ids``: shape (V,) * order + (V,), int64."""
    windows = ngram_windows(ids, order)
    if windows.size and (windows.min() < 0 or windows.max() >= vocab_size):
        raise ValueError(f"ids must lie in 0..{vocab_size - 1}; found {windows.min()}..{windows.max()}")
    flat = np.ravel_multi_index(tuple(windows.T), (vocab_size,) * (order + 1))
    counts = np.bincount(flat, minlength=vocab_size ** (order + 1))
    return counts.reshape((vocab_size,) * (order + 1)).astype(np.int64)


def empirical_conditional(ids, vocab_size: int, order: int = 1, smoothing: float = 0.0) -> np.ndarray:
    """(counts + smoothing) normalised over the next symbol: shape (V,) * order + (V,).

    A context never seen (and smoothing = 0) gets the uniform row, so the
    result is always a valid transition table.
    """
    if smoothing < 0:
        raise ValueError(f"smoothing={smoothing} must be >= 0")
    counts = empirical_counts(ids, vocab_size, order).astype(np.float64) + smoothing
    totals = counts.sum(-1, keepdims=True)
    uniform = np.full_like(counts, 1.0 / vocab_size)
    return np.where(totals > 0, counts / np.where(totals > 0, totals, 1.0), uniform)


def empirical_marginal(ids, vocab_size: int, order: int = 1) -> np.ndarray:
    """Frequency of each context among the windows of ``ids``: shape (V,) * order, sums to 1."""
    counts = empirical_counts(ids, vocab_size, order).sum(-1).astype(np.float64)
    total = counts.sum()
    if total == 0:
        raise ValueError(f"ids are too short to hold a window of {order + 1} symbols")
    return counts / total


# ---------------------------------------------------------------- divergences


def kl_divergence(p, q, marginal, unit: str = "nats") -> float:
    """sum_c marginal(c) sum_x P(x|c) log(P(x|c) / Q(x|c)).

    p, q: conditional tables of the same shape (..., V); marginal: shape (...)
    (a distribution over contexts, e.g. a chain's stationary distribution or
    ``empirical_marginal``). Infinite where P > 0 = Q on a context of positive weight.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    m = np.asarray(marginal, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"P has shape {p.shape} and Q has shape {q.shape}; they must match")
    if m.shape != p.shape[:-1]:
        raise ValueError(f"marginal has shape {m.shape}; for conditionals of shape {p.shape} it must be {p.shape[:-1]}")
    per_context = _xlogy_ratio(p, q).sum(-1)
    weighted = np.where(m > 0, m * np.where(m > 0, per_context, 0.0), 0.0)
    return float(weighted.sum() * _unit_scale(unit))


def sample_kl_divergence(windows, p, q, unit: str = "nats") -> float:
    """Mean over observed windows of log P(x_t | context) - log Q(x_t | context).

    windows: (N, order + 1) ids (e.g. ``bigram_pairs``); p, q: tables of shape
    (V,) * order + (V,). Unbiased for KL(P || Q) when the windows are fresh
    draws from the stationary process of P (and Q does not depend on them).
    """
    w = _as_ids(windows)
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"P has shape {p.shape} and Q has shape {q.shape}; they must match")
    if w.ndim != 2 or w.shape[1] != p.ndim:
        raise ValueError(f"windows of shape {w.shape} do not fit tables of shape {p.shape}; expected (N, {p.ndim})")
    if w.shape[0] == 0:
        raise ValueError("no windows to average over")
    idx = tuple(w.T)
    with np.errstate(divide="ignore"):
        diff = np.log(p[idx]) - np.log(q[idx])
    return float(diff.mean() * _unit_scale(unit))
