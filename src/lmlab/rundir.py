"""What keeps a run directory whole: one writer at a time, recovery after a kill,
metrics that match the checkpoints, and one-line errors when the disk says no.

- :class:`RunLock`: an exclusive advisory lock (``fcntl.flock``) on ``run/.lock``. The
  kernel drops it when the holder exits or dies, so a lock file left by a killed run never
  blocks; the file keeps the holder's pid for the message a second process gets.
- :func:`recover_run`: completes or undoes a checkpoint swap a killed process left half
  done (see :func:`lmlab.models.base.staged_directory`), deletes stale temporary files, and
  names the newest complete checkpoint.
- :class:`MetricsLog` writes ``metrics.jsonl`` one flushed line at a time, and
  :func:`truncate_metrics` cuts it back to a checkpoint's step when a run resumes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmlab.models.base import atomic_write_text, recover_staged

LOCK_FILE = ".lock"
SETTINGS_FILE = "settings.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = ("last", "best")
COMPLETE_MARK = "trainer.json"  # the last file a checkpoint writes
_STAGED_FILES = (METRICS_FILE, SETTINGS_FILE)  # written with atomic_write_text in the run directory


class RunDirectoryError(OSError):
    """A run directory that cannot be used: held by another process, unwritable, full, or gone."""


class RunLock:
    """An exclusive lock on ``run_dir/.lock``, taken without waiting."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise RunDirectoryError naming the holder's pid."""
        import fcntl

        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirectoryError(
                f"run directory {str(self.path.parent)!r} is in use by another run ({self.holder()}, "
                f"which holds {self.path}); wait for it to finish or stop it"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        try:  # for the message of the next process; no room for 8 bytes only loses the pid
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass

    def holder(self) -> str:
        try:
            text = self.path.read_text().strip()
        except OSError:
            text = ""
        return f"pid {text}" if text.isdigit() else "pid unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def checkpoint_step(directory: Path) -> int:
    """The step a checkpoint was taken at (-1 when it has no readable trainer.json)."""
    try:
        return int(json.loads((directory / COMPLETE_MARK).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def recover_run(run_dir: str | Path) -> Path | None:
    """Put ``last/`` and ``best/`` back in place after a kill at any point of a checkpoint
    swap, delete stale temporary directories and files, and return the newest complete
    checkpoint (``last/`` on a tie; None when the run holds none). Hold the run's lock."""
    run_dir = Path(run_dir)
    found = []
    for name in CHECKPOINTS:
        directory = recover_staged(run_dir / name, finished=lambda p: (p / COMPLETE_MARK).is_file(),
                                   newest=checkpoint_step)
        if directory is not None and (directory / COMPLETE_MARK).is_file():
            found.append(directory)
    for name in _STAGED_FILES:
        for stale in run_dir.glob(f".{name}.*.tmp"):
            stale.unlink()
    return max(found, key=checkpoint_step, default=None)


def truncate_metrics(path: str | Path, step: int) -> int:
    """Keep the lines of ``metrics.jsonl`` up to ``step`` (all written before the checkpoint of
    that step) and drop the rest, including a last line cut short by a kill. Rewrites the file
    atomically, only when something is dropped; returns the number of lines kept."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            record_step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            if number == len(lines) and not line.endswith("\n"):
                break  # the line a killed process was writing
            raise ValueError(f"{path}:{number} is not a metrics record (a JSON object with a step): {line[:80]!r}")
        if record_step > step:
            break
        kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))
    return len(kept)


class MetricsLog:
    """``metrics.jsonl`` opened for appending; each record is one line, on disk when
    :meth:`write` returns. A write that fails (no space) leaves the file as it was."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "ab", buffering=0)  # unbuffered: nothing left to flush at close

    def write(self, record: dict[str, Any]) -> None:
        data = memoryview((json.dumps(record) + "\n").encode("utf-8"))
        start = self._file.tell()
        try:
            while data:
                data = data[self._file.write(data):]
        except BaseException:
            try:
                self._file.truncate(start)
            except OSError:
                pass
            raise

    def close(self) -> None:
        self._file.close()
