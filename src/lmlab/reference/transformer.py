"""A decoder-only transformer run from numpy weights: whole sequences or one token at a time.

For ids (B, T) at positions s .. s+T-1 (s = tokens already in the KV cache):

    x = embed[ids] * embed_scale + P[s .. s+T-1]            (B, T, C)  P: learned or sinusoidal; none for rotary
    per layer, pre-norm                                  post-norm
        x = x + Attn(norm1(x))                              x = norm1(x + Attn(x))
        x = x + MLP(norm2(x))                               x = norm2(x + MLP(x))
    logits = norm_f(x) W_out^T + b_out                      (B, T, V)   norm_f only if present

    Attn(h): q = h Wq^T + bq, k = h Wk^T + bk, v = h Wv^T + bv, split into heads (D = C / H);
             rotary positions rotate q and k; k, v are appended to the cache;
             y = softmax(q k^T / sqrt(D) + causal mask) v, heads concatenated; Attn = y Wo^T + bo.
             Grouped-query attention: H_kv key/value heads, each serving H / H_kv query heads.
    MLP(h):  act(h W1^T + b1) W2^T + b2, act = relu | gelu | gelu_tanh,
             or swiglu: (silu(h Wg^T + bg) * (h W1^T + b1)) W2^T + b2.

Weight layout: a flat dict of numpy arrays, matrices (out, in) like ``torch.nn.Linear``;
every bias is optional (absent = no bias):

    embed                   (V, C)
    pos                     (P, C)        learned positions only; P = most positions
    l{i}.norm1.w, .b        (C,)          unless norm="none" (.b: LayerNorm only, optional)
    l{i}.Wq (C, C)  l{i}.Wk, l{i}.Wv (H_kv D, C)  l{i}.Wo (C, C)   and l{i}.bq, .bk, .bv, .bo
    l{i}.norm2.w, .b        (C,)
    l{i}.W1 (F, C)  l{i}.Wg (F, C) (swiglu only)  l{i}.W2 (C, F)   and l{i}.b1, .bg, .b2
    norm_f.w, .b            (C,)          optional final norm (pre-norm models have one)
    out.W (V, C), out.b (V,)

Hyper-parameters the arrays do not tell (head count, kinds of positions, norm and
activation) are keyword arguments; sizes (V, C, F, layers, H_kv, P) come from the shapes.

State: a ``KVCache`` holding per layer k, v of shape (B, H_kv, capacity, D); the first
``length`` positions are filled. Like lmlab's PyTorch transformer the buffers are written
in place and grow by doubling, so ``clone()`` a state before branching from it twice.

numpy only -- never torch.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from lmlab.reference.sequence import perplexity as _perplexity, sample as _sample
from lmlab.reference.sequence import sequence_nll as _sequence_nll, token_nlls as _token_nlls
from lmlab.reference.ops import (
    causal_mask,
    expect_shape,
    format_shape,
    gelu,
    layer_norm,
    masked_softmax,
    relu,
    rms_norm,
    sigmoid,
    to_numpy,
)

__all__ = [
    "KVCache",
    "TransformerLM",
    "expected_shapes",
    "gelu_fast",
    "layer_index",
    "rotary_cos_sin",
    "rotary_inv_freq",
    "apply_rotary",
    "sinusoidal_encoding",
    "sinusoidal_table",
    "POSITIONS",
    "NORMS",
    "NORM_POSITIONS",
    "ACTIVATIONS",
    "SINUSOIDAL_LAYOUTS",
]

POSITIONS = ("learned", "sinusoidal", "rotary", "none")
SINUSOIDAL_LAYOUTS = ("interleaved", "concat")
NORMS = ("layernorm", "rmsnorm", "none")
NORM_POSITIONS = ("pre", "post")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "swiglu")


# ---------------------------------------------------------------- positions


def sinusoidal_encoding(positions, dim: int, layout: str = "interleaved") -> np.ndarray:
    """(T,) positions -> (T, dim) float64: sin/cos of pos / 10000^(2i/dim).

    layout "interleaved": (sin w_0, cos w_0, sin w_1, cos w_1, ...);
    layout "concat": [sin w_0 .. sin w_{dim/2-1} | cos w_0 .. cos w_{dim/2-1}].
    """
    if layout not in SINUSOIDAL_LAYOUTS:
        raise ValueError(f"sinusoidal layout={layout!r}; accepted: {SINUSOIDAL_LAYOUTS}")
    if dim < 2 or dim % 2:
        raise ValueError(f"sinusoidal positions need an even dim >= 2, got {dim}")
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 1)
    freq = np.exp(-math.log(10000.0) * np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = pos * freq
    if layout == "concat":
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)
    return np.stack([np.sin(angles), np.cos(angles)], axis=-1).reshape(len(pos), dim)


def sinusoidal_table(n_positions: int, dim: int, layout: str = "interleaved") -> np.ndarray:
    """(n_positions, dim) float64 table of ``sinusoidal_encoding`` for positions 0..n-1."""
    return sinusoidal_encoding(np.arange(n_positions), dim, layout)


def rotary_inv_freq(head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """(head_dim / 2,) float64: theta^(-2j/D), the rotary inverse frequencies (``inv_freq`` in PyTorch code)."""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def rotary_cos_sin(positions, head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of shape (T, head_dim) (float64) for rotary embeddings, the half-split layout Llama uses:
    angle[t, j] = pos_t * theta^(-2j/D) for j < D/2, repeated for j >= D/2."""
    inv_freq = rotary_inv_freq(head_dim, theta)
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


