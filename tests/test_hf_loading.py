"""Loading Hugging Face directories lmlab did not write: only causal models behind ``hf:``,
no code from the directory unless trusted, no pickles, and the config checked against the
weights before anything is allocated. Every model is tiny and random, saved to tmp_path."""

import json
import logging

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from lmlab.checkpoints import load_checkpoint  # noqa: E402
from lmlab.cli import main  # noqa: E402
from lmlab.hf import HFModel, convert_hf_dir, load_hf, load_hf_masked_lm, load_hf_model  # noqa: E402
from lmlab.tokenizers import BPETokenizer  # noqa: E402

hf_logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

TEXT = "the quick brown fox jumps over the lazy dog. a language model assigns probabilities to text. " * 10
SMALL = dict(vocab_size=300, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
             max_position_embeddings=64)
#: Extra settings some architectures need to be this small.
EXTRA = {
    "phi3": dict(pad_token_id=0), "gptj": dict(rotary_dim=4), "codegen": dict(rotary_dim=4),
    "bart": dict(decoder_layers=2, decoder_attention_heads=2, decoder_ffn_dim=32),
    "falcon": dict(num_kv_heads=2),
}
#: Decoders: ``hf:`` loads them, and they are causal.
CAUSAL = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt_neox", "opt", "bloom",
          "falcon", "gptj", "gpt_bigcode", "codegen", "mixtral", "olmo", "olmo2", "stablelm", "starcoder2", "granite",
          "cohere", "xglm", "biogpt", "mpt", "bart"]
#: Encoders that AutoModelForCausalLM also builds; causal only with is_decoder=true.
ENCODERS = ["bert", "roberta", "electra", "xlm-roberta", "big_bird", "bert-generation", "ernie", "camembert",
            "roformer", "megatron-bert"]


def _tiny(model_type: str, **overrides) -> torch.nn.Module:
    config_class = CONFIG_MAPPING[model_type]
    defaults = config_class()
    values = {**SMALL, **EXTRA.get(model_type, {}), **overrides}
    for key, value in (("num_key_value_heads", 2), ("head_dim", 8)):
        if hasattr(defaults, key) and model_type != "falcon":
            values[key] = value
    config = config_class(**values)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _save(model: torch.nn.Module, directory, tokenizer: bool = False):
    model.save_pretrained(str(directory))
    if tokenizer:
        bpe = BPETokenizer.train(TEXT, vocab_size=300)
        PreTrainedTokenizerFast(tokenizer_object=bpe.backend, bos_token="<bos>", eos_token="<eos>",
                                pad_token="<pad>", unk_token="<unk>").save_pretrained(str(directory))
    return directory


