"""Llama-architecture GGUF files as lmlab Transformers, without transformers' float32 round trip.

    model, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # or load_checkpoint("gguf:FILE")

The header is read here (:func:`read_gguf_header`: the scalar metadata and the
tensor table, the tokenizer's long arrays skipped unread) and the tensors are a
numpy memmap of the file: nothing but the header is parsed in Python.
Q4_1 matrices stay 4-bit: a Q4_1 block of 32 weights ``w = d * q + m`` is
exactly lmlab's int4 group of 32 (``scale = d``, ``zero = m + 8 d``,
:class:`lmlab.quantize.QuantizedLinear`), so its codes are re-ordered into
lmlab's nibble order, not re-quantized, and never pass through float. Q8_0
tensors (SmolLM2's embedding) are de-quantized here in numpy, every other tensor
type by the ``gguf`` package's ``gguf.quants`` (vectorized numpy), to float32.
Names map to Hugging Face's Llama names and from there through lmlab's own
Llama mapping (``lmlab.hf._llama_names``); the q/k rows, which llama.cpp's
converter permutes for its rotary layout, are put back in the half-split order
lmlab uses. The tokenizer comes from the file's metadata
(transformers' GGUF tokenizer reader).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lmlab.models.transformer import Transformer, TransformerConfig
from lmlab.quantize import QuantizedLinear

__all__ = ["load_gguf", "read_gguf_model", "read_gguf_header", "GGUFHeader"]


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


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]   # GGUF order: the fastest axis first
    type: int                # a gguf.GGMLQuantizationType value
    data: np.ndarray         # the tensor's bytes (uint8), a view of the file's memmap


@dataclass
class GGUFHeader:
    metadata: dict[str, object]      # scalar and string entries; arrays are skipped
    tensors: dict[str, GGUFTensor]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Little-endian reads from a bytes-like buffer."""

    def __init__(self, buffer, where: str) -> None:
        self.buffer, self.at, self.where = memoryview(buffer), 0, where

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.at + size > len(self.buffer):
            raise ValueError(f"{self.where} is not a readable GGUF file: it ends inside its header (truncated?)")
        value = struct.unpack_from(fmt, self.buffer, self.at)
        self.at += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = bytes(self.buffer[self.at:self.at + n])
        self.at += n
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.unpack("<IQ")
            if item in _SCALARS:       # skipped unread: the file's own sizes say how far
                self.at += count * struct.calcsize(_SCALARS[item])
            elif item == _STRING:      # only the lengths are read (a tokenizer's ~10^5 strings: a tight loop)
                buffer, at, end, read = self.buffer, self.at, len(self.buffer), struct.Struct("<Q").unpack_from
                for _ in range(count):
                    if at + 8 > end:
                        raise ValueError(f"{self.where} is not a readable GGUF file: it ends inside its header "
                                         "(truncated?)")
                    at += 8 + read(buffer, at)[0]
                self.at = at
            else:
                for _ in range(count):
                    self.value(item)
            return None
        raise ValueError(f"{self.where}: unknown GGUF value type {kind}")


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """The metadata (scalars and strings) and the tensor table of a GGUF file (version 2 or 3,
    little-endian), each tensor's bytes a view of one read-only memmap of the file."""
    gguf = _gguf()
    where = repr(str(path))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(data, where)
    if bytes(data[:4]) != b"GGUF":
        raise ValueError(f"{where} is not a readable GGUF file: it does not start with 'GGUF'")
    cursor.at = 4
    version = cursor.unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"{where} is GGUF version {version}; accepted: 2 and 3 (little-endian)")
    n_tensors, n_entries = cursor.unpack("<QQ")
    metadata: dict[str, object] = {}
    for _ in range(n_entries):
        key = cursor.string()
        value = cursor.value(cursor.unpack("<I"))
        if value is not None:
            metadata[key] = value
    table = []
    for _ in range(n_tensors):
        name = cursor.string()
        dims = cursor.unpack("<I")
        shape = tuple(cursor.unpack("<Q") for _ in range(dims))
        kind, offset = cursor.unpack("<IQ")
        table.append((name, shape, kind, offset))
    alignment = int(metadata.get("general.alignment", 32))
    start = -(-cursor.at // alignment) * alignment
    tensors = {}
    for name, shape, kind, offset in table:
        try:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise ValueError(f"{where}: tensor {name!r} has an unknown GGUF type {kind}") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) // block * size
        begin = start + offset
        if begin + nbytes > len(data):
            raise ValueError(f"{where} is not a readable GGUF file: tensor {name!r} runs past its end (truncated?)")
        tensors[name] = GGUFTensor(name, shape, kind, data[begin:begin + nbytes])
    return GGUFHeader(metadata, tensors)


def _field(header: GGUFHeader, key: str, default=None):
    value = header.metadata.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"the GGUF file has no {key!r} entry; a Llama GGUF file has it")
        return default
    return value


def _unpermuted_rows(n_rows: int, n_head: int) -> np.ndarray:
    """(n_rows,) the file's row for each row in Hugging Face's half-split rotary order (q/k matrices,
    whose rows llama.cpp's converter interleaves)."""
    return np.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2).swapaxes(1, 2).reshape(-1)


