import json

import numpy as np
import pytest
import torch

from lmlab.checkpoints import load_checkpoint
from lmlab.data import StreamBatches
from lmlab.models import build_model
from lmlab.models.transformer import TransformerConfig
from lmlab.tokenizers import CharTokenizer
from lmlab.train import Trainer, TrainConfig, learning_rate

TEXT = "the cat sat on the mat. the dog sat on the log. " * 40


def setup(dropout=0.1):
    tok = CharTokenizer.train(TEXT)
    ids = np.asarray(tok.encode(TEXT), dtype=np.uint16)
    n = int(len(ids) * 0.9)
    torch.manual_seed(0)
    model = build_model("transformer", TransformerConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1,
                                                         n_head=2, n_embd=16, dropout=dropout))
    return tok, model, StreamBatches(ids[:n], 16, 8), StreamBatches(ids[n:], 16, 8)


def config(**kw):
    base = dict(max_iters=20, batch_size=8, eval_interval=10, eval_iters=2, log_interval=5, warmup_iters=2, lr=3e-3,
                progress=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_batches_and_config_must_agree_on_the_batch_size(tmp_path):
    tok, model, train, val = setup()
    with pytest.raises(ValueError, match=r"train batches hold 8 rows but config.batch_size=12"):
        Trainer(model, train, val, config(batch_size=12), tmp_path / "run")
    with pytest.raises(ValueError, match=r"val batches hold 4 rows"):
        Trainer(model, train, StreamBatches(val.ids, 16, 4), config(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_training_lowers_the_loss_and_writes_a_run_directory(tmp_path):
    tok, model, train, val = setup()
    summary = Trainer(model, train, val, config(max_iters=60), tmp_path / "run", tokenizer=tok).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_eval_loss"] for r in records if "val_eval_loss" in r]
    assert evals[-1] < evals[0] - 0.5
    assert summary["steps"] == 60 and summary["best_val_loss"] == min(evals)
    for name in ("best", "last"):
        for f in ("config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors", "trainer.json"):
            assert (tmp_path / "run" / name / f).is_file()
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    loaded, loaded_tok = load_checkpoint(tmp_path / "run")
    assert loaded_tok.encode("the cat") == tok.encode("the cat")


def test_resume_is_exact(tmp_path):
    tok, model, train, val = setup(dropout=0.1)
    Trainer(model, train, val, config(max_iters=20, lr_decay_iters=20), tmp_path / "straight", tokenizer=tok).fit()
    straight = model.state_dict()

    tok, model2, train, val = setup(dropout=0.1)
    Trainer(model2, train, val, config(max_iters=10, lr_decay_iters=20), tmp_path / "resumed", tokenizer=tok).fit()
    tok, model3, train, val = setup(dropout=0.1)
    Trainer(model3, train, val, config(max_iters=20, lr_decay_iters=20), tmp_path / "resumed", tokenizer=tok, resume=True).fit()
    for name, tensor in model3.state_dict().items():
        torch.testing.assert_close(tensor, straight[name], rtol=0, atol=0, msg=name)


def test_existing_run_directory_is_refused_and_nothing_is_lost(tmp_path):
    tok, model, train, val = setup()
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists.*resume"):
        Trainer(model, train, val, config(), run, tokenizer=tok)
    assert (run / "notes.txt").read_text() == "keep me"


def test_resume_with_a_different_config_is_refused(tmp_path):
    tok, model, train, val = setup()
    Trainer(model, train, val, config(max_iters=10), tmp_path / "run", tokenizer=tok).fit()
    other = build_model("transformer", TransformerConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2,
                                                         n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="does not match"):
        Trainer(other, train, val, config(max_iters=20), tmp_path / "run", tokenizer=tok, resume=True)


def test_learning_rate_schedule():
    c = TrainConfig(max_iters=100, warmup_iters=10, lr=1.0, min_lr=0.1)
    assert learning_rate(0, c) == pytest.approx(1 / 11)
    assert learning_rate(10, c) == pytest.approx(1.0)
    assert learning_rate(55, c) == pytest.approx(0.55)
    assert learning_rate(100, c) == pytest.approx(0.1)
    assert learning_rate(150, c) == pytest.approx(0.1)


def test_padding_never_contributes_to_the_loss():
    from lmlab.data import pad_sequences
    from lmlab.train import lm_loss

    torch.manual_seed(0)
    model = build_model("transformer", TransformerConfig(vocab_size=9, block_size=16, n_layer=1, n_head=1, n_embd=8))
    x, y = pad_sequences([[4, 5, 6], [7]], 1, 2, 0)
    both = lm_loss(model, x, y)
    # the same sequences scored alone, weighted by their token counts
    l1 = lm_loss(model, *pad_sequences([[4, 5, 6]], 1, 2, 0))
    l2 = lm_loss(model, *pad_sequences([[7]], 1, 2, 0))
    torch.testing.assert_close(both, (4 * l1 + 2 * l2) / 6)
