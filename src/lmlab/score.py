"""How probable is a text: log-probabilities, NLL, perplexity, bits per character.

Rules kept everywhere here:
- a corpus perplexity is exp(total NLL / total scored tokens), never a mean of
  per-sequence perplexities (that mean is reported apart, named as such);
- a score says its unit: per word (whitespace words with one </s> per line,
  KenLM's count) for a word tokenizer, per character and per byte otherwise;
- log-probabilities come from ``model.token_logprobs`` (n-grams: their exact
  values, so lmlab's scores equal the n-gram API's and KenLM's);
- padding is never scored;
- a complete sequence is scored as <bos> s <eos>: every token of s and the
  final <eos> count, <bos> does not;
- a long stream is scored token by token from its second token on, each
  token once, with as much context as the window allows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from lmlab.data import IGNORE, pad_sequences
from lmlab.models.base import LanguageModel, require_causal


#: The units a score is reported in (:attr:`Score.unit`).
UNITS = ("word", "character")


@dataclass
class Score:
    """Totals of a scoring run; derived numbers are properties.

    ``unit`` is what a perplexity is reported per: ``"word"`` when the tokens
    are whitespace words (``tokens`` then counts the words and one ``</s>`` per
    line, as KenLM), ``"character"`` otherwise (bits per character and per byte
    of the scored text). ``mean_text_perplexity`` is the mean over texts of each
    text's own per-token perplexity (what Hugging Face ``evaluate`` reports),
    when the texts were scored one by one; it is not the corpus perplexity.
    """

    nll: float          # total negative log-likelihood, nats
    tokens: int         # scored tokens
    characters: int = 0  # characters of the scored text (0 when unknown)
    bytes: int = 0       # UTF-8 bytes of the scored text (0 when unknown)
    unit: str = "character"
    mean_text_perplexity: float | None = None

    @property
    def nll_per_token(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        """Per token (= per word when ``unit`` is ``"word"``)."""
        return math.exp(self.nll_per_token) if self.tokens else float("nan")

    @property
    def bits_per_token(self) -> float:
        return self.nll_per_token / math.log(2)

    @property
    def bits_per_character(self) -> float:
        return self.nll / math.log(2) / self.characters if self.characters else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes if self.bytes else float("nan")

    @property
    def perplexity_per_character(self) -> float:
        return math.exp(self.nll / self.characters) if self.characters else float("nan")

    def as_dict(self) -> dict:
        """Every figure, named by its unit; ``perplexity`` is per ``unit``."""
        out = {"unit": self.unit, "nll": self.nll, "tokens": self.tokens}
        if self.unit == "word":
            out.update(words=self.tokens, nll_per_word=self.nll_per_token, perplexity_per_word=self.perplexity,
                       bits_per_word=self.bits_per_token, perplexity=self.perplexity)
        else:
            out.update(nll_per_character=self.nll / self.characters if self.characters else float("nan"),
                       perplexity_per_character=self.perplexity_per_character,
                       perplexity=self.perplexity_per_character)
        out.update(characters=self.characters, bits_per_character=self.bits_per_character,
                   bytes=self.bytes, bits_per_byte=self.bits_per_byte,
                   nll_per_token=self.nll_per_token, perplexity_per_token=self.perplexity,
                   bits_per_token=self.bits_per_token)
        if self.mean_text_perplexity is not None:
            out["mean_text_perplexity_per_" + ("word" if self.unit == "word" else "token")] = self.mean_text_perplexity
        return out

    def summary(self) -> str:
        """One line of text naming the unit of each figure."""
        if self.unit == "word":
            head = (f"corpus perplexity per word {self.perplexity:.4f} (NLL {self.nll_per_token:.4f} nats per word; "
                    f"{self.tokens} words, </s> included)")
        else:
            head = (f"{self.bits_per_character:.4f} bits per character, {self.bits_per_byte:.4f} bits per byte "
                    f"(perplexity per character {self.perplexity_per_character:.4f}; per token "
                    f"{self.perplexity:.4f} over {self.tokens} tokens)")
        if self.mean_text_perplexity is not None:
            per = "word" if self.unit == "word" else "token"
            head += (f"; mean of the {per}-level perplexities of each text {self.mean_text_perplexity:.4f} "
                     "(Hugging Face evaluate's mean_perplexity)")
        return head


def score_unit(tokenizer) -> str:
    """``"word"`` for a tokenizer of whitespace words, else ``"character"``."""
    return getattr(tokenizer, "score_unit", "character")


@torch.no_grad()
def target_logprobs(model: LanguageModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log P(y[b, t] | x[b, :t+1]) of shape (B, T) (``LanguageModel.target_logprobs``); 0 where y is IGNORE."""
    require_causal(model, "scoring")
    picked, _ = model.target_logprobs(x, y.clamp_min(0))
    return torch.where(y.to(picked.device) != IGNORE, picked, torch.zeros_like(picked))


