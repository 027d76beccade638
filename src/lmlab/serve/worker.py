"""The decoding loop in a process of its own, behind the ``Scheduler``'s interface.

    scheduler = WorkerScheduler(model, tokenizer, max_batch=16)   # starts the process
    scheduler.read_on(loop)     # optional, first: messages read by this asyncio loop, not a reader thread
    scheduler.submit(job)       # as Scheduler.submit: job.on_event / on_done run here (reader thread or loop)
    scheduler.call(fn, *args)   # fn(model, tokenizer, *args) in the process, between two steps: a Future
    scheduler.cancel(job)
    scheduler.close()           # the process ends; no orphan is left

Why: in one process the decoding loop and the HTTP layer (JSON, server-sent events, asyncio)
share one interpreter lock, so the per-token work of one waits for the other's. Here the
process (started with ``spawn``) runs a ``Scheduler`` on the model. One pipe carries job
descriptions to it; another brings back, once per pass of the loop, that pass's token events
and finished jobs (token ids and log-probabilities: the text is made by the caller), pickled
plainly: multiprocessing's own pickler (torch's shared-memory reductions in its dispatch table)
costs about 2.5 times more per small message. Events cross only for jobs that have an
``on_event``. The model's tensors go to the process through shared memory
(``torch.multiprocessing``), not copied; ``fn`` must be a module-level function (it is pickled
by name).

Who reads what comes back: a reader thread, started with the first submit or call; or, after
``read_on(loop)``, the asyncio event loop ``loop`` itself (``loop.add_reader``), so that the
callbacks run on the loop's thread and each pass of the decoding loop wakes one thread of the
caller, not a reader thread and then the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pickle
import signal
import sys
import threading
from concurrent.futures import Future
from typing import Callable

import torch
import torch.multiprocessing as mp

from lmlab.models.base import require_causal
from lmlab.serve.scheduler import Job, Scheduler, TokenEvent, _done, batching_policy, check_job, check_max_batch

__all__ = ["WorkerScheduler", "default_worker_threads"]

# What the process needs of a job (the callbacks and the Event stay with the caller).
_JOB_FIELDS = ("prompt_ids", "max_new_tokens", "processors", "do_sample", "seed", "eos_id", "stop_strings", "n",
               "alternatives")


def default_worker_threads() -> int:
    """Torch threads of the decoding process: every core but one, which the HTTP process needs
    for its own per-token work (JSON, server-sent events); at least one."""
    return max(1, (os.cpu_count() or 1) - 1)


class WorkerScheduler:
    """``Scheduler``'s interface (submit, call, cancel, close, steps, running_rows, policy) over
    a decoding process (see the module docstring). ``threads``: torch threads of that process.
    ``on_iteration()``, when given, is called where the messages are read (see ``read_on``) after
    the events and ends of one pass of the loop have been handed out (as ``Scheduler``'s), and
    once more at the end."""

    def __init__(self, model, tokenizer, max_batch: int = 16, threads: int | None = None,
                 start_timeout: float = 300.0, on_iteration: Callable[[], None] | None = None) -> None:
        require_causal(model, "serving")
        self.max_batch = check_max_batch(max_batch)
        self.threads = default_worker_threads() if threads is None else threads
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        self.steps = 0
        self._on_iteration = on_iteration
        self._jobs: dict[int, Job] = {}
        self._calls: dict[int, Future] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _jobs, _calls, _closed, the sending end and who reads
        self._closed = False
        self._reader: threading.Thread | None = None
        self._reader_loop: asyncio.AbstractEventLoop | None = None
        self._gone = False  # the end of the process's messages has been read
        context = mp.get_context("spawn")
        self._from_worker, child_out = context.Pipe(duplex=False)
        child_in, self._to_worker = context.Pipe(duplex=False)
        self._process = context.Process(target=_serve_jobs,
                                        args=(child_in, child_out, model, tokenizer, self.max_batch, self.threads),
                                        name="lmlab-decoder", daemon=True)
        with _main_script_hidden():
            self._process.start()
        child_in.close()
        child_out.close()
        if not self._from_worker.poll(start_timeout):
            self._stop_process()
            raise RuntimeError(f"the decoding process did not start within {start_timeout:.0f} s")
        try:
            message = self._from_worker.recv()
        except EOFError:
            self._stop_process()
            raise RuntimeError(f"the decoding process exited at start (code {self._process.exitcode}); "
                               "its error is printed above") from None
        if message[0] != "ready":
            self._stop_process()
            raise RuntimeError(f"the decoding process could not start: {message[1]}")
        self.batchable = message[1]

    @property
    def policy(self) -> str:
        return batching_policy(self.batchable)

    @property
    def running_rows(self) -> int:
        """Rows of the jobs submitted and not finished yet (waiting ones included)."""
        with self._lock:
            return sum(job.n for job in self._jobs.values())

    def read_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the process's messages on the event loop ``loop`` (call it on that loop's thread,
        before the first submit or call): the jobs' callbacks, the calls' futures and
        ``on_iteration`` then run there. ``close`` must then be called on that thread too, or once
        the loop has stopped. Again with the same loop: nothing; with another one: the reading
        moves there, once the first loop has stopped."""
        with self._lock:
            if self._reader_loop is loop:
                return
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if self._reader is not None:
                raise RuntimeError("read_on must come before the first submit or call")
            previous = self._reader_loop
            if previous is not None:
                if previous.is_running():
                    raise RuntimeError("the messages are read on another event loop, which is still running")
                if not previous.is_closed():
                    previous.remove_reader(self._from_worker.fileno())
            self._reader_loop = loop
            if not self._gone:
                loop.add_reader(self._from_worker.fileno(), self._read_one)

    def submit(self, job: Job) -> Job:
        check_job(job, self.max_batch)
        fields = {name: getattr(job, name) for name in _JOB_FIELDS}
        fields["prompt_ids"], fields["stop_strings"] = list(job.prompt_ids), list(job.stop_strings)
        fields["events"] = job.on_event is not None
        with self._lock:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._start_reading()
            key = next(self._ids)
            job._worker_key = key
            self._jobs[key] = job
            self._send(("submit", key, fields))
        return job

    def cancel(self, job: Job) -> None:
        job.cancel()
        with self._lock:
            key = getattr(job, "_worker_key", None)
            if key in self._jobs and not self._closed:
                try:
                    self._send(("cancel", key))
                except RuntimeError:  # the process is gone: the reader fails the job
                    pass

    def call(self, fn: Callable[..., object], *args) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._start_reading()
            key = next(self._ids)
            self._calls[key] = future
            self._send(("call", key, fn, args))
        return future

    def _start_reading(self) -> None:
        """A reader thread, unless the messages are read on an event loop (under ``_lock``)."""
        if self._reader is None and self._reader_loop is None:
            self._reader = threading.Thread(target=self._read, name="lmlab-decoder-reader", daemon=True)
            self._reader.start()

    def _send(self, message: tuple) -> None:
        try:
            self._to_worker.send(message)
        except OSError:
            raise RuntimeError(f"the decoding process is gone (exit code {self._process.exitcode})") from None

    def close(self) -> None:
        """Finish: the process fails what it still runs ('the server is shutting down') and exits."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._to_worker.send(("close",))
            except OSError:
                pass
            reader, loop = self._reader, self._reader_loop
        if reader is not None:
            reader.join(timeout=30)
        elif loop is not None:  # this thread reads what is left
            if not loop.is_closed():
                loop.remove_reader(self._from_worker.fileno())
            self._read()
        self._stop_process()

    def _stop_process(self) -> None:
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._from_worker.close()
        self._to_worker.close()

    # ------------------------------------------------------------ reading what comes back

    def _read(self) -> None:
        """Read messages until the process's end of the pipe closes (the reader thread's loop)."""
        while not self._gone:
            self._read_one()

    def _read_one(self) -> None:
        """Read one message (a pass's events, ends and call results) and hand each item to the job
        or call it belongs to; at the end of the messages, fail whatever is still pending."""
        if self._gone:
            return
        try:
            items, self.steps = pickle.loads(self._from_worker.recv_bytes())
        except (EOFError, OSError):
            self._end()
            return
        for item in items:
            kind, key = item[0], item[1]
            if kind == "event":
                job = self._jobs.get(key)
                if job is not None and job.on_event is not None:
                    job.on_event(TokenEvent(*item[2:]))
            elif kind == "done":
                with self._lock:
                    job = self._jobs.pop(key, None)
                if job is not None:
                    job.results, job.error = item[2], item[3]
                    _done(job)
            else:  # "result"
                with self._lock:
                    future = self._calls.pop(key)
                if item[2] is None:
                    future.set_result(item[3])
                else:
                    future.set_exception(item[2])
        if self._on_iteration is not None:
            self._on_iteration()

    def _end(self) -> None:
        self._gone = True
        loop = self._reader_loop
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._from_worker.fileno())
        self._process.join(timeout=30)  # its end of the pipe is closed: it has exited or is exiting
        with self._lock:  # the process is gone: nothing pending will get an answer
            self._closed = True
            jobs, calls = list(self._jobs.values()), list(self._calls.values())
            self._jobs.clear()
            self._calls.clear()
        reason = "the server is shutting down" if self._process.exitcode in (None, 0) else \
            f"the decoding process exited (code {self._process.exitcode})"
        for job in jobs:
            job.results, job.error = [], reason
            _done(job)
        for future in calls:
            future.set_exception(RuntimeError(reason))
        if self._on_iteration is not None:
            self._on_iteration()


# ---------------------------------------------------------------- the decoding process


def _serve_jobs(requests, replies, model, tokenizer, max_batch: int, threads: int) -> None:
    """The process: a Scheduler on ``model``; jobs and calls come in on ``requests``; each pass's
    events, ends and call results go back on ``replies`` as one message. Ends when told, or when
    the other end of ``requests`` is gone (the serving process died): no orphan. Ctrl-C in the
    terminal reaches this process too: it is ignored here, the serving process closes it in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    outbox: list[tuple] = []
    send_lock = threading.Lock()
    scheduler = None

    def flush() -> None:
        with send_lock:
            if outbox:
                items = outbox[:]
                outbox.clear()
                try:
                    replies.send_bytes(pickle.dumps((items, scheduler.steps if scheduler is not None else 0),
                                                    pickle.HIGHEST_PROTOCOL))
                except (OSError, ValueError):  # the serving process is gone
                    pass

    try:
        scheduler = Scheduler(model, tokenizer, max_batch=max_batch, on_iteration=flush)
    except Exception as e:
        replies.send(("failed", f"{type(e).__name__}: {e}"))
        return
    replies.send(("ready", scheduler.batchable))
    jobs: dict[int, Job] = {}

    def finished(key: int, job: Job) -> None:
        jobs.pop(key, None)
        with send_lock:
            outbox.append(("done", key, job.results, job.error))

    def answered(key: int, future: Future) -> None:
        error = future.exception() if not future.cancelled() else RuntimeError("the server is shutting down")
        with send_lock:
            if error is None:
                outbox.append(("result", key, None, future.result()))
            else:
                outbox.append(("result", key, _portable(error), None))

    def on_event(key: int, event) -> None:
        # The loop's thread; sent by flush() at the end of the pass. The fields as a plain tuple:
        # a named tuple pickles through a Python-level __getnewargs__, about 4x slower.
        outbox.append(("event", key, *event))

    try:
        while True:
            try:
                message = requests.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "submit":
                key, fields = message[1], message[2]
                events = fields.pop("events")
                job = Job(**fields, on_event=(lambda e, key=key: on_event(key, e)) if events else None)
                job.on_done = lambda key=key, job=job: finished(key, job)
                jobs[key] = job
                scheduler.submit(job)
            elif kind == "cancel":
                job = jobs.get(message[1])
                if job is not None:
                    scheduler.cancel(job)
            elif kind == "call":
                key, fn, args = message[1], message[2], message[3]
                scheduler.call(fn, *args).add_done_callback(lambda f, key=key: answered(key, f))
            else:  # "close"
                break
    finally:
        scheduler.close()
        flush()
        replies.close()


@contextlib.contextmanager
def _main_script_hidden():
    """Start the process without the ``__main__`` script: ``spawn`` would run that script again in
    the new process (a script that calls ``create_app`` at its top level would start processes
    without end), and the process needs nothing from it (its functions and the model's classes
    come from lmlab)."""
    main = sys.modules.get("__main__")
    saved = {name: main.__dict__[name] for name in ("__file__", "__spec__") if main is not None and name in main.__dict__}
    try:
        for name in saved:
            if name == "__spec__":
                main.__spec__ = None
            else:
                del main.__dict__[name]
        yield
    finally:
        main.__dict__.update(saved)


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a RuntimeError with its message."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
