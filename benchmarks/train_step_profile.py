"""Where a training step's time goes: nanoGPT's CPU configuration (4 layers, 4 heads,
128 wide, block 64, batch 12), forward / backward / clipping / optimizer timed
separately for the fused and the multi-tensor (foreach) AdamW, interleaved in one
process, then torch.profiler's table of the ops of the default (fused) step.

    python benchmarks/train_step_profile.py --threads 1 --steps 40
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmlab.models import build_model
from lmlab.models.transformer import TransformerConfig
from lmlab.train import TrainConfig, lm_loss, make_optimizer

PARTS = ("forward", "backward", "clip", "optimizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per optimizer")
    parser.add_argument("--profile-steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = torch.randint(0, 65, (12, 64)), torch.randint(0, 65, (12, 64))
    config = TrainConfig()

    def make(fused: bool):
        torch.manual_seed(0)
        model = build_model("transformer", TransformerConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4,
                                                             n_embd=128, bias=False))
        return model, make_optimizer(model, config, torch.device("cpu"), fused=fused)

    def step(model, optimizer) -> tuple[float, ...]:
        t0 = time.perf_counter()
        loss = lm_loss(model, x, y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, t4 - t3

    runs = {"fused": make(True), "foreach": make(False)}
    times: dict[str, list[tuple[float, ...]]] = {name: [] for name in runs}
    for i in range(5 + args.steps):
        for name, (model, optimizer) in runs.items():
            parts = step(model, optimizer)
            if i >= 5:
                times[name].append(parts)
    print(f"median ms per step, {args.threads} thread(s), {args.steps} steps each (interleaved)")
    print("| AdamW | " + " | ".join(PARTS) + " | total |")
    print("|---|" + "---|" * (len(PARTS) + 1))
    for name, rows in times.items():
        medians = [statistics.median(r[i] for r in rows) * 1000 for i in range(len(PARTS))]
        total = statistics.median(sum(r) for r in rows) * 1000
        print(f"| {name} | " + " | ".join(f"{m:.2f}" for m in medians) + f" | {total:.2f} |")
    from torch.profiler import ProfilerActivity, profile

    model, optimizer = runs["fused"]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile_steps):
            step(model, optimizer)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
