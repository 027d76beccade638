"""The eval-generation study: compare decoding setups on naturalness, fluency and diversity.

    study = run_study(model, tokenizer, prompts, ["greedy", "top-k 20"], oracle=oracle,
                      num_continuations=5, max_new_tokens=100, seed=0)
    print(study.markdown())
    study.write("runs/study")     # table.md / .csv / .json, generations.jsonl, the plot

From the command line (``lmlab eval-generation``)::

    lmlab eval-generation --model runs/gen --oracle runs/oracle --prompts prompts.txt \\
        --setup greedy --setup "top-k 20" --num-continuations 5 --length 100 --out runs/study

Every setup continues every prompt ``num_continuations`` times. Greedy and
beam search are deterministic: they are run once per prompt and their one
continuation stands for all ``num_continuations`` (the generations file lists
the copies). Their diversity (distinct-n, repetition, self-BLEU) is computed
across prompts over that single continuation per prompt: copies of one text
would only divide distinct-n by ``num_continuations`` and make self-BLEU 100,
saying nothing about the method. Sampling rows pool all their continuations.
Tokens/s counts the tokens actually generated per second of generation.

Seeded: the same command gives the same generations (sampling draws come from a
generator seeded from ``seed``, the setup's name and the first prompt of the
batch; the numbers depend on ``batch_size`` too).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from lmlab import data
from lmlab.checkpoints import TRUST_REMOTE_CODE_HELP, add_precision_arguments
from lmlab.decode.setups import DecodingSetup, run_setup
from lmlab.metrics import (
    UNITS,
    Classifier,
    Diversity,
    FluencyScore,
    Oracle,
    OracleScore,
    diversity,
    fluency,
    load_classifier,
    load_oracle,
    oracle_perplexity,
    rouge,
)

__all__ = [
    "DEFAULT_SETUPS",
    "read_prompts",
    "parse_setups",
    "SetupResult",
    "Study",
    "run_study",
    "add_eval_generation_arguments",
    "run_eval_generation",
]

DEFAULT_SETUPS: tuple[str, ...] = ("greedy", "sample", "temperature 0.8", "top-k 20", "top-p 0.7", "beam 4")
PLOT_N = 2  # the plot's diversity axis is distinct-2


# ---------------------------------------------------------------- inputs


def read_prompts(path: str | Path) -> tuple[list[str], list[str | None]]:
    """(prompts, references): one prompt per line, or JSONL with "prompt" and an optional
    "reference" (for ROUGE)."""
    return data.read_prompt_file(path, "reference")


def parse_setups(items: Sequence[str | DecodingSetup] | str) -> list[DecodingSetup]:
    """DecodingSetups from strings; a string may hold several setups separated by ``;``
    (``"greedy; top-k 20, temperature 0.7"``). Names must be unique."""
    if isinstance(items, (str, DecodingSetup)):
        items = [items]
    out: list[DecodingSetup] = []
    for item in items:
        if isinstance(item, DecodingSetup):
            out.append(item)
            continue
        for part in str(item).split(";"):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(DecodingSetup.parse(part))
            except ValueError as e:
                raise ValueError(f"decoding setup {part!r}: {e}") from None
    if not out:
        raise ValueError(f"no decoding setups given; e.g. {'; '.join(DEFAULT_SETUPS)}")
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"decoding setup(s) {dup} given twice; every setup is one row of the table")
    return out


# ---------------------------------------------------------------- results


@dataclass
class SetupResult:
    """Everything measured for one setup. ``continuations[p]`` are the texts of prompt p
    (``num_continuations`` of them; a deterministic setup's one text repeated)."""

    setup: DecodingSetup
    continuations: list[list[str]]
    token_counts: list[list[int]]
    finish_reasons: list[list[str]]
    deterministic: bool
    seconds: float
    generated_tokens: int
    diversity: Diversity
    oracle: OracleScore | None = None
    fluency: FluencyScore | None = None
    rouge: dict[str, float] | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def mean_length(self) -> float:
        counts = [n for row in self.token_counts for n in row]
        return sum(counts) / len(counts) if counts else float("nan")

    def row(self) -> dict[str, Any]:
        """The table row: the headline numbers."""
        d = self.diversity
        row: dict[str, Any] = {"setup": self.setup.name}
        if self.oracle is not None:
            row["oracle_ppl"] = self.oracle.perplexity
        if self.fluency is not None:
            row["fluency"] = self.fluency.mean
        for n in sorted(d.distinct):
            row[f"distinct_{n}"] = d.distinct[n].ratio
        row["repetition"] = d.repetition
        row["self_bleu"] = d.self_bleu if d.self_bleu is not None else float("nan")
        if self.rouge is not None:
            row.update(self.rouge)
        row["mean_tokens"] = self.mean_length
        row["tokens_per_s"] = self.tokens_per_second
        return row

    def details(self) -> dict[str, Any]:
        """Everything for the JSON report."""
        out: dict[str, Any] = {"setup": self.setup.name, "search": self.setup.search,
                               "options": self.setup.to_dict(), "deterministic": self.deterministic,
                               "seconds": self.seconds, "generated_tokens": self.generated_tokens,
                               "tokens_per_s": self.tokens_per_second, "mean_tokens": self.mean_length,
                               "diversity": self.diversity.as_dict()}
        if self.oracle is not None:
            out["oracle"] = self.oracle.as_dict() | {"unknown_tokens": self.oracle.unknown,
                                                     "unscored_tokens": self.oracle.unscored}
        if self.fluency is not None:
            out["fluency"] = self.fluency.as_dict()
        if self.rouge is not None:
            out["rouge"] = self.rouge
        return out


_HEADERS = {
    "setup": "setup", "oracle_ppl": "oracle PPL", "fluency": "fluency", "distinct_1": "distinct-1",
    "distinct_2": "distinct-2", "distinct_3": "distinct-3", "distinct_4": "distinct-4",
    "repetition": "repetition", "self_bleu": "self-BLEU", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L", "mean_tokens": "mean length", "tokens_per_s": "tokens/s",
}
_FORMATS = {"oracle_ppl": "{:.2f}", "fluency": "{:.3f}", "self_bleu": "{:.1f}", "mean_tokens": "{:.1f}",
            "tokens_per_s": "{:.0f}"}


def _cell(key: str, value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return _FORMATS.get(key, "{:.3f}").format(value)
    return str(value).replace("|", "\\|")


@dataclass
class Study:
    """The results of ``run_study``: one SetupResult per setup, and how it was run."""

    results: list[SetupResult]
    prompts: list[str]
    references: list[str | None]
    config: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        return [r.row() for r in self.results]

    def markdown(self) -> str:
        """The table, then its notes (how the deterministic rows' diversity is computed)."""
        rows = self.rows()
        keys = list(rows[0])
        lines = ["| " + " | ".join(_HEADERS.get(k, k) for k in keys) + " |",
                 "|" + "|".join(":---" if k == "setup" else "---:" for k in keys) + "|"]
        for row in rows:
            lines.append("| " + " | ".join(_cell(k, row[k]) for k in keys) + " |")
        notes = self.notes()
        if notes:
            lines += ["", *(f"- {note}" for note in notes)]
        return "\n".join(lines) + "\n"

    def notes(self) -> list[str]:
        """What a reader of the table must know to compare its rows."""
        fixed = [r.setup.name for r in self.results if r.deterministic]
        if not fixed:
            return []
        k = self.config.get("num_continuations")
        sampled = [r for r in self.results if not r.deterministic]
        return [
            f"{', '.join(fixed)}: deterministic (one continuation per prompt); diversity (distinct-n, "
            f"repetition, self-BLEU) computed across the {len(self.prompts)} prompts, over that one "
            "continuation each"
            + (f" (the sampling rows pool their {k} continuations per prompt)" if sampled and k and k > 1 else "")
        ]

    def csv(self) -> str:
        rows = self.rows()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "rows": self.rows(), "notes": self.notes(),
                "details": [r.details() for r in self.results]}

    def generations(self) -> list[dict[str, Any]]:
        """One record per continuation: setup, prompt, text and its per-text scores."""
        out = []
        for r in self.results:
            ppl = r.oracle.per_text if r.oracle is not None else None
            flu = r.fluency.probabilities if r.fluency is not None else None
            k = 0  # index into the scored (unique) texts
            for p, texts in enumerate(r.continuations):
                for s, text in enumerate(texts):
                    j = k if not r.deterministic else p
                    rec: dict[str, Any] = {"setup": r.setup.name, "prompt_index": p, "sample": s,
                                           "prompt": self.prompts[p], "continuation": text,
                                           "tokens": r.token_counts[p][s], "finish_reason": r.finish_reasons[p][s]}
                    if r.deterministic and s > 0:
                        rec["copy_of_sample"] = 0
                    if ppl is not None:
                        nll, n = ppl[j]
                        rec.update(oracle_nll=nll, oracle_tokens=n,
                                   oracle_ppl=math.exp(nll / n) if n else float("nan"))
                    if flu is not None:
                        rec["fluency"] = flu[j]
                    out.append(rec)
                    if not r.deterministic:
                        k += 1
        return out

    def plot(self, path: str | Path, n: int = PLOT_N) -> Path:
        """Scatter of distinct-n against oracle perplexity, one labelled point per setup."""
        if any(r.oracle is None for r in self.results):
            raise ValueError("the diversity/perplexity plot needs oracle perplexities; run the study with an oracle")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        points = [(r.oracle.perplexity, r.diversity.distinct[n].ratio, r.setup.name) for r in self.results]
        shown = sorted(p for p in points if math.isfinite(p[0]) and math.isfinite(p[1]))
        for i, (x, y, name) in enumerate(shown):
            ax.scatter([x], [y], s=40)
            # neighbours in x get their labels above and below in turn, so close points stay readable
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5 if i % 2 == 0 else -12), fontsize=8)
        names_shown = {name for *_, name in shown}
        missing = [name for *_, name in points if name not in names_shown]
        if missing:  # e.g. continuations too short for an n-gram, or empty: nothing to place
            ax.text(0.01, 0.01, f"not shown (no scored token or no {n}-gram): " + ", ".join(missing),
                    transform=ax.transAxes, fontsize=7, va="bottom")
        oracle = self.config.get("oracle")
        ax.set_xlabel("oracle perplexity (per oracle token)" + (f" — {oracle}" if oracle else ""), fontsize=8)
        ax.set_ylabel(f"distinct-{n} ({self.config.get('unit', 'word')}s; greedy/beam: one continuation per prompt)",
                      fontsize=8)
        if shown:
            from matplotlib.ticker import FuncFormatter

            ax.set_xscale("log")
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(plain)
        ax.set_title("diversity against perplexity, one point per decoding setup", fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        tmp.replace(path)
        return path

    def write(self, directory: str | Path) -> dict[str, Path]:
        """table.md, table.csv, table.json, generations.jsonl and (with an oracle) the plot."""
        from lmlab.models.base import atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": directory / "table.md", "csv": directory / "table.csv",
                 "json": directory / "table.json", "generations": directory / "generations.jsonl"}
        atomic_write_text(paths["markdown"], self.markdown())
        atomic_write_text(paths["csv"], self.csv())
        atomic_write_text(paths["json"], json.dumps(_jsonable(self.to_json()), indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(paths["generations"], "".join(
            json.dumps(_jsonable(g), ensure_ascii=False) + "\n" for g in self.generations()))
        if all(r.oracle is not None for r in self.results):
            paths["plot"] = self.plot(directory / "diversity_vs_perplexity.png")
        return paths


def _jsonable(value: Any) -> Any:
    """NaN and infinities become null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------- the run


def _setup_seed(seed: int, name: str, first_prompt: int) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode("utf-8")) * 7_919 + first_prompt) % (2**63 - 1)


def _check_inputs(model, tokenizer, prompts, setups, num_continuations, max_new_tokens, add_bos) -> None:
    if isinstance(num_continuations, bool) or not isinstance(num_continuations, int) or num_continuations < 1:
        raise ValueError(f"num_continuations must be an integer >= 1, got {num_continuations!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"the length (max_new_tokens) must be an integer >= 1, got {max_new_tokens!r}")
    V = int(model.vocab_size)
    for s in setups:
        try:
            s.check_vocab(V)
        except ValueError as e:
            raise ValueError(f"decoding setup {s.name!r}: {e}") from None
    lengths = [len(tokenizer.encode(p)) + (1 if add_bos else 0) for p in prompts]
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"prompt {i} ({prompts[i]!r}) gives no token; give some text or add <bos>")
    ctx = getattr(model, "max_context", None)
    beams = [s.name for s in setups if s.search == "beam"]
    if ctx is not None and beams:
        i = max(range(len(prompts)), key=lambda j: lengths[j])
        need = lengths[i] + max_new_tokens - 1
        if need > ctx:
            raise ValueError(
                f"beam search ({', '.join(beams)}) keeps the whole sequence in the model's context of {ctx} tokens, "
                f"but prompt {i} ({lengths[i]} tokens) plus a length of {max_new_tokens} needs {need}; "
                f"accepted: length <= {ctx - lengths[i] + 1}, shorter prompts, or drop the beam setups"
            )


def run_study(
    model,
    tokenizer,
    prompts: Sequence[str],
    setups: Sequence[str | DecodingSetup] | str = DEFAULT_SETUPS,
    *,
    num_continuations: int = 5,
    max_new_tokens: int = 100,
    seed: int = 0,
    oracle: Oracle | None = None,
    classifier: Classifier | None = None,
    fluency_label: str | int = "acceptable",
    references: Sequence[str | None] | None = None,
    unit: str = "word",
    batch_size: int = 8,
    oracle_batch_size: int = 16,
    add_bos: bool = False,
    progress: bool = True,
    config: dict[str, Any] | None = None,
) -> Study:
    """Generate with every setup and measure the continuations.

    model, tokenizer: the generator (any lmlab model). prompts: texts.
    setups: DecodingSetups or strings for ``DecodingSetup.parse`` (``;`` separates several).
    oracle: scores oracle perplexity (None: no perplexity column, no plot).
    classifier: a fluency classifier (``metrics.load_classifier``); ``fluency_label`` is the class read.
    references: one reference text per prompt, for ROUGE (all prompts need one).
    unit: "word" or "char", the units of distinct-n, repetition.
    batch_size: prompts per generation call (each with all its continuations).
    """
    from tqdm.auto import tqdm

    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given; the study needs at least one prompt")
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r}; accepted: {', '.join(UNITS)}")
    setups = parse_setups(setups)
    _check_inputs(model, tokenizer, prompts, setups, num_continuations, max_new_tokens, add_bos)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    refs = list(references) if references is not None else [None] * len(prompts)
    if len(refs) != len(prompts):
        raise ValueError(f"{len(refs)} references for {len(prompts)} prompts; give one per prompt")
    use_rouge = all(r is not None for r in refs)
    if classifier is not None:
        classifier.label_index(fluency_label)  # a bad label fails before any generation
    k = num_continuations
    # One untimed call first: lazy imports and first-call allocations must not count in tokens/s.
    run_setup(model, tokenizer, prompts[:1], "greedy", 2, seed=0, add_bos=add_bos)
    results: list[SetupResult] = []
    for setup in setups:
        deterministic = setup.search != "sample"
        per_call = 1 if deterministic else k
        texts: list[list[str]] = []
        counts: list[list[int]] = []
        reasons: list[list[str]] = []
        seconds = 0.0
        generated = 0
        bar = tqdm(total=len(prompts), desc=setup.name, unit="prompt", disable=not progress, dynamic_ncols=True,
                   file=sys.stderr)
        for lo in range(0, len(prompts), batch_size):
            chunk = prompts[lo : lo + batch_size]
            t0 = time.perf_counter()
            out = run_setup(model, tokenizer, chunk, setup, max_new_tokens,
                            seed=_setup_seed(seed, setup.name, lo),
                            num_return_sequences=None if deterministic else k, add_bos=add_bos)
            seconds += time.perf_counter() - t0
            for results_p in out:
                got = results_p[:per_call]
                generated += sum(len(r.token_ids) for r in got)
                reps = k if deterministic else 1
                texts.append([r.text for r in got] * reps)
                counts.append([len(r.token_ids) for r in got] * reps)
                reasons.append([r.finish_reason for r in got] * reps)
            bar.update(len(chunk))
        bar.close()
        # The texts actually generated (a deterministic setup's copies are scored once: same averages).
        scored = [(prompts[p], t[0]) for p, t in enumerate(texts)] if deterministic else \
                 [(prompts[p], x) for p, t in enumerate(texts) for x in t]
        # A deterministic setup's diversity: across prompts, one continuation each (see the module docstring).
        groups = [t[:1] for t in texts] if deterministic else texts
        result = SetupResult(setup, texts, counts, reasons, deterministic, seconds, generated,
                             diversity(groups, unit=unit))
        if oracle is not None:
            result.oracle = oracle_perplexity(oracle, [p for p, _ in scored], [c for _, c in scored],
                                              batch_size=oracle_batch_size)
        if classifier is not None:
            result.fluency = fluency(classifier, [c for _, c in scored], label=fluency_label)
        if use_rouge:
            result.rouge = rouge([t[0] for t in texts] if deterministic else [x for t in texts for x in t],
                                 [refs[p] for p, t in enumerate(texts) for _ in (t[:1] if deterministic else t)])
        results.append(result)
    cfg = {"setups": [s.name for s in setups], "prompts": len(prompts), "num_continuations": k,
           "max_new_tokens": max_new_tokens, "seed": seed, "unit": unit, "batch_size": batch_size,
           "add_bos": add_bos, "oracle": getattr(oracle, "name", None) if oracle is not None else None,
           "oracle_add_bos": oracle.add_bos if oracle is not None else None,
           "classifier": classifier.name if classifier is not None else None,
           "fluency_label": fluency_label if classifier is not None else None, "rouge": use_rouge}
    cfg.update(config or {})
    return Study(results, prompts, refs, cfg)


# ---------------------------------------------------------------- command line


def add_eval_generation_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``lmlab eval-generation``."""
    parser.add_argument("--model", required=True, help="the generator: a checkpoint or run directory, or hf:<dir>")
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    parser.add_argument("--prompts", required=True,
                        help="prompt file: one prompt per line, or JSONL {\"prompt\": ..., \"reference\": ...}")
    parser.add_argument("--oracle", help="the judge of naturalness: an lmlab checkpoint or run directory, "
                                         "hf:<dir> (a Hugging Face causal LM) or an ARPA file (*.arpa or arpa:<path>)")
    parser.add_argument("--oracle-bos", action=argparse.BooleanOptionalAction, default=None,
                        help="put <bos> before each prompt for the oracle (default: only for ARPA oracles)")
    parser.add_argument("--classifier", help="a local Hugging Face sequence classifier directory (e.g. a CoLA model) "
                                             "for the fluency column")
    parser.add_argument("--fluency-label", default="acceptable",
                        help="the classifier's class to read, by name or index (default: acceptable)")
    parser.add_argument("--setup", action="append", metavar="SETUP",
                        help="a decoding setup, e.g. 'top-k 20' or 'top-p 0.9, temperature 0.7' (repeatable; "
                             "';' separates several in one value); default: " + "; ".join(DEFAULT_SETUPS))
    parser.add_argument("--num-continuations", "-k", type=int, default=5, help="continuations per prompt (default 5)")
    parser.add_argument("--length", "--max-new-tokens", dest="length", type=int, default=100,
                        help="new tokens per continuation (default 100)")
    parser.add_argument("--limit", type=int, help="use only the first N prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unit", choices=UNITS, default="word", help="units of distinct-n and repetition")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generation call")
    parser.add_argument("--oracle-batch-size", type=int, default=16, help="rows per oracle forward pass")
    parser.add_argument("--bos", action="store_true", help="put <bos> before each prompt for the generator")
    parser.add_argument("--out", default="runs/eval-generation", help="directory for the table, generations and plot")
    parser.add_argument("--device", default="cpu")
    add_precision_arguments(parser)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return parser


def run_eval_generation(args, out=None) -> int:
    """``lmlab eval-generation`` with parsed ``args``: runs the study, writes the files, prints the table."""
    from lmlab.checkpoints import load_checkpoint

    out = out if out is not None else sys.stdout
    setups = parse_setups(args.setup or list(DEFAULT_SETUPS))  # bad names fail before any loading
    prompts, refs = read_prompts(args.prompts)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        prompts, refs = prompts[: args.limit], refs[: args.limit]
    model, tokenizer = load_checkpoint(args.model, args.device, trust_remote_code=args.trust_remote_code,
                                       dtype=args.dtype, quantize=args.quantize,
                                       quantize_output=args.quantize_output)
    oracle = load_oracle(args.oracle, args.device, add_bos=args.oracle_bos) if args.oracle else None
    classifier = load_classifier(args.classifier, args.device) if args.classifier else None
    study = run_study(
        model, tokenizer, prompts, setups, num_continuations=args.num_continuations, max_new_tokens=args.length,
        seed=args.seed, oracle=oracle, classifier=classifier, fluency_label=args.fluency_label, references=refs,
        unit=args.unit, batch_size=args.batch_size, oracle_batch_size=args.oracle_batch_size, add_bos=args.bos,
        progress=args.progress, config={"model": str(args.model), "prompt_file": str(args.prompts)},
    )
    paths = study.write(args.out)
    print(study.markdown(), file=out)
    for r in study.results:
        if r.oracle is not None and r.oracle.unknown:
            print(f"note: {r.setup.name}: {r.oracle.unknown} scored token(s) are the oracle's <unk> "
                  "(its tokenizer cannot represent some generated text)", file=sys.stderr)
    if oracle is None:
        print("note: no --oracle, so no perplexity column and no plot", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=out)
    return 0
