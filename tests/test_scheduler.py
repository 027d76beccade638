"""Continuous batching: a request's tokens do not depend on the batch it runs in."""

import threading

import pytest
import torch

from lmlab.decode.generate import generate
from lmlab.decode.setups import DecodingSetup
from lmlab.models import build_model
from lmlab.models.base import LanguageModel, State
from lmlab.serve.scheduler import Job, Scheduler

V = 13
FAMILIES = {
    "transformer": dict(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=16, positions="rotary"),
    "gru": dict(vocab_size=V, n_embd=8, n_hidden=16),
    "context-average": dict(vocab_size=V, n_embd=8),
}


def peaked(family):
    torch.manual_seed(0)
    model = build_model(family, FAMILIES[family]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def jobs_for(setup, count=16):
    processors = setup.processors(eos_id=2)
    out = []
    for i in range(count):
        prompt = [(5 * i + k) % (V - 3) + 3 for k in range(1 + i % 6)]
        out.append(Job(prompt_ids=prompt, max_new_tokens=6 + i % 9, processors=processors,
                       do_sample=setup.search == "sample", seed=100 + i, eos_id=2, n=1 + i % 2))
    return out


def run(scheduler, jobs, every=1):
    """Submit ``jobs``, waiting for every ``every``-th one before going on (1: each runs alone)."""
    for i, job in enumerate(jobs):
        scheduler.submit(job)
        if i % every == every - 1:
            job.done.wait()  # with every > 1, later jobs join a batch already under way
    for job in jobs:
        assert job.done.wait(60) and job.error is None, job.error
    return [[(r.token_ids, r.finish_reason) for r in job.results] for job in jobs]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("setup", ["greedy", "temperature 0.9, top-k 8, repetition-penalty 1.2",
                                   "top-p 0.9, min-p 0.05, min-new-tokens 3",
                                   "temperature 1.2, no-repeat-ngram-size 2, presence-penalty 0.5"])
def test_a_request_gives_the_same_tokens_alone_or_among_15_others(family, setup):
    model, setup = peaked(family), DecodingSetup.parse(setup)
    alone = Scheduler(model, None, max_batch=2)
    crowded = Scheduler(model, None, max_batch=16)
    try:
        assert crowded.batchable
        one_by_one = run(alone, jobs_for(setup))
        together = run(crowded, jobs_for(setup), every=8)
    finally:
        alone.close()
        crowded.close()
    assert together == one_by_one
    assert crowded.steps < alone.steps  # the rows really shared steps
    # ... and equal lmlab's generation loop with the same prompt, setup and seed
    for job, got in zip(jobs_for(setup), together):
        ref = generate(model, [job.prompt_ids] * job.n, job.max_new_tokens, processors=job.processors,
                       do_sample=job.do_sample, eos_id=2, seed=job.seed)
        assert got == [(r.token_ids, r.finish_reason) for r in ref]


class _OpaqueState(State):
    """A state kind merge_states does not know (as a Hugging Face cache)."""


class _Opaque(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.family, self.config = inner, "opaque", inner.config

    vocab_size = property(lambda self: self.inner.vocab_size)
    max_context = property(lambda self: self.inner.max_context)
    device = property(lambda self: self.inner.device)

    def next_token_logits(self, ids, state=None):
        logits, s = self.inner.next_token_logits(ids, state)
        return logits, _OpaqueState(s.tensors, s.length)

    def merge_states(self, states):
        return self.inner.merge_states(states)

    read_prompt_blocks = LanguageModel.read_prompt_blocks


def test_models_whose_states_cannot_merge_run_one_request_at_a_time():
    inner = peaked("gru")
    scheduler = Scheduler(_Opaque(inner), None, max_batch=16)
    try:
        assert not scheduler.batchable and scheduler.policy == "one request at a time"
        setup = DecodingSetup.parse("temperature 0.9")
        got = run(scheduler, jobs_for(setup, 6))
    finally:
        scheduler.close()
    for job, tokens in zip(jobs_for(setup, 6), got):
        ref = generate(inner, [job.prompt_ids] * job.n, job.max_new_tokens, processors=job.processors,
                       do_sample=True, eos_id=2, seed=job.seed)
        assert tokens == [(r.token_ids, r.finish_reason) for r in ref]


def test_a_cancelled_request_frees_its_rows_and_the_others_go_on():
    model = peaked("transformer")
    scheduler = Scheduler(model, None, max_batch=2)
    started, release = threading.Event(), threading.Event()

    def hold(event):  # the loop waits here after the first token until the test lets it go
        started.set()
        release.wait(30)

    try:
        long = Job(prompt_ids=[3, 4], max_new_tokens=60, seed=0, on_event=hold)
        scheduler.submit(long)
        assert started.wait(30)
        waiting = Job(prompt_ids=[5], max_new_tokens=4, seed=1, n=2)  # needs both rows: waits for `long`
        scheduler.submit(waiting)
        long.cancel()
        release.set()
        assert long.done.wait(30) and long.error == "cancelled"
        assert len(long.results[0].token_ids) < 60
        assert waiting.done.wait(30) and waiting.error is None
        assert [len(r.token_ids) for r in waiting.results] == [4, 4]
        assert scheduler.running_rows == 0
    finally:
        scheduler.close()


def test_bad_arguments():
    model = peaked("gru")
    with pytest.raises(ValueError, match="max_batch"):
        Scheduler(model, None, max_batch=0)
    scheduler = Scheduler(model, None, max_batch=2)
    try:
        with pytest.raises(ValueError, match="n=3 rows"):
            scheduler.submit(Job(prompt_ids=[3], max_new_tokens=2, n=3))
        with pytest.raises(ValueError, match="empty"):
            scheduler.submit(Job(prompt_ids=[], max_new_tokens=2))
    finally:
        scheduler.close()


def test_each_step_reports_its_tokens_before_the_model_runs_on_them():
    """on_iteration comes after a step's choice and before the forward pass that feeds those
    tokens: a streamed token is on its way while the model works on the next."""
    model = peaked("transformer")
    forward_passes, depth = [], [0]

    def counted(method):
        def call(*args, **kwargs):
            depth[0] += 1
            try:
                return method(*args, **kwargs)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    forward_passes.append(1)
        return call

    tokens, seen = [], []
    scheduler = Scheduler(model, None, max_batch=2,
                          on_iteration=lambda: seen.append((len(tokens), len(forward_passes))))
    for name in ("next_token_logits", "read_prompt_blocks"):
        setattr(model, name, counted(getattr(model, name)))
    try:
        job = scheduler.submit(Job(prompt_ids=[3, 4], max_new_tokens=5, seed=0, on_event=tokens.append))
        assert job.done.wait(30)
    finally:
        scheduler.close()
    # token k is chosen from the k-th pass (the prompt's, then k - 1 of the chosen tokens)
    assert [(k, k) for k in range(1, 6)] == [s for s in seen if s[0] > 0][:5]
    assert len(forward_passes) == 5


def test_a_forward_pass_that_fails_fails_its_jobs_and_reports_them_at_once():
    model = peaked("transformer")
    job = Job(prompt_ids=[3, 4], max_new_tokens=10, seed=0)
    reported = threading.Event()  # set by a pass that comes after the job's end
    scheduler = Scheduler(model, None, max_batch=2, on_iteration=lambda: reported.set() if job.done.is_set() else None)
    forward = model.next_token_logits
    calls = []

    def failing(ids, state=None):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return forward(ids, state)

    model.next_token_logits = failing
    try:
        scheduler.submit(job)
        assert job.done.wait(30) and job.error == "RuntimeError: out of memory"
        assert reported.wait(10)  # not only when the scheduler closes
        assert len(job.results[0].token_ids) == len(calls) - 1  # a token from each forward pass that worked
    finally:
        scheduler.close()


def test_the_loop_runs_without_autograd():
    scheduler = Scheduler(peaked("gru"), None, max_batch=2)
    try:
        assert scheduler.call(lambda model, tokenizer: torch.is_grad_enabled()).result(30) is False
        job = scheduler.submit(Job(prompt_ids=[3], max_new_tokens=3, seed=0))
        assert job.done.wait(30) and scheduler._state is None
        logits, _ = scheduler.call(lambda model, tokenizer: model.next_token_logits(torch.tensor([[3]]), None)).result(30)
        assert logits.grad_fn is None
    finally:
        scheduler.close()
    assert torch.is_grad_enabled()  # the caller's thread is untouched
