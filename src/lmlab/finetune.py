"""Fine-tuning: LoRA adapters (through PEFT), continued LM training, sequence classification.

LoRA (Hu et al. 2021) freezes a weight ``W`` (out, in) and learns a low-rank update
``W + (alpha / r) * B @ A`` with ``A`` (r, in) random and ``B`` (out, r) zero at the
start, so the adapted model computes exactly the base model's function before
training. The adapters are PEFT's own layers, and they are saved in PEFT's format::

    model, tok = load_checkpoint("runs/demo/best")            # or "hf:path/to/hf-dir"
    model = add_lora(model, LoraSettings(r=8, alpha=16))      # base frozen, adapters trainable
    trainable, total = count_parameters(model)
    logits, state = model(ids)                                # still the lmlab interface
    save_adapter(model, "adapters/shakespeare", tok)          # adapter_config.json, adapter_model.safetensors,
                                                              # lmlab_base.json (which base it belongs to)
    model = load_adapter(base, "adapters/shakespeare")        # refuses a different base model
    merged = merge_lora(model)                                # W + (alpha / r) B A: a plain model again

What ``add_lora`` returns: for an lmlab model, a ``peft.PeftModel`` around it (calls,
``vocab_size``, ``hidden_states`` ... go through to the model); for a Hugging Face
model (``hf:<dir>``, an :class:`lmlab.hf.HFModel`), an ``HFModel`` around a
``PeftModelForCausalLM`` of the raw Hugging Face model, so a saved adapter is a plain
PEFT adapter of that model (``PeftModel.from_pretrained(AutoModelForCausalLM...)``
reads it). The base model is modified in place (its linear layers become LoRA layers).

Two tasks:

- ``finetune_lm``: continued next-token training on a text corpus with lmlab's
  :class:`~lmlab.train.Trainer` (:class:`FinetuneTrainer` writes checkpoints that fit
  a LoRA or Hugging Face model: an adapter directory or a Hugging Face directory).
- sequence classification: :class:`SequenceClassifier` pools the base model's final
  hidden states (the last real token, or the mean over real tokens; rows are padded on
  the right, so a causal model never sees the padding) into a linear head, trained in
  one of three modes: ``lora`` (adapters + head), ``full`` (everything), ``probe``
  (the head alone, on features computed once).

``lmlab finetune`` is the command line (:func:`add_finetune_arguments`, :func:`run_finetune`).
PEFT and transformers are optional dependencies (``pip install 'lmlab[hf]'``); they are
imported only when a function here needs them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.checkpoints import TRUST_REMOTE_CODE_HELP
from lmlab.data import read_jsonl, read_text
from lmlab.models.base import atomic_write_bytes, atomic_write_text, save_model, staged_directory
from lmlab.train import TrainConfig, Trainer, learning_rate, make_optimizer, objective_loss, resolve_device

__all__ = [
    "LoraSettings",
    "default_target_modules",
    "add_lora",
    "count_parameters",
    "merge_lora",
    "unmerge_lora",
    "save_adapter",
    "load_adapter",
    "check_adapter_dir",
    "base_identity",
    "save_finetuned",
    "FinetuneTrainer",
    "finetune_lm",
    "ClassificationData",
    "read_labelled",
    "encode_texts",
    "cls_id",
    "default_pooling",
    "pad_batch",
    "hidden_states",
    "pool",
    "SequenceClassifier",
    "build_classifier",
    "ClassifyConfig",
    "train_classifier",
    "predict_proba",
    "predict",
    "save_classifier",
    "load_classifier",
    "add_finetune_arguments",
    "run_finetune",
]

BIASES = ("none", "all", "lora_only")
POOLINGS = ("last", "mean", "first")
MODES = ("lora", "full", "probe")
TASKS = ("lm", "classify")
TRUNCATION_SIDES = ("right", "left")

BASE_FILE = "lmlab_base.json"       # which base model an adapter belongs to
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CLASSIFIER_FILE = "classifier.json"
HEAD_FILE = "head.safetensors"

# Default LoRA targets where lmlab has an opinion; other Hugging Face model types use PEFT's own table.
_LMLAB_TARGETS = ["q", "k", "v", "o"]
_HF_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "gpt2": ["c_attn", "c_proj"]}
# Config fields that decide the shapes an adapter was trained for.
_HF_ESSENTIALS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "intermediate_size", "head_dim", "n_embd", "n_layer", "n_head", "n_inner", "tie_word_embeddings")
_LMLAB_IGNORED = ("dropout", "embed_dropout")


def _peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("LoRA needs the optional 'peft' package: pip install 'lmlab[hf]'") from e
    return peft


# ================================================================ model kinds


def _peft_of(model: Any):
    """The PeftModel behind ``model`` (a PeftModel, or an HFModel around one), else None."""
    if "peft" not in sys.modules:  # nothing can be a PeftModel before peft is imported
        return None
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model
    inner = getattr(model, "hf", None)
    return inner if isinstance(inner, PeftModel) else None


def _is_hf_module(module: Any) -> bool:
    if "transformers" not in sys.modules:  # nothing can be a Hugging Face model before transformers is imported
        return False
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def _as_lmlab(model: Any) -> Any:
    """A raw Hugging Face model becomes an HFModel; anything else is returned as it is."""
    if _is_hf_module(model):
        from lmlab.hf import HFModel

        return HFModel(model)
    return model


def _base_module(model: Any) -> nn.Module:
    """The module that holds the base weights (LoRA layers inside, if any): an lmlab
    model, or the raw Hugging Face model of an HFModel."""
    pm = _peft_of(model)
    if pm is not None:
        return pm.get_base_model()
    from lmlab.hf import HFModel

    return model.hf if isinstance(model, HFModel) else model


def _wrap_hf(hf_module: nn.Module, source: str | None):
    """An HFModel around ``hf_module`` (a raw model or a PeftModel of one)."""
    from lmlab.hf import HFModel

    return HFModel(hf_module, source=source)


def _describe(model: Any) -> str:
    base = _base_module(model)
    if _is_hf_module(base):
        return f"a Hugging Face {getattr(base.config, 'model_type', None)!r} model"
    return f"an lmlab {getattr(base, 'family', type(base).__name__)!r} model"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# ================================================================ LoRA settings


def _adaptable(module: nn.Module) -> bool:
    """A layer PEFT's LoRA can adapt: it has a weight matrix (Linear, GPT-2's Conv1D, Embedding)."""
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.ndim == 2 and not any(True for _ in module.children())


def _short_name(name: str) -> str:
    """'blocks.0.attn.q' -> 'q'; a numbered layer keeps its parent: 'hidden.0' -> 'hidden.0'."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def _layer_names(base: nn.Module) -> list[str]:
    """The distinct short names of the layers LoRA can adapt, e.g. ['fc', 'k', 'lm_head', 'o', ...]."""
    return sorted({_short_name(name) for name, m in base.named_modules() if name and _adaptable(m)})


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the full name, or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def _output_layer_names(base: nn.Module) -> set[str]:
    out = {"lm_head"}
    if hasattr(base, "get_output_embeddings"):
        head = base.get_output_embeddings()
        out |= {_short_name(name) for name, m in base.named_modules() if m is head and name}
    return out


