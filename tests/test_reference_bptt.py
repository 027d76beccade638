"""Backpropagation through time by hand (reference.bptt) against torch autograd on lmlab's torch models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmlab.models.base import State
from lmlab.models.recurrent import GRUConfig, GRULM, LSTMConfig, LSTMLM, RNNConfig, RNNLM
from lmlab.reference.bptt import backward, bptt, cross_entropy, forward_trace, hidden_gradient_norms
from lmlab.reference.recurrent import RecurrentLM, from_torch_state_dict

V, E = 9, 5
RTOL = 1e-8

CASES = [  # (family, config extras)
    ("rnn", {"nonlinearity": "tanh"}),
    ("rnn", {"nonlinearity": "relu"}),
    ("gru", {"gru_variant": "reset_after"}),
    ("gru", {"gru_variant": "classic"}),
    ("lstm", {}),
]
MODELS = {"rnn": (RNNLM, RNNConfig), "gru": (GRULM, GRUConfig), "lstm": (LSTMLM, LSTMConfig)}


def torch_and_numpy(kind, extras, widths, seed=0):
    """The same weights in lmlab's float64 torch model and the numpy engine."""
    torch.manual_seed(seed)
    cls, config_cls = MODELS[kind]
    config = config_cls(vocab_size=V, n_embd=E, n_hidden=list(widths), n_layer=len(widths), **extras)
    model = cls(config).double().eval()
    with torch.no_grad():                       # non-zero output bias, so every path carries a gradient
        model.decoder.bias.uniform_(-0.5, 0.5)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ref = from_torch_state_dict(sd, kind, embedding_prefix="encoder.", output_prefix="decoder.",
                                nonlinearity=extras.get("nonlinearity", "tanh"))
    if extras.get("gru_variant") == "classic":
        ref = RecurrentLM(ref.weights, "gru", reset_after=False)
    return model, ref


def torch_names(kind, k):
    """numpy engine names of layer k -> (torch parameter name, row slice) for each gate."""
    gates = {"rnn": ("",), "gru": ("r", "z", "n"), "lstm": ("i", "f", "g", "o")}[kind]
    pairs = []
    for j, g in enumerate(gates):
        s = f"_{g}" if g else ""
        for ours, theirs in (("W", "weight_ih"), ("U", "weight_hh"), ("bx", "bias_ih"), ("bh", "bias_hh")):
            pairs.append((f"l{k}.{ours}{s}", f"rnn.{theirs}_l{k}", j))
    return pairs, len(gates)


def torch_gradients(model, ids, targets, h0, c0, window):
    """Loss and gradients with autograd: (truncated) BPTT with state.detach() between windows."""
    model.zero_grad()
    h0 = torch.tensor(h0, requires_grad=True)
    c0 = torch.tensor(c0, requires_grad=True) if c0 is not None else None
    embedded = []

    def keep(module, args, out):
        out.retain_grad()
        embedded.append(out)

    hook = model.encoder.register_forward_hook(keep)
    ids_t, targets_t = torch.tensor(ids), torch.tensor(targets)
    B, T = ids.shape
    window = window or T
    state = State({"h": h0} if c0 is None else {"h": h0, "c": c0}, 0)
    total = 0.0
    for start in range(0, T, window):
        logits, new = model(ids_t[:, start:start + window], state)
        loss = F.cross_entropy(logits.reshape(-1, V), targets_t[:, start:start + window].reshape(-1),
                               reduction="sum") / (B * T)
        loss.backward()
        total += loss.item()
        state = State({k: v.detach() for k, v in new.tensors.items()}, new.length)
    hook.remove()
    dinputs = torch.cat([e.grad for e in embedded], dim=1).numpy()
    return total, dinputs, h0.grad.numpy(), None if c0 is None else c0.grad.numpy()


def close(ours, theirs):
    scale = max(np.abs(theirs).max(), 1e-300)
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize("kind,extras", CASES, ids=lambda c: c if isinstance(c, str) else "-".join(c.values()))
@pytest.mark.parametrize("widths,B,T,window", [((6,), 2, 1, None), ((5, 5), 2, 3, None), ((7, 4), 3, 5, None),
                                               ((4, 8, 3), 1, 7, None), ((7, 4), 2, 7, 3), ((5, 6), 3, 4, 1)])