@torch.no_grad()
def next_token_logprobs(model: LanguageModel, ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """log P(ids[b, t+1] | ids[b, :t+1]) of shape (B, T-1), float64, 0 where ``scored``
    (B, T-1) is False. Read from ``model.token_logprobs``, so families with exact
    log-probabilities (n-grams) are scored exactly as their own API scores them."""
    require_causal(model, "scoring")
    lp = model.token_logprobs(ids).double()
    scored = scored.to(lp.device)
    return torch.where(scored, lp, torch.zeros_like(lp))


def _sequence_rows(sequences: Sequence[Sequence[int]], bos_id: int, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (B, L+1) = <bos> s <eos> right-padded, and the (B, L) mask of scored targets."""
    x, y = pad_sequences(sequences, bos_id, eos_id, pad_id)
    scored = y != IGNORE
    ids = torch.cat([x[:, :1], torch.where(scored, y, pad_id)], dim=1)
    return ids, scored


@torch.no_grad()
def sequence_logprobs(
    model: LanguageModel,
    sequences: Sequence[Sequence[int]],
    bos_id: int,
    eos_id: int,
    pad_id: int,
    batch_size: int = 64,
) -> list[tuple[float, int]]:
    """(log P(s <eos> | <bos>), scored tokens = len(s) + 1) for each sequence of ids."""
    device = model.device
    out: list[tuple[float, int]] = []
    for b in range(0, len(sequences), batch_size):
        chunk = sequences[b : b + batch_size]
        ids, scored = _sequence_rows(chunk, bos_id, eos_id, pad_id)
        _check_context(model, ids.shape[1] - 1)
        lp = next_token_logprobs(model, ids.to(device), scored)
        out.extend((float(s), int(n)) for s, n in zip(lp.sum(1).tolist(), scored.sum(1).tolist()))
    return out


def score_sequences(model, tokenizer, texts: Sequence[str], batch_size: int = 64) -> Score:
    """Corpus score of complete sequences (one text each), <eos> included: for a word
    tokenizer, per word with one ``</s>`` per text, as KenLM scores lines.

    ``mean_text_perplexity`` is set: the mean of the texts' own per-token perplexities."""
    if not texts:
        raise ValueError("no texts to score; give at least one non-empty sequence")
    ids = [tokenizer.encode(t) for t in texts]
    results = sequence_logprobs(model, ids, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, batch_size)
    nll = -math.fsum(lp for lp, _ in results)
    mean_ppl = math.fsum(math.exp(-lp / n) for lp, n in results) / len(results)
    return Score(nll=nll, tokens=sum(n for _, n in results), characters=sum(len(t) + 1 for t in texts),
                 bytes=sum(len(t.encode("utf-8")) + 1 for t in texts), unit=score_unit(tokenizer),
                 mean_text_perplexity=mean_ppl)


def _check_context(model: LanguageModel, length: int) -> None:
    if model.max_context is not None and length > model.max_context:
        raise ValueError(
            f"a sequence of {length} tokens (with <bos>) is longer than the model's context of "
            f"{model.max_context}; score it as a stream with window <= {model.max_context}"
        )


@torch.no_grad()
def stream_nll(
    model: LanguageModel,
    ids: Sequence[int] | torch.Tensor,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 16,
    token_logprobs: list[float] | None = None,
    carry_state: bool = False,
) -> Score:
    """NLL of tokens 1..N-1 of a stream, each scored once.

    ``carry_state``: read the whole stream in order with the model's state carried from
    chunk to chunk, every token conditioned on everything before it (how recurrent nets,
    n-grams and caches are scored on PTB and WikiText); only for a model without a context
    limit, and without ``window``/``stride``.

    ``token_logprobs``, when given a list, receives log P(token t | its context) of
    tokens 1..N-1 in order.

    ``window`` is the most tokens a forward pass sees (default: the model's
    context, or 1024 for unbounded models). ``stride`` = ``window`` gives
    disjoint windows (each window starts from no context); a smaller stride
    gives a sliding window: every token after the first window is scored with
    at least ``window - stride`` tokens of context.
    """
    require_causal(model, "scoring")
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = ids.numel()
    if n < 2:
        raise ValueError(f"a stream of {n} token(s) has nothing to score; give at least 2 tokens")
    if carry_state:
        return _carried_stream_nll(model, ids, window, stride, token_logprobs)
    window = window or model.max_context or 1024
    stride = stride or window
    if model.max_context is not None and window > model.max_context:
        raise ValueError(f"window={window} is larger than the model's context of {model.max_context}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride={stride} must be in [1, window={window}]")
    # Window j feeds ids[begin : begin + w] and scores the targets it is the first to reach.
    jobs: list[tuple[int, int, int]] = []  # (begin, end, first scored target index)
    scored_until = 1  # targets are positions 1..n-1
    begin = 0
    while scored_until < n:
        end = min(begin + window, n - 1)
        jobs.append((begin, end, scored_until))
        scored_until = end + 1
        begin += stride
        if end == n - 1:
            break
    device = model.device
    total = 0.0
    count = 0
    for b in range(0, len(jobs), batch_size):
        group = jobs[b : b + batch_size]
        width = max(e - s for s, e, _ in group)
        rows = torch.zeros(len(group), width + 1, dtype=torch.long)
        scored = torch.zeros(len(group), width, dtype=torch.bool)
        for row, (s, e, first) in enumerate(group):
            rows[row, : e - s + 1] = ids[s : e + 1]
            scored[row, first - (s + 1) : e - s] = True
        lp = next_token_logprobs(model, rows.to(device), scored)
        total -= float(lp.sum())
        count += int(scored.sum())
        if token_logprobs is not None:
            mask = scored.to(lp.device)
            for row in range(len(group)):
                token_logprobs.extend(lp[row][mask[row]].tolist())
    assert count == n - 1, (count, n)
    return Score(nll=total, tokens=count)


def _carried_stream_nll(model: LanguageModel, ids: torch.Tensor, window, stride, token_logprobs) -> Score:
    from lmlab.models.interpolate import component_target_logprobs

    if window is not None or stride is not None:
        raise ValueError(f"carrying the state reads the whole stream; window={window} and stride={stride} "
                         "do not apply to it (give one or the other)")
    if model.max_context is not None:
        raise ValueError(f"the model reads at most {model.max_context} tokens, so its state cannot be carried "
                         "through a stream; score it in windows (window <= its context) instead")
    logps = component_target_logprobs([model], ids)[:, 0]
    if token_logprobs is not None:
        token_logprobs.extend(logps.tolist())
    return Score(nll=float(-logps.sum()), tokens=int(logps.shape[0]))


def score_text(model, tokenizer, text: str, window: int | None = None, stride: int | None = None,
               token_logprobs: list[float] | None = None, carry_state: bool = False) -> Score:
    """Stream score of a long text; bits per character (byte) count the characters
    (bytes) after the first token. For a word tokenizer every newline is a scored
    ``</s>``, so the per-word figures count one per line, as KenLM. ``token_logprobs`` and
    ``carry_state`` as in ``stream_nll``."""
    ids = tokenizer.encode(text)
    score = stream_nll(model, ids, window, stride, token_logprobs=token_logprobs, carry_state=carry_state)
    first = tokenizer.decode(ids[:1])
    score.characters = max(len(text) - len(first), 0)
    score.bytes = max(len(text.encode("utf-8")) - len(first.encode("utf-8")), 0)
    score.unit = score_unit(tokenizer)
    return score


@torch.no_grad()
def position_logprobs(model: LanguageModel, ids: Sequence[int], top: int = 0) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """For tokens 1..N-1 of ``ids`` (one window, N <= the model's context): log P(ids[t] | ids[:t])
    and the ``top`` most probable tokens at that position as (id, log-prob), most probable first."""
    require_causal(model, "scoring")
    ids = torch.as_tensor(list(ids), dtype=torch.long).flatten()
    _check_context(model, ids.numel())
    if ids.numel() < 2:
        return [], []
    logits, _ = model(ids[None, :-1].to(model.device))
    logp = torch.log_softmax(logits[0].float(), dim=-1)  # (N - 1, V)
    picked = logp.gather(1, ids[1:, None].to(logp.device)).squeeze(1).tolist()
    if not top:
        return picked, [[] for _ in picked]
    values, index = logp.topk(min(top, logp.shape[-1]), dim=-1)
    return picked, [list(zip(i, v)) for i, v in zip(index.tolist(), values.tolist())]