def default_target_modules(model: Any) -> list[str]:
    """LoRA's default target layers for ``model``: q, k, v, o for lmlab's transformer and
    masked-transformer;
    q_proj, k_proj, v_proj, o_proj for Llama; c_attn, c_proj for GPT-2 (c_proj is both the
    attention output and the MLP output there); PEFT's own default for other Hugging Face
    model types."""
    base = _base_module(_as_lmlab(model))
    if _is_hf_module(base):
        model_type = getattr(base.config, "model_type", None)
        if model_type in _HF_TARGETS:
            return list(_HF_TARGETS[model_type])
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

        if model_type in peft_defaults:
            return list(peft_defaults[model_type])
        raise ValueError(
            f"no default LoRA target modules for Hugging Face model_type {model_type!r}; pass target_modules "
            f"(--target-modules) from its layers: {', '.join(_layer_names(base))}"
        )
    if getattr(base, "family", None) in ("transformer", "masked-transformer"):
        return list(_LMLAB_TARGETS)
    raise ValueError(
        f"no default LoRA target modules for lmlab family {getattr(base, 'family', type(base).__name__)!r}; "
        f"pass target_modules (--target-modules) from its layers: {', '.join(_layer_names(base))}"
    )


@dataclass
class LoraSettings:
    """LoRA hyperparameters. ``target_modules``: layer names (a last name such as ``"q"`` or
    a dotted suffix such as ``"attn.q"``), ``"all-linear"`` (every linear layer but the
    output layer), or None for :func:`default_target_modules`. ``bias``: which biases train
    too ("none", "all", "lora_only")."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | str | None = None
    bias: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r={self.r!r} must be an integer >= 1 (typical: 4 to 64)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoRA alpha={self.alpha!r} must be a number > 0 (typical: r or 2 * r)")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout={self.dropout!r} must be a number in [0, 1)")
        if self.bias not in BIASES:
            raise ValueError(f"LoRA bias={self.bias!r} is not supported; accepted: {', '.join(map(repr, BIASES))}")
        t = self.target_modules
        if isinstance(t, str) and t != "all-linear":
            t = self.target_modules = [t]
        if t is not None and not isinstance(t, str):
            t = self.target_modules = list(t)
            if not t or not all(isinstance(x, str) and x.strip() for x in t):
                raise ValueError(
                    f"target_modules={t!r} must be a non-empty list of layer names (e.g. ['q', 'v']), "
                    "'all-linear', or None for the defaults"
                )

    def resolve_targets(self, model: Any) -> list[str]:
        """The target names for ``model``, each checked to name at least one adaptable layer."""
        base = _base_module(_as_lmlab(model))
        modules = dict(base.named_modules())
        if self.target_modules is None:
            targets = default_target_modules(model)
        elif self.target_modules == "all-linear":
            outputs = _output_layer_names(base)
            targets = sorted({_short_name(n) for n, m in modules.items()
                              if n and _adaptable(m) and not isinstance(m, nn.Embedding)} - outputs)
        else:
            targets = list(self.target_modules)
        names = _layer_names(base)
        for t in targets:
            hits = [n for n in modules if n and _matches(n, t)]
            if not hits:
                raise ValueError(
                    f"target module {t!r} names no layer of {_describe(model)}; its layers LoRA can adapt: "
                    f"{', '.join(names)} (give a last name such as {names[0]!r} or a dotted suffix)"
                )
            wrong = [n for n in hits if not _adaptable(modules[n])]
            if wrong:
                raise ValueError(
                    f"target module {t!r} names {wrong[0]!r}, a {type(modules[wrong[0]]).__name__}; LoRA adapts "
                    f"layers with a weight matrix: {', '.join(names)}"
                )
        _check_untied(base, [n for n in modules if n and any(_matches(n, t) for t in targets)])
        return targets

    def peft_config(self, model: Any):
        """The ``peft.LoraConfig`` for ``model``."""
        peft = _peft()
        base = _base_module(_as_lmlab(model))
        targets = self.resolve_targets(model)
        conv1d = False
        if _is_hf_module(base):
            from transformers.pytorch_utils import Conv1D

            conv1d = any(isinstance(m, Conv1D) for n, m in base.named_modules() if any(_matches(n, t) for t in targets))
        return peft.LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
            bias=self.bias,
            fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores its weight as (in, out)
            task_type="CAUSAL_LM" if _is_hf_module(base) and not _bidirectional(base) else None,
        )


def _check_untied(base: nn.Module, targeted: list[str]) -> None:
    """Merging an adapter into a weight shared by two layers would change both: refuse."""
    owners: dict[int, list[str]] = {}
    for name, p in base.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name.rsplit(".", 1)[0])
    for names in owners.values():
        tied = [n for n in names if n in targeted]
        if tied and len(names) > 1:
            others = [n for n in names if n != tied[0]]
            raise ValueError(
                f"target layer {tied[0]!r} shares its weight with {others[0]!r} (tied embeddings); an adapter "
                "there would change both when merged. Choose other target modules"
            )


# ================================================================ adding, merging


def add_lora(model: Any, settings: LoraSettings | None = None):
    """``model`` with LoRA adapters on the target layers (PEFT); only the adapters train.

    ``B`` starts at zero, so the result computes exactly what ``model`` did. Returns a
    ``peft.PeftModel`` around an lmlab model, or an HFModel around a ``PeftModelForCausalLM``
    for a Hugging Face model; either answers ``logits, state = model(ids, state)``.
    ``model`` itself is modified in place.
    """
    settings = settings or LoraSettings()
    peft = _peft()
    model = _as_lmlab(model)
    if _peft_of(model) is not None:
        raise ValueError("the model already has LoRA adapters; merge them (merge_lora) or start from the plain base")
    config = settings.peft_config(model)
    from lmlab.hf import HFModel

    if isinstance(model, HFModel):
        return _wrap_hf(peft.get_peft_model(model.hf, config), model.source)
    return peft.get_peft_model(model, config)


def merge_lora(model: Any, *, unload: bool = True):
    """Fold the adapters into the base weights: ``W + (alpha / r) * B @ A``.

    ``unload=True``: return the plain base model (no LoRA layers, every parameter
    trainable again) — an lmlab model saves with ``save_model`` as a normal checkpoint.
    ``unload=False``: merge in place and keep the LoRA layers, so :func:`unmerge_lora`
    separates them again.
    """
    pm = _peft_of(model)
    if pm is None:
        raise ValueError(f"{_describe(model)} has no LoRA adapters to merge; add_lora or load_adapter first")
    if not unload:
        pm.merge_adapter()
        return model
    merged = pm.merge_and_unload()
    merged.requires_grad_(True)
    from lmlab.hf import HFModel

    return _wrap_hf(merged, model.source) if isinstance(model, HFModel) else merged


def unmerge_lora(model: Any):
    """Undo ``merge_lora(model, unload=False)``: base weights back, adapters separate again."""
    pm = _peft_of(model)
    if pm is None:
        raise ValueError(f"{_describe(model)} has no LoRA adapters to unmerge")
    pm.unmerge_adapter()
    return model


# ================================================================ saving and loading adapters


def _fingerprint(base: nn.Module) -> str:
    """sha256 of some rows of the first weight matrix (the embedding): tells two bases with
    the same shapes but different weights apart, cheaply."""
    for name, p in base.named_parameters():
        if p.ndim == 2 and "lora_" not in name:
            rows = p.detach()[:: max(1, p.shape[0] // 64)].float().cpu().contiguous()
            return hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16]
    return ""


def base_identity(model: Any) -> dict:
    """What an adapter records about its base: kind, family or model_type, the config
    fields that fix weight shapes, and a fingerprint of the embedding weights."""
    base = _base_module(_as_lmlab(model))
    if _is_hf_module(base):
        cfg = base.config.to_dict()
        return {"kind": "hf", "model_type": cfg.get("model_type"),
                "config": {k: cfg[k] for k in _HF_ESSENTIALS if k in cfg}, "fingerprint": _fingerprint(base)}
    config = {k: v for k, v in dataclasses.asdict(base.config).items() if k not in _LMLAB_IGNORED}
    return {"kind": "lmlab", "family": getattr(base, "family", None), "config": config, "fingerprint": _fingerprint(base)}


def _name_of(identity: dict) -> str:
    if identity.get("kind") == "hf":
        return f"a Hugging Face {identity.get('model_type')!r} model"
    return f"an lmlab {identity.get('family')!r} model"


def _check_same_base(recorded: dict, actual: dict, directory: Path) -> None:
    kind = ("kind", "model_type") if recorded.get("kind") == "hf" else ("kind", "family")
    if any(recorded.get(k) != actual.get(k) for k in kind):
        raise ValueError(
            f"the adapter at {str(directory)!r} was trained on {_name_of(recorded)}, but the model given is "
            f"{_name_of(actual)}; load it onto the base model it was trained on"
        )
    a, b = recorded.get("config", {}), actual.get("config", {})
    diffs = [f"{k}: adapter {a.get(k)!r}, model {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diffs:
        raise ValueError(
            f"the adapter at {str(directory)!r} was trained on a different base model ({_name_of(recorded)} with "
            f"another config): {'; '.join(diffs[:6])}. Load it onto the base model it was trained on"
        )
    if recorded.get("fingerprint") and recorded.get("fingerprint") != actual.get("fingerprint"):
        warnings.warn(
            f"the adapter at {str(directory)!r} was trained on a base model with the same shapes but different "
            "weights; its outputs will not be the ones it was trained for",
            stacklevel=3,
        )


def check_adapter_dir(directory: str | Path) -> tuple[dict, dict | None]:
    """(adapter config, base record or None) of an adapter directory; clear errors otherwise."""
    directory = Path(directory)
    what = f"an adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (written by save_adapter or PEFT)"
    if not directory.is_dir():
        raise FileNotFoundError(f"no adapter directory at {str(directory)!r}; {what}")
    found = sorted(p.name for p in directory.iterdir())[:10]
    if not (directory / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {str(directory)!r}; {what}; found: {found}")
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{directory / ADAPTER_CONFIG} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{directory / ADAPTER_CONFIG} describes a {got!r} adapter; accepted: 'LORA'")
    if not (directory / ADAPTER_WEIGHTS).is_file():
        if (directory / "adapter_model.bin").is_file():
            raise ValueError(
                f"{str(directory)!r} holds adapter_model.bin (a pickle), which lmlab does not read; "
                f"re-save the adapter as safetensors ({ADAPTER_WEIGHTS})"
            )
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in {str(directory)!r}; {what}; found: {found}")
    record = None
    if (directory / BASE_FILE).is_file():
        try:
            record = json.loads((directory / BASE_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{directory / BASE_FILE} is not valid JSON: {e}") from None
        if not isinstance(record, dict) or record.get("kind") not in ("lmlab", "hf"):
            raise ValueError(f"{directory / BASE_FILE} must be an object with kind 'lmlab' or 'hf'")
    return config, record


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    from lmlab.tokenizers import HFTokenizer

    if isinstance(tokenizer, HFTokenizer):
        tokenizer.hf.save_pretrained(str(directory))  # tokenizer.json + tokenizer_config.json, self-contained
    else:
        tokenizer.save(directory / "tokenizer.json")


def _write_adapter(model: Any, directory: Path, tokenizer: Any = None) -> None:
    pm = _peft_of(model)
    pm.save_pretrained(str(directory), safe_serialization=True)
    atomic_write_text(directory / BASE_FILE, json.dumps(base_identity(model), indent=2) + "\n")
    if tokenizer is not None:
        _save_tokenizer(tokenizer, directory)


def save_adapter(model: Any, directory: str | Path, tokenizer: Any = None, *, overwrite: bool = False) -> Path:
    """Write the adapters of ``model`` in PEFT's format (``adapter_config.json``,
    ``adapter_model.safetensors``) plus ``lmlab_base.json`` (which base they belong to)
    and, if given, the tokenizer. The directory appears complete or not at all."""
    if _peft_of(model) is None:
        raise ValueError(f"{_describe(model)} has no LoRA adapters to save; save a plain model with save_finetuned")
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"adapter directory {str(directory)!r} already exists; pass overwrite=True or a new path")
    with staged_directory(directory, replace=overwrite) as tmp:
        _write_adapter(model, tmp, tokenizer)
    return directory


def load_adapter(model: Any, directory: str | Path, *, trainable: bool = False):
    """``model`` (the plain base) with the adapters saved in ``directory``.

    The base is checked against ``lmlab_base.json``: a different family, model type or
    shape-deciding config is an error; the same shapes with different weights, a warning.
    ``trainable=True`` lets the adapters train further. Returns what :func:`add_lora` returns.
    """
    peft = _peft()
    directory = Path(directory)
    _, record = check_adapter_dir(directory)
    model = _as_lmlab(model)
    if _peft_of(model) is not None:
        raise ValueError("the model already has LoRA adapters; load an adapter onto the plain base model")
    if record is not None:
        _check_same_base(record, base_identity(model), directory)
    else:
        warnings.warn(f"{str(directory)!r} has no {BASE_FILE}; the base model cannot be checked", stacklevel=2)
    from lmlab.hf import HFModel

    target = model.hf if isinstance(model, HFModel) else model
    try:
        pm = peft.PeftModel.from_pretrained(target, str(directory), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"the adapter at {str(directory)!r} does not fit {_describe(model)}: {e}") from None
    return _wrap_hf(pm, model.source) if isinstance(model, HFModel) else pm


def save_finetuned(model: Any, directory: str | Path, tokenizer: Any = None, *, overwrite: bool = False) -> Path:
    """Save whatever was fine-tuned: an adapter directory for a LoRA model, a Hugging Face
    directory (``load_checkpoint('hf:DIR')``) for a Hugging Face model, an lmlab checkpoint
    (``load_checkpoint(DIR)``) otherwise. Written under a temporary name, then renamed."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{str(directory)!r} already exists; pass overwrite=True or a new path")
    with staged_directory(directory, replace=overwrite) as tmp:
        _write_finetuned(model, tmp, tokenizer)
    return directory


