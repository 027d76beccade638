"""A run directory survives kills, a second writer, a full or read-only disk and deletion."""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import lmlab.models.base as base
import lmlab.rundir as rundir
from lmlab.data import StreamBatches
from lmlab.models import build_model
from lmlab.models.transformer import TransformerConfig
from lmlab.rundir import RunDirectoryError, RunLock, checkpoint_step, recover_run, truncate_metrics
from lmlab.tokenizers import CharTokenizer
from lmlab.train import Trainer, TrainConfig
from lmlab.throughput import TIMED_FIELDS

TEXT = "the cat sat on the mat. the dog sat on the log. " * 40
SRC = Path(__file__).resolve().parents[1] / "src"


def setup():
    tok = CharTokenizer.train(TEXT)
    ids = np.asarray(tok.encode(TEXT), dtype=np.uint16)
    n = int(len(ids) * 0.9)
    torch.manual_seed(0)
    model = build_model("transformer", TransformerConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1,
                                                         n_head=2, n_embd=16, dropout=0.1))
    return tok, model, StreamBatches(ids[:n], 16, 8), StreamBatches(ids[n:], 16, 8)


def config(**kw):
    base_config = dict(max_iters=20, lr_decay_iters=20, batch_size=8, eval_interval=10, eval_iters=2, log_interval=5,
                       warmup_iters=2, lr=3e-3, progress=False, device="cpu")
    base_config.update(kw)
    return TrainConfig(**base_config)


def train(run, resume=False, **kw):
    tok, model, tr, va = setup()
    Trainer(model, tr, va, config(**kw), run, tokenizer=tok, resume=resume).fit()
    return model


def records(run):
    """metrics.jsonl without the wall-clock figures (times, tokens per second, MFU)."""
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMED_FIELDS} for line in lines]


def assert_same_weights(a, b):
    for name, tensor in a.state_dict().items():
        torch.testing.assert_close(tensor, b.state_dict()[name], rtol=0, atol=0, msg=name)