def _depends_on_later_tokens(model: HFModel, vocab: int, T: int = 10) -> list[int]:
    """Positions t whose logits change when the tokens after t change (random tokens, every t)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, T), generator=g)
    bad = []
    with torch.no_grad():
        base = model(ids)[0]
        for t in range(T - 1):
            other = ids.clone()
            other[0, t + 1:] = torch.randint(0, vocab, (T - t - 1,), generator=g)
            if not torch.allclose(model(other)[0][0, : t + 1], base[0, : t + 1], atol=1e-6, rtol=0):
                bad.append(t)
    return bad


@pytest.mark.parametrize("model_type", CAUSAL + ENCODERS)
def test_every_architecture_hf_accepts_is_causal(model_type, tmp_path):
    directory = _save(_tiny(model_type), tmp_path / model_type)
    if model_type in ENCODERS:
        with pytest.raises(ValueError, match=r"not a causal language model.*lmlab fill"):
            load_hf_model(directory)
        return
    model = HFModel(load_hf_model(directory))
    assert _depends_on_later_tokens(model, SMALL["vocab_size"]) == []


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_an_encoder_configured_as_a_decoder_loads_and_is_causal(model_type, tmp_path):
    directory = _save(_tiny(model_type, is_decoder=True), tmp_path / model_type)
    assert _depends_on_later_tokens(HFModel(load_hf_model(directory)), SMALL["vocab_size"]) == []


@pytest.fixture
def bert_mlm_dir(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    d = tmp_path / "bert-mlm"
    BertForMaskedLM(BertConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(str(d))
    bpe = BPETokenizer.train(TEXT, vocab_size=300)
    PreTrainedTokenizerFast(tokenizer_object=bpe.backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                            mask_token="<bos>", cls_token="<bos>", sep_token="<eos>").save_pretrained(str(d))
    return d


def test_a_bert_masked_lm_is_refused_by_hf_and_loads_for_fill(bert_mlm_dir, capsys):
    with pytest.raises(ValueError, match=r"not a causal language model: position 0's logits .*lmlab fill"):
        load_checkpoint(f"hf:{bert_mlm_dir}")
    assert main(["generate", "--model", f"hf:{bert_mlm_dir}", "--prompt", "the", "--max-new-tokens", "3"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "lmlab fill" in err[0]
    model, _ = load_hf_masked_lm(bert_mlm_dir)  # the masked-LM path still takes it
    assert type(model).__name__ == "BertForMaskedLM"


# ---------------------------------------------------------------- code from the directory


@pytest.fixture
def gpt2_dir(tmp_path):
    return _save(_tiny("gpt2"), tmp_path / "gpt2", tokenizer=True)


def _add_auto_map(directory, name):
    values = json.loads((directory / name).read_text())
    values["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model",
                          "AutoTokenizer": ["evil.Tokenizer", None]}
    (directory / name).write_text(json.dumps(values))
    (directory / "evil.py").write_text("raise SystemExit('remote code ran')\n")


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json"])
def test_remote_code_is_refused_without_the_flag(gpt2_dir, name, capsys):
    _add_auto_map(gpt2_dir, name)
    with pytest.raises(ValueError, match=rf"{name} has an auto_map.*--trust-remote-code"):
        load_checkpoint(f"hf:{gpt2_dir}")
    for command in (["generate", "--prompt", "the", "--max-new-tokens", "2"], ["score", "--text", str(gpt2_dir / name)]):
        assert main([command[0], "--model", f"hf:{gpt2_dir}", *command[1:]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "auto_map" in err[0]


def test_the_flag_lets_transformers_decide_and_plain_checkpoints_never_run_code(gpt2_dir, tmp_path):
    converted = convert_hf_dir(gpt2_dir, tmp_path / "converted")
    _add_auto_map(converted, "tokenizer_config.json")
    with pytest.raises(ValueError, match="auto_map"):  # an lmlab checkpoint: no flag lets code run
        load_checkpoint(converted)
    _add_auto_map(gpt2_dir, "config.json")
    # Trusted, transformers reads the auto_map and looks for evil.py's classes: its own error, not a silent load.
    with pytest.raises((ValueError, OSError, SystemExit, ImportError, AttributeError)):
        load_hf(gpt2_dir, trust_remote_code=True)


# ---------------------------------------------------------------- weights files


def test_pickled_weights_are_refused_in_one_line(gpt2_dir, capsys):
    (gpt2_dir / "model.safetensors").rename(gpt2_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin \(pickled weights\).*model.safetensors"):
        load_checkpoint(f"hf:{gpt2_dir}")
    assert main(["generate", "--model", f"hf:{gpt2_dir}", "--prompt", "the"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_truncated_and_corrupt_safetensors_name_the_file(gpt2_dir):
    weights = gpt2_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model.safetensors is not a valid safetensors file .*truncated"):
        load_checkpoint(f"hf:{gpt2_dir}")
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"model.safetensors is not a valid safetensors file \(header size"):
        load_checkpoint(f"hf:{gpt2_dir}")


def test_a_config_larger_than_its_weights_is_refused_before_allocating(gpt2_dir, monkeypatch):
    values = json.loads((gpt2_dir / "config.json").read_text())
    values.update(n_embd=65536, n_layer=48)  # about 2.5e12 parameters: never allocated
    (gpt2_dir / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=r"config.json implies [\d,]+ parameters but the weights .* hold [\d,]+ values"):
        load_checkpoint(f"hf:{gpt2_dir}")


def test_a_config_whose_shapes_differ_from_the_weights_names_the_directory(gpt2_dir):
    values = json.loads((gpt2_dir / "config.json").read_text())
    values.update(n_positions=32)  # fewer parameters than stored, a different wpe shape
    (gpt2_dir / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=r"weight 'transformer.wpe.weight' in .*model.safetensors has shape \(64, 16\), the config .* expects \(32, 16\)"):
        load_checkpoint(f"hf:{gpt2_dir}")


# ---------------------------------------------------------------- checkpoints of Hugging Face models


def test_distill_sft_with_an_hf_student_writes_loadable_checkpoints(gpt2_dir, tmp_path, capsys):
    data = tmp_path / "examples.jsonl"
    data.write_text("".join(json.dumps({"input": f"the fox {i}", "output": "a dog"}) + "\n" for i in range(6)))
    run = tmp_path / "sft"
    assert main(["distill", "sft", "--student", f"hf:{gpt2_dir}", "--data", str(data), "--out", str(run),
                 "--max-iters", "2", "--eval-interval", "1", "--eval-iters", "1", "--batch-size", "2",
                 "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    model, tok = load_checkpoint(f"hf:{run / 'best'}")  # a Hugging Face directory with its own tokenizer
    assert isinstance(model, HFModel) and tok.vocab_size == 300
    with pytest.raises(ValueError, match=r"is a Hugging Face config \(model_type 'gpt2'\).*hf:"):
        load_checkpoint(run / "best")


def test_convert_hf_dir_refuses_a_missing_or_oversized_tokenizer_before_writing(gpt2_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((gpt2_dir / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*bare"):
        convert_hf_dir(bare, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    big = BPETokenizer.train(TEXT * 3, vocab_size=400)
    assert big.vocab_size > SMALL["vocab_size"]
    PreTrainedTokenizerFast(tokenizer_object=big.backend, eos_token="<eos>").save_pretrained(str(bare))
    with pytest.raises(ValueError, match=r"tokenizer in .*bare has \d+ tokens but the model's vocabulary has 300"):
        convert_hf_dir(bare, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert load_checkpoint(convert_hf_dir(gpt2_dir, tmp_path / "out"))[0].vocab_size == 300
