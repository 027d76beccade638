"""``lmlab demo``: train a char transformer on the bundled corpus, report, generate.

The configuration is nanoGPT's CPU setting for tiny Shakespeare (4 layers,
4 heads, 128 wide, block 64, batch 12, lr 1e-3 cosine to 1e-4, no dropout),
cut short by a time budget so the whole job fits in five minutes on 2 cores.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from lmlab.data import StreamBatches, read_corpus, split_by_position, ids_dtype
from lmlab.decode.generate import generate
from lmlab.decode.processors import build_processors
from lmlab.models import build_model
from lmlab.models.base import special_token_ids
from lmlab.models.transformer import TransformerConfig
from lmlab.score import stream_nll
from lmlab.tokenizers import CharTokenizer
from lmlab.train import Trainer, TrainConfig, resolve_device


def nanogpt_cpu_config(vocab_size: int) -> TransformerConfig:
    return TransformerConfig(vocab_size=vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128,
                             dropout=0.0, bias=False, tie_weights=True)


def fresh_run_dir(base: str | Path) -> Path:
    """``base`` if it does not exist yet, else ``base-1``, ``base-2``, ...: never overwrite a run."""
    base = Path(base)
    if not base.exists():
        return base
    i = 1
    while Path(f"{base}-{i}").exists():
        i += 1
    return Path(f"{base}-{i}")


def run_demo(out: str | Path = "runs/demo", seconds: float = 240.0, device: str = "auto", max_iters: int = 2000) -> dict:
    started = time.perf_counter()
    run_dir = fresh_run_dir(out)
    dev = resolve_device(device)
    torch.manual_seed(1337)
    print(f"lmlab demo: character-level transformer on tiny Shakespeare ({dev}); run directory {run_dir}")
    text = read_corpus()
    tokenizer = CharTokenizer.train(text)
    ids = np.asarray(tokenizer.encode(text), dtype=ids_dtype(tokenizer.vocab_size))
    train_ids, val_ids = split_by_position(ids, 0.1)
    print(f"corpus: {len(text):,} characters, vocabulary {tokenizer.vocab_size}, "
          f"{len(train_ids):,} train / {len(val_ids):,} validation tokens")
    config = nanogpt_cpu_config(tokenizer.vocab_size)
    model = build_model("transformer", config)
    print(f"model: {model.num_parameters():,} parameters")
    train_config = TrainConfig(max_iters=max_iters, batch_size=12, lr=1e-3, min_lr=1e-4, warmup_iters=100,
                               beta2=0.99, eval_interval=250, eval_iters=20, log_interval=10,
                               device=str(dev), time_budget=seconds)
    trainer = Trainer(model, StreamBatches(train_ids, 64, 12), StreamBatches(val_ids, 64, 12),
                      train_config, run_dir, tokenizer=tokenizer)
    summary = trainer.fit()
    model = trainer.model.eval()
    val_score = stream_nll(model, torch.as_tensor(val_ids.astype(np.int64)), window=64, stride=32, batch_size=256)
    prompts = ["ROMEO:", "JULIET:", "First Citizen:"]
    specials = list(special_token_ids(model, tokenizer).values())  # never in the stream
    processors = build_processors(suppress_tokens=specials, temperature=0.8)
    gens = generate(model, [tokenizer.encode(p) for p in prompts], 200, processors=processors,
                    tokenizer=tokenizer, seed=7)
    samples = [p + g.text for p, g in zip(prompts, gens)]
    result = {
        **summary,
        "val_nll_sliding": val_score.nll_per_token,
        "val_perplexity_sliding": val_score.perplexity,
        "val_bits_per_char": val_score.bits_per_token,
        "total_seconds": time.perf_counter() - started,
    }
    (run_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    (run_dir / "report.md").write_text(_report(result, samples, config))
    print()
    print(f"trained {summary['steps']} steps in {summary['seconds']:.0f} s ({summary['stop_reason']}), "
          f"{summary['tokens_per_second']:,.0f} tokens/s")
    print(f"validation loss (estimate) {summary['val_loss']:.4f}; best {summary['best_val_loss']:.4f} at step {summary['best_step']}")
    print(f"validation, every token scored (sliding window 64, stride 32): "
          f"{val_score.nll_per_token:.4f} nats/char, perplexity {val_score.perplexity:.2f}, "
          f"{val_score.bits_per_token:.3f} bits/char")
    for s in samples:
        print("-" * 60)
        print(s)
    print("-" * 60)
    print(f"report: {run_dir / 'report.md'}   loss plot: {run_dir / 'loss.png'}")
    return result


def _report(result: dict, samples: list[str], config: TransformerConfig) -> str:
    lines = [
        "# lmlab demo run",
        "",
        f"Character-level transformer ({config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, "
        f"block {config.block_size}; {result['parameters']:,} parameters) on tiny Shakespeare, 90/10 split by position.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| steps | {result['steps']} ({result['stop_reason']}) |",
        f"| training time | {result['seconds']:.1f} s on {result['device']} |",
        f"| throughput | {result['tokens_per_second']:,.0f} tokens/s |",
        f"| validation loss (estimate, 20 batches) | {result['val_loss']:.4f} |",
        f"| best validation loss | {result['best_val_loss']:.4f} (step {result['best_step']}) |",
        f"| validation NLL, every token (window 64, stride 32) | {result['val_nll_sliding']:.4f} nats/char |",
        f"| validation perplexity | {result['val_perplexity_sliding']:.3f} |",
        f"| validation bits per character | {result['val_bits_per_char']:.4f} |",
        "",
        "![loss](loss.png)",
        "",
        "## Samples (temperature 0.8)",
        "",
    ]
    for s in samples:
        lines += ["```", s, "```", ""]
    return "\n".join(lines)
