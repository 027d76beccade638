"""Decoding setups: a whole decoding strategy as one named value.

    setup = DecodingSetup.parse("top-k 50, temperature 0.7")
    results = run_setup(model, tokenizer, ["ROMEO:"], setup, max_new_tokens=100, seed=0)
    results[0][0].text                                   # prompt 0, first sample

A ``DecodingSetup`` holds every option of the decoding stack: the search
(greedy, sampling, beam), the logits processors (temperature, truncations,
penalties, bans) and the beam options. ``run_setup`` sends it to the
generation loop (``lmlab.decode.generate``) or to ``beam_search`` and returns
the same ``Result`` either way.

Search. ``num_beams=None`` (the default) runs the generation loop: argmax when
``do_sample`` is False, a draw from the processed distribution otherwise. An
integer ``num_beams`` (1 included) runs ``beam_search``; ``beam 1`` is therefore
a second, independent route to the greedy continuation (except with
``repetition_penalty``: beam search, as Hugging Face's, applies the processors
to the log-probabilities, the loop to the logits). ``do_sample=None``
resolves to False for beams and temperature 0, True otherwise.

Special tokens. ``suppress_specials`` decides which special tokens can never
be generated: ``"default"`` bans ``<pad>`` and ``<bos>`` (never a correct next
token: padding is never a training target and ``<bos>`` only starts a
sequence) but keeps ``<eos>`` (it ends a generation) and ``<unk>`` (a real
word of word-level corpora such as PTB); ``"all"`` also bans ``<eos>`` and
``<unk>``, so every row gets exactly ``max_new_tokens`` ordinary tokens;
``"none"`` bans nothing. The ids come from the tokenizer, or without one from
the model's declared specials (``model.special_ids``: an n-gram model's
``<s>``/``</s>``/``<unk>``, a Hugging Face config's ``*_token_id``); a model that
declares none (a bigram table over a Markov chain's symbols) has no special
token, so nothing is banned: an id is never special because of its position.
An id shared with ``<eos>`` (Hugging Face tokenizers without a pad token reuse
it) is banned only by ``"all"``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Callable, Mapping, Sequence

import torch

from lmlab.decode.generate import StopScan, generate
from lmlab.decode.processors import build_processors
from lmlab.decode.search import beam_search
from lmlab.models.base import special_token_ids
from lmlab.tokenizers import continuation_text

__all__ = [
    "DecodingSetup",
    "Result",
    "run_setup",
    "special_ids_to_suppress",
    "SPECIALS_POLICIES",
    "SAMPLING_OPTIONS",
    "BEAM_OPTIONS",
]

SPECIALS_POLICIES = ("default", "all", "none")
# Options that only shape a distribution to sample from.
SAMPLING_OPTIONS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon", "eta")
# Options that only mean something to beam search (with their neutral values).
BEAM_OPTIONS = {"length_penalty": 1.0, "early_stopping": True, "num_beam_groups": 1, "diversity_penalty": 0.0}


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, (tuple, list)):
        return " ".join(_fmt(v) for v in value)
    if isinstance(value, Mapping):
        return " ".join(f"{k}:{_fmt(v)}" for k, v in value.items())
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class DecodingSetup:
    """A whole decoding strategy. ``None`` means "off" for every processor option.

    Search: ``do_sample`` (None: resolved, see the module docstring),
    ``num_beams`` (None: no beam search; an int >= 1: beam search).
    Sampling only: temperature (0 = greedy), top_k, top_p, min_p, typical_p,
    epsilon, eta. Penalties and bans (any search): repetition_penalty,
    presence_penalty, frequency_penalty, no_repeat_ngram_size, suppress_tokens,
    logit_bias, min_new_tokens, force_eos_after, suppress_specials.
    Beam only: length_penalty, early_stopping, num_beam_groups, diversity_penalty.
    ``num_return_sequences``: samples per prompt (sampling) or hypotheses per
    prompt (beams, <= num_beams); greedy gives one.
    ``name``: a short label (derived from the options when empty).

    Contradictions raise ValueError when the setup is made: beams with
    sampling, sampling options with greedy or beams, beam options without beams,
    several greedy sequences.
    """

    name: str = ""
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    epsilon: float | None = None
    eta: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    suppress_tokens: tuple[int, ...] = ()
    logit_bias: Mapping[int, float] | None = None
    min_new_tokens: int | None = None
    force_eos_after: int | None = None
    num_beams: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool | str = True
    num_return_sequences: int = 1
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0
    suppress_specials: str = "default"

    # ------------------------------------------------------------ validation

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a string, got {self.name!r}")
        if self.do_sample is not None and not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be True, False or None, got {self.do_sample!r}")
        if self.suppress_specials not in SPECIALS_POLICIES:
            raise ValueError(f"suppress_specials={self.suppress_specials!r}; accepted: {', '.join(SPECIALS_POLICIES)}")
        if self.num_beams is not None:
            if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, Integral) or self.num_beams < 1:
                raise ValueError(f"num_beams must be an integer >= 1 (or None for no beam search), got {self.num_beams!r}")
        if (
            isinstance(self.num_return_sequences, bool)
            or not isinstance(self.num_return_sequences, Integral)
            or self.num_return_sequences < 1
        ):
            raise ValueError(f"num_return_sequences must be an integer >= 1, got {self.num_return_sequences!r}")
        if self.suppress_tokens is None:
            set_("suppress_tokens", ())
        elif isinstance(self.suppress_tokens, Integral) and not isinstance(self.suppress_tokens, bool):
            set_("suppress_tokens", (int(self.suppress_tokens),))
        else:
            set_("suppress_tokens", tuple(self.suppress_tokens))
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise ValueError(f"logit_bias must be a dict token id -> bias, got {self.logit_bias!r}")
            set_("logit_bias", dict(self.logit_bias))
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if isinstance(self.num_beam_groups, bool) or not isinstance(self.num_beam_groups, Integral) or self.num_beam_groups < 1:
            raise ValueError(f"num_beam_groups must be an integer >= 1, got {self.num_beam_groups!r}")
        for name in ("length_penalty", "diversity_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite real number, got {value!r}")
        if self.diversity_penalty < 0:
            raise ValueError(f"diversity_penalty must be >= 0, got {self.diversity_penalty!r}")

        # Every processor value is checked by the processors themselves (messages name the value).
        self.processors(eos_id=0)

        beam = self.num_beams is not None
        sampling_set = {k: getattr(self, k) for k in SAMPLING_OPTIONS if getattr(self, k) is not None}
        if sampling_set.get("temperature") == 1.0:
            del sampling_set["temperature"]  # the identity: harmless with any search
        greedy_temperature = self.temperature is not None and float(self.temperature) == 0.0
        do_sample = self.do_sample
        if do_sample is None:
            do_sample = not beam and not greedy_temperature
        set_("do_sample", do_sample)
        if beam:
            if do_sample:
                raise ValueError(
                    f"num_beams={self.num_beams} with do_sample=True: beam sampling is not supported; "
                    "use beam search (do_sample=False) or sampling (num_beams=None)"
                )
            if sampling_set:
                raise ValueError(
                    f"beam search (num_beams={self.num_beams}) is deterministic and does not use "
                    f"{_listing(sampling_set)}; drop them or sample instead (num_beams=None)"
                )
            if self.num_return_sequences > self.num_beams:
                raise ValueError(
                    f"num_return_sequences={self.num_return_sequences} > num_beams={self.num_beams}; "
                    f"accepted: 1 <= num_return_sequences <= num_beams"
                )
            if self.num_beams % self.num_beam_groups:
                raise ValueError(
                    f"num_beam_groups={self.num_beam_groups} must divide num_beams={self.num_beams}"
                )
            if self.diversity_penalty and self.num_beam_groups == 1:
                raise ValueError(
                    f"diversity_penalty={self.diversity_penalty} needs num_beam_groups > 1 (diverse beam search)"
                )
        else:
            beam_set = {k: getattr(self, k) for k, neutral in BEAM_OPTIONS.items() if getattr(self, k) != neutral}
            if beam_set:
                raise ValueError(f"{_listing(beam_set)} only apply to beam search; set num_beams (e.g. 'beam 4')")
            if not do_sample:
                shaping = {k: v for k, v in sampling_set.items() if k != "temperature" or float(v) != 0.0}
                if shaping and not greedy_temperature:
                    raise ValueError(
                        f"greedy decoding (do_sample=False) takes the argmax and ignores {_listing(shaping)}; "
                        "drop them or sample (do_sample=True)"
                    )
                if self.num_return_sequences > 1:
                    raise ValueError(
                        f"greedy decoding gives one sequence per prompt, got num_return_sequences="
                        f"{self.num_return_sequences}; sample or use beams for several"
                    )
            elif greedy_temperature:
                pass  # temperature 0 turns sampling into greedy (argmax, first index on a tie)
        if not self.name:
            set_("name", self.describe())

    # ------------------------------------------------------------ views

    @property
    def search(self) -> str:
        """'beam', 'greedy' or 'sample'."""
        if self.num_beams is not None:
            return "beam"
        return "sample" if self.do_sample and not self.is_greedy_temperature else "greedy"

    @property
    def is_greedy_temperature(self) -> bool:
        return self.temperature is not None and float(self.temperature) == 0.0

    def describe(self) -> str:
        """A parseable description of the non-default options, e.g. 'top-k 50, temperature 0.7'."""
        parts: list[str] = []
        if self.num_beams is not None:
            parts.append(f"beam {self.num_beams}")
        elif not self.do_sample and not self.is_greedy_temperature:
            parts.append("greedy")
        elif self.do_sample and not any(getattr(self, k) is not None for k in SAMPLING_OPTIONS):
            parts.append("sample")
        for f in dataclasses.fields(self):
            if f.name in ("name", "do_sample", "num_beams"):
                continue
            value = getattr(self, f.name)
            if value == f.default or (f.name == "suppress_tokens" and not value):
                continue
            parts.append(f"{_SHORT.get(f.name, f.name.replace('_', '-'))} {_fmt(value)}")
        return ", ".join(parts)

    def __str__(self) -> str:
        return self.name

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["suppress_tokens"] = list(self.suppress_tokens)
        if self.logit_bias is not None:
            out["logit_bias"] = {str(k): v for k, v in self.logit_bias.items()}
        return out

    def with_options(self, **changes) -> "DecodingSetup":
        """A copy with ``changes``; the name is re-derived unless given."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values.update(changes)
        if "name" not in changes:
            values["name"] = ""
        if "do_sample" not in changes and any(k in changes for k in ("num_beams", "temperature")):
            values["do_sample"] = None  # re-resolve the search
        return DecodingSetup(**values)

    def processors(self, eos_id: int | Sequence[int] | None = None, special_ids: Sequence[int] = ()) -> list:
        """The logits processors of this setup (``build_processors``' fixed order), with
        ``special_ids`` added to the suppressed tokens."""
        suppress = tuple(dict.fromkeys([*self.suppress_tokens, *special_ids]))
        return build_processors(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            typical_p=self.typical_p,
            epsilon=self.epsilon,
            eta=self.eta,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            suppress_tokens=suppress or None,
            logit_bias=self.logit_bias,
            eos_id=eos_id,
            min_new_tokens=self.min_new_tokens,
            force_eos_after=self.force_eos_after,
        )

    def check_vocab(self, vocab_size: int) -> None:
        """ValueError naming the value when an option does not fit a vocabulary of ``vocab_size``."""
        V = int(vocab_size)
        if self.top_k is not None and self.top_k > V:
            raise ValueError(f"top_k={self.top_k} is larger than the vocabulary size V={V}; accepted: 1 <= top_k <= {V}")
        for name, ids in (("suppress_tokens", self.suppress_tokens), ("logit_bias", tuple(self.logit_bias or ()))):
            bad = [t for t in ids if t >= V]
            if bad:
                raise ValueError(f"{name} holds token id {bad[0]}, outside the vocabulary of size V={V}; accepted ids: 0..{V - 1}")

    # ------------------------------------------------------------ parsing

    @classmethod
    def parse(cls, text: str) -> "DecodingSetup":
        """A setup from the strings users write, items separated by commas:

        ``greedy``, ``sample``, ``temperature 0.8`` (or ``temperature=0.8``),
        ``top-k 20``, ``top-p 0.7``, ``min-p 0.1``, ``typical 0.9``, ``epsilon 3e-4``,
        ``eta 1e-3``, ``beam 4``, and every other field by its name with ``-`` or
        ``_`` (``repetition-penalty 1.2``, ``no-repeat-ngram-size 3``,
        ``length-penalty 0.6``, ``num-return-sequences 3``, ``early-stopping never``,
        ``suppress-tokens 5 7``, ``logit-bias 5:-inf 7:1.5``, ``specials all``, ...).
        Example: ``"top-k 50, temperature 0.7"``. Unknown names raise ValueError
        listing the accepted ones; values are checked as in the constructor.
        """
        if not isinstance(text, str):
            raise ValueError(f"a decoding setup is a string such as 'top-k 50, temperature 0.7', got {text!r}")
        items = [item.strip() for item in text.split(",")]
        if not any(items):
            raise ValueError(f"empty decoding setup {text!r}; accepted names: {accepted_names()}")
        values: dict[str, Any] = {}
        words: dict[str, str] = {}  # greedy / sample / beam, as written
        for item in items:
            if not item:
                raise ValueError(f"empty item in decoding setup {text!r} (two commas in a row?)")
            m = re.fullmatch(r"\s*([A-Za-z][A-Za-z0-9_\-]*)\s*(?:[=:]\s*|\s+|$)(.*)", item)
            if not m:
                raise ValueError(f"cannot read {item!r} in decoding setup {text!r}; write 'name value', e.g. 'top-k 20'")
            key, raw = m.group(1).lower().replace("_", "-"), m.group(2).strip()
            if key not in _ALIASES:
                raise ValueError(f"unknown decoding option {m.group(1)!r} in {text!r}; accepted: {accepted_names()}")
            target = _ALIASES[key]
            if target in ("greedy", "sample"):
                if raw:
                    raise ValueError(f"{key!r} takes no value, got {raw!r} in {text!r}")
                words[target] = key
                continue
            if not raw:
                raise ValueError(f"{key!r} needs a value, e.g. '{key} {_EXAMPLES.get(target, 1)}' (in {text!r})")
            if target in values:
                raise ValueError(f"{target} is given twice in {text!r}")
            values[target] = _convert(target, raw, key)
            if target == "num_beams":
                words["beam"] = f"beam {raw}"
        if "greedy" in words and "sample" in words:
            raise ValueError(f"{text!r} asks for both greedy decoding and sampling; choose one")
        if "beam" in words and ("greedy" in words or "sample" in words):
            other = words.get("greedy") or words.get("sample")
            why = "greedy search is beam 1" if "greedy" in words else "beam sampling is not supported"
            raise ValueError(f"{text!r} combines {other!r} with {words['beam']!r}: {why}; choose one")
        if "greedy" in words:
            values["do_sample"] = False
        if "sample" in words:
            values["do_sample"] = True
        name = ", ".join(i for i in items)
        return cls(name=name, **values)


