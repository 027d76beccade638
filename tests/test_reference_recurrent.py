"""The numpy recurrent engines against torch nn.RNN/GRU/LSTM, Keras .h5 files, scoring and sampling."""

from __future__ import annotations

import copy
import json

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from lmlab.reference import RecurrentLM, from_torch_state_dict, perplexity, sample, sequence_nll, token_nlls
from lmlab.reference.keras import load_keras_h5, read_keras_h5
from lmlab.reference.ops import log_softmax, softmax

V, E, H, L = 11, 5, 7, 2
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


class TorchLM(nn.Module):
    """Embedding (or one-hot) -> nn.RNN/GRU/LSTM -> Linear, batch first."""

    def __init__(self, kind, *, embed=True, nonlinearity="tanh", dtype=torch.float32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        cls = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[kind]
        kw = {"nonlinearity": nonlinearity} if kind == "rnn" else {}
        self.embedding = nn.Embedding(V, E, dtype=dtype) if embed else None
        self.rnn = cls(E if embed else V, H, num_layers=L, batch_first=True, dtype=dtype, **kw)
        self.fc = nn.Linear(H, V, dtype=dtype)
        self.dtype = dtype

    def forward(self, ids=None, x=None):
        if x is None:
            x = self.embedding(ids) if self.embedding is not None else nn.functional.one_hot(ids, V).to(self.dtype)
        out, state = self.rnn(x)
        return self.fc(out), state

    def numpy_state_dict(self):
        return {k: v.detach().numpy().copy() for k, v in self.state_dict().items()}


def ids_batch(B=3, T=6, seed=0):
    return np.random.default_rng(seed).integers(0, V, size=(B, T))


def torch_h(state):
    """torch's final state (L, B, H) -> ours (B, L, H)."""
    h = state[0] if isinstance(state, tuple) else state
    return h.detach().numpy().transpose(1, 0, 2)


# ---------------------------------------------------------------- against torch modules

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind,nonlinearity", [("rnn", "tanh"), ("rnn", "relu"), ("gru", "tanh"), ("lstm", "tanh")])
def test_matches_torch_modules(kind, nonlinearity, dtype):
    tm = TorchLM(kind, nonlinearity=nonlinearity, dtype=TORCH_DTYPE[dtype])
    model = from_torch_state_dict(tm.numpy_state_dict(), kind, nonlinearity=nonlinearity)
    assert model.dtype == dtype and model.n_layers == L and model.hidden_size == H
    ids = ids_batch()
    t_logits, t_state = tm(torch.tensor(ids))
    logits, state = model(ids)
    assert logits.shape == (3, 6, V) and logits.dtype == dtype
    np.testing.assert_allclose(logits, t_logits.detach().numpy(), **TOL[dtype])
    np.testing.assert_allclose(state["h"], torch_h(t_state), **TOL[dtype])
    if kind == "lstm":
        np.testing.assert_allclose(state["c"], t_state[1].detach().numpy().transpose(1, 0, 2), **TOL[dtype])


@pytest.mark.parametrize("hidden", [H, (H, 4)])
@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_step_by_step_equals_whole_sequence(kind, hidden):
    model = RecurrentLM.random(kind, V, hidden, L, embed_dim=E, seed=1)
    ids = ids_batch(B=2, T=7, seed=2)
    whole, final = model(ids)

    state, steps = None, []
    for t in range(ids.shape[1]):
        logits, state = model.step(ids[:, t], state)
        steps.append(logits)
    np.testing.assert_allclose(np.stack(steps, axis=1), whole, rtol=1e-12, atol=1e-14)
    for k in final:
        np.testing.assert_allclose(state[k], final[k], rtol=1e-12, atol=1e-14)

    # a sequence cut in two, the state carried over
    first, s = model(ids[:, :3])
    second, s = model(ids[:, 3:], s)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, rtol=1e-12, atol=1e-14)

    # one sequence without a batch axis: ids (T,) -> (T, V); a scalar id -> (V,)
    single, s1 = model(ids[1])
    np.testing.assert_allclose(single, whole[1], rtol=1e-12, atol=1e-14)
    assert s1["h"].shape == (L, H)
    logits, s = model.step(int(ids[1, 0]))
    np.testing.assert_allclose(logits, whole[1, 0], rtol=1e-12, atol=1e-14)
    logits, s = model.step(ids[1, 1], s)
    np.testing.assert_allclose(logits, whole[1, 1], rtol=1e-12, atol=1e-14)

    # re-indexing a batched state (beam search)
    picked = RecurrentLM.select(final, np.array([1, 1, 0]))
    assert picked["h"].shape == (3, L, H)
    np.testing.assert_array_equal(picked["h"][2], final["h"][0])


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_one_hot_and_dense_inputs(kind):
    tm = TorchLM(kind, embed=False, dtype=torch.float64)
    model = from_torch_state_dict(tm.numpy_state_dict(), kind, embedding_prefix=None)
    assert model.input_size == V and model.embed_vocab is None
    ids = ids_batch()
    t_logits, _ = tm(torch.tensor(ids))
    np.testing.assert_allclose(model(ids)[0], t_logits.detach().numpy(), **TOL[np.float64])

    x = np.random.default_rng(3).standard_normal((2, 4, V))
    t_logits, _ = tm(x=torch.tensor(x))
    np.testing.assert_allclose(model(x)[0], t_logits.detach().numpy(), **TOL[np.float64])
    np.testing.assert_allclose(model.step(x[:, 0])[0], t_logits[:, 0].detach().numpy(), **TOL[np.float64])


