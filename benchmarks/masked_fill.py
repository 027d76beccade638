"""A masked-transformer on tiny Shakespeare characters: how well does it fill gaps, in each order?

    python benchmarks/masked_fill.py --steps 3000 --out runs/masked-fill

Trains lmlab's bidirectional encoder with the masked-LM objective on the bundled
corpus (90/10 split by position), then, on validation windows of 64 characters:

- scattered gaps: 15% of the positions of each window masked at random;
- one span: 8 consecutive characters masked in the middle of the window;

and fills them greedily in each order (confidence, left-to-right, parallel),
reporting the share of masked characters recovered exactly. It also reports the
pseudo-log-likelihood of (up to 50 of) the validation windows in bits per character (each
character scored with every other character of its window visible).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from lmlab.data import StreamBatches, read_corpus, split_by_position
from lmlab.fill import ORDERS, fill_ids, filler_from_lmlab
from lmlab.models import build_model
from lmlab.tokenizers import CharTokenizer
from lmlab.train import Trainer, TrainConfig


def gap_sets(n_windows: int, window: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per window: random 15% positions, and an 8-character span in the middle."""
    rng = np.random.default_rng(seed)
    scattered = [np.sort(rng.choice(window, size=max(1, round(0.15 * window)), replace=False)) for _ in range(n_windows)]
    span = [np.arange(window // 2 - 4, window // 2 + 4) for _ in range(n_windows)]
    return scattered, span


def fill_accuracy(model, windows: torch.Tensor, gaps: list[np.ndarray], order: str) -> float:
    right = total = 0
    logits_fn = lambda x: model(x)[0]  # noqa: E731
    for row, positions in zip(windows, gaps):
        masked = row.clone()
        masked[positions] = model.mask_id
        filled, _ = fill_ids(logits_fn, masked, model.mask_id, order=order, forbidden_ids=[0, 1, 2, 3])
        right += int((filled[positions] == row[positions]).sum())
        total += len(positions)
    return right / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--windows", type=int, default=200, help="validation windows to fill")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)

    text = read_corpus()
    tok = CharTokenizer.train(text)
    ids = np.asarray(tok.encode(text), dtype=np.uint16)
    train_ids, val_ids = split_by_position(ids, 0.1)
    block = 64
    torch.manual_seed(1337)
    model = build_model("masked-transformer", {"vocab_size": tok.vocab_size, "block_size": block, "n_layer": 4,
                                               "n_head": 4, "n_embd": 128, "bias": False})
    config = TrainConfig(max_iters=args.steps, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_iters=100,
                         eval_interval=max(1, args.steps // 4), eval_iters=20, progress=False)
    summary = Trainer(model, StreamBatches(train_ids, block, 32), StreamBatches(val_ids, block, 32), config,
                      out / "run", tokenizer=tok).fit()
    model.eval()

    starts = np.random.default_rng(0).choice(len(val_ids) - block, size=args.windows, replace=False)
    windows = torch.as_tensor(np.stack([val_ids[s:s + block] for s in starts]).astype(np.int64))
    scattered, span = gap_sets(args.windows, block, seed=1)
    rows = []
    with torch.no_grad():
        for order in ORDERS:
            t0 = time.perf_counter()
            rows.append({"order": order, "scattered_15pct": round(fill_accuracy(model, windows, scattered, order), 4),
                         "span_8": round(fill_accuracy(model, windows, span, order), 4),
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(rows[-1], flush=True)
        filler = filler_from_lmlab(model, tok)
        scored = windows[:50]
        pll = sum(filler.pseudo_log_likelihood(tok.decode(w.tolist())) for w in scored)
    pll_bpc = -pll / scored.numel() / math.log(2)
    example = filler.fill("To be, or not to be, that is the <mask><mask><mask><mask><mask><mask><mask><mask>:")
    result = {"train": {k: summary[k] for k in ("steps", "seconds", "val_loss", "parameters")},
              "fill": rows, "pseudo_ll_bits_per_char": round(pll_bpc, 4), "example": example.text,
              "threads": torch.get_num_threads()}
    (out / "masked_fill.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["train"]))
    print("| order | scattered 15% recovered | 8-char span recovered | seconds |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['order']} | {r['scattered_15pct']:.4f} | {r['span_8']:.4f} | {r['seconds']} |")
    print(f"pseudo-log-likelihood: {pll_bpc:.4f} bits/char; example: {example.text!r}")


if __name__ == "__main__":
    main()
