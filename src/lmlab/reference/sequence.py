"""Scoring and sampling with any one-token-at-a-time model, in numpy.

A step function maps (token id, state) to (logits over the next token, state):

    logits, state = step_fn(token, state)     # token: int; logits: (V,); state=None to start

e.g. ``RecurrentLM.step``. The probability of token y_t is read from the
distribution produced *before* y_t is fed in, i.e. after the prompt and y_1..y_{t-1}:

    NLL = -sum_t log softmax(logits_{t-1})[y_t],    perplexity = exp(NLL / len(ids))
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from lmlab.reference.ops import log_softmax, softmax

__all__ = ["token_nlls", "sequence_nll", "perplexity", "sample"]

StepFn = Callable[[int, Any], tuple[np.ndarray, Any]]


def _logits(x) -> np.ndarray:
    """(V,) or (1, V) -> (V,) float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 1:
        raise ValueError(f"step_fn returned logits of shape {x.shape}; expected (V,) or (1, V)")
    return x


def _feed(step_fn: StepFn, prompt: Sequence[int], state: Any = None):
    if len(prompt) == 0:
        raise ValueError("prompt is empty; give at least one token (e.g. <bos>) so that the first "
                         "token has a distribution to be read from")
    logits = None
    for t in prompt:
        logits, state = step_fn(int(t), state)
    return _logits(logits), state


def token_nlls(step_fn: StepFn, ids: Sequence[int], prompt: Sequence[int]) -> np.ndarray:
    """-log p(ids[t] | prompt, ids[:t]) for each t: (len(ids),) float64, in nats."""
    logits, state = _feed(step_fn, prompt)
    out = np.empty(len(ids))
    for t, y in enumerate(ids):
        logp = log_softmax(logits)
        if not 0 <= int(y) < logp.shape[0]:
            raise ValueError(f"token id {int(y)} at position {t} is outside the vocabulary [0, {logp.shape[0]})")
        out[t] = -logp[int(y)]
        if t + 1 < len(ids):            # the last token's successor distribution is never needed
            logits, state = step_fn(int(y), state)
            logits = _logits(logits)
    return out


def sequence_nll(step_fn: StepFn, ids: Sequence[int], prompt: Sequence[int]) -> float:
    """Total negative log-likelihood (nats) of ``ids`` after ``prompt``."""
    return float(token_nlls(step_fn, ids, prompt).sum())


def perplexity(step_fn: StepFn, ids: Sequence[int], prompt: Sequence[int]) -> float:
    """exp(NLL / len(ids))."""
    if len(ids) == 0:
        raise ValueError("ids is empty; perplexity needs at least one scored token")
    return math.exp(sequence_nll(step_fn, ids, prompt) / len(ids))


def sample(step_fn: StepFn, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 1.0,
           greedy: bool = False, seed: int | np.random.Generator | None = None,
           stop_id: int | None = None) -> np.ndarray:
    """Generate up to ``max_new_tokens`` ids after ``prompt``: (n,) int64, prompt not included.

    Each token is drawn from softmax(logits / temperature) with a numpy Generator
    (``seed``: an int or a Generator); ``greedy=True`` or ``temperature=0`` takes the argmax.
    Generation stops after ``stop_id`` is produced (it is included).
    """
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0; got {temperature}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    logits, state = _feed(step_fn, prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        if greedy or temperature == 0:
            y = int(np.argmax(logits))
        else:
            p = softmax(logits / temperature)
            y = int(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right"))
            y = min(y, p.shape[0] - 1)   # guard against rounding at the top of the cumsum
        out.append(y)
        if y == stop_id or len(out) == max_new_tokens:
            break
        logits, state = step_fn(y, state)
        logits = _logits(logits)
    return np.asarray(out, dtype=np.int64)
