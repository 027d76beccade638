"""The one interface every lmlab model answers.

    logits, state = model(ids, state=None)    # ids: (B, T) int64 -> logits: (B, T, V)

``state=None`` starts at the beginning of the sequence; passing the returned
state continues it. A state can be re-indexed along the batch with
``state.select(index)`` so that beam search can reorder and prune hypotheses,
and ``model.merge_states([s1, s2, ...])`` stacks the rows of states at different
positions into one batch (continuous batching in ``lmlab.serve``).

Families register a config dataclass and a model class with ``register``;
``build_model`` makes a model from a config and ``save_model``/``load_model``
move it to and from a directory (``config.json`` + ``model.safetensors``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lmlab.files import atomic_write_bytes, atomic_write_text  # noqa: F401  (imported from here by callers)


@dataclass
class State:
    """Per-row memory of a model; every tensor has the batch on dim 0.

    ``length`` is the number of token slots of the state, the same for all rows.
    Families put what they need in ``tensors``: a KV cache, hidden vectors,
    the last n-1 tokens, a running sum.

    Rows that joined a batch at different steps (``LanguageModel.merge_states``)
    have not filled the first slots: ``offsets`` (B,) int64 counts those empty
    slots per row (None: every row filled every slot), so row b has consumed
    ``positions[b] = length - offsets[b]`` tokens. A family whose output depends on
    the position (the transformer, the context average) reads ``positions``;
    every family carries ``offsets`` forward.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    length: int = 0
    offsets: torch.Tensor | None = field(default=None, kw_only=True)

    def select(self, index: torch.Tensor) -> "State":
        """Rows ``index`` (a (B',) int64 tensor) of every tensor, in that order."""
        offsets = None if self.offsets is None else self.offsets.index_select(0, index.to(self.offsets.device))
        return State({k: v.index_select(0, index) for k, v in self.tensors.items()}, self.length, offsets=offsets)

    def fill_rows(self, holes: torch.Tensor, sources: torch.Tensor, size: int) -> "State":
        """The first ``size`` rows, after rows ``sources`` were copied over rows ``holes`` (both
        (k,) int64; every source at or past ``size``): rows leave a batch by copying only the
        last rows into their places, where ``select`` copies every row. Writes into this state's
        tensors (the result's are views of them): continue the result, not this state."""
        if type(self) is not State:  # a state of another shape (parts, a cache object) selects
            keep = torch.arange(size, device=holes.device)
            keep[holes] = sources
            return self.select(keep)
        for t in self.tensors.values():
            t.index_copy_(0, holes.to(t.device), t.index_select(0, sources.to(t.device)))
        offsets = None
        if self.offsets is not None:
            offsets = self.offsets.clone()
            offsets[holes.to(offsets.device)] = offsets[sources.to(offsets.device)]
            offsets = offsets[:size]
        return State({k: v[:size] for k, v in self.tensors.items()}, self.length, offsets=offsets)

    def clone(self) -> "State":
        """An independent copy. Models may update a state's buffers in place
        (the KV cache does), so clone a state before branching from it twice."""
        offsets = None if self.offsets is None else self.offsets.clone()
        return State({k: v.clone() for k, v in self.tensors.items()}, self.length, offsets=offsets)

    @property
    def batch_size(self) -> int:
        for v in self.tensors.values():
            return v.shape[0]
        return 0

    @property
    def positions(self) -> torch.Tensor | None:
        """(B,) int64 tokens consumed per row, or None when all rows are at ``length``."""
        return None if self.offsets is None else self.length - self.offsets


