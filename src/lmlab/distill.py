"""Distillation: a teacher and a student are just two lmlab models.

Sequence-level (synthetic data)::

    prompt = ChatPrompt()                                   # system + "instruction input suffix" via the chat template
    examples = generate_teacher_data(teacher, teacher_tok, articles, prompt, max_new_tokens=40)
    kept, report = filter_examples(examples, min_words=5, dedupe=True, require_marker=True)
    pairs = sft_pairs(student_tok, TextPrompt("{input}\\nTL;DR:", " {output}"), kept, max_len=256)
    Trainer(student, SFTBatches(pairs, 8, pad_id, eos_id), None, config, "runs/sft").fit()

Token-level (the teacher's next-token distributions; the two must share a tokenizer)::

    check_same_tokenizer(teacher_tok, student_tok)
    DistillTrainer(student, teacher, train, val, config, "runs/kd",
                   divergence="forward", temperature=2.0, nll_weight=0.5).fit()

Prompt formats
--------------
- :class:`ChatPrompt` is for an instruction-tuned teacher: the messages
  ``[system, user: "<instruction> <input> <suffix>"]`` go through the tokenizer's chat
  template (``lmlab.hf.chat_ids``) with the generation prompt, and the output is the text
  after ``marker`` (e.g. ``"TL;DR:"``) in the teacher's answer.
- :class:`TextPrompt` is for a plain LM (student or teacher): the prompt is
  ``template.format(input=...)`` (e.g. ``"{input}\\nTL;DR:"``) and the completion
  ``output_template.format(output=...)`` (e.g. ``" {output}"``), so the student reads
  ``"<input>\\nTL;DR: <output>"``. An input too long for ``max_len`` is cut at the end
  (the template's text, with its marker, is kept).

Supervised fine-tuning
----------------------
:class:`SFTBatches` holds (prompt ids, output ids) pairs; a batch is
``x = [<bos>] prompt output``, ``y`` the next tokens, with every target that is a prompt
token set to ``IGNORE`` (-100), the output's tokens and ``<eos>`` kept, and right padding
``IGNORE`` too: the prompt is read, never learned, and contributes exactly zero loss and
zero gradient. It is a ``Batches`` for :class:`lmlab.train.Trainer`.

Token-level loss
----------------
With student logits ``s``, teacher logits ``t`` and temperature ``T``
(``p = softmax(t / T)``, ``q = softmax(s / T)``), at every position whose target is not
``IGNORE``::

    forward KL  = sum_v p_v (log p_v - log q_v)          (mode covering; Hinton et al. 2015)
    reverse KL  = sum_v q_v (log q_v - log p_v)          (mode seeking; MiniLLM, Gu et al. 2024)
    loss        = nll_weight * NLL(data) + (1 - nll_weight) * T^2 * mean KL

The ``T^2`` keeps the gradient's scale independent of ``T``. The NLL is the ordinary
cross-entropy at temperature 1. Validation loss is always the plain data NLL, so runs
with and without a teacher are compared on the same number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from lmlab.checkpoints import TRUST_REMOTE_CODE_HELP
from lmlab.data import IGNORE, read_jsonl, read_text
from lmlab.models.base import LanguageModel
from lmlab.train import Batches, TrainConfig, Trainer

__all__ = [
    "ChatPrompt",
    "TextPrompt",
    "Example",
    "generate_teacher_data",
    "filter_examples",
    "save_examples",
    "load_examples",
    "sft_pairs",
    "sft_batch",
    "SFTBatches",
    "DIVERGENCES",
    "kl_divergence",
    "kd_loss",
    "check_same_tokenizer",
    "DistillTrainer",
    "add_distill_arguments",
    "run_distill",
]

DIVERGENCES = ("forward", "reverse")

DEFAULT_SYSTEM = "You are a helpful assistant and an expert at summarizing articles."
DEFAULT_INSTRUCTION = "Summarize the following article."
DEFAULT_SUFFIX = "Start your summary with 'TL;DR:'"


# ================================================================ prompt formats


@dataclass(frozen=True)
class ChatPrompt:
    """An instruction-tuned teacher's prompt: ``system`` (None: no system message) and the
    user message ``"<instruction> <input> <suffix>"`` through the tokenizer's chat template.

    ``extract(answer)`` is the text after the first ``marker`` (None if the answer has no
    marker; with ``marker=None`` the whole answer), stripped.
    """

    instruction: str = DEFAULT_INSTRUCTION
    suffix: str = DEFAULT_SUFFIX
    system: str | None = DEFAULT_SYSTEM
    marker: str | None = "TL;DR:"

    def messages(self, input: str) -> list[dict[str, str]]:
        user = " ".join(part for part in (self.instruction, input.strip(), self.suffix) if part)
        out = [{"role": "system", "content": self.system}] if self.system else []
        return out + [{"role": "user", "content": user}]

    def prompt_ids(self, tokenizer, input: str, max_tokens: int | None = None) -> list[int]:
        from lmlab.hf import chat_ids

        ids = chat_ids(tokenizer, self.messages(input))
        if max_tokens is not None and len(ids) > max_tokens:
            overhead = len(ids) - len(tokenizer.encode(input.strip()))
            room = max_tokens - overhead
            if room < 1:
                raise ValueError(f"max_prompt_tokens={max_tokens} leaves no room for the input after the template's {overhead} tokens")
            ids = chat_ids(tokenizer, self.messages(tokenizer.decode(tokenizer.encode(input.strip())[:room])))
        return ids

    def extract(self, answer: str) -> str | None:
        if self.marker is None:
            return answer.strip()
        at = answer.find(self.marker)
        if at < 0:
            return None
        return answer[at + len(self.marker):].strip()


@dataclass(frozen=True)
class TextPrompt:
    """A plain LM's prompt ``template.format(input=...)`` and completion ``output_template.format(output=...)``.

    ``extract(answer)`` (when a plain LM is the teacher) is the answer up to ``stop``
    (default: a blank line; None: all of it), stripped of surrounding whitespace unless
    ``strip=False`` (a character-level continuation keeps its spaces).
    """

    template: str = "{input}\nTL;DR:"
    output_template: str = " {output}"
    stop: str | None = "\n\n"
    strip: bool = True

    def __post_init__(self) -> None:
        if self.template.count("{input}") != 1:
            raise ValueError(f"template {self.template!r} must contain '{{input}}' exactly once, e.g. '{{input}}\\nTL;DR:'")
        if self.output_template.count("{output}") != 1:
            raise ValueError(f"output_template {self.output_template!r} must contain '{{output}}' exactly once, e.g. ' {{output}}'")

    def prompt_ids(self, tokenizer, input: str, max_tokens: int | None = None) -> list[int]:
        """Ids of the prompt; with ``max_tokens`` the input is cut (at its end) so the prompt fits."""
        ids = list(tokenizer.encode(self.template.format(input=input)))
        if max_tokens is None or len(ids) <= max_tokens:
            return ids
        before, after = self.template.split("{input}")
        pre = list(tokenizer.encode(before)) if before else []
        post = list(tokenizer.encode(after)) if after else []
        room = max_tokens - len(pre) - len(post)
        if room < 1:
            raise ValueError(f"a prompt of at most {max_tokens} tokens leaves no room for the input after the "
                             f"template's {len(pre) + len(post)} tokens")
        return pre + list(tokenizer.encode(input))[:room] + post

    def output_ids(self, tokenizer, output: str) -> list[int]:
        return list(tokenizer.encode(self.output_template.format(output=output)))

    def extract(self, answer: str) -> str | None:
        if self.stop and self.stop in answer:
            answer = answer[: answer.index(self.stop)]
        return answer.strip() if self.strip else answer


# ================================================================ teacher data


@dataclass
class Example:
    """One distillation example: ``output`` is what the student learns for ``input``.

    raw: the teacher's whole answer; logprob: its mean log-probability per token under the
    teacher; tokens: its length in teacher tokens; marker_found: False when the prompt's
    marker was missing (``output`` is then the whole answer, stripped).
    """

    input: str
    output: str
    raw: str = ""
    logprob: float | None = None
    tokens: int = 0
    finish_reason: str = ""
    marker_found: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@torch.no_grad()
def generate_teacher_data(
    teacher: LanguageModel,
    tokenizer,
    inputs: Sequence[str],
    prompt: ChatPrompt | TextPrompt,
    setup: Any = "greedy",
    max_new_tokens: int = 40,
    batch_size: int = 8,
    seed: int = 0,
    max_prompt_tokens: int | None = None,
    progress: bool = True,
) -> list[Example]:
    """The teacher's outputs for ``inputs`` (in the order given).

    Prompts are sorted by length and decoded ``batch_size`` at a time with ``setup`` (any
    :class:`~lmlab.decode.DecodingSetup`; sampling draws are seeded by ``seed`` and the
    batch), so rows of a batch have nearly equal prompts and few forced steps. Generation
    stops at the tokenizer's ``<eos>``. ``max_prompt_tokens`` cuts long inputs.
    """
    from tqdm.auto import tqdm

    from lmlab.decode.setups import run_setup

    inputs = list(inputs)
    if not inputs:
        raise ValueError("no inputs given; the teacher needs at least one input to answer")
    if isinstance(inputs[0], bytes) or any(not isinstance(x, str) for x in inputs):
        raise ValueError("inputs must be strings")
    teacher.eval()
    ctx = teacher.max_context
    if max_prompt_tokens is None and ctx is not None:
        max_prompt_tokens = max(1, ctx - max_new_tokens)
    prompts = [prompt.prompt_ids(tokenizer, x, max_prompt_tokens) for x in inputs]
    order = sorted(range(len(inputs)), key=lambda i: len(prompts[i]))
    out: list[Example | None] = [None] * len(inputs)
    bar = tqdm(total=len(inputs), disable=not progress, desc="teacher", dynamic_ncols=True)
    for n, lo in enumerate(range(0, len(order), batch_size)):
        rows = order[lo : lo + batch_size]
        results = run_setup(teacher, tokenizer, [prompts[i] for i in rows], setup, max_new_tokens, seed=seed + n)
        for i, per_prompt in zip(rows, results):
            r = per_prompt[0]
            extracted = prompt.extract(r.text)
            lp = sum(r.logprobs) / len(r.logprobs) if r.logprobs else None
            out[i] = Example(input=inputs[i], output=extracted if extracted is not None else r.text.strip(), raw=r.text,
                             logprob=lp, tokens=len(r.token_ids), finish_reason=r.finish_reason,
                             marker_found=extracted is not None)
        bar.update(len(rows))
    bar.close()
    return [e for e in out if e is not None]


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


def filter_examples(
    examples: Sequence[Example],
    *,
    min_words: int | None = None,
    max_words: int | None = None,
    dedupe: bool = True,
    require_marker: bool = False,
    min_logprob: float | None = None,
    score: Callable[[Example], float] | None = None,
    min_score: float | None = None,
) -> tuple[list[Example], dict[str, int]]:
    """Keep the examples that pass every filter, in order; returns (kept, counts).

    - empty outputs are always dropped;
    - ``require_marker``: drop answers without the prompt's marker;
    - ``min_words`` / ``max_words``: the output's length in whitespace-separated words;
    - ``min_logprob``: the teacher's mean log-probability per token (a confidence threshold);
    - ``score`` + ``min_score``: any score of an example (e.g. ROUGE of the output against
      the input) must be at least ``min_score``;
    - ``dedupe``: of outputs equal up to case and spacing, keep the first.

    ``counts`` has the number of examples dropped by each rule (the first rule that
    drops an example counts it) and ``kept``.
    """
    if (score is None) != (min_score is None):
        raise ValueError("give both score= and min_score= (a callable and its threshold), or neither")
    for name, v in (("min_words", min_words), ("max_words", max_words)):
        if v is not None and (not isinstance(v, int) or v < 0):
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    if min_words is not None and max_words is not None and min_words > max_words:
        raise ValueError(f"min_words={min_words} is larger than max_words={max_words}")
    counts = {"empty": 0, "no_marker": 0, "too_short": 0, "too_long": 0, "low_logprob": 0, "low_score": 0, "duplicate": 0}
    seen: set[str] = set()
    kept = []
    for e in examples:
        words = len(e.output.split())
        if not e.output.strip():
            counts["empty"] += 1
        elif require_marker and not e.marker_found:
            counts["no_marker"] += 1
        elif min_words is not None and words < min_words:
            counts["too_short"] += 1
        elif max_words is not None and words > max_words:
            counts["too_long"] += 1
        elif min_logprob is not None and (e.logprob is None or e.logprob < min_logprob):
            counts["low_logprob"] += 1
        elif score is not None and score(e) < min_score:
            counts["low_score"] += 1
        elif dedupe and _normalized(e.output) in seen:
            counts["duplicate"] += 1
        else:
            seen.add(_normalized(e.output))
            kept.append(e)
    counts["kept"] = len(kept)
    return kept, counts


def save_examples(path: str | Path, examples: Sequence[Example]) -> None:
    """Write examples as JSON lines (one object per example)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps(e.to_dict(), ensure_ascii=False) + "\n")


