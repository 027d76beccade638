"""The decoding loop in a process of its own (``WorkerScheduler``): the same tokens as the loop
on a thread, cancellation, errors of calls, and no process left behind."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from test_scheduler import jobs_for, peaked, run  # noqa: E402

from lmlab.decode.setups import DecodingSetup
from lmlab.serve.scheduler import Job, Scheduler
from lmlab.serve.worker import WorkerScheduler

SRC = str(Path(__file__).resolve().parents[1] / "src")


def process_id(model, tokenizer):
    return os.getpid()


def vocabulary_size(model, tokenizer, extra):
    return model.vocab_size + extra


def refuse(model, tokenizer):
    raise ValueError("no such text")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "zombie" not in status.read_text()


def wait_gone(pid: int, seconds: float = 30) -> bool:
    deadline = time.time() + seconds
    while alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    return not alive(pid)


@pytest.mark.parametrize("setup", ["greedy", "temperature 0.9, top-k 8, repetition-penalty 1.2"])
def test_the_decoding_process_gives_the_tokens_of_the_loop_on_a_thread(setup):
    model, setup = peaked("transformer"), DecodingSetup.parse(setup)
    reference = Scheduler(model, None, max_batch=2)
    try:
        one_by_one = run(reference, jobs_for(setup))
    finally:
        reference.close()
    worker = WorkerScheduler(model, None, max_batch=16, threads=1)
    try:
        assert worker.batchable and worker.policy == "continuous batching"
        assert worker.call(process_id).result(30) != os.getpid()  # the model runs elsewhere
        assert worker.call(vocabulary_size, 2).result(30) == model.vocab_size + 2
        together = run(worker, jobs_for(setup), every=8)
        assert worker.steps < reference.steps  # rows shared steps in the process
        assert worker.running_rows == 0
    finally:
        worker.close()
    assert together == one_by_one


def test_cancel_errors_and_close():
    worker = WorkerScheduler(peaked("gru"), None, max_batch=2, threads=1)
    pid = worker._process.pid
    try:
        first = []
        endless = Job(prompt_ids=[3, 4], max_new_tokens=10**7, seed=0, on_event=first.append)
        worker.submit(endless)
        deadline = time.time() + 30
        while not first and time.time() < deadline:
            time.sleep(0.01)
        worker.cancel(endless)
        assert endless.done.wait(30) and endless.error == "cancelled"
        assert 0 < len(endless.results[0].token_ids) < 10**7
        after = Job(prompt_ids=[5], max_new_tokens=4, seed=1, n=2)  # needs both rows: they were freed
        worker.submit(after)
        assert after.done.wait(30) and after.error is None
        assert [len(r.token_ids) for r in after.results] == [4, 4]
        with pytest.raises(ValueError, match="no such text"):
            worker.call(refuse).result(30)
        with pytest.raises(ValueError, match="n=3 rows"):
            worker.submit(Job(prompt_ids=[3], max_new_tokens=2, n=3))
        pending = worker.submit(Job(prompt_ids=[3], max_new_tokens=10**7, seed=2))
    finally:
        worker.close()
    assert pending.done.wait(30) and pending.error == "the server is shutting down"
    assert wait_gone(pid)
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(Job(prompt_ids=[3], max_new_tokens=2))


def test_the_decoding_process_ends_with_the_process_that_started_it(tmp_path):
    """Started from a script's top level (no ``if __name__ == "__main__"``: spawn must not run the
    script again), it answers; when that script's process is killed, it ends too."""
    script = tmp_path / "serve_script.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        sys.path.insert(0, sys.argv[1])
        from test_scheduler import peaked
        from lmlab.serve.scheduler import Job
        from lmlab.serve.worker import WorkerScheduler
        worker = WorkerScheduler(peaked("gru"), None, max_batch=2, threads=1)
        job = worker.submit(Job(prompt_ids=[3], max_new_tokens=5, seed=0))
        job.done.wait(60)
        print(worker._process.pid, len(job.results[0].token_ids), flush=True)
        time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script), str(Path(__file__).parent)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": SRC})
    try:
        child, tokens = map(int, parent.stdout.readline().split())
        assert tokens == 5 and alive(child)
        parent.send_signal(signal.SIGKILL)  # no chance to clean up
        parent.wait(30)
        assert wait_gone(child)
    finally:
        parent.kill()


def test_requests_fail_with_a_clear_error_when_the_decoding_process_dies():
    worker = WorkerScheduler(peaked("gru"), None, max_batch=2, threads=1)
    try:
        running = worker.submit(Job(prompt_ids=[3], max_new_tokens=10**7, seed=0))
        os.kill(worker._process.pid, signal.SIGKILL)
        assert running.done.wait(30) and running.error == "the decoding process exited (code -9)"
        with pytest.raises(RuntimeError, match="closed"):
            worker.submit(Job(prompt_ids=[3], max_new_tokens=2))
        with pytest.raises(RuntimeError, match="closed"):
            worker.call(process_id)
    finally:
        worker.close()


