"""Load a model and its tokenizer from wherever a model is named.

A model spec is a directory written by lmlab (``config.json`` +
``model.safetensors`` + ``tokenizer.json``, e.g. ``runs/demo/best``) or a run
directory (its ``best`` checkpoint is used).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.models.base import LanguageModel, load_model
from lmlab.tokenizers import load_tokenizer


def resolve_checkpoint_dir(spec: str | Path) -> Path:
    path = Path(spec)
    if (path / "config.json").is_file():
        return path
    if (path / "best" / "config.json").is_file():
        return path / "best"
    raise FileNotFoundError(
        f"no lmlab model at {str(spec)!r}: expected a directory with config.json and model.safetensors "
        "(a checkpoint such as runs/demo/best, or a run directory holding best/)"
    )


def load_checkpoint(spec: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer) from a checkpoint directory; the vocabularies must agree."""
    directory = resolve_checkpoint_dir(spec)
    model: LanguageModel = load_model(directory, map_location=device)
    tok_path = directory / "tokenizer.json"
    if not tok_path.is_file():
        raise FileNotFoundError(f"no tokenizer at {tok_path}; lmlab checkpoints keep tokenizer.json beside the weights")
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.vocab_size != model.vocab_size:
        raise ValueError(
            f"the tokenizer at {tok_path} has {tokenizer.vocab_size} tokens but the model in {directory} "
            f"expects vocab_size={model.vocab_size}; they do not belong together"
        )
    model.eval()
    return model, tokenizer
