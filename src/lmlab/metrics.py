"""Metrics for generated text, each usable alone.

    score = oracle_perplexity(oracle, prompts, continuations)   # naturalness: PPL under another model
    div = diversity(groups)                                      # distinct-1..4, repetition, self-BLEU
    flu = fluency(load_classifier("cola-dir"), texts)           # P("acceptable") of a classifier
    r = rouge(predictions, references)                           # ROUGE-1/2/L F1
    nll = next_tokens_nll(model, tokenizer, prompts, targets)    # mean NLL of the true next N tokens

Oracle perplexity works on *text*. The prompt and the continuation are
re-tokenized with the oracle's own tokenizer, so any oracle (an lmlab
checkpoint, an ARPA n-gram file, a Hugging Face causal LM) scores the output of
any generator, whatever the generator's vocabulary. Only the continuation is
counted, conditioned on the prompt: with ``P = enc(prompt)`` and
``F = enc(prompt + continuation)``, the scored tokens are those of ``F`` after
the longest common prefix of ``P`` and ``F``. Usually that prefix is all of
``P``; when a subword tokenizer merges the end of the prompt with the start of
the continuation (BPE: ``"Hel" + "lo"`` -> ``"Hello"``), the merged token is
the first one scored, so every character of the continuation is inside a
scored token and no token is counted twice. The corpus perplexity is
``exp(total NLL / total scored tokens)`` (never a mean of per-text
perplexities); per-text numbers are kept as well. Rows are batched with right
padding and the padded targets are ``IGNORE``, so padding never counts; a
causal model's outputs at real positions do not depend on what follows them.
Texts longer than the oracle's context are scored with sliding windows (every
scored token sees at least half a window of context).

Diversity counts n-grams of *units*: whitespace-separated words by default
(``unit="char"`` for characters, or pass token lists). ``distinct-n`` is the
number of unique n-grams over all continuations of a method and that number
divided by the total number of n-grams (Li et al., 2016); it is also computed
within the continuations of each prompt. The repetition rate is the mean over
continuations of ``1 - unique n-grams / n-grams`` inside each continuation
(seq-rep-n of Welleck et al., 2019; n = 4 by default). Self-BLEU (Zhu et al.,
2018) scores each text against all the others with sacrebleu's sentence BLEU
and averages; identical texts give 100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from lmlab.data import IGNORE
from lmlab.score import Score, score_unit, target_logprobs
from lmlab.tokenizers import WordTokenizer, split_words

__all__ = [
    "UNITS",
    "split_units",
    "ngrams",
    "DistinctN",
    "distinct_n",
    "repetition_rate",
    "self_bleu",
    "Diversity",
    "diversity",
    "Oracle",
    "OracleScore",
    "load_oracle",
    "oracle_perplexity",
    "continuation_span",
    "Classifier",
    "FluencyScore",
    "load_classifier",
    "fluency",
    "rouge",
    "next_tokens_nll",
]

UNITS = ("word", "char")


# ================================================================ diversity


def split_units(text: str, unit: str = "word") -> list[str]:
    """``text`` as a list of units: words (split on ASCII whitespace as KenLM,
    :func:`lmlab.tokenizers.split_words`) or characters."""
    if unit == "word":
        return split_words(text)
    if unit == "char":
        return list(text)
    raise ValueError(f"unit={unit!r}; accepted: {', '.join(UNITS)}")


def _units(item: str | Sequence, unit: str) -> list:
    return split_units(item, unit) if isinstance(item, str) else list(item)


def ngrams(tokens: Sequence, n: int) -> list[tuple]:
    """The n-grams of ``tokens`` in order: ``len(tokens) - n + 1`` tuples (none if shorter)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    tokens = list(tokens)
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


@dataclass
class DistinctN:
    """Unique n-grams (``unique``) among all n-grams (``total``) of some texts."""

    n: int
    unique: int
    total: int

    @property
    def ratio(self) -> float:
        """unique / total (NaN when there is no n-gram at all)."""
        return self.unique / self.total if self.total else float("nan")

    def as_dict(self) -> dict:
        return {"n": self.n, "unique": self.unique, "total": self.total, "ratio": self.ratio}


