"""Inference dtypes and weight-only int8/int4 quantization (lmlab.quantize).

Bounds used here, and why:

- One quantized layer: rounding moves each weight by at most half a step, so
  |y - x @ w.T| <= sum_k |x_k| * step_k / 2 exactly (plus float32 rounding). This is
  the sharp test of the codes.
- A whole model, relative error ||logits - logits_fp32|| / ||logits_fp32||: a
  Gaussian row quantized per row to int8 has a relative RMS error of about
  3 / (127 * sqrt(12)) = 0.7% (max |w| ~ 3 sigma); int4 in groups of 32 with an
  offset about 4 / (15 * sqrt(12)) = 7.7%. A tiny transformer passes through up to
  7 quantized layers in series (errors add in quadrature, the softmaxes and
  norms amplify them), so the bounds are int8 5%, int4 50%, bfloat16 (8-bit
  mantissa, 0.2% per rounding) 3%, float16 0.5%. Measured worst cases: int8 2.9%,
  int4 32%, bfloat16 1.4%, float16 0.2%.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lmlab.models import build_model, load_model, save_model
from lmlab.quantize import (QuantizedLinear, _int8_rows_emulated, model_dtype, parse_dtype, prepare_model,
                            quantize_model, quantize_output, set_dtype)

V = 96
CONFIGS = {
    "llama-like": ("transformer", dict(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                       d_ff=128, norm="rmsnorm", positions="rotary", activation="swiglu", bias=False,
                                       tie_weights=False)),
    "gpt-like": ("transformer", dict(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=64)),
    "mlp": ("mlp", dict(vocab_size=V, context=4, n_embd=8, n_hidden=32)),
    "context-average": ("context-average", dict(vocab_size=V, n_embd=32)),
    "rnn": ("rnn", dict(vocab_size=V, cell="rnn", n_embd=32, n_hidden=32)),
    "gru": ("gru", dict(vocab_size=V, cell="gru", n_embd=32, n_hidden=32)),
    "lstm": ("lstm", dict(vocab_size=V, cell="lstm", n_embd=32, n_hidden=32, n_layer=2, tie_weights=True)),
}
BOUNDS = {("float32", None): 0.0, ("bfloat16", None): 0.03, ("float16", None): 0.005,
          (None, "int8"): 0.05, (None, "int4"): 0.5, ("bfloat16", "int8"): 0.06, ("bfloat16", "int4"): 0.5}
IDS = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))


def make(name: str):
    family, cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = build_model(family, cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [None, 16])
def test_layer_error_is_within_half_a_step(bits, group_size):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q = QuantizedLinear.from_linear(linear, bits, group_size)
    G = q.group_size
    w, deq = linear.weight.detach(), q.dequantized_weight()
    step = q.scales.repeat_interleave(G, dim=1)  # (N, K): the step of each weight's group
    assert ((w - deq).abs() <= step / 2 * (1 + 1e-5)).all()
    x = torch.randn(5, 64)
    bound = x.abs() @ (step / 2).t() + 1e-4
    assert ((q(x) - linear(x).detach()).abs() <= bound).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_kernel_computes_the_dequantized_product(bits, dtype):
    torch.manual_seed(0)
    q = QuantizedLinear.from_linear(torch.nn.Linear(64, 48, bias=True), bits, None)
    q.compute_dtype = dtype
    x = torch.randn(3, 7, 64).to(dtype)
    reference = (x.float() @ q.dequantized_weight().t() + q.bias.float())
    y = q(x)
    assert y.dtype == dtype and y.shape == (3, 7, 48)
    assert q._kernel_operands(dtype) is not None  # the packed kernel ran
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert relative_error(y, reference) < tolerance


def test_int4_codes_pack_two_per_byte_and_int8_stay_in_range():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 8, bias=False)
    q4 = QuantizedLinear.from_linear(linear, 4, 32)
    assert q4.qweight.dtype == torch.uint8 and q4.qweight.shape == (8, 32)
    assert q4.scales.shape == q4.zeros.shape == (8, 2)
    q8 = QuantizedLinear.from_linear(linear, 8, None)
    assert q8.qweight.dtype == torch.int8 and q8.qweight.shape == (8, 64) and q8.scales.shape == (8, 1)
    assert q8.qweight.abs().max().item() == 127  # the largest weight of each row maps to +-127


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype,quantize", sorted(BOUNDS, key=str))
def test_logits_close_to_float32(name, dtype, quantize):
    reference = make(name)
    with torch.no_grad():
        expected, _ = reference(IDS)
    model = prepare_model(make(name), dtype=dtype, quantize=quantize)
    with torch.no_grad():
        logits, _ = model(IDS)
    assert logits.dtype == parse_dtype(dtype or "float32")
    error = relative_error(logits, expected)
    assert error <= BOUNDS[(dtype, quantize)], f"{name} {dtype} {quantize}: relative error {error:.4f}"
    if dtype in (None, "float32") and quantize is None:
        assert torch.equal(logits, expected)  # the float32 path is untouched


@pytest.mark.parametrize("name", ["llama-like", "lstm", "mlp"])
def test_incremental_decoding_equals_full_when_quantized(name):
    model = prepare_model(make(name), dtype="bfloat16", quantize="int4")
    with torch.no_grad():
        full, _ = model(IDS)
        first, state = model(IDS[:, :10])
        rest, _ = model(IDS[:, 10:], state)
    assert relative_error(torch.cat([first, rest], 1), full) < 2e-2


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", ["llama-like", "lstm", "context-average"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, name, bits):
    model = quantize_model(make(name), bits)
    save_model(model, tmp_path / "q")
    record = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert record["bits"] == bits and record["group_size"] == (32 if bits == 4 else None)
    assert "lm_head" in record["modules"] or "decoder" in record["modules"] or "lm_head" in str(record["modules"])
    loaded = load_model(tmp_path / "q").eval()
    assert isinstance(dict(loaded.named_modules())[record["modules"][0]], QuantizedLinear)
    with torch.no_grad():
        a, _ = model(IDS)
        b, _ = loaded(IDS)
    assert torch.equal(a, b)
    set_dtype(loaded, "bfloat16")
    assert model_dtype(loaded) == torch.bfloat16


def test_quantized_checkpoint_is_smaller(tmp_path):
    model = make("llama-like")
    save_model(model, tmp_path / "f32")
    save_model(quantize_model(model, 4), tmp_path / "q4")
    f32, q4 = (tmp_path / "f32" / "model.safetensors").stat().st_size, (tmp_path / "q4" / "model.safetensors").stat().st_size
    assert q4 < 0.45 * f32  # embeddings stay float32; every linear weight shrinks to ~1/6


def test_bad_values_have_clear_errors():
    with pytest.raises(ValueError, match="dtype 'int3' is not supported; accepted: float32, bfloat16, float16"):
        parse_dtype("int3")
    with pytest.raises(ValueError, match="quantization 'int2' is not supported; accepted: int8, int4"):
        quantize_model(make("mlp"), "int2")
    with pytest.raises(ValueError, match="group size 48 does not divide the 64 inputs of layer 'blocks.0.attn.q'"):
        quantize_model(make("llama-like"), 4, group_size=48)
    with pytest.raises(ValueError, match="bigram model has no linear layers"):
        quantize_model(build_model("bigram", {"vocab_size": 5}), 8)
    model = quantize_model(make("mlp"), 8)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, 4)
    ngram = build_model("ngram", {"vocab_size": 5, "order": 2})
    with pytest.raises(ValueError, match="ngram model counts tokens"):
        prepare_model(ngram, dtype="bfloat16")


def int8_activation_layer(n_in=64, n_out=48, bias=False):
    torch.manual_seed(0)
    q = QuantizedLinear.from_linear(torch.nn.Linear(n_in, n_out, bias=bias), 8, None)
    q.activations = "int8"
    return q


def test_int8_activation_kernel_computes_its_integer_formula():
    q = int8_activation_layer()
    x = torch.randn(5, 64) * torch.linspace(0.1, 10, 5)[:, None]
    x[2] = x[2].abs()  # a row with no negative value: zero point 0
    assert q._kernel_operands(torch.float32) is not None  # FBGEMM's kernel ran
    y = q(x)
    emulated = _int8_rows_emulated(x, q.qweight, q.scales[:, 0])
    assert torch.allclose(y, emulated, rtol=1e-5, atol=1e-5 * emulated.abs().max().item())
    # 7-bit activations: each input moves by at most half a step of its row, besides the weight's own rounding
    step = (x.amax(-1, keepdim=True).clamp(min=0) - x.amin(-1, keepdim=True).clamp(max=0)) / 127
    w = q.dequantized_weight()
    bound = step / 2 * w.abs().sum(-1) * (1 + 1e-4) + 1e-5
    assert ((y - x @ w.t()).abs() <= bound).all()


def test_int8_activation_rows_do_not_depend_on_the_batch():
    q = int8_activation_layer(bias=True)
    x = torch.randn(4, 3, 64)
    x[1] *= 100  # one row with a much wider range would coarsen the others' codes if they shared a scale
    together = q(x)
    alone = torch.stack([q(x[i]) for i in range(4)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("scheme,activations", [("int8", "float"), ("int8-dynamic", "int8")])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_output_layer_keeps_the_embedding_exact(tmp_path, bits, scheme, activations):
    family, cfg = CONFIGS["llama-like"]
    torch.manual_seed(0)
    reference = build_model(family, {**cfg, "tie_weights": True}).eval()
    embedding = reference.wte.weight.detach().clone()
    with torch.no_grad():
        expected, _ = reference(IDS)
    model = prepare_model(copy.deepcopy(reference), quantize=bits, output=scheme)
    head = model.lm_head
    assert isinstance(head, QuantizedLinear) and head.activations == activations and head.bits == 8
    assert isinstance(model.wte, torch.nn.Embedding) and torch.equal(model.wte.weight, embedding)
    assert model.quantization["output"] == {"module": "lm_head", "bits": 8, "activations": activations}
    with torch.no_grad():
        full, _ = model(IDS)
        first, state = model(IDS[:, :10])
        rest, _ = model(IDS[:, 10:], state)
    assert relative_error(full, expected) <= BOUNDS[(None, f"int{bits}")]
    # decoding agrees with scoring up to float rounding (a rounding of an activation code at most)
    assert relative_error(torch.cat([first, rest], 1), full) < 1e-3
    save_model(model, tmp_path / "q")
    loaded = load_model(tmp_path / "q").eval()
    assert loaded.lm_head.activations == activations and torch.equal(loaded.wte.weight, embedding)
    with torch.no_grad():
        assert torch.equal(loaded(IDS)[0], full)


def test_output_layer_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="quantize the model first"):
        quantize_output(make("llama-like"))
    with pytest.raises(ValueError, match="int8 activations need 8-bit codes with one scale per row"):
        QuantizedLinear(64, 8, 4, 32, bias=False, activations="int8")
    with pytest.raises(ValueError, match="activations='int4' is not supported; accepted: float, int8"):
        QuantizedLinear(64, 8, 8, None, bias=False, activations="int4")
    with pytest.raises(ValueError, match="'lm_head' is a QuantizedLinear; accepted: a linear layer"):
        quantize_output(quantize_model(make("llama-like"), 4))  # a 4-bit output layer
    with pytest.raises(ValueError, match="output quantization 'int4' is not supported; accepted: int8, int8-dynamic"):
        quantize_output(quantize_model(make("mlp"), 8), "int4")
    model = quantize_output(quantize_model(make("mlp"), 8), "int8-dynamic")
    save_model(model, tmp_path / "q")
    path = tmp_path / "q" / "config.json"
    config = json.loads(path.read_text())
    config["quantization"]["output"]["module"] = "hidden"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="output entry .* does not fit the model"):
        load_model(tmp_path / "q")


def test_load_refuses_a_record_naming_a_missing_layer(tmp_path):
    model = quantize_model(make("mlp"), 8)
    save_model(model, tmp_path / "q")
    path = tmp_path / "q" / "config.json"
    config = json.loads(path.read_text())
    config["quantization"]["modules"].append("nowhere")
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="names layer 'nowhere', which the model does not have"):
        load_model(tmp_path / "q")


def test_hf_model_quantizes_and_casts():
    transformers = pytest.importorskip("transformers")
    from lmlab.hf import HFModel

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   initializer_range=0.1, tie_word_embeddings=False)
    reference = HFModel(transformers.LlamaForCausalLM(cfg).eval())
    with torch.no_grad():
        expected, _ = reference(IDS)
    for dtype, quantize in [("bfloat16", None), (None, "int8"), ("bfloat16", "int4")]:
        model = HFModel(transformers.LlamaForCausalLM(cfg).eval())
        model.hf.load_state_dict(reference.hf.state_dict())
        prepare_model(model, dtype=dtype, quantize=quantize)
        with torch.no_grad():
            logits, _ = model(IDS)
        assert relative_error(logits, expected) <= BOUNDS[(dtype, quantize)]
        if quantize:
            assert isinstance(model.hf.lm_head, QuantizedLinear)


@pytest.fixture
def char_checkpoint(tmp_path):
    from lmlab.tokenizers import CharTokenizer

    text = "the quick brown fox jumps over the lazy dog. " * 4
    tok = CharTokenizer.train(text)
    family, cfg = CONFIGS["llama-like"]
    torch.manual_seed(0)
    model = build_model(family, {**cfg, "vocab_size": tok.vocab_size})
    save_model(model, tmp_path / "ckpt")
    tok.save(tmp_path / "ckpt" / "tokenizer.json")
    (tmp_path / "text.txt").write_text(text)
    return tmp_path


def test_cli_quantize_writes_a_checkpoint_generate_and_score_read(char_checkpoint, capsys):
    from lmlab.cli import main

    d = char_checkpoint
    assert main(["quantize", "--model", str(d / "ckpt"), "--out", str(d / "q4"), "--bits", "4"]) == 0
    assert json.loads((d / "q4" / "config.json").read_text())["quantization"]["bits"] == 4
    assert (d / "q4" / "tokenizer.json").is_file()
    capsys.readouterr()
    for model in (d / "q4", d / "ckpt"):
        assert main(["generate", "--model", str(model), "--prompt", "the ", "--max-new-tokens", "5",
                     "--dtype", "bfloat16"]) == 0
    assert main(["score", "--model", str(d / "ckpt"), "--text", str(d / "text.txt"), "--quantize", "int8",
                 "--json"]) == 0
    assert main(["quantize", "--model", str(d / "ckpt"), "--out", str(d / "q4"), "--bits", "8"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["quantize", "--model", str(d / "ckpt"), "--out", str(d / "q5"), "--bits", "4",
                 "--group-size", "7"]) == 2
    assert "group size 7 does not divide" in capsys.readouterr().err
    assert not (d / "q5").exists()  # nothing half-written


def test_cli_rejects_an_unknown_dtype(char_checkpoint, capsys):
    from lmlab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(char_checkpoint / "ckpt"), "--dtype", "int3"])
    assert e.value.code == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_cli_quantize_output_reads_and_refuses_a_float_model(char_checkpoint, capsys):
    from lmlab.cli import main

    ckpt = str(char_checkpoint / "ckpt")
    text = str(char_checkpoint / "text.txt")
    for scheme in ("int8", "int8-dynamic"):
        assert main(["score", "--model", ckpt, "--text", text, "--quantize", "int4", "--quantize-output", scheme,
                     "--json"]) == 0
    capsys.readouterr()
    assert main(["score", "--model", ckpt, "--text", text, "--quantize-output", "int8"]) == 2
    assert "quantize the model first" in capsys.readouterr().err
