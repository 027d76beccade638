"""nanoGPT's tiny-Shakespeare character configurations, trained with lmlab, and
side by side with nanoGPT's own train.py.

    python benchmarks/nanogpt_shakespeare.py --preset cpu --out runs/bench-cpu
    python benchmarks/nanogpt_shakespeare.py --preset gpu --out runs/bench-gpu
    python benchmarks/nanogpt_shakespeare.py --preset cpu --out runs/side-by-side \
        --nanogpt /path/to/nanoGPT --pairs 2 --threads 1

Same data, split (first 90% / last 10% by position) and hyper-parameters as
nanoGPT's ``config/train_shakespeare_char.py`` (gpu) and the CPU variant in its
README (cpu). Prints a Markdown row and writes JSON to ``--out/benchmark.json``.

With ``--nanogpt DIR`` (a checkout of karpathy/nanoGPT) the CPU configuration
runs alternately as this script and as nanoGPT's README command
(``python train.py config/train_shakespeare_char.py --device=cpu --compile=False
--eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4
--n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``),
each a separate process timed from start to exit, ``--pairs`` times, the order
swapped in every other pair. nanoGPT's data files are written as its
``data/shakespeare_char/prepare.py`` writes them, from the same text, into a
working directory under ``--out`` (the checkout is only read). ``--threads N``
sets OMP_NUM_THREADS for both. Writes ``--out/side_by_side.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lmlab.data import StreamBatches, ids_dtype, read_corpus, split_by_position
from lmlab.models import build_model
from lmlab.models.transformer import TransformerConfig
from lmlab.tokenizers import CharTokenizer
from lmlab.train import Trainer, TrainConfig

PRESETS = {
    # nanoGPT README: --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64
    # --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
    "cpu": dict(model=dict(block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0),
                train=dict(max_iters=2000, lr_decay_iters=2000, batch_size=12, lr=1e-3, min_lr=1e-4,
                           warmup_iters=100, beta2=0.99, eval_interval=250, eval_iters=20)),
    # nanoGPT config/train_shakespeare_char.py
    "gpu": dict(model=dict(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2),
                train=dict(max_iters=5000, lr_decay_iters=5000, batch_size=64, lr=1e-3, min_lr=1e-4,
                           warmup_iters=100, beta2=0.99, eval_interval=250, eval_iters=200)),
}


NANOGPT_FILES = ("train.py", "model.py", "configurator.py", "config")
NANOGPT_STEP = re.compile(r"^step (\d+): train loss ([0-9.]+), val loss ([0-9.]+)", re.M)


def prepare_nanogpt(nanogpt: Path, work: Path) -> None:
    """A working directory that runs ``nanogpt``'s train.py on the bundled corpus: links to its
    code, and data/shakespeare_char/{train,val}.bin and meta.pkl as its prepare.py writes them."""
    missing = [name for name in NANOGPT_FILES if not (nanogpt / name).exists()]
    if missing:
        raise SystemExit(f"error: --nanogpt {nanogpt} is not a nanoGPT checkout (missing {', '.join(missing)})")
    data = work / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    for name in NANOGPT_FILES:
        (work / name).symlink_to((nanogpt / name).resolve())
    text = read_corpus()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    cut = int(len(text) * 0.9)
    np.array([stoi[c] for c in text[:cut]], dtype=np.uint16).tofile(data / "train.bin")
    np.array([stoi[c] for c in text[cut:]], dtype=np.uint16).tofile(data / "val.bin")
    with open(data / "meta.pkl", "wb") as f:  # written here, read by nanoGPT's train.py for vocab_size
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)


def nanogpt_command(max_iters: int, out_dir: str) -> list[str]:
    """nanoGPT README's CPU command (``max_iters`` 2000 there)."""
    return [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
            "--eval_iters=20", "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4",
            "--n_head=4", "--n_embd=128", f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}",
            "--dropout=0.0", f"--out_dir={out_dir}"]


