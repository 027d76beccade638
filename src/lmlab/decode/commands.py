"""``lmlab generate``: every decoding option on the command line.

    lmlab generate --model runs/demo --prompt "ROMEO:" --top-k 50 --temperature 0.7
    lmlab generate --model runs/demo --prompt "ROMEO:" --setup "top-p 0.9, temperature 0.8" --num-samples 3
    lmlab generate --model runs/demo --prompt "ROMEO:" --compare greedy "top-k 20" "beam 4"
    lmlab generate --model runs/demo --prompt "ROMEO:" --task predict --target " What say you"
    lmlab generate --model runs/demo --prompt "ROMEO:" --task complete --max-new-tokens 40

``add_generate_arguments(parser)`` adds the options to an argparse parser and
``run_generate(args)`` runs them (returns the exit status). Bad values raise
ValueError naming the value (the ``lmlab`` command prints them as ``error: ...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import textwrap
from pathlib import Path
from typing import TextIO

import torch

from lmlab import data
from lmlab.checkpoints import TRUST_REMOTE_CODE_HELP, add_precision_arguments
from lmlab.decode.generate import StopScan, StreamedRow, finished_text
from lmlab.tokenizers import continuation_text
from lmlab.decode.setups import (
    SPECIALS_POLICIES,
    DecodingSetup,
    Result,
    _FLOAT_FIELDS,
    _INT_FIELDS,
    _fmt,
    _encode_prompts,
    _logit_bias,
    run_setup,
)
from lmlab.models.base import special_token_ids

__all__ = ["add_generate_arguments", "run_generate", "setup_from_args", "read_prompt_file", "format_columns"]

_FIELD_HELP = {
    "name": "a label for this setup in the output",
    "do_sample": "sample (--do-sample) or take the argmax (--no-do-sample); default: sample unless beams or temperature 0",
    "temperature": "divide the logits by T >= 0; 0 means greedy",
    "top_k": "keep the K most probable tokens (1 <= K <= vocabulary size)",
    "top_p": "nucleus: keep the smallest set of tokens with probability >= P, P in [0, 1]",
    "min_p": "keep tokens with probability >= P * (max probability), P in [0, 1]",
    "typical_p": "locally typical sampling mass, P in [0, 1]",
    "epsilon": "drop tokens with probability < EPS, in [0, 1]",
    "eta": "eta sampling cutoff, in [0, 1]",
    "repetition_penalty": "CTRL penalty R > 0 on tokens already present (1 = off)",
    "presence_penalty": "subtract A from the logits of tokens already present",
    "frequency_penalty": "subtract A * count from the logits of tokens already present",
    "no_repeat_ngram_size": "never repeat an n-gram of this size (0 = off)",
    "suppress_tokens": "token ids that are never generated",
    "logit_bias": "ID:BIAS pairs added to the logits (-inf bans), e.g. 5:-inf 7:1.5",
    "min_new_tokens": "ban <eos> until this many tokens are generated",
    "force_eos_after": "force <eos> once this many tokens are generated",
    "num_beams": "beam search with this many beams (1 = beam search's greedy)",
    "length_penalty": "beam score = sum log-prob / length ** LP",
    "early_stopping": "beam stopping rule: true, false or never",
    "num_return_sequences": "samples (or beams) per prompt",
    "num_beam_groups": "diverse beam search: groups of beams",
    "diversity_penalty": "diverse beam search: penalty for a token chosen by an earlier group",
    "suppress_specials": "special tokens never generated: default (<pad>, <bos>), all (+ <eos>, <unk>: "
                         "exactly --max-new-tokens tokens), none",
}


def add_generate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every ``lmlab generate`` option to ``parser`` (returns it)."""
    parser.add_argument("--model", required=True, help="checkpoint or run directory, or hf:<dir>")
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    g = parser.add_argument_group("prompts and output")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable); default: a newline")
    g.add_argument("--prompt-file", help="prompts, one per line (blank lines skipped), or JSONL with a \"prompt\" "
                                         "field (and optionally \"target\" for --task predict)")
    g.add_argument("--bos", action="store_true", help="start every prompt with <bos> (models trained on "
                                                      "complete sequences; allows an empty prompt)")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per prompt (n for --task)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop a row once its text contains this string (repeatable)")
    g.add_argument("--num-samples", "--num-return-sequences", dest="num_return_sequences", type=int,
                   help=_FIELD_HELP["num_return_sequences"])
    g.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps or auto")
    add_precision_arguments(g)
    g.add_argument("--context-policy", choices=["slide", "error"], default="slide",
                   help="prompt + tokens beyond the model's context: keep the last tokens (slide) or refuse")
    g.add_argument("--json", action="store_true", help="print JSON instead of text")
    g.add_argument("--width", type=int, help="terminal width for --compare (default: the terminal's)")

    g = parser.add_argument_group("modes")
    g.add_argument("--setup", help="a whole decoding setup, e.g. \"top-k 50, temperature 0.7\"; "
                                   "the flags below override it")
    g.add_argument("--compare", nargs="+", metavar="SETUP",
                   help="run several setups on the same prompts and print them side by side, "
                        "e.g. --compare greedy \"top-k 20\" \"beam 4\"")
    g.add_argument("--task", choices=["predict", "complete"],
                   help="predict: logits of n greedy steps (+ per-step NLL of --target); "
                        "complete: extend each prompt by exactly n ordinary tokens")
    g.add_argument("--target", action="append",
                   help="--task predict: the true continuation of each prompt (repeatable, one per prompt)")

    g = parser.add_argument_group("decoding (every DecodingSetup field)")
    search = g.add_mutually_exclusive_group()
    search.add_argument("--greedy", action="store_true", help="argmax decoding (same as --no-do-sample)")
    search.add_argument("--sample", action="store_true", help="sample (same as --do-sample)")
    for f in dataclasses.fields(DecodingSetup):
        flag = "--" + f.name.replace("_", "-")
        help_ = _FIELD_HELP[f.name]
        if f.name == "num_return_sequences":
            continue  # --num-samples above
        if f.name == "do_sample":
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif f.name in _INT_FIELDS:
            g.add_argument(flag, type=int, default=None, help=help_)
        elif f.name in _FLOAT_FIELDS:
            g.add_argument(flag, type=float, default=None, help=help_)
        elif f.name == "suppress_tokens":
            g.add_argument(flag, type=int, nargs="+", default=None, metavar="ID", help=help_)
        elif f.name == "logit_bias":
            g.add_argument(flag, nargs="+", default=None, metavar="ID:BIAS", help=help_)
        elif f.name == "early_stopping":
            g.add_argument(flag, choices=["true", "false", "never"], default=None, help=help_)
        elif f.name == "suppress_specials":
            g.add_argument(flag, choices=list(SPECIALS_POLICIES), default=None, help=help_)
        else:
            g.add_argument(flag, default=None, help=help_)
    return parser