def _write_finetuned(model: Any, directory: Path, tokenizer: Any) -> None:
    if _peft_of(model) is not None:
        _write_adapter(model, directory, tokenizer)
        return
    base = _base_module(model)
    if _is_hf_module(base):
        base.save_pretrained(str(directory))
    else:
        save_model(base, directory)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, directory)


# ================================================================ task (a): continued LM training


class FinetuneTrainer(Trainer):
    """lmlab's Trainer with checkpoints that fit the model being fine-tuned.

    ``best/`` and ``last/`` hold an adapter directory (LoRA), a Hugging Face directory
    (a Hugging Face model), or a normal lmlab checkpoint with optimizer state (a plain
    lmlab model, which can also be resumed). The loop itself is the Trainer's.
    """

    def __init__(self, model: Any, *args: Any, resume: bool = False, **kwargs: Any) -> None:
        if resume and not self._plain(model):
            raise ValueError(
                "resuming is supported for plain lmlab models only; a LoRA or Hugging Face fine-tune "
                "keeps no optimizer state: start a new run directory"
            )
        super().__init__(model, *args, resume=resume, **kwargs)

    @staticmethod
    def _plain(model: Any) -> bool:
        return _peft_of(model) is None and not _is_hf_module(_base_module(model))

    def save_checkpoint(self, directory: Path) -> None:
        if self._plain(self.model):
            return super().save_checkpoint(directory)
        with staged_directory(directory, replace=True) as tmp:
            _write_finetuned(self.model, tmp, self.tokenizer)
            state = {"step": self.step, "best_val": self.best_val, "best_step": self.best_step,
                     "elapsed": self.elapsed, "train_config": dataclasses.asdict(self.config)}
            atomic_write_text(tmp / "trainer.json", json.dumps(state, indent=2) + "\n")