def distinct_n(texts: Sequence[str] | Sequence[Sequence], n: int, unit: str = "word") -> DistinctN:
    """Distinct-n over ``texts`` pooled: n-grams never cross from one text into the next.

    ``texts`` are strings (split into ``unit``) or token lists used as they are.
    """
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings (or of token lists), got a single string")
    seen: set[tuple] = set()
    total = 0
    for t in texts:
        grams = ngrams(_units(t, unit), n)
        total += len(grams)
        seen.update(grams)
    return DistinctN(n, len(seen), total)


def repetition_rate(texts: Sequence[str] | Sequence[Sequence], n: int = 4, unit: str = "word") -> float:
    """Mean over texts of ``1 - unique n-grams / n-grams`` within each text (seq-rep-n).

    0 means no n-gram is repeated inside any text; texts with fewer than ``n``
    units have no n-gram and are left out (NaN when every text is that short).
    """
    rates = []
    for t in texts:
        grams = ngrams(_units(t, unit), n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return math.fsum(rates) / len(rates) if rates else float("nan")


def self_bleu(texts: Sequence[str], tokenize: str = "13a") -> float:
    """Self-BLEU (0..100): the mean sentence BLEU of each text against all the others.

    sacrebleu's ``sentence_score`` with ``effective_order=True`` (orders with
    no n-gram in a short hypothesis are skipped) and exponential smoothing.
    High means the texts resemble each other (low diversity). Cost grows as
    ``len(texts) ** 2``.
    """
    try:
        from sacrebleu.metrics import BLEU
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("self-BLEU needs sacrebleu: pip install 'lmlab[eval]'") from e
    texts = list(texts)
    if len(texts) < 2:
        raise ValueError(f"self-BLEU compares each text with the others; got {len(texts)} text(s), need at least 2")
    bleu = BLEU(effective_order=True, tokenize=tokenize)
    scores = []
    for i, hyp in enumerate(texts):
        refs = texts[:i] + texts[i + 1 :]
        scores.append(bleu.sentence_score(hyp, refs).score)
    return math.fsum(scores) / len(scores)


@dataclass
class Diversity:
    """Diversity of the continuations of one method, grouped by prompt.

    distinct[n]: pooled over every continuation. per_prompt[n]: one DistinctN
    per prompt (over that prompt's continuations). repetition: seq-rep of
    ``repetition_n``-grams. self_bleu: over every continuation (None when not
    computed or fewer than 2 continuations).
    """

    distinct: dict[int, DistinctN]
    per_prompt: dict[int, list[DistinctN]]
    repetition: float
    repetition_n: int
    self_bleu: float | None
    unit: str
    texts: int

    def per_prompt_ratio(self, n: int) -> float:
        """Mean over prompts of the within-prompt distinct-n ratio (prompts with no n-gram left out)."""
        vals = [d.ratio for d in self.per_prompt[n] if d.total]
        return math.fsum(vals) / len(vals) if vals else float("nan")

    def per_prompt_unique(self, n: int) -> float:
        """Mean over prompts of the number of unique n-grams within the prompt's continuations."""
        vals = [d.unique for d in self.per_prompt[n]]
        return math.fsum(vals) / len(vals) if vals else float("nan")

    def as_dict(self) -> dict:
        out: dict[str, Any] = {"unit": self.unit, "texts": self.texts}
        for n, d in self.distinct.items():
            out[f"distinct_{n}"] = d.ratio
            out[f"unique_{n}"] = d.unique
            out[f"total_{n}"] = d.total
            out[f"distinct_{n}_per_prompt"] = self.per_prompt_ratio(n)
            out[f"unique_{n}_per_prompt"] = self.per_prompt_unique(n)
        out["repetition"] = self.repetition
        out["repetition_n"] = self.repetition_n
        out["self_bleu"] = self.self_bleu
        return out


def diversity(
    groups: Sequence[Sequence[str]],
    max_n: int = 4,
    unit: str = "word",
    repetition_n: int = 4,
    with_self_bleu: bool = True,
) -> Diversity:
    """Distinct-1..max_n (pooled and per prompt), repetition rate and self-BLEU.

    groups: one list of continuations (strings) per prompt.
    """
    if isinstance(groups, str) or not groups or any(isinstance(g, str) for g in groups):
        raise ValueError("groups must be a non-empty list with one list of continuation strings per prompt")
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r}; accepted: {', '.join(UNITS)}")
    flat = [t for g in groups for t in g]
    distinct = {n: distinct_n(flat, n, unit) for n in range(1, max_n + 1)}
    per_prompt = {n: [distinct_n(g, n, unit) for g in groups] for n in range(1, max_n + 1)}
    sb = self_bleu(flat) if with_self_bleu and len(flat) >= 2 else None
    return Diversity(distinct, per_prompt, repetition_rate(flat, repetition_n, unit), repetition_n, sb, unit, len(flat))


