"""The generation loop: owns the state, the stop rules and the output.

Prompts of different lengths need no padding choice from the user: the
common prefix goes through the model in one call, then every row consumes one
token per step — its own next prompt token while it still has one (forced),
a chosen token afterwards. Rows therefore stay aligned, which works for every
model family (KV cache, hidden vectors, n-gram contexts) without masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from lmlab.decode.processors import apply_processors
from lmlab.decode.search import greedy_pick, sample_pick
from lmlab.models.base import LanguageModel, State, require_causal
from lmlab.tokenizers import TextStream, continuation_text

# A processor maps next-token logits (B, V) and the tokens so far (B, T) to new logits
# (see lmlab.decode.processors); LogitsProcessor instances also get num_generated (B,).
Processor = Callable[..., torch.Tensor]


class StopScan:
    """Whether a stop string has appeared in a row's continuation text (``continuation_text``
    of the tokens so far), checked token by token with bounded work: a ``TextStream`` gives the
    new text, and only its unsettled rest and the last ``len(longest stop) - 1`` settled
    characters are searched again."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop_strings: Sequence[str]) -> None:
        self.stream = TextStream(tokenizer, prompt_ids)
        self.stop_strings = list(stop_strings)
        self.keep = max(len(s) for s in self.stop_strings) - 1
        self.tail = ""

    def add(self, token: int) -> bool:
        """Append ``token``; whether the text now holds a stop string."""
        settled = self.tail + self.stream.add(token)
        self.tail = settled[-self.keep:] if self.keep else ""
        text = settled + self.stream.pending
        return any(s in text for s in self.stop_strings)


class StreamedRow:
    """Text of one streamed row so far (``lmlab generate --stream``, ``lmlab serve``): each token
    decodes a few tokens (``TextStream``); deltas hold back what is not settled yet (an
    unfinished character) and the last characters that could still begin a stop string (the
    row's final text, ``finished_text``, is cut before it); ``rest`` is what is left of it."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str], eos_id: int | None) -> None:
        self.stream, self.eos_id = TextStream(tokenizer, prompt_ids), eos_id
        self.hold = max((len(s) for s in stop), default=0)
        self.unsent = ""
        self.sent = 0
        self.offsets: list[int] = []  # per token added, where its text begins (text_offsets)

    def add(self, token: int) -> str:
        self.offsets.append(self.stream.offset)
        if token == self.eos_id:
            return ""
        self.unsent += self.stream.add(token)
        cut = len(self.unsent) - self.hold
        if cut <= 0:
            return ""
        delta, self.unsent = self.unsent[:cut], self.unsent[cut:]
        self.sent += cut
        return delta

    def rest(self, final_text: str) -> str:
        return final_text[self.sent :]


@dataclass
class Generation:
    """One row's result. ``token_ids`` are the new tokens (with the <eos> if one ended it);
    ``logprobs`` are their log-probabilities under the model (before processors)."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"  # "eos" | "length" | "stop"
    text: str = ""


