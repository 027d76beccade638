"""Weights into the numpy engines: lmlab checkpoints and ``.npz`` files of PyTorch-style names.

- ``load_lmlab_checkpoint(dir)``: a directory written by ``lmlab.models.save_model``
  (``config.json`` + ``model.safetensors``, read by ``read_safetensors`` in numpy) or a run directory
  holding ``best/``. Families "transformer" -> ``TransformerLM``; "rnn", "gru", "lstm" ->
  ``RecurrentLM``. The engine reproduces the PyTorch model's logits (1e-5 in float32).
- ``load_npz(path, n_heads=...)`` / ``from_pytorch_state_dict(sd, n_heads=...)``: a transformer
  from arrays named like a small hand-written PyTorch module, weights (out, in) like ``nn.Linear``::

      word_embedding.weight                    (V, C)       required
      position_embedding.weight                (P, C)       optional: present -> learned positions,
                                                            absent -> sinusoidal (``sinusoidal_layout``)
      layers.{i}.attention.wq.weight           (C, C)       and .bias (C,) optional
      layers.{i}.attention.wk.weight           (H_kv D, C)  wv likewise; wo (C, C)
      layers.{i}.norm1.weight / .bias          (C,)         optional (no norm1/norm2 -> no norms)
      layers.{i}.feed_forward.0.weight         (F, C)       nn.Sequential(Linear, act, Linear)
      layers.{i}.feed_forward.2.weight         (C, F)       and .bias optional
      layers.{i}.norm2.weight / .bias          (C,)
      norm.weight / norm.bias                  (C,)         optional final norm before fc_out
      fc_out.weight                            (V, C)       required; fc_out.bias (V,) optional

  n_layers comes from the keys, C from the embedding, F from feed_forward.0, H_kv from wk;
  ``n_heads`` must be given. Buffers derived from the hyper-parameters may sit beside the
  weights (``position_embedding.inv_freq``: rotary positions; ``position_embedding.pe``: a
  sinusoidal table; ``layers.{i}.attention.{mask,causal_mask,bias,masked_bias}``: causal
  masks); each must equal what the engine computes (``check_derived_buffers``). Missing or
  mis-shaped arrays raise a ValueError naming the array, its shape and the expected shape;
  unknown arrays are refused. Files are read with ``allow_pickle=False``.

numpy only -- never torch (the safetensors format is read with numpy and json).
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

from lmlab.reference.ops import causal_mask, expect_shape, format_shape, to_numpy
from lmlab.reference.recurrent import RecurrentLM, from_torch_state_dict, layer_widths
from lmlab.reference.transformer import (
    ACTIVATIONS,
    NORM_POSITIONS,
    NORMS,
    SINUSOIDAL_LAYOUTS,
    TransformerLM,
    layer_index,
    rotary_inv_freq,
    sinusoidal_table,
)

__all__ = [
    "FAMILIES",
    "check_derived_buffers",
    "from_pytorch_state_dict",
    "load_lmlab_checkpoint",
    "load_npz",
    "read_safetensors",
    "recurrent_from_lmlab",
    "transformer_from_lmlab",
]

FAMILIES = ("transformer", "rnn", "gru", "lstm")

# Defaults of lmlab.models.transformer.TransformerConfig (which imports torch, so they are repeated here).
TRANSFORMER_DEFAULTS = dict(
    vocab_size=None, block_size=256, n_layer=4, n_head=4, n_embd=128, n_kv_head=None, d_ff=None, dropout=0.0, embed_dropout=0.0,
    norm="layernorm", norm_position="pre", norm_eps=1e-5, positions="learned", sinusoidal_layout="interleaved",
    rope_theta=10000.0, activation="gelu", bias=True, lm_head_bias=False, tie_weights=True, causal=True,
    adaptive_cutoffs=None, adaptive_div_value=4.0,
)
# Defaults of lmlab.models.recurrent.RecurrentConfig.
RECURRENT_DEFAULTS = dict(
    vocab_size=None, block_size=64, cell=None, n_embd=64, n_hidden=128, n_layer=1, dropout=0.0, nonlinearity="tanh",
    gru_variant="reset_after", tie_weights=False, embed_dropout=0.0, input_dropout=None, hidden_dropout=None,
    variational_dropout=False, output_size=None, adaptive_cutoffs=None, adaptive_div_value=4.0,
)

_Plan = list[tuple[str, str, tuple, bool]]   # (source name, engine name, shape, required)


def _gather(sd: Mapping[str, np.ndarray], plan: _Plan, where: str) -> dict[str, np.ndarray]:
    """The engine's dict from ``sd`` by ``plan``; every error names the source array."""
    out = {}
    for src, dst, shape, required in plan:
        if src not in sd:
            if required:
                raise ValueError(f"missing array {src!r} (expected shape {format_shape(shape)}) in {where}")
            continue
        out[dst] = expect_shape(f"array {src!r} in {where}", sd[src], shape)
    extra = sorted(set(sd) - {p[0] for p in plan})
    if extra:
        raise ValueError(f"unexpected arrays {extra} in {where}; accepted names: {[p[0] for p in plan]}")
    return out


