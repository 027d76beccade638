"""A bidirectional transformer encoder trained with the masked-LM objective (BERT-style).

    model = build_model("masked-transformer", {"vocab_size": tok.vocab_size, "block_size": 128})
    logits, _ = model(ids)      # ids: (B, T) with model.mask_id at hidden positions -> (B, T, V)

Every position sees the whole input, so ``logits[:, t]`` is the model's guess for
the token at ``t`` given everything else; it is meant for positions holding
``mask_id``. The mask token is one input row past the tokenizer's vocabulary
(``mask_id == vocab_size``): it can be read but is never predicted, and the
tokenizer needs no extra entry. There is no incremental state: ``state`` must be
None. :func:`lmlab.train.masked_lm_loss` is its training objective (the Trainer
picks it from ``objective``) and :mod:`lmlab.fill` fills masks with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from lmlab.models.base import LanguageModel, State, register
from lmlab.models.transformer import Transformer, TransformerConfig


@dataclass
class MaskedTransformerConfig(TransformerConfig):
    causal: bool = False
    mask_prob: float = 0.15   # share of positions the masked-LM objective hides

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.causal:
            raise ValueError("a masked-transformer is bidirectional: causal must be False")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob={self.mask_prob} must be in (0, 1)")


@register("masked-transformer", MaskedTransformerConfig)
class MaskedTransformer(LanguageModel):
    """Encoder over ``vocab_size + 1`` input ids (the last is the mask) -> logits over ``vocab_size``."""

    objective = "masked"

    def __init__(self, config: MaskedTransformerConfig) -> None:
        super().__init__()
        self.config = config
        body = {f.name: getattr(config, f.name) for f in dataclasses.fields(TransformerConfig)}
        self.body = Transformer(TransformerConfig(**{**body, "vocab_size": config.vocab_size + 1}))

    @property
    def mask_id(self) -> int:
        return self.config.vocab_size

    @property
    def max_context(self) -> int:
        return self.config.block_size

    def forward(self, ids: torch.Tensor, state: State | None = None,
                return_attention: bool = False) -> tuple[torch.Tensor, State]:
        """ids: (B, T) in [0, vocab_size] -> logits (B, T, vocab_size); the state holds attention only."""
        if state is not None:
            raise ValueError("a masked-transformer reads the whole text at once; pass state=None")
        logits, state = self.body(ids, None, return_attention)
        return logits[..., : self.config.vocab_size], State(
            {k: v for k, v in state.tensors.items() if k.startswith("attention")}, state.length)

    def hidden_states(self, ids: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """ids: (B, T) -> final hidden vectors (B, T, C)."""
        if state is not None:
            raise ValueError("a masked-transformer reads the whole text at once; pass state=None")
        return self.body.hidden_states(ids)
