"""Two named tasks from the classic character-LM exercise, and a teacher-forced NLL.

    logits = predict(model, prompts, n)              # (B, n, V): raw logits at n greedy steps
    seqs = complete(model, prompts, n, seed=0)       # each prompt + exactly n ordinary tokens
    nll = next_n_nll(model, prompts, true_next)      # mean NLL per token, true tokens fed

``predict`` follows the model's own greedy path: step 0's logits come after
the prompt, step i's after the prompt and the first i greedy tokens (the
argmax of steps 0..i-1). ``next_n_nll`` feeds the *true* tokens instead
(teacher forcing), which is what "the NLL of the next n characters" means.
Both agree at step 0 and wherever the greedy token equals the true one; after
the first disagreement predict's logits are conditioned on a context the text
never had, so an NLL computed from them is not the text's NLL.

Prompts are lists of token ids and may have different lengths; as in
``generate`` the common prefix goes through the model in one call and every
row then consumes one token per step, so no padding or mask is involved.
Contexts longer than the model's are handled by ``context_policy`` ("slide":
the most recent tokens; "error": refuse).

Text prompts (``lmlab generate --task``) go through :func:`split_prompt`
first: a prompt's trailing whitespace is not context but the start of the
continuation, so ``"the cat "`` and ``"the cat"`` are the same prompt for every
tokenizer. For word tokenizers blanks are not tokens anyway; for characters
and BPE this means the model itself predicts the blank after the prompt's last
visible character (a ``--target`` gets the blank in front, so the text scored
is unchanged), and a BPE prompt never ends in a lone space token (such
tokenizers attach the space to the next word).
"""

from __future__ import annotations

from numbers import Integral
from typing import Callable, Sequence

import torch

from lmlab.decode.generate import ContextWindow, generate
from lmlab.decode.processors import SuppressTokens
from lmlab.models.base import special_token_ids

__all__ = ["predict", "complete", "next_n_nll", "step_logits", "split_prompt"]

Tensor = torch.Tensor


_BLANKS = " \t\n\r\v\f"


def split_prompt(prompt: str, target: str | None = None) -> tuple[str, str | None]:
    """(prompt without its trailing whitespace, that whitespace + target): the context
    ends at the prompt's last non-blank character and the blanks belong to the
    continuation (dropped when there is no target). A prompt of blanks only is kept."""
    context = prompt.rstrip(_BLANKS)
    if not context:
        return prompt, target
    return context, None if target is None else prompt[len(context):] + target


def _prompt_lists(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        if prompts.ndim != 2:
            raise ValueError(f"prompts as a tensor must have shape (B, T), got {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a list of token-id lists, e.g. [[5, 6, 7]], got {prompts!r}")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            raise ValueError(f"prompt {i} is text ({p!r}); the tasks take token ids: tokenizer.encode(text)")
        ids = [int(t) for t in p]
        if not ids:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. the <bos> id)")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} holds token id {bad[0]}, outside the vocabulary 0..{vocab_size - 1}")
        out.append(ids)
    if not out:
        raise ValueError("no prompts given; pass at least one list of token ids")
    return out


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, Integral) or n < 1:
        raise ValueError(f"n must be an integer >= 1 (tokens to predict), got {n!r}")
    return int(n)


