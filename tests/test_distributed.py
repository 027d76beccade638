"""Training in several processes (torchrun, gloo on CPU) against training in one.

The runs of tests/distributed_worker.py are made once in 2 processes (one torchrun job) and
compared, case by case, with the same runs made here in this process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmlab
from distributed_worker import CASES, trainer

WORKER = Path(__file__).with_name("distributed_worker.py")
SRC = str(Path(lmlab.__file__).resolve().parents[1])


def run_python(args: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(got: Path, expected: Path, atol: float) -> None:
    """Every logged loss and every saved parameter of two run directories agree to ``atol``."""
    a, b = records(got), records(expected)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "train_eval_loss", "val_eval_loss"):
            assert (key in ra) == (key in rb)
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], abs=atol, rel=0), (key, ra["step"])
    wa, wb = load_file(got / "last" / "model.safetensors"), load_file(expected / "last" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=atol, msg=name)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two")
    done = run_python(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER), str(out)],
                      timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.mark.parametrize("case", ["transformer", "lstm", "mlp"])
def test_two_processes_train_exactly_as_one_with_the_same_global_batch(case, two_processes, tmp_path):
    # float64, 20 steps: the transformer and the MLP on windows of a stream, the LSTM on padded
    # sequences of different lengths (rows hold different numbers of targets) with 2 micro-steps
    assert CASES[case][4] is torch.float64
    torch.set_num_threads(1)
    trainer(case, tmp_path / case).fit()
    assert json.loads((two_processes / f"{case}.json").read_text()) == {
        "world_size": 2, "sharded": False, "parallel": "DistributedDataParallel"}
    assert len([r for r in records(tmp_path / case) if "train_loss" in r]) == 20
    assert_same_run(two_processes / case, tmp_path / case, atol=1e-6)


def test_fsdp_trains_as_one_process_to_float32_rounding(two_processes, tmp_path):
    # float32, not float64: FSDP2 keeps its flat shards in one dtype. Each rank's gradient is
    # that of half the batch, reduce-scattered (summed, halved) where one process has the whole
    # batch's gradient at once: the same value rounded differently, a few float32 ulps per
    # step, which Adam's division by sqrt(v) can enlarge to ~lr * 1e-4 on a weight. Measured
    # after 20 steps at lr 3e-3: 1.9e-6 on the weights, 3.6e-7 on the losses, while both ranks
    # taking the same rows already moves the first loss by 3e-3. The tolerance: 1e-5.
    torch.set_num_threads(1)
    trainer("fsdp", tmp_path / "fsdp").fit()
    assert json.loads((two_processes / "fsdp.json").read_text())["sharded"]
    saved = load_file(two_processes / "fsdp" / "last" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved.values())  # gathered whole: a single-process checkpoint
    assert_same_run(two_processes / "fsdp", tmp_path / "fsdp", atol=1e-5)


def test_a_checkpoint_of_two_processes_resumes_in_one_as_in_two(two_processes, tmp_path):
    import shutil

    shutil.copytree(two_processes / "half", tmp_path / "resumed1", ignore=shutil.ignore_patterns(".lock"))
    torch.set_num_threads(1)
    trainer("transformer", tmp_path / "resumed1", resume=True).fit()
    assert records(tmp_path / "resumed1")[-1]["step"] == 20
    assert_same_run(tmp_path / "resumed1", two_processes / "resumed2", atol=1e-6)
    # and both continue the uninterrupted run
    assert_same_run(tmp_path / "resumed1", two_processes / "transformer", atol=1e-6)
