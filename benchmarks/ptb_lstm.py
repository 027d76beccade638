"""Word-level LSTM on Penn Treebank with Zaremba et al. (2014)'s recipe.

    python benchmarks/ptb_lstm.py --preset medium --device cuda --out runs/ptb-lstm-medium   # target <= 82.7 test ppl
    python benchmarks/ptb_lstm.py --preset small --epochs 1 --limit-tokens 50000 --out /tmp/ptb-smoke   # a CPU smoke run

Data: ../shared/data/ptb/ (10k vocabulary with <unk>), each line's words followed by
<eos>, as Zaremba et al. and PyTorch's word_language_model read it. Model: lmlab's
``lstm`` family (embedding -> dropout -> LSTM layers with dropout between -> dropout ->
linear), weights uniform in [-init, init]. Training: truncated backpropagation through
time: the training stream is cut into ``batch`` parallel streams, read ``bptt`` words at
a time, and the LSTM state is carried (detached) from one window to the next; the
loss is summed over the window's time steps and averaged over the batch, as in the
paper; plain SGD with its learning-rate schedule and gradient-norm clipping.
Evaluation: the whole validation/test stream read in order with the state carried
(batch 1), perplexity = exp(mean NLL per word, <eos> included).

Presets (Zaremba et al., Table 1: test perplexity small 114.5, medium 82.7, large 78.4):

| preset | layers x units | dropout | epochs | lr decay (after epoch) | bptt | init | clip |
|---|---|---|---|---|---|---|---|
| small  | 2 x 200  | 0    | 13 | 1/2 (4)     | 20 | 0.1  | 5  |
| medium | 2 x 650  | 0.5  | 39 | 1/1.2 (6)   | 35 | 0.05 | 5  |
| large  | 2 x 1500 | 0.65 | 55 | 1/1.15 (14) | 35 | 0.04 | 10 |
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from lmlab.models import build_model, save_model
from lmlab.models.base import State, atomic_write_text
from lmlab.tokenizers import WordTokenizer

PTB = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb"


@dataclass
class Recipe:
    hidden: int
    dropout: float
    epochs: int
    decay: float
    decay_after: int
    bptt: int
    init: float
    clip: float
    layers: int = 2
    batch: int = 20
    lr: float = 1.0


PRESETS = {
    "small": Recipe(hidden=200, dropout=0.0, epochs=13, decay=2.0, decay_after=4, bptt=20, init=0.1, clip=5.0),
    "medium": Recipe(hidden=650, dropout=0.5, epochs=39, decay=1.2, decay_after=6, bptt=35, init=0.05, clip=5.0),
    "large": Recipe(hidden=1500, dropout=0.65, epochs=55, decay=1.15, decay_after=14, bptt=35, init=0.04, clip=10.0),
}


def read_split(tok: WordTokenizer, path: Path) -> torch.Tensor:
    """Every line's words then <eos>, as one stream of ids."""
    ids: list[int] = []
    for line in path.read_text().splitlines():
        ids.extend(tok.encode(line.strip()))
        ids.append(tok.eos_id)
    return torch.tensor(ids, dtype=torch.long)


def detach(state: State) -> State:
    return State({k: v.detach() for k, v in state.tensors.items()}, 0)


@torch.no_grad()
def stream_perplexity(model, ids: torch.Tensor, device, chunk: int = 2000) -> float:
    """exp(mean NLL) of ids[1:] given everything before, read in order with the state carried."""
    model.eval()
    state, total = None, 0.0
    ids = ids.to(device)
    for start in range(0, len(ids) - 1, chunk):
        x = ids[start : start + chunk][None]
        y = ids[start + 1 : start + chunk + 1][None]
        x = x[:, : y.shape[1]]
        logits, state = model(x, state)
        total += float(F.cross_entropy(logits[0].float(), y[0], reduction="sum"))
    return math.exp(total / (len(ids) - 1))


def train_epoch(model, data: torch.Tensor, recipe: Recipe, lr: float) -> tuple[float, float]:
    """One pass of truncated BPTT over data (B, N); returns (mean NLL per word, words per second)."""
    model.train()
    state, total, words = None, 0.0, 0
    t0 = time.perf_counter()
    for i in range(0, data.shape[1] - 1, recipe.bptt):
        x = data[:, i : i + recipe.bptt]
        y = data[:, i + 1 : i + 1 + recipe.bptt]
        x = x[:, : y.shape[1]]
        logits, state = model(x, state)
        state = detach(state)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        model.zero_grad(set_to_none=True)
        (nll * y.shape[1]).backward()  # summed over time, averaged over the batch
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-lr)
        total += nll.item() * y.numel()
        words += y.numel()
    return total / words, words / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="medium")
    ap.add_argument("--epochs", type=int, help="override the preset's epochs")
    ap.add_argument("--limit-tokens", type=int, help="train on the first N training words only (smoke runs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=str(PTB))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    recipe = PRESETS[args.preset] if args.epochs is None else replace(PRESETS[args.preset], epochs=args.epochs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    data = Path(args.data)
    train_text = (data / "ptb.train.txt").read_text()
    tok = WordTokenizer.train(train_text)   # whitespace words; PTB's <unk> is the tokenizer's
    train = read_split(tok, data / "ptb.train.txt")
    valid, test = read_split(tok, data / "ptb.valid.txt"), read_split(tok, data / "ptb.test.txt")
    if args.limit_tokens:
        train = train[: args.limit_tokens]
    n = len(train) // recipe.batch
    train_streams = train[: n * recipe.batch].view(recipe.batch, n).to(device)
    print(f"vocabulary {tok.vocab_size} (PTB's 10,000 with <unk> and <eos>, plus lmlab's unused <pad>, <bos>); "
          f"{len(train):,} training words, {len(valid):,} validation, {len(test):,} test", flush=True)

    model = build_model("lstm", {"vocab_size": tok.vocab_size, "n_embd": recipe.hidden, "n_hidden": recipe.hidden,
                                 "n_layer": recipe.layers, "dropout": recipe.dropout, "block_size": recipe.bptt})
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-recipe.init, recipe.init)
    model.to(device)
    history = []
    t0 = time.perf_counter()
    for epoch in range(1, recipe.epochs + 1):
        lr = recipe.lr / recipe.decay ** max(0, epoch - recipe.decay_after)
        train_nll, wps = train_epoch(model, train_streams, recipe, lr)
        val_ppl = stream_perplexity(model, valid, device)
        history.append({"epoch": epoch, "lr": lr, "train_ppl": math.exp(train_nll), "val_ppl": val_ppl,
                        "words_per_second": wps, "seconds": time.perf_counter() - t0})
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in history[-1].items()}), flush=True)
    test_ppl = stream_perplexity(model, test, device)
    save_model(model.cpu(), out / "model")
    tok.save(out / "model" / "tokenizer.json")
    result = {"preset": args.preset, "recipe": asdict(recipe), "device": str(device),
              "parameters": model.num_parameters(), "test_ppl": test_ppl, "val_ppl": history[-1]["val_ppl"],
              "train_seconds": time.perf_counter() - t0, "history": history,
              "limit_tokens": args.limit_tokens}
    atomic_write_text(out / "result.json", json.dumps(result, indent=2) + "\n")
    print(f"test perplexity {test_ppl:.2f} (Zaremba et al. {args.preset}: "
          f"{ {'small': 114.5, 'medium': 82.7, 'large': 78.4}[args.preset] })")


if __name__ == "__main__":
    main()