# ================================================================ oracle perplexity


@dataclass
class Oracle:
    """A model that judges text: any lmlab model with a tokenizer.

    add_bos: put the tokenizer's <bos> in front of every prompt (the model
    then also conditions on "start of text"). Default for lmlab and Hugging
    Face models: off (the prompt is the context); ARPA oracles: on (<s>).
    """

    model: Any
    tokenizer: Any
    add_bos: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        if self.add_bos and getattr(self.tokenizer, "bos_id", None) is None:
            raise ValueError(f"add_bos=True but the oracle's tokenizer {self.tokenizer!r} has no <bos> id")
        tok_v, model_v = int(self.tokenizer.vocab_size), int(self.model.vocab_size)
        if tok_v > model_v:
            raise ValueError(f"the oracle's tokenizer has {tok_v} tokens but its model only {model_v}")


def load_oracle(spec: str | Path, device: str | torch.device = "cpu", add_bos: bool | None = None) -> Oracle:
    """An Oracle from a spec:

    - ``path/to/model.arpa`` (or ``arpa:<path>``): an ARPA n-gram file (KenLM,
      SRILM, lmlab), read with ``NGramModel.from_arpa``; text is split on
      whitespace into the file's words (unknown words -> ``<unk>``);
    - ``hf:<dir>``: a local Hugging Face causal LM with its tokenizer;
    - anything else: an lmlab checkpoint or run directory (``load_checkpoint``).
    """
    text = str(spec)
    if text.startswith("arpa:") or text.endswith(".arpa"):
        path = Path(text[len("arpa:"):] if text.startswith("arpa:") else text)
        if not path.is_file():
            raise FileNotFoundError(f"no ARPA file at {str(path)!r}; an ARPA oracle is a plain-text .arpa file")
        from lmlab.models.ngram import NGramModel

        model, vocab = NGramModel.from_arpa(path)
        tok = WordTokenizer(vocab, append_specials=False)  # the model predicts the file's words only
        bos = tok.bos_id is not None if add_bos is None else add_bos
        return Oracle(model.to(device).eval(), tok, bos, name=str(path))
    from lmlab.checkpoints import load_checkpoint

    model, tokenizer = load_checkpoint(spec, device)
    return Oracle(model.eval(), tokenizer, bool(add_bos), name=text)


def _as_oracle(oracle) -> Oracle:
    if isinstance(oracle, Oracle):
        return oracle
    if isinstance(oracle, (str, Path)):
        return load_oracle(oracle)
    if isinstance(oracle, tuple) and len(oracle) == 2:
        return Oracle(*oracle)
    raise ValueError(f"oracle must be an Oracle, a (model, tokenizer) pair or a model spec string, got {oracle!r}")