def load_examples(path: str | Path) -> list[Example]:
    """Examples from JSON lines with at least ``input`` and ``output`` (other fields optional)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no examples file at {str(path)!r}; expected JSON lines with 'input' and 'output'")
    names = {f.name for f in dataclasses.fields(Example)}
    out = []
    for n, obj in read_jsonl(path, "an object with 'input' and 'output' strings"):
        if not isinstance(obj.get("input"), str) or not isinstance(obj.get("output"), str):
            raise ValueError(f"{path}:{n} needs string fields 'input' and 'output'")
        out.append(Example(**{k: v for k, v in obj.items() if k in names}))
    if not out:
        raise ValueError(f"{path} holds no examples")
    return out


# ================================================================ supervised fine-tuning


def sft_pairs(tokenizer, prompt: TextPrompt, examples: Sequence[Example | tuple[str, str]],
              max_len: int | None = None, add_eos: bool = True, add_bos: bool = False) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, output ids) of each example in the student's format.

    ``max_len``: the most tokens of ``[<bos>] prompt output [<eos>]`` (the student's
    context); the input is cut to fit, and an output longer than ``max_len // 2`` is cut too.
    """
    pairs = []
    extra = int(add_eos) + int(add_bos)
    for e in examples:
        inp, outp = (e.input, e.output) if isinstance(e, Example) else e
        o = prompt.output_ids(tokenizer, outp)
        if max_len is not None:
            o = o[: max(1, max_len // 2)]
            p = prompt.prompt_ids(tokenizer, inp, max_len - len(o) - extra)
        else:
            p = prompt.prompt_ids(tokenizer, inp)
        if not p and not add_bos:
            raise ValueError(f"the prompt of input {inp[:40]!r} is empty; give a template with text or add_bos=True")
        pairs.append((p, o))
    if not pairs:
        raise ValueError("no examples to fine-tune on")
    return pairs


def sft_batch(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, eos_id: int | None = None,
              bos_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (B, L) for prompt/output pairs: ``s = [bos] prompt output [eos]``, ``x = s[:-1]``,
    ``y = s[1:]`` with every target inside the prompt (and the padding) set to IGNORE."""
    seqs, starts = [], []
    for p, o in pairs:
        s = ([bos_id] if bos_id is not None else []) + list(p) + list(o) + ([eos_id] if eos_id is not None else [])
        seqs.append(s)
        starts.append(len(s) - len(o) - (1 if eos_id is not None else 0))  # index in s of the first output token
    L = max(len(s) for s in seqs) - 1
    if L < 1:
        raise ValueError("every sequence needs at least two tokens (a prompt token and an output token)")
    x = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), L), IGNORE, dtype=torch.long)
    for r, (s, first) in enumerate(zip(seqs, starts)):
        t = torch.tensor(s, dtype=torch.long)
        x[r, : len(s) - 1] = t[:-1]
        y[r, : len(s) - 1] = t[1:]
        y[r, : max(first - 1, 0)] = IGNORE  # targets s[1 .. first-1] are prompt tokens
    return x, y


@dataclass
class SFTBatches:
    """Prompt/output pairs in padded batches whose prompt targets are IGNORE (see :func:`sft_batch`).

    ``sample`` draws ``batch_size`` pairs at random (a ``Batches`` for the Trainer);
    ``windows`` yields every pair once, in order.
    """

    pairs: list[tuple[list[int], list[int]]]
    batch_size: int
    pad_id: int
    eos_id: int | None = None
    bos_id: int | None = None

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ValueError("no prompt/output pairs to fine-tune on")
        if any(not o for _, o in self.pairs) and self.eos_id is None:
            raise ValueError("an output is empty and eos_id is None: such a pair has nothing to learn")

    @property
    def block_size(self) -> int:
        extra = (self.eos_id is not None) + (self.bos_id is not None)
        return max(len(p) + len(o) + extra for p, o in self.pairs) - 1

    def sample(self, generator: torch.Generator, device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(len(self.pairs), (self.batch_size,), generator=generator).tolist()
        x, y = sft_batch([self.pairs[i] for i in rows], self.pad_id, self.eos_id, self.bos_id)
        return x.to(device), y.to(device)

    def windows(self, device: Any = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for lo in range(0, len(self.pairs), self.batch_size):
            x, y = sft_batch(self.pairs[lo : lo + self.batch_size], self.pad_id, self.eos_id, self.bos_id)
            yield x.to(device), y.to(device)


# ================================================================ token-level


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                  divergence: str = "forward", temperature: float = 1.0) -> torch.Tensor:
    """Mean KL over the positions where ``mask`` is True (all when None), at ``temperature``.

    student_logits, teacher_logits: (..., V) with the same V; mask: (...) bool.
    ``"forward"``: KL(teacher || student); ``"reverse"``: KL(student || teacher).
    Not multiplied by T^2 (:func:`kd_loss` does that).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r}; accepted: {', '.join(DIVERGENCES)}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape; the models must share a vocabulary")
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.float().detach() / temperature, dim=-1)
    if divergence == "forward":
        per = (t.exp() * (t - s)).sum(-1)
    else:
        per = (s.exp() * (s - t)).sum(-1)
    if mask is None:
        return per.mean()
    n = mask.sum()
    return (per * mask).sum() / n.clamp_min(1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            divergence: str = "forward", temperature: float = 1.0, nll_weight: float = 0.0) -> torch.Tensor:
    """``nll_weight * NLL(targets) + (1 - nll_weight) * T^2 * KL`` over the targets that are not IGNORE.

    student_logits, teacher_logits: (B, T, V); targets: (B, T).
    """
    if not 0.0 <= nll_weight <= 1.0:
        raise ValueError(f"nll_weight must be in [0, 1], got {nll_weight!r}")
    mask = targets != IGNORE
    loss = student_logits.new_zeros((), dtype=torch.float32)
    if nll_weight < 1.0:
        kl = kl_divergence(student_logits, teacher_logits, mask, divergence, temperature)
        loss = loss + (1.0 - nll_weight) * temperature**2 * kl
    if nll_weight > 0.0:
        nll = F.cross_entropy(student_logits.reshape(-1, student_logits.shape[-1]).float(), targets.reshape(-1),
                              ignore_index=IGNORE)
        loss = loss + nll_weight * nll
    return loss


def _vocab(tokenizer) -> Any:
    hf = getattr(tokenizer, "hf", None)
    if hf is not None and hasattr(hf, "get_vocab"):
        return hf.get_vocab()
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "get_vocab"):
        return backend.get_vocab(with_added_tokens=True)
    return [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]


