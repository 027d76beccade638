"""Recurrent language models: Elman RNN, GRU, LSTM (families "rnn", "gru", "lstm").

    embedding -> dropout -> n_layer recurrent layers (dropout between them) -> dropout
              [-> linear projection to output_size] -> output layer (full or adaptive softmax)

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

Widths: ``n_hidden`` is one width for every layer (an int) or one per layer (a list
of n_layer ints, e.g. [128, 64]: layer k maps width k-1 to width k). Equal widths run
through the torch modules above; different ones through ``LayeredRecurrent``, which
keeps their parameter names and shapes per layer and runs each layer with the same
kernel.

State: ``h`` (B, n_layer, max width) and, for the LSTM, ``c`` likewise; batch first,
as every lmlab state. Layer k's vector is ``h[:, k, :width_k]``; with different
widths the rest of the row is zeros.

Word-level regularisation (Merity et al. 2018, AWD-LSTM; all off by default):

- ``embed_dropout``: whole word types dropped from the embedding matrix per forward;
- ``variational_dropout=True``: the dropouts on the embeddings (``input_dropout``),
  between layers (``hidden_dropout``) and on the top layer's output (``dropout``) use
  one mask per sequence shared over time (Gal & Ghahramani 2016) instead of a fresh
  mask per step; ``input_dropout``/``hidden_dropout`` default to ``dropout``. The layers
  then run through ``LayeredRecurrent`` (the same parameters, masks between layers);
- ``tie_weights``: the output layer reuses the embedding matrix (Press & Wolf 2017;
  Inan et al. 2017). It needs the vector the output layer reads to have n_embd
  features: the top layer's width, or ``output_size`` which adds a linear projection
  from the top layer to output_size (``projection.weight``, ``projection.bias``).

``adaptive_cutoffs`` replaces the full softmax by an adaptive softmax
(``lmlab.models.heads``): trained on each target's cluster only, scored exactly; the
logits are then normalized log-probabilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.base import LanguageModel, State, register
from lmlab.models.dropout import embedding_dropout, locked_dropout
from lmlab.models.heads import check_adaptive_cutoffs, make_output_head

CELLS = ("rnn", "gru", "lstm")
GRU_VARIANTS = ("reset_after", "classic")
NONLINEARITIES = ("tanh", "relu")


@dataclass
class RecurrentConfig:
    vocab_size: int
    block_size: int = 64               # training window (truncated backprop length)
    cell: str = "lstm"                 # "rnn" | "gru" | "lstm"; must match the family
    n_embd: int = 64                   # embedding dimension
    n_hidden: int | list[int] = 128    # hidden units: one width for every layer, or a list of n_layer widths
    n_layer: int = 1
    dropout: float = 0.0               # on the embeddings, between layers, and on the top layer's output
    nonlinearity: str = "tanh"         # rnn only: "tanh" | "relu"
    gru_variant: str = "reset_after"   # gru only: "reset_after" (torch/cuDNN) | "classic"
    tie_weights: bool = False          # decoder.weight = encoder.weight (needs n_embd == the width the decoder reads)
    embed_dropout: float = 0.0         # whole embedding rows (word types) dropped per forward
    input_dropout: float | None = None   # on the embeddings; None: dropout
    hidden_dropout: float | None = None  # between layers; None: dropout
    variational_dropout: bool = False  # one dropout mask per sequence, shared over time steps
    output_size: int | None = None     # None: the decoder reads the top layer; else a projection to output_size
    adaptive_cutoffs: list[int] | None = None  # adaptive softmax output layer (see lmlab.models.heads); None: full softmax
    adaptive_div_value: float = 4.0            # each tail cluster's projection is this many times narrower

    def __post_init__(self) -> None:
        for name, accepted in (("cell", CELLS), ("gru_variant", GRU_VARIANTS), ("nonlinearity", NONLINEARITIES)):
            if getattr(self, name) not in accepted:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; accepted: {accepted}")
        for name in ("vocab_size", "block_size", "n_embd", "n_layer"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if isinstance(self.n_hidden, (list, tuple)):
            self.n_hidden = list(self.n_hidden)
            if len(self.n_hidden) != self.n_layer:
                raise ValueError(f"n_hidden={self.n_hidden} gives {len(self.n_hidden)} layer widths but "
                                 f"n_layer={self.n_layer}; give one width per layer, or one int for all")
        widths = self.n_hidden if isinstance(self.n_hidden, list) else [self.n_hidden]
        if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
            raise ValueError(f"n_hidden={self.n_hidden!r} must be a positive integer or a list of them")
        for name in ("dropout", "embed_dropout", "input_dropout", "hidden_dropout"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value} must be in [0, 1)")
        if self.output_size is not None and int(self.output_size) < 1:
            raise ValueError(f"output_size={self.output_size} must be a positive integer (or null: no projection)")
        if self.tie_weights and self.decoder_width != self.n_embd:
            raise ValueError(
                f"tie_weights needs the output layer's input width to equal n_embd={self.n_embd}, but it reads the "
                f"top layer's {self.hidden_sizes[-1]} units (n_hidden={self.n_hidden}); make the top layer n_embd "
                f"wide or set output_size={self.n_embd} to add a projection"
            )
        check_adaptive_cutoffs(self.adaptive_cutoffs, self.vocab_size, self.adaptive_div_value)
        if self.adaptive_cutoffs is not None and self.tie_weights:
            raise ValueError("adaptive_cutoffs cannot be combined with tie_weights=true (the adaptive output layer "
                             "has no (vocab_size, n_embd) matrix to share); set tie_weights=false")
        if self.cell != "gru" and self.gru_variant != "reset_after":
            raise ValueError(f"gru_variant={self.gru_variant!r} applies to cell='gru' only, not cell={self.cell!r}")
        if self.cell != "rnn" and self.nonlinearity != "tanh":
            raise ValueError(f"nonlinearity={self.nonlinearity!r} applies to cell='rnn' only, not cell={self.cell!r}")

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        """The width of each layer, bottom to top."""
        if isinstance(self.n_hidden, list):
            return tuple(self.n_hidden)
        return (self.n_hidden,) * self.n_layer

    @property
    def decoder_width(self) -> int:
        """Features of the vector the output layer reads: output_size, or the top layer's width."""
        return self.output_size if self.output_size is not None else self.hidden_sizes[-1]

    def dropout_rates(self) -> tuple[float, float, float]:
        """(on the embeddings, between layers, on the top output)."""
        pick = lambda value: self.dropout if value is None else value  # noqa: E731
        return pick(self.input_dropout), pick(self.hidden_dropout), self.dropout


