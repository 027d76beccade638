"""GGUF in: a Llama GGUF file read by lmlab.gguf_file agrees with transformers' own GGUF loader.

The test writes a tiny random Llama as a GGUF file with the ``gguf`` package, the way
llama.cpp's converter does (q/k rows permuted for its rotary layout, GGUF names), with
float32, float16, Q8_0 and Q4_1 tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from lmlab.gguf_file import read_gguf_model  # noqa: E402
from lmlab.quantize import QuantizedLinear  # noqa: E402

V, C, FF, L, H, HKV = 64, 64, 128, 2, 4, 2
# A byte-level BPE vocabulary of 64: 3 special tokens, the characters, "t0".."t9" (one merge each), more letters.
TOKENS = (["<|endoftext|>", "<s>", "</s>"] + list("t0123456789") + [f"t{d}" for d in "0123456789"]
          + list("abcdefghijklmnopqrsuvwxyzABCDEFGHIJKLMNO"))
assert len(TOKENS) == V


def _llama(tie: bool):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=C, intermediate_size=FF, num_hidden_layers=L,
                                   num_attention_heads=H, num_key_value_heads=HKV, max_position_embeddings=64,
                                   initializer_range=0.2, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    return transformers.LlamaForCausalLM(cfg).eval()


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: Hugging Face's half-split rotary rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_model, path, matrix_type: str) -> None:
    """Write ``hf_model`` as a llama GGUF file; 2-D block weights as ``matrix_type``
    ('F32' | 'F16' | 'Q8_0' | 'Q4_1'), norms float32, embeddings as Q8_0 when quantized."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(L)
    writer.add_context_length(64)
    writer.add_embedding_length(C)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(H)
    writer.add_head_count_kv(HKV)
    writer.add_rope_freq_base(1000.0)
    writer.add_rope_dimension_count(C // H)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(V)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_types([1] * V)
    writer.add_token_merges([f"t {d}" for d in "0123456789"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

    def add(name, w, kind):
        if kind in ("F32", "F16"):
            writer.add_tensor(name, w.astype(np.float32 if kind == "F32" else np.float16))
        else:
            t = getattr(gguf.GGMLQuantizationType, kind)
            writer.add_tensor(name, gguf.quants.quantize(w.astype(np.float32), t), raw_dtype=t)

    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    add("token_embd.weight", sd["model.embed_tokens.weight"], "F32" if matrix_type in ("F32", "F16") else "Q8_0")
    add("output_norm.weight", sd["model.norm.weight"], "F32")
    if not hf_model.config.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"], matrix_type)
    for i in range(L):
        for hf, short in names.items():
            w = sd[f"model.layers.{i}.{hf}.weight"]
            if short == "attn_q":
                w = _permute(w, H)
            elif short == "attn_k":
                w = _permute(w, HKV)
            add(f"blk.{i}.{short}.weight", w, "F32" if w.ndim == 1 else matrix_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("matrix_type,tie", [("F32", False), ("F16", True), ("Q8_0", False), ("Q4_1", False),
                                             ("Q4_1", True)])
def test_logits_agree_with_transformers_gguf_loader(tmp_path, matrix_type, tie):
    path = tmp_path / "tiny.gguf"
    write_gguf(_llama(tie), path, matrix_type)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    model = read_gguf_model(path)
    ids = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        logits, state = model(ids[:, :12])
        rest, _ = model(ids[:, 12:], state)
    assert torch.allclose(torch.cat([logits, rest], 1), expected, atol=2e-4, rtol=1e-4)
    kept = isinstance(model.blocks[0].attn.q, QuantizedLinear)
    assert kept == (matrix_type == "Q4_1")  # Q4_1 stays 4-bit, with the file's own codes
    if kept:
        assert model.quantization["bits"] == 4 and "blocks.0.attn.q" in model.quantization["modules"]
    dequantized = read_gguf_model(path, keep_quantized=False)
    with torch.no_grad():
        assert torch.allclose(dequantized(ids)[0], expected, atol=2e-4, rtol=1e-4)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        read_gguf_model(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        read_gguf_model(bad)
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="holds a 'gpt2' model; accepted: 'llama'"):
        read_gguf_model(tmp_path / "gpt2.gguf")


def test_gguf_spec_loads_with_its_tokenizer_and_quantizes(tmp_path):
    from lmlab.checkpoints import load_checkpoint, write_quantized

    path = tmp_path / "tiny.gguf"
    write_gguf(_llama(False), path, "Q4_1")
    model, tokenizer = load_checkpoint(f"gguf:{path}")
    assert tokenizer.vocab_size == V and model.quantization["bits"] == 4
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ids = torch.tensor([tokenizer.encode("t1t2t3 ab")])
    assert ids[0].tolist() == reference.encode("t1t2t3 ab", add_special_tokens=False)
    out = write_quantized(f"gguf:{path}", tmp_path / "int8", bits=8)
    again, tok2 = load_checkpoint(str(out))
    assert again.quantization["bits"] == 8 and tok2.encode("t1t2t3 ab") == ids[0].tolist()
    with torch.no_grad():
        a, b = again(ids)[0], model(ids)[0]
    assert ((a - b).norm() / b.norm()).item() < 0.05  # int8 of the same weights: the bound of test_quantize
    with pytest.raises(ValueError, match="names no file"):
        load_checkpoint("gguf:")


@pytest.mark.parametrize("matrix_type", ["F32", "Q4_1"])
def test_header_reader_agrees_with_the_gguf_package(tmp_path, matrix_type):
    from lmlab.gguf_file import read_gguf_header

    path = tmp_path / "tiny.gguf"
    write_gguf(_llama(True), path, matrix_type)
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(str(path))
    scalars = {k: f.contents() for k, f in reader.fields.items()
               if f.types and f.types[0] != gguf.GGUFValueType.ARRAY and not k.startswith("GGUF.")}
    assert header.metadata == scalars
    assert "tokenizer.ggml.tokens" not in header.metadata  # arrays are skipped
    assert set(header.tensors) == {t.name for t in reader.tensors}
    for t in reader.tensors:
        mine = header.tensors[t.name]
        assert mine.shape == tuple(int(s) for s in t.shape) and mine.type == t.tensor_type
        assert np.array_equal(mine.data, np.asarray(t.data).reshape(-1).view(np.uint8))


def test_a_truncated_file_is_refused_by_name(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(_llama(True), path, "Q4_1")
    raw = path.read_bytes()
    for cut in (len(raw) - 100, 200):  # inside the tensor data, inside the header
        (tmp_path / "cut.gguf").write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="cut.gguf' is not a readable GGUF file: .*truncated"):
            read_gguf_model(tmp_path / "cut.gguf")


def _random_blocks(kind: str, rows: int, cols: int) -> np.ndarray:
    """(rows, cols/32 * bytes) random blocks of ``kind`` with finite float16 scales."""
    rng = np.random.default_rng(0)
    n = rows * cols // 32
    halves = (rng.standard_normal((n, 2)) * 0.1).astype(np.float16).view(np.uint8)
    codes = rng.integers(0, 256, (n, 32 if kind == "Q8_0" else 16), dtype=np.uint8)
    head = halves[:, :2] if kind == "Q8_0" else halves
    return np.concatenate([head, codes], axis=1).reshape(rows, -1)


def test_block_decoding_agrees_with_the_gguf_package():
    from lmlab.gguf_file import _q4_1_codes, _q8_0_values

    rows, cols = 6, 96
    raw = _random_blocks("Q8_0", rows, cols)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).reshape(rows, cols)
    assert np.array_equal(_q8_0_values(raw, rows, cols).numpy(), expected)  # the same float32 products
    raw = _random_blocks("Q4_1", rows, cols)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1).reshape(rows, cols)
    layer = QuantizedLinear(cols, rows, 4, 32, bias=False)
    for key, value in _q4_1_codes(raw, rows, cols).items():
        getattr(layer, key).copy_(value)
    d = np.repeat(layer.scales.numpy(), 32, axis=1)
    m = np.repeat((layer.zeros - 8 * layer.scales).numpy(), 32, axis=1)
    codes = np.rint((expected - m) / np.where(d == 0, 1, d))
    from lmlab.quantize import _unpack_nibbles

    assert np.array_equal(_unpack_nibbles(layer.qweight).numpy()[d != 0], codes[d != 0])
    assert np.allclose(layer.dequantized_weight().numpy(), expected, rtol=1e-5, atol=1e-6)