def check_same_tokenizer(teacher_tokenizer, student_tokenizer) -> None:
    """Raise ``ValueError`` unless the two tokenizers map the same strings to the same ids
    (token-level distillation compares distributions id by id)."""
    a, b = teacher_tokenizer, student_tokenizer
    why = None
    if a.vocab_size != b.vocab_size:
        why = f"the teacher's tokenizer has {a.vocab_size} tokens, the student's {b.vocab_size}"
    else:
        try:
            same_json = a.to_json() == b.to_json()
        except Exception:  # HFTokenizer without a source directory, ...
            same_json = False
        if not same_json and _vocab(a) != _vocab(b):
            why = f"the tokenizers ({a!r} and {b!r}) have the same size but map tokens to different ids"
    if why:
        raise ValueError(
            f"token-level distillation needs a teacher and a student that share a tokenizer: {why}. "
            "Use sequence-level distillation (teacher outputs as text, `lmlab distill generate` then "
            "`lmlab distill sft`), or give the student the teacher's tokenizer"
        )


class DistillTrainer(Trainer):
    """:class:`~lmlab.train.Trainer` whose training loss is :func:`kd_loss` against ``teacher``.

    Everything else is the Trainer's: schedule, clipping, accumulation, checkpoints, exact
    resume, and the periodic evaluation, which stays the plain data NLL. The teacher runs
    in eval mode without gradients on the same inputs; its logits are cut to the
    student's vocabulary when the teacher's output layer is padded past it (the
    tokenizers must match: pass both to have that checked).
    """

    def __init__(self, model: LanguageModel, teacher: LanguageModel, train: Batches, val: Batches | None,
                 config: TrainConfig, run_dir: str | Path, tokenizer: Any = None, resume: bool = False, *,
                 teacher_tokenizer: Any = None, divergence: str = "forward", temperature: float = 1.0,
                 nll_weight: float = 0.0) -> None:
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence={divergence!r}; accepted: {', '.join(DIVERGENCES)}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if not 0.0 <= nll_weight <= 1.0:
            raise ValueError(f"nll_weight must be in [0, 1], got {nll_weight!r}")
        if teacher_tokenizer is not None and tokenizer is not None:
            check_same_tokenizer(teacher_tokenizer, tokenizer)
        vs, vt = int(model.vocab_size), int(teacher.vocab_size)
        if vt < vs:
            raise ValueError(f"the teacher's output layer has {vt} tokens, fewer than the student's {vs}; "
                             "token-level distillation needs the student's vocabulary inside the teacher's")
        super().__init__(model, train, val, config, run_dir, tokenizer=tokenizer, resume=resume)
        self.teacher = teacher.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.divergence, self.temperature, self.nll_weight = divergence, float(temperature), float(nll_weight)

    def train_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch: the student's logits against the teacher's."""
        logits, _ = self.forward_model(x)
        with torch.no_grad():
            t_logits, _ = self.teacher(x)
        t_logits = t_logits[..., : logits.shape[-1]]
        return kd_loss(logits, t_logits, y, self.divergence, self.temperature, self.nll_weight)

    def fit(self) -> dict[str, Any]:
        summary = super().fit()
        summary.update(divergence=self.divergence, temperature=self.temperature, nll_weight=self.nll_weight,
                       teacher_parameters=self.teacher.num_parameters())
        return summary




# ================================================================ command line


def _read_inputs(path: str | Path, limit: int | None = None) -> list[str]:
    """Inputs from a .jsonl file (field input, text, article or prompt) or a text file of
    blank-line-separated paragraphs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no inputs file at {str(path)!r}; give JSON lines with an 'input' (or 'text', "
                                "'article') field, or a text file of blank-line-separated paragraphs")
    items: list[str] = []
    if path.suffix == ".jsonl":
        for n, obj in read_jsonl(path, "an object with an 'input' (or 'text', 'article', 'prompt') string"):
            value = next((obj[k] for k in ("input", "text", "article", "prompt") if isinstance(obj.get(k), str)), None)
            if value is None:
                raise ValueError(f"{path}:{n} has none of the fields 'input', 'text', 'article', 'prompt'")
            items.append(value)
    else:
        items = [p.strip() for p in re.split(r"\n\s*\n", read_text(path, "inputs file")) if p.strip()]
    if limit is not None:
        items = items[:limit]
    if not items:
        raise ValueError(f"{path} holds no inputs")
    return items


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (every TrainConfig field)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], None)
            if f.name == "time_budget":
                kind = float
            g.add_argument(flag, type=kind or str, default=None)