def test_torch_state_dict_with_custom_prefixes_and_no_bias():
    torch.manual_seed(0)
    rnn = nn.GRU(E, H, num_layers=L, bias=False, batch_first=True, dtype=torch.float64)
    emb, out = nn.Embedding(V, E, dtype=torch.float64), nn.Linear(H, V, bias=False, dtype=torch.float64)
    sd = {f"encoder.gru.{k}": v for k, v in rnn.state_dict().items()}       # tensors are accepted too
    sd["tok.weight"], sd["head.weight"] = emb.weight, out.weight
    model = from_torch_state_dict(sd, "gru", rnn_prefix="encoder.gru.", embedding_prefix="tok.", output_prefix="head.")
    ids = ids_batch()
    ref = out(rnn(emb(torch.tensor(ids)))[0]).detach().numpy()
    np.testing.assert_allclose(model(ids)[0], ref, **TOL[np.float64])


# ---------------------------------------------------------------- classic GRU (reset before)

def torch_classic_gru(x, layers, fc_w, fc_b):
    """Keras's GRU(reset_after=False) written out in torch, fused (in, 3H) kernels with gates z, r, h:
    z = sig(x K_z + h R_z + b_z), r = sig(...), hh = tanh(x K_h + (r h) R_h + b_h), h = z h + (1 - z) hh."""
    B, T, _ = x.shape
    for K, R, b in layers:
        Hn = R.shape[0]
        h = torch.zeros(B, Hn, dtype=x.dtype)
        outs = []
        for t in range(T):
            xz, xr, xh = (x[:, t] @ K + b).split(Hn, dim=-1)
            hz, hr = (h @ R[:, :2 * Hn]).split(Hn, dim=-1)
            z, r = torch.sigmoid(xz + hz), torch.sigmoid(xr + hr)
            hh = torch.tanh(xh + (r * h) @ R[:, 2 * Hn:])
            h = z * h + (1 - z) * hh
            outs.append(h)
        x = torch.stack(outs, dim=1)
    return x @ fc_w + fc_b


# ---------------------------------------------------------------- Keras .h5

