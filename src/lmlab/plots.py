"""Pictures: loss curves (more plots join here: attention, positions, next-token bars)."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(metrics_path: str | Path, out_path: str | Path) -> Path:
    """Train loss per logged step and train/val evaluation losses from a metrics.jsonl file."""
    steps, losses, evals = [], [], {"train": ([], []), "val": ([], [])}
    for line in Path(metrics_path).read_text().splitlines():
        record = json.loads(line)
        if "train_loss" in record:
            steps.append(record["step"])
            losses.append(record["train_loss"])
        for split in evals:
            if f"{split}_eval_loss" in record:
                evals[split][0].append(record["step"])
                evals[split][1].append(record[f"{split}_eval_loss"])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps:
        ax.plot(steps, losses, lw=0.8, alpha=0.5, label="train (batch)")
    for split, (xs, ys) in evals.items():
        if xs:
            ax.plot(xs, ys, marker="o", ms=3, label=f"{split} (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out_path)
    return out_path
