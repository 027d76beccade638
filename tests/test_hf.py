"""Hugging Face interop: the HF wrapper, weight conversion both ways, parity, bad input.

Every model here is tiny and random (a GPT2Config / LlamaConfig saved with
save_pretrained to tmp_path); nothing is downloaded.
"""

import json
import logging

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from lmlab.checkpoints import load_checkpoint  # noqa: E402
from lmlab.decode.generate import generate  # noqa: E402
from lmlab.decode.search import beam_search  # noqa: E402
from lmlab.hf import (  # noqa: E402
    HFModel,
    HFState,
    convert_hf_dir,
    export_hf_dir,
    gpt2_to_lmlab,
    llama_to_lmlab,
    lmlab_to_gpt2,
    lmlab_to_llama,
    load_hf,
    to_lmlab,
)
from lmlab.models import build_model  # noqa: E402
from lmlab.models.transformer import Transformer  # noqa: E402
from lmlab.score import score_sequences  # noqa: E402
from lmlab.tokenizers import BPETokenizer, HFTokenizer  # noqa: E402

hf_logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

TEXT = ("the quick brown fox jumps over the lazy dog. " * 3 + "a language model assigns probabilities to text. ") * 8
ATOL = 1e-4


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(TEXT, vocab_size=300)


def _gpt2(vocab, **kw):
    torch.manual_seed(0)
    # A large initializer_range gives peaked distributions: no near-ties in argmax/beam comparisons.
    cfg = dict(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**{**cfg, **kw})).eval()


def _llama(vocab, **kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3, rms_norm_eps=1e-6,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
               rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **kw})).eval()


def _save_tokenizer(bpe, directory):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=bpe.backend, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(directory))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, bpe):
    d = tmp_path_factory.mktemp("gpt2")
    _gpt2(bpe.vocab_size).save_pretrained(str(d))
    _save_tokenizer(bpe, d)
    return d


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, bpe):
    d = tmp_path_factory.mktemp("llama")
    _llama(bpe.vocab_size).save_pretrained(str(d))
    _save_tokenizer(bpe, d)
    return d


def _ids(vocab, B=3, T=12, seed=1):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _hf_rows(out, prompt_len, eos=None):
    rows = []
    for row in out[:, prompt_len:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        rows.append(row)
    return rows


# ---------------------------------------------------------------- conversion parity

LLAMA_VARIANTS = {
    "gqa-untied": {},
    "mha-tied-bias": dict(num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("arch", ["gpt2", "gpt2-untied-relu", *[f"llama-{k}" for k in LLAMA_VARIANTS]])
def test_converted_logits_greedy_and_beams_match_hf(arch):
    V = 64
    if arch == "gpt2":
        hf = _gpt2(V)
    elif arch == "gpt2-untied-relu":
        hf = _gpt2(V, tie_word_embeddings=False, activation_function="relu", n_inner=48)
    else:
        hf = _llama(V, **LLAMA_VARIANTS[arch.removeprefix("llama-")])
    model = to_lmlab(hf)
    assert isinstance(model, Transformer)
    ids = _ids(V)
    with torch.no_grad():
        ref = hf(ids).logits
        full, _ = model(ids)
        head, state = model(ids[:, :5])
        tail, _ = model(ids[:, 5:], state.clone())
        steps, step_state = [head], state
        for t in range(5, ids.shape[1]):  # one token at a time through the cache
            logits, step_state = model(ids[:, t : t + 1], step_state)
            steps.append(logits)
    torch.testing.assert_close(full, ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat([head, tail], 1), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat(steps, 1), ref, atol=ATOL, rtol=0)

    prompt = ids[:, :6]
    ref_greedy = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = generate(model, prompt.tolist(), 20, do_sample=False)
    assert [g.token_ids for g in ours] == _hf_rows(ref_greedy, 6)

    for num_beams, length_penalty, early_stopping in [(4, 1.0, True), (3, 0.5, False), (4, 2.0, "never")]:
        ref_beams = hf.generate(prompt, max_new_tokens=8, do_sample=False, num_beams=num_beams,
                                num_return_sequences=2, length_penalty=length_penalty,
                                early_stopping=early_stopping, eos_token_id=7, pad_token_id=0)
        hyps = beam_search(model, prompt, num_beams, 8, eos_id=7, length_penalty=length_penalty,
                           early_stopping=early_stopping, num_return_sequences=2)
        assert [h.tokens for hs in hyps for h in hs] == _hf_rows(ref_beams, 6, eos=7)


def test_roundtrip_lmlab_gpt2_lmlab_is_exact():
    torch.manual_seed(0)
    model = build_model("transformer", dict(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16,
                                            activation="gelu_tanh", d_ff=40)).eval()
    hf = lmlab_to_gpt2(model)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    ids = _ids(50, T=10)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], atol=ATOL, rtol=0)
    back = gpt2_to_lmlab(hf)
    assert back.config == model.config
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_roundtrip_lmlab_llama_lmlab_is_exact():
    torch.manual_seed(0)
    model = build_model("transformer", dict(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_kv_head=2,
                                            n_embd=32, d_ff=40, norm="rmsnorm", positions="rotary",
                                            activation="swiglu", bias=False, tie_weights=False,
                                            rope_theta=1000.0, norm_eps=1e-6)).eval()
    hf = lmlab_to_llama(model)
    ids = _ids(50, T=10)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], atol=ATOL, rtol=0)
    back = llama_to_lmlab(hf)
    assert back.config == model.config
    for name, t in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