# ---------------------------------------------------------------- setups from flags


def _flag_overrides(args) -> dict:
    """DecodingSetup fields given on the command line (num_return_sequences excluded)."""
    values = {}
    for f in dataclasses.fields(DecodingSetup):
        if f.name == "num_return_sequences":
            continue
        v = getattr(args, f.name, None)
        if v is None:
            continue
        if f.name == "logit_bias":
            try:
                v = _logit_bias(" ".join(v))
            except ValueError:
                raise ValueError(f"--logit-bias takes ID:BIAS pairs such as 5:-inf 7:1.5, got {' '.join(v)!r}") from None
        elif f.name == "suppress_tokens":
            v = tuple(v)
        elif f.name == "early_stopping":
            v = {"true": True, "false": False, "never": "never"}[v]
        values[f.name] = v
    if getattr(args, "greedy", False):
        values["do_sample"] = False
    if getattr(args, "sample", False):
        values["do_sample"] = True
    return values


def setup_from_args(args, base: str | DecodingSetup | None = None) -> DecodingSetup:
    """The setup named by ``base`` (default: ``--setup``) with the command-line flags applied."""
    if base is None:
        base = getattr(args, "setup", None)
    if isinstance(base, str):
        base = DecodingSetup.parse(base)
    overrides = _flag_overrides(args)
    if base is None:
        return DecodingSetup(**overrides)
    if not overrides:
        return base
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(DecodingSetup)}
    if "do_sample" not in overrides and any(k in overrides for k in ("num_beams", "temperature")):
        values["do_sample"] = None  # let the search follow the new options
    values.update(overrides)
    if "name" not in overrides:
        shown = ", ".join(f"{k.replace('_', '-')} {_fmt(v)}" for k, v in overrides.items() if k != "do_sample")
        values["name"] = f"{base.name}, {shown}" if shown else base.name
    return DecodingSetup(**values)


