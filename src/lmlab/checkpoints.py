"""Load a model and its tokenizer from wherever a model is named.

A model spec is one of:

- a directory written by lmlab (``config.json`` + ``model.safetensors`` +
  ``tokenizer.json``, e.g. ``runs/demo/best``),
- a run directory (its ``best`` checkpoint is used),
- ``gguf:<file>``: a Llama-architecture GGUF file, read into lmlab's
  Transformer (Q4_1 matrices stay 4-bit; :mod:`lmlab.gguf_file`),
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
GGUF_PREFIX = "gguf:"


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


def add_precision_arguments(p) -> None:
    """``--dtype``, ``--quantize`` and ``--quantize-output`` for a command that loads a model for inference."""
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="run the model in this float dtype (default: float32; the float32 path is exact)")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantization of the linear layers at load (int8 per row, int4 groups of 32)")
    p.add_argument("--quantize-output", choices=["int8", "int8-dynamic"], default=None,
                   help="also the output layer (hidden -> logits) in 8 bits per row; int8-dynamic: with int8 "
                        "activations too, each row quantized on its own (faster, less exact). Needs a quantized "
                        "model: --quantize, a quantized checkpoint or a GGUF file")


def load_checkpoint(spec: str | Path, device: str | torch.device = "cpu", *, trust_remote_code: bool = False,
                    dtype: str | torch.dtype | None = None, quantize: str | int | None = None,
                    quantize_output: str | None = None):
    """(model, tokenizer) from a checkpoint directory, ``gguf:<file>`` or ``hf:<path>``; the vocabularies must agree.

    ``trust_remote_code`` applies to ``hf:`` directories only: an lmlab checkpoint never runs
    code from its directory (a tokenizer file there with an ``auto_map`` is refused).
    ``quantize`` ('int8' | 'int4') and ``dtype`` ('float32' | 'bfloat16' | 'float16') set the
    inference precision (:func:`lmlab.quantize.prepare_model`); ``quantize_output`` ('int8' |
    'int8-dynamic') quantizes the output layer too (:func:`lmlab.quantize.quantize_output`). None keeps
    the model as saved."""
    model, tokenizer = _load_checkpoint(spec, device, trust_remote_code)
    if dtype is not None or quantize is not None or quantize_output is not None:
        from lmlab.quantize import prepare_model

        prepare_model(model, dtype=dtype, quantize=quantize, output=quantize_output)
    return model, tokenizer


def _load_checkpoint(spec: str | Path, device: str | torch.device, trust_remote_code: bool):
    if isinstance(spec, str) and spec.startswith(GGUF_PREFIX):
        from lmlab.gguf_file import load_gguf

        if not spec[len(GGUF_PREFIX):]:
            raise ValueError("the model spec 'gguf:' names no file; accepted: 'gguf:/path/to/model.gguf'")
        model, tokenizer = load_gguf(spec[len(GGUF_PREFIX):], device=device)
        return model.eval(), tokenizer
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


def write_quantized(spec: str | Path, out_dir: str | Path, bits: int, group_size: int | None = None) -> Path:
    """Quantize the model named by ``spec`` (:func:`lmlab.quantize.quantize_model`) and write it,
    with its tokenizer files, as a new checkpoint directory ``out_dir`` (complete or not at all)."""
    import shutil

    from lmlab.models.base import save_model, staged_directory
    from lmlab.quantize import quantize_model

    if isinstance(spec, str) and spec.startswith(HF_PREFIX):
        raise ValueError(f"{spec!r} is a Hugging Face model; convert a GPT-2 or Llama directory into an lmlab "
                         "checkpoint first (lmlab.hf.convert_hf_dir), then quantize that, or quantize at load "
                         "with --quantize")
    from_gguf = isinstance(spec, str) and spec.startswith(GGUF_PREFIX)
    if from_gguf:  # from the file's weights de-quantized, so that every layer gets the scheme asked for
        from lmlab.gguf_file import load_gguf

        model, tokenizer = load_gguf(spec[len(GGUF_PREFIX):], keep_quantized=False)
    else:
        model, tokenizer = load_checkpoint(spec)
    quantize_model(model, bits, group_size)
    out = Path(out_dir)
    source = None if from_gguf else resolve_checkpoint_dir(spec)
    with staged_directory(out) as tmp:
        save_model(model, tmp)
        if source is None:  # a GGUF file: its tokenizer, in Hugging Face's files
            tokenizer.hf.save_pretrained(str(tmp))
        else:
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
                if (source / name).is_file():
                    shutil.copy2(source / name, tmp / name)
    return out