def apply_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x: (..., T, D): pairs (i, i + D/2) rotated by the position's angle; keeps x's dtype."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype, copy=False)


# ---------------------------------------------------------------- activations

# Abramowitz & Stegun 7.1.26: |erf error| <= 1.5e-7, below float32 resolution near 1.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def gelu_fast(x: np.ndarray) -> np.ndarray:
    """Exact-form GELU x/2 (1 + erf(x/sqrt 2)) with a vectorised erf (|error| <= 1.5e-7).

    For float32 this is as good as ``ops.gelu`` and ~50x faster; float64 inputs go to
    ``ops.gelu`` (math.erf per element) so that float64 stays exact.
    """
    x = np.asarray(x)
    if x.dtype == np.float64:
        return gelu(x)
    z = np.abs(x) * np.asarray(1 / math.sqrt(2.0), dtype=x.dtype)
    t = 1.0 / (1.0 + _AS_P * z)
    a1, a2, a3, a4, a5 = _AS_A
    poly = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5))))
    erf = 1.0 - poly * np.exp(-z * z)
    erf = np.where(x < 0, -erf, erf)
    return (0.5 * x * (1.0 + erf)).astype(x.dtype, copy=False)


def _silu(x: np.ndarray) -> np.ndarray:
    return x * sigmoid(x)


# ---------------------------------------------------------------- the cache


class KVCache:
    """Keys and values of every layer: ``k[i]``, ``v[i]`` (B, H_kv, capacity, D), ``length`` filled.

    ``attention`` holds the last call's weights per layer, (B, H, T, length), when the
    model was called with ``return_attention=True``.
    """

    def __init__(self, k: list[np.ndarray] | None = None, v: list[np.ndarray] | None = None, length: int = 0,
                 attention: list[np.ndarray] | None = None) -> None:
        self.k = [] if k is None else k
        self.v = [] if v is None else v
        self.length = length
        self.attention = attention

    def __repr__(self) -> str:
        shape = self.k[0].shape if self.k else None
        return f"KVCache(layers={len(self.k)}, length={self.length}, buffer={shape})"

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    def select(self, index) -> "KVCache":
        """Rows ``index`` ((B',) ints) of every buffer, in that order (beam search)."""
        index = np.asarray(index)
        return KVCache([a[index] for a in self.k], [a[index] for a in self.v], self.length)

    def clone(self) -> "KVCache":
        """An independent copy (the model writes into a cache's buffers in place)."""
        return KVCache([a.copy() for a in self.k], [a.copy() for a in self.v], self.length)


# ---------------------------------------------------------------- layout


def layer_index(name: str, prefix: str) -> int | None:
    """i for a name ``{prefix}{i}.rest``, else None."""
    if not name.startswith(prefix):
        return None
    head, dot, _ = name[len(prefix):].partition(".")
    return int(head) if dot and head.isdigit() else None


def _layer_count(names) -> int:
    found = {i for n in names if (i := layer_index(n, "l")) is not None}
    n = 0
    while n in found:
        n += 1
    return n


