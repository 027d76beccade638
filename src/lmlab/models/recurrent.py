"""Recurrent language models: Elman RNN, GRU, LSTM (families "rnn", "gru", "lstm").

    embedding -> dropout -> n_layer recurrent layers (dropout between them) -> dropout -> linear

The standard forms run through ``torch.nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``
(cuDNN on a GPU). Parameter names follow PyTorch's word_language_model
example (``encoder.weight``, ``rnn.weight_ih_l0``, ``rnn.weight_hh_l0``,
``rnn.bias_ih_l0``, ``rnn.bias_hh_l0``, ..., ``decoder.weight``,
``decoder.bias``), so weights of torch's recurrent modules load as they are.

GRU variants (``gru_variant``), gates r, z, n stacked in that order in each
(3H, .) weight, as torch does:

- ``"reset_after"`` (torch, cuDNN, Keras ``reset_after=True``):
  n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
- ``"classic"`` (Cho et al. 2014, Keras ``reset_after=False``):
  n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)

and in both r = sigmoid(W_ir x + b_ir + W_hr h + b_hr), z likewise,
h' = (1 - z) * n + z * h. The classic form runs a small Python loop over time.

State: ``h`` (B, n_layer, n_hidden) and, for the LSTM, ``c`` (B, n_layer, n_hidden);
batch first, as every lmlab state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.base import LanguageModel, State, register

CELLS = ("rnn", "gru", "lstm")
GRU_VARIANTS = ("reset_after", "classic")
NONLINEARITIES = ("tanh", "relu")


@dataclass
class RecurrentConfig:
    vocab_size: int
    block_size: int = 64               # training window (truncated backprop length)
    cell: str = "lstm"                 # "rnn" | "gru" | "lstm"; must match the family
    n_embd: int = 64                   # embedding dimension
    n_hidden: int = 128                # hidden units per layer
    n_layer: int = 1
    dropout: float = 0.0               # on the embeddings, between layers, and on the top layer's output
    nonlinearity: str = "tanh"         # rnn only: "tanh" | "relu"
    gru_variant: str = "reset_after"   # gru only: "reset_after" (torch/cuDNN) | "classic"
    tie_weights: bool = False          # decoder.weight = encoder.weight (needs n_embd == n_hidden)

    def __post_init__(self) -> None:
        for name, accepted in (("cell", CELLS), ("gru_variant", GRU_VARIANTS), ("nonlinearity", NONLINEARITIES)):
            if getattr(self, name) not in accepted:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; accepted: {accepted}")
        for name in ("vocab_size", "block_size", "n_embd", "n_hidden", "n_layer"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.tie_weights and self.n_embd != self.n_hidden:
            raise ValueError(
                f"tie_weights needs n_embd == n_hidden, got n_embd={self.n_embd}, n_hidden={self.n_hidden}"
            )
        if self.cell != "gru" and self.gru_variant != "reset_after":
            raise ValueError(f"gru_variant={self.gru_variant!r} applies to cell='gru' only, not cell={self.cell!r}")
        if self.cell != "rnn" and self.nonlinearity != "tanh":
            raise ValueError(f"nonlinearity={self.nonlinearity!r} applies to cell='rnn' only, not cell={self.cell!r}")


@dataclass
class RNNConfig(RecurrentConfig):
    cell: str = "rnn"


@dataclass
class GRUConfig(RecurrentConfig):
    cell: str = "gru"


@dataclass
class LSTMConfig(RecurrentConfig):
    cell: str = "lstm"


class ClassicGRU(nn.Module):
    """Multi-layer GRU with the reset gate applied before the hidden matmul (batch first).

    Same parameters, shapes and names as ``torch.nn.GRU`` (``weight_ih_l{k}`` (3H, in),
    ``weight_hh_l{k}`` (3H, H), ``bias_ih_l{k}``, ``bias_hh_l{k}`` (3H,), gates r, z, n).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers, self.dropout = input_size, hidden_size, num_layers, dropout
        H = hidden_size
        for k in range(num_layers):
            width = input_size if k == 0 else H
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(3 * H, width)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(3 * H, H)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(3 * H)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(3 * H)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, input_size), h0: (num_layers, B, H) -> output (B, T, H), h_n (num_layers, B, H)."""
        H = self.hidden_size
        finals = []
        for k in range(self.num_layers):
            w_ih, w_hh = getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}")
            b_ih, b_hh = getattr(self, f"bias_ih_l{k}"), getattr(self, f"bias_hh_l{k}")
            gi = F.linear(x, w_ih, b_ih)  # (B, T, 3H): all input projections at once
            h = h0[k]
            outputs = []
            for t in range(x.shape[1]):
                gh = F.linear(h, w_hh[: 2 * H], b_hh[: 2 * H])
                r = torch.sigmoid(gi[:, t, :H] + gh[:, :H])
                z = torch.sigmoid(gi[:, t, H : 2 * H] + gh[:, H:])
                n = torch.tanh(gi[:, t, 2 * H :] + F.linear(r * h, w_hh[2 * H :], b_hh[2 * H :]))
                h = (1 - z) * n + z * h
                outputs.append(h)
            finals.append(h)
            x = torch.stack(outputs, dim=1)
            if k < self.num_layers - 1 and self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
        return x, torch.stack(finals, dim=0)


class RecurrentLM(LanguageModel):
    """``logits, state = model(ids, state)``; ids (B, T) -> logits (B, T, V)."""

    def __init__(self, config: RecurrentConfig) -> None:
        super().__init__()
        family = getattr(type(self), "family", config.cell)
        if config.cell != family:
            raise ValueError(f"the {family!r} family needs cell={family!r}, got cell={config.cell!r}")
        self.config = c = config
        self.encoder = nn.Embedding(c.vocab_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        between = c.dropout if c.n_layer > 1 else 0.0
        if c.cell == "gru" and c.gru_variant == "classic":
            self.rnn = ClassicGRU(c.n_embd, c.n_hidden, c.n_layer, dropout=between)
        elif c.cell == "gru":
            self.rnn = nn.GRU(c.n_embd, c.n_hidden, c.n_layer, dropout=between, batch_first=True)
        elif c.cell == "lstm":
            self.rnn = nn.LSTM(c.n_embd, c.n_hidden, c.n_layer, dropout=between, batch_first=True)
        else:
            self.rnn = nn.RNN(
                c.n_embd, c.n_hidden, c.n_layer, nonlinearity=c.nonlinearity, dropout=between, batch_first=True
            )
        self.decoder = nn.Linear(c.n_hidden, c.vocab_size)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if c.tie_weights:
            self.decoder.weight = self.encoder.weight

    def initial_state(self, batch_size: int) -> State:
        """Zero hidden (and cell) vectors: what ``state=None`` means."""
        c = self.config
        p = self.decoder.weight
        tensors = {"h": p.new_zeros(batch_size, c.n_layer, c.n_hidden)}
        if c.cell == "lstm":
            tensors["c"] = p.new_zeros(batch_size, c.n_layer, c.n_hidden)
        return State(tensors, 0)

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids: (B, T) -> logits (B, T, V), state with ``h`` (and ``c``) of shape (B, n_layer, n_hidden)."""
        if ids.dim() != 2:
            raise ValueError(f"ids must have shape (B, T), got shape {tuple(ids.shape)}")
        c = self.config
        B, T = ids.shape
        if state is None:
            state = self.initial_state(B)
        keys = ("h", "c") if c.cell == "lstm" else ("h",)
        for key in keys:
            if key not in state.tensors:
                raise ValueError(f"a {c.cell} state holds {keys}; got a state with {sorted(state.tensors)}")
            shape = tuple(state.tensors[key].shape)
            if shape != (B, c.n_layer, c.n_hidden):
                raise ValueError(f"state {key!r} has shape {shape}; expected {(B, c.n_layer, c.n_hidden)} for ids of batch {B}")
        if T == 0:
            return self.decoder.weight.new_zeros(B, 0, c.vocab_size), state
        x = self.drop(self.encoder(ids))
        hidden = [state.tensors[k].transpose(0, 1).contiguous().to(x.dtype) for k in keys]  # (L, B, H)
        if c.cell == "lstm":
            out, (h, cell) = self.rnn(x, (hidden[0], hidden[1]))
            new = {"h": h.transpose(0, 1).contiguous(), "c": cell.transpose(0, 1).contiguous()}
        else:
            out, h = self.rnn(x, hidden[0])
            new = {"h": h.transpose(0, 1).contiguous()}
        logits = self.decoder(self.drop(out))
        return logits, State(new, state.length + T, offsets=state.offsets)


@register("rnn", RNNConfig)
class RNNLM(RecurrentLM):
    """Elman RNN language model (tanh or ReLU)."""


@register("gru", GRUConfig)
class GRULM(RecurrentLM):
    """GRU language model ("reset_after" via torch/cuDNN, or the "classic" form)."""


@register("lstm", LSTMConfig)
class LSTMLM(RecurrentLM):
    """LSTM language model."""
