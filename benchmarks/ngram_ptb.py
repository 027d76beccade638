"""Kneser-Ney n-gram models on Penn Treebank (word level): perplexity, build
time and scoring speed, optionally checked against KenLM.

    python benchmarks/ngram_ptb.py --out results/ngram_ptb.json
    python benchmarks/ngram_ptb.py --lmplz /path/to/lmplz --out ngram_ptb.json   # also run KenLM's estimator

For each order (3, 4, 5 by default) it builds an interpolated modified
Kneser-Ney model on ptb.train.txt (one sentence per line, <s> ... </s> added,
vocabulary from train), and reports KenLM-style test perplexity (per word,
counting </s>, out-of-vocabulary words as <unk>), build time, and scoring
speed on one core (tokens per second; the model must already be built).

Two treatments of the literal ``<unk>`` tokens of PTB's training text:

* ``unk-as-word`` (default, what SRILM and the PTB literature do): <unk> is an
  ordinary word. ``lmplz`` refuses such a corpus with its defaults ("Special
  word <unk> is not allowed in the corpus"); it gives this model when <unk> is
  renamed to an ordinary word in train and test, which ``--lmplz`` does.
* ``skip-unk`` (``--skip-unk``): <unk> tokens deleted from the training text,
  as ``lmplz --skip_symbols`` does; test <unk> then gets lmplz's zeroton mass.

With ``--arpa-check`` the model is written as ARPA, loaded by the ``kenlm``
Python module, and the test perplexity KenLM computes from that file is
reported next to lmlab's. Published PTB numbers (Mikolov et al. 2011: KN3 ~148,
KN5 ~141) are printed as a sanity check only.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lmlab.models.ngram import NGramModel  # noqa: E402

PUBLISHED = {3: 148.0, 5: 141.0}  # approximate, for a sanity check only
UNK_RENAMED = "UNK_AS_WORD"


def read_lines(path: Path) -> list[list[str]]:
    return [ln.split() for ln in path.read_text().splitlines()]


def kenlm_perplexity(arpa: Path, lines: list[str], n_tokens: int) -> float:
    import kenlm

    model = kenlm.Model(str(arpa))
    total = sum(model.score(ln, bos=True, eos=True) for ln in lines)
    return float(10 ** (-total / n_tokens))


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run_lmplz(lmplz: str, order: int, text: Path, arpa: Path, skip: bool) -> float:
    cmd = [lmplz, "-o", str(order), "-S", "2G", "-T", tempfile.gettempdir(), "--text", str(text), "--arpa", str(arpa)]
    if skip:
        cmd.append("--skip_symbols")
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("LMLAB_PTB", "/work/shared/data/ptb")))
    ap.add_argument("--orders", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--skip-unk", action="store_true", help="also build models with <unk> tokens deleted (lmplz --skip_symbols)")
    ap.add_argument("--arpa-check", action="store_true", help="write ARPA, score the test set with the kenlm module")
    ap.add_argument("--lmplz", default=None, help="path to KenLM's lmplz binary, to estimate the same models with it")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (best is reported)")
    ap.add_argument("--score-copies", type=int, default=10, help="score the test set this many times over for speed")
    ap.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    train = read_lines(args.data / "ptb.train.txt")
    test = read_lines(args.data / "ptb.test.txt")
    test_text = [" ".join(s) for s in test]
    n_test = sum(len(s) + 1 for s in test)  # words + </s>
    n_train = sum(len(s) for s in train)
    print(f"PTB train: {len(train)} sentences, {n_train} tokens; test: {len(test)} sentences, {n_test} scored tokens")

    variants = [("unk-as-word", False)] + ([("skip-unk", True)] if args.skip_unk else [])
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="lmlab_ngram_"))
    if args.lmplz:
        (tmp / "train_renamed.txt").write_text(
            "\n".join(" ".join(UNK_RENAMED if w == "<unk>" else w for w in s) for s in train) + "\n"
        )
    for name, skip in variants:
        for order in args.orders:
            t = time.perf_counter()
            model, vocab = NGramModel.from_text(train, order=order, method="kneser_ney", drop_unk=skip)
            build_s = time.perf_counter() - t
            seqs = [model.encode(s) for s in test]
            ppl = model.perplexity(seqs)
            copies = seqs * args.score_copies
            n_scored = sum(len(s) + 1 for s in copies)
            score_s = best_of(lambda: model.score_sequences(copies), args.repeats)
            # the fast path of the model interface: (B, T) ids -> (B, T-1) log-probs
            bos, eos = model.config.bos_id, model.config.eos_id
            flat = np.concatenate([np.concatenate([[bos], s, [eos]]) for s in copies])
            B = 64
            ids = torch.from_numpy(flat[: len(flat) // B * B].reshape(B, -1))
            tl_s = best_of(lambda: model.token_logprobs(ids), args.repeats)
            row = {
                "variant": name,
                "order": order,
                "ngrams": model.sizes,
                "discounts": model.config.discounts_used,
                "build_s": round(build_s, 3),
                "test_ppl": round(ppl, 3),
                "score_tokens_per_s": round(n_scored / score_s),
                "token_logprobs_tokens_per_s": round(ids.shape[0] * (ids.shape[1] - 1) / tl_s),
            }
            if args.arpa_check:
                arpa = tmp / f"lmlab_{name}_{order}.arpa"
                t = time.perf_counter()
                model.write_arpa(arpa, vocab)
                row["arpa_write_s"] = round(time.perf_counter() - t, 3)
                row["kenlm_ppl_of_lmlab_arpa"] = round(kenlm_perplexity(arpa, test_text, n_test), 3)
                arpa.unlink()
            if args.lmplz:
                ref = tmp / f"lmplz_{name}_{order}.arpa"
                if skip:
                    row["lmplz_build_s"] = round(run_lmplz(args.lmplz, order, args.data / "ptb.train.txt", ref, True), 3)
                    lines = test_text
                else:
                    row["lmplz_build_s"] = round(run_lmplz(args.lmplz, order, tmp / "train_renamed.txt", ref, False), 3)
                    lines = [" ".join(UNK_RENAMED if w == "<unk>" else w for w in s) for s in test]
                row["lmplz_ppl"] = round(kenlm_perplexity(ref, lines, n_test), 3)
                row["diff_vs_lmplz_pct"] = round(100 * (ppl / row["lmplz_ppl"] - 1), 4)
                ref.unlink()
            rows.append(row)
            print(json.dumps(row), flush=True)

    shutil.rmtree(tmp, ignore_errors=True)

    head = ["variant", "order", "n-grams (1..n)", "build s", "test ppl"]
    if args.lmplz:
        head += ["lmplz ppl", "diff %", "lmplz build s"]
    if args.arpa_check:
        head += ["kenlm ppl of lmlab ARPA"]
    head += ["score tok/s", "token_logprobs tok/s"]
    print()
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = [r["variant"], str(r["order"]), "/".join(map(str, r["ngrams"])), f"{r['build_s']:.2f}", f"{r['test_ppl']:.2f}"]
        if args.lmplz:
            cells += [f"{r['lmplz_ppl']:.2f}", f"{r['diff_vs_lmplz_pct']:+.4f}", f"{r['lmplz_build_s']:.2f}"]
        if args.arpa_check:
            cells += [f"{r['kenlm_ppl_of_lmlab_arpa']:.2f}"]
        cells += [f"{r['score_tokens_per_s']:,}", f"{r['token_logprobs_tokens_per_s']:,}"]
        print("| " + " | ".join(cells) + " |")
    print()
    print("Sanity check only: published KenLM/SRILM modified Kneser-Ney on this PTB: "
          + ", ".join(f"{k}-gram ~{v:.0f}" for k, v in PUBLISHED.items()))
    if args.out:
        meta = {
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
            "threads": 1,
            "train_tokens": n_train,
            "test_scored_tokens": n_test,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
