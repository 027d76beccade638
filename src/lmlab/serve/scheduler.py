"""Continuous batching: one decoding loop shared by every request.

    scheduler = Scheduler(model, tokenizer, max_batch=16)
    job = Job(prompt_ids=[5, 6, 7], max_new_tokens=20, processors=setup.processors(eos_id=2),
              do_sample=True, seed=0, eos_id=2, on_event=print)
    scheduler.submit(job)          # events arrive on the loop's thread; job.done is set at the end
    scheduler.call(fn, *args)      # fn(model, tokenizer, *args) between two steps (scoring, beams): a Future
    scheduler.cancel(job)          # the job leaves the batch at the next step

A job is one request: ``n`` rows continuing the same prompt with one decoding setup and one
``torch.Generator``. Between two steps the loop admits waiting jobs (the new prompts are read
together by ``model.read_prompt_blocks``, then their state is merged into the batch with
``model.merge_states``: rows keep their own positions) and retires finished or cancelled
ones. Every step makes one ``model.next_token_logits`` call for all rows; then the jobs that
share a decoding setup run its processors on their rows together and pick the tokens (the
argmax, or one draw from the softmax over the block, each job's rows with noise from its own
generator): the same operations, row by row, as ``lmlab.decode.generate``, so a job's tokens
do not depend on the other jobs in the batch, and equal those of ``generate`` with the same
prompt, setup and seed.

Policy for models whose states cannot be merged (a Hugging Face cache, RAG-token): one job
at a time, in arrival order; the rows of one job still share each step.

This loop runs on a thread of the calling process; ``lmlab.serve.worker.WorkerScheduler`` has
the same interface and runs it in a process of its own.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from lmlab.decode.generate import Generation, StopScan, finished_text
from lmlab.decode.processors import apply_processors, processors_read_ids
from lmlab.decode.search import _check_pickable, draw, greedy_pick, sampling_noise
from lmlab.models.base import require_causal

__all__ = ["Job", "TokenEvent", "Scheduler", "states_merge"]


class TokenEvent(NamedTuple):
    """A token chosen for ``row`` of a job. ``logprob``: under the model (before processors);
    ``processed_logprob``: after them (only when the job asks for ``alternatives``; -inf when
    they cut it). ``alternatives``: the most probable tokens as (id, model logprob, processed logprob).
    A named tuple: the decoding process sends its fields, one event per token, as a plain tuple."""

    row: int
    token_id: int
    logprob: float
    processed_logprob: float | None
    alternatives: Sequence[tuple[int, float, float]] = ()


@dataclass
class Job:
    """One request: ``n`` rows continuing ``prompt_ids`` (each of length >= 1).

    ``on_event(event)`` is called on the loop's thread with each ``TokenEvent`` of a row still
    running; at the end ``results`` (one ``Generation`` per row, text included) or ``error``
    is set, then ``done``, then ``on_done()`` is called. ``cancel()`` retires the job at the
    next step.
    """

    prompt_ids: list[int]
    max_new_tokens: int
    processors: Sequence = ()
    do_sample: bool = True
    seed: int | None = None
    eos_id: int | None = None
    stop_strings: Sequence[str] = ()
    n: int = 1
    alternatives: int = 0
    on_event: Callable[[TokenEvent], None] | None = None
    on_done: Callable[[], None] | None = None
    results: list[Generation] | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class _Active:
    """A job in the running batch: its tokens so far, its generator and its rows' progress."""

    def __init__(self, job: Job, device: torch.device, tokenizer) -> None:
        self.job = job
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(job.seed if job.seed is not None else torch.seed())
        self.ids = torch.tensor([job.prompt_ids] * job.n, dtype=torch.long, device=device)  # (n, t)
        self.generated = 0
        self.rows = [Generation(prompt_ids=list(job.prompt_ids)) for _ in range(job.n)]
        self.running = [True] * job.n
        self.stop_scans = [StopScan(tokenizer, job.prompt_ids, job.stop_strings) for _ in range(job.n)] \
            if job.stop_strings else None
        # Jobs with equal processors (frozen dataclasses: equal reprs) run them as one block.
        self.setup_key = (repr(list(job.processors)), job.alternatives > 0)
        # Only when the processors read the tokens so far (penalties, n-gram bans) is each row's
        # history kept as a tensor and passed to them.
        self.reads_ids = processors_read_ids(job.processors)

    @property
    def finished(self) -> bool:
        return not any(self.running)