def _listing(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


_SHORT = {"temperature": "temperature", "top_k": "top-k", "top_p": "top-p", "min_p": "min-p",
          "typical_p": "typical", "suppress_specials": "specials"}

# user word -> field (or the search words "greedy"/"sample")
_ALIASES: dict[str, str] = {
    "greedy": "greedy", "argmax": "greedy",
    "sample": "sample", "sampling": "sample",
    "temperature": "temperature", "temp": "temperature",
    "top-k": "top_k", "topk": "top_k",
    "top-p": "top_p", "topp": "top_p", "nucleus": "top_p",
    "min-p": "min_p", "minp": "min_p",
    "typical": "typical_p", "typical-p": "typical_p",
    "epsilon": "epsilon", "eta": "eta",
    "beam": "num_beams", "beams": "num_beams", "num-beams": "num_beams",
    "specials": "suppress_specials",
}
for _f in dataclasses.fields(DecodingSetup):
    if _f.name not in ("name", "do_sample"):
        _ALIASES.setdefault(_f.name.replace("_", "-"), _f.name)
_ALIASES["do-sample"] = "do_sample"

_INT_FIELDS = {"top_k", "no_repeat_ngram_size", "min_new_tokens", "force_eos_after", "num_beams",
               "num_return_sequences", "num_beam_groups"}
_FLOAT_FIELDS = {"temperature", "top_p", "min_p", "typical_p", "epsilon", "eta", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "length_penalty", "diversity_penalty"}
_EXAMPLES = {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "min_p": 0.1, "typical_p": 0.9, "epsilon": 0.0003,
             "eta": 0.001, "num_beams": 4, "suppress_specials": "all", "early_stopping": "never",
             "logit_bias": "5:-inf", "suppress_tokens": "5 7", "do_sample": "true"}


def accepted_names() -> str:
    """The words DecodingSetup.parse understands, for error messages."""
    return ", ".join(sorted(_ALIASES))


def _convert(target: str, raw: str, key: str) -> Any:
    try:
        if target in _INT_FIELDS:
            value = float(raw)
            if not value.is_integer():
                raise ValueError
            return int(value)
        if target in _FLOAT_FIELDS:
            value = float(raw)
            return value
        if target in ("do_sample",):
            return _boolean(raw)
        if target == "early_stopping":
            return "never" if raw.lower() == "never" else _boolean(raw)
        if target == "suppress_specials":
            return raw.lower()
        if target == "suppress_tokens":
            return tuple(_token_ids(raw))
        if target == "logit_bias":
            return _logit_bias(raw)
    except (ValueError, json.JSONDecodeError):
        kind = "an integer" if target in _INT_FIELDS else "a number" if target in _FLOAT_FIELDS else "a value"
        raise ValueError(f"{key!r} needs {kind}, got {raw!r}; e.g. '{key} {_EXAMPLES.get(target, 1)}'") from None
    raise ValueError(f"{key!r} cannot be set from a string")  # pragma: no cover


def _boolean(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("true", "yes", "1", "on"):
        return True
    if low in ("false", "no", "0", "off"):
        return False
    raise ValueError(raw)


def _token_ids(raw: str) -> list[int]:
    raw = raw.strip()
    items = json.loads(raw) if raw.startswith("[") else raw.replace(",", " ").split()
    out = []
    for x in items:
        v = float(x)
        if not v.is_integer():
            raise ValueError(raw)
        out.append(int(v))
    return out


def _logit_bias(raw: str) -> dict[int, float]:
    raw = raw.strip()
    if raw.startswith("{"):
        return {int(k): float(v) for k, v in json.loads(raw).items()}
    out = {}
    for pair in raw.replace(",", " ").split():
        k, sep, v = pair.partition(":") if ":" in pair else pair.partition("=")
        if not sep:
            raise ValueError(raw)
        out[int(k)] = float(v)
    return out


# ---------------------------------------------------------------- running


@dataclass
class Result:
    """One continuation of one prompt, whatever the search.

    prompt_ids: the prompt as fed (with <bos> when ``add_bos``).
    token_ids: the new tokens, <eos> last when ``finish_reason == "eos"``.
    text: the decoded new tokens (<eos> and other specials dropped; cut before
        a stop string when ``finish_reason == "stop"``).
    logprobs: log-probability of each new token under the model itself (before
        processors), whatever the search.
    finish_reason: "eos", "length" or "stop".
    setup: the name of the setup that produced it.
    Beams also have ``score`` (the ranking score, sum_logprob / len ** length_penalty),
    ``sum_logprob`` and ``search_logprobs`` (the scores the beam search ranks by,
    ``processors(log_softmax(logits))`` at each token, not renormalised; equal to
    ``logprobs`` with no processors and where only bans act); they are None for
    greedy and sampling.
    """

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    setup: str = ""
    score: float | None = None
    sum_logprob: float | None = None
    search_logprobs: list[float] | None = None

    @property
    def total_logprob(self) -> float:
        """Sum of ``logprobs`` (the model's log-probability of the continuation)."""
        return math.fsum(self.logprobs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def special_ids_to_suppress(policy: str, tokenizer=None, vocab_size: int | None = None,
                            eos_id: int | None = None, *, model=None) -> list[int]:
    """Token ids banned by ``suppress_specials=policy`` (see the module docstring).

    The specials are the tokenizer's, or without one the model's declared
    ``special_ids`` (``lmlab.models.base.special_token_ids``); with neither, none:
    no id is special because of its position. Ids outside ``vocab_size`` are
    left out. ``eos_id`` is the id that ends generations; it is banned only by "all"."""
    if policy not in SPECIALS_POLICIES:
        raise ValueError(f"suppress_specials={policy!r}; accepted: {', '.join(SPECIALS_POLICIES)}")
    specials = special_token_ids(model, tokenizer)
    pad, bos, eos, unk = (specials.get(role) for role in ("pad", "bos", "eos", "unk"))
    if eos_id is not None:
        eos = eos_id
    if policy == "none":
        ids = []
    elif policy == "default":
        ids = [t for t in (pad, bos) if t is not None and t != eos]
    else:
        ids = [t for t in (pad, bos, eos, unk) if t is not None]
    if vocab_size is not None:
        ids = [t for t in ids if t < vocab_size]
    return list(dict.fromkeys(int(t) for t in ids))


def _encode_prompts(prompts, tokenizer, add_bos: bool, bos_id: int | None = None) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) and not isinstance(prompts, torch.Tensor):
        raise ValueError(f"prompts must be a list of strings or a list of token-id lists, got {prompts!r}")
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given; pass at least one prompt")
    kinds = {isinstance(p, str) for p in prompts}
    if len(kinds) > 1:
        raise ValueError("prompts mix strings and token-id lists; give all strings or all id lists")
    if add_bos and bos_id is None:
        raise ValueError(
            "add_bos=True but no <bos> id is declared (neither the tokenizer nor the model names one); "
            "give the prompts without add_bos, or start them with the id you mean"
        )
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError(f"prompt {i} is text ({p!r}); pass a tokenizer to encode it, or give token ids")
            ids = tokenizer.encode(p)
        else:
            ids = [int(t) for t in p]
        if add_bos:
            ids = [bos_id, *ids]
        if not ids:
            raise ValueError(
                f"prompt {i} is empty ({p!r}); every prompt needs at least one token: give some text, "
                "or start from <bos> (add_bos=True, `--bos` on the command line)"
            )
        out.append(ids)
    return out


def _check_context(model, prompts: list[list[int]], max_new_tokens: int, context_policy: str, beam: bool) -> None:
    ctx = getattr(model, "max_context", None)
    if context_policy not in ("slide", "error"):
        raise ValueError(f"context_policy={context_policy!r}; accepted: 'slide', 'error'")
    if ctx is None:
        return
    i = max(range(len(prompts)), key=lambda j: len(prompts[j]))
    longest = len(prompts[i])
    if longest > ctx and (context_policy == "error" or beam):
        raise ValueError(
            f"prompt {i} has {longest} tokens, more than the model's context of {ctx}; shorten it"
            + ("" if beam else " or use the 'slide' context policy (keeps the last tokens)")
        )
    need = longest + max_new_tokens - 1
    if need > ctx and (context_policy == "error" or beam):
        raise ValueError(
            f"prompt {i} ({longest} tokens) plus max_new_tokens={max_new_tokens} needs {need} positions, "
            f"more than the model's context of {ctx}; accepted: max_new_tokens <= {ctx - longest + 1}"
            + ("" if beam else ", or the 'slide' context policy")
        )


def run_setup(
    model,
    tokenizer,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    setup: DecodingSetup | str,
    max_new_tokens: int,
    seed: int | None = None,
    stop_strings: Sequence[str] = (),
    num_return_sequences: int | None = None,
    *,
    eos_id: int | None = None,
    add_bos: bool = False,
    context_policy: str = "slide",
    on_token: Callable[[int, int], None] | None = None,
    generator: torch.Generator | None = None,
) -> list[list[Result]]:
    """Run ``setup`` on each prompt; returns, per prompt, a list of ``Result``
    (``num_return_sequences`` samples, the n-best beams best first, or the one
    greedy continuation).

    prompts: strings (encoded with ``tokenizer``) or token-id lists; lengths may differ.
    setup: a DecodingSetup or a string for ``DecodingSetup.parse``.
    num_return_sequences: overrides the setup's.
    eos_id: the id that ends a row (default: the tokenizer's <eos>, or without a
        tokenizer the model's declared one; None when neither names one).
    add_bos: prepend <bos> (the tokenizer's, or the model's declared one) to every
        prompt (for models trained on complete sequences).
    context_policy: "slide" or "error" for prompts + new tokens beyond the model's
        context (beam search always refuses).
    on_token(row, token_id): called as tokens are chosen (greedy and sampling only;
        row = prompt index * num_return_sequences + sample index).
    Stop strings end a row as soon as its text contains one; beam search cannot
    stop inside the search, so its hypotheses are cut at the first stop string.
    """
    if isinstance(setup, str):
        setup = DecodingSetup.parse(setup)
    if not isinstance(setup, DecodingSetup):
        raise ValueError(f"setup must be a DecodingSetup or a string such as 'top-k 20', got {setup!r}")
    if num_return_sequences is not None and num_return_sequences != setup.num_return_sequences:
        setup = setup.with_options(num_return_sequences=num_return_sequences, name=setup.name)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    stop_strings = list(stop_strings)
    if any(not isinstance(s, str) or not s for s in stop_strings):
        raise ValueError(f"stop strings must be non-empty strings, got {stop_strings!r}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the text; pass tokenizer")
    specials = special_token_ids(model, tokenizer)
    ids = _encode_prompts(prompts, tokenizer, add_bos, specials.get("bos"))
    V = int(model.vocab_size)
    for i, p in enumerate(ids):
        bad = [t for t in p if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt {i} holds token id {bad[0]}, outside the model's vocabulary 0..{V - 1}")
    setup.check_vocab(V)
    if eos_id is None:
        eos_id = specials.get("eos")
    beam = setup.search == "beam"
    _check_context(model, ids, max_new_tokens, context_policy, beam)
    banned = special_ids_to_suppress(setup.suppress_specials, tokenizer, V, eos_id, model=model)
    processors = setup.processors(eos_id=eos_id, special_ids=banned)
    if beam:
        if on_token is not None:
            raise ValueError("on_token (streaming) needs greedy or sampling; beam search returns whole hypotheses")
        return _run_beams(model, tokenizer, ids, setup, max_new_tokens, eos_id, processors, stop_strings)
    n = setup.num_return_sequences
    rows = [p for p in ids for _ in range(n)]
    gens = generate(
        model, rows, max_new_tokens, processors=processors, do_sample=setup.search == "sample",
        eos_id=eos_id, stop_strings=stop_strings, tokenizer=tokenizer, seed=seed, generator=generator,
        context_policy=context_policy, on_token=on_token,
    )
    out: list[list[Result]] = [[] for _ in ids]
    for r, g in enumerate(gens):
        out[r // n].append(Result(prompt_ids=g.prompt_ids, token_ids=g.token_ids, text=g.text, logprobs=g.logprobs,
                                  finish_reason=g.finish_reason, setup=setup.name))
    return out


def _run_beams(model, tokenizer, ids, setup, max_new_tokens, eos_id, processors, stop_strings):
    nbest = beam_search(
        model, ids, num_beams=setup.num_beams, max_new_tokens=max_new_tokens, eos_id=eos_id,
        length_penalty=setup.length_penalty, early_stopping=setup.early_stopping,
        num_return_sequences=setup.num_return_sequences, num_beam_groups=setup.num_beam_groups,
        diversity_penalty=setup.diversity_penalty, processors=processors,
    )
    flat = [(i, h) for i, hyps in enumerate(nbest) for h in hyps]
    model_lps = _model_logprobs(model, [ids[i] for i, _ in flat], [h.tokens for _, h in flat])
    out: list[list[Result]] = [[] for _ in ids]
    for (i, h), lps in zip(flat, model_lps):
        tokens, reason = list(h.tokens), "eos" if h.finished else "length"
        text = ""
        if tokenizer is not None:
            body = tokens[:-1] if reason == "eos" else tokens
            text = continuation_text(tokenizer, ids[i], body)
            if stop_strings:
                if any(s in text for s in stop_strings):
                    # the shortest prefix of tokens whose text holds a stop string (as the loop would stop)
                    scan = StopScan(tokenizer, ids[i], stop_strings)
                    k = next(k for k, t in enumerate(body, 1) if scan.add(t))
                    tokens, reason = tokens[:k], "stop"
                    text = continuation_text(tokenizer, ids[i], tokens)
                    text = text[: min(text.index(s) for s in stop_strings if s in text)]
        out[i].append(Result(
            prompt_ids=ids[i], token_ids=tokens, text=text, logprobs=lps[: len(tokens)], finish_reason=reason,
            setup=setup.name, score=h.score, sum_logprob=h.sum_logprob,
            search_logprobs=list(h.token_logprobs[: len(tokens)]),
        ))
    return out


@torch.no_grad()
def _model_logprobs(model, prompts: list[list[int]], continuations: list[list[int]]) -> list[list[float]]:
    """log P(continuation token | prompt + earlier tokens) under the model: right-padded
    forward passes (causal models: padding after a row never changes it), in chunks of
    rows that keep the (rows, T, V) logits around 2**26 floats."""
    out: list[list[float]] = []
    if not prompts:
        return out
    seqs = [p + c[:-1] for p, c in zip(prompts, continuations)]
    T = max(len(s) for s in seqs)
    chunk = max(1, 2**26 // (T * int(model.vocab_size)))
    for lo in range(0, len(seqs), chunk):
        rows = seqs[lo : lo + chunk]
        x = torch.zeros(len(rows), T, dtype=torch.long)
        for r, s in enumerate(rows):
            x[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        logp = torch.log_softmax(model(x.to(model.device))[0].float(), dim=-1)
        for r in range(len(rows)):
            p, c = prompts[lo + r], continuations[lo + r]
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(c), device=logp.device)
            ids = torch.tensor(c, dtype=torch.long, device=logp.device)
            out.append(logp[r, pos, ids].tolist() if c else [])
    return out
