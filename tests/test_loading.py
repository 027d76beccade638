"""Loading files lmlab did not write (or that were damaged): checkpoints checked against their
config before allocating, one-line errors naming the file, text files that are not UTF-8,
tokenizer references that leave the checkpoint, configs that are not JSON."""

import json
from dataclasses import dataclass

import pytest
import torch

from lmlab.checkpoints import load_checkpoint
from lmlab.cli import main
from lmlab.data import read_corpus, read_jsonl, read_lines, read_prompt_file
from lmlab.models import build_model, load_model, save_model
from lmlab.models.base import LanguageModel, config_to_json
from lmlab.tokenizers import CharTokenizer, load_tokenizer

TEXT = "to be or not to be, that is the question.\n" * 20
LATIN1 = "caf\u00e9 au lait\n".encode("latin-1")  # byte 3 is 0xe9: not UTF-8


@pytest.fixture
def checkpoint(tmp_path):
    tok = CharTokenizer.train(TEXT)
    torch.manual_seed(0)
    model = build_model("transformer", dict(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    directory = tmp_path / "ckpt"
    save_model(model, directory)
    tok.save(directory / "tokenizer.json")
    return directory


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---------------------------------------------------------------- lmlab checkpoints


def test_a_config_far_larger_than_its_weights_is_refused_before_allocating(checkpoint, capsys):
    values = json.loads((checkpoint / "config.json").read_text())
    values.update(n_embd=1 << 16, n_layer=4096, n_head=1)  # ~2e14 parameters if it were built
    (checkpoint / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=r"the weights in .*model.safetensors do not match .*config.json: missing \['blocks.1"):
        load_model(checkpoint)
    assert main(["generate", "--model", str(checkpoint), "--prompt", "to"]) == 2
    assert "config.json" in _one_error_line(capsys)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_weights_are_one_line_errors_naming_the_file(checkpoint, damage, capsys):
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[:-64], "garbage": b"\x00" * 8 + data[8:], "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"model.safetensors is not a valid safetensors file"):
        load_model(checkpoint)
    assert main(["score", "--model", str(checkpoint), "--text", str(checkpoint / "config.json")]) == 2
    assert "model.safetensors" in _one_error_line(capsys)


def test_pickled_weights_in_an_lmlab_checkpoint_are_refused(checkpoint):
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin \(pickled weights\), which lmlab does not read"):
        load_model(checkpoint)


def test_a_hugging_face_directory_given_without_hf_prefix_says_so(checkpoint):
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 16}))
    with pytest.raises(ValueError, match=r"is a Hugging Face config \(model_type 'gpt2'\).*'hf:"):
        load_checkpoint(checkpoint)


def test_a_config_that_is_not_json_is_refused_before_anything_is_written(tmp_path):
    @dataclass
    class OddConfig:
        vocab_size: int
        dtype: object = torch.float16

    class Odd(LanguageModel):
        family = "odd"

        def __init__(self):
            super().__init__()
            self.config = OddConfig(4)

    with pytest.raises(ValueError, match=r"config field dtype of OddConfig is torch.float16 \(dtype\)"):
        save_model(Odd(), tmp_path / "odd")
    assert not (tmp_path / "odd" / "model.safetensors").exists()
    assert config_to_json(OddConfig(4, (1, [2.0], {"a": None}))) == {"vocab_size": 4, "dtype": [1, [2.0], {"a": None}]}


# ---------------------------------------------------------------- tokenizer references


def test_a_tokenizer_reference_may_only_point_inside_its_checkpoint(checkpoint, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for target in (str(outside), "../elsewhere", "/"):
        (checkpoint / "tokenizer.json").write_text(json.dumps({"type": "hf", "version": 1, "pretrained_dir": target}))
        with pytest.raises(ValueError, match=r"points to .* outside its own directory"):
            load_checkpoint(checkpoint)


# ---------------------------------------------------------------- text files that are not UTF-8


def test_every_text_reader_names_the_file_and_the_byte(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(LATIN1)
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(b'{"prompt": "' + LATIN1.strip() + b'"}\n')
    for read in (read_corpus, read_lines, lambda p: read_prompt_file(p, "target")):
        with pytest.raises(ValueError, match=r"latin1.txt' is not UTF-8: byte 3 \(0xe9\)"):
            read(bad)
    with pytest.raises(ValueError, match=r"latin1.jsonl' is not UTF-8: byte 15 \(0xe9\)"):
        read_jsonl(jsonl, "an object")
    tok_file = tmp_path / "tokenizer.json"
    tok_file.write_bytes(b'{"type": "char", "chars": "' + LATIN1.strip() + b'"}')
    with pytest.raises(ValueError, match=r"tokenizer.json' is not UTF-8: byte 30 \(0xe9\)"):
        load_tokenizer(tok_file)
    assert main(["prepare", "--corpus", str(bad), "--out", str(tmp_path / "data")]) == 2
    assert "latin1.txt' is not UTF-8: byte 3" in _one_error_line(capsys)
    assert not (tmp_path / "data").exists()


def test_labelled_texts_inputs_and_documents_that_are_not_utf8(tmp_path):
    from lmlab.distill import _read_inputs
    from lmlab.finetune import read_labelled
    from lmlab.rag import load_collection

    csv = tmp_path / "labels.csv"
    csv.write_bytes(b"text,label\n" + LATIN1.strip() + b",pos\nfine,neg\n")
    with pytest.raises(ValueError, match=r"labels.csv' is not UTF-8: byte 14"):
        read_labelled(csv)
    paragraphs = tmp_path / "inputs.txt"
    paragraphs.write_bytes(LATIN1)
    with pytest.raises(ValueError, match=r"inputs.txt' is not UTF-8: byte 3"):
        _read_inputs(paragraphs)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_bytes(LATIN1)
    with pytest.raises(ValueError, match=r"a.txt' is not UTF-8: byte 3"):
        load_collection(docs)


def test_a_vocabulary_file_that_is_not_utf8_names_the_file_and_byte(tmp_path):
    from lmlab.tokenizers import read_vocab_file

    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes(b"the\ncat\n" + LATIN1)
    with pytest.raises(ValueError, match=r"vocabulary file '.*vocab.txt' is not UTF-8: byte 11 \(0xe9\)"):
        read_vocab_file(vocab)