def _train_config(args) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def _add_student_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("student")
    s = g.add_mutually_exclusive_group(required=True)
    s.add_argument("--student", help="checkpoint, run directory or hf:<dir> to start from")
    s.add_argument("--new-student", metavar="FAMILY", help="a fresh model of this family (e.g. transformer) with the "
                                                           "tokenizer of --tokenizer-from (default: the teacher)")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="config field of --new-student, e.g. n_layer=2")
    g.add_argument("--block-size", type=int, default=256, help="--new-student's context (default 256)")
    g.add_argument("--tokenizer-from", help="checkpoint or hf:<dir> whose tokenizer --new-student uses")
    p.add_argument("--resume", action="store_true", help="continue the run directory's last checkpoint")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)


def add_distill_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``lmlab distill`` sub-commands (generate, sft, kd) to ``parser`` (returns it)."""
    sub = parser.add_subparsers(dest="distill_command", required=True, metavar="{generate,sft,kd}")

    p = sub.add_parser("generate", help="sequence-level: the teacher's outputs for a set of inputs, filtered, as JSONL")
    p.add_argument("--teacher", required=True, help="checkpoint, run directory or hf:<dir>")
    p.add_argument("--inputs", required=True, help="JSONL (field input/text/article) or blank-line-separated paragraphs")
    p.add_argument("--out", required=True, help="JSONL file of examples to write")
    p.add_argument("--limit", type=int, help="use the first N inputs")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    fmt = p.add_argument_group("prompt format")
    fmt.add_argument("--chat", action="store_true", help="instruction-tuned teacher: the chat template")
    fmt.add_argument("--system", default=DEFAULT_SYSTEM, help="--chat: system prompt ('' for none)")
    fmt.add_argument("--instruction", default=DEFAULT_INSTRUCTION, help="--chat: text before the input")
    fmt.add_argument("--suffix", default=DEFAULT_SUFFIX, help="--chat: text after the input")
    fmt.add_argument("--marker", default="TL;DR:", help="--chat: the output is the answer after this ('' for all)")
    fmt.add_argument("--template", default="{input}\nTL;DR:", help="plain teacher: the prompt, with {input}")
    dec = p.add_argument_group("decoding")
    dec.add_argument("--setup", default="greedy", help="a decoding setup, e.g. 'greedy', 'top-p 0.9' (default greedy)")
    dec.add_argument("--max-new-tokens", type=int, default=40)
    dec.add_argument("--max-prompt-tokens", type=int, help="cut longer inputs")
    dec.add_argument("--batch-size", type=int, default=8)
    dec.add_argument("--seed", type=int, default=0)
    dec.add_argument("--device", default="cpu")
    flt = p.add_argument_group("filters")
    flt.add_argument("--min-words", type=int)
    flt.add_argument("--max-words", type=int)
    flt.add_argument("--dedupe", action=argparse.BooleanOptionalAction, default=True, help="drop repeated outputs")
    flt.add_argument("--require-marker", action="store_true", help="drop answers without the marker")
    flt.add_argument("--min-logprob", type=float, help="drop outputs whose mean teacher log-prob per token is lower")

    p = sub.add_parser("sft", help="sequence-level: fine-tune a student on examples, prompt tokens masked (-100)")
    p.add_argument("--data", required=True, help="JSONL examples with 'input' and 'output' (from `distill generate`)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--template", default="{input}\nTL;DR:", help="the student's prompt, with {input}")
    p.add_argument("--output-template", default=" {output}", help="the student's completion, with {output}")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out examples for the validation loss")
    p.add_argument("--teacher", help="only to take the tokenizer from (with --new-student)")
    _add_student_flags(p)
    _add_train_flags(p)

    p = sub.add_parser("kd", help="token-level: match the teacher's next-token distributions (shared tokenizer)")
    p.add_argument("--teacher", required=True, help="checkpoint, run directory or hf:<dir>")
    p.add_argument("--out", required=True, help="run directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--corpus", help="UTF-8 text trained on as a stream (default: the bundled corpus)")
    src.add_argument("--data", help="JSONL examples: KD on the output tokens only, prompts masked")
    p.add_argument("--template", default="{input}\nTL;DR:", help="--data: the prompt, with {input}")
    p.add_argument("--output-template", default=" {output}", help="--data: the completion, with {output}")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--divergence", choices=DIVERGENCES, default="forward")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of both models")
    p.add_argument("--nll-weight", type=float, default=0.0, help="weight of the data NLL in [0, 1] (rest: KL)")
    _add_student_flags(p)
    _add_train_flags(p)
    return parser


def _load(spec: str, args, device: str = "cpu"):
    from lmlab.checkpoints import load_checkpoint

    return load_checkpoint(spec, device, trust_remote_code=args.trust_remote_code)


def _student(args, teacher_tok=None):
    """(model, tokenizer) of --student or --new-student."""
    if args.student:
        model, tok = _load(args.student, args)
        return model.train(), tok
    from lmlab.models import build_model
    from lmlab.models.base import config_from_dict

    source = args.tokenizer_from or getattr(args, "teacher", None)
    if source is None and teacher_tok is None:
        raise ValueError("--new-student needs a tokenizer: give --tokenizer-from SPEC (or --teacher)")
    tok = teacher_tok
    if args.tokenizer_from or tok is None:
        tok = _load(source, args)[1]
    values: dict[str, Any] = {"vocab_size": tok.vocab_size}
    if args.new_student == "transformer" or args.new_student in ("rnn", "gru", "lstm"):
        values["block_size"] = args.block_size
    for pair in args.set or []:
        if "=" not in pair:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        k, v = pair.split("=", 1)
        try:
            values[k.replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            values[k.replace("-", "_")] = v
    return build_model(args.new_student, config_from_dict(args.new_student, values)), tok


def _split(items: list, val_fraction: float) -> tuple[list, list]:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    n_val = int(len(items) * val_fraction)
    return items[: len(items) - n_val], items[len(items) - n_val :]


def _cmd_generate(args) -> int:
    teacher, tok = _load(args.teacher, args, args.device)
    if args.chat:
        prompt: ChatPrompt | TextPrompt = ChatPrompt(args.instruction, args.suffix, args.system or None, args.marker or None)
    else:
        prompt = TextPrompt(args.template)
    inputs = _read_inputs(args.inputs, args.limit)
    examples = generate_teacher_data(teacher, tok, inputs, prompt, args.setup, args.max_new_tokens, args.batch_size,
                                     args.seed, args.max_prompt_tokens)
    kept, counts = filter_examples(examples, min_words=args.min_words, max_words=args.max_words, dedupe=args.dedupe,
                                   require_marker=args.require_marker, min_logprob=args.min_logprob)
    save_examples(args.out, kept)
    print(json.dumps({"inputs": len(inputs), **counts, "out": str(args.out)}, indent=2))
    return 0


def _sft_data(args, tok, max_len: int | None, batch_size: int):
    examples = load_examples(args.data)
    prompt = TextPrompt(args.template, args.output_template)
    train, val = _split(examples, args.val_fraction)
    make = lambda ex: SFTBatches(sft_pairs(tok, prompt, ex, max_len), batch_size, tok.pad_id, tok.eos_id)  # noqa: E731
    return make(train), (make(val) if val else None)


def _stream_data(args, tok, block: int, batch_size: int):
    import numpy as np

    from lmlab import data as data_mod

    text = data_mod.read_corpus(args.corpus)
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    train, val = data_mod.split_by_position(ids, args.val_fraction or 0.1)
    return data_mod.StreamBatches(train, block, batch_size), data_mod.StreamBatches(val, block, batch_size)


def _cmd_sft(args) -> int:
    teacher_tok = None
    if args.new_student and not args.tokenizer_from and args.teacher:
        teacher_tok = _load(args.teacher, args)[1]
    model, tok = _student(args, teacher_tok)
    config = _train_config(args)
    train, val = _sft_data(args, tok, model.max_context, config.batch_size)
    print(f"student: {model.num_parameters():,} parameters, {len(train.pairs)} training pairs", file=sys.stderr)
    summary = Trainer(model, train, val, config, args.out, tokenizer=tok, resume=args.resume).fit()
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_kd(args) -> int:
    teacher, teacher_tok = _load(args.teacher, args)
    model, tok = _student(args, teacher_tok)
    check_same_tokenizer(teacher_tok, tok)
    config = _train_config(args)
    limit = min(c for c in (model.max_context, teacher.max_context, args.block_size) if c is not None)
    if args.data:
        train, val = _sft_data(args, tok, limit, config.batch_size)
    else:
        train, val = _stream_data(args, tok, limit, config.batch_size)
    summary = DistillTrainer(model, teacher, train, val, config, args.out, tokenizer=tok, resume=args.resume,
                             teacher_tokenizer=teacher_tok, divergence=args.divergence, temperature=args.temperature,
                             nll_weight=args.nll_weight).fit()
    print(json.dumps(summary, indent=2))
    return 0


def run_distill(args) -> int:
    """Run ``lmlab distill <generate|sft|kd>`` (returns the exit status). Bad values raise
    ValueError naming the value (the ``lmlab`` command prints them as ``error: ...``)."""
    if not hasattr(args, "resume"):
        args.resume = False
    commands = {"generate": _cmd_generate, "sft": _cmd_sft, "kd": _cmd_kd}
    return commands[args.distill_command](args)
