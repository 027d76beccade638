"""nanoGPT's tiny-Shakespeare character configurations, trained with lmlab.

    python benchmarks/nanogpt_shakespeare.py --preset cpu --out runs/bench-cpu
    python benchmarks/nanogpt_shakespeare.py --preset gpu --out runs/bench-gpu

Same data, split (first 90% / last 10% by position) and hyper-parameters as
nanoGPT's ``config/train_shakespeare_char.py`` (gpu) and the CPU variant in its
README (cpu). Prints a Markdown row and writes JSON to ``--out/benchmark.json``.
"""

from __future__ import annotations

import argparse
import json
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--max-iters", type=int, help="override the preset (for a quick check)")
    args = parser.parse_args()
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
    # nanoGPT's number is a mean over random validation windows of block_size; the same quantity
    # over every disjoint window of the split, so it does not depend on which batches were drawn:
    model.eval()
    val_full = StreamBatches(val_ids, T, 64)
    nll, count = 0.0, 0
    with torch.no_grad(), trainer.autocast():
        for x, y in val_full.windows(trainer.device):
            logits, _ = model(x)
            nll += float(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
    summary["val_loss_all_windows"] = nll / count
    result = {"preset": args.preset, **summary, "wall_seconds": wall, "best_time_seconds": best_time,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    (trainer.run_dir / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| preset | params | steps | final val loss (eval batches) | val loss, all windows | best val loss (step, s) | wall s | tokens/s | device |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.preset} | {summary['parameters']:,} | {summary['steps']} | {summary['val_loss']:.4f} | "
          f"{summary['val_loss_all_windows']:.4f} | "
          f"{summary['best_val_loss']:.4f} ({summary['best_step']}, {best_time:.0f}) | {wall:.0f} | "
          f"{summary['tokens_per_second']:,.0f} | {result['gpu'] or 'cpu x' + str(result['threads'])} |")


if __name__ == "__main__":
    main()
