"""Kneser-Ney 5-grams at word-level scale, against KenLM: peak memory of
building and scoring, reading an ARPA file, and sentence scoring speed.

    python benchmarks/ngram_scale.py --lmplz /path/to/kenlm/build/bin/lmplz --out runs/ngram_scale.json

For each corpus (Penn Treebank and WikiText-2, the tokenized files; literal
``<unk>`` counted as a word, as the literature does) it measures:

* build + score: one fresh process builds KN5 from the training file
  (``lmlab.ngram.NGramLM.from_text`` on the open file, numpy only: no torch)
  and scores the test set with ``score_sequences``; its peak RSS, and the RSS
  right after the import. KenLM's side is the
  larger of two fresh processes: ``lmplz -o 5 -S <--lmplz-memory>`` on the
  same text (with ``<unk>`` renamed, which lmplz otherwise refuses), and the
  ``kenlm`` module loading that ARPA and scoring the test set.
* ARPA read: a fresh process per tool loads the ARPA file (lmplz's; lmlab's
  own if no ``--lmplz``): peak RSS of each, and the load time of both
  measured alternately in one process (best of ``--repeats``), as a ratio.
* sentence scoring: in one process, both tools loaded from that same ARPA
  score the test sentences: ``kenlm.Model.score`` per sentence against
  ``score_sequences`` on all ids at once (and with the words-to-ids step
  included); alternately, best of ``max(10, --repeats)``; the totals must agree.

Peak memory is ``ru_maxrss`` (not affected by other load on the machine).
Times are measured alternately in one process and reported as ratios, both
as wall-clock and as CPU time of the process (``time.process_time``; both
tools run on one thread), the latter less disturbed when the machine is
shared. Prints a markdown table and writes JSON with ``--out``.
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
    from lmlab.ngram import NGramLM

    base = peak_mb()
    t = time.perf_counter()
    with open(train, encoding="utf-8") as f:
        model, vocab = NGramLM.from_text(f, order=order)
    build_s = time.perf_counter() - t
    with open(test, encoding="utf-8") as f:
        seqs = [model.encode(line) for line in f]
    total = float(model.score_sequences(seqs).sum())
    n = sum(len(s) + 1 for s in seqs)
    return {"peak_mb": peak_mb(), "import_mb": base, "build_s": build_s, "ppl": 10 ** (-total / n), "ngrams": model.sizes,
            "torch_imported": "torch" in sys.modules}


def task_lmlab_read(arpa: str) -> dict:
    from lmlab.ngram import NGramLM

    base = peak_mb()
    t = time.perf_counter()
    model, _ = NGramLM.from_arpa(arpa)
    return {"peak_mb": peak_mb(), "import_mb": base, "load_s": time.perf_counter() - t, "ngrams": model.sizes,
            "torch_imported": "torch" in sys.modules}


def task_import_torch_interface() -> dict:
    """Peak RSS of importing the torch interface of the same model (lmlab.models.ngram)."""
    import lmlab.models.ngram  # noqa: F401

    return {"import_mb": peak_mb()}


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

    from lmlab.ngram import NGramLM

    def timed(fn, wall: list, cpu: list):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        return out

    load_k, load_l, cload_k, cload_l = [], [], [], []
    for _ in range(repeats):
        del_k = timed(lambda: kenlm.Model(arpa), load_k, cload_k)
        del del_k
        del_l = timed(lambda: NGramLM.from_arpa(arpa), load_l, cload_l)
        del del_l
    km = kenlm.Model(arpa)
    lm, vocab = NGramLM.from_arpa(arpa)
    with open(test, encoding="utf-8") as f:
        lines = f.read().splitlines()
    index = {w: i for i, w in enumerate(vocab)}
    ids = [lm.encode(s, index=index) for s in lines]
    score_k, score_l, score_lw, cscore_k, cscore_l, cscore_lw = [], [], [], [], [], []
    for _ in range(max(10, repeats)):
        tk = timed(lambda: sum(km.score(s) for s in lines), score_k, cscore_k)
        tl = float(timed(lambda: lm.score_sequences(ids), score_l, cscore_l).sum())
        tw = float(timed(lambda: lm.score_sequences([lm.encode(s, index=index) for s in lines]), score_lw, cscore_lw).sum())
    n = sum(len(s) + 1 for s in ids)
    assert abs(tk - tl) <= 1e-6 * abs(tk) and tw == tl, (tk, tl, tw)
    return {
        "kenlm_load_s": min(load_k), "lmlab_load_s": min(load_l),
        "kenlm_load_cpu_s": min(cload_k), "lmlab_load_cpu_s": min(cload_l),
        "kenlm_score_s": min(score_k), "lmlab_score_s": min(score_l), "lmlab_encode_score_s": min(score_lw),
        "kenlm_score_cpu_s": min(cscore_k), "lmlab_score_cpu_s": min(cscore_l),
        "lmlab_encode_score_cpu_s": min(cscore_lw),
        "scored_tokens": n, "kenlm_total_log10": tk, "lmlab_total_log10": tl,
        "kenlm_ppl": 10 ** (-tk / n), "lmlab_ppl": 10 ** (-tl / n), "numpy": np.__version__,
    }


TASKS = {
    "lmlab_build": task_lmlab_build,
    "lmlab_read": task_lmlab_read,
    "kenlm_read": task_kenlm_read,
    "lmplz": task_lmplz,
    "side_by_side": task_side_by_side,
    "import_torch_interface": task_import_torch_interface,
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
    loadavg_start = os.getloadavg()
    torch_interface_mb = child("import_torch_interface")["import_mb"]
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
                from lmlab.ngram import NGramLM

                with open(train, encoding="utf-8") as f:
                    m, vocab = NGramLM.from_text(f, order=args.order)
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
    print("| corpus | what | lmlab peak MB (import) | KenLM peak MB | memory ratio | time ratio lmlab / KenLM, wall (CPU) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        b, s = r["lmlab_build"], r["side_by_side"]
        kpeak = max(r.get("lmplz", {}).get("peak_mb", 0.0), r["kenlm_read_score"]["peak_mb"])
        kwhat = f"lmplz -S {args.lmplz_memory}, then kenlm" if "lmplz" in r else "kenlm (no lmplz)"
        print(f"| {r['corpus']} | build + score KN{r['order']} ({kwhat}) | {b['peak_mb']:.0f} ({b['import_mb']:.0f}) "
              f"| {kpeak:.0f} | {b['peak_mb'] / kpeak:.2f}x | — |")
        lr, kr = r["lmlab_read"], r["kenlm_read"]
        print(f"| {r['corpus']} | read ARPA ({r['arpa_mb']:.0f} MiB, from {r['arpa_from']}) | {lr['peak_mb']:.0f} "
              f"({lr['import_mb']:.0f}) | {kr['peak_mb']:.0f} | {lr['peak_mb'] / kr['peak_mb']:.2f}x "
              f"| {s['lmlab_load_s'] / s['kenlm_load_s']:.2f} ({s['lmlab_load_cpu_s'] / s['kenlm_load_cpu_s']:.2f}) |")
        print(f"| {r['corpus']} | score {s['scored_tokens']:,} test tokens: ids / words | — | — | — | "
              f"{s['lmlab_score_s'] / s['kenlm_score_s']:.2f} ({s['lmlab_score_cpu_s'] / s['kenlm_score_cpu_s']:.2f}) / "
              f"{s['lmlab_encode_score_s'] / s['kenlm_score_s']:.2f} ({s['lmlab_encode_score_cpu_s'] / s['kenlm_score_cpu_s']:.2f}) |")
    print()
    print(f"load average at start {loadavg_start}, at end {os.getloadavg()}")
    print(f"importing the torch interface of the same model (lmlab.models.ngram) alone peaks at {torch_interface_mb:.0f} MB")
    for r in rows:
        b, s = r["lmlab_build"], r["side_by_side"]
        print(f"{r['corpus']}: lmlab build {b['build_s']:.1f} s, test ppl {b['ppl']:.2f}; "
              + (f"lmplz {r['lmplz']['build_s']:.1f} s; " if "lmplz" in r else "")
              + f"kenlm ppl {r['kenlm_read_score']['ppl']:.2f}; load {s['lmlab_load_s']:.2f} s vs {s['kenlm_load_s']:.2f} s; "
              f"score {s['lmlab_score_s']:.3f} s vs {s['kenlm_score_s']:.3f} s (CPU {s['lmlab_score_cpu_s']:.3f} s vs "
              f"{s['kenlm_score_cpu_s']:.3f} s)")
    if args.out:
        import numpy as np

        meta = {
            "command": " ".join([Path(sys.executable).name] + sys.argv),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch_interface_import_mb": torch_interface_mb,
            "loadavg_at_start": loadavg_start,
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