def leftovers(run):
    return sorted(p.name for p in Path(run).iterdir() if p.name.startswith(".") and p.name != ".lock")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster than two contending on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run of 20 steps: its weights and metrics."""
    run = tmp_path_factory.mktemp("straight") / "run"
    return train(run), records(run)


# ------------------------------------------------------------------ a kill at every point of a checkpoint


def kill_states(tmp_path):
    """Run 20 steps and copy the run directory just before every rename, directory removal and
    the two last file writes of the checkpoints at steps 0 and 10: what a kill -9 at that
    moment leaves on disk (a kill runs no cleanup, so copies are taken, not exceptions)."""
    run, snaps = tmp_path / "run", tmp_path / "states"
    tok, model, tr, va = setup()
    trainer = Trainer(model, tr, va, config(), run, tokenizer=tok)
    taken = []

    def snapshot(label):
        if trainer.step in (0, 10):
            dest = snaps / f"{len(taken):02d}-step{trainer.step}-{label}"
            shutil.copytree(run, dest, symlinks=True)
            taken.append(dest)

    real_rename, real_rmtree, real_replace = Path.rename, shutil.rmtree, os.replace

    def rename(self, target):
        snapshot(f"rename-{self.name}-to-{Path(target).name}")
        return real_rename(self, target)

    def rmtree(path, *a, **kw):
        if Path(path).name.endswith(".old"):
            snapshot(f"rmtree-{Path(path).name}")
        return real_rmtree(path, *a, **kw)

    def replace(src, dst, *a, **kw):
        if Path(dst).name in ("optimizer.safetensors", "trainer.json"):
            snapshot(f"write-{Path(dst).parent.name}-{Path(dst).name}")
        return real_replace(src, dst, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "rename", rename)
        mp.setattr(base.shutil, "rmtree", rmtree)
        mp.setattr(base.os, "replace", replace)
        trainer.fit()
    return taken


def test_resume_after_a_kill_at_any_point_of_a_checkpoint_is_exact(tmp_path, straight):
    weights, lines = straight
    states = kill_states(tmp_path)
    labels = " ".join(p.name for p in states)
    # every step of the swap was caught: first last/ and best/, and the replacement of both
    for label in ("step0-write-.best", "step0-rename-.best", "step0-rename-.last", "step10-rename-last-to-.last.old",
                  "step10-rename-.last", "step10-rmtree-.last.old", "step10-rename-best-to-.best.old"):
        assert label in labels, label
    unresumable = [s for s in states if max(checkpoint_step(p) for p in s.iterdir() if p.is_dir()) < 0]
    # only a kill while the very first checkpoint (best/ at step 0) is being written leaves nothing to resume
    assert len(unresumable) == 2 and all("step0-write-.best" in s.name for s in unresumable)
    for state in states:
        recovered = Path(state)
        if state in unresumable:  # killed before the first checkpoint was complete
            with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
                train(recovered, resume=True)
            assert leftovers(recovered) == []
            continue
        model = train(recovered, resume=True)
        assert_same_weights(model, weights)
        assert records(recovered) == lines, state.name  # no line twice, none missing
        assert leftovers(recovered) == [], state.name
        for name in ("last", "best"):
            assert (recovered / name / "trainer.json").is_file()


def test_a_kill_before_any_checkpoint_completes_leaves_nothing_to_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".best.x1.tmp").mkdir()
    (run / ".best.x1.tmp" / "model.safetensors").write_bytes(b"partial")
    tok, model, tr, va = setup()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        Trainer(model, tr, va, config(), run, tokenizer=tok, resume=True)
    assert leftovers(run) == []  # the stale temporary directory is gone


def test_recovery_picks_the_newest_complete_checkpoint(tmp_path):
    def checkpoint(path, step, complete=True):
        path.mkdir()
        if complete:
            (path / "trainer.json").write_text(json.dumps({"step": step}))

    run = tmp_path / "run"
    run.mkdir()
    checkpoint(run / ".last.old", 10)
    checkpoint(run / ".last.a.tmp", 20)
    checkpoint(run / ".last.b.tmp", 30, complete=False)
    checkpoint(run / "best", 10)
    (run / ".metrics.jsonl.c.tmp").write_text("{}")
    assert recover_run(run) == run / "last"
    assert checkpoint_step(run / "last") == 20
    assert leftovers(run) == []
    # a finished copy newer than the one in place replaces it; an older one is dropped
    checkpoint(run / ".last.d.tmp", 40)
    checkpoint(run / ".last.e.tmp", 5)
    assert recover_run(run) == run / "last" and checkpoint_step(run / "last") == 40
    assert leftovers(run) == []
    # best/ newer than last/ (last/ failed to save after best/): resume from best/
    shutil.rmtree(run / "best")
    checkpoint(run / "best", 50)
    assert recover_run(run) == run / "best"


def test_a_failed_swap_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(run, max_iters=10)
    before = (run / "last" / "model.safetensors").read_bytes()
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".last.") and self.name.endswith(".tmp"):
            raise OSError(errno.EIO, "Input/output error", str(self))
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(RunDirectoryError, match=r"cannot write .*\.last\..*\.tmp: Input/output error"):
        train(run, resume=True)
    assert (run / "last" / "model.safetensors").read_bytes() == before
    assert checkpoint_step(run / "last") == 10 and leftovers(run) == []


# ------------------------------------------------------------------ metrics


def test_metrics_are_on_disk_as_logged_and_cut_back_to_the_checkpoint(tmp_path, straight, monkeypatch):
    weights, lines = straight
    run = tmp_path / "run"
    tok, model, tr, va = setup()
    trainer = Trainer(model, tr, va, config(), run, tokenizer=tok)
    real_sample = StreamBatches.sample

    def sample(self, generator, device):
        if generator is trainer.generator and trainer.step == 16:
            assert records(run)[-1]["step"] == 15  # the line of step 15 is on disk before step 16 runs
            raise KeyboardInterrupt  # the run dies here
        return real_sample(self, generator, device)

    monkeypatch.setattr(StreamBatches, "sample", sample)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.undo()
    assert [r["step"] for r in records(run)] == [0, 5, 10, 10, 15]  # step 15 logged after the checkpoint of 10
    model = train(run, resume=True)
    assert records(run) == lines and len(lines) == 7
    assert_same_weights(model, weights)


def test_truncate_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 5}\n{"step": 10}\n{"step": 1')  # the last line cut by a kill
    assert truncate_metrics(path, 10) == 3
    assert path.read_text() == '{"step": 0}\n{"step": 5}\n{"step": 10}\n'
    assert truncate_metrics(path, 4) == 1 and path.read_text() == '{"step": 0}\n'
    path.write_text('{"step": 0}\nnot json\n{"step": 5}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a metrics record"):
        truncate_metrics(path, 10)


def test_resuming_a_finished_run_adds_no_line(tmp_path, straight):
    run = tmp_path / "run"
    train(run)
    train(run, resume=True)
    assert records(run) == straight[1]


# ------------------------------------------------------------------ one process per run directory


def test_a_second_trainer_on_the_same_directory_is_refused(tmp_path):
    run = tmp_path / "run"
    tok, model, tr, va = setup()
    first = Trainer(model, tr, va, config(max_iters=10), run, tokenizer=tok)
    for resume in (False, True):
        with pytest.raises(RunDirectoryError, match=rf"in use by another run \(pid {os.getpid()}"):
            Trainer(setup()[1], tr, va, config(max_iters=10), run, tokenizer=tok, resume=resume)
    first.fit()  # releases the lock
    train(run, resume=True, max_iters=20)


LONG_RUN = ["--corpus", "{corpus}", "--out", "{run}", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
            "--block-size", "16", "--batch-size", "4", "--eval-interval", "10", "--eval-iters", "2",
            "--log-interval", "5", "--lr-decay-iters", "5000", "--no-progress", "--device", "cpu"]


def lmlab(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmlab.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_a_second_lmlab_train_names_the_holder_and_a_kill_9_resumes_exactly(tmp_path, capsys):
    from lmlab.cli import main

    corpus, run = tmp_path / "corpus.txt", tmp_path / "run"
    corpus.write_text(TEXT)
    options = [a.format(corpus=corpus, run=run) for a in LONG_RUN]
    holder = lmlab("train", *options, "--max-iters", "5000")
    try:
        deadline = time.monotonic() + 120
        while not (run / "last" / "trainer.json").is_file():  # first checkpoint written, lock held
            assert holder.poll() is None, holder.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        capsys.readouterr()
        for second in ([*options, "--max-iters", "30"], ["--out", str(run), "--resume"]):  # this test's process
            assert main(["train", *second]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert err[-1].startswith(f"error: run directory {str(run)!r} is in use by another run (pid {holder.pid}")
        while max(r["step"] for r in records(run)) < 12:  # past the checkpoint of step 10
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        holder.kill()  # SIGKILL: no cleanup runs; the kernel drops the lock
        holder.communicate()
    candidates = [p for p in run.iterdir() if p.is_dir()]
    stopped = max(checkpoint_step(p) for p in candidates)
    assert stopped >= 10
    target = str(stopped + 10)
    assert main(["train", "--out", str(run), "--resume", "--max-iters", target]) == 0
    reference = tmp_path / "reference"
    assert main(["train", *[a.format(corpus=corpus, run=reference) for a in LONG_RUN], "--max-iters", target]) == 0
    assert records(run) == records(reference)
    from lmlab.models.base import load_model
    assert_same_weights(load_model(run / "last"), load_model(reference / "last"))


# ------------------------------------------------------------------ a disk that says no


class FullDisk:
    """A file whose writes put half the bytes on disk, then fail with ENOSPC."""

    def __init__(self, file):
        self._file = file

    def write(self, data):
        self._file.write(bytes(data)[: len(data) // 2])
        self._file.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def test_a_full_disk_while_checkpointing_damages_nothing(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(run, max_iters=10)
    last, metrics = (run / "last" / "model.safetensors").read_bytes(), (run / "metrics.jsonl").read_text()
    real_fdopen = os.fdopen
    monkeypatch.setattr(base.os, "fdopen", lambda fd, *a, **kw: FullDisk(real_fdopen(fd, *a, **kw)))
    with pytest.raises(RunDirectoryError) as info:
        train(run, resume=True)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message and str(run) in message
    assert "newest: step 10" in message
    assert (run / "last" / "model.safetensors").read_bytes() == last and leftovers(run) == []
    assert (run / "metrics.jsonl").read_text().startswith(metrics)
    monkeypatch.undo()
    train(run, resume=True)  # room again: the run goes on


def test_a_full_disk_while_logging_leaves_no_partial_line(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(run, max_iters=10)
    metrics = (run / "metrics.jsonl").read_text()
    real_open = open
    monkeypatch.setattr(rundir, "open", lambda *a, **kw: FullDisk(real_open(*a, **kw)), raising=False)
    with pytest.raises(RunDirectoryError, match=r"cannot write .*metrics.jsonl: No space left on device"):
        train(run, resume=True)
    assert (run / "metrics.jsonl").read_text() == metrics


def test_a_real_full_disk(tmp_path):
    """A 200 KiB tmpfs in a private mount namespace (needs unshare and mount, as root): room for
    best/ and last/ of step 0 (about 80 KiB each), not for the third copy a swap at step 10 needs."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp_path}"]).returncode != 0:
        pytest.skip("no private mount namespace here to make a small disk")
    corpus, run = tmp_path / "corpus.txt", tmp_path / "disk" / "run"
    corpus.write_text(TEXT)
    (tmp_path / "disk").mkdir()
    command = " ".join([sys.executable, "-m", "lmlab.cli", "train",
                        *[a.format(corpus=corpus, run=run) for a in LONG_RUN], "--max-iters", "20"])
    script = (f"mount -t tmpfs -o size=200k tmpfs {tmp_path / 'disk'} && {command}; rc=$?; "
              f"cp -r {run} {tmp_path / 'after'}; exit $rc")
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert lines[-1].startswith("error: cannot write ") and "No space left on device" in lines[-1]
    assert "Traceback" not in done.stderr
    after = tmp_path / "after"
    for name in ("last", "best"):
        assert (after / name / "trainer.json").is_file()  # complete checkpoints survived
    assert [json.loads(line) for line in (after / "metrics.jsonl").read_text().splitlines()]  # every line whole