def expected_shapes(n_layers: int, d_model: int, d_ff: int, vocab_size: int, kv_dim: int, *,
                    n_positions: int | None = None, norm: str = "layernorm", activation: str = "gelu",
                    out_vocab: int | None = None) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Every array name of the layout -> (shape, required). Optional arrays are biases and the final norm."""
    C, F = d_model, d_ff
    s: dict[str, tuple[tuple[int, ...], bool]] = {"embed": ((vocab_size, C), True)}
    if n_positions is not None:
        s["pos"] = ((n_positions, C), True)
    for i in range(n_layers):
        p = f"l{i}."
        for n in ("norm1", "norm2") if norm != "none" else ():
            s[p + n + ".w"] = ((C,), True)
            if norm == "layernorm":
                s[p + n + ".b"] = ((C,), False)
        for n, rows in (("q", C), ("k", kv_dim), ("v", kv_dim), ("o", C)):
            s[p + "W" + n] = ((rows, C), True)
            s[p + "b" + n] = ((rows,), False)
        gates = ("1", "g") if activation == "swiglu" else ("1",)
        for n in gates:
            s[p + "W" + n] = ((F, C), True)
            s[p + "b" + n] = ((F,), False)
        s[p + "W2"] = ((C, F), True)
        s[p + "b2"] = ((C,), False)
    if norm != "none":
        s["norm_f.w"] = ((C,), False)
        if norm == "layernorm":
            s["norm_f.b"] = ((C,), False)
    V = vocab_size if out_vocab is None else out_vocab
    s["out.W"] = ((V, C), True)
    s["out.b"] = ((V,), False)
    return s


def _choice(name: str, value, accepted: tuple) -> None:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; accepted: {accepted}")


def _linear(x: np.ndarray, w_t: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """x (..., in) @ w_t (in, out) + b, as one 2-D matmul."""
    y = x.reshape(-1, x.shape[-1]) @ w_t
    if b is not None:
        y += b
    return y.reshape(*x.shape[:-1], w_t.shape[1])


# ---------------------------------------------------------------- the model


class TransformerLM:
    """Decoder-only transformer inference in numpy (see the module docstring for the math).

    ``model(ids, state=None) -> (logits, state)``: ids (B, T) ints -> logits (B, T, V); (T,) -> (T, V).
    ``model.step(token, state) -> (logits, state)``: one token per row, ids (B,) -> (B, V); a scalar -> (V,).
    ``state`` is a ``KVCache``; ``None`` starts at position 0.

    Keyword arguments: ``n_heads`` (required), ``n_kv_heads`` (checked against Wk's rows),
    ``positions`` ("learned" needs ``pos``; "sinusoidal", "rotary", "none"), ``sinusoidal_layout``,
    ``rope_theta``, ``norm``, ``norm_position``, ``norm_eps``, ``activation``, ``embed_scale``
    (multiplies the token embedding, e.g. sqrt(C)), ``block_size`` (most positions; defaults to
    the learned table's rows, unbounded otherwise), ``dtype`` (default: the weights' dtype).
    """

    def __init__(self, weights: Mapping[str, np.ndarray], *, n_heads: int, n_kv_heads: int | None = None,
                 positions: str = "learned", sinusoidal_layout: str = "interleaved", rope_theta: float = 10000.0,
                 norm: str = "layernorm", norm_position: str = "pre", norm_eps: float = 1e-5,
                 activation: str = "gelu", embed_scale: float = 1.0, block_size: int | None = None,
                 dtype=None) -> None:
        _choice("positions", positions, POSITIONS)
        _choice("sinusoidal_layout", sinusoidal_layout, SINUSOIDAL_LAYOUTS)
        _choice("norm", norm, NORMS)
        _choice("norm_position", norm_position, NORM_POSITIONS)
        _choice("activation", activation, ACTIVATIONS)
        if not isinstance(n_heads, (int, np.integer)) or isinstance(n_heads, bool) or n_heads < 1:
            raise ValueError(f"n_heads must be a positive int; got {n_heads!r}")
        w = {name: to_numpy(a) for name, a in weights.items()}
        for name, want in (("embed", "(V, C)"), ("l0.Wk", "(H_kv D, C)"), ("l0.W1", "(F, C)"), ("out.W", "(V, C)")):
            if name not in w:
                raise ValueError(f"missing array {name!r} (expected shape {want}); present: {sorted(w)}")
            expect_shape(f"array {name!r}", w[name], (None, None))
        V, C = w["embed"].shape
        if C % n_heads:
            raise ValueError(f"n_heads={n_heads} does not divide the model width C={C} (from 'embed' {w['embed'].shape})")
        self.n_layers = _layer_count(w)
        self.d_model, self.n_heads, self.head_dim = C, int(n_heads), C // n_heads
        self.d_ff = w["l0.W1"].shape[0]
        kv_dim = w["l0.Wk"].shape[0]
        if kv_dim % self.head_dim or n_heads % (kv_dim // self.head_dim or 1) or kv_dim == 0:
            raise ValueError(f"array 'l0.Wk' has {kv_dim} rows; expected a multiple of head_dim={self.head_dim} "
                             f"with a number of key/value heads that divides n_heads={n_heads}")
        self.n_kv_heads = kv_dim // self.head_dim
        if n_kv_heads is not None and n_kv_heads != self.n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads}, but array 'l0.Wk' {w['l0.Wk'].shape} holds "
                             f"{self.n_kv_heads} key/value heads of head_dim={self.head_dim}")
        if positions == "learned":
            if "pos" not in w:
                raise ValueError(f"positions='learned' needs array 'pos' (P, {C}); present: {sorted(w)}")
            n_positions = expect_shape("array 'pos'", w["pos"], (None, C)).shape[0]
        else:
            n_positions = None
            if "pos" in w:
                raise ValueError(f"array 'pos' given with positions={positions!r}; use positions='learned'")
        if positions == "sinusoidal" and C % 2:
            raise ValueError(f"sinusoidal positions need an even width, got C={C}")
        if positions == "rotary" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {self.head_dim}")
        shapes = expected_shapes(self.n_layers, C, self.d_ff, V, kv_dim, n_positions=n_positions, norm=norm,
                                 activation=activation, out_vocab=w["out.W"].shape[0])
        for name, (shape, required) in shapes.items():
            if name in w:
                expect_shape(f"array {name!r}", w[name], shape)
            elif required:
                raise ValueError(f"missing array {name!r}; expected shape {format_shape(shape)}")
        extra = sorted(set(w) - set(shapes))
        if extra:
            raise ValueError(f"unexpected arrays {extra} for a {self.n_layers}-layer transformer with "
                             f"norm={norm!r}, activation={activation!r}, positions={positions!r}; "
                             f"expected names: {sorted(shapes)}")

        self.vocab_size = w["out.W"].shape[0]
        self.embed_vocab = V
        self.positions, self.sinusoidal_layout, self.rope_theta = positions, sinusoidal_layout, float(rope_theta)
        self.norm, self.norm_position, self.norm_eps = norm, norm_position, float(norm_eps)
        self.activation, self.embed_scale = activation, float(embed_scale)
        if block_size is not None and n_positions is not None and block_size > n_positions:
            raise ValueError(f"block_size={block_size} exceeds the {n_positions} learned positions in 'pos'")
        self.block_size = block_size if block_size is not None else n_positions
        self.dtype = np.dtype(dtype) if dtype is not None else np.result_type(*w.values())
        self.weights = {name: a.astype(self.dtype, copy=False) for name, a in w.items()}
        self._prepare()

    # ------------------------------------------------------------ construction helpers

    def _prepare(self) -> None:
        """Fused, transposed copies for speed: [Wq; Wk; Wv]^T per layer, [Wg; W1]^T for swiglu."""
        w, dt = self.weights, self.dtype

        def bias(names, rows):
            if not any(n in w for n in names):
                return None
            return np.concatenate([w.get(n, np.zeros(r, dt)) for n, r in zip(names, rows)])

        C, kv = self.d_model, self.n_kv_heads * self.head_dim
        self._layers = []
        for i in range(self.n_layers):
            p = f"l{i}."
            ff = ("g", "1") if self.activation == "swiglu" else ("1",)
            self._layers.append({
                "qkv": np.ascontiguousarray(np.concatenate([w[p + "Wq"], w[p + "Wk"], w[p + "Wv"]]).T),
                "qkv_b": bias([p + "bq", p + "bk", p + "bv"], [C, kv, kv]),
                "o": np.ascontiguousarray(w[p + "Wo"].T), "o_b": w.get(p + "bo"),
                "fc": np.ascontiguousarray(np.concatenate([w[p + "W" + g] for g in ff]).T),
                "fc_b": bias([p + "b" + g for g in ff], [self.d_ff] * len(ff)),
                "proj": np.ascontiguousarray(w[p + "W2"].T), "proj_b": w.get(p + "b2"),
            })
        self._out = np.ascontiguousarray(w["out.W"].T)

    @classmethod
    def random(cls, vocab_size: int, d_model: int = 32, n_layers: int = 2, n_heads: int = 4, *,
               d_ff: int | None = None, n_kv_heads: int | None = None, n_positions: int = 64,
               bias: bool = True, seed: int | None = None, dtype=np.float32, **kwargs) -> "TransformerLM":
        """A model with N(0, 0.02^2) weights (zero biases, unit norm weights) of the given sizes."""
        rng = np.random.default_rng(seed)
        F = d_ff or 4 * d_model
        kv = (n_kv_heads or n_heads) * (d_model // n_heads)
        positions = kwargs.get("positions", "learned")
        shapes = expected_shapes(n_layers, d_model, F, vocab_size, kv,
                                 n_positions=n_positions if positions == "learned" else None,
                                 norm=kwargs.get("norm", "layernorm"), activation=kwargs.get("activation", "gelu"))
        w = {}
        for name, (shape, required) in shapes.items():
            if name.endswith(".w"):
                w[name] = np.ones(shape)
            elif name.rsplit(".", 1)[-1].startswith("b"):          # bq, b1, .b (norms), out.b, ...
                if bias:
                    w[name] = np.zeros(shape)
            elif required:
                w[name] = rng.normal(0.0, 0.02, shape)
        w = {k: v.astype(dtype) for k, v in w.items()}
        return cls(w, n_heads=n_heads, n_kv_heads=n_kv_heads, **kwargs)

    # ------------------------------------------------------------ pieces

    @property
    def max_context(self) -> int | None:
        """Most positions a state can hold (None: unbounded)."""
        return self.block_size

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        if self.norm == "none" or name + ".w" not in self.weights:
            return x
        w = self.weights
        if self.norm == "layernorm":
            return layer_norm(x, w[name + ".w"], w.get(name + ".b"), eps=self.norm_eps)
        return rms_norm(x, w[name + ".w"], eps=self.norm_eps)

    def _embed(self, ids: np.ndarray, start: int) -> np.ndarray:
        x = self.weights["embed"][ids]
        if self.embed_scale != 1.0:
            x = x * np.asarray(self.embed_scale, dtype=self.dtype)
        T = ids.shape[1]
        if self.positions == "learned":
            x = x + self.weights["pos"][start:start + T]
        elif self.positions == "sinusoidal":
            x = x + sinusoidal_encoding(np.arange(start, start + T), self.d_model, self.sinusoidal_layout).astype(self.dtype)
        return x

    def _mlp(self, h: np.ndarray, lw: dict) -> np.ndarray:
        a = _linear(h, lw["fc"], lw["fc_b"])
        if self.activation == "swiglu":
            a = _silu(a[..., :self.d_ff]) * a[..., self.d_ff:]
        elif self.activation == "relu":
            a = relu(a)
        elif self.activation == "gelu_tanh":
            a = gelu(a, approximate="tanh").astype(self.dtype, copy=False)
        else:
            a = gelu_fast(a)
        return _linear(a, lw["proj"], lw["proj_b"])

    def _attention(self, h: np.ndarray, lw: dict, i: int, cache: KVCache, start: int, rotary, keep: list | None):
        B, T, C = h.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = _linear(h, lw["qkv"], lw["qkv_b"])
        q = qkv[..., :C].reshape(B, T, H, D).transpose(0, 2, 1, 3)
        k = qkv[..., C:C + Hkv * D].reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
        v = qkv[..., C + Hkv * D:].reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        end = start + T
        if i == len(cache.k):                                   # a fresh cache
            cap = max(end, min(64, self.block_size or 64))
            cache.k.append(np.empty((B, Hkv, cap, D), self.dtype))
            cache.v.append(np.empty((B, Hkv, cap, D), self.dtype))
        elif end > cache.k[i].shape[2]:                          # grow by doubling
            cap = max(end, 2 * cache.k[i].shape[2])
            if self.block_size is not None:
                cap = max(end, min(cap, self.block_size))
            for buf in (cache.k, cache.v):
                grown = np.empty((B, Hkv, cap, D), self.dtype)
                grown[:, :, :start] = buf[i][:, :, :start]
                buf[i] = grown
        cache.k[i][:, :, start:end] = k
        cache.v[i][:, :, start:end] = v
        K, V = cache.k[i][:, :, :end], cache.v[i][:, :, :end]
        # group the query heads by the key/value head they share: (B, H_kv, H/H_kv, T, D)
        qg = q.reshape(B, Hkv, H // Hkv, T, D) * np.asarray(1.0 / math.sqrt(D), dtype=self.dtype)
        scores = qg @ np.swapaxes(K, -1, -2)[:, :, None]                      # (B, H_kv, rep, T, end)
        if T > 1:
            scores = np.where(causal_mask(T, end), -np.inf, scores)
        weights = masked_softmax(scores)
        y = (weights @ V[:, :, None]).reshape(B, H, T, D).transpose(0, 2, 1, 3).reshape(B, T, C)
        if keep is not None:
            keep.append(weights.reshape(B, H, T, end))
        return _linear(y, lw["o"], lw["o_b"])

    # ------------------------------------------------------------ public calls

    def forward(self, ids, state: KVCache | None = None, *, return_attention: bool = False):
        """ids (B, T) ints at positions state.length.. -> logits (B, T, V) and the state after them.

        (T,) ids (one sequence) give (T, V). With ``return_attention=True`` the returned
        state's ``attention`` lists each layer's weights (B, H, T, state.length + T).
        """
        ids = np.asarray(ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers; got dtype {ids.dtype}")
        batched = ids.ndim == 2
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"ids have shape {ids.shape}; expected (B, T) or (T,)")
        if ids.size and (ids.min() < 0 or ids.max() >= self.embed_vocab):
            raise ValueError(f"token ids must be in [0, {self.embed_vocab}); got min {ids.min()}, max {ids.max()}")
        B, T = ids.shape
        start = state.length if state is not None else 0
        if state is not None and state.k and state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} rows; ids have {B}")
        if self.block_size is not None and start + T > self.block_size:
            raise ValueError(f"{start + T} positions exceed the model's block_size={self.block_size}; "
                             "crop the input or continue with a fresh state over the last block_size tokens")
        cache = KVCache(list(state.k), list(state.v), start) if state is not None else KVCache()
        if T == 0:
            logits = np.zeros((B, 0, self.vocab_size), self.dtype)
            return (logits if batched else logits[0]), cache
        x = self._embed(ids, start)
        rotary = rotary_cos_sin(np.arange(start, start + T), self.head_dim, self.rope_theta) \
            if self.positions == "rotary" else None
        keep: list | None = [] if return_attention else None
        pre = self.norm_position == "pre"
        for i, lw in enumerate(self._layers):
            p = f"l{i}."
            if pre:
                x = x + self._attention(self._norm(x, p + "norm1"), lw, i, cache, start, rotary, keep)
                x = x + self._mlp(self._norm(x, p + "norm2"), lw)
            else:
                x = self._norm(x + self._attention(x, lw, i, cache, start, rotary, keep), p + "norm1")
                x = self._norm(x + self._mlp(x, lw), p + "norm2")
        logits = _linear(self._norm(x, "norm_f"), self._out, self.weights.get("out.b"))
        cache.length = start + T
        cache.attention = keep
        return (logits if batched else logits[0]), cache

    __call__ = forward

    def step(self, token, state: KVCache | None = None):
        """One token per row: ids (B,) -> logits (B, V), or a scalar -> (V,); and the new state."""
        token = np.asarray(token)
        if token.ndim == 0:
            logits, state = self.forward(token.reshape(1, 1), state)
            return logits[0, 0], state
        if token.ndim != 1:
            raise ValueError(f"step takes ids (B,) or a scalar; got shape {token.shape}")
        logits, state = self.forward(token[:, None], state)
        return logits[:, 0], state

    # ------------------------------------------------------------ scoring and sampling (reference.sequence)

    def token_nlls(self, ids: Sequence[int], prompt: Sequence[int]) -> np.ndarray:
        """-log p(ids[t] | prompt, ids[:t]) per token (nats), fed one token at a time."""
        return _token_nlls(self.step, ids, prompt)

    def sequence_nll(self, ids: Sequence[int], prompt: Sequence[int]) -> float:
        return _sequence_nll(self.step, ids, prompt)

    def perplexity(self, ids: Sequence[int], prompt: Sequence[int]) -> float:
        """exp(mean NLL of ``ids`` after ``prompt``)."""
        return _perplexity(self.step, ids, prompt)

    def sample(self, prompt: Sequence[int], max_new_tokens: int, **kwargs) -> np.ndarray:
        """``reference.sequence.sample`` with this model: temperature, greedy, seed, stop_id."""
        return _sample(self.step, prompt, max_new_tokens, **kwargs)

    def __repr__(self) -> str:
        return (f"TransformerLM(layers={self.n_layers}, d_model={self.d_model}, heads={self.n_heads}, "
                f"kv_heads={self.n_kv_heads}, d_ff={self.d_ff}, vocab={self.vocab_size}, "
                f"positions={self.positions!r}, norm={self.norm!r}/{self.norm_position!r}, "
                f"activation={self.activation!r}, dtype={self.dtype})")