def _check_prompts(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("no prompts given; pass at least one prompt")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(
                f"prompt {i} is empty; every prompt needs at least one token (start it with the <bos> id to generate from nothing)"
            )
    return prompts


class ContextWindow:
    """Keeps a model's state within its context: ``"slide"`` re-reads the most recent
    tokens into a fresh state when the window is full, ``"error"`` refuses."""

    def __init__(self, model: LanguageModel, policy: str = "slide") -> None:
        if policy not in ("slide", "error"):
            raise ValueError(f"context policy {policy!r}; accepted: 'slide', 'error'")
        self.model, self.policy, self.limit = model, policy, model.max_context

    def check_prompt(self, prompts: list[list[int]]) -> None:
        longest = max(len(p) for p in prompts)
        if self.limit is not None and self.policy == "error" and longest > self.limit:
            raise ValueError(
                f"a prompt of {longest} tokens is longer than the model's context of {self.limit}; "
                "shorten it or use the 'slide' context policy (keeps the last tokens)"
            )

    def step(self, history: torch.Tensor, state: State | None, new: torch.Tensor) -> tuple[torch.Tensor, State]:
        """Feed ``new`` (B, T) after ``history`` (B, t); returns the next-token logits (B, V) and the state."""
        if self.limit is None or state is None and new.shape[1] <= self.limit or state is not None and state.length + new.shape[1] <= self.limit:
            return self.model.next_token_logits(new, state)
        if self.policy == "error":
            raise ValueError(f"the sequence would exceed the model's context of {self.limit} tokens")
        window = torch.cat([history, new], dim=1)[:, -self.limit :]
        return self.model.next_token_logits(window, None)


@torch.no_grad()
def generate(
    model: LanguageModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    processors: Sequence[Processor] = (),
    do_sample: bool = True,
    eos_id: int | None = None,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    context_policy: str = "slide",
    on_token: Callable[[int, int], None] | None = None,
) -> list[Generation]:
    """Extend each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

    ``processors`` transform the (B, V) next-token logits in order; then the
    token is the argmax (``do_sample=False``) or a draw from the softmax
    (``lmlab.decode.search.greedy_pick`` / ``sample_pick``). A row that must
    choose a token when every logit is -inf (everything banned) or one is NaN
    or +inf raises ValueError naming the row.
    A row stops at ``eos_id``, at a stop string (needs ``tokenizer``), or at the
    budget. ``on_token(row, token_id)`` is called for every new token as it is chosen.
    """
    options = dict(processors=processors, do_sample=do_sample, eos_id=eos_id, stop_strings=stop_strings,
                   tokenizer=tokenizer, seed=seed, generator=generator, context_policy=context_policy,
                   on_token=on_token)
    for results in _run(model, prompts, max_new_tokens, **options):
        pass
    return results


def stream(model: LanguageModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, **options) -> Iterator[tuple[int, int]]:
    """Yield ``(row, token_id)`` as tokens are produced (same options as ``generate``)."""
    events: list[tuple[int, int]] = []
    user_callback = options.pop("on_token", None)

    def record(row: int, token: int) -> None:
        events.append((row, token))
        if user_callback is not None:
            user_callback(row, token)

    for _ in _run(model, prompts, max_new_tokens, **{**_DEFAULTS, **options, "on_token": record}):
        yield from events
        events.clear()


_DEFAULTS = dict(processors=(), do_sample=True, eos_id=None, stop_strings=(), tokenizer=None, seed=None,
                 generator=None, context_policy="slide", on_token=None)


@torch.no_grad()
def _run(model, prompts, max_new_tokens, *, processors, do_sample, eos_id, stop_strings, tokenizer, seed,
         generator, context_policy, on_token) -> Iterator[list[Generation]]:
    """Steps of the loop; yields after each step (results are filled in at the end).

    Rows stay aligned, so the tokens of every row live in one (B, longest + max_new_tokens)
    buffer written one column per step; a row's new tokens start at its prompt length.
    Per-row bookkeeping (done, finish reason, end position) exists only when a row can end
    early (eos_id, stop strings) or a callback needs it, so a plain loop adds ~6 tensor ops
    per step to the model's forward pass.
    """
    require_causal(model, "generation")
    prompts = _check_prompts(prompts)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to decode the text; pass tokenizer=")
    device = model.device
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())
    window = ContextWindow(model, context_policy)
    window.check_prompt(prompts)
    B = len(prompts)
    results = [Generation(prompt_ids=p) for p in prompts]
    plen = [len(p) for p in prompts]
    lengths = torch.tensor(plen, device=device)
    longest, common = max(plen), min(plen)
    seq = torch.zeros(B, longest + max_new_tokens, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        seq[i, : len(p)] = torch.tensor(p, device=device)
    prompt_cols = seq[:, :longest].clone()  # forced tokens while a row is still in its prompt
    logps = torch.zeros(B, longest + max_new_tokens, dtype=torch.float32, device=device)
    per_row_python = on_token is not None or bool(stop_strings)
    scans = [StopScan(tokenizer, p, stop_strings) for p in prompts] if stop_strings else None
    track = eos_id is not None or per_row_python
    limit = lengths + max_new_tokens  # a row's tokens end before position limit[b]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    end = limit.clone()  # one past a row's last new token
    finish = torch.full((B,), 2, dtype=torch.long, device=device)  # 1 eos, 2 length, 3 stop
    last_position = longest + max_new_tokens - 1
    position = common  # column of the token chosen this step
    may_skip = track or longest != common  # can a row not be choosing at some step?
    if max_new_tokens > 0:
        logits, state = window.step(seq[:, :0], None, seq[:, :common])
    while max_new_tokens > 0:
        next_logits = logits.float()
        if processors:
            num_generated = (position - lengths).clamp_min(0)
            scores = apply_processors(processors, next_logits, seq[:, :position], num_generated=num_generated)
        else:
            scores = next_logits
        # Rows still reading their prompt, finished or past their budget discard their pick: only
        # the rows that choose a token now must have one to choose (the picks raise otherwise).
        # With prompts of one length and no early end, every row chooses at every step.
        if may_skip:
            choosing = (position >= lengths) & (position < limit) & ~done
            scores = torch.where(choosing[:, None], scores, 0.0)
        chosen = sample_pick(scores, generator) if do_sample else greedy_pick(scores)
        if position < longest:
            chosen = torch.where(position < lengths, prompt_cols[:, position], chosen)
        seq[:, position] = chosen
        logps[:, position] = torch.log_softmax(next_logits, dim=-1).gather(1, chosen[:, None]).squeeze(1)
        if track:
            generating = choosing
            if eos_id is not None:
                hit = generating & (chosen == eos_id)
                finish = torch.where(hit, 1, finish)
                end = torch.where(hit, position + 1, end)
                done |= hit
            if per_row_python:
                for row in generating.nonzero().flatten().tolist():
                    if on_token is not None:
                        on_token(row, int(chosen[row]))
                    if scans is not None and not done[row] and scans[row].add(int(chosen[row])):
                        finish[row], end[row], done[row] = 3, position + 1, True
        yield results
        if position >= last_position or (track and bool((done | (limit <= position + 1)).all())):
            break
        logits, state = window.step(seq[:, :position], state, seq[:, position : position + 1])
        position += 1
    reasons = {1: "eos", 2: "length", 3: "stop"}
    seq_cpu, logps_cpu, end_cpu, finish_cpu = seq.tolist(), logps.tolist(), end.tolist(), finish.tolist()
    for i, r in enumerate(results):
        r.token_ids = seq_cpu[i][plen[i] : end_cpu[i]]
        r.logprobs = logps_cpu[i][plen[i] : end_cpu[i]]
        r.finish_reason = reasons[finish_cpu[i]]
    if tokenizer is not None:
        for r in results:
            r.text = finished_text(tokenizer, r.prompt_ids, r.token_ids, r.finish_reason, stop_strings)
    yield results


def finished_text(tokenizer, prompt_ids: Sequence[int], token_ids: Sequence[int], finish_reason: str,
                  stop_strings: Sequence[str] = ()) -> str:
    """The text a finished row adds after its prompt (``continuation_text``): without its <eos>
    ("eos"), cut before the first stop string ("stop")."""
    ids = list(token_ids[:-1]) if finish_reason == "eos" else list(token_ids)
    text = continuation_text(tokenizer, prompt_ids, ids)
    if finish_reason == "stop":
        text = text[: min(text.index(s) for s in stop_strings if s in text)]
    return text