def immutable(path):
    """Make ``path`` refuse new entries even to root (chattr +i), or say why not."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return lambda: path.chmod(0o755)
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("running as root, where chmod does not stop writes, and chattr +i is not available here")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_directory(tmp_path, capsys):
    from lmlab.cli import main

    run = tmp_path / "run"
    train(run, max_iters=10)
    last = (run / "last" / "model.safetensors").read_bytes()
    undo = immutable(run)
    try:
        with pytest.raises(RunDirectoryError, match=r"cannot write .*run/\.(best|last)\..*\.tmp: (Operation not permitted|Permission denied)"):
            train(run, resume=True)
        # a new run under a read-only directory: one line, nothing created
        corpus = tmp_path / "corpus.txt"
        corpus.write_text(TEXT)
        assert main(["train", *[a.format(corpus=corpus, run=run / "inner") for a in LONG_RUN], "--max-iters", "2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: cannot write {run / 'inner'}")
        assert not (run / "inner").exists()
    finally:
        undo()
    assert (run / "last" / "model.safetensors").read_bytes() == last and leftovers(run) == []


def test_a_run_directory_deleted_mid_run_is_not_recreated(tmp_path, monkeypatch):
    run = tmp_path / "run"
    tok, model, tr, va = setup()
    trainer = Trainer(model, tr, va, config(), run, tokenizer=tok)
    real_sample = StreamBatches.sample

    def sample(self, generator, device):
        if generator is trainer.generator and trainer.step == 12 and run.exists():
            shutil.rmtree(run)
        return real_sample(self, generator, device)

    monkeypatch.setattr(StreamBatches, "sample", sample)
    with pytest.raises(RunDirectoryError, match=r"run directory .*run' was deleted or replaced while training \(step 15\)"):
        trainer.fit()  # stops at the next write: the line of step 15
    assert not run.exists()


def test_a_run_directory_deleted_while_checkpointing_is_not_recreated(tmp_path, monkeypatch):
    import lmlab.train as train_mod

    run = tmp_path / "run"
    real_save = train_mod.save_model

    def save_model(model, directory, **kwargs):
        if directory.parent == run and directory.name.startswith(".last."):
            shutil.rmtree(run)  # gone between the temporary directory and its files
        return real_save(model, directory, **kwargs)

    monkeypatch.setattr(train_mod, "save_model", save_model)
    with pytest.raises(RunDirectoryError, match="cannot write"):
        train(run)
    assert not run.exists()


def test_the_lock_is_released_by_close_and_names_no_pid_when_unreadable(tmp_path):
    tmp_path.joinpath(".lock").write_text("")
    a, b = RunLock(tmp_path), RunLock(tmp_path)
    a.acquire()
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    with pytest.raises(RunDirectoryError, match=f"pid {os.getpid()}"):
        b.acquire()
    a.release()
    b.acquire()
    b.release()
