"""Read a Keras 2 ``.h5`` model (Embedding? -> SimpleRNN/GRU/LSTM x L -> Dense) into a ``RecurrentLM``.

Keras 2 stores, for a layer named ``gru``:

    model_weights/gru/gru/kernel:0            (in, G H)   x @ kernel, gates side by side
    model_weights/gru/gru/recurrent_kernel:0  (H, G H)
    model_weights/gru/gru/bias:0              (G H,), or (2, 3H) for GRU(reset_after=True):
                                              row 0 input bias, row 1 recurrent bias

(the group's ``weight_names`` attribute lists the datasets; newer versions nest
them one level deeper, e.g. ``gru/gru_cell/kernel:0``; files from ``save_weights``
have the layer groups at the root). Gate order: GRU z, r, h; LSTM i, f, c, o.
Dense: ``kernel:0`` (H, V), ``bias:0`` (V,); Embedding: ``embeddings:0`` (V, E).

Each recurrent layer has its own number of units (e.g. 128 then 64): its kernel is
(previous width, G H). The file's ``model_config`` attribute, when present, gives each layer's class,
activations and ``reset_after``; without it the layer types are inferred from the
array shapes (G = 1, 3, 4 gates) and the activations default to tanh / sigmoid.
"""

from __future__ import annotations

import json
import os
from typing import Any

import h5py
import numpy as np

from lmlab.reference.ops import expect_shape, format_shape
from lmlab.reference.recurrent import RecurrentLM, _sfx

__all__ = ["read_keras_h5", "load_keras_h5"]

_KIND = {"SimpleRNN": "rnn", "GRU": "gru", "LSTM": "lstm"}
# Keras gate order -> ours (GRU: z, r, h -> r, z, n; LSTM: i, f, c, o -> i, f, g, o).
_KERAS_GATES = {"rnn": ("",), "gru": ("z", "r", "n"), "lstm": ("i", "f", "g", "o")}
_IGNORED = {"InputLayer", "Dropout", "SpatialDropout1D", "Activation", "Masking", "Softmax"}


def _str(x) -> str:
    return x.decode("utf8") if isinstance(x, bytes) else str(x)


def _layer_configs(f: h5py.File) -> dict[str, dict]:
    """Layer name -> {"class_name", "config"} from the ``model_config`` attribute ({} if absent)."""
    if "model_config" not in f.attrs:
        return {}
    cfg = json.loads(_str(f.attrs["model_config"]))
    layers = cfg.get("config", {})
    layers = layers.get("layers", []) if isinstance(layers, dict) else layers   # Keras 2.2 Sequential: a list
    return {layer["config"]["name"]: layer for layer in layers if "name" in layer.get("config", {})}


def _layer_arrays(g: h5py.Group) -> dict[str, tuple[str, np.ndarray]]:
    """{"kernel": (dataset path, array), ...} for one layer group."""
    if "weight_names" in g.attrs:
        names = [_str(n) for n in g.attrs["weight_names"]]
    else:
        names = []
        g.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    out = {}
    for name in names:
        base = name.split("/")[-1].split(":")[0]
        out[base] = (f"{g.name}/{name}", np.asarray(g[name]))
    return out


def _infer_class(arrays: dict) -> str:
    if "embeddings" in arrays:
        return "Embedding"
    if "recurrent_kernel" in arrays:
        rk = arrays["recurrent_kernel"][1]
        ratio = rk.shape[1] // max(rk.shape[0], 1) if rk.ndim == 2 else 0
        return {1: "SimpleRNN", 3: "GRU", 4: "LSTM"}.get(ratio, f"<recurrent with {rk.shape}>")
    if "kernel" in arrays:
        return "Dense"
    return "<unknown>"


