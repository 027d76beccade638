"""Linear interpolation of language models that share a tokenizer (family ``"interpolate"``).

    p(w | h) = sum_k weights[k] * p_k(w | h)          (computed as a logsumexp of log w_k + log p_k)

e.g. a Kneser-Ney 5-gram and an LSTM: the two make different errors, and the
mixture is better than either (Mikolov et al. 2011; Merity et al. 2018 interpolate
the same way). The components are any lmlab models over the same vocabulary; the
mixture answers the one interface, so every scorer and decoder works on it:

- ``logits, state = model(ids, state)``: logits are the mixture's log-probabilities
  (B, T, V), already normalized; the state is an :class:`InterpolatedState` holding one
  state per component (``select``/``clone`` act on all of them, so beam search works).
- The weights are fitted by expectation-maximization on held-out text
  (:func:`fit_weights`): with r[n, k] = w_k p_k(x_n) / sum_j w_j p_j(x_n) the update
  w_k <- mean_n r[n, k] never lowers the held-out likelihood, and converges to the
  weights that maximize it (the likelihood is concave in the weights).

On disk an interpolated model is a directory holding its components::

    DIR/config.json         {"family": "interpolate", "vocab_size": V, "weights": [...], "components": ["component0", ...]}
    DIR/component0/ ...     each component as ``save_model`` writes it
    DIR/tokenizer.json      the shared tokenizer (written by the CLI)

``lmlab interpolate --models DIR DIR --valid FILE --out DIR`` builds one from checkpoints.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from lmlab.models.base import LanguageModel, State, atomic_write_text, register, save_model


@dataclass
class InterpolateConfig:
    vocab_size: int
    weights: list[float] = field(default_factory=list)      # one per component, positive, summing to 1
    components: list[str] = field(default_factory=list)     # component sub-directories, in order

    def __post_init__(self) -> None:
        check_weights(self.weights, len(self.weights))


def check_weights(weights: Sequence[float], n: int) -> None:
    """Raise ValueError unless ``weights`` are ``n`` non-negative numbers summing to 1."""
    values = list(weights)
    if len(values) != n:
        raise ValueError(f"weights={values} must give one weight per component ({n})")
    if any(not math.isfinite(w) or w < 0 for w in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"weights={values} must be non-negative and sum to 1")


@dataclass
class InterpolatedState(State):
    """One state per component in ``parts``; ``length`` counts the tokens read (the same for all)."""

    parts: tuple = ()

    def select(self, index: torch.Tensor) -> "InterpolatedState":
        return InterpolatedState({}, self.length, tuple(p.select(index) for p in self.parts))

    def clone(self) -> "InterpolatedState":
        return InterpolatedState({}, self.length, tuple(p.clone() for p in self.parts))

    @property
    def batch_size(self) -> int:
        return self.parts[0].batch_size if self.parts else 0


@register("interpolate", InterpolateConfig)
class InterpolatedLM(LanguageModel):
    """p = sum_k w_k p_k over ``components`` (lmlab models with the same ``vocab_size``)."""

    def __init__(self, config: InterpolateConfig, components: Sequence[LanguageModel] | None = None) -> None:
        super().__init__()
        if components is None:
            raise ValueError("an interpolate model is made of component models: use "
                             "InterpolatedLM.from_models(models, weights) or load_model(DIR)")
        components = list(components)
        if len(components) < 2:
            raise ValueError(f"interpolation needs at least 2 component models, got {len(components)}")
        sizes = [m.vocab_size for m in components]
        if len(set(sizes)) != 1 or sizes[0] != config.vocab_size:
            raise ValueError(f"the components have vocabulary sizes {sizes} (config: {config.vocab_size}); "
                             "interpolated models must share one tokenizer")
        for m in components:
            if getattr(m, "objective", "causal") != "causal":
                raise ValueError(f"the {getattr(m, 'family', type(m).__name__)} component does not predict the next token")
        check_weights(config.weights, len(components))
        self.config = config
        self.components = nn.ModuleList(components)

    @classmethod
    def from_models(cls, components: Sequence[LanguageModel], weights: Sequence[float] | None = None) -> "InterpolatedLM":
        """The mixture of ``components`` with ``weights`` (default: uniform)."""
        components = list(components)
        if weights is None:
            weights = [1.0 / len(components)] * len(components)
        names = [f"component{i}" for i in range(len(components))]
        vocab = components[0].vocab_size if components else 0
        return cls(InterpolateConfig(vocab, [float(w) for w in weights], names), components)

    @property
    def max_context(self) -> int | None:
        limits = [m.max_context for m in self.components if m.max_context is not None]
        return min(limits) if limits else None

    def set_weights(self, weights: Sequence[float]) -> None:
        check_weights(weights, len(self.components))
        self.config.weights = [float(w) for w in weights]

    def forward(self, ids: torch.Tensor, state: InterpolatedState | None = None) -> tuple[torch.Tensor, InterpolatedState]:
        """ids (B, T) -> the mixture's log-probabilities (B, T, V) and the state of every component."""
        if state is not None and not isinstance(state, InterpolatedState):
            raise ValueError(f"an interpolate model continues only its own InterpolatedState, got {type(state).__name__}")
        parts = state.parts if state is not None else (None,) * len(self.components)
        logps, new_parts = [], []
        for model, part in zip(self.components, parts):
            logits, new = model(ids, part)
            logps.append(torch.log_softmax(logits.float(), dim=-1))
            new_parts.append(new)
        log_w = torch.log(torch.tensor(self.config.weights, dtype=torch.float32, device=logps[0].device))
        mixed = torch.logsumexp(torch.stack(logps, dim=0) + log_w.view(-1, 1, 1, 1), dim=0)
        length = (state.length if state is not None else 0) + ids.shape[1]
        return mixed, InterpolatedState({}, length, tuple(new_parts))

    def mix_target_logprobs(self, component_logprobs: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N, K) log p_k of N targets -> (N,) log of the mixture, float64."""
        return mixture_logprobs(np.asarray(component_logprobs, dtype=np.float64), np.asarray(self.config.weights))

    # ---------------------------------------------------------------- directories

    def save_directory(self, directory: str | Path) -> None:
        """One sub-directory per component (``save_model``), then config.json (written last, atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, model in zip(self.config.components, self.components):
            save_model(model, directory / name)
        config = {"family": self.family, "vocab_size": self.config.vocab_size,
                  "weights": self.config.weights, "components": self.config.components}
        atomic_write_text(directory / "config.json", json.dumps(config, indent=2) + "\n")

    @classmethod
    def load_directory(cls, directory: str | Path, values: dict, map_location) -> "InterpolatedLM":
        from lmlab.models.base import load_model

        config = InterpolateConfig(**values)
        components = []
        for name in config.components:
            if Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"component {name!r} in {Path(directory) / 'config.json'} must be a sub-directory name")
            components.append(load_model(Path(directory) / name, map_location=map_location))
        return cls(config, components)


