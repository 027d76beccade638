"""Backpropagation through time for ``reference.recurrent.RecurrentLM``, by hand in numpy.

Shapes: B batch, T steps, E input width, L layers, H_k layer k's width, H = max H_k
(the padded state), V vocabulary. The forward pass (``forward_trace``) keeps, for every
step t and layer k, the layer's input x (B, n_in_k), the state it read h_{t-1} (B, H_k)
(c_{t-1} for the LSTM), its gate values and what it wrote, h_t (B, H_k).

The loss is any function of the logits O (B, T, V) and, optionally, of the final
state; ``backward`` takes dL/dO and returns:

- dL/dO (B, T, V) -> dL/d out.W (V, H_top) = sum_t dO_tᵀ h_t, dL/d out.b (V,), and
  dO_t/dh_t = out.W (V, H_top) per row (O_t (V,) by h_t (H_top,): the shapes concatenated),
  so the output's share of dL/dh_t is dO_t @ out.W: (B, H_top);
- dL/dh_t (B, H_k), the total derivative of layer k's state at step t, is its output's
  share (top layer) or the layer above's dL/dx_t (lower layers), plus what flows back
  from step t+1: dL/dh_{t+1} @ dh_{t+1}/dh_t. That Jacobian is (B, H_k, H_k) per row;
  for the tanh RNN it is diag(1 - h_{t+1}²) U, so dL/dh_t is a product of such
  matrices over time, whose norm shrinks or grows geometrically (vanishing or exploding
  gradients); the LSTM's cell path contributes diag(f_{t+1}) instead, which the
  forget gate can hold near 1;
- per cell, dL/da (B, H_k) for each gate pre-activation a = W x + bx + U h + bh; then
  dL/dW = daᵀ x (H_k, n_in), dL/dU = daᵀ h_{t-1} (H_k, H_k), dL/dbx = dL/dbh = sum_b da
  (H_k,) (the GRU's reset-after candidate: dL/dbh_n = sum_b da_n * r), and
  dL/dx_t = da @ W (B, n_in) (dH/dX: the layer's input), dL/dh_{t-1} = da @ U (B, H_k)
  plus the direct paths (GRU: dh' * z; LSTM cell: dc' * f).

Truncated BPTT over windows of k steps (``bptt(..., window=k)``): the state's value
passes from one window to the next, its gradient does not -- what ``state.detach()``
between windows does in PyTorch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lmlab.reference.ops import log_softmax, softmax
from lmlab.reference.recurrent import GATES, RecurrentLM, _sfx

__all__ = ["Gradients", "Trace", "backward", "bptt", "cross_entropy", "forward_trace", "hidden_gradient_norms"]


def activation_grad(name: str, y: np.ndarray, a: np.ndarray) -> np.ndarray:
    """d y / d a elementwise for y = activation(a); both (...), the same shape."""
    if name == "tanh":
        return 1.0 - y * y
    if name == "sigmoid":
        return y * (1.0 - y)
    if name == "relu":
        return (a > 0).astype(y.dtype)
    if name == "hard_sigmoid":
        s = 0.2 * a + 0.5
        return np.where((s > 0) & (s < 1), 0.2, 0.0).astype(y.dtype)
    if name == "linear":
        return np.ones_like(y)
    raise ValueError(f"no derivative for activation {name!r}; accepted: tanh, sigmoid, relu, hard_sigmoid, linear")


class Trace:
    """What ``forward_trace`` keeps: inputs (B, T, E), the ids (B, T) or None (dense inputs),
    logits (B, T, V), the final and the initial state, and ``cells[t][k]``: a dict of layer
    k's values at step t (its input ``x``, the state it read ``h`` / ``c``, gate values,
    pre-activations ``pre`` and what it wrote ``h_new`` / ``c_new``)."""

    def __init__(self, inputs: np.ndarray, ids: np.ndarray | None, logits: np.ndarray,
                 state: dict[str, np.ndarray], initial: dict[str, np.ndarray],
                 cells: list[list[dict[str, np.ndarray]]]) -> None:
        self.inputs, self.ids, self.logits = inputs, ids, logits
        self.state, self.initial, self.cells = state, initial, cells

    def __repr__(self) -> str:
        return f"Trace(inputs={self.inputs.shape}, logits={self.logits.shape})"


class Gradients(NamedTuple):
    """dL/d everything: ``weights`` (the model's names and shapes), ``inputs`` (B, T, E)
    (dL/dx_t of the embedded or one-hot inputs), ``state`` (dL/d initial state, (B, L, H)
    per entry, zeros in the padding), ``hidden`` (B, T, L, H): dL/dh_t of each layer
    (the total derivative; with truncation, within the step's window)."""

    weights: dict[str, np.ndarray]
    inputs: np.ndarray
    state: dict[str, np.ndarray]
    hidden: np.ndarray


def _batched_inputs(model: RecurrentLM, xs) -> tuple[np.ndarray, np.ndarray | None]:
    """ids (B, T) or dense (B, T, E) -> (inputs (B, T, E), ids or None)."""
    arr = np.asarray(xs)
    integer = np.issubdtype(arr.dtype, np.integer)
    if arr.ndim != (2 if integer else 3):
        raise ValueError(f"inputs have shape {arr.shape}; expected ids (B, T) or dense (B, T, {model.input_size})")
    return model._inputs(arr), (arr if integer else None)


def _cell_forward(model: RecurrentLM, k: int, x: np.ndarray, h: np.ndarray, c: np.ndarray | None) -> dict:
    """Layer k, one step, keeping what the backward pass needs. x (B, n_in), h, c (B, H_k)."""
    phi, sigma = model.phi, model.sigma
    pre = {g: model._in(k, g, x) + model._rec(k, g, h) for g in GATES[model.kind]
           if not (model.kind == "gru" and g == "n")}
    cache = {"x": x, "h": h, "c": c, "pre": pre}
    if model.kind == "rnn":
        cache["h_new"] = phi(pre[""])
        return cache
    if model.kind == "gru":
        r, z = sigma(pre["r"]), sigma(pre["z"])
        if model.reset_after:
            rec_n = model._rec(k, "n", h)                       # U_n h + bh_n (B, H_k)
            a_n = model._in(k, "n", x) + r * rec_n
        else:
            rec_n = None
            a_n = model._in(k, "n", x) + model._rec(k, "n", r * h)
        n = phi(a_n)
        pre["n"] = a_n
        cache.update(r=r, z=z, n=n, rec_n=rec_n, h_new=(1 - z) * n + z * h)
        return cache
    i, f, g, o = sigma(pre["i"]), sigma(pre["f"]), phi(pre["g"]), sigma(pre["o"])
    c_new = f * c + i * g
    tanh_c = phi(c_new)
    cache.update(i=i, f=f, g=g, o=o, c_new=c_new, tanh_c=tanh_c, h_new=o * tanh_c)
    return cache


def forward_trace(model: RecurrentLM, xs, state: dict[str, np.ndarray] | None = None) -> Trace:
    """The forward pass of ``model(xs, state)`` keeping every intermediate value.

    xs: ids (B, T) or dense inputs (B, T, E); state: (B, L, H) per entry or None (zeros).
    """
    inputs, ids = _batched_inputs(model, xs)
    B, T = inputs.shape[:2]
    state = model._check_state(state, B, True)
    initial = {n: a.copy() for n, a in state.items()}
    h = [state["h"][:, k, :H] for k, H in enumerate(model.hidden_sizes)]
    c = [state["c"][:, k, :H] for k, H in enumerate(model.hidden_sizes)] if model.kind == "lstm" else None
    cells, logits = [], np.zeros((B, T, model.vocab_size), model.dtype)
    for t in range(T):
        x, step = inputs[:, t], []
        for k in range(model.n_layers):
            cache = _cell_forward(model, k, x, h[k], c[k] if c else None)
            step.append(cache)
            x = h[k] = cache["h_new"]
            if c:
                c[k] = cache["c_new"]
        cells.append(step)
        logits[:, t] = x @ model.weights["out.W"].T + model.weights["out.b"]
    final = model.init_state(B)
    for k, H in enumerate(model.hidden_sizes):
        final["h"][:, k, :H] = h[k]
        if c:
            final["c"][:, k, :H] = c[k]
    return Trace(inputs, ids, logits, final, initial, cells)


def _accumulate_gate(grads: dict, k: int, gate: str, da: np.ndarray, x: np.ndarray,
                     h_in: np.ndarray | None, da_rec: np.ndarray | None = None) -> None:
    """dW += daᵀ x, dbx += sum da; dU += da_recᵀ h_in, dbh += sum da_rec (da_rec = da unless given)."""
    s = _sfx(gate)
    da_rec = da if da_rec is None else da_rec
    grads[f"l{k}.W{s}"] += da.T @ x
    grads[f"l{k}.bx{s}"] += da.sum(0)
    grads[f"l{k}.U{s}"] += da_rec.T @ h_in
    grads[f"l{k}.bh{s}"] += da_rec.sum(0)


def _cell_backward(model: RecurrentLM, k: int, cache: dict, dh: np.ndarray, dc: np.ndarray | None,
                   grads: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Layer k, one step: dL/dh_t (B, H_k) (and dL/dc_t) -> dL/dx_t (B, n_in), dL/dh_{t-1},
    dL/dc_{t-1}; adds the weight gradients of the step into ``grads``."""
    w, act, ract = model.weights, model.activation, model.recurrent_activation
    x, h = cache["x"], cache["h"]
    W = lambda g: w[f"l{k}.W{_sfx(g)}"]                     # (H_k, n_in)
    U = lambda g: w[f"l{k}.U{_sfx(g)}"]                     # (H_k, H_k)
    if model.kind == "rnn":
        da = dh * activation_grad(act, cache["h_new"], cache["pre"][""])      # (B, H_k)
        _accumulate_gate(grads, k, "", da, x, h)
        return da @ W(""), da @ U(""), None
    if model.kind == "gru":
        r, z, n = cache["r"], cache["z"], cache["n"]
        dn, dz, dh_prev = dh * (1 - z), dh * (h - n), dh * z
        da_n = dn * activation_grad(act, n, cache["pre"]["n"])               # (B, H_k)
        if model.reset_after:
            rec_n = cache["rec_n"]
            dr = da_n * rec_n
            _accumulate_gate(grads, k, "n", da_n, x, h, da_rec=da_n * r)
            dh_prev = dh_prev + (da_n * r) @ U("n")
        else:
            d_rh = da_n @ U("n")                                              # dL/d(r * h) (B, H_k)
            dr = d_rh * h
            _accumulate_gate(grads, k, "n", da_n, x, r * h)
            dh_prev = dh_prev + d_rh * r
        da_r = dr * activation_grad(ract, r, cache["pre"]["r"])
        da_z = dz * activation_grad(ract, z, cache["pre"]["z"])
        for g, da in (("r", da_r), ("z", da_z)):
            _accumulate_gate(grads, k, g, da, x, h)
            dh_prev = dh_prev + da @ U(g)
        dx = da_r @ W("r") + da_z @ W("z") + da_n @ W("n")
        return dx, dh_prev, None
    i, f, g, o, tanh_c = cache["i"], cache["f"], cache["g"], cache["o"], cache["tanh_c"]
    do = dh * tanh_c
    dc = dc + dh * o * activation_grad(act, tanh_c, cache["c_new"])          # dL/dc_t (B, H_k)
    das = {"i": dc * g * activation_grad(ract, i, cache["pre"]["i"]),
           "f": dc * cache["c"] * activation_grad(ract, f, cache["pre"]["f"]),
           "g": dc * i * activation_grad(act, g, cache["pre"]["g"]),
           "o": do * activation_grad(ract, o, cache["pre"]["o"])}
    dx, dh_prev = 0.0, 0.0
    for gate, da in das.items():
        _accumulate_gate(grads, k, gate, da, x, h)
        dx = dx + da @ W(gate)
        dh_prev = dh_prev + da @ U(gate)
    return dx, dh_prev, dc * f


def backward(model: RecurrentLM, trace: Trace, dlogits: np.ndarray,
             dstate: dict[str, np.ndarray] | None = None) -> Gradients:
    """Gradients of a loss L from dL/dO (B, T, V) and, optionally, dL/d(final state) (B, L, H)
    per entry (a loss that reads the state the sequence ends in)."""
    B, T = trace.inputs.shape[:2]
    dlogits = np.asarray(dlogits, dtype=model.dtype)
    if dlogits.shape != trace.logits.shape:
        raise ValueError(f"dlogits has shape {dlogits.shape}; expected the logits' shape {trace.logits.shape}")
    widths = model.hidden_sizes
    grads = {name: np.zeros_like(a) for name, a in model.weights.items()}
    out_W = model.weights["out.W"]
    dstate = dstate or {}
    zero = model.init_state(B)
    for name, want in zero.items():
        if name in dstate and np.shape(dstate[name]) != want.shape:
            raise ValueError(f"dstate[{name!r}] has shape {np.shape(dstate[name])}; expected {want.shape}")
    dh_next = [np.array(dstate.get("h", zero["h"])[:, k, :H], dtype=model.dtype) for k, H in enumerate(widths)]
    dc_next = ([np.array(dstate.get("c", zero["c"])[:, k, :H], dtype=model.dtype) for k, H in enumerate(widths)]
               if model.kind == "lstm" else None)
    dinputs = np.zeros_like(trace.inputs)
    hidden = np.zeros((B, T, model.n_layers, model.hidden_size), model.dtype)
    for t in reversed(range(T)):
        top = trace.cells[t][-1]["h_new"]
        grads["out.W"] += dlogits[:, t].T @ top
        grads["out.b"] += dlogits[:, t].sum(0)
        from_above = dlogits[:, t] @ out_W                                  # (B, H_top)
        for k in reversed(range(model.n_layers)):
            dh = from_above + dh_next[k]
            hidden[:, t, k, :widths[k]] = dh
            from_above, dh_next[k], dc = _cell_backward(model, k, trace.cells[t][k], dh,
                                                        dc_next[k] if dc_next else None, grads)
            if dc_next:
                dc_next[k] = dc
        dinputs[:, t] = from_above
    if trace.ids is not None and "embed" in grads:
        np.add.at(grads["embed"], trace.ids, dinputs)
    dinit = model.init_state(B)
    for k, H in enumerate(widths):
        dinit["h"][:, k, :H] = dh_next[k]
        if dc_next:
            dinit["c"][:, k, :H] = dc_next[k]
    return Gradients(grads, dinputs, dinit, hidden)


def cross_entropy(logits: np.ndarray, targets: np.ndarray, n_tokens: int | None = None) -> tuple[float, np.ndarray]:
    """Summed next-token cross-entropy / n_tokens (default: the number of targets) and its
    gradient dL/dO = (softmax(O) - onehot(target)) / n_tokens. logits (B, T, V), targets (B, T)."""
    targets = np.asarray(targets)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets have shape {targets.shape}; expected {logits.shape[:-1]} (the logits' B, T)")
    n = targets.size if n_tokens is None else n_tokens
    logp = log_softmax(logits)
    picked = np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    d = softmax(logits)
    np.put_along_axis(d, targets[..., None], np.take_along_axis(d, targets[..., None], -1) - 1.0, axis=-1)
    return float(-picked.sum() / max(n, 1)), d / max(n, 1)


def bptt(model: RecurrentLM, xs, targets, state: dict[str, np.ndarray] | None = None,
         window: int | None = None) -> tuple[float, Gradients, dict[str, np.ndarray]]:
    """Mean next-token cross-entropy over all B * T targets, its gradients, and the final state.

    ``window=None``: full BPTT over the T steps. ``window=k``: truncated BPTT, the sequence
    cut into windows of k steps (the last may be shorter); each window starts from the state
    the previous one ended in, as a value only, so ``Gradients.state`` (dL/d initial state)
    comes from the first window alone and ``hidden`` holds dL/dh_t within each window.
    """
    inputs, ids = _batched_inputs(model, xs)
    B, T = inputs.shape[:2]
    targets = np.asarray(targets)
    if targets.shape != (B, T):
        raise ValueError(f"targets have shape {targets.shape}; expected ({B}, {T}), one per input step")
    if window is None:
        window = max(T, 1)
    if int(window) < 1:
        raise ValueError(f"window={window} must be a positive number of steps (or None for full BPTT)")
    window = int(window)
    total, grads = 0.0, None
    dinputs = np.zeros_like(inputs)
    hidden = np.zeros((B, T, model.n_layers, model.hidden_size), model.dtype)
    for start in range(0, max(T, 1), window):
        span = slice(start, start + window)
        trace = forward_trace(model, ids[:, span] if ids is not None else inputs[:, span], state)
        loss, dlogits = cross_entropy(trace.logits, targets[:, span], n_tokens=B * T)
        g = backward(model, trace, dlogits)
        total += loss
        dinputs[:, span], hidden[:, span] = g.inputs, g.hidden
        if grads is None:
            grads, dinit = g.weights, g.state
        else:
            for name, a in g.weights.items():
                grads[name] += a
        state = trace.state
    return total, Gradients(grads, dinputs, dinit, hidden), state


def hidden_gradient_norms(model: RecurrentLM, ids, target: int, layer: int = -1) -> np.ndarray:
    """||dL/dh_t|| for t = 1..T of one sequence ids (T,), where L is the cross-entropy of
    ``target`` at the last step only: how much of the gradient reaches each earlier step.
    Returns (T,) (layer ``layer``'s state, the top one by default)."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"ids have shape {ids.shape}; expected one non-empty sequence (T,)")
    trace = forward_trace(model, ids[None])
    dlogits = np.zeros_like(trace.logits)
    _, dlogits[:, -1:] = cross_entropy(trace.logits[:, -1:], np.array([[int(target)]]))
    g = backward(model, trace, dlogits)
    return np.linalg.norm(g.hidden[0, :, layer], axis=-1)
