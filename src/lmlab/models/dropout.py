"""Dropout forms for word-level models (training only; identities in eval mode).

- ``embedding_dropout``: whole rows of the embedding matrix (word *types*) are
  zeroed for one forward pass, so every occurrence of a dropped word in the batch
  loses its vector (Gal & Ghahramani 2016; AWD-LSTM's ``dropoute``).
- ``locked_dropout``: one mask per sequence and feature, shared by every time step
  (variational dropout, Gal & Ghahramani 2016; AWD-LSTM's ``LockedDropout``),
  instead of a fresh mask per position.

Both scale the kept values by 1 / (1 - p), so the expectation is unchanged.
"""

from __future__ import annotations

import torch


def embedding_dropout(weight: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """weight (V, C) with each row zeroed with probability ``p`` (kept rows scaled by 1/(1-p))."""
    if not training or p == 0.0:
        return weight
    keep = torch.empty(weight.shape[0], 1, device=weight.device, dtype=weight.dtype).bernoulli_(1 - p)
    return weight * keep / (1 - p)


def locked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """x (B, T, C) with one (B, 1, C) mask for all T steps (kept values scaled by 1/(1-p))."""
    if not training or p == 0.0:
        return x
    mask = torch.empty(x.shape[0], 1, x.shape[2], device=x.device, dtype=x.dtype).bernoulli_(1 - p)
    return x * mask / (1 - p)