# ---------------------------------------------------------------- prompts


def read_prompt_file(path: str | Path) -> tuple[list[str], list[str | None]]:
    """(prompts, targets): one prompt per line, or JSONL with "prompt" and an optional "target"."""
    return data.read_prompt_file(path, "target")


def _prompts(args) -> tuple[list[str], list[str | None]]:
    prompts = list(args.prompt or [])
    targets: list[str | None] = [None] * len(prompts)
    if args.prompt_file:
        p, t = read_prompt_file(args.prompt_file)
        prompts += p
        targets += t
    if not prompts:
        prompts, targets = ([""] if args.bos else ["\n"]), [None]
    if args.target:
        if len(args.target) != len(prompts):
            raise ValueError(
                f"{len(args.target)} --target value(s) for {len(prompts)} prompt(s); give one target per prompt"
            )
        targets = list(args.target)
    return prompts, targets


# ---------------------------------------------------------------- run


def run_generate(args, out: TextIO | None = None) -> int:
    """Run ``lmlab generate`` with parsed ``args``; returns the exit status (0)."""
    from lmlab.checkpoints import load_checkpoint
    from lmlab.train import resolve_device

    out = out or sys.stdout
    if args.max_new_tokens is None or args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_return_sequences is not None and args.num_return_sequences < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_return_sequences}")
    if args.compare and args.task:
        raise ValueError(f"--compare and --task {args.task} do not combine; run them separately")
    if args.stream and (args.compare or args.task or args.json):
        what = "--compare" if args.compare else f"--task {args.task}" if args.task else "--json"
        raise ValueError(f"--stream prints one setup's text as it is produced; it does not combine with {what}")
    if args.target and args.task != "predict":
        raise ValueError("--target is the true continuation scored by --task predict; add --task predict")
    if args.compare and args.setup:
        raise ValueError("--setup names one setup and --compare several; put every setup in --compare")
    # Validate the setups before loading the model: bad values fail fast.
    setups = [setup_from_args(args, s) for s in args.compare] if args.compare else [setup_from_args(args)]
    prompts, targets = _prompts(args)
    model, tokenizer = load_checkpoint(args.model, resolve_device(args.device), trust_remote_code=args.trust_remote_code,
                                       dtype=args.dtype, quantize=args.quantize)
    for s in setups:
        s.check_vocab(model.vocab_size)
    if args.task == "predict":
        return _run_predict(args, model, tokenizer, prompts, targets, out)
    if args.task == "complete":
        return _run_complete(args, model, tokenizer, prompts, setups[0], out)
    if args.compare:
        return _run_compare(args, model, tokenizer, prompts, setups, out)
    return _run_single(args, model, tokenizer, prompts, setups[0], out)


def _options(args) -> dict:
    return dict(seed=args.seed, stop_strings=args.stop or (), add_bos=args.bos, context_policy=args.context_policy)


