"""Small training runs shared by tests/test_distributed.py: the test runs them in one process,
and this file, started by torchrun, runs them in each of its processes.

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py OUT_DIR

writes OUT_DIR/<case>/ (a run directory) and OUT_DIR/<case>.json (how it was trained) for
every case in CASES, then the checkpoint runs: OUT_DIR/half (the transformer, 10 of 20
steps) and OUT_DIR/resumed2 (a copy of half resumed to 20 steps); OUT_DIR/fsdp_resumed
(the fsdp case to 10 steps, then resumed to 20); OUT_DIR/refusals.json (the errors of
rank 0 for values that differ between ranks and a batch that does not split).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from lmlab import distributed
from lmlab.data import SequenceBatches, StreamBatches
from lmlab.models import build_model
from lmlab.models.base import config_from_dict
from lmlab.tokenizers import CharTokenizer
from lmlab.train import TrainConfig, Trainer

TEXT = "the cat sat on the mat. the dog sat on the log. " * 40
NAMES = ["anna", "bob", "christina", "dave", "eve", "ferdinand", "gus", "hildegard", "io", "maximiliane"]
TOKENIZER = CharTokenizer.train(TEXT + "".join(NAMES))

# case: (family, model settings, data, training settings, dtype)
CASES = {
    "transformer": ("transformer", dict(n_layer=2, n_head=2, n_embd=16), "stream", {}, torch.float64),
    "lstm": ("lstm", dict(n_embd=8, n_hidden=16), "sequences", dict(grad_accum=2), torch.float64),
    "mlp": ("mlp", dict(context=3, n_embd=8, n_hidden=16), "stream", {}, torch.float64),
    "fsdp": ("transformer", dict(n_layer=2, n_head=2, n_embd=16), "stream", dict(fsdp=True), torch.float32),
}


def trainer(case: str, run_dir: Path, max_iters: int = 20, resume: bool = False) -> Trainer:
    """The Trainer of ``case`` (the same initial weights, data and settings in every process)."""
    family, model_settings, data, train_settings, dtype = CASES[case]
    if data == "stream":
        ids = np.asarray(TOKENIZER.encode(TEXT), dtype=np.int64)
        n = int(len(ids) * 0.9)
        train, val = StreamBatches(ids[:n], 16, 8), StreamBatches(ids[n:], 16, 8)
        block = 16
    else:
        seqs = [TOKENIZER.encode(name) for name in NAMES]
        make = lambda rows: SequenceBatches(rows, 8, TOKENIZER.bos_id, TOKENIZER.eos_id, TOKENIZER.pad_id)  # noqa: E731
        train, val = make(seqs[:8]), make(seqs[8:])
        block = max(len(s) for s in seqs) + 1
    torch.manual_seed(0)
    model = build_model(family, config_from_dict(family, {"vocab_size": TOKENIZER.vocab_size, "block_size": block,
                                                          **model_settings}))
    model.to(dtype)
    config = TrainConfig(max_iters=max_iters, lr_decay_iters=20, batch_size=8, eval_interval=10, eval_iters=2,
                         log_interval=1, warmup_iters=2, lr=3e-3, progress=False, device="cpu",
                         **train_settings)
    return Trainer(model, train, val, config, run_dir, tokenizer=TOKENIZER, resume=resume)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    distributed.setup("cpu")
    try:
        refusals = []
        for check in (lambda: distributed.check_same_on_every_rank(f"rank {distributed.rank()}", "a value"),
                      lambda: distributed.check_batch_size(7)):
            try:
                check()
            except ValueError as e:
                refusals.append(str(e))
        if distributed.is_main():
            (out / "refusals.json").write_text(json.dumps(refusals))
        for case in CASES:
            run = trainer(case, out / case)
            run.fit()
            if distributed.is_main():
                how = {"world_size": distributed.world_size(), "sharded": distributed.is_sharded(run.parallel),
                       "parallel": type(run.parallel).__name__, "fused_adamw": run.optimizer.defaults["fused"]}
                (out / f"{case}.json").write_text(json.dumps(how))
        trainer("transformer", out / "half", max_iters=10).fit()
        if distributed.is_main():
            shutil.copytree(out / "half", out / "resumed2", ignore=shutil.ignore_patterns(".lock"))
        distributed.barrier()
        trainer("transformer", out / "resumed2", resume=True).fit()
        trainer("fsdp", out / "fsdp_resumed", max_iters=10).fit()
        trainer("fsdp", out / "fsdp_resumed", resume=True).fit()
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
