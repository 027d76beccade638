"""Pictures: loss curves, sinusoidal position similarity, attention heatmaps, gradient flow through time."""

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


# ---------------------------------------------------------------- positions and attention


def _save(fig, out_path: str | Path) -> Path:
    """Write ``fig`` to ``out_path`` via a temporary file (never half-written) and close it."""
    plt = _pyplot()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp" + (out_path.suffix or ".png"))
    fig.savefig(tmp, dpi=120, format=(out_path.suffix[1:] or "png"))
    plt.close(fig)
    tmp.replace(out_path)
    return out_path


def position_similarity(n_positions: int, dim: int, layout: str = "interleaved"):
    """(n_positions, n_positions) inner products p_i . p_j of sinusoidal encodings (float64 numpy)."""
    from lmlab.reference.transformer import sinusoidal_table

    if int(n_positions) < 1:
        raise ValueError(f"n_positions={n_positions} must be a positive integer")
    table = sinusoidal_table(int(n_positions), int(dim), layout)
    return table @ table.T


def plot_position_similarity(n_positions: int, dim: int, layout: str = "interleaved",
                             out_path: str | Path = "position_similarity.png") -> Path:
    """Heatmap of the inner products of all pairs of sinusoidal position encodings.

    ``layout``: "interleaved" (sin, cos, sin, ...) or "concat" ([sin | cos]); the inner
    product p_i . p_j = sum_k cos((i - j) w_k) is the same for both, so the picture shows that
    sinusoidal similarity depends only on the distance i - j.
    """
    sim = position_similarity(n_positions, dim, layout)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(sim, cmap="viridis", origin="upper", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="p_i · p_j")
    ax.set_xlabel("position j")
    ax.set_ylabel("position i")
    ax.set_title(f"sinusoidal positions ({layout}, dim {dim}): similarity")
    fig.tight_layout()
    return _save(fig, out_path)


def plot_attention(tokens: list[str], weights, out_path: str | Path, title: str | None = None) -> Path:
    """Attention weights as a heatmap, queries (rows) and keys (columns) labelled with ``tokens``.

    ``weights``: (T, T) for one head or (H, T, T) for several (drawn as a grid, one panel per
    head); a numpy array or a torch tensor; T = len(tokens).
    """
    from lmlab.reference.ops import to_numpy

    import numpy as np

    w = np.asarray(to_numpy(weights), dtype=np.float64)
    T = len(tokens)
    if w.ndim == 2:
        w = w[None]
    if w.ndim != 3 or w.shape[1:] != (T, T):
        raise ValueError(f"weights have shape {tuple(np.shape(to_numpy(weights)))}; expected ({T}, {T}) or "
                         f"(H, {T}, {T}) for {T} tokens")
    H = w.shape[0]
    cols = int(np.ceil(np.sqrt(H)))
    rows = int(np.ceil(H / cols))
    size = max(3.0, 0.22 * T + 1.5)
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False, layout="constrained")
    labels = [_token_label(t) for t in tokens]
    fontsize = 8 if T <= 32 else 6 if T <= 64 else 4
    im = None
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.axis("off")
            continue
        im = ax.imshow(w[h], cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks(range(T))
        ax.set_yticks(range(T))
        ax.set_xticklabels(labels, rotation=90, fontsize=fontsize)
        ax.set_yticklabels(labels, fontsize=fontsize)
        if H > 1:
            ax.set_title(f"head {h}", fontsize=9)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    if title:
        fig.suptitle(title)
    return _save(fig, out_path)


def attention_for_text(model, tokenizer, text: str, layer: int = 0):
    """(tokens, weights): the attention of ``layer`` over ``text``, ready for ``plot_attention``.

    ``model``: an lmlab transformer (``model(ids, return_attention=True)``) or a numpy
    ``lmlab.reference.TransformerLM``. ``tokens`` are the vocabulary entries
    (``tokenizer.id_to_token``) of ``tokenizer.encode(text)``; ``weights`` is a numpy
    array (H, T, T). Texts longer than the model's context keep their last tokens.
    """
    import numpy as np

    ids = list(tokenizer.encode(text))
    if not ids:
        raise ValueError(f"text {text!r} encodes to no tokens")
    limit = getattr(model, "max_context", None)
    if limit is not None and len(ids) > limit:
        ids = ids[-limit:]
    n_layers = _n_layers(model)
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer={layer} is out of range for a model with {n_layers} layers (0..{n_layers - 1})")
    layer %= n_layers
    from lmlab.reference.transformer import TransformerLM

    if isinstance(model, TransformerLM):
        _, state = model(np.asarray([ids]), return_attention=True)
        weights = state.attention[layer][0]
    else:
        import inspect

        import torch

        if "return_attention" not in inspect.signature(model.forward).parameters:
            raise ValueError(f"{type(model).__name__} does not return attention weights; "
                             "attention_for_text needs a transformer")
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                _, state = model(torch.tensor([ids], device=model.device), return_attention=True)
        finally:
            model.train(was_training)
        weights = state.tensors[f"attention{layer}"][0].float().cpu().numpy()
    tokens = [tokenizer.id_to_token(int(i)) for i in ids]
    return tokens, np.asarray(weights)


def _n_layers(model) -> int:
    if hasattr(model, "n_layers"):
        return int(model.n_layers)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "n_layer"):
        return int(config.n_layer)
    raise ValueError(f"{type(model).__name__} has no layers to take attention from; "
                     "attention_for_text needs a transformer")


