"""nanoGPT's tiny-Shakespeare character configurations, trained with lmlab, and
side by side with nanoGPT's own train.py.

    python benchmarks/nanogpt_shakespeare.py --preset cpu --out runs/bench-cpu
    python benchmarks/nanogpt_shakespeare.py --preset gpu --out runs/bench-gpu
    python benchmarks/nanogpt_shakespeare.py --preset cpu --out runs/side-by-side \
        --nanogpt /path/to/nanoGPT --pairs 2 --threads 1 default --ddp

Same data, split (first 90% / last 10% by position) and hyper-parameters as
nanoGPT's ``config/train_shakespeare_char.py`` (gpu) and the CPU variant in its
README (cpu). Prints a Markdown row and writes JSON to ``--out/benchmark.json``.

With ``--nanogpt DIR`` (a checkout of karpathy/nanoGPT) the CPU configuration
runs alternately as ``lmlab train`` and as nanoGPT's README command
(``python train.py config/train_shakespeare_char.py --device=cpu --compile=False
--eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4
--n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``),
each a separate process timed from start to exit (wall time, and CPU time: user +
system of the process and the processes it waited for), ``--pairs`` rounds, each
round starting one setting later. ``--threads`` lists OMP_NUM_THREADS settings, each
run by both tools (``default``: unset, torch's own choice); ``--ddp`` adds lmlab as
2 processes x 1 thread (``lmlab train --nproc-per-node 2``, DDP over gloo, the same
global batch). nanoGPT's data files are written as its
``data/shakespeare_char/prepare.py`` writes them, from the same text, into a
working directory under ``--out`` (the checkout is only read). Writes
``--out/side_by_side.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import resource
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


def timed(command: list[str], cwd: Path, log: Path, env: dict) -> tuple[float, float]:
    """Run ``command``, its output to ``log``; return its (wall seconds, CPU seconds): user + system
    time of the process and of every process it waited for (torchrun's workers)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(command, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed (exit {done.returncode}); see {log}")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def lmlab_command(max_iters: int, out_dir: Path, processes: int) -> list[str]:
    """``lmlab train`` with the CPU preset's settings (nanoGPT README's CPU command), in one
    process or, with ``processes`` > 1, as many DDP processes sharing the same global batch."""
    model, train = PRESETS["cpu"]["model"], PRESETS["cpu"]["train"]
    command = [sys.executable, "-m", "lmlab", "train", "--model", "transformer", "--device", "cpu",
               "--block-size", str(model["block_size"]), "--n-layer", str(model["n_layer"]),
               "--n-head", str(model["n_head"]), "--n-embd", str(model["n_embd"]), "--dropout", "0",
               "--set", "bias=false", "--batch-size", str(train["batch_size"]), "--lr", str(train["lr"]),
               "--min-lr", str(train["min_lr"]), "--warmup-iters", str(train["warmup_iters"]),
               "--beta2", str(train["beta2"]), "--eval-interval", str(train["eval_interval"]),
               "--eval-iters", str(train["eval_iters"]), "--max-iters", str(max_iters),
               "--lr-decay-iters", str(max_iters), "--no-progress", "--out", str(out_dir)]
    return command + (["--nproc-per-node", str(processes)] if processes > 1 else [])


def variants(threads: list[str], ddp: bool) -> list[dict]:
    """The settings to alternate: lmlab and nanoGPT at each thread setting ("default": torch's
    own choice, OMP_NUM_THREADS unset), then lmlab as 2 processes x 1 thread."""
    out = []
    for t in threads:
        for tool in ("lmlab", "nanoGPT"):
            out.append({"tool": tool, "threads": t, "processes": 1})
    if ddp:
        out.append({"tool": "lmlab", "threads": "1", "processes": 2})
    return out


def label(v: dict) -> str:
    threads = "default threads" if v["threads"] == "default" else f"{v['threads']} thread(s)"
    return f"{v['tool']}, {v['processes']} process(es) x {threads}"


def side_by_side(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    work = out / "nanogpt"
    prepare_nanogpt(Path(args.nanogpt), work)
    max_iters = args.max_iters or PRESETS["cpu"]["train"]["max_iters"]
    settings = variants(args.threads, args.ddp)
    runs = []
    for round_ in range(args.pairs):
        shift = round_ % len(settings)
        for v in settings[shift:] + settings[:shift]:  # each round starts one setting later
            env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
                [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
            env.pop("OMP_NUM_THREADS", None)
            if v["threads"] != "default":
                env["OMP_NUM_THREADS"] = v["threads"]
            name = f"{v['tool']}-p{v['processes']}-t{v['threads']}-{round_}"
            log = out / f"{name}.log"
            if v["tool"] == "lmlab":
                seconds, cpu = timed(lmlab_command(max_iters, out / name, v["processes"]), Path.cwd(), log, env)
                text = log.read_text()
                opening = re.search(r"^\{$", text, re.M)  # the summary `lmlab train` prints last
                if opening is None:
                    raise SystemExit(f"error: no summary printed by lmlab train in {log}")
                summary = json.JSONDecoder().raw_decode(text[opening.start():])[0]
                val, best = summary["val_loss"], summary["best_val_loss"]
            else:
                seconds, cpu = timed(nanogpt_command(max_iters, f"out-{name}"), work, log, env)
                steps = NANOGPT_STEP.findall(log.read_text())
                if not steps:
                    raise SystemExit(f"error: no 'step N: train loss X, val loss Y' line in {log}")
                val, best = float(steps[-1][2]), min(float(v) for _, _, v in steps)
            runs.append({"round": round_, **v, "label": label(v), "wall_seconds": seconds, "cpu_seconds": cpu,
                         "val_loss": val, "best_val_loss": best, "load_average_after": os.getloadavg()})
            print(f"round {round_} {label(v)}: {seconds:.1f} s wall, {cpu:.1f} s CPU, val loss {val:.4f}, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    summary = {"runs": runs, "max_iters": max_iters, "torch": torch.__version__}
    (out / "side_by_side.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("| round | run | wall s | CPU s | val loss (20 eval batches) | load average after |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['round']} | {r['label']} | {r['wall_seconds']:.1f} | {r['cpu_seconds']:.1f} | "
              f"{r['val_loss']:.4f} | {r['load_average_after'][0]:.1f} |")
    for t in args.threads:
        for other in [(t, 1)] + ([("1", 2)] if args.ddp else []):
            mine = [r for r in runs if r["tool"] == "lmlab" and (r["threads"], r["processes"]) == other]
            theirs = [r for r in runs if r["tool"] == "nanoGPT" and r["threads"] == t]
            ratios = [a["wall_seconds"] / b["wall_seconds"] for a, b in zip(mine, theirs)]
            if ratios:
                print(f"lmlab {other[1]} process(es) x {other[0]} thread(s) / nanoGPT at {t} thread(s), wall time "
                      f"per round: {', '.join(f'{x:.3f}' for x in ratios)}; median {statistics.median(ratios):.3f}")


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
    parser.add_argument("--pairs", type=int, default=2, help="with --nanogpt: rounds of alternating runs")
    parser.add_argument("--threads", nargs="+", default=["default"],
                        help="with --nanogpt: OMP_NUM_THREADS for both tools, one setting or several "
                             "(e.g. 1 default); 'default' leaves it unset (torch's own choice)")
    parser.add_argument("--ddp", action="store_true",
                        help="with --nanogpt: also lmlab train --nproc-per-node 2, 1 thread each (same global batch)")
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