_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                       "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?", "BF16": "<u2"}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as numpy arrays, read with numpy and json alone.

    The format: an 8-byte little-endian header size N, N bytes of JSON
    ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
    then the raw little-endian data (offsets relative to its start). BF16 becomes float32.
    """
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path} is not a safetensors file: {len(data)} bytes")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError(f"{path} is not a safetensors file: header size {n} exceeds the file ({len(data)} bytes)")
    header = json.loads(data[8:8 + n].decode("utf8"))
    body = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} in {path} has dtype {dtype}; readable: {sorted(_SAFETENSORS_DTYPES)}")
        a = np.frombuffer(body[begin:end], dtype=_SAFETENSORS_DTYPES[dtype])
        if a.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"tensor {name!r} in {path}: {end - begin} bytes do not hold {dtype} of shape {shape}")
        if dtype == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = a.reshape(shape).copy()
    return out


def _resolve(directory: str | os.PathLike) -> str:
    path = os.fspath(directory)
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if os.path.isfile(os.path.join(path, "best", "config.json")):
        return os.path.join(path, "best")
    raise FileNotFoundError(f"no lmlab model at {str(directory)!r}: expected a directory with config.json and "
                            "model.safetensors (a checkpoint such as runs/demo/best, or a run directory holding best/)")


def _config(values: Mapping, defaults: dict, family: str) -> dict:
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(f"{family} config has field(s) {unknown} the numpy engine does not know; "
                         f"known: {sorted(defaults)}")
    if values.get("vocab_size") is None:
        raise ValueError(f"{family} config has no vocab_size; an lmlab config.json always names it")
    return {**defaults, **values}


# ---------------------------------------------------------------- lmlab checkpoints


def _refuse_adaptive(c: Mapping, family: str) -> None:
    if c["adaptive_cutoffs"] is not None:
        raise ValueError(f"the numpy engine runs a full softmax output layer; this {family} config has "
                         f"adaptive_cutoffs={c['adaptive_cutoffs']} (an adaptive softmax)")


def transformer_from_lmlab(config: Mapping, tensors: Mapping[str, np.ndarray], *, dtype=None,
                           where: str = "the state dict") -> TransformerLM:
    """A ``TransformerLM`` from an lmlab transformer config (dict) and its state dict (numpy arrays)."""
    c = _config(config, TRANSFORMER_DEFAULTS, "transformer")
    if not c["causal"]:
        raise ValueError("the numpy engine runs causal (decoder) transformers; this config has causal=False")
    _refuse_adaptive(c, "transformer")
    V, C, L = c["vocab_size"], c["n_embd"], c["n_layer"]
    D = C // c["n_head"]
    kv = (c["n_kv_head"] or c["n_head"]) * D
    F = c["d_ff"] or 4 * C
    bias = bool(c["bias"])
    norm = c["norm"]
    plan: _Plan = [("wte.weight", "embed", (V, C), True)]
    if c["positions"] == "learned":
        plan.append(("wpe.weight", "pos", (c["block_size"], C), True))

    def add_norm(src: str, dst: str) -> None:
        if norm != "none":
            plan.append((src + ".weight", dst + ".w", (C,), True))
            if norm == "layernorm" and bias:
                plan.append((src + ".bias", dst + ".b", (C,), True))

    def add_linear(src: str, w: str, b: str, shape: tuple) -> None:
        plan.append((src + ".weight", w, shape, True))
        if bias:
            plan.append((src + ".bias", b, shape[:1], True))

    for i in range(L):
        s, d = f"blocks.{i}.", f"l{i}."
        add_norm(s + "ln1", d + "norm1")
        for n, rows in (("q", C), ("k", kv), ("v", kv), ("o", C)):
            add_linear(s + "attn." + n, d + "W" + n, d + "b" + n, (rows, C))
        add_norm(s + "ln2", d + "norm2")
        add_linear(s + "mlp.fc", d + "W1", d + "b1", (F, C))
        if c["activation"] == "swiglu":
            add_linear(s + "mlp.gate", d + "Wg", d + "bg", (F, C))
        add_linear(s + "mlp.proj", d + "W2", d + "b2", (C, F))
    if c["norm_position"] == "pre":
        add_norm("ln_f", "norm_f")
    plan.append(("lm_head.weight", "out.W", (V, C), not c["tie_weights"]))
    if c["lm_head_bias"]:
        plan.append(("lm_head.bias", "out.b", (V,), True))
    w = _gather({k: v for k, v in tensors.items()}, plan, where)
    if "out.W" not in w:                      # tied and saved without a copy
        w["out.W"] = w["embed"]
    return TransformerLM(
        w, n_heads=c["n_head"], n_kv_heads=c["n_kv_head"], positions=c["positions"],
        sinusoidal_layout=c["sinusoidal_layout"], rope_theta=c["rope_theta"], norm=norm,
        norm_position=c["norm_position"], norm_eps=c["norm_eps"], activation=c["activation"],
        block_size=c["block_size"], dtype=dtype)


def recurrent_from_lmlab(family: str, config: Mapping, tensors: Mapping[str, np.ndarray], *, dtype=None,
                         where: str = "the state dict") -> RecurrentLM:
    """A ``RecurrentLM`` from an lmlab rnn/gru/lstm config (dict) and its state dict (numpy arrays).

    lmlab's names (``encoder.weight``, ``rnn.weight_ih_l{k}`` ..., ``decoder.weight``, ``decoder.bias``)
    go through ``reference.recurrent.from_torch_state_dict``; the classic GRU runs with reset_after=False.
    """
    c = _config(config, RECURRENT_DEFAULTS, family)
    if c["cell"] not in (None, family):
        raise ValueError(f"the {family!r} family needs cell={family!r}, got cell={c['cell']!r}")
    _refuse_adaptive(c, family)
    if c["output_size"] is not None:
        raise ValueError(f"the numpy engine's {family} reads the top layer directly; this config has "
                         f"output_size={c['output_size']} (a projection before the output layer)")
    extra = sorted(k for k in tensors if not _lmlab_recurrent_name(k))
    if extra:
        raise ValueError(f"unexpected arrays {extra} in {where} for an lmlab {family}")
    model = from_torch_state_dict(tensors, family, rnn_prefix="rnn.", embedding_prefix="encoder.",
                                  output_prefix="decoder.", nonlinearity=c["nonlinearity"], dtype=dtype)
    widths = model.hidden_sizes
    shown = widths[0] if len(set(widths)) == 1 else list(widths)
    for what, got, want, text in (
            ("n_layer", model.n_layers, c["n_layer"], model.n_layers),
            ("n_hidden", widths, layer_widths(c["n_hidden"], c["n_layer"]), shown),   # one width or one per layer
            ("n_embd", model.input_size, c["n_embd"], model.input_size),
            ("vocab_size", model.vocab_size, c["vocab_size"], model.vocab_size)):
        if got != want:
            raise ValueError(f"the weights in {where} have {what}={text}, the config says {what}={c[what]}")
    if family == "gru" and c["gru_variant"] == "classic":
        model = RecurrentLM(model.weights, "gru", reset_after=False, dtype=dtype)
    return model


def _lmlab_recurrent_name(name: str) -> bool:
    """encoder.weight, decoder.weight, decoder.bias, rnn.{weight,bias}_{ih,hh}_l{k}."""
    if name in ("encoder.weight", "decoder.weight", "decoder.bias"):
        return True
    base, _, k = name.removeprefix("rnn.").rpartition("_l")
    return name.startswith("rnn.") and base in ("weight_ih", "weight_hh", "bias_ih", "bias_hh") and k.isdigit()


def load_lmlab_checkpoint(directory: str | os.PathLike, *, dtype=None) -> TransformerLM | RecurrentLM:
    """The numpy engine for an lmlab checkpoint directory (or a run directory holding ``best/``)."""
    directory = _resolve(directory)
    config_path = os.path.join(directory, "config.json")
    with open(config_path, encoding="utf8") as f:
        values = json.load(f)
    family = values.pop("family", None)
    if family not in FAMILIES:
        raise ValueError(f"{config_path} has family={family!r}; the numpy engine runs: {FAMILIES}")
    weights = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no weights at {weights}")
    tensors = read_safetensors(weights)
    if family == "transformer":
        return transformer_from_lmlab(values, tensors, dtype=dtype, where=weights)
    return recurrent_from_lmlab(family, values, tensors, dtype=dtype, where=weights)


# ---------------------------------------------------------------- PyTorch-style names (.npz)


def from_pytorch_state_dict(sd: Mapping[str, np.ndarray], n_heads: int | None = None, *,
                            positions: str | None = None, sinusoidal_layout: str = "interleaved",
                            norm: str | None = None, norm_position: str = "pre", norm_eps: float = 1e-5,
                            activation: str = "relu", embed_scale: float = 1.0, block_size: int | None = None,
                            rope_theta: float = 10000.0, dtype=None, where: str = "the state dict") -> TransformerLM:
    """A ``TransformerLM`` from arrays with the names in this module's docstring.

    Inferred: n_layers (from ``layers.{i}.`` keys), C (``word_embedding.weight``), F
    (``feed_forward.0.weight``), H_kv (``attention.wk.weight``), positions (learned when
    ``position_embedding.weight`` is present, rotary when ``position_embedding.inv_freq`` is,
    else sinusoidal), norm ("layernorm" when
    ``layers.0.norm1.weight`` is present, else "none"; pass norm="rmsnorm" for RMSNorm).
    Given: ``n_heads`` (required), ``sinusoidal_layout``, ``norm_position`` ("pre"/"post"),
    ``activation`` ("relu", "gelu", "gelu_tanh"), ``embed_scale``, ``block_size``, ``rope_theta``.
    Derived buffers (rotary frequencies, a sinusoidal table, causal masks) are accepted after
    ``check_derived_buffers``; any other array is an error.
    """
    if n_heads is None:
        raise ValueError("n_heads is required: the number of attention heads cannot be inferred from the array "
                         "shapes; pass n_heads=... (a divisor of the model width)")
    sd = {k: to_numpy(v) for k, v in sd.items()}
    if "word_embedding.weight" not in sd:
        raise ValueError(f"missing array 'word_embedding.weight' (expected shape (V, C)) in {where}; "
                         f"present: {sorted(sd)}")
    V, C = expect_shape(f"array 'word_embedding.weight' in {where}", sd["word_embedding.weight"], (None, None)).shape
    if not isinstance(n_heads, (int, np.integer)) or n_heads < 1 or C % n_heads:
        raise ValueError(f"n_heads={n_heads!r} must be a positive divisor of the model width C={C}")
    layers = {i for k in sd if (i := layer_index(k, "layers.")) is not None}
    L = 0
    while L in layers:
        L += 1
    if L == 0:
        raise ValueError(f"no 'layers.0.*' arrays in {where}; expected e.g. 'layers.0.attention.wq.weight'")
    if sorted(layers) != list(range(L)):
        raise ValueError(f"layer indices {sorted(layers)} in {where} are not 0..{max(layers)} without gaps")
    for key, want in (("layers.0.feed_forward.0.weight", "(F, C)"), ("layers.0.attention.wk.weight", "(H_kv D, C)")):
        if key not in sd:
            raise ValueError(f"missing array {key!r} (expected shape {want}) in {where}")
        expect_shape(f"array {key!r} in {where}", sd[key], (None, C))
    F = sd["layers.0.feed_forward.0.weight"].shape[0]
    kv = sd["layers.0.attention.wk.weight"].shape[0]
    learned = "position_embedding.weight" in sd
    if positions is None:
        positions = "learned" if learned else "rotary" if ROTARY_BUFFER in sd else "sinusoidal"
    if positions == "learned" and not learned:
        raise ValueError(f"positions='learned' needs array 'position_embedding.weight' (P, {C}) in {where}")
    if positions != "learned" and learned:
        raise ValueError(f"{where} holds 'position_embedding.weight' but positions={positions!r}; "
                         "drop the argument (learned positions are used)")
    if sinusoidal_layout not in SINUSOIDAL_LAYOUTS:
        raise ValueError(f"sinusoidal_layout={sinusoidal_layout!r}; accepted: {SINUSOIDAL_LAYOUTS}")
    if norm is None:
        norm = "layernorm" if "layers.0.norm1.weight" in sd else "none"
    if norm not in NORMS or norm_position not in NORM_POSITIONS:
        raise ValueError(f"norm={norm!r}, norm_position={norm_position!r}; accepted: {NORMS}, {NORM_POSITIONS}")
    if activation not in ACTIVATIONS or activation == "swiglu":
        raise ValueError(f"activation={activation!r}; accepted for feed_forward.{{0,2}} weights: relu, gelu, gelu_tanh")
    for name in check_derived_buffers(sd, where, n_layers=L, d_model=C, head_dim=C // int(n_heads),
                                      positions=positions, sinusoidal_layout=sinusoidal_layout, rope_theta=rope_theta):
        del sd[name]

    plan: _Plan = [("word_embedding.weight", "embed", (V, C), True)]
    if learned:
        P = expect_shape(f"array 'position_embedding.weight' in {where}", sd["position_embedding.weight"],
                         (None, C)).shape[0]
        plan.append(("position_embedding.weight", "pos", (P, C), True))

    def add_norm(src: str, dst: str, required: bool) -> None:
        if norm != "none":
            plan.append((src + ".weight", dst + ".w", (C,), required))
            if norm == "layernorm":
                plan.append((src + ".bias", dst + ".b", (C,), False))

    for i in range(L):
        s, d = f"layers.{i}.", f"l{i}."
        add_norm(s + "norm1", d + "norm1", True)
        for n, rows in (("q", C), ("k", kv), ("v", kv), ("o", C)):
            plan.append((f"{s}attention.w{n}.weight", f"{d}W{n}", (rows, C), True))
            plan.append((f"{s}attention.w{n}.bias", f"{d}b{n}", (rows,), False))
        add_norm(s + "norm2", d + "norm2", True)
        plan += [(s + "feed_forward.0.weight", d + "W1", (F, C), True), (s + "feed_forward.0.bias", d + "b1", (F,), False),
                 (s + "feed_forward.2.weight", d + "W2", (C, F), True), (s + "feed_forward.2.bias", d + "b2", (C,), False)]
    add_norm("norm", "norm_f", False)
    plan += [("fc_out.weight", "out.W", (V, C), True), ("fc_out.bias", "out.b", (V,), False)]
    w = _gather(sd, plan, where)
    return TransformerLM(w, n_heads=int(n_heads), positions=positions, sinusoidal_layout=sinusoidal_layout,
                         rope_theta=rope_theta, norm=norm, norm_position=norm_position, norm_eps=norm_eps,
                         activation=activation, embed_scale=embed_scale, block_size=block_size, dtype=dtype)


ROTARY_BUFFER = "position_embedding.inv_freq"
SINUSOIDAL_BUFFER = "position_embedding.pe"
MASK_BUFFERS = ("mask", "causal_mask", "bias")      # under layers.{i}.attention.; "bias": nanoGPT's, GPT-2's
FILL_BUFFER = "masked_bias"                         # GPT-2's fill value for blocked scores


def _close(a: np.ndarray, want: np.ndarray, atol: float = 0.0) -> bool:
    """a equals ``want`` up to the rounding of a's floating dtype (float32 buffers hold float32 math)."""
    eps = np.finfo(a.dtype).eps if np.issubdtype(a.dtype, np.floating) else np.finfo(np.float64).eps
    return a.shape == want.shape and np.allclose(a, want, rtol=max(100 * eps, 1e-12), atol=atol)