@torch.no_grad()
def states_merge(model) -> bool:
    """Whether ``model.merge_states`` can put the states of separately read prompts (of different
    lengths) in one batch: what continuous batching needs."""
    _, a = model.next_token_logits(torch.zeros(1, 1, dtype=torch.long, device=model.device), None)
    _, b = model.next_token_logits(torch.zeros(1, 2, dtype=torch.long, device=model.device), None)
    try:
        model.merge_states([a, b])
    except NotImplementedError:
        return False
    return True


def batching_policy(batchable: bool) -> str:
    """The policy's name, as ``/v1/info`` and the startup line say it."""
    return "continuous batching" if batchable else "one request at a time"


def check_max_batch(max_batch) -> int:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    return max_batch


def check_job(job: Job, max_batch: int) -> None:
    if job.n > max_batch:
        raise ValueError(f"n={job.n} rows do not fit in a batch of max_batch={max_batch}")
    if not job.prompt_ids:
        raise ValueError("the prompt is empty; every prompt needs at least one token")


class Scheduler:
    """One thread runs the decoding loop over the jobs submitted to it (see the module docstring).
    ``on_iteration()``, when given, is called on that thread after each pass of the loop has
    chosen its tokens (the events and ends of that pass have all been reported), before the
    model runs on those tokens (so they can be on their way while it does), and once more at
    the end."""

    def __init__(self, model, tokenizer, max_batch: int = 16, on_iteration: Callable[[], None] | None = None) -> None:
        require_causal(model, "serving")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, check_max_batch(max_batch)
        self.device = model.device
        self.batchable = states_merge(model)
        self._on_iteration = on_iteration
        self._waiting: collections.deque[Job] = collections.deque()
        self._calls: collections.deque[tuple[Callable, Future]] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._active: list[_Active] = []
        self._state = None
        self._logits: torch.Tensor | None = None  # (B, V) next-token logits of the running rows
        self._chosen: torch.Tensor | None = None  # (B,) tokens chosen, not yet fed to the model
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="lmlab-scheduler", daemon=True)
        self._thread.start()

    @property
    def policy(self) -> str:
        return batching_policy(self.batchable)

    @property
    def running_rows(self) -> int:
        return sum(a.job.n for a in self._active)

    def submit(self, job: Job) -> Job:
        check_job(job, self.max_batch)
        with self._wake:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._waiting.append(job)
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Retire ``job`` at the next step (its rows leave the batch)."""
        job.cancel()

    def call(self, fn: Callable[..., object], *args) -> Future:
        """Run ``fn(model, tokenizer, *args)`` on the loop's thread between two steps (the model is
        never used by two threads at once); its result or exception comes back through the Future."""
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._calls.append((lambda: fn(self.model, self.tokenizer, *args), future))
            self._wake.notify()
        return future

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------ the loop

    def _loop(self) -> None:
        torch.set_grad_enabled(False)  # for this thread's life (grad mode is per thread): no autograd in serving
        while True:
            with self._wake:
                while not (self._closed or self._waiting or self._calls or self._active):
                    self._wake.wait()
                if self._closed:
                    break
                calls = list(self._calls)
                self._calls.clear()
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # the caller sees it
                        future.set_exception(e)
            try:
                self._admit()
                if self._active:
                    self._step()
            except Exception as e:  # a failing step fails the jobs in it, never the loop
                self._fail_all(e)
            if self._on_iteration is not None:  # the step's tokens go out before the model runs on them
                self._on_iteration()
            if self._chosen is not None:
                try:
                    self._advance()
                except Exception as e:
                    self._fail_all(e)
                    if self._on_iteration is not None:  # the ends go out now, not with some later pass
                        self._on_iteration()
        for a in self._active:
            self._finish(a, error="the server is shutting down")
        for job in self._waiting:
            job.error = "the server is shutting down"
            _done(job)
        for _, future in self._calls:
            future.cancel()
        if self._on_iteration is not None:
            self._on_iteration()

    def _fail_all(self, error: Exception) -> None:
        for a in self._active:
            self._finish(a, error=f"{type(error).__name__}: {error}")
        self._active, self._state, self._logits, self._chosen = [], None, None, None

    def _admit(self) -> None:
        """Move waiting jobs into the batch while their rows fit (one job at a time when the
        model's states cannot be merged)."""
        admitted: list[_Active] = []
        while True:
            with self._wake:
                if not self._waiting:
                    break
                job = self._waiting[0]
                rows = self.running_rows + sum(a.job.n for a in admitted)
                fits = rows + job.n <= self.max_batch and (self.batchable or (rows == 0))
                if not fits and not job.cancelled:
                    break
                self._waiting.popleft()
            if job.cancelled:
                job.results, job.error = [], "cancelled"
                _done(job)
                continue
            admitted.append(_Active(job, self.device, self.tokenizer))
        if not admitted:
            return
        try:  # the new prompts in one pass (``read_prompt_blocks``)
            logits, state = self.model.read_prompt_blocks([a.ids for a in admitted])
        except Exception:  # read each alone, so that only the job at fault fails
            admitted, logits, state = self._read_alone(admitted)
            if not admitted:
                return
        self._active.extend(admitted)
        self._state = state if self._state is None else self.model.merge_states([self._state, state])
        self._logits = logits if self._logits is None else torch.cat([self._logits, logits])

    def _read_alone(self, admitted: list[_Active]) -> tuple[list[_Active], torch.Tensor | None, object]:
        """Read each new prompt on its own; a job whose prompt fails is finished with the error."""
        read = []
        for a in admitted:
            try:
                read.append((a, *self.model.next_token_logits(a.ids, None)))
            except Exception as e:
                self._finish(a, error=f"{type(e).__name__}: {e}")
        if not read:
            return [], None, None
        states = [state for _, _, state in read]
        state = states[0] if len(states) == 1 else self.model.merge_states(states)
        return [a for a, _, _ in read], torch.cat([logits for _, logits, _ in read]), state

    def _step(self) -> None:
        """Choose one token for every row and retire the finished jobs; the tokens of the rest
        wait in ``_chosen`` for ``_advance`` (after ``on_iteration`` has sent the step's news)."""
        self.steps += 1
        spans, start = [], 0
        for a in self._active:
            spans.append((a, start))
            start += a.job.n
        live = [(a, lo) for a, lo in spans if not a.job.cancelled]
        chosen = torch.zeros(start, dtype=torch.long, device=self.device)
        if live:
            logits = self._logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            groups: dict[tuple, list[tuple[_Active, int]]] = {}
            for a, lo in live:  # jobs with the same setup are processed as one block of rows
                groups.setdefault((a.setup_key, a.job.do_sample), []).append((a, lo))
            for members in groups.values():
                self._choose(members, logits, logp, chosen)
        leaving = [(a, lo) for a, lo in spans if a.job.cancelled or a.finished]
        for a, _ in leaving:
            self._finish(a, error="cancelled" if a.job.cancelled else None)
        state = self._state
        if leaving:
            self._active, state, chosen = self._without(spans, leaving, state, chosen)
            if not self._active:
                self._state, self._logits = None, None
                return
        self._state, self._chosen = state, chosen

    def _advance(self) -> None:
        """Feed the chosen tokens (B,) to the model: the logits and state of the next step."""
        chosen, self._chosen = self._chosen, None
        self._logits, self._state = self.model.next_token_logits(chosen[:, None], self._state)

    def _without(self, spans: list[tuple[_Active, int]], leaving: list[tuple[_Active, int]], state,
                 chosen: torch.Tensor):
        """The jobs, state and chosen tokens (B,) once the ``leaving`` jobs' rows are gone. The jobs
        past the new end of the batch move into the rows the leaving ones free, so only their rows
        are copied (``State.fill_rows``; when the blocks pair up by size, else every row is
        selected); then slots no row fills any more are dropped."""
        gone = {id(a) for a, _ in leaving}
        staying = [(a, lo) for a, lo in spans if id(a) not in gone]
        size = sum(a.job.n for a, _ in staying)
        if size == 0:
            return [], state, chosen
        holes = [(a, lo) for a, lo in leaving if lo < size]  # freed rows inside the new batch
        movers = [(a, lo) for a, lo in staying if lo >= size]  # jobs past its end
        pairs_up = len(holes) == len(movers) \
            and all(lo + h.job.n <= size and h.job.n == m.job.n for (h, lo), (m, _) in zip(holes, movers)) \
            and all(lo + a.job.n <= size for a, lo in staying if lo < size)
        if pairs_up:
            to = {id(a): lo for a, lo in staying}
            for (_, hole), (mover, _) in zip(holes, movers):
                to[id(mover)] = hole
            dst = torch.tensor([to[id(a)] + r for a, _ in movers for r in range(a.job.n)], dtype=torch.long,
                               device=self.device)
            src = torch.tensor([lo + r for a, lo in movers for r in range(a.job.n)], dtype=torch.long,
                               device=self.device)
            state = state.fill_rows(dst, src, size)
            chosen[dst] = chosen[src]
            chosen = chosen[:size]
            survivors = sorted((a for a, _ in staying), key=lambda a: to[id(a)])
        else:
            keep = torch.tensor([lo + r for a, lo in staying for r in range(a.job.n)], device=self.device)
            state, chosen = state.select(keep), chosen.index_select(0, keep)
            survivors = [a for a, _ in staying]
        return survivors, self.model.merge_states([state]) if self.batchable else state, chosen

    def _choose(self, members: list[tuple[_Active, int]], logits: torch.Tensor, logp: torch.Tensor,
                chosen: torch.Tensor) -> None:
        """Pick the next token of every row of jobs that share one setup, as ``generate`` does:
        the processors run on their rows together (their histories left-padded with -1, which
        every processor ignores), then one pick for the block (a draw takes each job's noise from
        its own generator).
        ``logits``/``logp``: (B, V) of the whole batch; the picks are written into ``chosen`` (B,)."""
        first = members[0][0]
        index = torch.tensor([lo + r for a, lo in members for r in range(a.job.n)], device=self.device)
        scores = logits.index_select(0, index)
        if first.job.processors:
            ids = None
            if first.reads_ids:
                width = max(a.ids.shape[1] for a, _ in members)
                ids = torch.cat([F.pad(a.ids, (width - a.ids.shape[1], 0), value=-1) for a, _ in members])
            num_generated = torch.tensor([a.generated for a, _ in members for _ in range(a.job.n)], device=self.device)
            scores = apply_processors(first.job.processors, scores, ids, num_generated=num_generated)
        if first.job.do_sample:  # sample_pick's draw, each job's rows with noise from its own generator
            _check_pickable(scores)
            vocab = scores.shape[-1]
            noise = [sampling_noise(a.job.n, vocab, a.generator, self.device) for a, _ in members]
            picks = draw(torch.softmax(scores, dim=-1), noise[0] if len(noise) == 1 else torch.cat(noise))
        else:
            picks = greedy_pick(scores)
        chosen[index] = picks
        picked = logp.index_select(0, index).gather(1, picks[:, None]).squeeze(1).tolist()
        tokens = picks.tolist()
        processed = None
        if any(a.job.alternatives for a, _ in members):
            processed = torch.log_softmax(scores, dim=-1)
        offset = 0
        for a, _ in members:
            n = a.job.n
            rows = slice(offset, offset + n)
            offset += n
            if first.reads_ids:  # the history the processors read (the prompt's is read at admission)
                a.ids = torch.cat([a.ids, picks[rows, None]], dim=1)
            a.generated += 1
            self._record(a, tokens[rows], picked[rows], logp, index[rows],
                         None if processed is None else processed[rows], picks[rows])

    def _record(self, a: _Active, tokens: list[int], picked: list[float], logp: torch.Tensor, index: torch.Tensor,
                processed: torch.Tensor | None, picks: torch.Tensor) -> None:
        """Append each running row's token, send its event, and apply the stop rules. ``logp``:
        (B, V) of the whole batch, ``index``: this job's rows in it."""
        job = a.job
        picked_processed, top = [None] * job.n, None
        if job.alternatives:
            logp = logp.index_select(0, index)
            picked_processed = processed.gather(1, picks[:, None]).squeeze(1).tolist()
            values, index = logp.topk(min(job.alternatives, logp.shape[-1]), dim=-1)
            top = (index.tolist(), values.tolist(), processed.gather(1, index).tolist())
        for r in range(job.n):
            if not a.running[r]:
                continue
            row = a.rows[r]
            row.token_ids.append(tokens[r])
            row.logprobs.append(picked[r])
            if job.on_event is not None:
                alts = list(zip(*(part[r] for part in top))) if top else []
                job.on_event(TokenEvent(r, tokens[r], picked[r], picked_processed[r], alts))
            if job.eos_id is not None and tokens[r] == job.eos_id:
                row.finish_reason = "eos"
            elif a.stop_scans is not None and a.stop_scans[r].add(tokens[r]):
                row.finish_reason = "stop"
            elif a.generated >= job.max_new_tokens:
                row.finish_reason = "length"
            else:
                continue
            a.running[r] = False

    def _finish(self, a: _Active, error: str | None = None) -> None:
        job = a.job
        if error is None and self.tokenizer is not None:
            for row in a.rows:
                row.text = finished_text(self.tokenizer, row.prompt_ids, row.token_ids, row.finish_reason,
                                         job.stop_strings)
        job.results, job.error = a.rows, error
        _done(job)


def _done(job: Job) -> None:
    job.done.set()
    if job.on_done is not None:
        job.on_done()