def test_bptt_matches_autograd(kind, extras, widths, B, T, window):
    model, ref = torch_and_numpy(kind, extras, widths)
    rng = np.random.default_rng(len(widths) * 10 + T)
    ids, targets = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    shape = (B, len(widths), max(widths))
    h0 = rng.standard_normal(shape) * 0.5
    c0 = rng.standard_normal(shape) * 0.5 if kind == "lstm" else None
    for k, H in enumerate(widths):              # the padding beyond each layer's width is zeros
        h0[:, k, H:] = 0
        if c0 is not None:
            c0[:, k, H:] = 0
    state = {"h": h0} if c0 is None else {"h": h0, "c": c0}

    loss, grads, final = bptt(ref, ids, targets, state=state, window=window)
    t_loss, t_dx, t_dh0, t_dc0 = torch_gradients(model, ids, targets, h0, c0, window)

    assert loss == pytest.approx(t_loss, rel=1e-12)
    close(grads.inputs, t_dx)
    close(grads.state["h"], t_dh0)
    if c0 is not None:
        close(grads.state["c"], t_dc0)
    close(grads.weights["embed"], model.encoder.weight.grad.numpy())
    close(grads.weights["out.W"], model.decoder.weight.grad.numpy())
    close(grads.weights["out.b"], model.decoder.bias.grad.numpy())
    for k, H in enumerate(widths):
        pairs, _ = torch_names(kind, k)
        params = dict(model.named_parameters())
        for ours, theirs, j in pairs:
            close(grads.weights[ours], params[theirs].grad.numpy()[j * H:(j + 1) * H])
    assert set(grads.weights) == set(ref.weights)
    # the final state is the model's: windows carry the state's value
    _, want = ref(ids, state)
    close(final["h"], want["h"])


@pytest.mark.parametrize("kind,extras", CASES[:1] + CASES[2:], ids=["rnn", "gru", "gru-classic", "lstm"])
def test_state_gradients_and_hidden_against_autograd(kind, extras):
    """dL/dh_t for every step (``Gradients.hidden``) and a loss reading the final state.

    Autograd runs one step per call, the logits read from the state's top layer, so h_t is a
    tensor every path to L goes through; lower layers: central differences of the engine."""
    widths = (5, 3)
    model, ref = torch_and_numpy(kind, extras, widths, seed=1)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, V, (2, 4))
    dlogits = rng.standard_normal((2, 4, V))
    dstate = {n: rng.standard_normal((2, 2, 5)) for n in (("h", "c") if kind == "lstm" else ("h",))}
    for a in dstate.values():
        a[:, 1, 3:] = 0

    trace = forward_trace(ref, ids)
    g = backward(ref, trace, dlogits, dstate)

    state, hs, logits = model.initial_state(2), [], []
    for t in range(4):
        _, state = model(torch.tensor(ids[:, t:t + 1]), state)
        state.tensors["h"].retain_grad()
        hs.append(state.tensors["h"])
        logits.append(model.decoder(state.tensors["h"][:, -1, :3]))
    loss = (torch.stack(logits, 1) * torch.tensor(dlogits)).sum()
    loss = loss + sum((state.tensors[n] * torch.tensor(a)).sum() for n, a in dstate.items())
    loss.backward()
    for t in range(4):
        close(g.hidden[:, t, 1, :3], hs[t].grad.numpy()[:, 1, :3])
    close(trace.logits, torch.stack(logits, 1).detach().numpy())

    def objective(t, k, j, eps):
        """L with eps added to h_t of layer k, unit j, of batch row 0 (seen by every later use)."""
        st = ref.init_state(2)
        total = 0.0
        for s in range(4):
            x = ref._inputs(ids[:, s])
            new = {n: np.zeros_like(a) for n, a in st.items()}
            for layer, H in enumerate(widths):
                c = st["c"][:, layer, :H] if kind == "lstm" else None
                x, c = ref._cell(layer, x, st["h"][:, layer, :H], c)
                if (s, layer) == (t, k):
                    x = x.copy()
                    x[0, j] += eps
                new["h"][:, layer, :H] = x
                if c is not None:
                    new["c"][:, layer, :H] = c
            st = new
            total += np.sum((x @ ref.weights["out.W"].T + ref.weights["out.b"]) * dlogits[:, s])
        return total + sum(np.sum(st[n] * a) for n, a in dstate.items())

    for t, k, j in ((0, 0, 2), (2, 0, 4), (3, 0, 1), (1, 1, 0)):
        numeric = (objective(t, k, j, 1e-6) - objective(t, k, j, -1e-6)) / 2e-6
        assert g.hidden[0, t, k, j] == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_truncation_cuts_the_gradient_to_the_window():
    """With window k, step t's dL/dh only sees losses up to the end of its window; window = T is full BPTT."""
    ref = RecurrentLM.random("lstm", V, [6, 4], 2, embed_dim=E, seed=0)
    rng = np.random.default_rng(0)
    ids, targets = rng.integers(0, V, (2, 6)), rng.integers(0, V, (2, 6))
    loss_full, full, _ = bptt(ref, ids, targets)
    loss_same, same, _ = bptt(ref, ids, targets, window=6)
    loss_cut, cut, _ = bptt(ref, ids, targets, window=2)
    assert loss_full == loss_same == pytest.approx(loss_cut, rel=1e-12)     # the forward pass is the same
    for name in full.weights:
        np.testing.assert_array_equal(full.weights[name], same.weights[name])
    # the last window's gradients agree with full BPTT; earlier ones lack what later steps send back
    np.testing.assert_allclose(cut.hidden[:, 4:], full.hidden[:, 4:], rtol=1e-12)
    assert not np.allclose(cut.hidden[:, :4], full.hidden[:, :4])
    # dL/d(initial state) of a window-2 run = that of the first two steps alone (loss scaled by B*T)
    trace = forward_trace(ref, ids[:, :2])
    _, d = cross_entropy(trace.logits, targets[:, :2], n_tokens=12)
    np.testing.assert_allclose(cut.state["h"], backward(ref, trace, d).state["h"], rtol=1e-12)


