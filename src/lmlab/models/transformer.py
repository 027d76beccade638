"""Decoder-only transformer with a KV cache as its state.

One configurable block covers the GPT family (learned or sinusoidal positions,
LayerNorm, ReLU/GELU MLP, biases) and the Llama family (rotary positions,
RMSNorm, SwiGLU, grouped-query attention, no biases). Attention runs through
``torch.nn.functional.scaled_dot_product_attention``; when the weights are asked
for, through ``attention_weights``, which follows the same convention for a query
with every key masked: weights 0, output 0, no gradient (never NaN).

State: ``k{i}``/``v{i}`` of shape (B, H_kv, capacity, D_head) per layer; the
first ``state.length`` slots are filled. Capacity grows by doubling up to
``block_size``, so appending a token costs O(1) amortised copies. Rows merged
from different positions (``merge_states``) are aligned at their ends: row b's
first ``state.offsets[b]`` slots are empty and masked out of attention, and its
positions count from its own first token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.models.base import LanguageModel, State, _merged_offsets, _or_none, register
from lmlab.models.dropout import embedding_dropout
from lmlab.models.heads import check_adaptive_cutoffs, make_output_head


@dataclass
class TransformerConfig:
    vocab_size: int
    block_size: int = 256          # most positions the model attends to
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_kv_head: int | None = None   # grouped-query attention; None = n_head
    d_ff: int | None = None        # feed-forward width; None = 4 * n_embd
    dropout: float = 0.0           # residual and attention dropout
    embed_dropout: float = 0.0     # word-level: whole embedding rows dropped per forward
    norm: str = "layernorm"        # "layernorm" | "rmsnorm" | "none"
    norm_position: str = "pre"     # "pre" | "post"
    norm_eps: float = 1e-5
    positions: str = "learned"     # "learned" | "sinusoidal" | "rotary"
    sinusoidal_layout: str = "interleaved"  # "interleaved" (sin, cos, sin, ...) | "concat" ([sin | cos])
    rope_theta: float = 10000.0
    activation: str = "gelu"       # "relu" | "gelu" | "gelu_tanh" | "swiglu"
    bias: bool = True              # biases in linear layers and LayerNorm
    lm_head_bias: bool = False
    tie_weights: bool = True
    causal: bool = True            # False: every position attends to every position (an encoder)
    adaptive_cutoffs: list[int] | None = None  # adaptive softmax output layer (see lmlab.models.heads); None: full softmax
    adaptive_div_value: float = 4.0            # each tail cluster's projection is this many times narrower

    def __post_init__(self) -> None:
        choices = {
            "norm": ("layernorm", "rmsnorm", "none"),
            "norm_position": ("pre", "post"),
            "positions": ("learned", "sinusoidal", "rotary"),
            "sinusoidal_layout": ("interleaved", "concat"),
            "activation": ("relu", "gelu", "gelu_tanh", "swiglu"),
        }
        for name, accepted in choices.items():
            if getattr(self, name) not in accepted:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; accepted: {accepted}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        kv = self.n_kv_head or self.n_head
        if self.n_head % kv:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={kv}")
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.embed_dropout < 1.0):
            raise ValueError(f"dropout={self.dropout}, embed_dropout={self.embed_dropout}: each must be in [0, 1)")
        if self.positions == "sinusoidal" and self.n_embd % 2:
            raise ValueError(f"sinusoidal positions need an even n_embd, got {self.n_embd}")
        check_adaptive_cutoffs(self.adaptive_cutoffs, self.vocab_size, self.adaptive_div_value)
        if self.adaptive_cutoffs is not None and self.tie_weights:
            raise ValueError("adaptive_cutoffs cannot be combined with tie_weights=true (the adaptive output layer "
                             "has no (vocab_size, n_embd) matrix to share); set tie_weights=false")


def sinusoidal_table(num_positions: int, dim: int, layout: str = "interleaved") -> torch.Tensor:
    """(num_positions, dim) table: sin/cos of pos / 10000^(2i/dim), interleaved or concatenated."""
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = pos * freq
    if layout == "concat":
        table = torch.cat([angles.sin(), angles.cos()], dim=-1)
    else:
        table = torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(num_positions, dim)
    return table.float()


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (*positions.shape, head_dim) for rotary embeddings (the half-split layout Llama uses)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin (..., D) with its first half negated: the factor of ``x`` rolled by D/2 in a rotation."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (..., D) with cos, sin broadcasting to it, e.g. x (B, H, T, D) and cos (T, D), or
    x (B, T, H, D) and cos (T, 1, D); rotate pairs (i, i + D/2) by the position angle."""
    return rotate(x, cos, signed_sin(sin))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``apply_rotary`` with the sine table already signed (``signed_sin``): ``x * cos + [-x2, x1] * sin``
    for x = [x1, x2], written as ``x * cos + [x2, x1] * [-sin1, sin2]`` (the same products), computed
    in the promoted dtype of x and cos (float32 for a bfloat16 x) and rounded once to x's dtype."""
    wide = x.to(torch.promote_types(x.dtype, cos.dtype))
    return (wide * cos + wide.roll(x.shape[-1] // 2, -1) * sin_signed).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., C) -> (..., C): normalized in float32, then scaled in x's dtype (Llama's order)."""
        shape = (x.shape[-1],)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, shape, self.weight, self.eps)  # one kernel, the same values
        # rms_norm of a bfloat16/float16 x computes in float32 and rounds once: the same as x.float() first
        return self.weight * F.rms_norm(x, shape, None, self.eps)


def make_norm(config: TransformerConfig) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.Identity()


class Attention(nn.Module):
    """Causal multi-head (or grouped-query) self-attention with a cache."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.head_dim = config.n_embd // config.n_head
        kv_dim = self.n_kv_head * self.head_dim
        self.q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.k = nn.Linear(config.n_embd, kv_dim, bias=config.bias)
        self.v = nn.Linear(config.n_embd, kv_dim, bias=config.bias)
        self.o = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.causal = config.causal

    def forward(
        self,
        x: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None,
        start: int,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        need_weights: bool = False,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """x: (B, T, C); cache: (k, v) each (B, H_kv, capacity, D) holding ``start`` slots.
        mask: None, or (B, 1, T, start + T) bool, True where a query may read a key slot
        (rows with empty slots, see ``Transformer.merge_states``)."""
        B, T, C = x.shape
        H, H_kv = self.n_head, self.n_kv_head
        D = self.head_dim
        q, k, v = self.q(x), self.k(x), self.v(x)
        if rotary is not None:  # q and k heads at once, split by views (their backward: one cat, no zero fill)
            q, k = rotate(torch.cat([q, k], dim=-1).view(B, T, H + H_kv, D), *rotary).split([H, H_kv], dim=2)
        else:
            q, k = q.view(B, T, H, D), k.view(B, T, H_kv, D)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, H_kv, D).transpose(1, 2)
        k_all, v_all, cache = _append(cache, k, v, start)
        repeat = self.n_head // self.n_kv_head
        dropout = self.dropout if self.training else 0.0
        weights = None
        if repeat > 1 and T == 1 and start > 0 and not need_weights:
            # One query per row (a decoding step): the `repeat` query heads of each kv head
            # attend as rows of one group, so the cache is not copied per head.
            y = F.scaled_dot_product_attention(
                q.reshape(B, self.n_kv_head, repeat, self.head_dim), k_all, v_all, attn_mask=mask, dropout_p=dropout
            ).reshape(B, self.n_head, 1, self.head_dim)
            return self.o(y.transpose(1, 2).reshape(B, T, C)), cache, weights
        if repeat > 1:
            k_all = k_all.repeat_interleave(repeat, dim=1)
            v_all = v_all.repeat_interleave(repeat, dim=1)
        if need_weights:
            scores = (q @ k_all.transpose(-2, -1)) / math.sqrt(self.head_dim)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            elif self.causal:
                scores = scores.masked_fill(~_causal_mask(T, start, x.device), float("-inf"))
            weights = attention_weights(scores)
            y = weights @ v_all
        elif mask is not None:
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, dropout_p=dropout)
        elif start == 0:
            y = F.scaled_dot_product_attention(q, k_all, v_all, is_causal=self.causal and T > 1, dropout_p=dropout)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k_all, v_all, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=_causal_mask(T, start, x.device), dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.o(y), cache, weights


def attention_weights(scores: torch.Tensor) -> torch.Tensor:
    """softmax over the keys (last dim) of scores (..., T_q, T_k) with -inf where blocked.

    A row with every key blocked gets all-zero weights (its output is 0 and it passes no
    gradient), as ``scaled_dot_product_attention`` treats it, where a plain softmax gives NaN.
    """
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    return scores.masked_fill(empty, 0.0).softmax(-1).masked_fill(empty, 0.0)


def _causal_mask(T: int, start: int, device: torch.device) -> torch.Tensor:
    """(T, start + T) bool: query i (at position start + i) sees keys 0..start + i."""
    rows = torch.arange(T, device=device)[:, None] + start
    cols = torch.arange(start + T, device=device)[None, :]
    return cols <= rows


def _append(cache, k, v, start):
    """Write k, v (B, H, T, D) at positions start.. of the cache; return the filled views and the cache."""
    T = k.shape[2]
    if cache is None:
        if start != 0:
            raise ValueError(f"a state at position {start} has no cache for this layer")
        return k, v, (k, v)
    ck, cv = cache
    end = start + T
    if end > ck.shape[2]:
        capacity = max(end, 2 * ck.shape[2])
        grown_k = ck.new_empty(ck.shape[0], ck.shape[1], capacity, ck.shape[3])
        grown_v = cv.new_empty(grown_k.shape)
        grown_k[:, :, :start] = ck[:, :, :start]
        grown_v[:, :, :start] = cv[:, :, :start]
        ck, cv = grown_k, grown_v
    ck.narrow(2, start, T).copy_(k)
    cv.narrow(2, start, T).copy_(v)
    return ck.narrow(2, 0, end), cv.narrow(2, 0, end), (ck, cv)


class FeedForward(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        d_ff = config.d_ff or 4 * config.n_embd
        self.activation = config.activation
        self.fc = nn.Linear(config.n_embd, d_ff, bias=config.bias)
        if config.activation == "swiglu":
            self.gate = nn.Linear(config.n_embd, d_ff, bias=config.bias)
        self.proj = nn.Linear(d_ff, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            h = F.silu(self.gate(x)) * self.fc(x)
        elif self.activation == "relu":
            h = F.relu(self.fc(x))
        elif self.activation == "gelu_tanh":
            h = F.gelu(self.fc(x), approximate="tanh")
        else:
            h = F.gelu(self.fc(x))
        return self.proj(h)


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


class Block(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.ln1 = make_norm(config)
        self.attn = Attention(config)
        self.ln2 = make_norm(config)
        self.mlp = FeedForward(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, cache, start, rotary, need_weights=False, mask=None):
        drop = self.drop if self.training else _unchanged  # in eval, dropout is the identity: no module call
        if self.pre_norm:
            a, cache, w = self.attn(self.ln1(x), cache, start, rotary, need_weights, mask)
            x = x + drop(a)
            x = x + drop(self.mlp(self.ln2(x)))
        else:
            a, cache, w = self.attn(x, cache, start, rotary, need_weights, mask)
            x = self.ln1(x + drop(a))
            x = self.ln2(x + drop(self.mlp(x)))
        return x, cache, w


@register("transformer", TransformerConfig)
class Transformer(LanguageModel):
    """GPT-style decoder: ``logits, state = model(ids, state)``; ids (B, T) -> logits (B, T, V)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.positions == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        elif config.positions == "sinusoidal":
            table = sinusoidal_table(config.block_size, config.n_embd, config.sinusoidal_layout)
            self.register_buffer("sinusoid", table, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config) if config.norm_position == "pre" else nn.Identity()
        self.lm_head = make_output_head(config.n_embd, config.vocab_size, config.lm_head_bias,
                                        config.adaptive_cutoffs, config.adaptive_div_value)
        if not self.wte.weight.is_meta:  # a skeleton on the meta device (filled from a file) has no values to draw
            self.apply(self._init_weights)
            for name, p in self.named_parameters():
                if name.endswith(("attn.o.weight", "mlp.proj.weight")):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def max_context(self) -> int:
        return self.config.block_size

    @property
    def adaptive_head(self) -> nn.Module | None:
        return self.lm_head if self.config.adaptive_cutoffs is not None else None

    def embed(self, ids: torch.Tensor, start: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids at positions start.. -> (B, T, C) input vectors; ``positions`` (B, T),
        when given, are each token's own position instead."""
        c = self.config
        x = F.embedding(ids, embedding_dropout(self.wte.weight, c.embed_dropout, self.training))
        T = ids.shape[1]
        if positions is None and c.positions != "rotary":
            positions = torch.arange(start, start + T, device=ids.device)
        if c.positions == "learned":
            x = x + self.wpe(positions)
        elif c.positions == "sinusoidal":
            x = x + self.sinusoid[positions]
        return self.drop(x)

    def forward(
        self, ids: torch.Tensor, state: State | None = None, return_attention: bool = False
    ) -> tuple[torch.Tensor, State]:
        """ids: (B, T) int64 -> logits (B, T, V) float and the state after the last token.

        With an adaptive output layer (``adaptive_cutoffs``) the logits are the exact
        log-probabilities (they are already normalized).

        With ``return_attention=True`` the state also holds ``attention{i}``
        (B, H, T, start + T) weights per layer (slower: no fused kernel).
        """
        hidden, state = self.hidden_states(ids, state, return_attention)
        return self.lm_head(hidden), state

    def next_token_logits(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """(B, V) logits after the last token; the LM head runs on that position only."""
        hidden, state = self.hidden_states(ids, state)
        return self.lm_head(hidden[:, -1]), state

    def read_prompt_blocks(self, blocks: list[torch.Tensor]) -> tuple[torch.Tensor, State]:
        """As ``LanguageModel.read_prompt_blocks``, in one pass: the blocks are padded at the start
        to the longest, and the padding is masked out and recorded as empty slots (``State.offsets``)."""
        if len(blocks) == 1 or not self.config.causal:
            return super().read_prompt_blocks(blocks)
        longest = max(block.shape[1] for block in blocks)
        ids = torch.cat([F.pad(block, (longest - block.shape[1], 0)) for block in blocks])
        padding = torch.cat([torch.full((block.shape[0],), longest - block.shape[1], dtype=torch.long)
                             for block in blocks]).to(ids.device)
        hidden, state = self.hidden_states(ids, padding=padding if bool(padding.any()) else None)
        return self.lm_head(hidden[:, -1]), state

    def hidden_states(
        self, ids: torch.Tensor, state: State | None = None, return_attention: bool = False,
        padding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, State]:
        """ids: (B, T) -> the final hidden vectors (B, T, C) the LM head reads, and the state.
        ``padding`` (B,) int64, without a state: row b's first ``padding[b]`` ids are filler,
        masked out of attention and left in the state as empty slots.

        Classifiers and probes read these (see ``lmlab.finetune``)."""
        if padding is not None and state is not None:
            raise ValueError("padding is for reading from the start; a state records its own empty slots")
        B, T = ids.shape
        start = state.length if state is not None else 0
        if start and not self.config.causal:
            raise ValueError("a bidirectional (causal=False) transformer reads the whole text at once; "
                             "it cannot continue from a state")
        if start + T > self.config.block_size:
            raise ValueError(
                f"{start + T} positions exceed the model's block_size={self.config.block_size}; "
                "crop the input or continue with a fresh state over the last block_size tokens"
            )
        offsets = state.offsets if state is not None else padding
        positions = mask = None
        if offsets is not None:
            # Row b's tokens sit at its own positions; its empty slots are masked out. A filler
            # token (padding) reads only its own slot, so that no query has every key masked.
            positions = (start - offsets)[:, None] + torch.arange(T, device=ids.device)  # (B, T)
            slots = torch.arange(start + T, device=ids.device)
            readable = slots[None, None, :] >= offsets[:, None, None]
            if padding is not None:  # filler tokens sit at negative positions: read as position 0
                positions = positions.clamp_(min=0)
                readable = readable | (slots[None, :] == slots[-T:, None])[None]
            mask = (_causal_mask(T, start, ids.device)[None] & readable)[:, None]  # (B, 1, T, start + T)
        x = self.embed(ids, start, positions)
        rotary = None
        if self.config.positions == "rotary":
            if positions is None:
                positions = torch.arange(start, start + T, device=ids.device)
            cos, sin = rotary_cos_sin(positions, self.config.n_embd // self.config.n_head, self.config.rope_theta)
            # (T, 1, D) or (B, T, 1, D) against (B, T, H, D); the sine signed once for every layer
            rotary = (cos[..., None, :], signed_sin(sin)[..., None, :])
        tensors: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            cache = (state.tensors[f"k{i}"], state.tensors[f"v{i}"]) if state is not None else None
            x, (ck, cv), w = block(x, cache, start, rotary, return_attention, mask)
            tensors[f"k{i}"], tensors[f"v{i}"] = ck, cv
            if w is not None:
                tensors[f"attention{i}"] = w
        if padding is not None:  # the empty slots padding leaves, on the cache's device (None: none)
            offsets = _or_none(offsets, tensors)
        return self.ln_f(x), State(tensors, start + T, offsets=offsets)

    def merge_states(self, states: list[State]) -> State:
        """The rows of ``states`` (KV caches at any lengths) as one batch, aligned at their ends:
        a shorter cache is padded with empty slots at the start (``State.offsets``, masked out of
        attention); slots no row fills are dropped."""
        states = [s for s in states if s.batch_size]
        if not states:
            raise ValueError("merge_states needs at least one state with rows")
        length = max(s.length for s in states)
        offsets = _merged_offsets(states, length)
        trim = int(offsets.min())
        names = [f"{kv}{i}" for i in range(len(self.blocks)) for kv in "kv"]
        if len(states) == 1:  # rows left the batch: drop the slots none of them fills, as views
            tensors = {name: states[0].tensors[name][:, :, trim:] for name in names}
            return State(tensors, length - trim, offsets=_or_none(offsets - trim, tensors))
        # One copy into caches with room to grow (as _append leaves them), so that the next steps
        # write in place; the empty slots are zeros (masked out, and 0 x NaN would not be).
        slots = length - trim
        capacity = max(slots, min(2 * slots, self.config.block_size))
        rows = [s.batch_size for s in states]
        tensors = {}
        for name in names:
            first = states[0].tensors[name]
            merged = first.new_empty(sum(rows), first.shape[1], capacity, first.shape[3])
            row = 0
            for s, n in zip(states, rows):
                pad = length - s.length  # this state's slot 0 is the merged slot pad - trim
                skip = max(0, trim - pad)  # its first slots that every row leaves empty
                begin = pad + skip - trim
                merged[row : row + n, :, :begin].zero_()
                merged[row : row + n, :, begin:slots].copy_(s.tensors[name][:, :, skip : s.length])
                row += n
            tensors[name] = merged
        return State(tensors, slots, offsets=_or_none(offsets - trim, tensors))