def continuation_span(tokenizer, prompt: str, continuation: str, add_bos: bool = False) -> tuple[list[int], int]:
    """(ids of prompt + continuation, index of the first continuation token).

    The first continuation token is the first position where the tokens of
    ``prompt + continuation`` differ from the tokens of ``prompt`` alone (see
    the module docstring for BPE merges at the boundary).
    """
    p = list(tokenizer.encode(prompt))
    f = list(tokenizer.encode(prompt + continuation))
    k = 0
    limit = min(len(p), len(f))
    while k < limit and p[k] == f[k]:
        k += 1
    if add_bos:
        f, k = [int(tokenizer.bos_id), *f], k + 1
    return f, k


@dataclass
class OracleScore(Score):
    """Totals over the continuations (``nll``, ``tokens``, ``characters``: see Score)
    and per continuation: ``per_text`` = [(nll, tokens)].

    unknown: scored tokens that are the oracle's <unk> (its tokenizer could not
    represent some text). unscored: first tokens left out because nothing came
    before them (an empty prompt without <bos>, or a prompt merged entirely into
    the continuation's first token).
    """

    per_text: list[tuple[float, int]] = field(default_factory=list)
    unknown: int = 0
    unscored: int = 0

    def text_perplexities(self) -> list[float]:
        return [math.exp(nll / n) if n else float("nan") for nll, n in self.per_text]

    def as_dict(self) -> dict:
        out = super().as_dict()
        out.pop("per_text", None)
        return out