# ---------------------------------------------------------------- the hf: wrapper


def test_hf_spec_loads_wrapper_and_tokenizer(llama_dir, bpe):
    model, tok = load_checkpoint(f"hf:{llama_dir}")
    assert isinstance(model, HFModel) and model.family == "hf" and not model.training
    assert isinstance(tok, HFTokenizer)
    assert model.max_context == 64 and model.vocab_size == bpe.vocab_size
    assert tok.encode("the lazy fox") == bpe.encode("the lazy fox")
    assert tok.eos_id == bpe.eos_id

    hf = model.hf
    ids = _ids(bpe.vocab_size)
    with torch.no_grad():
        ref = hf(ids).logits
        head, state = model(ids[:, :5])
        assert isinstance(state, HFState) and state.length == 5 and state.batch_size == 3
        tail, after = model(ids[:, 5:], state)
        again, _ = model(ids[:, 5:], state)  # the state was not consumed
        picked, _ = model(ids[[2, 0, 0], 5:], state.select(torch.tensor([2, 0, 0])))
        last, last_state = model.next_token_logits(ids[:, 5:], state)
    assert model._keeps_logits and last.shape == (3, bpe.vocab_size) and last_state.length == 12
    torch.testing.assert_close(last, ref[:, -1], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat([head, tail], 1), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(again, tail, atol=0, rtol=0)
    torch.testing.assert_close(picked, ref[[2, 0, 0], 5:], atol=ATOL, rtol=0)
    assert after.length == 12 and set(after.tensors) >= {"k0", "v0", "k1", "v1"}
    assert after.tensors["k0"].shape == (3, 2, 12, 8)
    clone = after.clone()
    assert torch.equal(clone.tensors["k1"], after.tensors["k1"])
    assert clone.tensors["k1"].data_ptr() != after.tensors["k1"].data_ptr()

    # decoders and scorers work unchanged
    prompt = ids[:, :6]
    ref_greedy = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert [g.token_ids for g in generate(model, prompt.tolist(), 10, do_sample=False)] == _hf_rows(ref_greedy, 6)
    ref_beams = hf.generate(prompt, max_new_tokens=6, do_sample=False, num_beams=3, num_return_sequences=3,
                            eos_token_id=7, pad_token_id=0, early_stopping=True, length_penalty=1.0)
    hyps = beam_search(model, prompt, 3, 6, eos_id=7, num_return_sequences=3)
    assert [h.tokens for hs in hyps for h in hs] == _hf_rows(ref_beams, 6, eos=7)
    converted = to_lmlab(model)
    a = score_sequences(model, tok, ["the lazy dog", "a fox"])
    b = score_sequences(converted, tok, ["the lazy dog", "a fox"])
    assert a.tokens == b.tokens and a.nll == pytest.approx(b.nll, abs=1e-3)
    out = generate(model, [tok.encode("the")], 5, do_sample=True, seed=0, tokenizer=tok)
    assert isinstance(out[0].text, str)


def test_wrapper_refuses_overlong_input(gpt2_dir):
    model, _ = load_hf(gpt2_dir)
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


# ---------------------------------------------------------------- directories


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_convert_hf_dir_then_load_checkpoint(which, gpt2_dir, llama_dir, tmp_path, bpe):
    src = gpt2_dir if which == "gpt2" else llama_dir
    out = convert_hf_dir(src, tmp_path / "converted")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert json.loads((out / "config.json").read_text())["family"] == "transformer"
    model, tok = load_checkpoint(out)
    assert isinstance(model, Transformer)
    assert tok.vocab_size == model.vocab_size and tok.eos_id == bpe.eos_id
    assert tok.encode("the quick dog") == bpe.encode("the quick dog")
    hf_model, _ = load_hf(src)
    ids = _ids(bpe.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], hf_model(ids)[0], atol=ATOL, rtol=0)


