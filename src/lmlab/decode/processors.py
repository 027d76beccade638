"""Logits processors: small composable steps between the model and the search.

Each processor is a callable

    new_logits = proc(logits, ids)                     # (B, V) float, (B, T) int64 -> (B, V)
    new_logits = proc(logits, ids, num_generated=n)    # n: int or (B,) int64, tokens generated so far

that returns a new tensor (the input is never modified); a masked entry is
``-inf``. ``ids`` are the tokens the row has so far (prompt + generated, as the
generation loop passes them); entries < 0 are padding and are ignored by the
processors that read ``ids``. Only ``MinNewTokens`` and ``ForceEOS`` need
``num_generated`` (or a ``prompt_length`` given at construction).
``apply_processors`` runs a list in order and also accepts plain two-argument
callables.

Truncations (``TopK``, ``TopP``, ``MinP``, ``TypicalP``, ``EpsilonCutoff``,
``EtaCutoff``) always keep at least one token and treat ties alike: a token
whose logit equals that of a kept token is kept too, so the result never
depends on how a sort orders equal values (``TopK`` follows Hugging Face here).
Temperature 0 means greedy: only the maximal logits survive (all of them on a tie).

``build_processors`` makes the list in a fixed order (see its docstring).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Callable, Iterable, Mapping, Sequence

import torch

Tensor = torch.Tensor
NEG_INF = float("-inf")

__all__ = [
    "LogitsProcessor",
    "Temperature",
    "TopK",
    "TopP",
    "MinP",
    "TypicalP",
    "EpsilonCutoff",
    "EtaCutoff",
    "RepetitionPenalty",
    "PresencePenalty",
    "FrequencyPenalty",
    "NoRepeatNGram",
    "SuppressTokens",
    "LogitBias",
    "MinNewTokens",
    "ForceEOS",
    "apply_processors",
    "build_processors",
]


# ---------------------------------------------------------------- validation helpers


def _number(name: str, value, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a float inside the interval; ValueError naming it and the interval otherwise."""
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a real number in {interval}, got {value!r}")
    v = float(value)
    ok = not math.isnan(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        raise ValueError(f"{name} must be a real number in {interval}, got {value!r}")
    return v


def _finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def _integer(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _token_list(name: str, values) -> tuple[int, ...]:
    if isinstance(values, Integral) and not isinstance(values, bool):
        values = [values]
    try:
        out = tuple(values)
    except TypeError:
        raise ValueError(f"{name} must be a token id or a list of token ids (integers >= 0), got {values!r}") from None
    for t in out:
        if isinstance(t, bool) or not isinstance(t, Integral) or t < 0:
            raise ValueError(f"{name} must hold token ids (integers >= 0), got {t!r} in {values!r}")
    return tuple(int(t) for t in out)


def _check_ids_fit(name: str, ids: Sequence[int], vocab_size: int) -> None:
    if ids and max(ids) >= vocab_size:
        raise ValueError(
            f"{name} holds token id {max(ids)}, outside the vocabulary of size V={vocab_size}; "
            f"accepted ids: 0..{vocab_size - 1}"
        )


def _check_logits(logits: Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (B, V), got shape {tuple(logits.shape)}")


def _keep_argmax(keep: Tensor, logits: Tensor) -> Tensor:
    """``keep`` (B, V) bool or-ed with the maximal entries of each row (ties included)."""
    return keep | (logits >= logits.max(dim=-1, keepdim=True).values)


def _token_counts(ids: Tensor, vocab_size: int) -> Tensor:
    """(B, T) ids -> (B, V) float32 counts of each token; ids < 0 or >= V are ignored."""
    valid = (ids >= 0) & (ids < vocab_size)
    index = torch.where(valid, ids, torch.full_like(ids, vocab_size))
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.float32, device=ids.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab_size]


def _ids_for(ids: Tensor | None, logits: Tensor, name: str) -> Tensor:
    if ids is None:
        raise ValueError(f"{name} needs ids, the (B, T) tokens so far; got None")
    if ids.ndim != 2 or ids.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{name}: ids must have shape (B, T) with B={logits.shape[0]} as the logits, got {tuple(ids.shape)}"
        )
    return ids.to(logits.device)


# ---------------------------------------------------------------- base


class LogitsProcessor:
    """Base class: ``__call__(logits (B, V), ids (B, T), num_generated=None) -> (B, V)``.
    ``reads_ids``: whether the result depends on ``ids`` (False: on the logits and, given,
    ``num_generated`` only, so a caller that passes ``num_generated`` may pass ``ids=None``)."""

    reads_ids = True

    def __call__(self, logits: Tensor, ids: Tensor | None, num_generated: int | Tensor | None = None) -> Tensor:
        raise NotImplementedError


def processors_read_ids(processors: Iterable[Callable] | None) -> bool:
    """Whether any of ``processors`` reads the tokens so far (a callable that is not a
    ``LogitsProcessor`` is taken to)."""
    return any(getattr(proc, "reads_ids", True) for proc in processors or ())


def apply_processors(
    processors: Iterable[Callable] | None,
    logits: Tensor,
    ids: Tensor | None,
    num_generated: int | Tensor | None = None,
) -> Tensor:
    """Run ``processors`` in order on logits (B, V) given ids (B, T) -> (B, V).

    ``LogitsProcessor`` instances also receive ``num_generated`` (int or (B,));
    any other callable is called as ``proc(logits, ids)``.
    """
    for proc in processors or ():
        if isinstance(proc, LogitsProcessor):
            logits = proc(logits, ids, num_generated=num_generated)
        else:
            logits = proc(logits, ids)
    return logits


# ---------------------------------------------------------------- temperature and truncations


@dataclass(frozen=True)
class Temperature(LogitsProcessor):
    """``logits / t`` for finite ``t > 0``. ``t == 0`` means greedy: only the maximal
    logits of each row are kept (all of them on a tie), the rest become -inf — the
    limit of the tempered distribution as t -> 0. As t -> inf it tends to uniform."""

    reads_ids = False

    t: float

    def __post_init__(self) -> None:
        if isinstance(self.t, bool) or not isinstance(self.t, Real) or not (0 <= float(self.t) < math.inf):
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {self.t!r}")

    def __call__(self, logits, ids=None, num_generated=None):
        _check_logits(logits)
        if self.t == 0:
            return logits.masked_fill(logits < logits.max(dim=-1, keepdim=True).values, NEG_INF)
        if self.t == 1:
            return logits.clone()
        return logits / self.t


@dataclass(frozen=True)
class TopK(LogitsProcessor):
    """Keep the ``k`` largest logits per row and every logit tied with the k-th
    largest (as Hugging Face: mask ``logits < kth value``). 1 <= k <= V."""

    reads_ids = False

    k: int

    def __post_init__(self) -> None:
        _integer("top_k", self.k, 1)

    def __call__(self, logits, ids=None, num_generated=None):
        _check_logits(logits)
        V = logits.shape[-1]
        if self.k > V:
            raise ValueError(f"top_k={self.k} is larger than the vocabulary size V={V}; accepted: 1 <= top_k <= {V}")
        kth = torch.topk(logits, self.k, dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, NEG_INF)


@dataclass(frozen=True)
class TopP(LogitsProcessor):
    """Nucleus: keep the smallest set of most probable tokens whose probability sums
    to >= p (at least one token), plus every token tied with the least probable kept
    one. p = 1 returns the logits unchanged; p = 0 keeps the argmax (with ties)."""

    reads_ids = False

    p: float

    def __post_init__(self) -> None:
        _number("top_p", self.p, 0.0, 1.0)

    def __call__(self, logits, ids=None, num_generated=None):
        _check_logits(logits)
        if self.p >= 1.0:
            return logits.clone()
        sorted_logits, _ = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # exclusive cumulative sum
        n_keep = (mass_before < self.p).sum(dim=-1, keepdim=True).clamp(min=1)
        threshold = sorted_logits.gather(-1, n_keep - 1)
        return logits.masked_fill(logits < threshold, NEG_INF)


@dataclass(frozen=True)
class MinP(LogitsProcessor):
    """Keep tokens with probability >= p * (max probability) (Nguyen et al. 2024,
    as Hugging Face), i.e. logit >= max logit + log p. p in [0, 1]; the argmax
    always survives; p = 0 is the identity, p = 1 keeps the argmax set."""

    reads_ids = False

    p: float

    def __post_init__(self) -> None:
        _number("min_p", self.p, 0.0, 1.0)

    def __call__(self, logits, ids=None, num_generated=None):
        _check_logits(logits)
        if self.p == 0:
            return logits.clone()
        threshold = logits.max(dim=-1, keepdim=True).values + math.log(self.p)
        keep = _keep_argmax(logits >= threshold, logits)
        return logits.masked_fill(~keep, NEG_INF)


@dataclass(frozen=True)
class TypicalP(LogitsProcessor):
    """Locally typical sampling (Meister et al. 2022, as Hugging Face): sort tokens by
    |-log p - H| (H the entropy) ascending and keep the shortest prefix whose
    probability sums to >= p, plus tokens as typical as the last kept one (ties).
    p in [0, 1]; p = 1 is the identity; p = 0 keeps the most typical token(s)."""

    reads_ids = False

    p: float

    def __post_init__(self) -> None:
        _number("typical_p", self.p, 0.0, 1.0)

    def __call__(self, logits, ids=None, num_generated=None):
        _check_logits(logits)
        if self.p >= 1.0:
            return logits.clone()
        logp = torch.log_softmax(logits.float(), dim=-1)
        probs = logp.exp()
        entropy = -torch.where(probs > 0, probs * logp, torch.zeros_like(logp)).sum(-1, keepdim=True)
        distance = (-logp - entropy).abs()  # inf for masked tokens
        sorted_distance, order = torch.sort(distance, dim=-1)
        mass = torch.cumsum(probs.gather(-1, order), dim=-1)
        last = (mass < self.p).sum(dim=-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
        keep = distance <= sorted_distance.gather(-1, last)
        return logits.masked_fill(~keep, NEG_INF)


@dataclass(frozen=True)
class EpsilonCutoff(LogitsProcessor):
    """Epsilon sampling (Hewitt et al. 2022, as Hugging Face): drop tokens with
    probability < eps, always keeping the argmax (with ties). eps in [0, 1]."""

    reads_ids = False

    eps: float

    def __post_init__(self) -> None:
        _number("epsilon", self.eps, 0.0, 1.0)

    def __call__(self, logits, ids=None, num_generated=None):
        _check_logits(logits)
        if self.eps == 0:
            return logits.clone()
        probs = torch.softmax(logits.float(), dim=-1)
        keep = _keep_argmax(probs >= self.eps, logits)
        return logits.masked_fill(~keep, NEG_INF)


@dataclass(frozen=True)
class EtaCutoff(LogitsProcessor):
    """Eta sampling (Hewitt et al. 2022, as Hugging Face): drop tokens with probability
    < min(eta, sqrt(eta) * exp(-H)), H the entropy of the row; the argmax (with ties)
    always survives. eta in [0, 1]."""

    reads_ids = False

    eta: float

    def __post_init__(self) -> None:
        _number("eta", self.eta, 0.0, 1.0)

    def __call__(self, logits, ids=None, num_generated=None):
        _check_logits(logits)
        if self.eta == 0:
            return logits.clone()
        logp = torch.log_softmax(logits.float(), dim=-1)
        probs = logp.exp()
        entropy = -torch.where(probs > 0, probs * logp, torch.zeros_like(logp)).sum(-1, keepdim=True)
        cutoff = torch.clamp(math.sqrt(self.eta) * torch.exp(-entropy), max=self.eta)
        keep = _keep_argmax(probs >= cutoff, logits)
        return logits.masked_fill(~keep, NEG_INF)


# ---------------------------------------------------------------- penalties and bans


@dataclass(frozen=True)
class RepetitionPenalty(LogitsProcessor):
    """CTRL penalty (Keskar et al. 2019, as Hugging Face): for every token present in
    ``ids`` (prompt included), a positive logit is divided by r and a negative one
    multiplied by r. r > 0 finite; r = 1 is the identity, r > 1 discourages repeats."""

    r: float

    def __post_init__(self) -> None:
        _number("repetition_penalty", self.r, 0.0, math.inf, lo_open=True, hi_open=True)

    def __call__(self, logits, ids, num_generated=None):
        _check_logits(logits)
        ids = _ids_for(ids, logits, "RepetitionPenalty")
        seen = _token_counts(ids, logits.shape[-1]) > 0
        penalised = torch.where(logits < 0, logits * self.r, logits / self.r)
        return torch.where(seen, penalised, logits)


@dataclass(frozen=True)
class PresencePenalty(LogitsProcessor):
    """OpenAI presence penalty: ``logits - a * [count > 0]``, counts over ``ids``."""

    a: float

    def __post_init__(self) -> None:
        _finite("presence_penalty", self.a)

    def __call__(self, logits, ids, num_generated=None):
        _check_logits(logits)
        ids = _ids_for(ids, logits, "PresencePenalty")
        present = (_token_counts(ids, logits.shape[-1]) > 0).to(logits.dtype)
        return logits - self.a * present


@dataclass(frozen=True)
class FrequencyPenalty(LogitsProcessor):
    """OpenAI frequency penalty: ``logits - a * count``, counts over ``ids``."""

    a: float

    def __post_init__(self) -> None:
        _finite("frequency_penalty", self.a)

    def __call__(self, logits, ids, num_generated=None):
        _check_logits(logits)
        ids = _ids_for(ids, logits, "FrequencyPenalty")
        return logits - (self.a * _token_counts(ids, logits.shape[-1])).to(logits.dtype)


@dataclass(frozen=True)
class NoRepeatNGram(LogitsProcessor):
    """Ban every token that would complete an n-gram already present in ``ids``
    (n = 1 bans every token seen). n-grams touching padding (ids < 0) never match.
    Vectorised over the batch: O(B * T * n) per call."""

    n: int

    def __post_init__(self) -> None:
        _integer("no_repeat_ngram_size", self.n, 1)

    def __call__(self, logits, ids, num_generated=None):
        _check_logits(logits)
        ids = _ids_for(ids, logits, "NoRepeatNGram")
        B, T = ids.shape
        V = logits.shape[-1]
        n = self.n
        if T < n:
            return logits.clone()
        windows = ids.unfold(1, n, 1)  # (B, T - n + 1, n)
        prefix = ids[:, T - n + 1 :]  # (B, n - 1): the last n - 1 tokens
        match = (windows[:, :, : n - 1] == prefix[:, None, :]).all(-1) & (windows >= 0).all(-1)
        last = windows[:, :, n - 1]
        index = torch.where(match & (last < V), last, torch.full_like(last, V))
        banned = torch.zeros(B, V + 1, dtype=torch.bool, device=ids.device)
        banned.scatter_(1, index, True)
        return logits.masked_fill(banned[:, :V], NEG_INF)


@dataclass(frozen=True)
class SuppressTokens(LogitsProcessor):
    """Set the logits of ``token_ids`` to -inf (every step)."""

    reads_ids = False

    token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_ids", _token_list("suppress_tokens", self.token_ids))

    def __call__(self, logits, ids=None, num_generated=None):
        _check_logits(logits)
        _check_ids_fit("suppress_tokens", self.token_ids, logits.shape[-1])
        if not self.token_ids:
            return logits.clone()
        out = logits.clone()
        out[:, torch.tensor(self.token_ids, device=logits.device)] = NEG_INF
        return out


@dataclass(frozen=True)
class LogitBias(LogitsProcessor):
    """Add ``bias[id]`` to the logit of each listed token; a bias of -inf bans it."""

    reads_ids = False

    bias: Mapping[int, float]

    def __post_init__(self) -> None:
        if not isinstance(self.bias, Mapping):
            raise ValueError(f"logit_bias must be a dict token id -> bias, got {self.bias!r}")
        clean = {}
        for k, v in self.bias.items():
            (k,) = _token_list("logit_bias keys", [k])
            if isinstance(v, bool) or not isinstance(v, Real) or math.isnan(v) or v == math.inf:
                raise ValueError(f"logit_bias[{k}] must be a finite number or -inf, got {v!r}")
            clean[k] = float(v)
        object.__setattr__(self, "bias", clean)

    def __call__(self, logits, ids=None, num_generated=None):
        _check_logits(logits)
        keys = list(self.bias)
        _check_ids_fit("logit_bias", keys, logits.shape[-1])
        if not keys:
            return logits.clone()
        delta = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        delta[torch.tensor(keys, device=logits.device)] = torch.tensor(
            list(self.bias.values()), dtype=logits.dtype, device=logits.device
        )
        return logits + delta


def _generated(proc_name: str, ids, logits, num_generated, prompt_length) -> Tensor:
    """(B, 1) int64 count of generated tokens per row."""
    B = logits.shape[0]
    if num_generated is None:
        if prompt_length is None or ids is None:
            raise ValueError(
                f"{proc_name} needs the number of generated tokens: pass num_generated= (int or (B,) tensor) "
                "through apply_processors, or build it with prompt_length= so it is ids.shape[1] - prompt_length"
            )
        num_generated = ids.shape[1] - prompt_length
    n = torch.as_tensor(num_generated, device=logits.device, dtype=torch.long)
    return n.reshape(-1, 1).expand(B, 1) if n.numel() == 1 else n.reshape(B, 1)


@dataclass(frozen=True)
class MinNewTokens(LogitsProcessor):
    """Ban ``eos_id`` (an id or a list) while fewer than ``n`` tokens have been
    generated. Needs ``num_generated`` at call time, or ``prompt_length``."""

    reads_ids = False

    n: int
    eos_id: int | Sequence[int]
    prompt_length: int | None = None

    def __post_init__(self) -> None:
        _integer("min_new_tokens", self.n, 0)
        object.__setattr__(self, "eos_id", _token_list("eos_id", self.eos_id))
        if not self.eos_id:
            raise ValueError("MinNewTokens needs at least one eos id, got an empty list")
        if self.prompt_length is not None:
            _integer("prompt_length", self.prompt_length, 0)

    def __call__(self, logits, ids=None, num_generated=None):
        _check_logits(logits)
        _check_ids_fit("eos_id", self.eos_id, logits.shape[-1])
        early = _generated("MinNewTokens", ids, logits, num_generated, self.prompt_length) < self.n  # (B, 1)
        is_eos = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        is_eos[torch.tensor(self.eos_id, device=logits.device)] = True
        return logits.masked_fill(early & is_eos, NEG_INF)


@dataclass(frozen=True)
class ForceEOS(LogitsProcessor):
    """Once ``after`` tokens have been generated, only ``eos_id`` (an id or a list)
    stays allowed, so a sequence has at most ``after + 1`` new tokens, the last one
    EOS. Needs ``num_generated`` at call time, or ``prompt_length``."""

    reads_ids = False

    eos_id: int | Sequence[int]
    after: int
    prompt_length: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "eos_id", _token_list("eos_id", self.eos_id))
        if not self.eos_id:
            raise ValueError("ForceEOS needs at least one eos id, got an empty list")
        _integer("force_eos_after", self.after, 0)
        if self.prompt_length is not None:
            _integer("prompt_length", self.prompt_length, 0)

    def __call__(self, logits, ids=None, num_generated=None):
        _check_logits(logits)
        _check_ids_fit("eos_id", self.eos_id, logits.shape[-1])
        late = _generated("ForceEOS", ids, logits, num_generated, self.prompt_length) >= self.after  # (B, 1)
        is_eos = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        is_eos[torch.tensor(self.eos_id, device=logits.device)] = True
        return logits.masked_fill(late & ~is_eos, NEG_INF)


# ---------------------------------------------------------------- builder


def build_processors(
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    typical_p: float | None = None,
    epsilon: float | None = None,
    eta: float | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    suppress_tokens: Sequence[int] | None = None,
    logit_bias: Mapping[int, float] | None = None,
    eos_id: int | Sequence[int] | None = None,
    min_new_tokens: int | None = None,
    force_eos_after: int | None = None,
) -> list[LogitsProcessor]:
    """The processors for these options, in this fixed order:

    1. penalties and bans: logit_bias, repetition_penalty, frequency_penalty,
       presence_penalty, no_repeat_ngram_size, suppress_tokens, min_new_tokens,
       force_eos_after (the last two need eos_id);
    2. temperature;
    3. truncations: top_k, top_p, min_p, typical_p, epsilon, eta.

    None (and identity values: temperature 1, repetition_penalty 1, penalties 0,
    top_p 1, ...) adds nothing. temperature=0 is greedy: every truncation keeps the
    argmax set, so they cannot change the result and are left out (their values
    are still validated). min_new_tokens > force_eos_after is contradictory and
    raises ValueError.
    """
    procs: list[LogitsProcessor] = []
    if logit_bias:
        procs.append(LogitBias(logit_bias))
    if repetition_penalty is not None and RepetitionPenalty(repetition_penalty).r != 1.0:
        procs.append(RepetitionPenalty(repetition_penalty))
    if frequency_penalty is not None and FrequencyPenalty(frequency_penalty).a != 0.0:
        procs.append(FrequencyPenalty(frequency_penalty))
    if presence_penalty is not None and PresencePenalty(presence_penalty).a != 0.0:
        procs.append(PresencePenalty(presence_penalty))
    if no_repeat_ngram_size is not None:
        if not (isinstance(no_repeat_ngram_size, Integral) and no_repeat_ngram_size == 0):
            procs.append(NoRepeatNGram(no_repeat_ngram_size))  # 0 means off, as in Hugging Face
    if suppress_tokens:
        procs.append(SuppressTokens(suppress_tokens))
    if (min_new_tokens is not None or force_eos_after is not None) and eos_id is None:
        raise ValueError("min_new_tokens and force_eos_after need eos_id (a token id or a list of them), got None")
    if (
        min_new_tokens is not None
        and force_eos_after is not None
        and _integer("min_new_tokens", min_new_tokens, 0) > _integer("force_eos_after", force_eos_after, 0)
    ):
        raise ValueError(
            f"min_new_tokens={min_new_tokens} > force_eos_after={force_eos_after}: EOS would be both banned and "
            "forced; accepted: min_new_tokens <= force_eos_after"
        )
    if min_new_tokens is not None and _integer("min_new_tokens", min_new_tokens, 0) > 0:
        procs.append(MinNewTokens(min_new_tokens, eos_id))
    if force_eos_after is not None:
        procs.append(ForceEOS(eos_id, force_eos_after))

    greedy = False
    if temperature is not None:
        temp = Temperature(temperature)
        greedy = temp.t == 0
        if temp.t != 1.0:
            procs.append(temp)

    truncations: list[LogitsProcessor] = []
    if top_k is not None:
        truncations.append(TopK(top_k))
    if top_p is not None and TopP(top_p).p < 1.0:
        truncations.append(TopP(top_p))
    if min_p is not None and MinP(min_p).p > 0.0:
        truncations.append(MinP(min_p))
    if typical_p is not None and TypicalP(typical_p).p < 1.0:
        truncations.append(TypicalP(typical_p))
    if epsilon is not None and EpsilonCutoff(epsilon).eps > 0.0:
        truncations.append(EpsilonCutoff(epsilon))
    if eta is not None and EtaCutoff(eta).eta > 0.0:
        truncations.append(EtaCutoff(eta))
    if not greedy:
        procs.extend(truncations)
    return procs