def _windows(length: int, first: int, window: int | None) -> list[tuple[int, int, int]]:
    """Forward passes (begin, end, first target) that score targets first..length-1 of a row once.

    Input ids[begin:end] predicts targets begin+1..end; a pass scores the targets
    from ``first`` on. Rows that fit take one pass; longer rows slide, every
    target seeing at least half a window of context.
    """
    if first >= length:
        return []
    if window is None or length - 1 <= window:
        return [(0, length - 1, first)]
    keep = max(1, window // 2)
    jobs = []
    j = first
    while j < length:
        begin = max(0, j - keep)
        end = min(begin + window, length - 1)
        jobs.append((begin, end, j))
        j = end + 1
    return jobs


@torch.no_grad()
def oracle_perplexity(
    oracle,
    prompts: Sequence[str],
    continuations: Sequence[str],
    batch_size: int = 16,
) -> OracleScore:
    """Perplexity of each continuation given its prompt under ``oracle``, continuation tokens only.

    oracle: an :class:`Oracle`, a (model, tokenizer) pair, or a spec for :func:`load_oracle`.
    prompts, continuations: strings, one continuation per prompt (repeat a prompt
    for several continuations). Returns an :class:`OracleScore`: the corpus
    perplexity is ``score.perplexity``; ``score.per_text`` holds (nll, tokens) per row.
    """
    oracle = _as_oracle(oracle)
    prompts, continuations = list(prompts), list(continuations)
    if len(prompts) != len(continuations):
        raise ValueError(
            f"{len(prompts)} prompts but {len(continuations)} continuations; give one continuation per prompt"
        )
    if not prompts:
        raise ValueError("no continuations to score; give at least one (prompt, continuation) pair")
    for name, items in (("prompt", prompts), ("continuation", continuations)):
        for i, t in enumerate(items):
            if not isinstance(t, str):
                raise ValueError(f"{name} {i} must be a string (the oracle re-tokenizes text), got {t!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    model, tok = oracle.model, oracle.tokenizer
    window = model.max_context
    pad = getattr(tok, "pad_id", None)
    pad = int(pad) if pad is not None and 0 <= int(pad) < int(model.vocab_size) else 0
    unk = getattr(tok, "unk_id", None)
    rows: list[list[int]] = []
    jobs: list[tuple[int, int, int, int]] = []  # (row, begin, end, first)
    unscored = unknown = 0
    for r, (p, c) in enumerate(zip(prompts, continuations)):
        ids, k = continuation_span(tok, p, c, oracle.add_bos)
        if k == 0 and ids:
            unscored += 1  # nothing before the first token: it cannot be scored
        first = max(k, 1)
        if unk is not None:
            unknown += sum(1 for t in ids[first:] if t == unk)
        rows.append(ids)
        jobs.extend((r, b, e, f) for b, e, f in _windows(len(ids), first, window))
    nll = [0.0] * len(rows)
    count = [0] * len(rows)
    device = model.device
    jobs.sort(key=lambda j: j[2] - j[1])  # similar lengths together: less padding
    for lo in range(0, len(jobs), batch_size):
        group = jobs[lo : lo + batch_size]
        width = max(e - b for _, b, e, _ in group)
        x = torch.full((len(group), width), pad, dtype=torch.long)
        y = torch.full((len(group), width), IGNORE, dtype=torch.long)
        for i, (r, b, e, f) in enumerate(group):
            ids = torch.tensor(rows[r], dtype=torch.long)
            x[i, : e - b] = ids[b:e]
            t = ids[b + 1 : e + 1].clone()
            t[: max(0, f - (b + 1))] = IGNORE
            y[i, : e - b] = t
        lp = target_logprobs(model, x.to(device), y.to(device)).double().sum(1).tolist()
        n = (y != IGNORE).sum(1).tolist()
        for i, (r, *_rest) in enumerate(group):
            nll[r] -= lp[i]
            count[r] += int(n[i])
    per_text = list(zip(nll, count))
    total_chars = sum(len(c) for c in continuations)
    return OracleScore(nll=math.fsum(nll), tokens=sum(count), characters=total_chars,
                       bytes=sum(len(c.encode("utf-8")) for c in continuations), unit=score_unit(tok),
                       per_text=per_text, unknown=unknown, unscored=unscored)


# ================================================================ fluency


@dataclass
class Classifier:
    """A Hugging Face sequence classifier and its tokenizer (``load_classifier``)."""

    model: Any
    tokenizer: Any
    name: str = ""

    @property
    def labels(self) -> dict[int, str]:
        return {int(k): str(v) for k, v in (self.model.config.id2label or {}).items()}

    def label_index(self, label: str | int) -> int:
        """The class index of ``label``: a name of ``id2label`` (case-insensitive) or an index."""
        labels = self.labels
        n = int(self.model.config.num_labels)
        if isinstance(label, int) and not isinstance(label, bool) or isinstance(label, str) and label.strip().isdigit():
            i = int(label)
            if 0 <= i < n:
                return i
        elif isinstance(label, str):
            hits = [i for i, name in labels.items() if name.lower() == label.lower()]
            if hits:
                return hits[0]
        shown = ", ".join(f"{i}={name!r}" for i, name in sorted(labels.items()))
        raise ValueError(
            f"label {label!r} is not a class of the classifier {self.name or ''}; accepted: a name or an index "
            f"of {shown} (CoLA models often call 'acceptable' LABEL_1: pass 1)"
        )


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """``AutoModelForSequenceClassification`` + ``AutoTokenizer`` from a local directory (offline)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no Hugging Face classifier at {str(path)!r}: expected a directory with config.json, weights and "
            "tokenizer files (e.g. a CoLA model saved with save_pretrained)"
        )
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("the fluency classifier needs transformers: pip install 'lmlab[hf]'") from e
    from lmlab.untrusted import refuse_pickled_weights, refuse_remote_code

    refuse_remote_code(path)  # no code from the directory runs
    refuse_pickled_weights(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(path), local_files_only=True, trust_remote_code=False, use_safetensors=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    return Classifier(model.to(device).eval(), tokenizer, name=str(path))


@dataclass
class FluencyScore:
    """Mean probability of ``label`` over the texts, and each text's probability."""

    mean: float
    probabilities: list[float]
    label: str

    def as_dict(self) -> dict:
        return {"fluency": self.mean, "label": self.label, "texts": len(self.probabilities)}


@torch.no_grad()
def fluency(
    classifier: Classifier | str | Path,
    texts: Sequence[str],
    label: str | int = "acceptable",
    batch_size: int = 32,
    max_length: int = 512,
) -> FluencyScore:
    """Mean P(label | text) under a sequence classifier (texts truncated to ``max_length`` tokens)."""
    if not isinstance(classifier, Classifier):
        classifier = load_classifier(classifier)
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to classify; give at least one")
    index = classifier.label_index(label)
    device = next(classifier.model.parameters()).device
    probs: list[float] = []
    for lo in range(0, len(texts), batch_size):
        enc = classifier.tokenizer(texts[lo : lo + batch_size], padding=True, truncation=True,
                                   max_length=max_length, return_tensors="pt")
        logits = classifier.model(**{k: v.to(device) for k, v in enc.items()}).logits
        probs.extend(torch.softmax(logits.float(), dim=-1)[:, index].tolist())
    name = classifier.labels.get(index, str(index))
    return FluencyScore(math.fsum(probs) / len(probs), probs, name)


# ================================================================ ROUGE


def rouge(
    predictions: Sequence[str],
    references: Sequence[str],
    types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
    use_stemmer: bool = True,
) -> dict[str, float]:
    """Mean ROUGE F1 (0..1) of each prediction against its reference (the rouge-score package)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("ROUGE needs rouge-score: pip install 'lmlab[eval]'") from e
    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; give one reference each")
    if not predictions:
        raise ValueError("no predictions to score; give at least one")
    known = ("rouge1", "rouge2", "rouge3", "rouge4", "rougeL", "rougeLsum")
    bad = [t for t in types if t not in known]
    if bad:
        raise ValueError(f"unknown ROUGE type(s) {bad}; accepted: {', '.join(known)}")
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)
    sums = {t: 0.0 for t in types}
    for p, r in zip(predictions, references):
        scores = scorer.score(r, p)  # (target, prediction)
        for t in types:
            sums[t] += scores[t].fmeasure
    return {t: s / len(predictions) for t, s in sums.items()}


# ================================================================ next-N-token NLL


def next_tokens_nll(
    model,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    n: int | None = None,
    add_bos: bool = False,
    context_policy: str = "slide",
) -> float:
    """Mean NLL per token (nats) of the true next ``n`` tokens after each prompt (the ``predict`` task).

    prompts and targets are texts, encoded separately with ``tokenizer``; each
    target must have at least ``n`` tokens (default: the shortest target's
    length). Tokens are teacher-forced (``lmlab.decode.tasks.next_n_nll``):
    token i is scored given the prompt and the true tokens before it.
    """
    from lmlab.decode.tasks import next_n_nll

    prompts, targets = list(prompts), list(targets)
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets; give one target per prompt")
    if not prompts:
        raise ValueError("no prompts given; give at least one prompt with its target")
    if add_bos and getattr(tokenizer, "bos_id", None) is None:
        raise ValueError(f"add_bos=True but the tokenizer {tokenizer!r} has no <bos> id; call without add_bos")
    p_ids = [([int(tokenizer.bos_id)] if add_bos else []) + list(tokenizer.encode(p)) for p in prompts]
    t_ids = [list(tokenizer.encode(t)) for t in targets]
    for i, (p, t) in enumerate(zip(p_ids, t_ids)):
        if not p:
            raise ValueError(f"prompt {i} is empty ({prompts[i]!r}); give some text or add_bos=True")
        if not t:
            raise ValueError(f"target {i} is empty ({targets[i]!r}); give the true continuation")
    shortest = min(len(t) for t in t_ids)
    if n is None:
        n = shortest
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if n > shortest:
        i = min(range(len(t_ids)), key=lambda j: len(t_ids[j]))
        raise ValueError(
            f"n={n} but target {i} ({targets[i]!r}) has only {shortest} token(s); accepted: n <= {shortest}"
        )
    return float(next_n_nll(model, p_ids, [t[:n] for t in t_ids], reduction="mean", context_policy=context_policy))
