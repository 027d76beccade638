"""Where a training step's time goes: nanoGPT's CPU configuration (4 layers, 4 heads,
128 wide, block 64, batch 12), forward / backward / clipping / optimizer timed
separately (wall and this process's CPU time) for lmlab with the fused AdamW (the
default) and the multi-tensor (foreach) one and, with ``--nanogpt DIR`` (a checkout of
karpathy/nanoGPT, only read), for nanoGPT's own model.py and optimizer (its CPU
choice: the single-tensor AdamW), interleaved in one process; then torch.profiler's
table of the ops of lmlab's default step.

    python benchmarks/train_step_profile.py --threads 1 --steps 40 --nanogpt /path/to/nanoGPT
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time

import torch

from lmlab.models import build_model
from lmlab.models.transformer import TransformerConfig
from lmlab.train import TrainConfig, lm_loss, make_optimizer

PARTS = ("forward", "backward", "clip", "optimizer")
SHAPE = dict(block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per optimizer")
    parser.add_argument("--profile-steps", type=int, default=20)
    parser.add_argument("--nanogpt", help="a nanoGPT checkout: time its model and optimizer too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = torch.randint(0, 65, (12, 64)), torch.randint(0, 65, (12, 64))
    config = TrainConfig()

    def lmlab(fused: bool):
        torch.manual_seed(0)
        model = build_model("transformer", TransformerConfig(vocab_size=65, **SHAPE))
        return model, make_optimizer(model, config, torch.device("cpu"), fused=fused), lambda: lm_loss(model, x, y)

    def nanogpt():
        sys.path.insert(0, args.nanogpt)
        from model import GPT, GPTConfig  # nanoGPT's model.py

        torch.manual_seed(0)
        with contextlib.redirect_stdout(io.StringIO()):  # its parameter counts
            model = GPT(GPTConfig(vocab_size=65, dropout=0.0, **SHAPE))
            optimizer = model.configure_optimizers(config.weight_decay, config.lr, (config.beta1, config.beta2), "cpu")
        return model, optimizer, lambda: model(x, y)[1]

    def step(model, optimizer, loss_of) -> tuple[float, ...]:
        c0, t0 = time.process_time(), time.perf_counter()
        loss = loss_of()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t3 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0, time.process_time() - c0

    runs = {"lmlab, fused AdamW (default)": lmlab(True), "lmlab, foreach AdamW": lmlab(False)}
    if args.nanogpt:
        runs["nanoGPT (model.py, its CPU AdamW)"] = nanogpt()
    times: dict[str, list[tuple[float, ...]]] = {name: [] for name in runs}
    for i in range(5 + args.steps):
        for name, run in runs.items():
            parts = step(*run)
            if i >= 5:
                times[name].append(parts)
    print(f"median ms per step, {args.threads} thread(s), {args.steps} steps each (interleaved)")
    print("| | " + " | ".join(PARTS) + " | step (wall) | step (CPU) |")
    print("|---|" + "---|" * (len(PARTS) + 2))
    for name, rows in times.items():
        medians = [statistics.median(r[i] for r in rows) * 1000 for i in range(len(PARTS) + 2)]
        print(f"| {name} | " + " | ".join(f"{m:.2f}" for m in medians) + " |")
    from torch.profiler import ProfilerActivity, profile

    first = next(iter(runs.values()))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile_steps):
            step(*first)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
