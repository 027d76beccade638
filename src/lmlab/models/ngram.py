"""The n-gram family (``"ngram"``) behind the one model interface.

:class:`NGramModel` is :class:`lmlab.ngram.NGramLM` (estimation, ARPA,
numpy scoring; see that module for the conventions) with its tables held as
torch buffers, so ``save_model``/``load_model``, ``.to(device)`` and
interpolation with neural models work, and with the interface:
``logits, state = model(ids, state)`` returns (B, T, V) natural-log
probabilities of the token after each position (log-probabilities are valid
logits), and ``State.tensors["context"]`` holds the last n-1 tokens (B, n-1),
padded on the left with ``bos_id`` (or -1 when the model has none).
:meth:`NGramModel.token_logprobs` is the fast path that scores only the
targets. Code that needs no torch (building, ARPA files, ``score_sequences``)
can use ``NGramLM`` directly and never import torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lmlab.models.base import LanguageModel, State, register
from lmlab.ngram import LN10, METHODS, DiscountWarning, NGramConfig, NGramLM, build_vocab

__all__ = ["NGramConfig", "NGramModel", "DiscountWarning", "build_vocab", "METHODS"]


@register("ngram", NGramConfig)
class NGramModel(NGramLM, LanguageModel):
    """Backoff n-gram model behind the torch interface (see the module docstring)."""

    def __init__(self, config: NGramConfig):
        LanguageModel.__init__(self)
        NGramLM.__init__(self, config)

    # ------------------------------------------------------------ storage: torch buffers
    def _allocate(self, sizes: list[int]) -> None:
        V = self.config.vocab_size
        p1 = torch.full((V,), -math.log10(self.config.num_predictable), dtype=torch.float32)  # meta-aware (load_model)
        if self.config.bos_id is not None:
            p1[self.config.bos_id] = -math.inf
        self.register_buffer("prob_1", p1)
        self.register_buffer("backoff_1", torch.zeros(V, dtype=torch.float32))
        for k in range(2, self.config.order + 1):
            self.register_buffer(f"keys_{k}", torch.zeros(sizes[k - 1], dtype=torch.int64))
            self.register_buffer(f"prob_{k}", torch.zeros(sizes[k - 1], dtype=torch.float32))
            self.register_buffer(f"backoff_{k}", torch.zeros(sizes[k - 1], dtype=torch.float32))

    def _store(self, arrays: dict[str, np.ndarray]) -> None:
        for name, a in arrays.items():
            setattr(self, name, torch.from_numpy(a))  # shares the arrays' memory

    def _stored(self) -> dict[str, np.ndarray]:
        out = {}
        for name, b in self._buffers.items():
            b = b.detach().cpu()
            out[name] = (b if name.startswith("keys_") else b.to(torch.float32)).numpy()
        return out

    def _stored_version(self):
        return tuple((b.data_ptr(), b._version, str(b.device), b.dtype) for b in self._buffers.values())

    # ------------------------------------------------------------ the interface
    def _check_ids(self, ids) -> np.ndarray:
        if isinstance(ids, torch.Tensor):
            if ids.is_floating_point() or ids.is_complex():
                raise ValueError(f"ids must be integer token ids, got dtype {ids.dtype}")
            a = ids.detach().cpu().numpy().astype(np.int64, copy=False)
        else:
            a = np.asarray(ids)
            if a.size and not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"ids must be integer token ids, got dtype {a.dtype}")
            a = a.astype(np.int64, copy=False)
        if a.ndim != 2:
            raise ValueError(f"ids must have shape (B, T), got {tuple(a.shape)}")
        if a.size and (a.min() < 0 or a.max() >= self.config.vocab_size):
            bad = int(a[(a < 0) | (a >= self.config.vocab_size)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        return a

    def initial_context(self, batch_size: int) -> np.ndarray:
        pad = self.config.bos_id if self.config.bos_id is not None else -1
        return np.full((batch_size, self.order - 1), pad, dtype=np.int64)

    def _context(self, state: State | None, B: int) -> tuple[np.ndarray, int]:
        if state is None:
            return self.initial_context(B), 0
        ctx = state.tensors.get("context")
        if ctx is None or tuple(ctx.shape) != (B, self.order - 1):
            raise ValueError(
                f"n-gram state must hold 'context' of shape ({B}, {self.order - 1}), "
                f"got {None if ctx is None else tuple(ctx.shape)}"
            )
        return ctx.detach().cpu().numpy().astype(np.int64), state.length

    def _windows(self, ids: np.ndarray, state: State | None) -> tuple[np.ndarray, np.ndarray, int]:
        """(B, T, n-1) contexts ending at each position, the new context, the start length."""
        B, T = ids.shape
        ctx, length = self._context(state, B)
        X = np.concatenate([ctx, ids], axis=1)
        n1 = self.order - 1
        if n1 == 0:
            return np.zeros((B, T, 0), dtype=np.int64), X[:, :0], length
        win = np.lib.stride_tricks.sliding_window_view(X, n1, axis=1)[:, 1:]
        return win, X[:, X.shape[1] - n1:], length

    def forward(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids (B, T) -> logits (B, T, V): natural-log probabilities of the
        token after each position (``-inf`` for <s> and impossible words), and
        the state (the last n-1 tokens) to continue from."""
        a = self._check_ids(ids)
        B, T = a.shape
        V = self.config.vocab_size
        win, new_ctx, length = self._windows(a, state)
        out = np.empty((B * T, V), dtype=np.float32)
        if B * T:
            flat = win.reshape(B * T, -1)
            tables = self._tables()
            step = max(1, 4_000_000 // V)
            for s in range(0, B * T, step):
                out[s:s + step] = tables.dist10(flat[s:s + step]) * LN10
        device = ids.device if isinstance(ids, torch.Tensor) else torch.device("cpu")
        logits = torch.from_numpy(out).view(B, T, V).to(device)
        new_state = State({"context": torch.from_numpy(np.ascontiguousarray(new_ctx)).to(device)}, length + T,
                          offsets=None if state is None else state.offsets)
        return logits, new_state

    def target_logprobs(self, x: torch.Tensor, y: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """The targets of a stream (``y`` is ``x`` shifted by one) through :meth:`token_logprobs`, without
        the (B, T, V) logits, and the state after ``x``; any other ``y`` by the default path."""
        if x.shape[1] == 0 or not torch.equal(y[:, :-1], x[:, 1:]):
            return super().target_logprobs(x, y, state)
        lp = self.token_logprobs(torch.cat([x, y[:, -1:]], dim=1), state)
        _, new_ctx, length = self._windows(self._check_ids(x), state)
        new_state = State({"context": torch.from_numpy(np.ascontiguousarray(new_ctx)).to(x.device)}, length + x.shape[1],
                          offsets=None if state is None else state.offsets)
        return lp, new_state

    def token_logprobs(self, ids: torch.Tensor, state: State | None = None) -> torch.Tensor:
        """Fast path: (B, T-1) natural-log p(ids[:, t+1] | ids[:, :t+1], state),
        equal to ``log_softmax(forward(ids, state)[0])[:, :-1]`` gathered at
        ``ids[:, 1:]`` but without building (B, T, V). float64, the values
        ``score_sequences`` sums (scoring agrees with it exactly)."""
        a = self._check_ids(ids)
        B, T = a.shape
        device = ids.device if isinstance(ids, torch.Tensor) else torch.device("cpu")
        if T < 2:
            return torch.zeros((B, 0), dtype=torch.float32, device=device)
        ctx, _ = self._context(state, B)
        X = np.concatenate([ctx, a], axis=1)
        lp = self._tables().score_rows(X, first=self.order) * LN10  # targets ids[:, 1:]
        return torch.from_numpy(lp).to(device)