def _result_dict(r: Result, prompt: str) -> dict:
    return {"prompt": prompt, **r.to_dict(), "total_logprob": r.total_logprob}


def _summary(r: Result) -> str:
    parts = [r.finish_reason, f"{len(r.token_ids)} tokens", f"logprob {r.total_logprob:.2f}"]
    if r.score is not None:
        parts.append(f"score {r.score:.4f}")
    return ", ".join(parts)


def _run_single(args, model, tokenizer, prompts, setup, out) -> int:
    printer = None
    if args.stream:
        if setup.search == "beam":
            raise ValueError(f"--stream needs greedy or sampling; beam search (num_beams={setup.num_beams}) "
                             "returns whole hypotheses at the end")
        n = args.num_return_sequences or setup.num_return_sequences
        printer = _LivePrinter(tokenizer, [p for p in prompts for _ in range(n)], setup, args, out)
    results = run_setup(model, tokenizer, prompts, setup, args.max_new_tokens,
                        num_return_sequences=args.num_return_sequences,
                        on_token=printer.on_token if printer else None, **_options(args))
    if printer:
        printer.close()
        return 0
    if args.json:
        payload = {"setup": setup.to_dict(), "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                   "results": [[_result_dict(r, p) for r in rs] for p, rs in zip(prompts, results)]}
        print(json.dumps(payload, indent=2, ensure_ascii=False), file=out)
        return 0
    i = 0
    for p_index, (prompt, rs) in enumerate(zip(prompts, results)):
        for r in rs:
            print(f"--- sample {i} (prompt {p_index}, {setup.name}: {_summary(r)})", file=out)
            print(prompt + r.text, file=out)
            i += 1
    return 0


class _LivePrinter:
    """Prints the rows of one batched generation as their tokens arrive: the first
    unfinished row live, the others as soon as every row before them is done
    (rows are produced in lock-step, so the text is the same as without --stream).
    Each row's text comes from a ``StreamedRow``: what could still start a stop string is
    held back until the row's end."""

    def __init__(self, tokenizer, prompts: list[str], setup: DecodingSetup, args, out: TextIO) -> None:
        self.tok, self.prompts, self.setup, self.out = tokenizer, prompts, setup, out
        self.prompt_ids = [tokenizer.encode(p) for p in prompts]
        self.max_new, self.stops = args.max_new_tokens, list(args.stop or ())
        self.eos = tokenizer.eos_id if setup.suppress_specials != "all" else None
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.reason: list[str | None] = [None] * len(prompts)
        self.rows = [StreamedRow(tokenizer, p, self.stops, None) for p in self.prompt_ids]
        self.scans = [StopScan(tokenizer, p, self.stops) for p in self.prompt_ids] if self.stops else None
        self.texts = [""] * len(prompts)  # what each row's StreamedRow has let out
        self.shown = [0] * len(prompts)
        self.current = 0
        self._header(0)

    def _header(self, row: int) -> None:
        self.out.write(f"--- sample {row} ({self.setup.name})\n{self.prompts[row]}")
        self.out.flush()

    def _show(self, row: int, final: bool = False) -> None:
        if final:
            text = finished_text(self.tok, self.prompt_ids[row], self.tokens[row], self.reason[row], self.stops)
        else:
            text = self.texts[row]
        if len(text) > self.shown[row]:
            self.out.write(text[self.shown[row]:])
            self.shown[row] = len(text)
            self.out.flush()

    def on_token(self, row: int, token: int) -> None:
        self.tokens[row].append(token)
        if self.eos is not None and token == self.eos:
            self.reason[row] = "eos"
        else:
            self.texts[row] += self.rows[row].add(token)
            if self.scans is not None and self.scans[row].add(token):
                self.reason[row] = "stop"
            elif len(self.tokens[row]) >= self.max_new:
                self.reason[row] = "length"
        if row == self.current:
            self._show(row)
        self._advance()

    def _advance(self) -> None:
        while self.current < len(self.prompts) and self.reason[self.current] is not None:
            row = self.current
            self._show(row, final=True)
            self.out.write(f"\n[{self.reason[row]}, {len(self.tokens[row])} tokens]\n")
            self.current += 1
            if self.current < len(self.prompts):
                self._header(self.current)
                self._show(self.current)
        self.out.flush()

    def close(self) -> None:
        for row in range(len(self.prompts)):
            if self.reason[row] is None:
                self.reason[row] = "length"
        self._advance()


# ---------------------------------------------------------------- compare


def _run_compare(args, model, tokenizer, prompts, setups, out) -> int:
    table: list[list[list[Result]]] = []  # [setup][prompt][sample]
    for s in setups:
        n = args.num_return_sequences if s.search == "sample" else None
        table.append(run_setup(model, tokenizer, prompts, s, args.max_new_tokens, num_return_sequences=n,
                               **_options(args)))
    if args.json:
        payload = {"max_new_tokens": args.max_new_tokens, "seed": args.seed,
                   "setups": [s.to_dict() for s in setups],
                   "prompts": [{"prompt": p, "results": {s.name: [_result_dict(r, p) for r in table[j][i]]
                                                         for j, s in enumerate(setups)}}
                               for i, p in enumerate(prompts)]}
        print(json.dumps(payload, indent=2, ensure_ascii=False), file=out)
        return 0
    width = args.width or shutil.get_terminal_size((120, 24)).columns
    for i, prompt in enumerate(prompts):
        print(f"=== prompt {i}: {prompt!r}", file=out)
        cells = []
        for j in range(len(setups)):
            parts = []
            for k, r in enumerate(table[j][i]):
                label = f"#{k + 1} " if len(table[j][i]) > 1 else ""
                parts.append((f"{label}{r.text}", f"[{_summary(r)}]"))
            cells.append(parts)
        print(format_columns([s.name for s in setups], cells, width), file=out)
    return 0


def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for line in text.split("\n"):
        line = line.replace("\t", " ")
        lines.extend(textwrap.wrap(line, width, drop_whitespace=False, break_long_words=True,
                                   replace_whitespace=False) or [""])
    return [line[:width] for line in lines]


def format_columns(headers: list[str], cells: list[list[tuple[str, str]]], width: int = 120) -> str:
    """Side-by-side columns: one per header; each cell a list of (text, footer) pairs
    stacked vertically. Newlines in the text start new lines in the column."""
    k = len(headers)
    sep = " │ "
    col = max(12, (width - len(sep) * (k - 1)) // k)
    heads = [_wrap(h, col) for h in headers]
    bodies = []
    for parts in cells:
        lines: list[str] = []
        for n, (text, footer) in enumerate(parts):
            if n:
                lines.append("┄" * col)
            lines += _wrap(text, col) + _wrap(footer, col)
        bodies.append(lines)

    def block(columns: list[list[str]]) -> list[str]:
        height = max(len(c) for c in columns)
        return [sep.join((c[r] if r < len(c) else "").ljust(col) for c in columns).rstrip() for r in range(height)]

    rule = "─┼─".join("─" * col for _ in headers)
    return "\n".join([*block(heads), rule, *block(bodies)]) + "\n"


# ---------------------------------------------------------------- tasks


def _prompt_ids(model, tokenizer, prompts: list[str], bos: bool) -> list[list[int]]:
    """The prompts' ids, each after the declared <bos> when ``bos`` (an error when none is declared)."""
    return _encode_prompts(prompts, tokenizer, bos, special_token_ids(model, tokenizer).get("bos"))


def _run_predict(args, model, tokenizer, prompts, targets, out) -> int:
    from lmlab.decode.tasks import next_n_nll, predict, split_prompt

    prompts, targets = map(list, zip(*(split_prompt(p, t) for p, t in zip(prompts, targets))))
    ids = _prompt_ids(model, tokenizer, prompts, args.bos)
    reports = []
    for i, (prompt, p, target) in enumerate(zip(prompts, ids, targets)):
        true = tokenizer.encode(target) if target is not None else None
        if true is not None and not true:
            raise ValueError(f"--target for prompt {i} is empty; give the true continuation (at least one token)")
        n = len(true) if true is not None else args.max_new_tokens
        logits = predict(model, [p], n, context_policy=args.context_policy)  # (1, n, V)
        greedy = logits.argmax(-1)[0].tolist()
        report = {"prompt": prompt, "logits_shape": list(logits.shape), "greedy_ids": greedy,
                  "greedy_text": continuation_text(tokenizer, p, greedy)}
        if true is not None:
            forced = next_n_nll(model, [p], [true], reduction="none", context_policy=args.context_policy)[0]
            on_greedy = -torch.log_softmax(logits[0], -1)[torch.arange(n), torch.tensor(true)]
            report.update(target=target, target_ids=true, nll_teacher_forced=forced.tolist(),
                          nll_greedy_path=on_greedy.tolist(), mean_nll_teacher_forced=float(forced.mean()),
                          mean_nll_greedy_path=float(on_greedy.mean()))
        reports.append(report)
    if args.json:
        print(json.dumps({"task": "predict", "results": reports}, indent=2, ensure_ascii=False), file=out)
        return 0
    for i, r in enumerate(reports):
        B, n, V = r["logits_shape"]
        print(f"=== prompt {i}: {r['prompt']!r}", file=out)
        print(f"logits: ({B}, {n}, {V}) = (B, n, V): next-token logits at each of {n} greedy steps", file=out)
        print(f"greedy continuation: {r['greedy_text']!r}", file=out)
        if "target" in r:
            show = lambda t: repr(tokenizer.decode([t]) or tokenizer.id_to_token(t))  # noqa: E731
            print(f"{'step':>4}  {'target':<10} {'greedy':<10} {'NLL teacher-forced':>18} {'NLL greedy path':>16}",
                  file=out)
            for s in range(n):
                print(f"{s:>4}  {show(r['target_ids'][s]):<10} {show(r['greedy_ids'][s]):<10} "
                      f"{r['nll_teacher_forced'][s]:>18.4f} {r['nll_greedy_path'][s]:>16.4f}", file=out)
            print(f"mean NLL per token: {r['mean_nll_teacher_forced']:.4f} nats teacher-forced (the target's NLL); "
                  f"{r['mean_nll_greedy_path']:.4f} on predict's greedy path", file=out)
    return 0


def _run_complete(args, model, tokenizer, prompts, setup, out) -> int:
    from lmlab.decode.tasks import complete, split_prompt

    prompts = [split_prompt(p)[0] for p in prompts]
    if setup.search != "sample":
        raise ValueError(f"--task complete samples from the model; the setup {setup.name!r} is {setup.search} "
                         "(drop --greedy/--num-beams/temperature 0)")
    n_samples = args.num_return_sequences or setup.num_return_sequences
    ids = _prompt_ids(model, tokenizer, prompts, args.bos)
    rows = [p for p in ids for _ in range(n_samples)]
    procs = setup.processors(eos_id=tokenizer.eos_id)
    seqs = complete(model, rows, args.max_new_tokens, seed=args.seed, tokenizer=tokenizer, processors=procs,
                    context_policy=args.context_policy)
    results = []
    for r, seq in enumerate(seqs):
        prompt = prompts[r // n_samples]
        new = seq[len(rows[r]):]
        results.append({"prompt": prompt, "token_ids": new, "text": continuation_text(tokenizer, rows[r], new)})
    if args.json:
        print(json.dumps({"task": "complete", "n": args.max_new_tokens, "results": results}, indent=2,
                         ensure_ascii=False), file=out)
        return 0
    for i, r in enumerate(results):
        print(f"--- sample {i} ({len(r['token_ids'])} tokens, no special tokens)", file=out)
        print(r["prompt"] + r["text"], file=out)
    return 0
