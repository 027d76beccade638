"""Load a model and its tokenizer from wherever a model is named.

A model spec is one of:

- a directory written by lmlab (``config.json`` + ``model.safetensors`` +
  ``tokenizer.json``, e.g. ``runs/demo/best``),
- a run directory (its ``best`` checkpoint is used),
- ``hf:<path>``: a local Hugging Face model directory (or ``.gguf`` file),
  loaded as it is with transformers and wrapped in the lmlab interface
  (:class:`lmlab.hf.HFModel`, family ``"hf"``) with its HFTokenizer.

A checkpoint converted from Hugging Face (``lmlab.hf.convert_hf_dir``) keeps the
Hugging Face tokenizer files beside the weights (``tokenizer_config.json``
next to ``tokenizer.json``); it loads as an HFTokenizer when transformers is
installed, else as a BPETokenizer with the special tokens named in
``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmlab.models.base import LanguageModel, load_model
from lmlab.tokenizers import BPETokenizer, Tokenizer, load_tokenizer

HF_PREFIX = "hf:"


def resolve_checkpoint_dir(spec: str | Path) -> Path:
    path = Path(spec)
    if (path / "config.json").is_file():
        return path
    if (path / "best" / "config.json").is_file():
        return path / "best"
    raise FileNotFoundError(
        f"no lmlab model at {str(spec)!r}: expected a directory with config.json and model.safetensors "
        "(a checkpoint such as runs/demo/best, or a run directory holding best/), "
        "or 'hf:<dir>' for a Hugging Face model directory"
    )


def _special_name(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<|im_end|>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_converted_tokenizer(directory: Path) -> Tokenizer:
    """The Hugging Face tokenizer files kept by ``convert_hf_dir``."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        try:
            cfg = json.loads((directory / "tokenizer_config.json").read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{directory / 'tokenizer_config.json'} is not a readable JSON file: {e}") from None
        names = {f"{role}_token": _special_name(cfg.get(f"{role}_token")) for role in ("pad", "bos", "eos", "unk")}
        return BPETokenizer.from_file(directory / "tokenizer.json", **{k: v for k, v in names.items() if v})
    return load_tokenizer(directory)


TRUST_REMOTE_CODE_HELP = ("let an hf:<dir> model run the Python code its directory ships (an auto_map in "
                          "config.json or tokenizer_config.json); off by default, and never for lmlab checkpoints")


def load_checkpoint(spec: str | Path, device: str | torch.device = "cpu", *, trust_remote_code: bool = False):
    """(model, tokenizer) from a checkpoint directory or ``hf:<path>``; the vocabularies must agree.

    ``trust_remote_code`` applies to ``hf:`` directories only: an lmlab checkpoint never runs
    code from its directory (a tokenizer file there with an ``auto_map`` is refused)."""
    if isinstance(spec, str) and spec.startswith(HF_PREFIX):
        from lmlab.hf import load_hf

        path = spec[len(HF_PREFIX):]
        if not path:
            raise ValueError("the model spec 'hf:' names no path; accepted: 'hf:/path/to/hf-model-dir'")
        model, tokenizer = load_hf(path, device=device, trust_remote_code=trust_remote_code)
        return model.eval(), tokenizer
    directory = resolve_checkpoint_dir(spec)
    model: LanguageModel = load_model(directory, map_location=device)
    tok_path = directory / "tokenizer.json"
    if not tok_path.is_file():
        raise FileNotFoundError(f"no tokenizer at {tok_path}; lmlab checkpoints keep tokenizer.json beside the weights")
    converted = (directory / "tokenizer_config.json").is_file()
    tokenizer = _load_converted_tokenizer(directory) if converted else load_tokenizer(tok_path)
    # A Hugging Face vocabulary may be padded past the tokenizer (e.g. to a multiple of 64).
    too_big = tokenizer.vocab_size > model.vocab_size
    if too_big or (tokenizer.vocab_size != model.vocab_size and not converted):
        raise ValueError(
            f"the tokenizer at {tok_path} has {tokenizer.vocab_size} tokens but the model in {directory} "
            f"expects vocab_size={model.vocab_size}; they do not belong together"
        )
    model.eval()
    return model, tokenizer