def finetune_lm(
    model: Any,
    tokenizer: Any,
    text: str,
    run_dir: str | Path,
    config: TrainConfig,
    *,
    lora: LoraSettings | None = None,
    block_size: int = 128,
    val_fraction: float = 0.1,
    merge: bool = False,
) -> tuple[Any, dict]:
    """Continue training ``model`` on ``text`` (random windows of ``block_size`` tokens),
    with LoRA adapters when ``lora`` is given, else every weight. Checkpoints go to
    ``run_dir`` (see :class:`FinetuneTrainer`); ``merge=True`` also writes the merged
    final model to ``run_dir/merged``. Returns (the trained model, the summary)."""
    import numpy as np

    from lmlab.data import StreamBatches, split_by_position

    if merge and lora is None:
        raise ValueError("merge=True needs LoRA adapters (lora=LoraSettings(...)); a full fine-tune has nothing to merge")
    if model.max_context is not None and block_size > model.max_context:
        raise ValueError(f"block_size={block_size} exceeds the model's context of {model.max_context} tokens")
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    train_ids, val_ids = split_by_position(ids, val_fraction)
    for split, part in (("training", train_ids), ("validation", val_ids)):
        if len(part) < block_size + 1:
            raise ValueError(
                f"the {split} part of the corpus has {len(part)} tokens, fewer than block_size + 1 = "
                f"{block_size + 1}; use a longer corpus or a smaller block_size"
            )
    train = StreamBatches(train_ids, block_size, config.batch_size)
    val = StreamBatches(val_ids, block_size, config.batch_size)
    loss_fn = objective_loss(_base_module(model))
    if lora is not None:
        model = add_lora(model, lora)
    else:
        model.requires_grad_(True)
    trainer = FinetuneTrainer(model, train, val, config, run_dir, tokenizer=tokenizer, loss_fn=loss_fn)
    summary = trainer.fit()
    trainable, total = count_parameters(trainer.model)
    summary.update(trainable_params=trainable, total_params=total, lora=lora is not None)
    if merge:
        merged = merge_lora(trainer.model)
        save_finetuned(merged, Path(run_dir) / "merged", tokenizer)
        return merged, summary
    return trainer.model, summary


# ================================================================ task (b): labelled texts


@dataclass
class ClassificationData:
    """Texts with class ids; ``labels[i]`` is the name of class ``i`` (sorted names)."""

    labels: list[str]
    train_texts: list[str]
    train_labels: list[int]
    val_texts: list[str]
    val_labels: list[int]


_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f", ""}