@dataclass
class RNNConfig(RecurrentConfig):
    cell: str = "rnn"


@dataclass
class GRUConfig(RecurrentConfig):
    cell: str = "gru"


@dataclass
class LSTMConfig(RecurrentConfig):
    cell: str = "lstm"


GATE_COUNT = {"rnn": 1, "gru": 3, "lstm": 4}


class LayeredRecurrent(nn.Module):
    """Stacked RNN / GRU / LSTM layers, each of its own width (batch first).

    Layer k maps ``widths[k - 1]`` (``input_size`` for k = 0) to ``widths[k]`` = H_k; its
    parameters have ``torch.nn.RNN``/``GRU``/``LSTM``'s names and per-layer shapes:
    ``weight_ih_l{k}`` (G H_k, in_k), ``weight_hh_l{k}`` (G H_k, H_k), ``bias_ih_l{k}``,
    ``bias_hh_l{k}`` (G H_k,), gates stacked as torch does (GRU r, z, n; LSTM i, f, g, o).
    Each layer runs through the kernel those modules use (``torch.lstm``, ``torch.gru``,
    ``torch.rnn_tanh``/``rnn_relu``), or, for the classic GRU (``reset_after=False``), a
    Python loop over time. Dropout acts between layers in training, as in torch, or with
    ``locked=True`` with one mask per sequence for all time steps (variational dropout).

    Hidden states go in and out like ``nn.LSTM``'s, (L, B, max width) (a tuple (h, c) for
    the LSTM); layer k reads and writes ``[k, :, :H_k]``, the rest is zeros.
    """

    def __init__(self, cell: str, input_size: int, widths, *, nonlinearity: str = "tanh",
                 reset_after: bool = True, dropout: float = 0.0, locked: bool = False) -> None:
        super().__init__()
        self.locked = locked
        self.cell, self.input_size, self.widths = cell, input_size, [int(w) for w in widths]
        self.num_layers, self.nonlinearity, self.reset_after, self.dropout = len(self.widths), nonlinearity, reset_after, dropout
        G = GATE_COUNT[cell]
        for k, H in enumerate(self.widths):
            width = input_size if k == 0 else self.widths[k - 1]
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(G * H, width)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(G * H, H)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(G * H)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(G * H)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(-1/sqrt(H_k), 1/sqrt(H_k)) per layer, torch's init."""
        for k, H in enumerate(self.widths):
            for p in self.layer_parameters(k):
                nn.init.uniform_(p, -1.0 / math.sqrt(H), 1.0 / math.sqrt(H))

    def layer_parameters(self, k: int) -> list[nn.Parameter]:
        """[weight_ih, weight_hh, bias_ih, bias_hh] of layer k."""
        return [getattr(self, f"{n}_l{k}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    def _layer(self, k: int, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None):
        """Layer k over x (B, T, in_k) from h, c (1, B, H_k) -> output (B, T, H_k), h_n, c_n."""
        params = self.layer_parameters(k)
        if self.cell == "lstm":
            return torch.lstm(x, [h, c], params, True, 1, 0.0, self.training, False, True)
        if self.cell == "gru" and not self.reset_after:
            return (*_classic_gru_layer(x, h[0], *params), None)
        run = torch.gru if self.cell == "gru" else torch.rnn_relu if self.nonlinearity == "relu" else torch.rnn_tanh
        return (*run(x, h, params, True, 1, 0.0, self.training, False, True), None)

    def forward(self, x: torch.Tensor, hx):
        """x: (B, T, input_size), hx: (L, B, max width), or (h, c) for the LSTM ->
        output (B, T, H_top) and the final states in the form of hx."""
        lstm = self.cell == "lstm"
        h0, c0 = hx if lstm else (hx, None)
        width = h0.shape[-1]
        hs, cs = [], []
        for k, H in enumerate(self.widths):
            x, h, c = self._layer(k, x, h0[k : k + 1, :, :H], c0[k : k + 1, :, :H] if lstm else None)
            hs.append(F.pad(h.reshape(-1, H), (0, width - H)))
            if lstm:
                cs.append(F.pad(c.reshape(-1, H), (0, width - H)))
            if k < self.num_layers - 1 and self.dropout > 0:
                drop = locked_dropout if self.locked else F.dropout
                x = drop(x, self.dropout, self.training)
        h = torch.stack(hs, dim=0)
        return (x, (h, torch.stack(cs, dim=0))) if lstm else (x, h)


def _classic_gru_layer(x, h, w_ih, w_hh, b_ih, b_hh):
    """One classic GRU layer: x (B, T, in), h (B, H) -> output (B, T, H), h_n (1, B, H)."""
    H = h.shape[-1]
    gi = F.linear(x, w_ih, b_ih)  # (B, T, 3H): all input projections at once
    outputs = []
    for t in range(x.shape[1]):
        gh = F.linear(h, w_hh[: 2 * H], b_hh[: 2 * H])
        r = torch.sigmoid(gi[:, t, :H] + gh[:, :H])
        z = torch.sigmoid(gi[:, t, H : 2 * H] + gh[:, H:])
        n = torch.tanh(gi[:, t, 2 * H :] + F.linear(r * h, w_hh[2 * H :], b_hh[2 * H :]))
        h = (1 - z) * n + z * h
        outputs.append(h)
    return torch.stack(outputs, dim=1), h[None]


class ClassicGRU(LayeredRecurrent):
    """Multi-layer GRU with the reset gate applied before the hidden matmul (batch first).

    Same parameters, shapes and names as ``torch.nn.GRU`` (``weight_ih_l{k}`` (3H, in),
    ``weight_hh_l{k}`` (3H, H), ``bias_ih_l{k}``, ``bias_hh_l{k}`` (3H,), gates r, z, n);
    ``hidden_size`` is one width or a list of one per layer.
    """

    def __init__(self, input_size: int, hidden_size, num_layers: int = 1, dropout: float = 0.0) -> None:
        widths = list(hidden_size) if isinstance(hidden_size, (list, tuple)) else [hidden_size] * num_layers
        super().__init__("gru", input_size, widths, reset_after=False, dropout=dropout)


class RecurrentLM(LanguageModel):
    """``logits, state = model(ids, state)``; ids (B, T) -> logits (B, T, V)."""

    def __init__(self, config: RecurrentConfig) -> None:
        super().__init__()
        family = getattr(type(self), "family", config.cell)
        if config.cell != family:
            raise ValueError(f"the {family!r} family needs cell={family!r}, got cell={config.cell!r}")
        self.config = c = config
        self.encoder = nn.Embedding(c.vocab_size, c.n_embd)
        between = c.dropout_rates()[1] if c.n_layer > 1 else 0.0
        widths = c.hidden_sizes
        if c.variational_dropout:
            self.rnn = LayeredRecurrent(c.cell, c.n_embd, widths, nonlinearity=c.nonlinearity,
                                        reset_after=c.gru_variant != "classic", dropout=between, locked=True)
        elif c.cell == "gru" and c.gru_variant == "classic":
            self.rnn = ClassicGRU(c.n_embd, list(widths), dropout=between)
        elif len(set(widths)) > 1:
            self.rnn = LayeredRecurrent(c.cell, c.n_embd, widths, nonlinearity=c.nonlinearity, dropout=between)
        elif c.cell == "gru":
            self.rnn = nn.GRU(c.n_embd, widths[0], c.n_layer, dropout=between, batch_first=True)
        elif c.cell == "lstm":
            self.rnn = nn.LSTM(c.n_embd, widths[0], c.n_layer, dropout=between, batch_first=True)
        else:
            self.rnn = nn.RNN(
                c.n_embd, widths[0], c.n_layer, nonlinearity=c.nonlinearity, dropout=between, batch_first=True
            )
        if c.output_size is not None:
            self.projection = nn.Linear(widths[-1], c.output_size)
        self.decoder = make_output_head(c.decoder_width, c.vocab_size, True, c.adaptive_cutoffs, c.adaptive_div_value)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        if c.adaptive_cutoffs is None:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
            nn.init.zeros_(self.decoder.bias)
        if c.tie_weights:
            self.decoder.weight = self.encoder.weight

    @property
    def adaptive_head(self) -> nn.Module | None:
        return self.decoder if self.config.adaptive_cutoffs is not None else None

    def initial_state(self, batch_size: int) -> State:
        """Zero hidden (and cell) vectors: what ``state=None`` means."""
        c = self.config
        p = self.encoder.weight
        shape = (batch_size, c.n_layer, max(c.hidden_sizes))
        tensors = {"h": p.new_zeros(shape)}
        if c.cell == "lstm":
            tensors["c"] = p.new_zeros(shape)
        return State(tensors, 0)

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids: (B, T) -> logits (B, T, V), state with ``h`` (and ``c``) of shape (B, n_layer, max width).

        With an adaptive output layer the logits are the exact log-probabilities."""
        hidden, state = self.hidden_states(ids, state)
        return self.decoder(hidden), state

    def hidden_states(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids: (B, T) -> the vectors the output layer reads (B, T, decoder_width), and the state."""
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
            want = (B, c.n_layer, max(c.hidden_sizes))
            if shape != want:
                raise ValueError(f"state {key!r} has shape {shape}; expected {want} for ids of batch {B}")
        if T == 0:
            return self.encoder.weight.new_zeros(B, 0, c.decoder_width), state
        p_input, _, p_output = c.dropout_rates()
        drop = locked_dropout if c.variational_dropout else F.dropout
        x = F.embedding(ids, embedding_dropout(self.encoder.weight, c.embed_dropout, self.training))
        x = drop(x, p_input, self.training)
        hidden = [state.tensors[k].transpose(0, 1).contiguous().to(x.dtype) for k in keys]  # (L, B, H)
        if c.cell == "lstm":
            out, (h, cell) = self.rnn(x, (hidden[0], hidden[1]))
            new = {"h": h.transpose(0, 1).contiguous(), "c": cell.transpose(0, 1).contiguous()}
        else:
            out, h = self.rnn(x, hidden[0])
            new = {"h": h.transpose(0, 1).contiguous()}
        out = drop(out, p_output, self.training)
        if c.output_size is not None:
            out = self.projection(out)
        return out, State(new, state.length + T, offsets=state.offsets)


@register("rnn", RNNConfig)
class RNNLM(RecurrentLM):
    """Elman RNN language model (tanh or ReLU)."""


@register("gru", GRUConfig)
class GRULM(RecurrentLM):
    """GRU language model ("reset_after" via torch/cuDNN, or the "classic" form)."""


@register("lstm", LSTMConfig)
class LSTMLM(RecurrentLM):
    """LSTM language model."""