def check_same_tokenizer(tokenizers: Sequence, names: Sequence[str]) -> None:
    """Raise ValueError unless every tokenizer serializes like the first (same vocabulary, same ids)."""
    first = tokenizers[0].to_json()
    for tok, name in zip(tokenizers[1:], names[1:]):
        if tok.to_json() != first:
            raise ValueError(f"the tokenizer of {name} differs from that of {names[0]} "
                             f"(vocabularies of {tok.vocab_size} and {tokenizers[0].vocab_size} tokens); "
                             "interpolated models must share one tokenizer")


# -------------------------------------------------------------------- fitting


def mixture_logprobs(component_logprobs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, K) component log-probabilities, (K,) weights -> (N,) log sum_k w_k p_k (float64)."""
    with np.errstate(divide="ignore"):
        a = component_logprobs + np.log(weights)[None, :]
    top = np.max(a, axis=1, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    return (safe + np.log(np.sum(np.exp(a - safe), axis=1, keepdims=True)))[:, 0]


def fit_weights(component_logprobs: np.ndarray | torch.Tensor, *, max_iters: int = 500, tol: float = 1e-9,
                initial: Sequence[float] | None = None) -> tuple[np.ndarray, list[float]]:
    """EM for the mixture weights on held-out targets.

    ``component_logprobs``: (N, K) natural-log p_k(x_n | history) of each held-out token
    under each component (:func:`component_target_logprobs`). Returns the weights (K,)
    and the mean NLL per token after each iteration (the first entry is for
    ``initial``, default uniform); it never increases. Stops when an iteration
    improves the mean NLL by less than ``tol`` nats.
    """
    L = np.asarray(component_logprobs, dtype=np.float64)
    if L.ndim != 2 or L.shape[0] == 0 or L.shape[1] < 1:
        raise ValueError(f"component_logprobs must have shape (N, K) with N >= 1, got {L.shape}")
    K = L.shape[1]
    w = np.full(K, 1.0 / K) if initial is None else np.asarray(initial, dtype=np.float64)
    check_weights(w.tolist(), K)
    mixed = mixture_logprobs(L, w)
    if not np.all(np.isfinite(mixed)):
        bad = int(np.flatnonzero(~np.isfinite(mixed))[0])
        raise ValueError(f"held-out token {bad} has probability 0 under every component with a positive weight")
    history = [float(-mixed.mean())]
    for _ in range(max_iters):
        with np.errstate(divide="ignore"):
            posterior = np.exp(L + np.log(w)[None, :] - mixed[:, None])  # (N, K) responsibilities
        w = posterior.mean(axis=0)
        w = w / w.sum()
        mixed = mixture_logprobs(L, w)
        history.append(float(-mixed.mean()))
        if history[-2] - history[-1] < tol:
            break
    return w, history


@torch.no_grad()
def component_target_logprobs(components: Sequence[LanguageModel], ids: Sequence[int] | torch.Tensor,
                              chunk: int = 256) -> np.ndarray:
    """(N-1, K) float64: log p_k(ids[t+1] | ids[:t+1]) for every component k, each reading the
    whole stream in order with its state carried (no window: an n-gram sees its n-1 words,
    a recurrent net everything before; a model with a bounded context is refused).

    Only the targets are computed where a family allows it (``LanguageModel.target_logprobs``:
    an n-gram's ``token_logprobs``, a cache's matches, an adaptive softmax's target clusters);
    otherwise from the full log-softmax."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise ValueError(f"a stream of {ids.numel()} token(s) has nothing to score; give at least 2 tokens")
    columns = []
    for model in components:
        if model.max_context is not None and model.max_context < ids.numel():
            raise ValueError(f"the {model.family} component has a context of {model.max_context} tokens; "
                             f"it cannot read a stream of {ids.numel()} tokens with its state carried")
        device = model.device
        out, state = [], None
        for s in range(0, ids.numel() - 1, chunk):
            x = ids[s : s + chunk][None].to(device)
            y = ids[s + 1 : s + chunk + 1][None].to(device)
            x = x[:, : y.shape[1]]
            lp, state = model.target_logprobs(x, y, state)
            out.append(lp[0].double().cpu())
        columns.append(torch.cat(out))
    return torch.stack(columns, dim=1).numpy()