def timed(command: list[str], cwd: Path, log: Path, env: dict) -> float:
    """Run ``command``, its output to ``log``; return its wall seconds."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(command, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed (exit {done.returncode}); see {log}")
    return seconds


def side_by_side(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    work = out / "nanogpt"
    prepare_nanogpt(Path(args.nanogpt), work)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    max_iters = args.max_iters or PRESETS["cpu"]["train"]["max_iters"]
    runs = []
    for pair in range(args.pairs):
        order = ("lmlab", "nanoGPT") if pair % 2 == 0 else ("nanoGPT", "lmlab")
        for tool in order:
            log = out / f"{tool}-{pair}.log"
            if tool == "lmlab":
                run_dir = out / f"lmlab-{pair}"
                command = [sys.executable, str(Path(__file__).resolve()), "--preset", "cpu", "--device", "cpu",
                           "--out", str(run_dir), "--max-iters", str(max_iters), "--no-all-windows"]
                seconds = timed(command, Path.cwd(), log, env)
                result = json.loads((run_dir / "benchmark.json").read_text())
                val, best = result["val_loss"], result["best_val_loss"]
            else:
                seconds = timed(nanogpt_command(max_iters, f"out-{pair}"), work, log, env)
                steps = NANOGPT_STEP.findall(log.read_text())
                if not steps:
                    raise SystemExit(f"error: no 'step N: train loss X, val loss Y' line in {log}")
                val, best = float(steps[-1][2]), min(float(v) for _, _, v in steps)
            runs.append({"pair": pair, "tool": tool, "wall_seconds": seconds, "val_loss": val, "best_val_loss": best})
            print(f"pair {pair} {tool}: {seconds:.1f} s, val loss {val:.4f}", flush=True)
    ratios = []
    for pair in range(args.pairs):
        by_tool = {r["tool"]: r for r in runs if r["pair"] == pair}
        ratios.append(by_tool["lmlab"]["wall_seconds"] / by_tool["nanoGPT"]["wall_seconds"])
    summary = {"runs": runs, "wall_ratio_per_pair": ratios, "wall_ratio_median": statistics.median(ratios),
               "max_iters": max_iters, "threads": args.threads, "torch": torch.__version__,
               "load_average_after": os.getloadavg()}
    (out / "side_by_side.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("| pair | tool | wall s (process) | val loss (20 eval batches) | best val loss |")
    print("|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['pair']} | {r['tool']} | {r['wall_seconds']:.1f} | {r['val_loss']:.4f} | {r['best_val_loss']:.4f} |")
    print(f"lmlab / nanoGPT wall time per pair: {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"median {summary['wall_ratio_median']:.3f}; load average after: {summary['load_average_after']}")


def loss_over_all_windows(trainer: Trainer, val_ids: np.ndarray, T: int) -> float:
    """nanoGPT's number is a mean over random validation windows of block_size; this is the same
    quantity over every disjoint window of the split, so it does not depend on which batches were drawn."""
    model = trainer.model
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad(), trainer.autocast():
        for x, y in StreamBatches(val_ids, T, 64).windows(trainer.device):
            logits, _ = model(x)
            nll += float(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
    return nll / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--max-iters", type=int, help="override the preset (for a quick check)")
    parser.add_argument("--no-all-windows", action="store_true",
                        help="skip the validation loss over every window (side by side: nanoGPT has no such pass)")
    parser.add_argument("--nanogpt", help="a nanoGPT checkout: run its train.py side by side (cpu preset)")
    parser.add_argument("--pairs", type=int, default=2, help="with --nanogpt: alternating pairs of runs")
    parser.add_argument("--threads", type=int, help="with --nanogpt: OMP_NUM_THREADS for both")
    args = parser.parse_args()
    if args.nanogpt:
        if args.preset != "cpu" or args.compile:
            raise SystemExit("error: --nanogpt runs nanoGPT README's CPU command: use --preset cpu without --compile")
        side_by_side(args)
        return
    preset = PRESETS[args.preset]
    text = read_corpus()
    tok = CharTokenizer.train(text)
    ids = np.asarray(tok.encode(text), dtype=ids_dtype(tok.vocab_size))
    train_ids, val_ids = split_by_position(ids, 0.1)
    torch.manual_seed(1337)
    mcfg = TransformerConfig(vocab_size=tok.vocab_size, bias=False, **preset["model"])
    model = build_model("transformer", mcfg)
    tcfg = dict(preset["train"], device=args.device, compile=args.compile)
    if args.max_iters:
        tcfg.update(max_iters=args.max_iters, lr_decay_iters=args.max_iters)
    config = TrainConfig(**tcfg)
    B, T = config.batch_size, mcfg.block_size
    trainer = Trainer(model, StreamBatches(train_ids, T, B), StreamBatches(val_ids, T, B), config, args.out, tokenizer=tok)
    t0 = time.perf_counter()
    summary = trainer.fit()
    wall = time.perf_counter() - t0
    # the time at which the best validation loss was reached, from the metrics log
    best_time = None
    for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("step") == summary["best_step"] and "val_eval_loss" in r:
            best_time = r["time"]
    summary["val_loss_all_windows"] = None if args.no_all_windows else loss_over_all_windows(trainer, val_ids, T)
    result = {"preset": args.preset, **summary, "wall_seconds": wall, "best_time_seconds": best_time,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    (trainer.run_dir / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| preset | params | steps | final val loss (eval batches) | val loss, all windows | best val loss (step, s) | wall s | tokens/s | MFU | device |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.preset} | {summary['parameters']:,} | {summary['steps']} | {summary['val_loss']:.4f} | "
          f"{summary['val_loss_all_windows'] or float('nan'):.4f} | "
          f"{summary['best_val_loss']:.4f} ({summary['best_step']}, {best_time:.0f}) | {wall:.0f} | "
          f"{summary['tokens_per_second']:,.0f} | "
          f"{'n/a' if summary['mfu'] is None else format(summary['mfu'], '.1%')} | {result['gpu'] or 'cpu x' + str(result['threads'])} |")


if __name__ == "__main__":
    main()
