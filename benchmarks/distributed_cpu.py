"""Training throughput on CPU: 1 process x N threads against N processes x 1 thread (DDP, gloo),
and 1 process x 1 thread beside them.

    python benchmarks/distributed_cpu.py --steps 100 --rounds 2 --out runs/bench-ddp

Runs `lmlab train` on tiny Shakespeare (characters, block 64, global batch 12, dropout 0)
for two transformers, the demo's (4 layers x 128) and 4 layers x 256, once per setting and
round, the settings alternating so that a change in the machine's load touches them alike.
Prints a table of tokens/s (the run's own summary: tokens trained / training seconds) and
writes the figures to OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

MODELS = {"demo 4x128": ["--n-layer", "4", "--n-head", "4", "--n-embd", "128"],
          "4x256": ["--n-layer", "4", "--n-head", "4", "--n-embd", "256"]}


def train(out: Path, model: list[str], steps: int, processes: int, threads: int) -> float:
    command = [sys.executable, "-m", "lmlab", "train", "--out", str(out), *model, "--block-size", "64",
               "--batch-size", "12", "--dropout", "0", "--max-iters", str(steps), "--eval-interval", str(10 * steps),
               "--eval-iters", "1", "--warmup-iters", "10", "--device", "cpu", "--no-progress"]
    if processes > 1:
        command += ["--nproc-per-node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    return summary["tokens_per_second"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--processes", type=int, default=2, help="N, and T = N threads for the single process")
    p.add_argument("--out", default="runs/bench-ddp")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    n = args.processes
    settings = {f"1 process x {n} threads": (1, n), f"{n} processes x 1 thread": (n, 1), "1 process x 1 thread": (1, 1)}
    results: dict[str, dict[str, list[float]]] = {m: {s: [] for s in settings} for m in MODELS}
    for r in range(args.rounds):
        for model, flags in MODELS.items():
            for setting, (processes, threads) in settings.items():
                run = out / f"{model.split()[-1]}-{processes}p{threads}t-{r}"
                tps = train(run, flags, args.steps, processes, threads)
                results[model][setting].append(tps)
                print(f"round {r}: {model}, {setting}: {tps:,.0f} tokens/s", flush=True)
    print("\n| model | " + " | ".join(settings) + " |")
    print("|---|" + "---|" * len(settings))
    for model, by_setting in results.items():
        cells = [f"{statistics.median(v):,.0f}" for v in by_setting.values()]
        print(f"| {model} | " + " | ".join(cells) + " |")
    (out / "results.json").write_text(json.dumps({"steps": args.steps, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