@torch.no_grad()
def step_logits(
    model,
    prompts: Sequence[Sequence[int]],
    n: int,
    choose: Callable[[Tensor, Tensor], Tensor],
    context_policy: str = "slide",
) -> Tensor:
    """The (B, n, V) next-token logits of n steps after each prompt, the token fed
    after step i being ``choose(logits_i (B, V), i (B,))`` -> (B,) int64.

    ``predict`` chooses the argmax, ``next_n_nll`` the true tokens. Rows whose
    prompt is longer keep feeding their own prompt tokens meanwhile (``i`` is
    negative for them; their choice is ignored).
    """
    n = _check_n(n)
    V = int(model.vocab_size)
    prompts = _prompt_lists(prompts, V)
    device = model.device
    window = ContextWindow(model, context_policy)
    window.check_prompt(prompts)
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    longest, common = int(lengths.max()), int(lengths.min())
    padded = torch.zeros(B, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    history = padded[:, :common]
    logits, state = window.step(history[:, :0], None, history)
    out = torch.empty(B, n, logits.shape[-1], dtype=torch.float32, device=device)
    rows = torch.arange(B, device=device)
    position = common  # index of the next token to feed
    last_position = longest + n - 1  # every row has its n logits once position reaches this
    while True:
        last = logits.float()
        step = position - lengths  # (B,): the step whose logits these are (< 0: still in the prompt)
        ready = (step >= 0) & (step < n)
        out[rows[ready], step[ready]] = last[ready]
        if position >= last_position:
            break
        chosen = choose(last, step)
        if position < longest:
            chosen = torch.where(position < lengths, padded[:, position], chosen)
        feed = chosen[:, None].to(torch.long)
        logits, state = window.step(history, state, feed)
        history = torch.cat([history, feed], dim=1)
        position += 1
    return out


def predict(model, prompts: Sequence[Sequence[int]], n: int, context_policy: str = "slide") -> Tensor:
    """Raw next-token logits at each of ``n`` greedy steps: (B, n, V) float32.

    ``out[b, 0]`` are the logits after prompt b; the greedy token of step i is
    ``out[b, i].argmax()`` (first index on a tie) and is what is fed before
    step i + 1, so ``out.argmax(-1)`` is the greedy continuation (B, n). No
    processors, no special-token bans: the model's own logits.

    To score the true next n tokens use ``next_n_nll``, which feeds the true
    tokens (teacher forcing); predict's logits after step 0 are conditioned on
    the greedy guesses instead.
    """
    return step_logits(model, prompts, n, lambda logits, step: logits.argmax(dim=-1), context_policy)


def _specials(model, tokenizer=None, special_ids: Sequence[int] | None = None) -> list[int]:
    model_vocab = int(model.vocab_size)
    if special_ids is None:
        special_ids = list(special_token_ids(model, tokenizer).values())
    ids = sorted({int(t) for t in special_ids if t is not None and 0 <= int(t) < model_vocab})
    if len(ids) >= model_vocab:
        raise ValueError(
            f"every token of the vocabulary (V={model_vocab}) is a special token {ids}; nothing is left to sample"
        )
    return ids


def complete(
    model,
    prompts: Sequence[Sequence[int]],
    n: int,
    seed: int | None = None,
    *,
    tokenizer=None,
    special_ids: Sequence[int] | None = None,
    processors: Sequence = (),
    generator: torch.Generator | None = None,
    context_policy: str = "slide",
) -> list[list[int]]:
    """Each prompt extended by exactly ``n`` tokens drawn from the model's
    distribution with the special tokens removed (renormalised over the rest):
    returns ``prompt + n new ids`` per prompt.

    special_ids: the banned ids (default: <pad>, <bos>, <eos>, <unk> of
        ``tokenizer``, or without one the model's declared ``special_ids``;
        none when neither declares any).
    processors: more logits processors, applied before the ban (e.g.
        ``[Temperature(0.8)]``).
    seed / generator: the randomness (same seed, same completions).
    """
    n = _check_n(n)
    V = int(model.vocab_size)
    prompts = _prompt_lists(prompts, V)
    banned = _specials(model, tokenizer, special_ids)
    procs = [*processors, SuppressTokens(tuple(banned))] if banned else list(processors)
    gens = generate(model, prompts, n, processors=procs, do_sample=True, eos_id=None, seed=seed,
                    generator=generator, context_policy=context_policy)
    return [p + g.token_ids for p, g in zip(prompts, gens)]


def next_n_nll(
    model,
    prompts: Sequence[Sequence[int]],
    true_next: Tensor | Sequence[Sequence[int]],
    reduction: str = "mean",
    context_policy: str = "slide",
) -> float | Tensor:
    """NLL of the true next tokens ``true_next`` (B, n) after each prompt, teacher-forced:
    token i is scored given the prompt and the true tokens 0..i-1.

    reduction: "mean" -> mean NLL per token (float, nats); "sum" -> total (float);
    "none" -> (B, n) tensor of per-token NLLs.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r}; accepted: 'mean', 'sum', 'none'")
    V = int(model.vocab_size)
    targets = torch.as_tensor(true_next, dtype=torch.long) if not isinstance(true_next, Tensor) else true_next.long()
    prompts = _prompt_lists(prompts, V)
    if targets.ndim != 2 or targets.shape[0] != len(prompts) or targets.shape[1] < 1:
        raise ValueError(
            f"true_next must have shape (B, n) with B={len(prompts)} prompts and n >= 1, got {tuple(targets.shape)}"
        )
    if bool(((targets < 0) | (targets >= V)).any()):
        bad = targets[(targets < 0) | (targets >= V)][0].item()
        raise ValueError(f"true_next holds token id {bad}, outside the vocabulary 0..{V - 1}")
    targets = targets.to(model.device)
    n = targets.shape[1]
    rows = torch.arange(len(prompts), device=model.device)

    def teacher(logits: Tensor, step: Tensor) -> Tensor:
        return targets[rows, step.clamp(0, n - 1)]

    logits = step_logits(model, prompts, n, teacher, context_policy)
    nll = -torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    if reduction == "none":
        return nll
    total = nll.double().sum()
    return float(total / nll.numel()) if reduction == "mean" else float(total)