def check_derived_buffers(sd: Mapping[str, np.ndarray], where: str, *, n_layers: int, d_model: int, head_dim: int,
                          positions: str, sinusoidal_layout: str, rope_theta: float) -> list[str]:
    """The names of the derived buffers in ``sd``, each checked against what the engine computes.

    PyTorch modules often save, beside their weights, buffers computed from the
    hyper-parameters; they carry no information, but one that differs from the engine's
    means the file's model computes something else, so it is an error naming the array:

    - ``position_embedding.inv_freq`` (D/2,): the rotary inverse frequencies theta^(-2j/D);
    - ``position_embedding.pe`` (P, C), (1, P, C) or (P, 1, C): a sinusoidal table;
    - ``layers.{i}.attention.{mask,causal_mask,bias}`` (P, P) or (1, 1, P, P): a causal mask,
      lower-triangular ones (1/True = may attend), True above the diagonal (blocked), or
      additive (0, -inf above the diagonal);
    - ``layers.{i}.attention.masked_bias`` (scalar): the score given to blocked keys, accepted
      when it is -inf or so low (<= -1e4) that their weight is exactly 0 in floating point.
    """
    found = []
    if ROTARY_BUFFER in sd:
        a = np.asarray(sd[ROTARY_BUFFER])
        if positions != "rotary":
            raise ValueError(f"{where} holds {ROTARY_BUFFER!r} (rotary inverse frequencies) but positions="
                             f"{positions!r}; drop the argument or pass positions='rotary'")
        want = rotary_inv_freq(head_dim, rope_theta)
        if not _close(a, want):
            hint = ""
            if a.shape == want.shape and a.size > 1 and a[1] > 0:
                theta = float(a[1]) ** (-head_dim / 2)
                if _close(a, rotary_inv_freq(head_dim, theta)):
                    hint = f"; they are those of rope_theta={theta:.6g}: pass rope_theta={theta:.6g}"
            raise ValueError(f"array {ROTARY_BUFFER!r} in {where} (shape {a.shape}) is not theta^(-2j/D) for "
                             f"head_dim D={head_dim}, rope_theta={rope_theta:g} (expected shape {want.shape}){hint}")
        found.append(ROTARY_BUFFER)
    if SINUSOIDAL_BUFFER in sd:
        a = np.asarray(sd[SINUSOIDAL_BUFFER])
        if positions != "sinusoidal":
            raise ValueError(f"{where} holds {SINUSOIDAL_BUFFER!r} (a sinusoidal table) but positions={positions!r}; "
                             "drop the argument or pass positions='sinusoidal'")
        table = _as_table(a, d_model)
        if table is None:
            raise ValueError(f"array {SINUSOIDAL_BUFFER!r} in {where} has shape {a.shape}; expected (P, {d_model}), "
                             f"(1, P, {d_model}) or (P, 1, {d_model})")
        atol = 8 * table.shape[0] * float(np.finfo(table.dtype).eps) if np.issubdtype(table.dtype, np.floating) else 0.0
        if not _close(table, sinusoidal_table(table.shape[0], d_model, sinusoidal_layout), atol):
            other = [lay for lay in SINUSOIDAL_LAYOUTS if lay != sinusoidal_layout
                     and _close(table, sinusoidal_table(table.shape[0], d_model, lay), atol)]
            hint = f"; it is the {other[0]!r} layout: pass sinusoidal_layout={other[0]!r}" if other else ""
            raise ValueError(f"array {SINUSOIDAL_BUFFER!r} in {where} is not the {sinusoidal_layout!r} sinusoidal "
                             f"table of width {d_model}{hint}")
        found.append(SINUSOIDAL_BUFFER)
    for i in range(n_layers):
        for name in (f"layers.{i}.attention.{n}" for n in MASK_BUFFERS):
            if name in sd:
                _check_causal_mask(np.asarray(sd[name]), name, where)
                found.append(name)
        name = f"layers.{i}.attention.{FILL_BUFFER}"
        if name in sd:
            a = np.asarray(sd[name])
            if a.size != 1 or not np.issubdtype(a.dtype, np.floating) or not float(a.reshape(())) <= -1e4:
                raise ValueError(f"array {name!r} in {where} is {a.reshape(-1)[:3].tolist()}; as the score of "
                                 "blocked keys it must be -inf or <= -1e4 (weight exactly 0)")
            found.append(name)
    return found


