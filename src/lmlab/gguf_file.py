"""Llama-architecture GGUF files as lmlab Transformers, without transformers' float32 round trip.

    model, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # or load_checkpoint("gguf:FILE")

The ``gguf`` package reads the header and maps the tensors (numpy memmaps).
Q4_1 matrices stay 4-bit: a Q4_1 block of 32 weights ``w = d * q + m`` is
exactly lmlab's int4 group of 32 (``scale = d``, ``zero = m + 8 d``,
:class:`lmlab.quantize.QuantizedLinear`), so its codes are copied, not
re-quantized. Every other tensor type is de-quantized by ``gguf.quants``
(vectorized numpy) to float32. Names map to Hugging Face's Llama names and from
there through lmlab's own Llama mapping (``lmlab.hf._llama_names``); the q/k
rows, which llama.cpp's converter permutes for its rotary layout, are put back
in the half-split order lmlab uses. The tokenizer comes from the file's metadata
(transformers' GGUF tokenizer reader).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from lmlab.models.transformer import Transformer, TransformerConfig
from lmlab.quantize import QuantizedLinear, _pack_nibbles

__all__ = ["load_gguf", "read_gguf_model"]


_LAYER_NAMES = {  # GGUF -> Hugging Face Llama, per block
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - exercised only without the package
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install gguf") from e
    return gguf


def _hf_name(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    stem, _, kind = name.rpartition(".")
    if stem.startswith("blk."):
        _, index, part = stem.split(".", 2)
        if part in _LAYER_NAMES:
            return f"model.layers.{index}.{_LAYER_NAMES[part]}.{kind}"
    elif stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    raise ValueError(f"tensor {name!r} is not part of a Llama GGUF file lmlab reads")


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"the GGUF file has no {key!r} entry; a Llama GGUF file has it")
        return default
    return field.contents()


def _unpermute_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row order for q/k: rows (N, ...) -> Hugging Face's half-split order."""
    N = t.shape[0]
    return t.reshape(n_head, N // n_head // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _q4_1_codes(raw: np.ndarray, rows: int, cols: int) -> dict[str, torch.Tensor]:
    """Q4_1 blocks (rows, cols/32 * 20 bytes) -> int4 codes (rows, cols) uint8, scales and zeros (rows, cols/32)."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows, cols // 32, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(rows, cols)  # element j low, j + 16 high
    return {"codes": torch.from_numpy(codes), "scales": torch.from_numpy(d), "zeros": torch.from_numpy(m + 8 * d)}


def read_gguf_model(path: str | os.PathLike[str], keep_quantized: bool = True) -> Transformer:
    """The lmlab Transformer stored in a Llama GGUF file (eval mode, float32 weights; with
    ``keep_quantized`` its Q4_1 matrices as int4 :class:`QuantizedLinear` layers)."""
    from lmlab.hf import _llama_names

    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ValueError(f"{str(path)!r} is not a readable GGUF file: {e}") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{str(path)!r} holds a {arch!r} model; accepted: 'llama' GGUF files")
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
    n_embd = int(_field(reader, "llama.embedding_length"))
    tensors = {t.name: t for t in reader.tensors}
    embd = tensors["token_embd.weight"]
    vocab = int(embd.shape[1])
    tie = "output.weight" not in tensors
    rope_dim = int(_field(reader, "llama.rope.dimension_count", n_embd // n_head))
    if rope_dim != n_embd // n_head:
        raise ValueError(f"rope dimension {rope_dim} != head size {n_embd // n_head}; lmlab rotates whole heads")
    config = TransformerConfig(
        vocab_size=vocab, block_size=int(_field(reader, "llama.context_length")),
        n_layer=int(_field(reader, "llama.block_count")), n_head=n_head, n_embd=n_embd,
        n_kv_head=None if n_kv == n_head else n_kv, d_ff=int(_field(reader, "llama.feed_forward_length")),
        norm="rmsnorm", norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        positions="rotary", rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        activation="swiglu", bias=False, tie_weights=tie,
    )
    with torch.device("meta"):  # no random initialization: every weight comes from the file
        model = Transformer(config)
    if any(True for _ in model.buffers()):
        raise ValueError("a rotary Llama Transformer has no buffers to fill; this one does")
    to_lmlab = {hf: lm for lm, hf in _llama_names(config.n_layer, False)}
    to_lmlab["lm_head.weight"] = "lm_head.weight"
    floats: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        lm = to_lmlab.get(_hf_name(name))
        if lm is None:
            raise ValueError(f"tensor {name!r} in {str(path)!r} has no place in lmlab's Llama layout")
        heads = n_head if ".attn_q." in name else n_kv if ".attn_k." in name else None
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists the fastest axis first
        if keep_quantized and t.tensor_type == gguf.GGMLQuantizationType.Q4_1 and lm != "wte.weight":
            parts = _q4_1_codes(t.data, *shape)
            if heads:
                parts = {k: _unpermute_rows(v, heads) for k, v in parts.items()}
            quantized[lm.removesuffix(".weight")] = parts
            continue
        values = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        values = values.reshape(shape)
        floats[lm] = _unpermute_rows(values, heads) if heads else values
    model = model.to_empty(device="cpu")
    expected = {k for k in model.state_dict() if not (tie and k == "lm_head.weight")}
    have = set(floats) | {k + ".weight" for k in quantized}
    if expected != have:
        raise ValueError(f"{str(path)!r}: missing lmlab weights {sorted(expected - have)[:5]}, "
                         f"unexpected {sorted(have - expected)[:5]}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in floats:
                p.copy_(floats[name])
    if tie:
        model.lm_head.weight = model.wte.weight
    for name, parts in quantized.items():
        linear = model.get_submodule(name)
        q = QuantizedLinear(linear.in_features, linear.out_features, 4, 32, bias=False)
        q.qweight.copy_(_pack_nibbles(parts["codes"]))
        q.scales.copy_(parts["scales"])
        q.zeros.copy_(parts["zeros"])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
    if quantized:
        model.quantization = {"bits": 4, "group_size": 32, "modules": sorted(quantized)}
    return model.eval()


def load_gguf(path: str | os.PathLike[str], device: str | torch.device = "cpu", keep_quantized: bool = True):
    """(Transformer, HFTokenizer) from a Llama GGUF file; see the module docstring."""
    from lmlab.tokenizers import HFTokenizer

    path = Path(path)
    model = read_gguf_model(path, keep_quantized=keep_quantized).to(device)
    tokenizer = HFTokenizer.from_pretrained_dir(path.parent, gguf_file=path.name)
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(f"the tokenizer in {str(path)!r} has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.vocab_size}")
    return model, tokenizer
