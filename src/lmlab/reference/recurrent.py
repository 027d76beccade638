"""Recurrent language models (vanilla RNN, GRU, LSTM) run from numpy weights.

Per layer k (input x: the embedding for k = 0, the layer below's h otherwise),
with sigma = recurrent_activation (sigmoid) and phi = activation (tanh):

    RNN   h' = phi(W x + bx + U h + bh)

    GRU   r  = sigma(W_r x + bx_r + U_r h + bh_r)
          z  = sigma(W_z x + bx_z + U_z h + bh_z)
          n  = phi(W_n x + bx_n + r * (U_n h + bh_n))        reset_after=True (PyTorch, Keras 2 default, cuDNN)
          n  = phi(W_n x + bx_n + U_n (r * h) + bh_n)        reset_after=False (the classic GRU)
          h' = (1 - z) * n + z * h

    LSTM  i, f, o = sigma(W_. x + bx_. + U_. h + bh_.)
          g  = phi(W_g x + bx_g + U_g h + bh_g)
          c' = f * c + i * g
          h' = o * phi(c')

and the output layer: logits = out.W h'_top + out.b.

Weight layout: a flat dict of numpy arrays, one matrix per gate ("_r" etc.; the
vanilla RNN has no suffix), matrices (out, in) as in the formulas above. Each layer
k has its own width H_k (the widths may differ, e.g. 128 then 64):

    embed            (V_in, E)   optional; without it, ids are fed as one-hot vectors (E = V_in)
    l{k}.W_{gate}    (H_k, E) for k = 0, (H_k, H_{k-1}) above
    l{k}.U_{gate}    (H_k, H_k)
    l{k}.bx_{gate}   (H_k,)      bias of the input term
    l{k}.bh_{gate}   (H_k,)      bias of the recurrent term
    out.W            (V, H_top)
    out.b            (V,)

State: {"h": (B, L, max H_k)} (and "c" for the LSTM) -- batch first, like every lmlab
state; without a batch axis (one sequence), (L, max H_k). Layer k's vector is
``h[:, k, :H_k]``; with different widths the rest of the row is zeros.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from lmlab.reference.ops import ACTIVATIONS, expect_shape, format_shape, one_hot, to_numpy

__all__ = ["GATES", "RecurrentLM", "from_torch_state_dict", "random_weights"]

GATES: dict[str, tuple[str, ...]] = {"rnn": ("",), "gru": ("r", "z", "n"), "lstm": ("i", "f", "g", "o")}


def _sfx(gate: str) -> str:
    return f"_{gate}" if gate else ""


def _check_kind(kind: str) -> str:
    if kind not in GATES:
        raise ValueError(f"unknown recurrent kind {kind!r}; accepted: {', '.join(GATES)}")
    return kind


def layer_widths(hidden: int | Sequence[int], n_layers: int) -> tuple[int, ...]:
    """Per-layer widths from one width for every layer or a sequence of ``n_layers`` widths."""
    if isinstance(hidden, (int, np.integer)):
        return (int(hidden),) * n_layers
    widths = tuple(int(h) for h in hidden)
    if len(widths) != n_layers:
        raise ValueError(f"hidden sizes {list(widths)} give {len(widths)} layer widths for n_layers={n_layers}; "
                         f"give one width per layer, or one int for all")
    return widths


def expected_shapes(kind: str, n_layers: int, hidden: int | Sequence[int], input_size: int, vocab: int,
                    embed_vocab: int | None) -> dict[str, tuple[int, ...]]:
    """Every array name of the layout and its shape; ``hidden``: one width, or one per layer."""
    widths = layer_widths(hidden, n_layers)
    shapes: dict[str, tuple[int, ...]] = {}
    if embed_vocab is not None:
        shapes["embed"] = (embed_vocab, input_size)
    n_in = input_size
    for k, H in enumerate(widths):
        for g in GATES[_check_kind(kind)]:
            s = _sfx(g)
            shapes.update({f"l{k}.W{s}": (H, n_in), f"l{k}.U{s}": (H, H),
                           f"l{k}.bx{s}": (H,), f"l{k}.bh{s}": (H,)})
        n_in = H
    shapes.update({"out.W": (vocab, n_in), "out.b": (vocab,)})
    return shapes


class RecurrentLM:
    """A stack of RNN/GRU/LSTM layers and a dense output layer, in numpy.

    ``model(ids, state=None) -> (logits, state)``: ids (B, T) int -> logits (B, T, V), or
    dense inputs (B, T, E) float; without the batch axis, (T,) -> (T, V).
    ``model.step(x_t, state) -> (logits, state)``: one token, ids (B,) or a scalar, or (B, E) / (E,).
    """

    def __init__(self, weights: Mapping[str, np.ndarray], kind: str, *, reset_after: bool = True,
                 activation: str = "tanh", recurrent_activation: str = "sigmoid", dtype=None) -> None:
        self.kind = _check_kind(kind)
        self.reset_after = bool(reset_after)
        for name, value in (("activation", activation), ("recurrent_activation", recurrent_activation)):
            if value not in ACTIVATIONS:
                raise ValueError(f"{name}={value!r}; accepted: {', '.join(ACTIVATIONS)}")
        self.activation, self.recurrent_activation = activation, recurrent_activation
        self.phi, self.sigma = ACTIVATIONS[activation], ACTIVATIONS[recurrent_activation]

        w = {name: to_numpy(a) for name, a in weights.items()}
        s0 = _sfx(GATES[kind][0])
        # sizes from four arrays, then every array checked against them
        for name, want in ((f"l0.U{s0}", "(H, H)"), (f"l0.W{s0}", "(H, E)"), ("out.W", "(V, H)"), ("embed", "(V, E)")):
            if name not in w and name != "embed":
                raise ValueError(f"missing array {name!r} (expected shape {want}); present: {sorted(w)}")
            if name in w and w[name].ndim != 2:
                raise ValueError(f"array {name!r} has shape {w[name].shape}; expected {want}")
        self.n_layers = L = next(k for k in range(len(w) + 1) if f"l{k}.W{s0}" not in w)
        for k in range(1, L):
            name = f"l{k}.U{s0}"
            if name not in w:
                raise ValueError(f"missing array {name!r} (expected shape (H_{k}, H_{k})); present: {sorted(w)}")
            expect_shape(f"array {name!r}", w[name], (None, None))
        self.hidden_sizes = tuple(w[f"l{k}.U{s0}"].shape[0] for k in range(L))   # one width per layer
        self.hidden_size = max(self.hidden_sizes)                                  # the state's last axis
        self.embed_vocab = w["embed"].shape[0] if "embed" in w else None
        self.input_size = w["embed"].shape[1] if "embed" in w else w[f"l0.W{s0}"].shape[1]
        self.vocab_size = w["out.W"].shape[0]

        shapes = expected_shapes(kind, L, self.hidden_sizes, self.input_size, self.vocab_size, self.embed_vocab)
        for name, shape in shapes.items():
            if name not in w:
                raise ValueError(f"missing array {name!r}; expected shape {format_shape(shape)}")
            expect_shape(f"array {name!r}", w[name], shape)
        extra = sorted(set(w) - set(shapes))
        if extra:
            raise ValueError(f"unexpected arrays {extra} for a {L}-layer {kind}; expected names: {sorted(shapes)}")
        self.dtype = np.dtype(dtype) if dtype is not None else np.result_type(*w.values())
        self.weights = {name: a.astype(self.dtype, copy=False) for name, a in w.items()}

    @classmethod
    def random(cls, kind: str, vocab_size: int, hidden_size: int | Sequence[int], n_layers: int = 1, *,
               embed_dim: int | None = None, seed: int | None = None, dtype=np.float64,
               **kwargs) -> "RecurrentLM":
        """A model with random weights (see ``random_weights``); ``hidden_size``: one width or one per layer."""
        w = random_weights(kind, vocab_size, hidden_size, n_layers, embed_dim=embed_dim, seed=seed, dtype=dtype)
        return cls(w, kind, **kwargs)

    # ------------------------------------------------------------ state

    def init_state(self, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Zeros: (B, L, max H_k) per entry, or (L, max H_k) when ``batch_size`` is None."""
        shape = (self.n_layers, self.hidden_size) if batch_size is None else (batch_size, self.n_layers, self.hidden_size)
        names = ("h", "c") if self.kind == "lstm" else ("h",)
        return {n: np.zeros(shape, dtype=self.dtype) for n in names}

    @staticmethod
    def select(state: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``index`` of a batched state (for beam search)."""
        return {k: v[np.asarray(index)] for k, v in state.items()}

    # ------------------------------------------------------------ the cells

    def _in(self, k: int, g: str, x: np.ndarray) -> np.ndarray:
        """W_g x + bx_g for a batch x: (B, n_in) -> (B, H)."""
        w = self.weights
        return x @ w[f"l{k}.W{_sfx(g)}"].T + w[f"l{k}.bx{_sfx(g)}"]

    def _rec(self, k: int, g: str, h: np.ndarray) -> np.ndarray:
        """U_g h + bh_g for a batch h: (B, H) -> (B, H)."""
        w = self.weights
        return h @ w[f"l{k}.U{_sfx(g)}"].T + w[f"l{k}.bh{_sfx(g)}"]

    def _cell(self, k: int, x: np.ndarray, h: np.ndarray, c: np.ndarray | None):
        """One layer, one time step: x (B, n_in), h (B, H), c (B, H) or None -> (h', c')."""
        phi, sigma, pre = self.phi, self.sigma, lambda g: self._in(k, g, x) + self._rec(k, g, h)
        if self.kind == "rnn":
            return phi(pre("")), None
        if self.kind == "gru":
            r, z = sigma(pre("r")), sigma(pre("z"))
            if self.reset_after:
                n = phi(self._in(k, "n", x) + r * self._rec(k, "n", h))
            else:
                n = phi(self._in(k, "n", x) + self._rec(k, "n", r * h))
            return (1 - z) * n + z * h, None
        i, f, g, o = sigma(pre("i")), sigma(pre("f")), phi(pre("g")), sigma(pre("o"))
        c = f * c + i * g
        return o * phi(c), c

    def _inputs(self, x: np.ndarray) -> np.ndarray:
        """ids (...) -> embedding or one-hot (..., E); dense (..., E) -> cast to the model dtype."""
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.integer):
            n = self.embed_vocab if self.embed_vocab is not None else self.input_size
            if x.size and (x.min() < 0 or x.max() >= n):
                raise ValueError(f"token ids must be in [0, {n}); got min {x.min()}, max {x.max()}")
            if self.embed_vocab is not None:
                return self.weights["embed"][x]
            return one_hot(x, n, dtype=self.dtype)
        if x.shape[-1:] != (self.input_size,):
            raise ValueError(f"dense inputs have shape {x.shape}; expected (..., {self.input_size}) "
                             f"(or integer token ids)")
        return x.astype(self.dtype, copy=False)

    def _step_batch(self, x: np.ndarray, state: dict[str, np.ndarray]):
        """x: (B, E), state (B, L, max H_k) -> logits (B, V), new state."""
        new = {name: np.zeros_like(a) for name, a in state.items()}
        for k, H in enumerate(self.hidden_sizes):
            c = state["c"][:, k, :H] if self.kind == "lstm" else None
            x, c = self._cell(k, x, state["h"][:, k, :H], c)
            new["h"][:, k, :H] = x
            if self.kind == "lstm":
                new["c"][:, k, :H] = c
        return x @ self.weights["out.W"].T + self.weights["out.b"], new

    # ------------------------------------------------------------ public calls

    def step(self, x_t, state: dict[str, np.ndarray] | None = None):
        """One token. x_t: ids (B,) / scalar, or dense (B, E) / (E,) -> logits (B, V) / (V,), state."""
        e = self._inputs(x_t)
        if e.ndim not in (1, 2):
            raise ValueError(f"step input has shape {np.shape(x_t)}; expected ids (B,) or a scalar, "
                             f"or dense (B, {self.input_size}) or ({self.input_size},)")
        batched = e.ndim == 2
        if not batched:
            e = e[None]
        state = self._check_state(state, e.shape[0], batched)
        if not batched:
            state = {k: v[None] for k, v in state.items()}
        logits, state = self._step_batch(e, state)
        if not batched:
            return logits[0], {k: v[0] for k, v in state.items()}
        return logits, state

    def forward(self, xs, state: dict[str, np.ndarray] | None = None):
        """A sequence. xs: ids (B, T) / (T,), or dense (B, T, E) / (T, E) -> logits (B, T, V) / (T, V), state."""
        e = self._inputs(xs)
        batched = e.ndim == 3
        if not batched:
            e = e[None]
        if e.ndim != 3:
            raise ValueError(f"inputs have shape {np.shape(xs)}; expected ids (B, T) or (T,), "
                             f"or dense (B, T, {self.input_size}) or (T, {self.input_size})")
        state = self._check_state(state, e.shape[0], batched)
        if not batched:
            state = {k: v[None] for k, v in state.items()}
        out = []
        for t in range(e.shape[1]):
            logits, state = self._step_batch(e[:, t], state)
            out.append(logits)
        logits = np.stack(out, axis=1) if out else np.zeros((e.shape[0], 0, self.vocab_size), self.dtype)
        if not batched:
            return logits[0], {k: v[0] for k, v in state.items()}
        return logits, state

    __call__ = forward

    def _check_state(self, state, batch_size: int, batched: bool) -> dict[str, np.ndarray]:
        want = self.init_state(batch_size if batched else None)
        if state is None:
            return want
        if set(state) != set(want):
            raise ValueError(f"{self.kind} state has entries {sorted(state)}; expected {sorted(want)}")
        return {k: expect_shape(f"state[{k!r}]", state[k], want[k].shape) for k in want}

    def __repr__(self) -> str:
        extra = f", reset_after={self.reset_after}" if self.kind == "gru" else ""
        hidden = self.hidden_sizes[0] if len(set(self.hidden_sizes)) == 1 else list(self.hidden_sizes)
        return (f"RecurrentLM(kind={self.kind!r}, layers={self.n_layers}, hidden={hidden}, "
                f"input={self.input_size}, vocab={self.vocab_size}{extra}, dtype={self.dtype})")


def random_weights(kind: str, vocab_size: int, hidden_size: int | Sequence[int], n_layers: int = 1, *,
                   embed_dim: int | None = None, seed: int | None = None, dtype=np.float64) -> dict[str, np.ndarray]:
    """Weights in the layout above, U(-1/sqrt(H_k), 1/sqrt(H_k)) per layer like PyTorch's init
    (the output layer: the top width). ``hidden_size``: one width, or a sequence of n_layers widths.

    ``embed_dim=None``: no embedding table (ids enter as one-hot vectors of size vocab_size).
    """
    rng = np.random.default_rng(seed)
    E = vocab_size if embed_dim is None else embed_dim
    widths = layer_widths(hidden_size, n_layers)
    shapes = expected_shapes(kind, n_layers, widths, E, vocab_size, None if embed_dim is None else vocab_size)

    def draw(name: str, shape: tuple) -> np.ndarray:
        if name == "embed":
            return rng.standard_normal(shape)
        k = int(name[1:name.index(".")]) if name.startswith("l") else -1
        bound = 1 / math.sqrt(widths[k])
        return rng.uniform(-bound, bound, shape)

    return {n: draw(n, s).astype(dtype) for n, s in shapes.items()}


def _split_gates(a: np.ndarray, gates: tuple[str, ...], H: int, prefix: str) -> dict[str, np.ndarray]:
    """Rows [g0; g1; ...] of a stacked (G H, ...) array -> {prefix + suffix: (H, ...)}."""
    return {prefix + _sfx(g): a[j * H:(j + 1) * H] for j, g in enumerate(gates)}


def from_torch_state_dict(sd: Mapping[str, np.ndarray], kind: str, *, rnn_prefix: str = "rnn.",
                          embedding_prefix: str | None = "embedding.", output_prefix: str = "fc.",
                          nonlinearity: str = "tanh", dtype=None) -> RecurrentLM:
    """A ``RecurrentLM`` from a PyTorch state dict (numpy arrays or tensors).

    The recurrent weights use ``nn.RNN``/``nn.GRU``/``nn.LSTM`` names under ``rnn_prefix``:
    ``weight_ih_l{k}`` (G H_k, in_k), ``weight_hh_l{k}`` (G H_k, H_k), ``bias_ih_l{k}``, ``bias_hh_l{k}``
    (G H_k,), gates stacked r, z, n (GRU, the reset-after form) or i, f, g, o (LSTM); each layer's
    width H_k comes from its ``weight_hh``, so layers of different widths load too.
    ``{embedding_prefix}weight`` (V, E) is an ``nn.Embedding`` (None: no embedding; ids are
    one-hot), ``{output_prefix}weight`` (V, H) and ``{output_prefix}bias`` an ``nn.Linear``.
    ``nonlinearity`` is ``nn.RNN``'s ("tanh" or "relu").
    """
    gates = GATES[_check_kind(kind)]
    G = len(gates)

    def get(key: str, shape: tuple | None = None, required: bool = True):
        if key not in sd:
            if not required:
                return None
            raise ValueError(f"missing array {key!r}" + (f" (expected shape {format_shape(shape)})" if shape else "")
                             + f"; present: {sorted(sd)}")
        a = to_numpy(sd[key])
        return a if shape is None else expect_shape(f"array {key!r}", a, shape)

    p = rnn_prefix
    for key in sd:
        if key.startswith(p) and key.endswith("_reverse"):
            raise ValueError(f"bidirectional recurrent layers are not supported (found {key!r})")
        if key.startswith(p + "weight_hr_l"):
            raise ValueError(f"LSTM projections (proj_size) are not supported (found {key!r})")
    w: dict[str, np.ndarray] = {}
    k, n_in = 0, None
    while p + f"weight_ih_l{k}" in sd or k == 0:
        hh = get(p + f"weight_hh_l{k}", (None, None))        # (G H_k, H_k): this layer's width
        H = hh.shape[1]
        if hh.shape[0] != G * H:
            raise ValueError(f"array {p + f'weight_hh_l{k}'!r} has shape {hh.shape}; expected ({G * H}, {H}) "
                             f"for a {kind} with {G} gate(s)")
        W = get(p + f"weight_ih_l{k}", (G * H, n_in))
        zeros = np.zeros(G * H, dtype=hh.dtype)
        bx = get(p + f"bias_ih_l{k}", (G * H,), required=False)
        bh = get(p + f"bias_hh_l{k}", (G * H,), required=False)
        w.update(_split_gates(W, gates, H, f"l{k}.W"))
        w.update(_split_gates(hh, gates, H, f"l{k}.U"))
        w.update(_split_gates(zeros if bx is None else bx, gates, H, f"l{k}.bx"))
        w.update(_split_gates(zeros if bh is None else bh, gates, H, f"l{k}.bh"))
        k, n_in = k + 1, H
    E = w[f"l0.W{_sfx(gates[0])}"].shape[1]
    if embedding_prefix is not None:
        w["embed"] = get(embedding_prefix + "weight", (None, E))
    out_W = get(output_prefix + "weight", (None, H))
    w["out.W"] = out_W
    w["out.b"] = get(output_prefix + "bias", (out_W.shape[0],), required=False)
    if w["out.b"] is None:
        w["out.b"] = np.zeros(out_W.shape[0], dtype=out_W.dtype)
    return RecurrentLM(w, kind, reset_after=True, activation=nonlinearity if kind == "rnn" else "tanh", dtype=dtype)
