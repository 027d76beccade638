"""Training throughput: tokens per second and model FLOPs utilisation (MFU).

FLOPs of one training token (forward and backward), the convention of PaLM
(Chowdhery et al. 2022, appendix B) and nanoGPT's ``estimate_mfu``::

    6 * N  +  12 * n_layer * d_attn * T         (the second term: lmlab's transformers only)

- ``N``: the parameters a token is multiplied by — every parameter except the
  tables only read by lookup: token embeddings (unless tied to the output layer,
  which multiplies), learned position embeddings, the bigram family's whole table.
  Each costs 2 FLOPs forward (multiply, add) and 4 backward (the gradients of the
  input and of the weight). Norm weights and biases count too, as nanoGPT counts them.
- attention (transformer, masked-transformer): per layer and token, the scores
  ``q k^T`` and the weighted sum of the values each cost ``2 * T * d_attn`` forward
  (``d_attn = n_head * head_dim``, ``T`` the training window: the full square, as
  PaLM counts it, although a causal mask skips half), times 3 for the backward.
- per family this is: bigram 0 (a lookup: no MFU is reported); context average and
  MLP 6 x (their linear layers); RNN/GRU/LSTM 6 x (input, recurrent and output
  weights and biases: 1, 3 and 4 gates); transformer as above. An adaptive softmax
  counts all its clusters, as if every token went through each (an upper bound).
  Other models (``hf:``) count ``6 * N`` without an attention term.

MFU = FLOPs per second achieved / the device's peak (:mod:`lmlab.hardware`).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from torch import nn

from lmlab.hardware import PeakFlops

TIMED_FIELDS = ("time", "tokens_per_second", "mfu")
"""The fields of a metrics.jsonl record that depend on the wall clock (the rest are exact)."""


def dense_parameters(model: nn.Module) -> int:
    """Parameters multiplied by every token: all but those only read by lookup (see module docstring)."""
    from lmlab.models.neural import BigramLM

    if isinstance(model, BigramLM):
        return 0
    lookup = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    multiplied = {id(p) for m in model.modules() if not isinstance(m, nn.Embedding)
                  for p in m.parameters(recurse=False)}
    return sum(p.numel() for p in model.parameters() if id(p) not in lookup or id(p) in multiplied)


def attention_flops_per_token(model: nn.Module, seq_len: int) -> int:
    """12 * T * d_attn summed over the attention layers of lmlab's transformers (training, per token)."""
    from lmlab.models.transformer import Attention

    return sum(12 * seq_len * m.n_head * m.head_dim for m in model.modules() if isinstance(m, Attention))


def flops_per_token(model: nn.Module, seq_len: int) -> int:
    """Training FLOPs (forward + backward) of one token in a window of ``seq_len`` tokens."""
    return 6 * dense_parameters(model) + attention_flops_per_token(model, seq_len)


def model_flops_utilisation(flops_per_second: float, peak: float | None) -> float | None:
    """Achieved / peak FLOPs per second (None when the peak is unknown or nothing was computed)."""
    if peak is None or flops_per_second <= 0:
        return None
    return flops_per_second / peak


class ThroughputMeter:
    """Counts the tokens and FLOPs of training steps against the training time only.

    ``count(x)`` after each batch x (B, T) (every position is computed, padding
    included), ``step_done()`` after each optimizer step; the time spent inside
    ``with meter.paused():`` (evaluation, checkpoints) is left out. ``interval()``
    gives the figures since its previous call, ``summary()`` those of the whole run.
    """

    def __init__(self, model: nn.Module, peak: PeakFlops) -> None:
        self.peak = peak
        self._dense = dense_parameters(model)
        self._model = model
        self._per_token: dict[int, int] = {}  # seq_len -> FLOPs per token
        self._clock = time.perf_counter()
        self.seconds = 0.0          # training time of the run so far
        self.tokens = 0
        self.flops = 0
        self.steps = 0
        self.first_step_seconds: float | None = None
        self._since = (0.0, 0, 0)   # (seconds, tokens, flops) at the last interval()

    def flops_per_token(self, seq_len: int) -> int:
        if seq_len not in self._per_token:
            self._per_token[seq_len] = 6 * self._dense + attention_flops_per_token(self._model, seq_len)
        return self._per_token[seq_len]

    def _tick(self) -> None:
        now = time.perf_counter()
        self.seconds += now - self._clock
        self._clock = now

    def count(self, x: torch.Tensor) -> None:
        """Add one batch of input windows x (B, T)."""
        self.tokens += x.numel()
        self.flops += x.numel() * self.flops_per_token(x.shape[-1])

    def step_done(self) -> None:
        self._tick()
        if self.steps == 0:
            self.first_step_seconds = self.seconds
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        self._tick()
        try:
            yield
        finally:
            self._clock = time.perf_counter()

    def _figures(self, seconds: float, tokens: int, flops: int) -> dict[str, Any]:
        seconds = max(seconds, 1e-9)
        return {"tokens_per_second": tokens / seconds,
                "mfu": model_flops_utilisation(flops / seconds, self.peak.flops) if flops else None}

    def interval(self) -> dict[str, Any]:
        """Tokens per second and MFU since the previous call (or the start)."""
        self._tick()
        seconds, tokens, flops = self._since
        self._since = (self.seconds, self.tokens, self.flops)
        return self._figures(self.seconds - seconds, self.tokens - tokens, self.flops - flops)

    def cold_start_seconds(self) -> float | None:
        """How much longer the first step took than an average later one (torch.compile's cold start)."""
        if self.steps < 2 or self.first_step_seconds is None:
            return None
        later = (self.seconds - self.first_step_seconds) / (self.steps - 1)
        return max(0.0, self.first_step_seconds - later)

    def summary(self) -> dict[str, Any]:
        """The run's training-time figures (this process's steps only on a resumed run)."""
        figures = self._figures(self.seconds, self.tokens, self.flops)
        return {
            "train_tokens_per_second": figures["tokens_per_second"],
            "mfu": figures["mfu"],
            "flops_per_token": self.flops / self.tokens if self.tokens else None,
            "peak_flops": self.peak.flops,
            "peak_flops_source": self.peak.source,
        }
