"""Self-attention in plain numpy: forward and backward, single- and multi-head.

Single head (``SelfAttention``), for X of shape (B, T, D):

    Q = X W_q          (B, T, D_k)       W_q: (D, D_k)
    K = X W_k          (B, T, D_k)       W_k: (D, D_k)
    V = X W_v          (B, T, D_v)       W_v: (D, D_v)
    A_w   = Q K^T                         (B, T, T)
    A_sig = softmax(A_w / sqrt(D_k))      over the last axis (keys); causal: keys j > i get 0
    Y     = A_sig V                       (B, T, D_v)

Backward, from G = dL/dY (B, T, D_v):

    dL/dA_sig = G V^T                                     (B, T, T)
    dL/dV     = A_sig^T G                                 (B, T, D_v)
    dL/dA_w   = softmax_backward(A_sig, dL/dA_sig) / sqrt(D_k)
              = A_sig * (dL/dA_sig - rowsum(dL/dA_sig * A_sig)) / sqrt(D_k)
    dL/dQ     = dL/dA_w K                                 (B, T, D_k)
    dL/dK     = dL/dA_w^T Q                               (B, T, D_k)
    dL/dW_q   = sum_b X_b^T dL/dQ_b    (and likewise W_k, W_v)
    dL/dX     = dL/dV W_v^T + dL/dK W_k^T + dL/dQ W_q^T

Multi-head (``MultiHeadAttention``) is the same computation on H heads side by
side, with PyTorch's (out, in) weight layout, biases and an output projection.
``attention`` and ``attention_backward`` are the scaled dot-product core alone, for
given Q, K, V and a mask.

A query whose every key is masked (a row of only -inf scores) has nothing to attend
to: its weights are all 0, so its output is 0 and no gradient flows through it --
what ``torch.nn.functional.scaled_dot_product_attention`` returns, never NaN.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from lmlab.reference.ops import causal_mask, masked_softmax, softmax_backward
from lmlab.reference.ops import expect_shape as _expect, to_numpy as _to_numpy

__all__ = ["attention", "attention_backward", "SelfAttention", "MultiHeadAttention"]


def _additive_mask(mask, t_q: int, t_k: int, causal: bool, dtype) -> np.ndarray | float:
    """0 where attention is allowed, -inf where blocked; broadcastable to (..., t_q, t_k).

    ``mask`` is boolean (True = blocked, PyTorch's convention) or float (added to the scores).
    """
    add = np.zeros((t_q, t_k), dtype=dtype)
    if causal:
        add[causal_mask(t_q, t_k)] = -np.inf
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype == bool:
            add = np.where(mask, -np.inf, add)
        else:
            add = add + mask.astype(dtype, copy=False)
    return add


def _repeat_kv(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """k, v with each of their H_kv heads repeated H / H_kv times (grouped-query attention), and that count."""
    if q.ndim < 3 or k.shape[-3] == q.shape[-3]:
        return k, v, 1
    if q.shape[-3] % k.shape[-3]:
        raise ValueError(f"query heads {q.shape[-3]} must be a multiple of key/value heads {k.shape[-3]}")
    rep = q.shape[-3] // k.shape[-3]
    return np.repeat(k, rep, axis=-3), np.repeat(v, rep, axis=-3), rep


def _sdpa_weights(q, k, causal: bool, mask, scale: float) -> np.ndarray:
    """softmax(q k^T * scale + mask) over the keys: (..., T_q, T_k); fully masked rows are 0."""
    scores = (q @ np.swapaxes(k, -1, -2)) * scale
    return masked_softmax(scores + _additive_mask(mask, q.shape[-2], k.shape[-2], causal, scores.dtype))


def _sdpa_grads(A: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, dY: np.ndarray, scale: float):
    """Backward of Y = A v with A = softmax(q k^T * scale + mask), from dY = dL/dY.

    Returns dL/dA, dL/d(q k^T), dq, dk, dv -- the module docstring's formulas.
    """
    dA = dY @ np.swapaxes(v, -1, -2)                          # (..., T_q, T_k)
    dv = np.swapaxes(A, -1, -2) @ dY                          # (..., T_k, d_v)
    dA_w = softmax_backward(A, dA) * scale
    dq = dA_w @ k                                             # (..., T_q, d)
    dk = np.swapaxes(dA_w, -1, -2) @ q                        # (..., T_k, d)
    return dA, dA_w, dq, dk, dv


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, causal: bool = False,
              mask: np.ndarray | None = None, scale: float | None = None) -> np.ndarray:
    """softmax(q k^T * scale + mask) v, the core of every attention layer.

    q: (..., H, T_q, d); k: (..., H_kv, T_k, d); v: (..., H_kv, T_k, d_v) -> (..., H, T_q, d_v).
    H_kv may divide H (grouped-query attention: each k/v head serves H / H_kv query heads).
    ``scale`` defaults to 1/sqrt(d). ``causal`` with T_k > T_q treats the queries as the
    last T_q positions (decoding with a cache). ``mask``: bool (True = blocked) or additive,
    broadcastable to (..., H, T_q, T_k). A query with every key blocked gets the output 0.
    """
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    k, v, _ = _repeat_kv(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _sdpa_weights(q, k, causal, mask, scale) @ v


def attention_backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, dout: np.ndarray, *, causal: bool = False,
                       mask: np.ndarray | None = None, scale: float | None = None):
    """dL/dq, dL/dk, dL/dv of ``attention(q, k, v, causal=, mask=, scale=)`` given dout = dL/d output.

    Shapes as in ``attention``: dout (..., H, T_q, d_v) -> dq like q, dk like k, dv like v
    (with grouped-query attention a k/v head's gradient sums over the query heads it serves).
    The weights are recomputed from q, k and the mask:

        A = softmax(q k^T * scale + mask);   dA = dout v^T;   dS = A * (dA - rowsum(dA * A)) * scale
        dq = dS k;   dk = dS^T q;   dv = A^T dout

    A query with every key blocked contributes no gradient (its weights are 0).
    """
    q, k, v, dout = np.asarray(q), np.asarray(k), np.asarray(v), np.asarray(dout)
    k_all, v_all, rep = _repeat_kv(q, k, v)
    want = q.shape[:-1] + v.shape[-1:]
    if dout.shape != want:
        raise ValueError(f"dout has shape {dout.shape}; expected {want} (the shape of attention's output)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    A = _sdpa_weights(q, k_all, causal, mask, scale)
    _, _, dq, dk, dv = _sdpa_grads(A, q, k_all, v_all, dout, scale)
    if rep > 1:                                               # sum over the query heads of each k/v head
        dk = dk.reshape(dk.shape[:-3] + (-1, rep) + dk.shape[-2:]).sum(axis=-3)
        dv = dv.reshape(dv.shape[:-3] + (-1, rep) + dv.shape[-2:]).sum(axis=-3)
    return dq, dk, dv


class SelfAttention:
    """Single-head self-attention layer; see the module docstring for the math.

    W_q, W_k: (D, D_k); W_v: (D, D_v). ``forward(X)`` keeps Q, K, V, A_w, A_sig;
    ``backward(dY)`` sets dA_sig, dA_w, dV, dK, dQ, dW_q, dW_k, dW_v and returns dX.
    """

    def __init__(self, W_q: np.ndarray, W_k: np.ndarray, W_v: np.ndarray, *, causal: bool = False) -> None:
        self.W_q = _expect("W_q", W_q, (None, None))
        D, D_k = self.W_q.shape
        self.W_k = _expect("W_k", W_k, (D, D_k))
        self.W_v = _expect("W_v", W_v, (D, None))
        self.causal = causal

    @classmethod
    def random(cls, D: int, D_k: int, D_v: int, *, causal: bool = False, seed: int | None = None,
               dtype=np.float64) -> "SelfAttention":
        """Weights drawn from N(0, 1/D)."""
        rng = np.random.default_rng(seed)
        w = lambda n: (rng.standard_normal((D, n)) / math.sqrt(D)).astype(dtype)  # noqa: E731
        return cls(w(D_k), w(D_k), w(D_v), causal=causal)

    @property
    def params(self) -> dict[str, np.ndarray]:
        return {"W_q": self.W_q, "W_k": self.W_k, "W_v": self.W_v}

    @property
    def grads(self) -> dict[str, np.ndarray]:
        """dL/dW after ``backward``, keyed like ``params``."""
        return {"W_q": self.dW_q, "W_k": self.dW_k, "W_v": self.dW_v}

    def forward(self, X: np.ndarray) -> np.ndarray:
        """X: (B, T, D) -> A_sig V: (B, T, D_v)."""
        self.X = X = _expect("X", X, (None, None, self.W_q.shape[0]))
        T, D_k = X.shape[1], self.W_q.shape[1]
        self.Q, self.K, self.V = X @ self.W_q, X @ self.W_k, X @ self.W_v
        self.A_w = self.Q @ np.swapaxes(self.K, 1, 2)
        scores = self.A_w / math.sqrt(D_k) + _additive_mask(None, T, T, self.causal, self.A_w.dtype)
        self.A_sig = masked_softmax(scores)
        return self.A_sig @ self.V

    __call__ = forward

    def backward(self, dY: np.ndarray) -> np.ndarray:
        """dY = dL/dY: (B, T, D_v) -> dL/dX: (B, T, D). Call after ``forward``."""
        dY = _expect("dY", dY, self.V.shape)
        D_k = self.W_q.shape[1]
        # dA_sig (B, T, T), dA_w (B, T, T), dQ (B, T, D_k), dK (B, T, D_k), dV (B, T, D_v)
        self.dA_sig, self.dA_w, self.dQ, self.dK, self.dV = _sdpa_grads(
            self.A_sig, self.Q, self.K, self.V, dY, 1.0 / math.sqrt(D_k))
        self.dW_q = np.einsum("btd,btk->dk", self.X, self.dQ)              # sum over the batch
        self.dW_k = np.einsum("btd,btk->dk", self.X, self.dK)
        self.dW_v = np.einsum("btd,btk->dk", self.X, self.dV)
        self.dX = self.dV @ self.W_v.T + self.dK @ self.W_k.T + self.dQ @ self.W_q.T
        return self.dX


class MultiHeadAttention:
    """Multi-head self-attention, the math of ``torch.nn.MultiheadAttention``.

    Weights are (out, in) like ``nn.Linear`` (y = x W^T + b):
    W_q, W_k: (H d_k, D); W_v: (H d_v, D); W_o: (D_out, H d_v); biases (out,) or None.

        Q = X W_q^T + b_q, split into heads          (B, H, T, d_k)   (likewise K; V with d_v)
        A_w = Q K^T;  A_sig = softmax(A_w / sqrt(d_k) + mask)   (B, H, T, T)
        O = heads of A_sig V concatenated            (B, T, H d_v)
        Y = O W_o^T + b_o                            (B, T, D_out)

    ``backward(dY)`` sets dW_q, dW_k, dW_v, dW_o, db_q, db_k, db_v, db_o (summed over
    the batch), the per-head dQ, dK, dV, dA_w, dA_sig, and returns dX.
    """

    def __init__(self, W_q, W_k, W_v, W_o, n_heads: int, *, b_q=None, b_k=None, b_v=None, b_o=None,
                 causal: bool = False) -> None:
        if not isinstance(n_heads, (int, np.integer)) or n_heads < 1:
            raise ValueError(f"n_heads must be a positive int; got {n_heads!r}")
        self.n_heads = H = int(n_heads)
        self.W_q = _expect("W_q", W_q, (None, None))
        qk, D = self.W_q.shape
        self.W_k = _expect("W_k", W_k, (qk, D))
        self.W_v = _expect("W_v", W_v, (None, D))
        vd = self.W_v.shape[0]
        self.W_o = _expect("W_o", W_o, (None, vd))
        for name, n in (("W_q rows", qk), ("W_v rows", vd)):
            if n % H:
                raise ValueError(f"{name} = {n} must be divisible by n_heads = {H}")
        zeros = lambda n: np.zeros(n, dtype=self.W_q.dtype)  # noqa: E731
        self.b_q = zeros(qk) if b_q is None else _expect("b_q", b_q, (qk,))
        self.b_k = zeros(qk) if b_k is None else _expect("b_k", b_k, (qk,))
        self.b_v = zeros(vd) if b_v is None else _expect("b_v", b_v, (vd,))
        self.b_o = zeros(self.W_o.shape[0]) if b_o is None else _expect("b_o", b_o, (self.W_o.shape[0],))
        self.causal = causal

    # ------------------------------------------------------------ construction

    @classmethod
    def from_in_proj(cls, in_proj_weight, out_proj_weight, n_heads: int, *, in_proj_bias=None,
                     out_proj_bias=None, causal: bool = False) -> "MultiHeadAttention":
        """From packed projections: in_proj_weight (3D, D) = [W_q; W_k; W_v], as
        ``nn.MultiheadAttention`` (and packed-qkv checkpoints) store them."""
        w = _expect("in_proj_weight", in_proj_weight, (None, None))
        if w.shape[0] % 3:
            raise ValueError(f"in_proj_weight has shape {w.shape}; expected (3*D, D)")
        D = w.shape[0] // 3
        W_q, W_k, W_v = w[:D], w[D:2 * D], w[2 * D:]
        b_q = b_k = b_v = None
        if in_proj_bias is not None:
            b = _expect("in_proj_bias", in_proj_bias, (3 * D,))
            b_q, b_k, b_v = b[:D], b[D:2 * D], b[2 * D:]
        return cls(W_q, W_k, W_v, out_proj_weight, n_heads, b_q=b_q, b_k=b_k, b_v=b_v,
                   b_o=out_proj_bias, causal=causal)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, np.ndarray], n_heads: int, *, prefix: str = "",
                        causal: bool = False) -> "MultiHeadAttention":
        """From a state dict (numpy arrays), in one of three namings under ``prefix``:

        - ``in_proj_weight`` [``in_proj_bias``], ``out_proj.weight`` [``out_proj.bias``]
          (``nn.MultiheadAttention``);
        - ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` [``in_proj_bias``] and
          ``out_proj.*`` (``nn.MultiheadAttention`` with kdim/vdim);
        - ``wq.weight``, ``wk.weight``, ``wv.weight``, ``wo.weight`` [each ``.bias``]
          (separate (out, in) projections).
        """
        def get(name: str, required: bool = True):
            key = prefix + name
            if key not in sd:
                if required:
                    raise ValueError(f"missing array {key!r} in state dict; present: {sorted(sd)}")
                return None
            return _to_numpy(sd[key])

        if prefix + "in_proj_weight" in sd:
            return cls.from_in_proj(get("in_proj_weight"), get("out_proj.weight"), n_heads,
                                    in_proj_bias=get("in_proj_bias", False),
                                    out_proj_bias=get("out_proj.bias", False), causal=causal)
        if prefix + "q_proj_weight" in sd:
            W_q, W_k, W_v = get("q_proj_weight"), get("k_proj_weight"), get("v_proj_weight")
            b = get("in_proj_bias", False)
            bs = (None, None, None)
            if b is not None:
                n_q, n_v = np.shape(W_q)[0], np.shape(W_v)[0]
                b = _expect(prefix + "in_proj_bias", b, (2 * n_q + n_v,))
                bs = (b[:n_q], b[n_q:2 * n_q], b[2 * n_q:])
            return cls(W_q, W_k, W_v, get("out_proj.weight"), n_heads, b_q=bs[0], b_k=bs[1], b_v=bs[2],
                       b_o=get("out_proj.bias", False), causal=causal)
        if prefix + "wq.weight" in sd:
            return cls(get("wq.weight"), get("wk.weight"), get("wv.weight"), get("wo.weight"), n_heads,
                       b_q=get("wq.bias", False), b_k=get("wk.bias", False), b_v=get("wv.bias", False),
                       b_o=get("wo.bias", False), causal=causal)
        raise ValueError(
            f"no attention weights under prefix {prefix!r}: expected {prefix}in_proj_weight, "
            f"{prefix}q_proj_weight or {prefix}wq.weight; present: {sorted(sd)}")

    @property
    def params(self) -> dict[str, np.ndarray]:
        return {"W_q": self.W_q, "W_k": self.W_k, "W_v": self.W_v, "W_o": self.W_o,
                "b_q": self.b_q, "b_k": self.b_k, "b_v": self.b_v, "b_o": self.b_o}

    @property
    def grads(self) -> dict[str, np.ndarray]:
        """dL/dparam after ``backward``, keyed like ``params``."""
        return {k: getattr(self, "d" + k) for k in self.params}

    @property
    def d_in_proj_weight(self) -> np.ndarray:
        """dL/d in_proj_weight (3D, D), i.e. [dW_q; dW_k; dW_v]."""
        return np.concatenate([self.dW_q, self.dW_k, self.dW_v])

    @property
    def d_in_proj_bias(self) -> np.ndarray:
        return np.concatenate([self.db_q, self.db_k, self.db_v])

    # ------------------------------------------------------------ computation

    def _split(self, x: np.ndarray) -> np.ndarray:
        """(B, T, H d) -> (B, H, T, d)."""
        B, T, n = x.shape
        return x.reshape(B, T, self.n_heads, n // self.n_heads).transpose(0, 2, 1, 3)

    @staticmethod
    def _merge(x: np.ndarray) -> np.ndarray:
        """(B, H, T, d) -> (B, T, H d)."""
        B, H, T, d = x.shape
        return x.transpose(0, 2, 1, 3).reshape(B, T, H * d)

    def forward(self, X: np.ndarray, attn_mask: np.ndarray | None = None) -> np.ndarray:
        """X: (B, T, D) -> Y: (B, T, D_out).

        ``attn_mask``: (T, T) or broadcastable to (B, H, T, T); bool (True = blocked) or
        additive float, as in ``nn.MultiheadAttention``; combined with ``causal``.
        """
        self.X = X = _expect("X", X, (None, None, self.W_q.shape[1]))
        T = X.shape[1]
        d_k = self.W_q.shape[0] // self.n_heads
        self.Q = self._split(X @ self.W_q.T + self.b_q)                    # (B, H, T, d_k)
        self.K = self._split(X @ self.W_k.T + self.b_k)
        self.V = self._split(X @ self.W_v.T + self.b_v)                    # (B, H, T, d_v)
        self.A_w = self.Q @ np.swapaxes(self.K, -1, -2)                    # (B, H, T, T)
        scores = self.A_w / math.sqrt(d_k) + _additive_mask(attn_mask, T, T, self.causal, self.A_w.dtype)
        self.A_sig = masked_softmax(scores)
        self.O = self._merge(self.A_sig @ self.V)                          # (B, T, H d_v)
        return self.O @ self.W_o.T + self.b_o

    __call__ = forward

    def backward(self, dY: np.ndarray) -> np.ndarray:
        """dY = dL/dY: (B, T, D_out) -> dL/dX: (B, T, D). Call after ``forward``."""
        dY = _expect("dY", dY, self.O.shape[:2] + (self.W_o.shape[0],))
        d_k = self.W_q.shape[0] // self.n_heads
        self.dW_o = np.einsum("bto,bti->oi", dY, self.O)
        self.db_o = dY.sum(axis=(0, 1))
        self.dO = self._split(dY @ self.W_o)                               # (B, H, T, d_v)
        self.dA_sig, self.dA_w, self.dQ, self.dK, self.dV = _sdpa_grads(  # per head, (B, H, T, .)
            self.A_sig, self.Q, self.K, self.V, self.dO, 1.0 / math.sqrt(d_k))
        dQ, dK, dV = self._merge(self.dQ), self._merge(self.dK), self._merge(self.dV)   # (B, T, H d)
        self.dW_q = np.einsum("bto,bti->oi", dQ, self.X)
        self.dW_k = np.einsum("bto,bti->oi", dK, self.X)
        self.dW_v = np.einsum("bto,bti->oi", dV, self.X)
        self.db_q, self.db_k, self.db_v = dQ.sum(axis=(0, 1)), dK.sum(axis=(0, 1)), dV.sum(axis=(0, 1))
        self.dX = dQ @ self.W_q + dK @ self.W_k + dV @ self.W_v
        return self.dX

