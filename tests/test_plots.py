"""Pictures: files are written, shapes are checked, attention weights come from the model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmlab.models import build_model
from lmlab.models.transformer import TransformerConfig
from lmlab.plots import (
    attention_for_text,
    plot_attention,
    plot_loss_curves,
    plot_position_similarity,
    position_similarity,
)
from lmlab.reference import TransformerLM
from lmlab.tokenizers import CharTokenizer

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG


@pytest.mark.parametrize("layout", ["interleaved", "concat"])
def test_position_similarity(layout, tmp_path):
    sim = position_similarity(12, 16, layout)
    assert sim.shape == (12, 12)
    np.testing.assert_allclose(np.diag(sim), 8.0)                    # |p|^2 = dim / 2
    np.testing.assert_allclose(sim[3, 5], sim[6, 8])                  # depends on i - j only
    out = plot_position_similarity(12, 16, layout, tmp_path / "pos.png")
    assert is_png(out)


def test_position_similarity_errors(tmp_path):
    with pytest.raises(ValueError, match="layout='spiral'"):
        plot_position_similarity(8, 16, "spiral", tmp_path / "x.png")
    with pytest.raises(ValueError, match="even dim"):
        plot_position_similarity(8, 15, "concat", tmp_path / "x.png")


def test_plot_attention_one_and_many_heads(tmp_path):
    tokens = list("to be$ \n")
    w = np.tril(np.ones((8, 8)))
    w /= w.sum(-1, keepdims=True)
    assert is_png(plot_attention(tokens, w, tmp_path / "one.png", title="one head"))
    assert is_png(plot_attention(tokens, torch.tensor(np.stack([w] * 3)), tmp_path / "three.png"))
    with pytest.raises(ValueError, match=r"shape \(3, 7, 7\); expected \(8, 8\) or \(H, 8, 8\)"):
        plot_attention(tokens, np.zeros((3, 7, 7)), tmp_path / "bad.png")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = CharTokenizer.train("hello world, how are you")
    model = build_model("transformer", TransformerConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2,
                                                         n_head=2, n_embd=16))
    return model, tok


def test_attention_for_text(tiny, tmp_path):
    model, tok = tiny
    model.train()
    tokens, w = attention_for_text(model, tok, "hello world", layer=1)
    assert model.training                                              # mode restored
    assert tokens == list("hello world") and w.shape == (2, 11, 11)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(w, 1) == 0)                                  # causal
    with torch.no_grad():
        _, state = model.eval()(torch.tensor([tok.encode("hello world")]), return_attention=True)
    np.testing.assert_allclose(w, state.tensors["attention1"][0].numpy())
    assert is_png(plot_attention(tokens, w, tmp_path / "attn.png", title="layer 1"))
    # longer than the context: the last block_size tokens
    tokens, w = attention_for_text(model, tok, "hello world, how are you", layer=-1)
    assert "".join(tokens) == "hello world, how are you"[-16:] and w.shape == (2, 16, 16)
    with pytest.raises(ValueError, match="layer=2 is out of range.*2 layers"):
        attention_for_text(model, tok, "hello", layer=2)


def test_attention_for_text_numpy_engine():
    tok = CharTokenizer.train("abc")
    engine = TransformerLM.random(tok.vocab_size, d_model=8, n_layers=1, n_heads=2, seed=0)
    tokens, w = attention_for_text(engine, tok, "abcab", layer=0)
    assert tokens == list("abcab") and w.shape == (2, 5, 5)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)


def test_plot_loss_curves(tmp_path):
    records = [{"step": s, "train_loss": 3.0 - s / 10} for s in range(10)]
    records += [{"step": 9, "train_eval_loss": 2.1, "val_eval_loss": 2.3}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert is_png(plot_loss_curves(tmp_path / "metrics.jsonl", tmp_path / "loss.png"))


def test_gradient_flow_curves_and_the_plot_command(tmp_path, capsys):
    """The tanh RNN's gradient dies out faster than the LSTM's (forget bias +1); the command writes a PNG."""
    from lmlab.cli import main
    from lmlab.plots import gradient_flow

    curves = gradient_flow(steps=30, hidden=16, seed=0)
    (rnn_label, rnn), (lstm_label, lstm) = curves.items()
    assert rnn_label == "tanh RNN" and lstm_label.startswith("LSTM") and rnn.shape == lstm.shape == (30,)
    # from the last step back to the first, the RNN loses far more of the gradient than the LSTM
    assert rnn[0] / rnn[-1] < 1e-3 * (lstm[0] / lstm[-1])
    out = tmp_path / "flow.png"
    assert main(["plot", "gradient-flow", "--out", str(out), "--steps", "20", "--hidden", "8"]) == 0
    assert is_png(out) and capsys.readouterr().out.strip() == str(out)
    assert main(["plot", "gradient-flow", "--out", str(out), "--steps", "0"]) == 2
    assert "steps=0" in capsys.readouterr().err
