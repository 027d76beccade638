"""Kneser-Ney 5-grams at word-level scale, against KenLM: peak memory of
building and scoring, reading an ARPA file, and sentence scoring speed.

    python benchmarks/ngram_scale.py --lmplz /path/to/kenlm/build/bin/lmplz --out runs/ngram_scale.json

For each corpus (Penn Treebank and WikiText-2, the tokenized files; literal
``<unk>`` counted as a word, as the literature does) it measures:

* build + score: one fresh process builds KN5 from the training file
  (``NGramModel.from_text`` on the open file) and scores the test set with
  ``score_sequences``; its peak RSS, and the RSS right after importing lmlab
  (torch included), which no data structure can lower. KenLM's side is the
  larger of two fresh processes: ``lmplz -o 5 -S <--lmplz-memory>`` on the
  same text (with ``<unk>`` renamed, which lmplz otherwise refuses), and the
  ``kenlm`` module loading that ARPA and scoring the test set.
* ARPA read: a fresh process per tool loads the ARPA file (lmplz's; lmlab's
  own if no ``--lmplz``): peak RSS of each, and the load time of both
  measured alternately in one process (best of ``--repeats``), as a ratio.
* sentence scoring: in one process, both tools loaded from that same ARPA
  score the test sentences: ``kenlm.Model.score`` per sentence against
  ``score_sequences`` on all ids at once (and with the words-to-ids step
  included); best of ``--repeats``; the totals must agree.

Peak memory is ``ru_maxrss`` (not affected by other load on the machine);
times are reported as ratios measured side by side because the machine may
be shared. Prints a markdown table and writes JSON with ``--out``.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

CORPORA = {
    "ptb": ("ptb/ptb.train.txt", "ptb/ptb.test.txt"),
    "wikitext-2": ("wikitext-2/train.txt", "wikitext-2/test.txt"),
}
UNK_RENAMED = "UNK_AS_WORD"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# ---------------------------------------------------------------- child tasks (each in a fresh process)


def task_lmlab_build(train: str, test: str, order: int) -> dict:
    from lmlab.models.ngram import NGramModel

    base = peak_mb()
    t = time.perf_counter()
    with open(train, encoding="utf-8") as f:
        model, vocab = NGramModel.from_text(f, order=order)
    build_s = time.perf_counter() - t
    with open(test, encoding="utf-8") as f:
        seqs = [model.encode(line) for line in f]
    total = float(model.score_sequences(seqs).sum())
    n = sum(len(s) + 1 for s in seqs)
    return {"peak_mb": peak_mb(), "import_mb": base, "build_s": build_s, "ppl": 10 ** (-total / n), "ngrams": model.sizes}


def task_lmlab_read(arpa: str) -> dict:
    from lmlab.models.ngram import NGramModel

    base = peak_mb()
    t = time.perf_counter()
    model, _ = NGramModel.from_arpa(arpa)
    return {"peak_mb": peak_mb(), "import_mb": base, "load_s": time.perf_counter() - t, "ngrams": model.sizes}


def task_kenlm_read(arpa: str, test: str | None) -> dict:
    import kenlm

    base = peak_mb()
    t = time.perf_counter()
    model = kenlm.Model(arpa)
    out = {"load_s": time.perf_counter() - t, "import_mb": base}
    if test:
        with open(test, encoding="utf-8") as f:
            lines = f.read().splitlines()
        total = sum(model.score(s) for s in lines)
        out["ppl"] = 10 ** (-total / sum(len(s.split()) + 1 for s in lines))
    out["peak_mb"] = peak_mb()
    return out


def task_lmplz(lmplz: str, train: str, arpa: str, order: int, memory: str) -> dict:
    cmd = [lmplz, "-o", str(order), "-S", memory, "-T", str(Path(arpa).parent), "--text", train, "--arpa", arpa]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"build_s": time.perf_counter() - t, "peak_mb": children_peak_mb()}


def task_side_by_side(arpa: str, test: str, repeats: int) -> dict:
    """Load times (alternating) and sentence scoring of both tools in one process."""
    import kenlm
    import numpy as np

    from lmlab.models.ngram import NGramModel

    load_k, load_l = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        km = kenlm.Model(arpa)
        load_k.append(time.perf_counter() - t)
        del km
        t = time.perf_counter()
        lm, vocab = NGramModel.from_arpa(arpa)
        load_l.append(time.perf_counter() - t)
        del lm
    km = kenlm.Model(arpa)
    lm, vocab = NGramModel.from_arpa(arpa)
    with open(test, encoding="utf-8") as f:
        lines = f.read().splitlines()
    index = {w: i for i, w in enumerate(vocab)}
    ids = [lm.encode(s, index=index) for s in lines]
    score_k, score_l, score_lw = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        tk = sum(km.score(s) for s in lines)
        score_k.append(time.perf_counter() - t)
        t = time.perf_counter()
        tl = float(lm.score_sequences(ids).sum())
        score_l.append(time.perf_counter() - t)
        t = time.perf_counter()
        tw = float(lm.score_sequences([lm.encode(s, index=index) for s in lines]).sum())
        score_lw.append(time.perf_counter() - t)
    n = sum(len(s) + 1 for s in ids)
    assert abs(tk - tl) <= 1e-6 * abs(tk) and tw == tl, (tk, tl, tw)
    return {
        "kenlm_load_s": min(load_k), "lmlab_load_s": min(load_l),
        "kenlm_score_s": min(score_k), "lmlab_score_s": min(score_l), "lmlab_encode_score_s": min(score_lw),
        "scored_tokens": n, "kenlm_total_log10": tk, "lmlab_total_log10": tl,
        "kenlm_ppl": 10 ** (-tk / n), "lmlab_ppl": 10 ** (-tl / n), "numpy": np.__version__,
    }


TASKS = {
    "lmlab_build": task_lmlab_build,
    "lmlab_read": task_lmlab_read,
    "kenlm_read": task_kenlm_read,
    "lmplz": task_lmplz,
    "side_by_side": task_side_by_side,
}


def child(task: str, *args) -> dict:
    """Run one task in a fresh interpreter and return its JSON result."""
    cmd = [sys.executable, __file__, "--child", task, json.dumps(args)]
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main


def renamed_copy(src: Path, dst: Path) -> Path:
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as g:
        for line in f:
            g.write(line.replace("<unk>", UNK_RENAMED))
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("LMLAB_DATA", "/work/shared/data")))
    ap.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    ap.add_argument("--order", type=int, default=5)
    ap.add_argument("--lmplz", default=None, help="KenLM's lmplz binary (without it, KenLM reads lmlab's ARPA)")
    ap.add_argument("--lmplz-memory", default="100M", help="lmplz -S (its peak memory follows this setting)")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (best is reported)")
    ap.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="lmlab_ngram_scale_"))
    rows = []
    try:
        for name in args.corpora:
            train, test = (args.data / p for p in CORPORA[name])
            row: dict = {"corpus": name, "order": args.order}
            row["lmlab_build"] = child("lmlab_build", str(train), str(test), args.order)
            test_k = renamed_copy(test, tmp / "test.txt")
            arpa = tmp / f"{name}.arpa"
            if args.lmplz:
                train_k = renamed_copy(train, tmp / "train.txt")
                row["lmplz"] = child("lmplz", args.lmplz, str(train_k), str(arpa), args.order, args.lmplz_memory)
                row["arpa_from"] = "lmplz"
            else:
                from lmlab.models.ngram import NGramModel

                with open(train, encoding="utf-8") as f:
                    m, vocab = NGramModel.from_text(f, order=args.order)
                m.write_arpa(arpa)
                del m
                row["arpa_from"] = "lmlab"
            row["arpa_mb"] = arpa.stat().st_size / 2**20
            row["kenlm_read_score"] = child("kenlm_read", str(arpa), str(test_k))
            row["kenlm_read"] = child("kenlm_read", str(arpa), None)
            row["lmlab_read"] = child("lmlab_read", str(arpa))
            row["side_by_side"] = child("side_by_side", str(arpa), str(test_k), args.repeats)
            arpa.unlink()
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print("| corpus | what | lmlab peak MB (over import) | KenLM peak MB | memory ratio | time ratio lmlab/KenLM |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        b, s = r["lmlab_build"], r["side_by_side"]
        kpeak = max(r.get("lmplz", {}).get("peak_mb", 0.0), r["kenlm_read_score"]["peak_mb"])
        kwhat = f"lmplz -S {args.lmplz_memory}, then kenlm" if "lmplz" in r else "kenlm (no lmplz)"
        print(f"| {r['corpus']} | build + score KN{r['order']} ({kwhat}) | {b['peak_mb']:.0f} ({b['peak_mb'] - b['import_mb']:.0f}) "
              f"| {kpeak:.0f} | {b['peak_mb'] / kpeak:.2f}x ({(b['peak_mb'] - b['import_mb']) / kpeak:.2f}x) | — |")
        lr, kr = r["lmlab_read"], r["kenlm_read"]
        print(f"| {r['corpus']} | read ARPA ({r['arpa_mb']:.0f} MiB, from {r['arpa_from']}) | {lr['peak_mb']:.0f} "
              f"({lr['peak_mb'] - lr['import_mb']:.0f}) | {kr['peak_mb']:.0f} | {lr['peak_mb'] / kr['peak_mb']:.2f}x "
              f"({(lr['peak_mb'] - lr['import_mb']) / kr['peak_mb']:.2f}x) | {s['lmlab_load_s'] / s['kenlm_load_s']:.2f} |")
        print(f"| {r['corpus']} | score {s['scored_tokens']:,} test tokens (ids / words) | — | — | — | "
              f"{s['lmlab_score_s'] / s['kenlm_score_s']:.2f} / {s['lmlab_encode_score_s'] / s['kenlm_score_s']:.2f} |")
    print()
    for r in rows:
        b, s = r["lmlab_build"], r["side_by_side"]
        print(f"{r['corpus']}: lmlab build {b['build_s']:.1f} s, test ppl {b['ppl']:.2f}; "
              + (f"lmplz {r['lmplz']['build_s']:.1f} s; " if "lmplz" in r else "")
              + f"kenlm ppl {r['kenlm_read_score']['ppl']:.2f}; load {s['lmlab_load_s']:.2f} s vs {s['kenlm_load_s']:.2f} s; "
              f"score {s['lmlab_score_s']:.3f} s vs {s['kenlm_score_s']:.3f} s")
    if args.out:
        import numpy as np
        import torch

        meta = {
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(TASKS[sys.argv[2]](*json.loads(sys.argv[3]))))
        raise SystemExit(0)
    raise SystemExit(main())
