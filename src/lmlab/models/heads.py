"""Output layers shared by the neural families: hidden vectors -> next-token log-probabilities.

Large vocabularies (WikiText-2's 33,278 words) make a full softmax the most
expensive part of a word-level model. ``AdaptiveSoftmaxHead`` (Grave et al.
2017, PyTorch's ``nn.AdaptiveLogSoftmaxWithLoss``) splits the vocabulary by id
into a frequent *head* and rarer *tail clusters* read through smaller
projections:

    cutoffs=[2000, 10000]:  ids [0, 2000) + one logit per cluster  -> head, width d
                            ids [2000, 10000)                      -> cluster 1, width d / div_value
                            ids [10000, V)                         -> cluster 2, width d / div_value**2

It only saves time when ids are ordered by decreasing frequency (the frequent
words in the head): build the vocabulary that way.

Two paths, one distribution:

- training: ``head.loss(hidden, targets)`` evaluates only the target's cluster
  per position (the fast path; :func:`next_token_loss` picks it);
- scoring and decoding: ``head(hidden)`` returns the exact, normalized
  log-probabilities of the whole vocabulary (``log_prob``), so a model's
  "logits" are log-probabilities (``logsumexp == 0``) and every scorer,
  processor and search works on them unchanged.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.data import IGNORE


def check_adaptive_cutoffs(cutoffs: Sequence[int] | None, vocab_size: int, div_value: float) -> None:
    """Raise ValueError unless ``cutoffs`` is None or increasing integers in [1, vocab_size - 1]."""
    if cutoffs is None:
        return
    values = list(cutoffs)
    ok = (
        len(values) > 0
        and all(isinstance(c, int) and not isinstance(c, bool) for c in values)
        and all(0 < c < vocab_size for c in values)
        and all(a < b for a, b in zip(values, values[1:]))
    )
    if not ok:
        raise ValueError(
            f"adaptive_cutoffs={cutoffs!r} must be a non-empty list of increasing integers in [1, {vocab_size - 1}] "
            "(vocab_size - 1), e.g. [2000, 10000]; or null for a full softmax"
        )
    if not div_value > 1.0:
        raise ValueError(f"adaptive_div_value={div_value} must be > 1 (each cluster is div_value times narrower)")


class AdaptiveSoftmaxHead(nn.Module):
    """Adaptive softmax output layer: hidden (..., d) -> log-probabilities (..., V).

    Parameters are those of ``nn.AdaptiveLogSoftmaxWithLoss`` under ``adaptive.``
    (``adaptive.head.weight`` (cutoffs[0] + n_clusters, d), ``adaptive.tail.{i}.0.weight``
    (d // div**(i+1), d), ``adaptive.tail.{i}.1.weight`` (cluster size, d // div**(i+1))).
    """

    def __init__(self, in_features: int, vocab_size: int, cutoffs: Sequence[int], div_value: float = 4.0,
                 head_bias: bool = False) -> None:
        super().__init__()
        check_adaptive_cutoffs(cutoffs, vocab_size, div_value)
        narrowest = int(in_features // div_value ** len(cutoffs))
        if narrowest < 1:
            raise ValueError(
                f"adaptive_cutoffs={list(cutoffs)} with adaptive_div_value={div_value} gives the last cluster a "
                f"projection of {in_features} // {div_value}**{len(cutoffs)} = 0 features; "
                "use fewer cutoffs, a smaller div_value or a wider model"
            )
        self.vocab_size = vocab_size
        self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(in_features, vocab_size, list(cutoffs),
                                                      div_value=div_value, head_bias=head_bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., d) -> exact log-probabilities (..., V) (float32; they sum to 1 over V)."""
        lead = hidden.shape[:-1]
        flat = hidden.reshape(-1, hidden.shape[-1]).float()
        if flat.shape[0] == 0:
            return flat.new_zeros(*lead, self.vocab_size)
        with torch.autocast(hidden.device.type, enabled=False):
            return self.adaptive.log_prob(flat).view(*lead, self.vocab_size)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean NLL (nats) of ``targets`` (...,) given ``hidden`` (..., d); IGNORE targets are skipped.
        Only each target's own cluster is evaluated; the value equals the mean of
        ``-forward(hidden).gather(targets)`` over the kept positions."""
        keep = targets != IGNORE
        flat = hidden[keep].float()
        with torch.autocast(hidden.device.type, enabled=False):
            return self.adaptive(flat, targets[keep]).loss


def make_output_head(in_features: int, vocab_size: int, bias: bool, cutoffs: Sequence[int] | None,
                     div_value: float) -> nn.Module:
    """A full softmax layer (``nn.Linear``: logits) or, with ``cutoffs``, an :class:`AdaptiveSoftmaxHead`
    (log-probabilities)."""
    if cutoffs is None:
        return nn.Linear(in_features, vocab_size, bias=bias)
    return AdaptiveSoftmaxHead(in_features, vocab_size, cutoffs, div_value, head_bias=bias)


def next_token_loss(model, x: torch.Tensor, y: torch.Tensor, state=None):
    """(mean NLL of targets ``y`` given ``x`` and ``state``, the state after ``x``); x, y (B, T).

    IGNORE targets do not count. A model with an adaptive output layer (its
    ``adaptive_head`` is not None) is trained through the adaptive loss, which only
    evaluates each target's cluster; any other model through cross-entropy on its logits.
    """
    head = getattr(model, "adaptive_head", None)
    if head is not None:
        hidden, state = model.hidden_states(x, state)
        return head.loss(hidden, y), state
    logits, state = model(x, state)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), ignore_index=IGNORE), state