def _as_table(a: np.ndarray, d_model: int) -> np.ndarray | None:
    """(P, C) from a table stored (P, C), (1, P, C) or (P, 1, C); None for any other shape."""
    if a.ndim == 2 and a.shape[1] == d_model:
        return a
    if a.ndim == 3 and a.shape[2] == d_model and 1 in a.shape[:2]:
        return a.reshape(-1, d_model)
    return None


def _check_causal_mask(a: np.ndarray, name: str, where: str) -> None:
    """A (P, P) or (1, 1, P, P) causal mask in one of three conventions, else a ValueError naming it."""
    m = a.reshape(a.shape[-2:]) if a.ndim >= 2 and all(n == 1 for n in a.shape[:-2]) else None
    if m is None or m.shape[0] != m.shape[1]:
        raise ValueError(f"array {name!r} in {where} has shape {a.shape}; a causal mask is (P, P) or (1, 1, P, P)")
    blocked = causal_mask(m.shape[0])
    if not (np.array_equal(m, ~blocked) or (m.dtype == bool and np.array_equal(m, blocked))
            or (np.issubdtype(m.dtype, np.floating) and np.array_equal(m, np.where(blocked, -np.inf, 0.0)))):
        raise ValueError(f"array {name!r} in {where} is not a causal mask (ones on and below the diagonal, "
                         "True above it, or 0 / -inf above it); the engine attends causally only")


def load_npz(path: str | os.PathLike, n_heads: int | None = None, **kwargs) -> TransformerLM:
    """``from_pytorch_state_dict`` on the arrays of an ``.npz`` file (read with allow_pickle=False)."""
    with np.load(path, allow_pickle=False) as f:
        sd = {k: f[k] for k in f.files}
    return from_pytorch_state_dict(sd, n_heads, where=os.fspath(path), **kwargs)