def read_keras_h5(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(weights in the ``RecurrentLM`` layout, {"kind", "reset_after", "activation",
    "recurrent_activation"}) from a Keras 2 ``.h5`` file."""
    with h5py.File(path, "r") as f:
        configs = _layer_configs(f)
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in root.attrs:
            names = [_str(n) for n in root.attrs["layer_names"]]
        else:
            names = list(root.keys())
        layers = []
        for name in names:
            arrays = _layer_arrays(root[name])
            cfg = configs.get(name, {})
            cls = cfg.get("class_name") or (_infer_class(arrays) if arrays else "InputLayer")
            layers.append((name, cls, cfg.get("config", {}), arrays))

    w: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {"kind": None, "reset_after": True, "activation": "tanh",
                            "recurrent_activation": "sigmoid"}
    k = 0           # recurrent layers read so far
    dense_seen = False
    width = None    # size of the previous layer's output
    for name, cls, cfg, arrays in layers:
        if cls in _IGNORED or (not arrays and cls not in _KIND and cls not in ("Dense", "Embedding")):
            continue
        if dense_seen:
            raise ValueError(f"layer {name!r} ({cls}) follows the Dense output layer; "
                             f"supported: [Embedding] -> recurrent layers -> one Dense")

        def need(base: str, shape: tuple) -> np.ndarray:
            if base not in arrays:
                raise ValueError(f"layer {name!r} ({cls}) has no '{base}:0' array (expected shape "
                                 f"{format_shape(shape)}); found {sorted(arrays)}")
            path, a = arrays[base]
            return expect_shape(f"array {path!r}", a, shape)

        if cls == "Embedding":
            if k or "embed" in w:
                raise ValueError(f"Embedding layer {name!r} must come first")
            w["embed"] = need("embeddings", (None, None))
            width = w["embed"].shape[1]
        elif cls in _KIND:
            kind = _KIND[cls]
            if info["kind"] not in (None, kind):
                raise ValueError(f"layer {name!r} is a {cls} but earlier layers are {info['kind']}; "
                                 f"one kind of recurrent layer per model")
            info["kind"] = kind
            for key in ("activation", "recurrent_activation"):
                if key in cfg and (k == 0 or cfg[key] == info[key]):
                    info[key] = cfg[key]
                elif key in cfg:
                    raise ValueError(f"layer {name!r} has {key}={cfg[key]!r}, unlike the layers below ({info[key]!r})")
            gates = _KERAS_GATES[kind]
            G = len(gates)
            rk = need("recurrent_kernel", (None, None))
            H = rk.shape[0]
            rk = need("recurrent_kernel", (H, G * H))
            kernel = need("kernel", (width, G * H))
            width = H
            reset_after = False
            if kind == "gru":   # Keras 2 default True; without a config, the bias shape tells
                reset_after = bool(cfg.get("reset_after", "bias" not in arrays or arrays["bias"][1].ndim == 2))
                if k and reset_after != info["reset_after"]:
                    raise ValueError(f"layer {name!r} has reset_after={reset_after}, unlike the layers below")
                info["reset_after"] = reset_after
            bias = np.zeros((2, G * H) if reset_after else (G * H,), dtype=kernel.dtype)
            if "bias" in arrays or cfg.get("use_bias", True):
                bias = need("bias", bias.shape)
            bx, bh = (bias[0], bias[1]) if reset_after else (bias, np.zeros_like(bias))
            for j, g in enumerate(gates):
                cols = slice(j * H, (j + 1) * H)
                w[f"l{k}.W{_sfx(g)}"] = kernel[:, cols].T
                w[f"l{k}.U{_sfx(g)}"] = rk[:, cols].T
                w[f"l{k}.bx{_sfx(g)}"] = bx[cols]
                w[f"l{k}.bh{_sfx(g)}"] = bh[cols]
            k += 1
        elif cls == "Dense":
            if not k:
                raise ValueError(f"Dense layer {name!r} comes before any recurrent layer")
            act = cfg.get("activation", "linear")
            if act not in ("linear", "softmax", None):
                raise ValueError(f"Dense layer {name!r} has activation {act!r}; accepted: 'linear' or "
                                 f"'softmax' (the engine returns the logits before it)")
            kernel = need("kernel", (width, None))
            w["out.W"] = kernel.T
            w["out.b"] = need("bias", (kernel.shape[1],)) if "bias" in arrays or cfg.get("use_bias", True) \
                else np.zeros(kernel.shape[1], dtype=kernel.dtype)
            dense_seen = True
        else:
            raise ValueError(f"layer {name!r} of class {cls!r} is not supported; accepted: Embedding, "
                             f"SimpleRNN, GRU, LSTM, Dense (and weightless layers such as Dropout)")
    if info["kind"] is None:
        raise ValueError(f"no SimpleRNN, GRU or LSTM layer in {os.fspath(path)!r}; layers: "
                         f"{[(n, c) for n, c, _, _ in layers]}")
    if not dense_seen:
        raise ValueError(f"no Dense output layer in {os.fspath(path)!r}")
    return w, info


def load_keras_h5(path: str | os.PathLike, dtype=None) -> RecurrentLM:
    """A ``RecurrentLM`` from a Keras 2 ``.h5`` file (see ``read_keras_h5``)."""
    w, info = read_keras_h5(path)
    return RecurrentLM(w, info["kind"], reset_after=info["reset_after"], activation=info["activation"],
                       recurrent_activation=info["recurrent_activation"], dtype=dtype)
