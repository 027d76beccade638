"""A cache language model: the next word drawn from the text just read (family ``"cache"``).

Words that appeared recently are likely to appear again (a name, a topic word), which
a model estimated from a training corpus cannot know. The cache model (Kuhn and
De Mori 1990; Jelinek et al. 1991; the "unigram cache" of Grave et al. 2017) predicts
from the last ``window`` tokens of the history itself:

    p(w | h) = sum_{j recent, ctx(j) = ctx(t)} decay**age(j) [h_j = w]  /  sum_{same j} decay**age(j)

where ``age`` is 0 for the token just read, ``ctx`` is the ``order - 1`` tokens before a
position (order 1: every recent token counts; order 2: only those that followed the
word just read), and the sums run over the ``window`` most recent positions. When no
recent position matches (an empty history, an unseen context) the distribution is
uniform over the vocabulary. The cache alone gives probability 0 to every word it has
not seen, so it is meant as a component of an ``interpolate`` model, with a corpus
model (Kneser-Ney, an LSTM) beside it and the weights fitted by EM.

It has no parameters: its state is the window of token ids (``State.tensors["history"]``,
(B, window), -1 where a row has read fewer tokens), so rows at different positions
merge and beam search reorders them like any other state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmlab.models.base import LanguageModel, State, register

_CHUNK = 512  # tokens per internal step: bounds the (B, chunk, window + chunk) weight tensor


@dataclass
class CacheConfig:
    vocab_size: int
    order: int = 1          # 1: the word alone; n: the word after the same n-1 words
    decay: float = 1.0      # weight of a token read `age` steps ago: decay**age (1.0: all alike)
    window: int = 2000      # how many of the most recent tokens the cache holds

    def __post_init__(self) -> None:
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(f"vocab_size={self.vocab_size!r} must be a positive integer")
        if not isinstance(self.order, int) or self.order < 1:
            raise ValueError(f"order={self.order!r} must be an integer >= 1 (1: a unigram cache)")
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window={self.window!r} must be an integer >= 1 (tokens kept)")
        if not (isinstance(self.decay, (int, float)) and 0.0 < self.decay <= 1.0):
            raise ValueError(f"decay={self.decay!r} must be a number in (0, 1]")


@register("cache", CacheConfig)
class CacheLM(LanguageModel):
    """p(next | history) from the decayed counts of the last ``window`` tokens (see the module)."""

    def __init__(self, config: CacheConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids (B, T) -> log-probabilities (B, T, V) of the token after each position, and the window."""
        B, T = ids.shape
        history, length, offsets = self._start(ids, state)
        outputs = []
        for start in range(0, T, _CHUNK):
            logp, history = self._chunk(ids[:, start : start + _CHUNK], history)
            outputs.append(logp)
        if len(outputs) == 1:
            logits = outputs[0]
        else:
            logits = torch.cat(outputs, dim=1) if outputs else torch.zeros(B, 0, self.config.vocab_size, device=ids.device)
        return logits, State({"history": history}, length + T, offsets=offsets)

    def target_logprobs(self, ids: torch.Tensor, targets: torch.Tensor,
                        state: State | None = None) -> tuple[torch.Tensor, State]:
        """log p(targets[:, t] | ids[:, :t + 1], state) (B, T) float64 without the (B, T, V) distribution,
        and the state after ``ids``: what ``forward`` gives at the targets, for scoring long streams."""
        B, T = ids.shape
        history, length, offsets = self._start(ids, state)
        out = []
        for start in range(0, T, _CHUNK):
            chunk, y = ids[:, start : start + _CHUNK], targets[:, start : start + _CHUNK]
            seq, masses = self._masses(chunk, history)
            total = masses.sum(dim=-1)                                          # (B, t)
            hit = (masses * (seq[:, None, :] == y[:, :, None])).sum(dim=-1)
            out.append(torch.log(torch.where(total > 0, hit / total.clamp(min=1e-300), 1.0 / self.config.vocab_size)))
            history = seq[:, chunk.shape[1]:].contiguous()
        logp = torch.cat(out, dim=1) if out else torch.zeros(B, 0, dtype=torch.float64)
        return logp, State({"history": history}, length + T, offsets=offsets)

    def _start(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """(history (B, W), length, offsets) to continue from; checks the ids."""
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}); got {int(ids.min())}..{int(ids.max())}")
        if state is None:
            return torch.full((ids.shape[0], self.config.window), -1, dtype=torch.long, device=ids.device), 0, None
        return state.tensors["history"].to(ids.device), state.length, state.offsets

    def _masses(self, ids: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T), history (B, W) -> (seq = history + ids (B, W + T), masses (B, T, W + T) float64):
        the weight candidate position j of seq has for the prediction after ids[:, t]."""
        B, T = ids.shape
        W = self.config.window
        seq = torch.cat([history, ids], dim=1)                                 # (B, W + T)
        # Prediction t has just read seq[:, W + t]; candidate j is age W + t - j back.
        age = (W + torch.arange(T, device=ids.device))[:, None] - torch.arange(W + T, device=ids.device)[None, :]
        inside = (age >= 0) & (age < W)                                        # (T, W + T)
        powers = self.config.decay ** torch.arange(W, dtype=torch.float64, device=ids.device)   # (W,)
        weight = torch.where(inside, powers[age.clamp(0, W - 1)], 0.0)
        match = inside[None] & (seq >= 0)[:, None, :]                          # (B, T, W + T)
        for k in range(1, self.config.order):
            # the token k back of candidate j is seq[j - k]; of prediction t, seq[W + t + 1 - k]
            candidate = torch.cat([seq.new_full((B, k), -1), seq[:, :-k]], dim=1)        # (B, W + T)
            current = seq[:, W + 1 - k : W + 1 - k + T]                                     # (B, T)
            match &= (candidate[:, None, :] == current[:, :, None]) & (current >= 0)[:, :, None]
        return seq, weight[None] * match

    def _chunk(self, ids: torch.Tensor, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, T), history (B, W) -> log-probs (B, T, V) and the last W tokens of history + ids."""
        B, T = ids.shape
        W, V = self.config.window, self.config.vocab_size
        seq, masses = self._masses(ids, history)
        total = masses.sum(dim=-1, keepdim=True)                               # (B, T, 1)
        tokens = seq.clamp(min=0)[:, None, :].expand(B, T, W + T)
        buffer = torch.zeros(B, T, V, dtype=torch.float32, device=ids.device)
        buffer.scatter_add_(2, tokens, (masses / total.clamp(min=1e-300)).float())
        # Only the tokens of the window can have mass: take the log there and -inf elsewhere,
        # never a log over the whole vocabulary (log(0) is a slow path). A token's every
        # occurrence writes the same value.
        seen = buffer.gather(2, tokens)                                        # (B, T, W + T)
        logs = seen.clamp(min=1e-30).log_().masked_fill_(seen == 0, -math.inf)
        logp = buffer.fill_(-math.inf).scatter_(2, tokens, logs)
        empty = total[..., 0] == 0                                             # nothing to go on: uniform
        if bool(empty.any()):
            logp[empty] = -math.log(V)
        return logp, seq[:, T:].contiguous()
