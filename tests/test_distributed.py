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


def test_processes_that_would_train_different_things_are_refused(two_processes):
    assert json.loads((two_processes / "refusals.json").read_text()) == [
        "a value of rank(s) 1 differ(s) from rank 0's; every process must read the same data and options "
        "(on several machines: the same files at the same path)",
        "batch_size=7 (the global batch) does not split evenly over 2 processes; use a multiple of 2",
    ]


@pytest.mark.parametrize("case", ["transformer", "lstm", "mlp"])
def test_two_processes_train_exactly_as_one_with_the_same_global_batch(case, two_processes, tmp_path):
    # float64, 20 steps: the transformer and the MLP on windows of a stream, the LSTM on padded
    # sequences of different lengths (rows hold different numbers of targets) with 2 micro-steps;
    # the fused AdamW (the default on a CPU) in both
    assert CASES[case][4] is torch.float64
    torch.set_num_threads(1)
    trainer(case, tmp_path / case).fit()
    assert json.loads((two_processes / f"{case}.json").read_text()) == {
        "world_size": 2, "sharded": False, "parallel": "DistributedDataParallel", "fused_adamw": True}
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
    # the full checkpoint is sharded again on resume: the same run as without the stop
    assert_same_run(two_processes / "fsdp_resumed", two_processes / "fsdp", atol=1e-6)


def test_a_checkpoint_of_two_processes_resumes_in_one_as_in_two(two_processes, tmp_path):
    import shutil

    shutil.copytree(two_processes / "half", tmp_path / "resumed1", ignore=shutil.ignore_patterns(".lock"))
    torch.set_num_threads(1)
    trainer("transformer", tmp_path / "resumed1", resume=True).fit()
    assert records(tmp_path / "resumed1")[-1]["step"] == 20
    assert_same_run(tmp_path / "resumed1", two_processes / "resumed2", atol=1e-6)
    # and both continue the uninterrupted run
    assert_same_run(tmp_path / "resumed1", two_processes / "transformer", atol=1e-6)


# ------------------------------------------------------------------ the command, faults, two nodes

TRAIN = ["--model", "transformer", "--block-size", "16", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
         "--batch-size", "4", "--eval-iters", "1", "--log-interval", "1", "--device", "cpu", "--no-progress"]


def checkpoint_step(run: Path) -> int:
    try:
        return json.loads((run / "last" / "trainer.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return -1


def workers_of(agent_pid: int) -> dict[int, int]:
    """{rank: pid} of the processes torchrun's agent ``agent_pid`` started (Linux /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == agent_pid:
                env = (stat.parent / "environ").read_bytes().split(b"\0")
                rank = [int(v[5:]) for v in env if v.startswith(b"RANK=")]
                if rank:
                    found[rank[0]] = int(stat.parent.name)
        except (OSError, ValueError, IndexError):
            continue
    return found


def wait_for(condition, process: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not condition() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition(), f"the run stopped or stalled before the moment the test waits for:\n{log.read_text()[-3000:]}"


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers' pids in /proc")
def test_a_killed_rank_restarts_from_the_last_checkpoint_then_stops_the_job_with_its_name(tmp_path):
    import signal

    run = tmp_path / "run"
    args = ["--nproc-per-node", "2", "--max-restarts", "1", "--out", str(run), *TRAIN, "--max-iters", "5000",
            "--eval-interval", "10"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        agent = subprocess.Popen([sys.executable, "-m", "lmlab", "train", *args], env=env, stdout=subprocess.DEVNULL,
                                 stderr=stderr)
    try:
        wait_for(lambda: checkpoint_step(run) >= 10, agent, log)
        first = workers_of(agent.pid)
        os.kill(first[1], signal.SIGKILL)
        # the restarted workers resume from last/ and train on past it
        killed_at = checkpoint_step(run)
        wait_for(lambda: (w := workers_of(agent.pid)) and w.keys() == {0, 1} and w[1] != first[1], agent, log)
        wait_for(lambda: checkpoint_step(run) >= killed_at + 20, agent, log)
        os.kill(workers_of(agent.pid)[1], signal.SIGKILL)  # no restart left: the job stops
        agent.wait(timeout=120)
    finally:
        if agent.poll() is None:
            agent.terminate()  # torchrun's agent stops its workers on SIGTERM
            agent.wait(timeout=60)
    assert agent.returncode == 2, log.read_text()[-3000:]
    last_line = log.read_text().strip().splitlines()[-1]
    assert last_line.startswith("error: the distributed run stopped: rank 1 (pid ") and "SIGKILL" in last_line
    step = checkpoint_step(run)
    assert step >= 30 and step % 10 == 0
    from lmlab.checkpoints import load_checkpoint

    load_checkpoint(run / "last")  # whole
    # one process resumes the two processes' run; the steps after each checkpoint were cut and trained again
    resumed = run_python(["-m", "lmlab", "train", "--out", str(run), "--resume", "--max-iters", str(step + 3)],
                         timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in records(run) if "train_loss" in r] == list(range(1, step + 4))


def test_two_nodes_on_one_machine_train_as_one_process(tmp_path):
    # two torchrun agents meet through c10d rendezvous on 127.0.0.1, one process each (2 cores)
    import socket

    from lmlab.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "lmlab-test",
                               "-m", "lmlab", "train", "--out", str(tmp_path / "two"), *TRAIN, "--max-iters", "12",
                               "--eval-interval", "6"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        outcomes = [node.communicate(timeout=180) for node in nodes]
    except subprocess.TimeoutExpired:  # say where each node was, not only that one of them hung
        for node in nodes:
            node.kill()
        tails = [node.communicate()[1][-2000:] for node in nodes]
        pytest.fail("the two torchrun nodes did not finish in 180 s; their stderr:\n" + "\n-----\n".join(tails))
    for node, (_, err) in zip(nodes, outcomes):
        assert node.returncode == 0, err[-3000:]
    torch.set_num_threads(1)
    assert main(["train", "--out", str(tmp_path / "one"), *TRAIN, "--max-iters", "12", "--eval-interval", "6"]) == 0
    a, b = records(tmp_path / "two"), records(tmp_path / "one")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "val_eval_loss"):
            if key in rb:
                assert ra[key] == pytest.approx(rb[key], abs=1e-5)


def test_the_launcher_runs_the_command_without_its_own_options():
    from lmlab.distributed import without_options

    argv = ["train", "--nproc-per-node=2", "--out", "run", "--max-restarts", "1", "--nproc-per-node-x", "3"]
    assert without_options(argv, ("--nproc-per-node", "--max-restarts")) == ["train", "--out", "run",
                                                                                 "--nproc-per-node-x", "3"]