def _merged_offsets(states: "list[State]", length: int) -> torch.Tensor:
    """(sum B,) empty slots per row once every state is padded at the start to ``length`` slots."""
    parts = []
    for s in states:
        base = torch.zeros(s.batch_size, dtype=torch.long) if s.offsets is None else s.offsets.cpu()
        parts.append(base + (length - s.length))
    return torch.cat(parts)


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

    @property
    def adaptive_head(self) -> nn.Module | None:
        """The model's adaptive softmax output layer (``lmlab.models.heads.AdaptiveSoftmaxHead``), or None.

        A family that has one also has ``hidden_states(ids, state) -> (hidden (B, T, d), state)``,
        the vectors that layer reads; training uses ``adaptive_head.loss`` on them."""
        return None

    def next_token_logits(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Like ``forward`` but only the logits after the last token: (B, V). Generation
        reads nothing else, so a family may skip its output layer at the other positions."""
        logits, state = self(ids, state)
        return logits[:, -1], state

    def read_prompt_blocks(self, blocks: "list[torch.Tensor]") -> tuple[torch.Tensor, State]:
        """blocks: (n_i, T_i) int64 prompts of any lengths (T_i >= 1) -> the next-token logits of
        every row (sum n_i, V) and one state holding them all, each row at its own position: what
        ``next_token_logits`` of each block alone and ``merge_states`` of their states give. The
        default does exactly that; a family may read the blocks in one padded pass (the
        transformer does), with logits equal to those within float rounding."""
        read = [self.next_token_logits(block, None) for block in blocks]
        if len(read) == 1:
            return read[0]
        return torch.cat([logits for logits, _ in read]), self.merge_states([state for _, state in read])

    def merge_states(self, states: "list[State]") -> State:
        """One state holding the rows of ``states`` in order; each may be at a different length.

        Every row keeps its own position: a shorter state's rows get empty slots at the start
        (``State.offsets``), and slots no row fills are dropped, so ``merge_states([s.select(i)])``
        also compacts a batch after rows leave it. The default concatenates every tensor along
        the batch, which is right for states that summarise a row (hidden vectors, the last
        tokens, a running sum); families with a time axis (the KV cache) override it (the
        transformer returns one state's tensors as views: continue either that state or the
        result, or clone first, as with any state). A state of
        another kind (a Hugging Face cache, RAG's) raises NotImplementedError: such models
        decode one request at a time.
        """
        states = [s for s in states if s.batch_size]
        if not states:
            raise ValueError("merge_states needs at least one state with rows")
        if any(type(s) is not State for s in states):
            kinds = sorted({type(s).__name__ for s in states})
            raise NotImplementedError(f"states of kind {kinds} cannot be merged; decode their requests one at a time")
        keys = sorted(states[0].tensors)
        for s in states:
            if sorted(s.tensors) != keys:
                raise ValueError(f"states hold different tensors: {keys} and {sorted(s.tensors)}")
        length = max(s.length for s in states)
        offsets = _merged_offsets(states, length)
        trim = int(offsets.min())
        tensors = {k: torch.cat([s.tensors[k] for s in states]) for k in keys}
        return State(tensors, length - trim, offsets=_or_none(offsets - trim, tensors))

    def token_logprobs(self, ids: torch.Tensor, state: State | None = None) -> torch.Tensor:
        """(B, T-1) natural-log p(ids[:, t+1] | ids[:, :t+1], state), the log-probabilities
        scoring reads: :meth:`target_logprobs` of the sequence and itself shifted by one; a family
        whose scores are exact log-probabilities already (n-grams) returns them directly."""
        return self.target_logprobs(ids[:, :-1], ids[:, 1:], state)[0]

    def target_logprobs(self, x: torch.Tensor, y: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """(log p(y[:, t] | x[:, :t + 1], state) (B, T), the state after ``x``), by the cheapest
        exact path of the family: how a long stream is scored with its state carried. Default:
        an adaptive softmax evaluates only the targets' clusters; any other output layer the
        log_softmax of ``forward``. Families with a faster exact path (n-grams, caches) override it."""
        head = self.adaptive_head
        if head is not None:
            hidden, state = self.hidden_states(x, state)
            return head.adaptive(hidden.reshape(-1, hidden.shape[-1]).float(), y.reshape(-1)).output.view(y.shape), state
        logits, state = self(x, state)
        logp = torch.log_softmax(logits.float(), dim=-1)
        return logp.gather(-1, y.unsqueeze(-1).to(logp.device)).squeeze(-1), state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def special_ids(self) -> dict[str, int]:
        """The special tokens the model itself declares, by role ("pad", "bos", "eos",
        "unk"); roles it does not declare are absent. None by default: a vocabulary
        position never makes a token special (a family whose config names its
        specials, such as the n-gram model's ``bos_id``/``eos_id``/``unk_id``, says so)."""
        return {}


def _or_none(offsets: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """``offsets`` on the states' device, or None when every row filled every slot."""
    if not bool(offsets.any()):
        return None
    for v in tensors.values():
        return offsets.to(v.device)
    return offsets


def require_causal(model: Any, purpose: str) -> None:
    """Refuse a model that does not predict the next token (a masked LM) for ``purpose``."""
    if getattr(model, "objective", "causal") != "causal":
        raise ValueError(
            f"{purpose} needs a model that predicts the next token; the {getattr(model, 'family', type(model).__name__)} "
            "model fills masks (use `lmlab fill` or lmlab.fill, and pseudo_log_likelihood to score a text)"
        )


SPECIAL_ROLES = ("pad", "bos", "eos", "unk")


def special_token_ids(model: Any = None, tokenizer: Any = None) -> dict[str, int]:
    """Special token ids by role ("pad", "bos", "eos", "unk"): the tokenizer's
    (``pad_id``, ``bos_id``, ``eos_id``, ``unk_id``) when a tokenizer is given, else
    the model's declared ``special_ids``; a role without an id is absent. With
    neither, the result is empty: no id is special because of its position."""
    if tokenizer is not None:
        found = {role: getattr(tokenizer, f"{role}_id", None) for role in SPECIAL_ROLES}
    else:
        found = dict(getattr(model, "special_ids", None) or {})
    return {role: int(found[role]) for role in SPECIAL_ROLES if found.get(role) is not None}


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


@contextlib.contextmanager
def staged_directory(directory: str | Path, replace: bool = False, parents: bool = True) -> Iterator[Path]:
    """Build a directory under a temporary name beside ``directory`` (``.NAME.XXXX.tmp``), then
    rename it into place (replacing an existing one only with ``replace=True``): it appears
    complete or not at all.

    Replacing takes two renames: the old directory to ``.NAME.old``, the new one into place;
    then ``.NAME.old`` is deleted. If the second rename fails the old directory is put back.
    A process killed between the two leaves ``.NAME.old`` and the finished temporary
    directory; :func:`recover_staged` completes or undoes such a swap. With ``parents=False``
    a missing parent is an error, not created, and so is a parent deleted (or replaced)
    while the directory was being built.
    """
    directory = Path(directory)
    parent = directory.parent
    if parents:
        parent.mkdir(parents=True, exist_ok=True)
    identity = directory_identity(parent)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        yield tmp
        if directory_identity(parent, missing_ok=True) != identity:
            raise FileNotFoundError(errno.ENOENT, "directory deleted or replaced while writing into it", str(parent))
        if directory.exists():
            if not replace:
                raise FileExistsError(f"{str(directory)!r} already exists; choose a new directory")
            old = _swap_name(directory)
            if old.exists():
                shutil.rmtree(old)
            directory.rename(old)
            try:
                tmp.rename(directory)
            except BaseException:
                old.rename(directory)
                raise
            shutil.rmtree(old, ignore_errors=True)  # a leftover is only stale, recover_staged removes it
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not parents and directory_identity(parent, missing_ok=True) not in (identity, None):
            with contextlib.suppress(OSError):
                parent.rmdir()  # recreated by a write into the vanished parent: remove it if empty
        raise


def recover_staged(directory: str | Path, finished: Callable[[Path], bool],
                   newest: Callable[[Path], Any]) -> Path | None:
    """Complete or undo the :func:`staged_directory` swaps a killed process left half done.

    The candidates are ``directory`` itself, else ``.NAME.old`` (a directory is only moved
    there complete), and the temporary directories whose contents are ``finished``; the
    newest by ``newest`` (``directory`` on a tie) ends in place, the other leftovers are
    deleted. Returns ``directory``, or None when nothing complete is there to put in place.
    """
    directory = Path(directory)
    old = _swap_name(directory)
    staged = sorted(p for p in directory.parent.glob(f".{glob.escape(directory.name)}.*.tmp") if p.is_dir())
    in_place = [directory] if directory.is_dir() else [old] if old.is_dir() else []
    chosen = max(in_place + [p for p in staged if finished(p)], key=newest, default=None)
    if chosen is not None and chosen != directory:
        if directory.is_dir():  # a finished copy newer than the one in place: the swap again
            if old.is_dir():
                shutil.rmtree(old)
            directory.rename(old)
        chosen.rename(directory)
    for path in (old, *staged):
        if path != chosen and path.is_dir():
            shutil.rmtree(path)
    return directory if chosen is not None else None


def _swap_name(directory: Path) -> Path:
    return directory.with_name(f".{directory.name}.old")


def directory_identity(path: Path, missing_ok: bool = False) -> tuple[int, int] | None:
    """(device, inode) of ``path``: tells a directory from another made at the same place."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise
    return st.st_dev, st.st_ino


def save_model(model: LanguageModel, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` (weights) into ``directory``.

    ``state_dict`` replaces ``model.state_dict()`` as the weights (a sharded model's,
    gathered whole: :func:`lmlab.distributed.full_state`).

    A Hugging Face model (family ``"hf"``) is written as a Hugging Face directory
    (``save_pretrained``, safetensors), which loads again as ``hf:<directory>``.
    """
    from safetensors.torch import save

    directory = Path(directory)
    if hasattr(model, "save_directory"):  # a model made of other models (the interpolate family)
        model.save_directory(directory)
        return
    directory.mkdir(parents=True, exist_ok=True)
    hf_module = getattr(model, "hf", None)
    if getattr(model, "family", None) == "hf" and hf_module is not None:
        hf_module.save_pretrained(str(directory), safe_serialization=True)
        return
    config = {"family": model.family, **config_to_json(model.config)}
    if getattr(model, "quantization", None):  # lmlab.quantize: integer codes + scales in the weights
        config["quantization"] = model.quantization
    weights = model.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    atomic_write_bytes(directory / "model.safetensors", save(_untie(tensors)))
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2) + "\n")


def config_to_json(config: Any) -> dict:
    """The fields of a config dataclass as JSON values (tuples become lists); any other value is
    an error naming the field, so a checkpoint is never half-written or unreadable."""
    values = dataclasses.asdict(config)

    def plain(value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {k: plain(v, f"{where}.{k}") for k, v in value.items()}
        raise ValueError(
            f"config field {where} of {type(config).__name__} is {value!r} ({type(value).__name__}), which a "
            "JSON config cannot hold; accepted: None, bool, int, float, str, and lists or dicts of them"
        )

    return {k: plain(v, k) for k, v in values.items()}


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
    try:
        values = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable JSON config: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} holds a JSON {type(values).__name__}; expected an object with a 'family' field")
    if "family" not in values:
        if "model_type" in values:
            raise ValueError(
                f"{path} is a Hugging Face config (model_type {values['model_type']!r}), not an lmlab one; "
                f"load that directory as 'hf:{Path(directory)}'"
            )
        raise ValueError(f"{path} has no 'family' field; known families: {', '.join(families())}")
    family = values.pop("family")
    return family, values


def _with_quantization(model: LanguageModel, record: dict | None) -> LanguageModel:
    """``model`` with empty quantized layers where a saved ``quantization`` record says (lmlab.quantize)."""
    if record is None:
        return model
    from lmlab.quantize import apply_quantization_layout

    return apply_quantization_layout(model, record)


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> LanguageModel:
    """Load a model saved by ``save_model``. The weights file's header is checked against the
    config (names, shapes, and so the size) before the model is allocated."""
    from lmlab.untrusted import check_weights_fit, load_safetensors, refuse_pickled_weights

    directory = Path(directory)
    family, values = read_config(directory)
    quantization = values.pop("quantization", None)
    _import_families()
    model_cls = _REGISTRY.get(family, (None, None))[1]
    if hasattr(model_cls, "load_directory"):  # a model made of other models (the interpolate family)
        return model_cls.load_directory(directory, values, map_location)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        refuse_pickled_weights(directory)
        raise FileNotFoundError(f"no weights at {weights}")
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            skeleton = _with_quantization(build_model(family, values), quantization)
    except TypeError as e:
        raise ValueError(f"{directory / 'config.json'} does not describe a {family} model: {e}") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    check_weights_fit(expected, weights, directory / "config.json")
    model = _with_quantization(build_model(family, values), quantization)
    model.load_state_dict(load_safetensors(weights, map_location))
    return model.to(map_location)
