"""Every model family on the same data with the same loop.

    python benchmarks/families.py --task shakespeare --budget 120 --out runs/families-shakespeare
    python benchmarks/families.py --task names --budget 120 --out runs/families-names
    python benchmarks/families.py --task names --families transformer --ngram-orders --steps 20000 \
        --train-set lr=2e-3 --train-set min_lr=2e-4 --train-set weight_decay=0.1 --out runs/names-tf

shakespeare: characters of the bundled tiny Shakespeare, nanoGPT's 90/10 split
by position; each trainable family gets the same wall-clock training budget;
the number reported is validation bits per character, every validation token
scored once (sliding window of the model's context, stride half of it;
unbounded families use windows of 256 with stride 128).

names: makemore's names.txt, one name per line as a complete sequence
(<bos> name <eos>), makemore's split (test = 1000 names, permutation seeded
3407); the number reported is test NLL per character, <eos> included, as
makemore reports it.

Counts-based n-gram models (interpolated modified Kneser-Ney) are estimated on
the training split, not trained; their parameter count is the number of n-grams.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from lmlab.cli import key_values
from lmlab.data import SequenceBatches, StreamBatches, makemore_split, read_corpus, read_lines, split_by_position
from lmlab.models import build_model
from lmlab.score import score_sequences, stream_nll
from lmlab.tokenizers import CharTokenizer
from lmlab.train import Trainer, TrainConfig

NAMES_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "names" / "names.txt"

# (family, model config, train overrides); block_size is filled in per task.
FAMILIES = {
    "bigram": ({}, dict(lr=1e-1, min_lr=1e-2, weight_decay=0.0)),
    "context-average": ({"n_embd": 64}, dict(lr=3e-3, min_lr=3e-4)),
    "mlp": ({"context": 8, "n_embd": 24, "n_hidden": 512}, dict(lr=3e-3, min_lr=3e-4)),
    "rnn": ({"n_embd": 64, "n_hidden": 256, "n_layer": 2}, dict(lr=2e-3, min_lr=2e-4)),
    "gru": ({"n_embd": 64, "n_hidden": 256, "n_layer": 2}, dict(lr=3e-3, min_lr=3e-4)),
    "lstm": ({"n_embd": 64, "n_hidden": 256, "n_layer": 2}, dict(lr=3e-3, min_lr=3e-4)),
    "transformer": ({"n_layer": 4, "n_head": 4, "n_embd": 128, "bias": False}, dict(lr=1e-3, min_lr=1e-4)),
}
NAMES_TRANSFORMER = {"n_layer": 4, "n_head": 4, "n_embd": 64}  # makemore's default transformer


def train_family(family, model_cfg, overrides, train, val, vocab, block, budget, out, steps=None):
    """Train for ``steps`` steps, or for ``budget`` seconds with the schedule fitted to the
    step count a 60-step probe predicts for that budget (the budget also stops the run)."""
    if steps is not None:
        torch.manual_seed(1337)
        model = build_model(family, {"vocab_size": vocab, "block_size": block, **model_cfg})
        config = TrainConfig(max_iters=steps, batch_size=train.batch_size, warmup_iters=min(100, steps // 10),
                             eval_interval=max(1, steps // 4), eval_iters=20, progress=False, **overrides)
        return model.eval(), Trainer(model, train, val, config, out / family).fit()
    torch.manual_seed(1337)
    model = build_model(family, {"vocab_size": vocab, "block_size": block, **model_cfg})
    probe = Trainer(model, train, val, TrainConfig(max_iters=60, batch_size=train.batch_size, warmup_iters=0, eval_iters=1,
                                                   eval_interval=1000, log_interval=10, progress=False, **overrides),
                    out / f"probe-{family}")
    probe.fit()
    # Steady-state seconds per step from the logged times of steps 10..60 (start-up and checkpoints excluded).
    times = {r["step"]: r["time"] for r in map(json.loads, (out / f"probe-{family}" / "metrics.jsonl").open())
             if "train_loss" in r}
    per_step = (times[60] - times[10]) / 50
    steps = max(100, int(budget / per_step))
    torch.manual_seed(1337)
    model = build_model(family, {"vocab_size": vocab, "block_size": block, **model_cfg})
    config = TrainConfig(max_iters=steps, batch_size=train.batch_size, warmup_iters=min(100, steps // 10),
                         eval_interval=max(1, steps // 4), eval_iters=20, time_budget=budget, progress=False,
                         **overrides)
    summary = Trainer(model, train, val, config, out / family).fit()
    return model.eval(), summary


def run_shakespeare(args, out):
    text = read_corpus()
    tok = CharTokenizer.train(text)
    ids = np.asarray(tok.encode(text), dtype=np.uint16)
    train_ids, val_ids = split_by_position(ids, 0.1)
    val_t = torch.as_tensor(val_ids.astype(np.int64))
    rows = []
    for order in args.ngram_orders:
        rows.append(ngram_row(order, train_ids, val_t, tok))
        print(rows[-1], flush=True)
    for family in args.families:
        model_cfg, overrides = FAMILIES[family]
        overrides = {**overrides, **args.train_overrides}
        block = 64
        train = StreamBatches(train_ids, block, args.batch_size)
        val = StreamBatches(val_ids, block, args.batch_size)
        model, summary = train_family(family, {**model_cfg, **args.overrides}, overrides, train, val, tok.vocab_size, block,
                                      args.budget, out)
        window = model.max_context or 256
        t0 = time.perf_counter()
        with torch.no_grad():
            score = stream_nll(model, val_t, window=window, stride=window // 2, batch_size=64)
        rows.append({"family": family, "parameters": model.num_parameters(), "steps": summary["steps"],
                     "train_seconds": round(summary["seconds"], 1), "val_bits_per_char": round(score.bits_per_token, 4),
                     "score_seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    return rows


def ngram_row(order, train_ids, val_t, tok):
    from lmlab.models import build_model

    t0 = time.perf_counter()
    model = build_model("ngram", {"vocab_size": tok.vocab_size, "order": order, "bos_id": tok.bos_id,
                                  "eos_id": tok.eos_id, "unk_id": tok.unk_id})
    model.fit(np.asarray(train_ids, dtype=np.int64), add_bos_eos=False)
    build = time.perf_counter() - t0
    score = stream_nll(model, val_t, window=256, stride=256 - order)
    return {"family": f"{order}-gram KN", "parameters": sum(model.config.sizes), "steps": 0,
            "train_seconds": round(build, 1), "val_bits_per_char": round(score.bits_per_token, 4)}


def run_names(args, out):
    lines = read_lines(args.names)
    train_lines, test_lines = makemore_split(lines, seed=3407)
    tok = CharTokenizer.train("\n".join(lines))
    enc = [tok.encode(s) for s in train_lines]
    train = SequenceBatches(enc, args.batch_size, tok.bos_id, tok.eos_id, tok.pad_id)
    test = SequenceBatches([tok.encode(s) for s in test_lines], args.batch_size, tok.bos_id, tok.eos_id, tok.pad_id)
    block = max(train.block_size, test.block_size)
    rows = []
    for order in args.ngram_orders:
        t0 = time.perf_counter()
        model = build_model("ngram", {"vocab_size": tok.vocab_size, "order": order, "bos_id": tok.bos_id,
                                      "eos_id": tok.eos_id, "unk_id": tok.unk_id})
        model.fit([np.asarray(s, dtype=np.int64) for s in enc], add_bos_eos=True)
        score = score_sequences(model, tok, test_lines)
        rows.append({"family": f"{order}-gram KN", "parameters": sum(model.config.sizes), "steps": 0,
                     "train_seconds": round(time.perf_counter() - t0, 1),
                     "test_nll_per_char": round(score.nll_per_token, 4)})
        print(rows[-1], flush=True)
    for family in args.families:
        model_cfg, overrides = FAMILIES[family]
        if family == "transformer":
            model_cfg = NAMES_TRANSFORMER
            overrides = dict(lr=5e-4, min_lr=5e-5, weight_decay=0.01)
        overrides = {**overrides, **args.train_overrides}
        if family == "mlp":
            model_cfg = {"context": 3, "n_embd": 64, "n_hidden": 512, "pad_id": tok.bos_id}
        model, summary = train_family(family, {**model_cfg, **args.overrides}, overrides, train, test, tok.vocab_size, block,
                                      args.budget, out, steps=args.steps)
        score = score_sequences(model, tok, test_lines)
        rows.append({"family": family, "parameters": model.num_parameters(), "steps": summary["steps"],
                     "train_seconds": round(summary["seconds"], 1), "test_nll_per_char": round(score.nll_per_token, 4)})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["shakespeare", "names"], required=True)
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds per family")
    parser.add_argument("--steps", type=int, help="names: train each family for this many steps instead of a time budget")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--ngram-orders", nargs="*", type=int, help="KN n-gram rows (default: 3 5 for shakespeare, 2 3 4 5 for names)")
    parser.add_argument("--names", default=str(NAMES_PATH))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model config field of every trained family, e.g. --set dropout=0.1")
    parser.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training setting of every trained family, e.g. --train-set lr=1e-3")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch of every trained family")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.ngram_orders is None:
        args.ngram_orders = [3, 5] if args.task == "shakespeare" else [2, 3, 4, 5]
    args.overrides = key_values(args.set)
    args.train_overrides = key_values(args.train_set)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    rows = run_shakespeare(args, out) if args.task == "shakespeare" else run_names(args, out)
    (out / "families.json").write_text(json.dumps({"task": args.task, "budget": args.budget, "rows": rows, "set": args.overrides,
                                                   "train_set": args.train_overrides,
                                                   "batch_size": args.batch_size,
                                                   "threads": torch.get_num_threads()}, indent=2) + "\n")
    metric = "val_bits_per_char" if args.task == "shakespeare" else "test_nll_per_char"
    print(f"| family | parameters | steps | train s | {metric} |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['parameters']:,} | {r['steps']} | {r['train_seconds']} | {r[metric]} |")


if __name__ == "__main__":
    main()