def test_dense_inputs_and_one_hot_models():
    """A model without an embedding (ids as one-hot) gives dL/dx of the one-hot inputs; a dense
    input gives the same gradients as the ids it encodes."""
    ref = RecurrentLM.random("gru", V, [4, 3], 2, seed=2)
    rng = np.random.default_rng(1)
    ids, targets = rng.integers(0, V, (2, 3)), rng.integers(0, V, (2, 3))
    _, by_ids, _ = bptt(ref, ids, targets)
    _, by_dense, _ = bptt(ref, np.eye(V)[ids], targets)
    np.testing.assert_allclose(by_ids.inputs, by_dense.inputs, rtol=1e-12)
    # finite differences on one input coordinate
    x = np.eye(V)[ids].astype(float)
    eps = 1e-6
    xp, xm = x.copy(), x.copy()
    xp[1, 2, 5] += eps
    xm[1, 2, 5] -= eps
    numeric = (bptt(ref, xp, targets)[0] - bptt(ref, xm, targets)[0]) / (2 * eps)
    assert by_dense.inputs[1, 2, 5] == pytest.approx(numeric, rel=1e-6)


def test_hidden_gradient_norms_vanish_for_a_small_tanh_rnn():
    """With small recurrent weights, ||dL/dh_t|| falls geometrically going back from the last step."""
    ref = RecurrentLM.random("rnn", V, 8, 1, embed_dim=E, seed=0)
    ref.weights["l0.U"] *= 0.5
    norms = hidden_gradient_norms(ref, np.arange(12) % V, target=3)
    assert norms.shape == (12,)
    assert np.all(np.diff(norms) > 0)                       # growing towards the loss at t = T
    assert norms[0] < 1e-3 * norms[-1]


def test_bad_input_is_named():
    ref = RecurrentLM.random("rnn", V, 4, 1, seed=0)
    with pytest.raises(ValueError, match="window=0"):
        bptt(ref, np.zeros((1, 3), int), np.zeros((1, 3), int), window=0)
    with pytest.raises(ValueError, match=r"targets have shape \(1, 2\)"):
        bptt(ref, np.zeros((1, 3), int), np.zeros((1, 2), int))
    with pytest.raises(ValueError, match=r"expected ids \(B, T\)"):
        bptt(ref, np.zeros(3, int), np.zeros(3, int))
    trace = forward_trace(ref, np.zeros((1, 3), int))
    with pytest.raises(ValueError, match="dlogits has shape"):
        backward(ref, trace, np.zeros((1, 2, V)))


@pytest.mark.parametrize("kind,kwargs", [("lstm", {"recurrent_activation": "hard_sigmoid"}),
                                         ("gru", {"reset_after": False, "recurrent_activation": "hard_sigmoid"}),
                                         ("gru", {"activation": "relu"}),
                                         ("rnn", {"activation": "linear"})])
def test_other_activations_against_finite_differences(kind, kwargs):
    """Keras-style activations (hard_sigmoid gates, linear / relu candidates) differentiate too."""
    w = RecurrentLM.random(kind, V, [4, 3], 2, embed_dim=E, seed=5).weights
    ref = RecurrentLM(w, kind, **kwargs)
    rng = np.random.default_rng(2)
    ids, targets = rng.integers(0, V, (2, 4)), rng.integers(0, V, (2, 4))
    _, grads, _ = bptt(ref, ids, targets)
    names = {"rnn": ("l0.U", "l1.W"), "gru": ("l0.U_n", "l1.W_z"), "lstm": ("l0.U_o", "l1.W_f")}[kind]
    for name in names:
        for index in [(0, 0), (2, 1)]:
            original = w[name][index]
            values = []
            for eps in (1e-6, -1e-6):
                ref.weights[name][index] = original + eps
                values.append(bptt(ref, ids, targets)[0])
            ref.weights[name][index] = original
            assert grads.weights[name][index] == pytest.approx((values[0] - values[1]) / 2e-6, rel=1e-5, abs=1e-10)