def test_a_job_without_on_event_costs_one_message_not_one_per_token():
    passes = []
    worker = WorkerScheduler(peaked("gru"), None, max_batch=2, threads=1, on_iteration=lambda: passes.append(1))
    try:
        quiet = worker.submit(Job(prompt_ids=[3], max_new_tokens=20, seed=0))
        assert quiet.done.wait(30) and len(quiet.results[0].token_ids) == 20
        messages_quiet = len(passes)
        heard = []
        loud = worker.submit(Job(prompt_ids=[3], max_new_tokens=20, seed=0, on_event=heard.append))
        assert loud.done.wait(30)
    finally:
        worker.close()
    assert messages_quiet == 1  # its end only
    assert [e.token_id for e in heard] == loud.results[0].token_ids == quiet.results[0].token_ids


def test_messages_read_on_an_event_loop_reach_the_callbacks_on_its_thread():
    import asyncio

    async def main():
        loop = asyncio.get_running_loop()
        here = threading.get_ident()
        threads = set()
        finished = loop.create_future()
        worker = WorkerScheduler(peaked("transformer"), None, max_batch=4, threads=1,
                                 on_iteration=lambda: threads.add(threading.get_ident()))
        worker.read_on(loop)
        worker.read_on(loop)  # again: nothing
        events = []
        job = Job(prompt_ids=[3, 4], max_new_tokens=6, seed=0,
                  on_event=lambda e: (threads.add(threading.get_ident()), events.append(e.token_id)),
                  on_done=lambda: finished.set_result(threading.get_ident()))
        worker.submit(job)
        done_on = await asyncio.wait_for(finished, 30)
        size = await asyncio.wait_for(asyncio.wrap_future(worker.call(vocabulary_size, 1)), 30)
        endless = worker.submit(Job(prompt_ids=[3], max_new_tokens=10**7, seed=1))
        await asyncio.sleep(0.05)
        worker.close()  # on the loop's thread: it reads what is left itself
        return here, threads, done_on, events, job, size, endless, worker

    here, threads, done_on, events, job, size, endless, worker = asyncio.run(main())
    assert threads == {here} and done_on == here
    assert events == job.results[0].token_ids and len(events) == 6 and job.error is None
    assert size == peaked("transformer").vocab_size + 1
    assert endless.done.is_set() and endless.error == "the server is shutting down"
    assert wait_gone(worker._process.pid)
    with pytest.raises(RuntimeError, match="before the first submit"):
        other = WorkerScheduler(peaked("gru"), None, max_batch=2, threads=1)
        try:
            other.call(process_id).result(30)  # a reader thread starts here
            asyncio.run(_read_on_running_loop(other))
        finally:
            other.close()


async def _read_on_running_loop(worker):
    import asyncio

    worker.read_on(asyncio.get_running_loop())


def test_on_an_event_loop_a_dying_process_fails_what_is_pending():
    import asyncio

    async def main():
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        worker = WorkerScheduler(peaked("gru"), None, max_batch=2, threads=1)
        worker.read_on(loop)
        job = worker.submit(Job(prompt_ids=[3], max_new_tokens=10**7, seed=0,
                                on_done=lambda: finished.set_result(None)))
        await asyncio.sleep(0.05)
        os.kill(worker._process.pid, signal.SIGKILL)
        await asyncio.wait_for(finished, 30)
        worker.close()
        return job, worker

    job, worker = asyncio.run(main())
    assert job.error == "the decoding process exited (code -9)"
    with pytest.raises(RuntimeError, match="closed"):
        worker.submit(Job(prompt_ids=[3], max_new_tokens=2))


def test_the_reading_moves_to_a_new_event_loop_once_the_first_has_stopped():
    import asyncio

    worker = WorkerScheduler(peaked("gru"), None, max_batch=2, threads=1)

    async def one_job(seed):
        loop = asyncio.get_running_loop()
        worker.read_on(loop)
        finished = loop.create_future()
        job = worker.submit(Job(prompt_ids=[3], max_new_tokens=4, seed=seed,
                                on_done=lambda: finished.set_result(threading.get_ident())))
        return job, await asyncio.wait_for(finished, 30)

    try:
        first, _ = asyncio.run(one_job(0))  # this loop is closed when run() returns
        second, done_on = asyncio.run(one_job(1))
    finally:
        worker.close()
    assert first.error is None and second.error is None and done_on == threading.get_ident()
    assert len(second.results[0].token_ids) == 4