def _flag(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{where}: is_valid={value!r} is not a boolean; accepted: true/false, 1/0, yes/no")


def _read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """(rows, column names) of a CSV/TSV file or JSON lines."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        text = read_text(path, "labelled-text file")
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        rows = list(reader)
        return rows, list(reader.fieldnames or [])
    if suffix in (".jsonl", ".json"):
        rows = [obj for _, obj in read_jsonl(path, "an object with 'text' and 'label'")]
        columns: list[str] = []
        for obj in rows:
            columns += [k for k in obj if k not in columns]
        return rows, columns
    raise ValueError(f"labelled file {str(path)!r} has suffix {suffix!r}; accepted: .csv, .tsv, .jsonl (or .json lines)")


def read_labelled(path: str | Path, val_fraction: float = 0.2, seed: int = 0) -> ClassificationData:
    """Texts and string labels from a CSV/TSV or JSONL file with ``text`` and ``label``
    columns. Labels map to ids in sorted order. An ``is_valid`` column chooses the
    validation rows; without one, a seeded random ``val_fraction`` of the rows is held out."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no labelled file at {str(path)!r}; give a CSV or JSONL file with text,label columns")
    rows, columns = _read_rows(path)
    missing = [c for c in ("text", "label") if c not in columns]
    if missing:
        raise ValueError(
            f"{str(path)!r} has no {' or '.join(map(repr, missing))} column; it needs 'text' and 'label' "
            f"(and optionally 'is_valid'); found columns: {columns}"
        )
    if not rows:
        raise ValueError(f"{str(path)!r} holds no rows")
    texts, names, valid = [], [], []
    for n, row in enumerate(rows, 1):
        where = f"{path.name} record {n}"
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: the text is empty or missing; every row needs some text")
        if label is None or isinstance(label, (dict, list)) or not str(label).strip():
            raise ValueError(f"{where}: the label {label!r} is empty or not a single value")
        texts.append(text)
        names.append(str(label).strip())
        if "is_valid" in columns:
            valid.append(_flag(row.get("is_valid", ""), where))
    labels = sorted(set(names))
    if len(labels) < 2:
        raise ValueError(f"{str(path)!r} has one class only ({labels[0]!r}); a classifier needs at least two labels")
    label_ids = {name: i for i, name in enumerate(labels)}
    ids = [label_ids[x] for x in names]
    if "is_valid" in columns:
        val_rows = [i for i, v in enumerate(valid) if v]
    else:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        val_rows = sorted(perm[: max(1, round(len(rows) * val_fraction))])
    chosen = set(val_rows)
    train_rows = [i for i in range(len(rows)) if i not in chosen]
    if not train_rows or not val_rows:
        empty = "training" if not train_rows else "validation"
        fix = (f"mark some rows is_valid={empty == 'validation'}" if "is_valid" in columns
               else f"choose a val_fraction that leaves rows for both (got {val_fraction})")
        raise ValueError(f"{str(path)!r}: the {empty} split is empty; {fix}")
    return ClassificationData(labels, [texts[i] for i in train_rows], [ids[i] for i in train_rows],
                              [texts[i] for i in val_rows], [ids[i] for i in val_rows])


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int, truncation_side: str = "right",
                 prefix_id: int | None = None) -> list[list[int]]:
    """Token ids of each text, cut to ``max_length`` tokens (``"right"``: keep the start,
    ``"left"``: keep the end). A text that encodes to nothing becomes ``[eos]``. ``prefix_id``
    (e.g. a [CLS] token) is put first, within the ``max_length``."""
    if max_length < 1:
        raise ValueError(f"max_length={max_length} must be >= 1")
    if truncation_side not in TRUNCATION_SIDES:
        raise ValueError(f"truncation_side={truncation_side!r}; accepted: {', '.join(map(repr, TRUNCATION_SIDES))}")
    out = []
    room = max_length - (prefix_id is not None)
    for text in texts:
        ids = list(tokenizer.encode(text))
        ids = (ids[:room] if truncation_side == "right" else ids[len(ids) - room:]) if room > 0 else []
        if prefix_id is not None:
            ids = [prefix_id, *ids]
        out.append(ids or [tokenizer.eos_id])
    return out


def cls_id(tokenizer: Any) -> int:
    """The token a ``pooling="first"`` classifier puts before each text: the tokenizer's [CLS]
    token when it has one (a BERT-like Hugging Face tokenizer), else its ``bos_id``."""
    cls = getattr(getattr(tokenizer, "hf", None), "cls_token_id", None)
    return int(cls) if cls is not None else int(tokenizer.bos_id)


def _prefix(clf: Any, tokenizer: Any) -> int | None:
    return cls_id(tokenizer) if clf.pooling == "first" else None


def default_pooling(model: Any) -> str:
    """``"first"`` ([CLS]) for a bidirectional model (a masked LM), ``"last"`` for a causal one."""
    return "first" if _bidirectional(model) else "last"


def _bidirectional(model: Any) -> bool:
    base = _base_module(_as_lmlab(model))
    if _is_hf_module(base):  # a BERT-like encoder (loaded by load_for_classification)
        return _is_masked_encoder(base.config.model_type, getattr(base.config, "is_decoder", False))
    return getattr(base, "objective", "causal") != "causal" or getattr(getattr(base, "config", None), "causal", True) is False


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, L) int64 and the mask (B, L) bool of real tokens, L = the longest row."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = True
    return ids, mask


# ================================================================ the classifier


def _check_classifiable(model: Any) -> None:
    base = _base_module(model)
    if _is_hf_module(base) or callable(getattr(base, "hidden_states", None)):
        return
    raise ValueError(
        f"classification reads a model's final hidden states, which {_describe(model)} does not expose; "
        "supported: lmlab 'transformer' checkpoints, lmlab 'rnn', 'gru', 'lstm' checkpoints, Hugging Face causal LMs and BERT-like masked LMs ('hf:<dir>')"
    )


def _hidden_size(model: Any) -> int:
    base = _base_module(model)
    if _is_hf_module(base):
        cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        return int(cfg.hidden_size)
    with torch.no_grad():  # an lmlab family with hidden_states (n_embd is not a recurrent net's width): ask it
        return int(base.hidden_states(torch.zeros((1, 1), dtype=torch.long, device=base.device))[0].shape[-1])


def _context(model: Any) -> int | None:
    base = _base_module(model)
    if _is_hf_module(base):
        n = getattr(base.config, "max_position_embeddings", None)
        return int(n) if n else None
    return getattr(base, "max_context", None)