# One block of each kept type as a numpy record: fields are strided views, read without copies.
_Q4_1_BLOCK = np.dtype([("d", "<f2"), ("m", "<f2"), ("pairs", "<u2", (8,))])  # 20 bytes: scale, min, 32 nibbles
_Q8_0_BLOCK = np.dtype([("d", "<f2"), ("codes", "i1", (32,))])              # 34 bytes: scale, 32 int8 codes


def _blocks(raw: np.ndarray, rows: int, block: np.dtype) -> np.ndarray:
    """The file's bytes (rows, blocks * block size) as a (rows, blocks) array of ``block`` records."""
    return np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, -1).view(block)


def _q4_1_codes(raw: np.ndarray, rows: int, cols: int) -> dict[str, torch.Tensor]:
    """Q4_1 blocks (rows, cols/32 * 20 bytes) -> lmlab's packed int4 codes ``qweight`` (rows, cols/2)
    uint8 (even column in the low nibble), ``scales`` and ``zeros`` (rows, cols/32) float32.

    Q4_1 byte j holds element j (low nibble) and j + 16 (high); lmlab's byte i elements 2i and 2i + 1:
    bytes 0..7 from the low nibbles of file bytes (2i, 2i + 1), bytes 8..15 from their high nibbles.
    Each pair of file bytes is read as one little-endian uint16 n of the two low (or two high)
    nibbles: the low byte of ``n | n >> 4`` is the packed byte. numpy, one thread: the work is a few
    passes over memory, and torch's threads only wait on a shared machine."""
    blocks = _blocks(raw, rows, _Q4_1_BLOCK)
    d, m = blocks["d"].astype(np.float32), blocks["m"].astype(np.float32)
    pairs = blocks["pairs"]                                                  # (rows, blocks, 8)
    low, high = pairs & 0x0F0F, (pairs >> 4) & 0x0F0F
    packed = np.concatenate([(low | (low >> 4)).astype(np.uint8), (high | (high >> 4)).astype(np.uint8)], axis=-1)
    return {"qweight": torch.from_numpy(packed.reshape(rows, cols // 2)), "scales": torch.from_numpy(d),
            "zeros": torch.from_numpy(m + 8 * d)}


def _q8_0_values(raw: np.ndarray, rows: int, cols: int) -> torch.Tensor:
    """Q8_0 blocks (rows, cols/32 * 34 bytes: a float16 scale, 32 int8 codes) -> (rows, cols) float32,
    ``code * scale``: the same float32 products as ``gguf.quants``, without its per-16-rows loop."""
    blocks = _blocks(raw, rows, _Q8_0_BLOCK)
    values = blocks["codes"].astype(np.float32) * blocks["d"].astype(np.float32)[..., None]
    return torch.from_numpy(values.reshape(rows, cols))


def read_gguf_model(path: str | os.PathLike[str], keep_quantized: bool = True) -> Transformer:
    """The lmlab Transformer stored in a Llama GGUF file (eval mode, float32 weights; with
    ``keep_quantized`` its Q4_1 matrices as int4 :class:`QuantizedLinear` layers)."""
    from lmlab.hf import _llama_names

    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {str(path)!r}")
    try:
        reader = read_gguf_header(path)
    except OSError as e:
        raise ValueError(f"{str(path)!r} is not a readable GGUF file: {e}") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{str(path)!r} holds a {arch!r} model; accepted: 'llama' GGUF files")
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
    n_embd = int(_field(reader, "llama.embedding_length"))
    tensors = reader.tensors
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{str(path)!r} has no 'token_embd.weight' tensor; a Llama GGUF file has it")
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
        shape = tuple(reversed(t.shape))  # GGUF lists the fastest axis first
        raw = t.data.reshape(shape[0], -1)  # one row of blocks per output
        if heads:
            raw = raw[_unpermuted_rows(shape[0], heads)]
        if keep_quantized and t.type == gguf.GGMLQuantizationType.Q4_1 and lm != "wte.weight":
            quantized[lm.removesuffix(".weight")] = _q4_1_codes(raw, *shape)
            continue
        if t.type == gguf.GGMLQuantizationType.Q8_0:
            floats[lm] = _q8_0_values(raw, *shape)
            continue
        values = np.asarray(gguf.quants.dequantize(raw, t.type), dtype=np.float32).reshape(shape)
        floats[lm] = torch.from_numpy(np.require(values, requirements=["C", "W"]))
    model = model.to_empty(device="cpu")
    expected = {k for k in model.state_dict() if not (tie and k == "lm_head.weight")}
    have = set(floats) | {k + ".weight" for k in quantized}
    if expected != have:
        raise ValueError(f"{str(path)!r}: missing lmlab weights {sorted(expected - have)[:5]}, "
                         f"unexpected {sorted(have - expected)[:5]}")
    model.load_state_dict(floats, strict=False, assign=True)  # the tensors read become the parameters, uncopied
    if tie:
        model.lm_head.weight = model.wte.weight
    for name, parts in quantized.items():
        linear = model.get_submodule(name)
        with torch.device("meta"):  # no placeholder buffers: the file's tensors are set below
            q = QuantizedLinear(linear.in_features, linear.out_features, 4, 32, bias=False)
        for key, value in parts.items():
            expected = getattr(q, key).shape
            if value.shape != expected:
                raise ValueError(f"{str(path)!r}: {name}.{key} has shape {tuple(value.shape)}, expected {tuple(expected)}")
            setattr(q, key, value)
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