def keras_layers(kind, *, reset_after=True, seed=0, embed=True, widths=(H,) * L):
    """(name, class_name, config, {array name: array}) per layer, Keras 2 shapes; ``widths``: units per layer."""
    rng = np.random.default_rng(seed)
    G = {"rnn": 1, "gru": 3, "lstm": 4}[kind]
    cls = {"rnn": "SimpleRNN", "gru": "GRU", "lstm": "LSTM"}[kind]
    layers = []
    if embed:
        layers.append(("embedding", "Embedding", {"input_dim": V, "output_dim": E},
                       {"embeddings": rng.standard_normal((V, E))}))
    n_in = E if embed else V
    for k, H in enumerate(widths):
        name = cls.lower() if k == 0 else f"{cls.lower()}_{k}"
        bias_shape = (2, G * H) if kind == "gru" and reset_after else (G * H,)
        cfg = {"units": H, "activation": "tanh", "return_sequences": True}
        if kind != "rnn":
            cfg["recurrent_activation"] = "sigmoid"
        if kind == "gru":
            cfg["reset_after"] = reset_after
        layers.append((name, cls, cfg, {"kernel": rng.uniform(-0.5, 0.5, (n_in, G * H)),
                                        "recurrent_kernel": rng.uniform(-0.5, 0.5, (H, G * H)),
                                        "bias": rng.uniform(-0.5, 0.5, bias_shape)}))
        n_in = H
    layers.append(("dense", "Dense", {"units": V, "activation": "softmax"},
                   {"kernel": rng.standard_normal((H, V)), "bias": rng.standard_normal(V)}))
    return layers


def write_keras_h5(path, layers, *, with_config=True, cell_level=False, dtype=np.float32):
    """A file laid out like Keras 2's model.save(): model_weights/<layer>/<layer>/kernel:0 ..."""
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.4.0"
        f.attrs["backend"] = b"tensorflow"
        if with_config:
            conf = [{"class_name": "InputLayer", "config": {"name": "input_1"}}]
            conf += [{"class_name": c, "config": {"name": n, **cfg}} for n, c, cfg, _ in layers]
            f.attrs["model_config"] = json.dumps({"class_name": "Sequential",
                                                  "config": {"name": "sequential", "layers": conf}}).encode()
        mw = f.create_group("model_weights")
        names = (["input_1"] if with_config else []) + [n for n, *_ in layers]
        mw.attrs["layer_names"] = np.array([n.encode() for n in names])
        if with_config:
            mw.create_group("input_1").attrs["weight_names"] = np.array([], dtype="S1")
        for name, cls, _, arrays in layers:
            g = mw.create_group(name)
            inner = f"{name}/{cls.lower()}_cell" if cell_level and "kernel" in arrays and "recurrent_kernel" in arrays else name
            wn = [f"{inner}/{a}:0" for a in arrays]
            g.attrs["weight_names"] = np.array([w.encode() for w in wn])
            for w, a in zip(wn, arrays.values()):
                g.create_dataset(w, data=a.astype(dtype))


class TorchChain(nn.Module):
    """Embedding -> one-layer nn.RNN/GRU/LSTM modules of any widths, chained -> Linear (batch first)."""

    def __init__(self, kind, embed, widths, vocab, dtype=torch.float64):
        super().__init__()
        cls = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[kind]
        self.embedding = nn.Embedding(*embed, dtype=dtype)
        sizes = [embed[1], *widths]
        self.layers = nn.ModuleList(cls(a, b, batch_first=True, dtype=dtype) for a, b in zip(sizes, sizes[1:]))
        self.fc = nn.Linear(widths[-1], vocab, dtype=dtype)

    def forward(self, ids):
        x, finals = self.embedding(ids), []
        for layer in self.layers:
            x, state = layer(x)
            finals.append(state)
        return self.fc(x), finals


def torch_from_keras(kind, layers):
    """A TorchChain holding the Keras weights, gates reordered to torch's (GRU z,r,h -> r,z,n)."""
    arrays = [a for _, _, _, a in layers]
    emb, rec, dense = arrays[0], arrays[1:-1], arrays[-1]
    widths = [a["recurrent_kernel"].shape[0] for a in rec]
    tm = TorchChain(kind, emb["embeddings"].shape, widths, dense["kernel"].shape[1])

    def reorder(a):  # along the last axis, blocks of H
        if kind != "gru":
            return a
        z, r, h = np.split(a, 3, axis=-1)
        return np.concatenate([r, z, h], axis=-1)

    sd = {"embedding.weight": emb["embeddings"], "fc.weight": dense["kernel"].T, "fc.bias": dense["bias"]}
    for k, a in enumerate(rec):
        sd[f"layers.{k}.weight_ih_l0"] = reorder(a["kernel"]).T
        sd[f"layers.{k}.weight_hh_l0"] = reorder(a["recurrent_kernel"]).T
        b = reorder(a["bias"])
        sd[f"layers.{k}.bias_ih_l0"] = b[0] if b.ndim == 2 else b
        sd[f"layers.{k}.bias_hh_l0"] = b[1] if b.ndim == 2 else np.zeros_like(b)
    tm.load_state_dict({k: torch.tensor(np.ascontiguousarray(v)) for k, v in sd.items()})
    return tm


