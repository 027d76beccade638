"""The one interface every lmlab model answers.

    logits, state = model(ids, state=None)    # ids: (B, T) int64 -> logits: (B, T, V)

``state=None`` starts at the beginning of the sequence; passing the returned
state continues it. A state can be re-indexed along the batch with
``state.select(index)`` so that beam search can reorder and prune hypotheses.

Families register a config dataclass and a model class with ``register``;
``build_model`` makes a model from a config and ``save_model``/``load_model``
move it to and from a directory (``config.json`` + ``model.safetensors``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn


@dataclass
class State:
    """Per-row memory of a model; every tensor has the batch on dim 0.

    ``length`` is the number of tokens consumed so far (the same for all rows).
    Families put what they need in ``tensors``: a KV cache, hidden vectors,
    the last n-1 tokens, a running sum and count.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    length: int = 0

    def select(self, index: torch.Tensor) -> "State":
        """Rows ``index`` (a (B',) int64 tensor) of every tensor, in that order."""
        return State({k: v.index_select(0, index) for k, v in self.tensors.items()}, self.length)

    def clone(self) -> "State":
        """An independent copy. Models may update a state's buffers in place
        (the KV cache does), so clone a state before branching from it twice."""
        return State({k: v.clone() for k, v in self.tensors.items()}, self.length)

    @property
    def batch_size(self) -> int:
        for v in self.tensors.values():
            return v.shape[0]
        return 0


class LanguageModel(nn.Module):
    """Base class of lmlab models: ``forward(ids, state) -> (logits, state)``.

    Subclasses set ``config`` (a registered dataclass) and implement ``forward``.
    ``max_context`` is the most tokens a state can hold (None: unbounded).
    """

    config: Any

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_context(self) -> int | None:
        return None

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    def next_token_logits(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Like ``forward`` but only the logits after the last token: (B, V). Generation
        reads nothing else, so a family may skip its output layer at the other positions."""
        logits, state = self(ids, state)
        return logits[:, -1], state

    def token_logprobs(self, ids: torch.Tensor, state: State | None = None) -> torch.Tensor:
        """(B, T-1) natural-log p(ids[:, t+1] | ids[:, :t+1], state), the log-probabilities
        scoring reads. Default: log_softmax of ``forward``; a family whose scores are
        exact log-probabilities already (n-grams) returns them without the (B, T, V) logits."""
        logits, _ = self(ids[:, :-1], state)
        logp = torch.log_softmax(logits.float(), dim=-1)
        return logp.gather(-1, ids[:, 1:, None].to(logp.device)).squeeze(-1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def require_causal(model: Any, purpose: str) -> None:
    """Refuse a model that does not predict the next token (a masked LM) for ``purpose``."""
    if getattr(model, "objective", "causal") != "causal":
        raise ValueError(
            f"{purpose} needs a model that predicts the next token; the {getattr(model, 'family', type(model).__name__)} "
            "model fills masks (use `lmlab fill` or lmlab.fill, and pseudo_log_likelihood to score a text)"
        )


# ---------------------------------------------------------------- registry

_REGISTRY: dict[str, tuple[type, type]] = {}


def register(family: str, config_cls: type) -> Callable[[type], type]:
    """Class decorator: ``@register("transformer", TransformerConfig)``."""

    def wrap(model_cls: type) -> type:
        _REGISTRY[family] = (config_cls, model_cls)
        model_cls.family = family
        return model_cls

    return wrap


def families() -> list[str]:
    _import_families()
    return sorted(_REGISTRY)


def _import_families() -> None:
    # Importing the package registers every family shipped with lmlab.
    import lmlab.models  # noqa: F401


def config_from_dict(family: str, values: dict) -> Any:
    _import_families()
    if family not in _REGISTRY:
        raise ValueError(f"unknown model family {family!r}; known families: {', '.join(sorted(_REGISTRY))}")
    config_cls = _REGISTRY[family][0]
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {family} config field(s) {unknown}; accepted: {sorted(names)}")
    return config_cls(**values)


def build_model(family: str, config: Any) -> LanguageModel:
    """A fresh model of ``family`` from ``config`` (a dataclass or a dict)."""
    if isinstance(config, dict):
        config = config_from_dict(family, config)
    _import_families()
    return _REGISTRY[family][1](config)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def staged_directory(directory: str | Path, replace: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name beside ``directory``, then rename it into place
    (replacing an existing one only with ``replace=True``): it appears complete or not at all."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        yield tmp
        if directory.exists():
            if not replace:
                raise FileExistsError(f"{str(directory)!r} already exists; choose a new directory")
            old = directory.with_name(f".{directory.name}.old")
            if old.exists():
                shutil.rmtree(old)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(model: LanguageModel, directory: str | Path) -> None:
    """Write ``config.json`` and ``model.safetensors`` (weights) into ``directory``."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"family": model.family, **dataclasses.asdict(model.config)}
    if getattr(model, "quantization", None):  # lmlab.quantize: integer codes + scales in the weights
        config["quantization"] = model.quantization
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / "model.safetensors", save(_untie(tensors)))
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2) + "\n")


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage; tied weights are saved as copies."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in tensors.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.setdefault(ptr, k)
    return out


def read_config(directory: str | Path) -> tuple[str, dict]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no model config at {path}; a model directory holds config.json and model.safetensors")
    values = json.loads(path.read_text())
    if "family" not in values:
        raise ValueError(f"{path} has no 'family' field; known families: {', '.join(families())}")
    family = values.pop("family")
    return family, values


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> LanguageModel:
    """Load a model saved by ``save_model``; shapes are checked against the config."""
    from safetensors.torch import load_file

    directory = Path(directory)
    family, values = read_config(directory)
    quantization = values.pop("quantization", None)
    model = build_model(family, values)
    if quantization is not None:
        from lmlab.quantize import apply_quantization_layout

        apply_quantization_layout(model, quantization)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no weights at {weights}")
    tensors = load_file(str(weights), device=str(map_location))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"weights in {weights} do not match the {family} config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"weight {name!r} in {weights} has shape {tuple(t.shape)}, "
                f"the config in {directory / 'config.json'} expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(tensors)
    return model.to(map_location)
