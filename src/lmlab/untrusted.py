"""Checks on model files lmlab did not write, made before anything is allocated or run.

- :func:`refuse_remote_code`: a Hugging Face directory whose ``config.json`` or
  ``tokenizer_config.json`` has an ``auto_map`` needs code from the directory;
  lmlab runs none unless the caller says ``trust_remote_code=True``.
- :func:`refuse_pickled_weights`: ``pytorch_model.bin`` / ``*.pt`` files are
  pickles; lmlab reads weights from safetensors only.
- :func:`read_safetensors_header`: names, dtypes and shapes of a
  ``.safetensors`` file from its JSON header, with a one-line error for a
  corrupt or truncated file.
- :func:`check_weights_fit`: the tensors a config implies (built on the meta
  device, no memory) against those the weights file holds, name by name.
- :func:`load_safetensors`: the tensors, after the header checks.

Every error is a ``ValueError`` (``FileNotFoundError`` for a missing file)
naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch

__all__ = [
    "REMOTE_CODE_FILES",
    "refuse_remote_code",
    "refuse_pickled_weights",
    "read_safetensors_header",
    "check_weights_fit",
    "load_safetensors",
]

#: The Hugging Face files whose ``auto_map`` points to code in the directory.
REMOTE_CODE_FILES: tuple[str, ...] = ("config.json", "tokenizer_config.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                            "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def refuse_remote_code(directory: str | os.PathLike[str], trust_remote_code: bool = False) -> None:
    """Refuse ``directory`` when a file in :data:`REMOTE_CODE_FILES` has an ``auto_map``
    (code shipped with the model), unless ``trust_remote_code``."""
    if trust_remote_code:
        return
    directory = Path(directory)
    for name in REMOTE_CODE_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            values = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a readable JSON file: {e}") from None
        if isinstance(values, dict) and values.get("auto_map"):
            raise ValueError(
                f"{path} has an auto_map: the model needs Python code from {str(directory)!r}, which lmlab does not "
                "run by default; accepted: a directory without auto_map, or pass --trust-remote-code "
                "(trust_remote_code=True) if you trust that code"
            )


def refuse_pickled_weights(directory: str | os.PathLike[str]) -> None:
    """Refuse a directory whose weights are only pickles (``pytorch_model.bin``, ``*.pt``)."""
    directory = Path(directory)
    if any(directory.glob("*.safetensors")) or any(directory.glob("*.gguf")):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES or p.name.endswith(".bin.index.json"))
    if pickles:
        raise ValueError(
            f"{str(directory)!r} holds {', '.join(pickles[:3])} (pickled weights), which lmlab does not read: "
            "loading a pickle can run code; accepted: model.safetensors (convert the weights with safetensors' save_file)"
        )


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of a ``.safetensors`` file, read from its header alone.

    The file must hold an 8-byte little-endian header size N, N bytes of JSON, and
    the data every entry's ``data_offsets`` point into (a truncated file is refused).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    size = path.stat().st_size

    def corrupt(what: str) -> ValueError:
        return ValueError(f"{path} is not a valid safetensors file ({what}); re-save or re-download it")

    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"only {size} bytes")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise corrupt(f"header size {n} but the file has {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    body = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise corrupt(f"entry {name!r} has no dtype, shape and data_offsets") from None
        width = _SAFETENSORS_DTYPE_BYTES.get(dtype)
        numel = 1
        for d in shape:
            numel *= d
        if width is None:
            raise corrupt(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise corrupt(f"tensor {name!r} has data_offsets {[begin, end]}")
        if end - begin != numel * width:
            raise corrupt(f"tensor {name!r}: {end - begin} bytes cannot hold {dtype} of shape {shape}")
        if end > body:
            raise corrupt(f"tensor {name!r} ends at byte {end} of the data but the file holds {body}: truncated")
        out[name] = (dtype, shape)
    return out


def check_weights_fit(expected: dict[str, tuple[int, ...]], path: str | os.PathLike[str], config_path: str | os.PathLike[str]) -> None:
    """Refuse ``path`` unless it holds exactly the tensors ``expected`` ({name: shape}, what the
    config at ``config_path`` implies), each with its shape: checked before any allocation."""
    header = read_safetensors_header(path)
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"the weights in {path} do not match {config_path}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, want in expected.items():
        got = header[name][1]
        if tuple(got) != tuple(want):
            raise ValueError(f"weight {name!r} in {path} has shape {tuple(got)}, the config in {config_path} expects {tuple(want)}")


def load_safetensors(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of ``path`` after :func:`read_safetensors_header`'s checks; a read error names the file."""
    from safetensors.torch import load_file

    read_safetensors_header(path)
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own SafetensorError / OSError
        raise ValueError(f"{path} could not be read as safetensors: {e}") from None