def _token_label(token: str) -> str:
    """A visible tick label: spaces as ␣, newlines and tabs escaped, $ kept literal (no mathtext)."""
    if token == "":
        return "∅"
    return token.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t").replace("$", r"\$")


# ---------------------------------------------------------------- gradient flow through time


def gradient_flow(steps: int = 50, hidden: int = 32, vocab: int = 20, seed: int = 0,
                  forget_bias: float = 1.0) -> dict:
    """{label: ||dL/dh_t|| for t = 1..steps} for a tanh RNN and an LSTM of the same width on
    the same random input, L the cross-entropy at the last step only (numpy engine, BPTT by hand).

    Both get PyTorch's init U(-1/sqrt(H), 1/sqrt(H)); the LSTM's forget-gate bias is raised by
    ``forget_bias`` (the customary 1: f starts near sigmoid(1) = 0.73, not 0.5).
    """
    import numpy as np

    from lmlab.reference.bptt import hidden_gradient_norms
    from lmlab.reference.recurrent import RecurrentLM

    if int(steps) < 1 or int(hidden) < 1 or int(vocab) < 2:
        raise ValueError(f"steps={steps}, hidden={hidden}, vocab={vocab}: need steps >= 1, hidden >= 1, vocab >= 2")
    rng = np.random.default_rng(seed)
    ids, target = rng.integers(0, vocab, int(steps)), int(rng.integers(0, vocab))
    rnn = RecurrentLM.random("rnn", vocab, hidden, 1, embed_dim=hidden, seed=seed)
    lstm = RecurrentLM.random("lstm", vocab, hidden, 1, embed_dim=hidden, seed=seed)
    lstm.weights["l0.bx_f"] = lstm.weights["l0.bx_f"] + forget_bias
    return {"tanh RNN": hidden_gradient_norms(rnn, ids, target),
            f"LSTM (forget bias +{forget_bias:g})": hidden_gradient_norms(lstm, ids, target)}


def plot_gradient_flow(curves: dict, out_path: str | Path, title: str | None = None) -> Path:
    """||dL/dh_t|| against t, one line per entry of ``curves`` ({label: (T,) norms}), log scale."""
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, norms in curves.items():
        norms = np.asarray(norms, dtype=np.float64)
        ax.semilogy(np.arange(1, norms.size + 1), norms, marker=".", ms=3, label=label)
    ax.set_xlabel("step t (the loss is at the last step)")
    ax.set_ylabel("||dL/dh_t||")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(title or "gradient flow back through time")
    fig.tight_layout()
    return _save(fig, out_path)
