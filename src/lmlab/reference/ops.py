"""Small numpy building blocks shared by the reference engines.

Every function works on the last axis and keeps the input's dtype (float32 in,
float32 out; float64 in, float64 out). Shapes: ``(..., N)`` means any leading
axes.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "softmax",
    "masked_softmax",
    "log_softmax",
    "softmax_backward",
    "logsumexp",
    "sigmoid",
    "hard_sigmoid",
    "relu",
    "gelu",
    "layer_norm",
    "rms_norm",
    "one_hot",
    "causal_mask",
    "ACTIVATIONS",
    "to_numpy",
    "expect_shape",
]


def logsumexp(x: np.ndarray, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    """log(sum(exp(x))) along ``axis``, computed without overflow."""
    x = np.asarray(x)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)  # a row of all -inf gives -inf, not nan
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """softmax(x)_i = exp(x_i - max x) / sum_j exp(x_j - max x). (..., N) -> (..., N).

    Entries equal to -inf (masked) get probability 0.
    """
    x = np.asarray(x)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def masked_softmax(x: np.ndarray) -> np.ndarray:
    """Attention weights: softmax over the last axis, where a row of only -inf (nothing to
    attend to) gives all zeros instead of NaN. (..., N) -> (..., N).

    The zero row is torch's ``scaled_dot_product_attention`` convention: the output of such a
    query is 0 and no gradient flows through it (``softmax_backward`` of a zero row is zero).
    """
    x = np.asarray(x)
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - np.where(np.isneginf(m), 0, m).astype(x.dtype, copy=False))
    total = np.sum(e, axis=-1, keepdims=True)
    return e / np.where(total == 0, 1, total).astype(x.dtype, copy=False)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """log softmax(x) = x - logsumexp(x). (..., N) -> (..., N)."""
    x = np.asarray(x)
    return x - logsumexp(x, axis=axis, keepdims=True)


def softmax_backward(s: np.ndarray, ds: np.ndarray) -> np.ndarray:
    """dL/dz from dL/ds where s = softmax(z) over the last axis.

    The Jacobian is ds_i/dz_j = s_i (delta_ij - s_j), so
    dL/dz_j = s_j (dL/ds_j - sum_i dL/ds_i s_i).   (..., N), (..., N) -> (..., N)
    """
    return s * (ds - np.sum(ds * s, axis=-1, keepdims=True))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)), without overflow for large |x|."""
    x = np.asarray(x)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


def hard_sigmoid(x: np.ndarray) -> np.ndarray:
    """Keras 2's piecewise-linear sigmoid: clip(0.2 x + 0.5, 0, 1)."""
    x = np.asarray(x)
    return np.clip(0.2 * x + 0.5, 0.0, 1.0).astype(x.dtype, copy=False)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0).astype(np.asarray(x).dtype, copy=False)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    """GELU like ``torch.nn.functional.gelu``.

    approximate="none": x/2 (1 + erf(x / sqrt 2))  (exact; uses math.erf per element)
    approximate="tanh": x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  (GPT-2's "gelu_new")
    """
    x = np.asarray(x)
    if approximate == "none":
        return (0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))).astype(x.dtype, copy=False)
    if approximate == "tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    raise ValueError(f"gelu approximate={approximate!r}; accepted: 'none', 'tanh'")


def layer_norm(x: np.ndarray, weight: np.ndarray | None = None, bias: np.ndarray | None = None,
               eps: float = 1e-5) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (biased variance, like torch)."""
    x = np.asarray(x)
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype, copy=False)


def rms_norm(x: np.ndarray, weight: np.ndarray | None = None, eps: float = 1e-6) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (Llama's RMSNorm)."""
    x = np.asarray(x)
    y = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight
    return y.astype(x.dtype, copy=False)


def one_hot(ids: np.ndarray, n: int, dtype=np.float64) -> np.ndarray:
    """Integer ids of shape S -> one-hot vectors of shape S + (n,)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise ValueError(f"token ids must be in [0, {n}); got min {ids.min()}, max {ids.max()}")
    return np.eye(n, dtype=dtype)[ids]


def causal_mask(t_q: int, t_k: int | None = None) -> np.ndarray:
    """Boolean (t_q, t_k) mask, True where query i may NOT look at key j.

    With t_k > t_q the queries are the last t_q positions of a length-t_k
    sequence (decoding with a cache): query i sits at position i + t_k - t_q
    and sees keys j <= i + t_k - t_q.
    """
    t_k = t_q if t_k is None else t_k
    return np.arange(t_k)[None, :] > np.arange(t_q)[:, None] + (t_k - t_q)


ACTIVATIONS = {
    "tanh": np.tanh,
    "relu": relu,
    "sigmoid": sigmoid,
    "hard_sigmoid": hard_sigmoid,
    "linear": lambda x: x,
}


def to_numpy(a) -> np.ndarray:
    """A numpy array from an array-like or a (CPU or GPU) torch tensor, without importing torch."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def expect_shape(name: str, a, shape: tuple) -> np.ndarray:
    """``a`` as an array of ``shape`` (None = any size), else a ValueError naming the array,
    its shape and the expected shape."""
    a = to_numpy(a)
    if a.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, a.shape)):
        raise ValueError(f"{name} has shape {a.shape}; expected {format_shape(shape)}")
    return a


def format_shape(shape: tuple) -> str:
    """(3, None) -> '(3, *)'."""
    parts = ["*" if s is None else str(s) for s in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