def test_converted_tokenizer_loads_without_transformers(gpt2_dir, tmp_path, bpe, monkeypatch):
    import builtins

    out = convert_hf_dir(gpt2_dir, tmp_path / "c")
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("no transformers")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    _, tok = load_checkpoint(out)
    assert isinstance(tok, BPETokenizer)
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (bpe.eos_id, bpe.bos_id, bpe.pad_id)


@pytest.mark.parametrize("layout", ["gpt2", "llama"])
def test_export_hf_dir_with_lmlab_tokenizer(layout, tmp_path, bpe):
    torch.manual_seed(0)
    extra = {} if layout == "gpt2" else dict(norm="rmsnorm", positions="rotary", activation="swiglu", bias=False)
    model = build_model("transformer", dict(vocab_size=bpe.vocab_size, block_size=32, n_layer=1, n_head=2,
                                            n_embd=16, **extra)).eval()
    out = export_hf_dir(model, tmp_path / "hf", bpe)
    loaded, tok = load_checkpoint(f"hf:{out}")
    assert loaded.config.model_type == layout
    assert tok.encode("the lazy fox") == bpe.encode("the lazy fox") and tok.eos_id == bpe.eos_id
    ids = _ids(bpe.vocab_size, T=8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids)[0], model(ids)[0], atol=ATOL, rtol=0)


# ---------------------------------------------------------------- bad input


def test_bad_directories_name_the_path(tmp_path, gpt2_dir):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(f"hf:{tmp_path / 'nowhere'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json in .*empty"):
        load_checkpoint(f"hf:{empty}")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((gpt2_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights in .*no-weights.*model.safetensors"):
        load_checkpoint(f"hf:{no_weights}")
    with pytest.raises(FileNotFoundError, match="no weights"):
        convert_hf_dir(no_weights, tmp_path / "out")
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((gpt2_dir / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*no-tokenizer"):
        load_checkpoint(f"hf:{no_tokenizer}")
    with pytest.raises(ValueError, match="names no path"):
        load_checkpoint("hf:")
    with pytest.raises(FileNotFoundError, match="hf:<dir>"):
        load_checkpoint(tmp_path / "nowhere")


def test_unsupported_model_types_are_named(tmp_path):
    from transformers import BertConfig, BertForMaskedLM, T5Config

    bert_dir = tmp_path / "bert"
    BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(str(bert_dir))
    with pytest.raises(ValueError, match=r"model_type 'bert' .*not supported for conversion; accepted: 'gpt2', 'llama'"):
        convert_hf_dir(bert_dir, tmp_path / "out")
    t5_dir = tmp_path / "t5"
    t5_dir.mkdir()
    (t5_dir / "config.json").write_text(T5Config(d_model=16).to_json_string())
    (t5_dir / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="model_type 't5'.*not a causal language model"):
        load_hf(t5_dir)
    with pytest.raises(ValueError, match="model_type 'bert' is not supported for conversion"):
        to_lmlab(BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=32)))


def test_settings_that_cannot_convert_exactly_are_refused():
    with pytest.raises(ValueError, match="rope type 'linear'"):
        llama_to_lmlab(_llama(32, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}))
    with pytest.raises(ValueError, match="head_dim=4 .*hidden_size=32"):
        llama_to_lmlab(_llama(32, head_dim=4))
    with pytest.raises(ValueError, match="attention_bias=True with mlp_bias=False"):
        llama_to_lmlab(_llama(32, attention_bias=True))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        gpt2_to_lmlab(_gpt2(32, scale_attn_by_inverse_layer_idx=True))
    with pytest.raises(ValueError, match="needs a GPT-2 model, got model_type 'llama'"):
        gpt2_to_lmlab(_llama(32))
    rotary = build_model("transformer", dict(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=8,
                                             positions="rotary"))
    with pytest.raises(ValueError, match="positions='rotary' \\(GPT-2 needs 'learned'\\)"):
        lmlab_to_gpt2(rotary)
    with pytest.raises(ValueError, match="activation='gelu' \\(Llama needs 'swiglu'\\)"):
        lmlab_to_llama(rotary)
    adaptive = build_model("transformer", dict(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=8,
                                               adaptive_cutoffs=[8], tie_weights=False))
    with pytest.raises(ValueError, match="adaptive_cutoffs=\\[8\\] \\(GPT-2 has a full softmax"):
        lmlab_to_gpt2(adaptive)
    with pytest.raises(ValueError, match="adaptive_cutoffs=\\[8\\] \\(Llama has a full softmax"):
        lmlab_to_llama(adaptive)