def hidden_states(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The final hidden vectors (B, T, C) after the last norm, for right-padded ids (B, T)
    with mask (B, T). lmlab transformer: ``model.hidden_states``; Hugging Face: the
    backbone's ``last_hidden_state`` (no LM head is computed)."""
    base = _base_module(model)
    if not _is_hf_module(base):
        if not _bidirectional(base):
            return base.hidden_states(ids)[0]  # right padding never reaches a real token
        # Bidirectional: every token would attend to the padding, so each row runs at its own length.
        out = None
        for row, n in enumerate(mask.long().sum(1).tolist()):
            h = base.hidden_states(ids[row: row + 1, :n])[0]
            if out is None:
                out = h.new_zeros(ids.shape[0], ids.shape[1], h.shape[-1])
            out[row, :n] = h[0]
        return out
    backbone = getattr(base, "base_model", base)
    out = backbone(input_ids=ids, attention_mask=mask.long(), use_cache=False)
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        h = base(input_ids=ids, attention_mask=mask.long(), use_cache=False, output_hidden_states=True).hidden_states[-1]
    return h


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, C) -> (B, C): the last real token's vector, the mean over real tokens, or the
    first token's vector (``"first"``: the [CLS] token :func:`encode_texts` puts there)."""
    if pooling == "first":
        return hidden[:, 0]
    if pooling == "last":
        last = mask.long().sum(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class SequenceClassifier(nn.Module):
    """``logits = head(pool(hidden_states(base, ids, mask)))``: ids, mask (B, T) -> (B, K).

    ``base`` is an lmlab transformer or a Hugging Face causal LM (plain or with LoRA);
    ``labels[i]`` names class ``i``; ``mode`` records how it was trained. The head starts
    at zero: every class equally likely (the loss is log K) until it trains.
    """

    def __init__(self, base: Any, labels: Sequence[str], pooling: str | None = None, mode: str = "lora",
                 max_length: int = 128) -> None:
        super().__init__()
        pooling = default_pooling(base) if pooling is None else pooling
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}; accepted: {', '.join(map(repr, POOLINGS))}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; accepted: {', '.join(map(repr, MODES))}")
        base = _as_lmlab(base)
        _check_classifiable(base)
        if len(labels) < 2:
            raise ValueError(f"labels={list(labels)!r}: a classifier needs at least two labels")
        self.base = base
        self.labels = list(labels)
        self.pooling, self.mode, self.max_length = pooling, mode, max_length
        self.head = nn.Linear(_hidden_size(base), len(self.labels))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, T) -> pooled features (B, C)."""
        return pool(hidden_states(self.base, ids, mask), mask, self.pooling).float()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(ids, mask))


def build_classifier(model: Any, labels: Sequence[str], mode: str = "lora", *, lora: LoraSettings | None = None,
                     pooling: str | None = None, max_length: int | None = None, seed: int = 0) -> SequenceClassifier:
    """A classifier on ``model`` set up for ``mode``: ``lora`` (adapters + head train),
    ``full`` (every weight trains), ``probe`` (base frozen, only the head trains).
    Texts are cut to ``max_length`` tokens (None: 128, or the model's context if shorter);
    ``seed`` seeds the adapters' random initialisation."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; accepted: {', '.join(map(repr, MODES))}")
    model = _as_lmlab(model)
    _check_classifiable(model)
    ctx = _context(model)
    if max_length is None:
        max_length = min(128, ctx or 128)
    if ctx is not None and max_length > ctx:
        raise ValueError(f"max_length={max_length} exceeds the model's context of {ctx} tokens")
    if mode == "lora":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = add_lora(model, lora)
    elif lora is not None:
        raise ValueError(f"LoRA settings were given with mode={mode!r}; they apply to mode='lora' only")
    else:
        model.requires_grad_(mode == "full")
    return SequenceClassifier(model, labels, pooling, mode, max_length)


@dataclass
class ClassifyConfig:
    """Training settings of :func:`train_classifier`.

    ``lr``: the base's trained weights (adapters in 'lora', every weight in 'full'; None:
    5e-4 and 2e-5); ``head_lr``: the head's (None: 1e-3, or ``lr`` in 'probe' when given).
    The rate warms up over ``warmup_fraction`` of the steps, then decays (cosine) to a tenth.
    """

    epochs: int = 1
    batch_size: int = 8
    lr: float | None = None
    head_lr: float | None = None
    weight_decay: float = 0.0
    warmup_fraction: float = 0.1
    grad_clip: float = 1.0
    truncation_side: str = "right"
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("lr", "head_lr"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name}={v} must be > 0")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction={self.warmup_fraction} must be in [0, 1)")
        if self.truncation_side not in TRUNCATION_SIDES:
            raise ValueError(f"truncation_side={self.truncation_side!r}; accepted: {', '.join(map(repr, TRUNCATION_SIDES))}")


_DEFAULT_LR = {"lora": 5e-4, "full": 2e-5}


def _batches(n: int, batch_size: int, order: Sequence[int] | None = None) -> Iterator[list[int]]:
    order = list(range(n)) if order is None else list(order)
    for lo in range(0, n, batch_size):
        yield order[lo : lo + batch_size]


def _by_length(seqs: Sequence[Sequence[int]]) -> list[int]:
    """Row order by length: batches of similar lengths waste little padding."""
    return sorted(range(len(seqs)), key=lambda i: len(seqs[i]))


@torch.no_grad()
def _features(clf: SequenceClassifier, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int,
              device: torch.device, progress: bool = False, desc: str = "features") -> torch.Tensor:
    """Pooled features (N, C) of every sequence, in order."""
    from tqdm.auto import tqdm

    clf.eval()
    out = torch.empty(len(seqs), clf.head.in_features)
    order = _by_length(seqs)
    for rows in tqdm(list(_batches(len(seqs), batch_size, order)), disable=not progress, desc=desc, dynamic_ncols=True):
        ids, mask = pad_batch([seqs[i] for i in rows], pad_id)
        out[rows] = clf.features(ids.to(device), mask.to(device)).cpu()
    return out


def _evaluate(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"accuracy": (logits.argmax(-1) == labels).float().mean().item(),
            "loss": F.cross_entropy(logits, labels).item()}


def train_classifier(clf: SequenceClassifier, tokenizer: Any, data: ClassificationData,
                     config: ClassifyConfig | None = None) -> dict[str, Any]:
    """Train ``clf`` on ``data.train_*`` for ``config.epochs`` epochs (seeded shuffles) with
    AdamW and lmlab's warmup + cosine schedule; evaluate on ``data.val_*``. In 'probe'
    mode the base runs once, without gradients, and the head trains on those features.
    Returns a summary: val_accuracy, val_loss, train_loss (mean over the last epoch),
    trainable_params, total_params, train_seconds, steps."""
    from tqdm.auto import tqdm

    config = config or ClassifyConfig()
    if data.labels != clf.labels:
        raise ValueError(f"the data's labels {data.labels} differ from the classifier's {clf.labels}")
    device = resolve_device(config.device)
    clf.to(device)
    pad = tokenizer.pad_id
    prefix = _prefix(clf, tokenizer)
    train_seqs = encode_texts(tokenizer, data.train_texts, clf.max_length, config.truncation_side, prefix)
    val_seqs = encode_texts(tokenizer, data.val_texts, clf.max_length, config.truncation_side, prefix)
    y_train, y_val = torch.tensor(data.train_labels), torch.tensor(data.val_labels)
    probe = clf.mode == "probe"
    lr = config.lr or _DEFAULT_LR.get(clf.mode, 1e-3)
    head_lr = config.head_lr or (config.lr if probe and config.lr else 1e-3)
    schedule = TrainConfig(lr=1.0, min_lr=0.1, weight_decay=config.weight_decay, progress=False)
    if probe:
        optimizer = torch.optim.AdamW(clf.head.parameters(), lr=head_lr, weight_decay=0.0)
    else:
        optimizer = make_optimizer(clf.base, dataclasses.replace(schedule, lr=lr), device)
        optimizer.add_param_group({"params": list(clf.head.parameters()), "lr": head_lr, "weight_decay": 0.0})
    for group in optimizer.param_groups:
        group["peak_lr"] = group["lr"]
    steps_per_epoch = math.ceil(len(train_seqs) / config.batch_size)
    schedule.max_iters = config.epochs * steps_per_epoch
    schedule.warmup_iters = int(config.warmup_fraction * schedule.max_iters)
    trainable, total = count_parameters(clf)

    t0 = time.perf_counter()
    feats = _features(clf, train_seqs, pad, config.batch_size, device, config.progress, "train features") if probe else None
    generator = torch.Generator().manual_seed(config.seed)
    step, epoch_losses = 0, []
    bar = tqdm(total=schedule.max_iters, disable=not config.progress, desc=f"train ({clf.mode})", dynamic_ncols=True)
    for _ in range(config.epochs):
        clf.train()
        if probe:
            clf.base.eval()
        epoch_losses = []
        for rows in _batches(len(train_seqs), config.batch_size, torch.randperm(len(train_seqs), generator=generator).tolist()):
            factor = learning_rate(step, schedule)
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * factor
            y = y_train[rows].to(device)
            if probe:
                logits = clf.head(feats[rows].to(device))
            else:
                ids, mask = pad_batch([train_seqs[i] for i in rows], pad)
                logits = clf(ids.to(device), mask.to(device))
            loss = F.cross_entropy(logits, y)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            epoch_losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    train_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    val_feats = _features(clf, val_seqs, pad, config.batch_size, device, config.progress, "validation")
    with torch.no_grad():
        metrics = _evaluate(clf.head(val_feats.to(device)).cpu(), y_val)
    return {
        "mode": clf.mode,
        "val_accuracy": metrics["accuracy"],
        "val_loss": metrics["loss"],
        "train_loss": sum(epoch_losses) / max(1, len(epoch_losses)),
        "trainable_params": trainable,
        "total_params": total,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - t1,
        "steps": step,
        "train_examples": len(train_seqs),
        "val_examples": len(val_seqs),
        "labels": clf.labels,
        "lr": None if probe else lr,
        "head_lr": head_lr,
    }


