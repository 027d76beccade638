"""Masked-LM fill-in: a bidirectional model replaces the mask tokens in a text.

    filler = load_filler("runs/mlm")               # an lmlab masked-transformer checkpoint
    filler = load_filler("hf:path/to/bert-dir")    # or a Hugging Face masked LM, offline
    result = filler.fill("To be, or not to <mask><mask>!")
    result.text, result.steps                      # the filled text, and each choice with its probability
    filler.extend("First Citizen:", 20)            # append 20 masks and fill them left to right
    filler.pseudo_log_likelihood("To be, or not to be")   # sum_t log P(x_t | all other tokens)

One mask stands for one token of the model's tokenizer (a character for a char
model, a word piece for BERT). Each step runs the model on the whole text and
fixes masks:

- ``order="confidence"``: the one mask whose best guess is most probable (Mask-Predict's
  easy-first order); ``"left-to-right"``: the leftmost mask; ``"parallel"``: every
  mask at once from one forward pass (what a fill-mask pipeline does);
- the token is the most probable one, or with ``sample=True`` drawn from the
  distribution after ``temperature``/``top_k``/``top_p`` (lmlab's logits processors).

Special tokens (padding, <bos>/<eos>, unknown, [CLS]/[SEP], the mask itself) are
never chosen. Probabilities reported in the steps are the model's own, before
temperature or truncation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lmlab.models.base import special_token_ids
from lmlab.checkpoints import TRUST_REMOTE_CODE_HELP

ORDERS = ("confidence", "left-to-right", "parallel")
HF_PREFIX = "hf:"
LMLAB_MASK_TEXT = "<mask>"


@dataclass
class FillStep:
    """One filled position: where (token index in ``ids``), what, and with which model probability."""

    position: int
    token_id: int
    token: str
    probability: float


@dataclass
class FillResult:
    text: str
    ids: list[int]
    steps: list[FillStep] = field(default_factory=list)


@dataclass
class Filler:
    """A masked LM with its tokenizer, for filling masks in text.

    ``logits_fn``: ids (1, T) -> logits (1, T, V). ``encode`` turns text in which
    ``mask_text`` marks masks into ids (special tokens the model expects included);
    ``decode`` turns ids back into text; ``token_text`` names one id.
    """

    logits_fn: Callable[[torch.Tensor], torch.Tensor]
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    token_text: Callable[[int], str]
    mask_id: int
    mask_text: str
    forbidden_ids: list[int]
    max_length: int | None
    device: torch.device = torch.device("cpu")

    def _ids(self, text: str) -> torch.Tensor:
        ids = self.encode(text)
        if self.max_length is not None and len(ids) > self.max_length:
            raise ValueError(f"the text is {len(ids)} tokens long; this model reads at most {self.max_length}")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def fill(self, text: str, *, order: str = "confidence", sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> FillResult:
        """Fill every ``mask_text`` in ``text``; see the module docstring for the options."""
        ids = self._ids(text)
        if not bool((ids == self.mask_id).any()):
            raise ValueError(f"the text has no mask to fill; write {self.mask_text!r} where a token is missing")
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        filled, steps = fill_ids(self.logits_fn, ids, self.mask_id, order=order, sample=sample,
                                 temperature=temperature, top_k=top_k, top_p=top_p,
                                 forbidden_ids=self.forbidden_ids, generator=generator)
        for s in steps:
            s.token = self.token_text(s.token_id)
        out = filled.tolist()
        return FillResult(self.decode(out), out, steps)

    def extend(self, text: str, n_tokens: int, *, order: str = "left-to-right", **options: Any) -> FillResult:
        """Append ``n_tokens`` masks to ``text`` and fill them (left to right by default)."""
        if not isinstance(n_tokens, int) or n_tokens < 1:
            raise ValueError(f"n_tokens must be a positive integer, got {n_tokens!r}")
        return self.fill(text + self.mask_text * n_tokens, order=order, **options)

    @torch.no_grad()
    def pseudo_log_likelihood(self, text: str, batch_size: int = 64) -> float:
        """sum over real tokens t of log P(x_t | the text with only x_t masked), in nats
        (Salazar et al. 2020); special tokens such as [CLS]/[SEP] are not scored."""
        ids = self._ids(text)
        positions = [t for t, i in enumerate(ids.tolist()) if i not in self.forbidden_ids]
        total = 0.0
        for start in range(0, len(positions), batch_size):
            chunk = torch.tensor(positions[start:start + batch_size], device=self.device)
            rows = ids.repeat(len(chunk), 1)
            rows[torch.arange(len(chunk), device=self.device), chunk] = self.mask_id
            logits = self.logits_fn(rows)[torch.arange(len(chunk), device=self.device), chunk].float()
            total += float(logits.log_softmax(-1).gather(1, ids[chunk][:, None]).sum())
        return total


@torch.no_grad()
def fill_ids(logits_fn: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, mask_id: int, *,
             order: str = "confidence", sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, forbidden_ids: list[int] | tuple[int, ...] = (),
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[FillStep]]:
    """ids: (T,) with ``mask_id`` at the gaps -> (filled ids (T,), the steps in the order taken)."""
    from lmlab.decode.processors import Temperature, TopK, TopP, apply_processors
    from lmlab.decode.search import sample_pick

    if order not in ORDERS:
        raise ValueError(f"order={order!r}; accepted: {', '.join(ORDERS)}")
    processors = []
    if sample:
        processors.append(Temperature(temperature))
        if top_k is not None:
            processors.append(TopK(top_k))
        if top_p is not None:
            processors.append(TopP(top_p))
    ids = ids.clone()
    steps: list[FillStep] = []
    while True:
        masked = (ids == mask_id).nonzero().flatten()
        if len(masked) == 0:
            return ids, steps
        logits = logits_fn(ids[None])[0, masked].float()            # (M, V)
        logits[:, [i for i in forbidden_ids if i < logits.shape[-1]]] = -math.inf
        probs = logits.softmax(-1)
        if order == "parallel":
            rows = torch.arange(len(masked))
        elif order == "left-to-right":
            rows = torch.tensor([0])
        else:
            rows = probs.max(-1).values.argmax().reshape(1)
        if sample:
            tokens = sample_pick(apply_processors(processors, logits[rows], None), generator)
        else:
            tokens = logits[rows].argmax(-1)
        for r, tok in zip(rows.tolist(), tokens.tolist()):
            position = int(masked[r])
            ids[position] = tok
            steps.append(FillStep(position, tok, "", float(probs[r, tok])))


# ---------------------------------------------------------------- loading


def filler_from_lmlab(model: Any, tokenizer: Any, mask_text: str = LMLAB_MASK_TEXT) -> Filler:
    """A :class:`Filler` over an lmlab ``masked-transformer`` and its tokenizer."""
    if getattr(model, "objective", "causal") != "masked":
        raise ValueError(
            f"the {getattr(model, 'family', type(model).__name__)} model predicts the next token; fill-in needs "
            "a bidirectional masked LM: train one with `lmlab train --model masked-transformer`, or use "
            "'hf:DIR' with a Hugging Face masked LM (BERT-like)"
        )
    if not mask_text:
        raise ValueError("mask_text must be a non-empty string")

    def encode(text: str) -> list[int]:
        pieces = text.split(mask_text)
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i:
                ids.append(model.mask_id)
            ids.extend(tokenizer.encode(piece) if piece else [])
        return ids

    model.eval()
    device = model.device
    return Filler(
        logits_fn=lambda x: model(x.to(device))[0],
        encode=encode,
        decode=tokenizer.decode,
        token_text=tokenizer.id_to_token,
        mask_id=model.mask_id,
        mask_text=mask_text,
        forbidden_ids=sorted(set(special_token_ids(model, tokenizer).values())),
        max_length=model.max_context,
        device=device,
    )


def filler_from_hf(hf_model: Any, hf_tokenizer: Any, mask_text: str | None = None) -> Filler:
    """A :class:`Filler` over a Hugging Face masked LM (``AutoModelForMaskedLM``) and its tokenizer.

    ``mask_text`` (default: the tokenizer's own mask token, e.g. ``[MASK]``) marks masks
    in the text; the tokenizer's special tokens ([CLS], [SEP]) are added as the model expects.
    """
    if hf_tokenizer.mask_token is None:
        raise ValueError(f"the tokenizer {type(hf_tokenizer).__name__} has no mask token; it is not a masked-LM tokenizer")
    mask_text = mask_text or hf_tokenizer.mask_token

    def encode(text: str) -> list[int]:
        return list(hf_tokenizer(text.replace(mask_text, hf_tokenizer.mask_token))["input_ids"])

    hf_model.eval()
    device = next(hf_model.parameters()).device
    limit = getattr(hf_model.config, "max_position_embeddings", None)
    return Filler(
        logits_fn=lambda x: hf_model(input_ids=x.to(device)).logits,
        encode=encode,
        decode=lambda ids: hf_tokenizer.decode(ids, skip_special_tokens=True),
        token_text=hf_tokenizer.convert_ids_to_tokens,
        mask_id=int(hf_tokenizer.mask_token_id),
        mask_text=mask_text,
        forbidden_ids=sorted(set(hf_tokenizer.all_special_ids)),
        max_length=limit,
        device=device,
    )


def load_filler(spec: str | Path, *, mask_text: str | None = None, device: str = "cpu",
                trust_remote_code: bool = False) -> Filler:
    """A :class:`Filler` from an lmlab checkpoint/run directory or ``hf:DIR`` (a local HF masked LM;
    code from its directory runs only with ``trust_remote_code=True``)."""
    if isinstance(spec, str) and spec.startswith(HF_PREFIX):
        from lmlab.hf import load_hf_masked_lm

        loaded = load_hf_masked_lm(spec[len(HF_PREFIX):], device=device, trust_remote_code=trust_remote_code)
        return filler_from_hf(*loaded, mask_text=mask_text)
    from lmlab.checkpoints import load_checkpoint

    model, tokenizer = load_checkpoint(spec, device=device)
    return filler_from_lmlab(model, tokenizer, mask_text or LMLAB_MASK_TEXT)


# ---------------------------------------------------------------- command line


def add_fill_arguments(p: Any) -> None:
    p.add_argument("--model", required=True, help="a masked-transformer checkpoint or run directory, or hf:DIR (a masked LM)")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.add_argument("--text", required=True, help="text with mask markers (see --mask)")
    p.add_argument("--mask", help=f"the marker of a masked token (default: {LMLAB_MASK_TEXT!r}; for hf: the tokenizer's own)")
    p.add_argument("--order", default="confidence", choices=ORDERS)
    p.add_argument("--extend", type=int, default=0, help="append this many masks to the text first")
    p.add_argument("--sample", action="store_true", help="sample each token instead of taking the most probable")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show-steps", action="store_true", help="print each filled position with its probability")
    p.add_argument("--device", default="cpu")


def run_fill(args: Any) -> int:
    filler = load_filler(args.model, mask_text=args.mask, device=args.device, trust_remote_code=args.trust_remote_code)
    text = args.text + filler.mask_text * args.extend if args.extend > 0 else args.text
    result = filler.fill(text, order=args.order, sample=args.sample, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(result.text)
    if args.show_steps:
        for i, s in enumerate(result.steps):
            print(f"step {i}: position {s.position} <- {s.token!r} (p={s.probability:.4f})")
    return 0