@pytest.mark.parametrize("with_config,cell_level", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_keras_h5_matches_torch(tmp_path, kind, with_config, cell_level):
    layers = keras_layers(kind)
    path = tmp_path / "model.h5"
    write_keras_h5(path, layers, with_config=with_config, cell_level=cell_level, dtype=np.float64)
    model = load_keras_h5(path)
    assert (model.kind, model.n_layers, model.hidden_size, model.vocab_size) == (kind, L, H, V)
    ids = ids_batch()
    ref, _ = torch_from_keras(kind, layers)(torch.tensor(ids))
    np.testing.assert_allclose(model(ids)[0], ref.detach().numpy(), **TOL[np.float64])


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_keras_h5_with_a_width_per_layer(tmp_path, kind):
    """A Keras model of 128 then 64 units loads (it was refused: 'l1.W' has shape (64, 128); expected
    (128, 128)) and gives torch's outputs; the state holds each layer's vector, zero-padded."""
    layers = keras_layers(kind, widths=(128, 64), seed=1)
    for _, _, _, arrays in layers[1:-1]:          # keep the 128-wide recurrences out of saturation
        for name in ("kernel", "recurrent_kernel"):
            arrays[name] = arrays[name] / 8
    write_keras_h5(tmp_path / "m.h5", layers, dtype=np.float64)
    model = load_keras_h5(tmp_path / "m.h5")
    assert model.hidden_sizes == (128, 64) and model.hidden_size == 128 and model.weights["l1.U" + (
        "" if kind == "rnn" else "_" + ("r" if kind == "gru" else "i"))].shape == (64, 64)
    ids = ids_batch()
    ref, finals = torch_from_keras(kind, layers)(torch.tensor(ids))
    logits, state = model(ids)
    np.testing.assert_allclose(logits, ref.detach().numpy(), **TOL[np.float64])
    top = finals[1][0] if kind == "lstm" else finals[1]
    np.testing.assert_allclose(state["h"][:, 1, :64], top[0].detach().numpy(), **TOL[np.float64])
    assert state["h"].shape == (3, 2, 128) and np.all(state["h"][:, 1, 64:] == 0)


def test_keras_float32_file_matches_torch_float32(tmp_path):
    layers = keras_layers("gru")
    write_keras_h5(tmp_path / "m.h5", layers)                      # float32 datasets, as Keras saves
    model = load_keras_h5(tmp_path / "m.h5")
    assert model.dtype == np.float32
    tm = torch_from_keras("gru", [(n, c, cfg, {k: v.astype(np.float32) for k, v in a.items()})
                                  for n, c, cfg, a in layers]).float()
    ids = ids_batch()
    np.testing.assert_allclose(model(ids)[0], tm(torch.tensor(ids))[0].detach().numpy(), **TOL[np.float32])


@pytest.mark.parametrize("widths", [(H, H), (9, 4)])
@pytest.mark.parametrize("with_config", [True, False])
def test_keras_classic_gru_matches_handwritten_torch(tmp_path, with_config, widths):
    layers = keras_layers("gru", reset_after=False, seed=4, widths=widths)
    write_keras_h5(tmp_path / "m.h5", layers, with_config=with_config, dtype=np.float64)
    weights, info = read_keras_h5(tmp_path / "m.h5")
    assert info["kind"] == "gru" and info["reset_after"] is False
    model = RecurrentLM(weights, "gru", reset_after=False)

    ids = ids_batch()
    t = lambda a: torch.tensor(a)  # noqa: E731
    emb, rec, dense = layers[0][3], [a for *_, a in layers[1:-1]], layers[-1][3]
    x = t(emb["embeddings"])[t(ids)]
    ref = torch_classic_gru(x, [(t(a["kernel"]), t(a["recurrent_kernel"]), t(a["bias"])) for a in rec],
                            t(dense["kernel"]), t(dense["bias"]))
    np.testing.assert_allclose(model(ids)[0], ref.numpy(), **TOL[np.float64])
    # the reset-after engine on the same weights is a different function
    assert not np.allclose(RecurrentLM(weights, "gru", reset_after=True)(ids)[0], ref.numpy())


def test_keras_without_embedding_takes_one_hot_ids(tmp_path):
    layers = keras_layers("lstm", embed=False)
    write_keras_h5(tmp_path / "m.h5", layers, dtype=np.float64)
    model = load_keras_h5(tmp_path / "m.h5")
    assert model.embed_vocab is None and model.input_size == V
    ids = ids_batch()
    onehot = np.eye(V)[ids]
    np.testing.assert_allclose(model(ids)[0], model(onehot)[0], rtol=1e-12, atol=1e-14)


def test_keras_errors_name_the_array(tmp_path):
    layers = keras_layers("gru")
    layers[2][3]["recurrent_kernel"] = np.zeros((H, 3 * H + 1))
    write_keras_h5(tmp_path / "bad.h5", layers)
    with pytest.raises(ValueError, match=r"array '/model_weights/gru_1/gru_1/recurrent_kernel:0' has shape "
                                         r"\(7, 22\); expected \(7, 21\)"):
        load_keras_h5(tmp_path / "bad.h5")

    layers = keras_layers("lstm")
    layers[1][3]["bias"] = np.zeros((2, 4 * H))
    write_keras_h5(tmp_path / "bad2.h5", layers)
    with pytest.raises(ValueError, match=r"lstm/bias:0' has shape \(2, 28\); expected \(28,\)"):
        load_keras_h5(tmp_path / "bad2.h5")

    layers = keras_layers("rnn")
    del layers[1][3]["recurrent_kernel"]
    write_keras_h5(tmp_path / "bad3.h5", layers)
    with pytest.raises(ValueError, match=r"layer 'simplernn' \(SimpleRNN\) has no 'recurrent_kernel:0' array"):
        load_keras_h5(tmp_path / "bad3.h5")

    layers = keras_layers("gru")[:-1]
    write_keras_h5(tmp_path / "bad4.h5", layers)
    with pytest.raises(ValueError, match=r"no Dense output layer"):
        load_keras_h5(tmp_path / "bad4.h5")


# ---------------------------------------------------------------- weight-layout errors

def test_engine_errors_name_array_shape_and_expected():
    w = RecurrentLM.random("lstm", V, H, L, embed_dim=E, seed=0).weights
    bad = dict(w, **{"l1.U_f": np.zeros((H, H + 1))})
    with pytest.raises(ValueError, match=r"array 'l1.U_f' has shape \(7, 8\); expected \(7, 7\)"):
        RecurrentLM(bad, "lstm")
    bad = {k: v for k, v in w.items() if k != "l1.bh_o"}
    with pytest.raises(ValueError, match=r"missing array 'l1.bh_o'; expected shape \(7,\)"):
        RecurrentLM(bad, "lstm")
    bad = dict(w, **{"embed": np.zeros((V, E + 1))})
    with pytest.raises(ValueError, match=r"array 'l0.W_i' has shape \(7, 5\); expected \(7, 6\)"):
        RecurrentLM(bad, "lstm")
    with pytest.raises(ValueError, match=r"unexpected arrays \['l0.W_x'\]"):
        RecurrentLM(dict(w, **{"l0.W_x": np.zeros(1)}), "lstm")
    with pytest.raises(ValueError, match=r"missing array 'l0.U_r'"):
        RecurrentLM(w, "gru")
    with pytest.raises(ValueError, match=r"unknown recurrent kind 'transformer'"):
        RecurrentLM(w, "transformer")

    model = RecurrentLM(w, "lstm")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 11\); got min 0, max 11"):
        model(np.array([[0, 11]]))
    with pytest.raises(ValueError, match=r"dense inputs have shape \(2, 3\); expected \(\.\.\., 5\)"):
        model(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"step input has shape \(1, 2\); expected ids \(B,\) or a scalar"):
        model.step(np.array([[1, 2]]))
    with pytest.raises(ValueError, match=r"state\['h'\] has shape \(2, 7\); expected \(1, 2, 7\)"):
        model(np.array([[1, 2]]), {"h": np.zeros((2, 7)), "c": np.zeros((2, 7))})


