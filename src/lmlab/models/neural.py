"""Small neural language models: bigram table, context average, MLP (Bengio et al. 2003).

All three answer ``logits, state = model(ids, state)`` with ids (B, T) int64 and
logits (B, T, V): ``logits[:, t]`` scores the token that follows ``ids[:, t]``.

- ``bigram``: P(x_{t+1} | x_t) = softmax(E[:, x_t]) with a learnable (V, V)
  matrix ``E`` (column = previous token). State: ``last`` (B, 1), the last token.
- ``context-average``: c_t = mean of the embeddings of the tokens seen so far
  (the whole prefix, this state included); logits = W c_t + b.
  State: ``sum`` (B, E) running sum of embeddings; the count is ``state.length``.
- ``mlp``: the embeddings of the last ``context`` tokens, concatenated (oldest
  first), go through ``n_layer`` tanh hidden layers to the logits; positions
  before the start of the sequence read ``pad_id``. Optional direct connections
  (embeddings -> logits) as in Bengio et al. State: ``context`` (B, context - 1),
  the last context - 1 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.base import LanguageModel, State, register


def _check_ids(ids: torch.Tensor) -> None:
    if ids.dim() != 2:
        raise ValueError(f"ids must have shape (B, T), got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"ids must be an integer tensor, got dtype {ids.dtype}")


def _check_state(state: State, key: str, batch: int, family: str) -> torch.Tensor:
    if key not in state.tensors:
        raise ValueError(f"a {family} state holds {key!r}; got a state with {sorted(state.tensors)}")
    t = state.tensors[key]
    if t.shape[0] != batch:
        raise ValueError(f"state has batch size {t.shape[0]} but ids have batch size {batch}")
    return t


def _positive(config, *names: str) -> None:
    for name in names:
        if int(getattr(config, name)) < 1:
            raise ValueError(f"{name}={getattr(config, name)} must be a positive integer")


def _dropout_ok(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout={p} must be in [0, 1)")


# ---------------------------------------------------------------- bigram


@dataclass
class BigramConfig:
    vocab_size: int
    block_size: int = 64   # training window; the model itself has no context limit

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "block_size")


@register("bigram", BigramConfig)
class BigramLM(LanguageModel):
    """P(x_{t+1} | x_t) = softmax(E[:, x_t]); ``E`` is (V, V), initialised to zeros (uniform)."""

    def __init__(self, config: BigramConfig) -> None:
        super().__init__()
        self.config = config
        self.E = nn.Parameter(torch.zeros(config.vocab_size, config.vocab_size))

    def conditional(self) -> torch.Tensor:
        """(V, V) matrix whose column i is P(. | previous token i)."""
        return self.E.softmax(0)

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids: (B, T) -> logits (B, T, V), state with ``last`` (B, 1)."""
        _check_ids(ids)
        B, T = ids.shape
        start = 0 if state is None else state.length
        if state is not None:
            _check_state(state, "last", B, "bigram")
        logits = F.embedding(ids, self.E.t())
        if T == 0:  # nothing new: keep the last token (a fresh state has none; it reads 0)
            last = state.tensors["last"] if state is not None else ids.new_zeros(B, 1, dtype=torch.long)
        else:
            last = ids[:, -1:].long()
        return logits, State({"last": last}, start + T, offsets=None if state is None else state.offsets)


# ---------------------------------------------------------------- context average


@dataclass
class ContextAverageConfig:
    vocab_size: int
    block_size: int = 64
    n_embd: int = 32
    bias: bool = True
    dropout: float = 0.0   # on the context vector c_t

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "block_size", "n_embd")
        _dropout_ok(self.dropout)


@register("context-average", ContextAverageConfig)
class ContextAverageLM(LanguageModel):
    """Bag of words: logits_t = W mean(emb(x_1..x_t)) + b."""

    def __init__(self, config: ContextAverageConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.bias)

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids: (B, T) -> logits (B, T, V), state with ``sum`` (B, n_embd); count = state.length."""
        _check_ids(ids)
        B, T = ids.shape
        x = self.embedding(ids)  # (B, T, E)
        if state is None:
            start, prev = 0, x.new_zeros(B, self.config.n_embd)
        else:
            start, prev = state.length, _check_state(state, "sum", B, "context-average")
        sums = prev[:, None, :] + x.cumsum(1)  # (B, T, E)
        counts = torch.arange(1, T + 1, device=x.device, dtype=x.dtype)[None, :]  # (1, T) or (B, T)
        offsets = None if state is None else state.offsets
        counts = counts + (start if offsets is None else state.positions.to(x.dtype)[:, None])
        context = sums / counts[..., None]
        logits = self.lm_head(self.drop(context))
        new_sum = sums[:, -1] if T else prev
        return logits, State({"sum": new_sum}, start + T, offsets=offsets)


# ---------------------------------------------------------------- MLP


@dataclass
class MLPConfig:
    vocab_size: int
    block_size: int = 64
    context: int = 3        # n: tokens the model sees (this one and n - 1 before it)
    n_embd: int = 16        # embedding dimension per token
    n_hidden: int = 128     # width of each hidden layer
    n_layer: int = 1        # hidden tanh layers
    dropout: float = 0.0    # after each hidden layer
    pad_id: int = 0         # token read at positions before the start of the sequence
    direct: bool = False    # Bengio's direct connections: embeddings -> logits

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "block_size", "context", "n_embd", "n_hidden", "n_layer")
        _dropout_ok(self.dropout)
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id={self.pad_id} must be a token id in 0..{self.vocab_size - 1}")


@register("mlp", MLPConfig)
class MLPLM(LanguageModel):
    """logits_t = U tanh(...tanh(H [e(x_{t-n+1}); ...; e(x_t)] + d)...) + b (+ W [e...])."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embedding = nn.Embedding(c.vocab_size, c.n_embd)
        layers: list[nn.Module] = []
        width = c.context * c.n_embd
        for _ in range(c.n_layer):
            layers += [nn.Linear(width, c.n_hidden), nn.Tanh(), nn.Dropout(c.dropout)]
            width = c.n_hidden
        self.hidden = nn.Sequential(*layers)
        self.lm_head = nn.Linear(c.n_hidden, c.vocab_size)
        if c.direct:
            self.direct = nn.Linear(c.context * c.n_embd, c.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids: (B, T) -> logits (B, T, V), state with ``context`` (B, context - 1)."""
        _check_ids(ids)
        c = self.config
        B, T = ids.shape
        ids = ids.long()
        if state is None:
            start, prev = 0, ids.new_full((B, c.context - 1), c.pad_id)
        else:
            start, prev = state.length, _check_state(state, "context", B, "mlp")
        if T == 0:
            return self.lm_head.weight.new_zeros(B, 0, c.vocab_size), State({"context": prev}, start, offsets=None if state is None else state.offsets)
        full = torch.cat([prev, ids], dim=1)  # (B, n - 1 + T)
        new_prev = full[:, full.shape[1] - (c.context - 1) :]
        windows = full.unfold(1, c.context, 1)  # (B, T, n), oldest first
        x = self.embedding(windows).reshape(B, T, c.context * c.n_embd)
        logits = self.lm_head(self.hidden(x))
        if c.direct:
            logits = logits + self.direct(x)
        return logits, State({"context": new_prev}, start + T, offsets=None if state is None else state.offsets)