@torch.no_grad()
def predict_proba(clf: SequenceClassifier, tokenizer: Any, texts: Sequence[str], batch_size: int = 16,
                  truncation_side: str = "right") -> torch.Tensor:
    """Class probabilities (N, K) of ``texts``; column ``i`` is ``clf.labels[i]``."""
    seqs = encode_texts(tokenizer, texts, clf.max_length, truncation_side, _prefix(clf, tokenizer))
    feats = _features(clf, seqs, tokenizer.pad_id, batch_size, clf.head.weight.device)
    return clf.head(feats.to(clf.head.weight.device)).softmax(-1).cpu()


def predict(clf: SequenceClassifier, tokenizer: Any, texts: Sequence[str], batch_size: int = 16) -> list[str]:
    """The most probable label of each text."""
    return [clf.labels[i] for i in predict_proba(clf, tokenizer, texts, batch_size).argmax(-1).tolist()]


def save_classifier(clf: SequenceClassifier, directory: str | Path, tokenizer: Any, base: str | None = None,
                    *, overwrite: bool = False) -> Path:
    """Write ``classifier.json`` (labels, mode, pooling, max_length, the base model spec),
    ``head.safetensors``, and ``adapter/`` (mode 'lora') or ``model/`` (mode 'full': the
    whole fine-tuned base with its tokenizer). ``base`` (e.g. ``"hf:/abs/dir"``) lets
    :func:`load_classifier` find the base of a 'lora' or 'probe' classifier by itself."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{str(directory)!r} already exists; pass overwrite=True or a new path")
    with staged_directory(directory, replace=overwrite) as tmp:
        _write_classifier(clf, tmp, tokenizer, base)
    return directory


def _write_classifier(clf: SequenceClassifier, directory: Path, tokenizer: Any, base: str | None) -> None:
    from safetensors.torch import save

    hf = _is_hf_module(_base_module(clf.base))
    meta = {
        "labels": clf.labels,
        "label_ids": {name: i for i, name in enumerate(clf.labels)},
        "mode": clf.mode,
        "pooling": clf.pooling,
        "max_length": clf.max_length,
        "hidden_size": clf.head.in_features,
        "base": base,
        "base_kind": "hf" if hf else "lmlab",
    }
    atomic_write_text(directory / CLASSIFIER_FILE, json.dumps(meta, indent=2) + "\n")
    head = {k: v.detach().cpu().contiguous() for k, v in clf.head.state_dict().items()}
    atomic_write_bytes(directory / HEAD_FILE, save(head))
    if clf.mode == "lora":
        _write_adapter(clf.base, directory / "adapter")
    elif clf.mode == "full":
        _write_finetuned(clf.base, directory / "model", tokenizer)


def load_classifier(directory: str | Path, base: str | None = None, device: str = "cpu") -> tuple[SequenceClassifier, Any]:
    """(classifier, tokenizer) saved by :func:`save_classifier`, in eval mode. ``base``
    overrides the base model spec recorded for a 'lora' or 'probe' classifier."""
    from safetensors.torch import load_file

    directory = Path(directory)
    path = directory / CLASSIFIER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CLASSIFIER_FILE} in {str(directory)!r}; expected a directory written by save_classifier")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta["mode"] == "full":
        spec = ("hf:" if meta["base_kind"] == "hf" else "") + str(directory / "model")
    else:
        spec = base or meta.get("base")
        if not spec:
            raise ValueError(f"{path} records no base model; pass base='DIR' or 'hf:DIR' (the model it was trained on)")
    model, tokenizer = load_for_classification(spec, device)
    if meta["mode"] == "lora":
        model = load_adapter(model, directory / "adapter")
    clf = SequenceClassifier(model, meta["labels"], meta["pooling"], meta["mode"], meta["max_length"])
    head = load_file(str(directory / HEAD_FILE))
    if tuple(head["weight"].shape) != tuple(clf.head.weight.shape):
        raise ValueError(
            f"the head in {directory} has shape {tuple(head['weight'].shape)}, but the base model {spec!r} gives "
            f"{tuple(clf.head.weight.shape)}; it was trained on another base model"
        )
    clf.head.load_state_dict(head)
    return clf.to(device).eval(), tokenizer


# ================================================================ command line


def add_finetune_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``lmlab finetune`` flags to ``parser`` (returns it)."""
    p = parser
    p.add_argument("--model", required=True, help="lmlab checkpoint or run directory, or hf:<dir>")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.add_argument("--task", required=True, choices=TASKS, help="lm: continued training on a corpus; classify: labelled texts")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, help="learning rate (default: lm 1e-3 with --lora, else 1e-4; "
                   "classify: lora 5e-4, full 2e-5)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--val-fraction", type=float, help="held-out part (lm: end of the corpus, default 0.1; "
                   "classify without is_valid: seeded random rows, default 0.2)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora", action="store_true", help="lm: train LoRA adapters (default: every weight)")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    g.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (the update is scaled by alpha / r)")
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--target-modules", help="comma-separated layer names, or all-linear (default: per model kind)")
    g.add_argument("--lora-bias", default="none", choices=BIASES)

    g = p.add_argument_group("task lm")
    g.add_argument("--corpus", help="UTF-8 text file to continue training on")
    g.add_argument("--block-size", type=int, default=128, help="tokens per training window")
    g.add_argument("--max-iters", type=int, default=200)
    g.add_argument("--warmup-iters", type=int, default=20)
    g.add_argument("--eval-interval", type=int, default=50)
    g.add_argument("--eval-iters", type=int, default=20)
    g.add_argument("--merge", action="store_true", help="also write the merged model to OUT/merged (needs --lora)")

    g = p.add_argument_group("task classify")
    g.add_argument("--data", help="CSV/TSV or JSONL with text,label columns (optional is_valid)")
    g.add_argument("--mode", choices=MODES, help="lora (default): adapters + head; full: every weight; probe: head only")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max-length", type=int, help="tokens kept per text (default: 128, or the model's context if shorter)")
    g.add_argument("--truncation-side", choices=TRUNCATION_SIDES, default="right", help="right: keep the start")
    g.add_argument("--pooling", choices=POOLINGS, help="last real token, mean over real tokens, or first ([CLS]) "
                   "token (default: first for a masked-transformer, else last)")
    g.add_argument("--head-lr", type=float, help="learning rate of the classification head (default 1e-3)")
    return parser


def _lora_settings(args) -> LoraSettings:
    targets = None
    if args.target_modules:
        targets = "all-linear" if args.target_modules == "all-linear" else [
            t.strip() for t in args.target_modules.split(",") if t.strip()]
    return LoraSettings(r=args.rank, alpha=args.alpha, dropout=args.lora_dropout, target_modules=targets,
                        bias=args.lora_bias)


def _check_args(args) -> None:
    if args.task == "lm":
        if not args.corpus:
            raise ValueError("--task lm needs --corpus FILE (the text to continue training on)")
        extra = [f for f, v in (("--data", args.data), ("--mode", args.mode)) if v]
        if extra:
            raise ValueError(f"{', '.join(extra)} belong to --task classify; --task lm takes --corpus")
        if args.merge and not args.lora:
            raise ValueError("--merge needs --lora: a full fine-tune has no adapters to merge")
    else:
        if not args.data:
            raise ValueError("--task classify needs --data FILE (CSV or JSONL with text,label columns)")
        extra = [f for f, v in (("--corpus", args.corpus), ("--merge", args.merge)) if v]
        if extra:
            raise ValueError(f"{', '.join(extra)} belong to --task lm; --task classify takes --data")
        if args.lora and args.mode not in (None, "lora"):
            raise ValueError(f"--lora contradicts --mode {args.mode}; use --mode lora, full or probe")
    for name in ("batch_size", "epochs", "max_iters", "block_size", "max_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")


def _model_spec(spec: str) -> str:
    """The spec with an absolute path, so a saved classifier finds its base from anywhere."""
    if spec.startswith("hf:"):
        return "hf:" + str(Path(spec[3:]).resolve())
    return str(Path(spec).resolve())


def run_finetune(args) -> int:
    """Run ``lmlab finetune`` (returns the exit status): train, write OUT, print a JSON
    summary (also OUT/summary.json). Bad values raise ValueError naming the value (the
    ``lmlab`` command prints them as ``error: ...``); nothing is written then."""
    _check_args(args)
    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"output directory {str(out)!r} already exists; choose a new --out")
    t0 = time.perf_counter()
    if args.task == "lm":
        summary, model = _run_lm(args, out)
        summary.update(seconds=time.perf_counter() - t0, out=str(out))
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    else:
        summary, clf, tok = _run_classify(args)
        summary.update(seconds=time.perf_counter() - t0, out=str(out))
        with staged_directory(out) as tmp:  # OUT appears complete or not at all
            _write_classifier(clf, tmp, tok, _model_spec(args.model))
            atomic_write_text(tmp / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


def _run_lm(args, out: Path) -> tuple[dict, Any]:
    from lmlab.checkpoints import load_checkpoint
    from lmlab.data import read_corpus

    text = read_corpus(args.corpus)
    model, tok = load_checkpoint(args.model, args.device, trust_remote_code=args.trust_remote_code)
    lr = args.lr or (1e-3 if args.lora else 1e-4)
    config = TrainConfig(max_iters=args.max_iters, batch_size=args.batch_size, lr=lr, min_lr=lr / 10,
                         warmup_iters=min(args.warmup_iters, args.max_iters), weight_decay=args.weight_decay,
                         grad_clip=args.grad_clip, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
                         seed=args.seed, device=args.device, progress=args.progress)
    model, summary = finetune_lm(model, tok, text, out, config, lora=_lora_settings(args) if args.lora else None,
                                 block_size=args.block_size, val_fraction=args.val_fraction or 0.1, merge=args.merge)
    summary = {"task": "lm", "model": args.model, **summary}
    if args.merge:
        summary["merged"] = str(out / "merged")
    return summary, model


def load_for_classification(spec: str, device: str | torch.device = "cpu", *, trust_remote_code: bool = False):
    """(model, tokenizer) to classify with: what ``load_checkpoint(spec)`` gives, except that an
    ``hf:`` directory holding a masked LM (BERT-like, refused as a causal LM) is loaded as the
    encoder it is, for [CLS] pooling."""
    from lmlab.checkpoints import load_checkpoint

    if spec.startswith("hf:") and _is_hf_masked_lm_dir(Path(spec[3:])):
        from lmlab.hf import HFModel, load_hf_masked_lm
        from lmlab.tokenizers import HFTokenizer

        hf_model, hf_tokenizer = load_hf_masked_lm(spec[3:], device=device, trust_remote_code=trust_remote_code)
        return HFModel(hf_model, source=spec), HFTokenizer(hf_tokenizer, source_dir=spec[3:])
    return load_checkpoint(spec, device, trust_remote_code=trust_remote_code)


def _is_hf_masked_lm_dir(directory: Path) -> bool:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # load_checkpoint names what is wrong with the directory
    return _is_masked_encoder(config.get("model_type"), config.get("is_decoder", False))


def _is_masked_encoder(model_type: str | None, is_decoder: bool) -> bool:
    """A Hugging Face masked-LM architecture (BERT, RoBERTa, ...) not configured as a decoder."""
    from lmlab.hf import _masked_types

    return model_type in _masked_types() and not is_decoder


def _run_classify(args) -> tuple[dict, SequenceClassifier, Any]:
    data = read_labelled(args.data, args.val_fraction or 0.2, args.seed)
    model, tok = load_for_classification(args.model, args.device, trust_remote_code=args.trust_remote_code)
    mode = args.mode or "lora"
    clf = build_classifier(model, data.labels, mode, lora=_lora_settings(args) if mode == "lora" else None,
                           pooling=args.pooling, max_length=args.max_length, seed=args.seed)
    config = ClassifyConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr,
                            weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                            truncation_side=args.truncation_side, seed=args.seed, device=args.device,
                            progress=args.progress)
    summary = {"task": "classify", "model": args.model, **train_classifier(clf, tok, data, config)}
    return summary, clf, tok


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lmlab.finetune ...`` (the same flags as ``lmlab finetune``)."""
    parser = add_finetune_arguments(argparse.ArgumentParser(prog="lmlab finetune", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    try:
        return run_finetune(args)
    except (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