def test_torch_state_dict_errors_name_array_shape_and_expected():
    sd = TorchLM("gru").numpy_state_dict()
    bad = dict(sd, **{"rnn.weight_ih_l1": np.zeros((21, 6))})
    with pytest.raises(ValueError, match=r"array 'rnn.weight_ih_l1' has shape \(21, 6\); expected \(21, 7\)"):
        from_torch_state_dict(bad, "gru")
    with pytest.raises(ValueError, match=r"array 'rnn.weight_hh_l0' has shape \(21, 7\); expected \(28, 7\)"):
        from_torch_state_dict(sd, "lstm")
    with pytest.raises(ValueError, match=r"array 'rnn.bias_hh_l0' has shape \(20,\); expected \(21,\)"):
        from_torch_state_dict(dict(sd, **{"rnn.bias_hh_l0": np.zeros(20)}), "gru")
    with pytest.raises(ValueError, match=r"missing array 'fc.weight' \(expected shape \(\*, 7\)\)"):
        from_torch_state_dict({k: v for k, v in sd.items() if k != "fc.weight"}, "gru")
    with pytest.raises(ValueError, match=r"array 'embedding.weight' has shape \(11, 4\); expected \(\*, 5\)"):
        from_torch_state_dict(dict(sd, **{"embedding.weight": np.zeros((V, 4))}), "gru")
    with pytest.raises(ValueError, match=r"missing array 'gru.weight_hh_l0'"):
        from_torch_state_dict(sd, "gru", rnn_prefix="gru.")
    with pytest.raises(ValueError, match=r"bidirectional"):
        from_torch_state_dict(dict(sd, **{"rnn.weight_ih_l0_reverse": np.zeros(1)}), "gru")


# ---------------------------------------------------------------- a width per layer: lmlab's torch models

WIDTHS = {
    "rnn": ("rnn", dict(n_hidden=[12, 7])),
    "rnn-relu": ("rnn", dict(n_hidden=[7, 12], nonlinearity="relu")),
    "gru": ("gru", dict(n_hidden=[12, 7])),
    "gru-classic": ("gru", dict(n_hidden=[7, 12], gru_variant="classic")),
    "lstm-3": ("lstm", dict(n_hidden=[12, 5, 9], n_layer=3)),
}


@pytest.mark.parametrize("name", sorted(WIDTHS))
def test_per_layer_widths_torch_equals_numpy(name, tmp_path):
    """lmlab's torch model with a width per layer == the numpy engine: 1e-5 in float32 through a saved
    checkpoint, 1e-10 in float64 from the state dict; logits, states and a continuation."""
    from lmlab.models import build_model, save_model
    from lmlab.reference import load_lmlab_checkpoint
    from lmlab.reference.checkpoint import recurrent_from_lmlab

    family, extra = WIDTHS[name]
    config = {"vocab_size": V, "n_embd": E, "n_layer": 2, **extra}
    torch.manual_seed(0)
    model = build_model(family, config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ids, more = ids_batch(B=3, T=7, seed=5), ids_batch(B=3, T=3, seed=6)
    save_model(model, tmp_path)
    runs = [(load_lmlab_checkpoint(tmp_path), model, np.float32)]
    double = copy.deepcopy(model).double()
    sd = {k: v.detach().numpy() for k, v in double.state_dict().items()}
    runs.append((recurrent_from_lmlab(family, {**config, "cell": family}, sd), double, np.float64))
    for engine, torch_model, dtype in runs:
        assert engine.dtype == dtype and engine.hidden_sizes == tuple(torch_model.config.hidden_sizes)
        with torch.no_grad():
            want, state = torch_model(torch.tensor(ids))
            want2, _ = torch_model(torch.tensor(more), state)
        logits, h = engine(ids)
        np.testing.assert_allclose(logits, want.numpy(), **TOL[dtype])
        for key, value in state.tensors.items():
            np.testing.assert_allclose(h[key], value.numpy(), **TOL[dtype])
        np.testing.assert_allclose(engine(more, h)[0], want2.numpy(), **TOL[dtype])


def test_per_layer_width_errors():
    w = RecurrentLM.random("gru", V, (H, 4), L, embed_dim=E, seed=0).weights
    with pytest.raises(ValueError, match=r"array 'l1.W_z' has shape \(4, 6\); expected \(4, 7\)"):
        RecurrentLM(dict(w, **{"l1.W_z": np.zeros((4, 6))}), "gru")
    with pytest.raises(ValueError, match=r"array 'out.W' has shape \(11, 7\); expected \(11, 4\)"):
        RecurrentLM(dict(w, **{"out.W": np.zeros((V, H))}), "gru")
    with pytest.raises(ValueError, match=r"hidden sizes \[7, 4\] give 2 layer widths for n_layers=3"):
        RecurrentLM.random("gru", V, (H, 4), 3)


# ---------------------------------------------------------------- scoring and sampling

def test_sequence_nll_matches_torch_cross_entropy():
    tm = TorchLM("lstm", dtype=torch.float64)
    model = from_torch_state_dict(tm.numpy_state_dict(), "lstm")
    prompt, ids = [0, 3], [5, 1, 9, 9, 2]
    logits, _ = tm(torch.tensor([prompt + ids]))
    # the distribution for ids[t] is the output after prompt + ids[:t], i.e. position len(prompt) - 1 + t
    ref = nn.functional.cross_entropy(logits[0, len(prompt) - 1:-1], torch.tensor(ids), reduction="none")
    np.testing.assert_allclose(token_nlls(model.step, ids, prompt), ref.detach().numpy(), rtol=1e-10)
    nll = sequence_nll(model.step, ids, prompt)
    assert nll == pytest.approx(ref.sum().item(), rel=1e-10)
    assert perplexity(model.step, ids, prompt) == pytest.approx(np.exp(nll / len(ids)), rel=1e-12)


def test_sequence_nll_reads_the_distribution_before_the_token():
    """A bigram table: p(y_t) = softmax(table[y_{t-1}])[y_t], and the token itself never leaks in."""
    table = np.random.default_rng(0).standard_normal((4, 4))
    fed = []

    def step(token, state):
        fed.append(token)
        return table[token], None

    nll = sequence_nll(step, [2, 3, 1], prompt=[0])
    want = -(log_softmax(table[0])[2] + log_softmax(table[2])[3] + log_softmax(table[3])[1])
    assert nll == pytest.approx(want, rel=1e-12)
    assert fed == [0, 2, 3]            # the last token is scored, never fed
    with pytest.raises(ValueError, match="prompt is empty"):
        sequence_nll(step, [1], prompt=[])
    with pytest.raises(ValueError, match=r"token id 4 at position 1 is outside the vocabulary \[0, 4\)"):
        sequence_nll(step, [1, 4], prompt=[0])


def test_sample_greedy_seeded_and_distribution():
    model = RecurrentLM.random("gru", V, H, L, embed_dim=E, seed=3)
    greedy = sample(model.step, [0], 8, greedy=True)
    ids, state = [0], None
    logits, state = model.step(0, state)
    for _ in range(8):             # greedy chain by hand
        ids.append(int(np.argmax(logits)))
        logits, state = model.step(ids[-1], state)
    np.testing.assert_array_equal(greedy, ids[1:])
    np.testing.assert_array_equal(sample(model.step, [0], 8, temperature=0), greedy)

    a = sample(model.step, [0], 20, temperature=1.5, seed=7)
    np.testing.assert_array_equal(a, sample(model.step, [0], 20, temperature=1.5, seed=np.random.default_rng(7)))
    assert a.dtype == np.int64 and a.shape == (20,) and a.min() >= 0 and a.max() < V
    assert not np.array_equal(a, sample(model.step, [0], 20, temperature=1.5, seed=8))

    stop = int(greedy[2])
    assert list(sample(model.step, [0], 8, greedy=True, stop_id=stop)) == list(greedy[:list(greedy).index(stop) + 1])

    logits = np.array([0.0, 1.0, 2.0])
    draws = sample(lambda t, s: (logits, s), [0], 4000, temperature=2.0, seed=0)
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, softmax(logits / 2.0), atol=0.03)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0; got -1"):
        sample(model.step, [0], 3, temperature=-1)
