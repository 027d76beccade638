"""Searches: how the next token is chosen from processed logits.

    greedy_pick(logits)                -> (B,) argmax
    sample_pick(logits, generator)     -> (B,) one draw from softmax(logits)
    draw(probs, sampling_noise(...))   -> (B,) the same draw in two parts, for rows whose noise
                                          comes from different generators (the serving loop)
    beam_search(model, prompts, ...)   -> per prompt, an n-best list of Hypothesis

The picks are the per-step pieces of a generation loop (``decode/generate.py``);
``beam_search`` is a whole loop of its own written against the model interface
only: ``logits, state = model(ids, state)`` and ``state.select(index)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Callable, Sequence

import torch

from lmlab.decode.processors import _token_list, apply_processors
from lmlab.models.base import require_causal

Tensor = torch.Tensor
NEG_INF = float("-inf")

__all__ = ["Hypothesis", "greedy_pick", "sample_pick", "sampling_noise", "draw", "beam_search"]


# ---------------------------------------------------------------- picks


def _check_pickable(logits: Tensor, rows: Tensor | None = None, best: Tensor | None = None) -> None:
    """ValueError naming the rows (of those where ``rows`` is True; default all) that have
    no token to pick: every entry -inf, or a NaN or +inf entry. ``best``: the rows' maxima
    when already computed (a row is pickable exactly when its max is finite: max propagates NaN)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (B, V), got shape {tuple(logits.shape)}")
    if best is None:
        best = logits.amax(dim=-1)
    if rows is not None:
        best = torch.where(rows, best, 0.0)
    if math.isfinite(float(best.float().sum())):  # the usual case, in one reduction and one read
        return
    bad = ~torch.isfinite(best)
    if bool(bad.any()):  # (else the sum overflowed and every row is fine)
        raise ValueError(
            f"rows {bad.nonzero().flatten().tolist()[:10]} of the logits have no token to pick (all -inf, or "
            "NaN/+inf entries); every row needs at least one finite logit and no NaN or +inf — check the "
            "processors' bans"
        )


def greedy_pick(logits: Tensor) -> Tensor:
    """logits (B, V) -> (B,) int64 argmax per row (first index on a tie).
    Rows with no finite logit or with NaN raise ValueError."""
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (B, V), got shape {tuple(logits.shape)}")
    best, index = logits.max(dim=-1)
    _check_pickable(logits, best=best)
    return index


def sample_pick(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """logits (B, V) -> (B,) int64, one draw per row from softmax(logits) with
    ``generator`` (on the logits' device; None uses torch's global RNG).
    Rows with no finite logit or with NaN raise ValueError."""
    _check_pickable(logits)
    probs = torch.softmax(logits.float(), dim=-1)
    return draw(probs, sampling_noise(probs.shape[0], probs.shape[1], generator, probs.device))


def sampling_noise(rows: int, vocab: int, generator: torch.Generator | None, device=None) -> Tensor:
    """(rows, vocab) float32 draws from Exp(1) with ``generator``: what ``draw`` divides by."""
    return torch.empty(rows, vocab, device=device).exponential_(1, generator=generator)


def draw(probs: Tensor, noise: Tensor) -> Tensor:
    """probs (B, V) float32, noise (B, V) from ``sampling_noise`` -> (B,) int64: per row the
    index of the largest probs / noise, a draw from that row (the exponential race: the
    Gumbel-max trick with the logarithms left out).

    It is the draw ``torch.multinomial(probs, 1, generator=g)`` makes, which computes
    exactly this with noise from ``g`` (tested); split in two, the rows of one batch can take
    their noise from generators of their own and still be picked in one operation.
    """
    return (probs / noise).argmax(dim=-1)


# ---------------------------------------------------------------- beam search


@dataclass
class Hypothesis:
    """One finished beam.

    tokens: the generated ids (prompt excluded), EOS last when ``finished``.
    token_logprobs: the search's score of each token, ``processors(log_softmax(logits))``
        at that token (Hugging Face's order: the processors act on the model's
        log-probabilities, which are not renormalised afterwards); the model's own
        log-probability with no processors, and wherever only bans act.
    sum_logprob: sum of token_logprobs.
    score: sum_logprob / len(tokens) ** length_penalty (the ranking key).
    finished: ended with EOS (False: stopped at max_new_tokens).
    group: the beam group that found it.
    """

    tokens: list[int]
    token_logprobs: list[float]
    sum_logprob: float
    score: float
    finished: bool
    group: int = 0


@dataclass
class _Hyps:
    """The best ``capacity`` hypotheses of one (prompt, group), best first."""

    capacity: int
    items: list[Hypothesis] = field(default_factory=list)

    def add(self, hyp: Hypothesis) -> None:
        if len(self.items) < self.capacity or hyp.score > self.items[-1].score:
            self.items.append(hyp)
            self.items.sort(key=lambda h: h.score, reverse=True)
            del self.items[self.capacity :]

    def is_done(self, best_running: float, n_gen: int, early_stopping, length_penalty: float, max_new: int) -> bool:
        """Can no running beam (best cumulative log-prob ``best_running`` after
        ``n_gen`` tokens) still improve this list?"""
        if best_running == NEG_INF:
            return True
        if len(self.items) < self.capacity:
            return False
        if early_stopping is True:
            return True
        if early_stopping == "never":  # an exact bound: log-probs only decrease
            length = max_new if length_penalty > 0 else n_gen + 1
        else:  # False: Hugging Face's heuristic, as if the best beam stopped now
            length = n_gen
        return self.items[-1].score >= best_running / length**length_penalty


def _prompt_lists(prompt_ids) -> list[list[int]]:
    if isinstance(prompt_ids, Tensor):
        if prompt_ids.ndim != 2:
            raise ValueError(f"prompt_ids as a tensor must have shape (B, T), got {tuple(prompt_ids.shape)}")
        return prompt_ids.tolist()
    try:
        prompts = [list(p) for p in prompt_ids]
    except TypeError:
        raise ValueError(
            "prompt_ids must be a (B, T) int64 tensor or a list of token-id lists, e.g. [[1, 2, 3]]; "
            f"got {type(prompt_ids).__name__} holding non-lists"
        ) from None
    return prompts


def beam_search(
    model: Callable,
    prompt_ids: Tensor | Sequence[Sequence[int]],
    num_beams: int,
    max_new_tokens: int,
    eos_id: int | Sequence[int] | None = None,
    length_penalty: float = 1.0,
    early_stopping: bool | str = True,
    num_return_sequences: int = 1,
    num_beam_groups: int = 1,
    diversity_penalty: float = 0.0,
    processors: Sequence[Callable] | None = None,
) -> list[list[Hypothesis]]:
    """Beam search over ``model`` for each prompt; returns, per prompt, up to
    ``num_return_sequences`` hypotheses, best score first.

    model: ``logits, state = model(ids (N, T), state)`` with logits (N, T, V).
    prompt_ids: (B, T) tensor or B lists of ids (lengths may differ, each >= 1).
        The shortest length is fed in one call; longer prompts then feed their
        remaining tokens one per step (forced, no score) while others generate,
        so all B * num_beams rows go through the model in one call per step.
    eos_id: an id or a list of ids ending a hypothesis (None: none; hypotheses
        then all have max_new_tokens tokens).
    length_penalty: score = sum_logprob / len ** length_penalty, len counting
        the generated tokens including EOS (Hugging Face's rule).
    early_stopping: True: a prompt stops once each group has num_beams/groups
        finished hypotheses; False: also stops when the best running beam,
        scored at its current length, cannot beat the worst kept (HF heuristic);
        "never": only when no running beam can possibly beat it (exact).
    num_beam_groups, diversity_penalty: diverse beam search (Vijayakumar et al.
        2016): beams split into groups searched in turn; at each step group g
        ranks candidates by score - diversity_penalty * (times the token was
        chosen at this step by groups < g). The penalty steers the choice only:
        scores and sum_logprob stay true log-probabilities.
    processors: applied to each step's log-probabilities ``log_softmax(logits)``
        (rows = prompt + generated ids, ``num_generated`` passed), as Hugging Face's
        beam search does; the result is not renormalised. A live beam left with no
        allowed token (every score -inf) raises ValueError, as greedy and sampling do.

    As in Hugging Face, each step keeps the (1 + #eos) * beams-per-group best
    candidates per group; an EOS candidate among the first beams-per-group
    becomes a hypothesis, the best non-EOS ones become the next beams. Beams
    whose probability is 0 (e.g. cut by top-k) are dropped, so a prompt may get
    fewer than num_return_sequences hypotheses. With num_beams=1 (and the
    default early_stopping) the result is the greedy continuation (with processors:
    greedy on the processed log-probabilities, which differs from greedy on processed
    logits only for ``RepetitionPenalty``, whose effect depends on the sign of what it scales).
    """
    require_causal(model, "beam search")
    if isinstance(num_beams, bool) or not isinstance(num_beams, Integral) or num_beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if (
        isinstance(num_beam_groups, bool)
        or not isinstance(num_beam_groups, Integral)
        or num_beam_groups < 1
        or num_beams % num_beam_groups
    ):
        raise ValueError(
            f"num_beam_groups must be an integer >= 1 dividing num_beams={num_beams}, got {num_beam_groups!r}"
        )
    if (
        isinstance(num_return_sequences, bool)
        or not isinstance(num_return_sequences, Integral)
        or not 1 <= num_return_sequences <= num_beams
    ):
        raise ValueError(
            f"num_return_sequences must be an integer in [1, num_beams={num_beams}], got {num_return_sequences!r}"
        )
    for name, value in (("length_penalty", length_penalty), ("diversity_penalty", diversity_penalty)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite real number, got {value!r}")
    if diversity_penalty < 0:
        raise ValueError(f"diversity_penalty must be >= 0, got {diversity_penalty!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    eos = _token_list("eos_id", eos_id) if eos_id is not None else ()

    prompts = _prompt_lists(prompt_ids)
    if not prompts:
        raise ValueError("prompt_ids is empty; give at least one prompt")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. a <bos> id)")
        if any(isinstance(t, bool) or not isinstance(t, Integral) or t < 0 for t in p):
            raise ValueError(f"prompt {i} must hold token ids (integers >= 0), got {p!r}")

    B, K, G = len(prompts), int(num_beams), int(num_beam_groups)
    Kg = K // G
    lengths = [len(p) for p in prompts]
    L0, Pmax = min(lengths), max(lengths)
    ctx = getattr(model, "max_context", None)
    if ctx is not None and Pmax + max_new_tokens - 1 > ctx:
        raise ValueError(
            f"the longest prompt ({Pmax} tokens) plus max_new_tokens={max_new_tokens} needs "
            f"{Pmax + max_new_tokens - 1} positions, more than the model's max_context={ctx}; "
            f"accepted: max_new_tokens <= {ctx - Pmax + 1}"
        )
    device = getattr(model, "device", torch.device("cpu"))
    padded = torch.zeros(B, Pmax, dtype=torch.long)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    padded = padded.to(device)

    def check_vocab(V: int) -> None:
        bad = [t for p in prompts for t in p if t >= V] + [t for t in eos if t >= V]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the model's vocabulary of size V={V}")

    try:
        declared_V = int(model.vocab_size)
    except (AttributeError, TypeError, ValueError):
        declared_V = None
    if declared_V is not None:
        check_vocab(declared_V)

    with torch.no_grad():
        logits, state = model(padded[:, :L0], None)
        if logits.ndim != 3 or logits.shape[:2] != (B, L0):
            raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}; expected ({B}, {L0}, V)")
        V = logits.shape[-1]
        check_vocab(V)
        n_cand = min((1 + len(eos)) * Kg, Kg * V)
        eos_t = torch.tensor(eos, dtype=torch.long, device=device)
        ar_k = torch.arange(K, device=device)

        rows = torch.arange(B, device=device).repeat_interleave(K)
        next_logits = logits[:, -1][rows]
        state = state.select(rows)
        hist = padded[:, :L0][rows]  # (R, L) tokens fed so far, R = active prompts * K
        lp_hist = torch.zeros(B * K, L0, device=device)  # their log-probs (0 for prompt tokens)
        scores = torch.full((B, G, Kg), NEG_INF, device=device)
        scores[:, :, 0] = 0.0  # beams start as copies: only the first of each group is live
        active = list(range(B))
        store = [[_Hyps(Kg) for _ in range(G)] for _ in range(B)]
        rank = torch.arange(n_cand, device=device)

        while True:
            A, L = len(active), hist.shape[1]
            plen = [lengths[a] for a in active]
            generating = [p <= L for p in plen]
            plen_t = torch.tensor(plen, device=device)
            num_gen = (L - plen_t).repeat_interleave(K)
            # Hugging Face's order: the processors act on the model's log-probabilities (no renormalisation).
            logprobs = torch.log_softmax(next_logits.float(), dim=-1)
            if processors:
                logprobs = apply_processors(processors, logprobs, hist, num_generated=num_gen)
                choosing = (scores > NEG_INF).reshape(A, K) & torch.tensor(generating, device=device)[:, None]
                _check_pickable(logprobs, choosing.reshape(-1))  # a live beam with nothing allowed
            logprobs = torch.where(torch.isnan(logprobs), NEG_INF, logprobs).view(A, G, Kg, V)
            total = scores.unsqueeze(-1) + logprobs  # (A, G, Kg, V) cumulative log-probs
            chosen = torch.zeros(A, V, device=device) if G > 1 and diversity_penalty > 0 else None

            parents, toks, new_scores, tok_lps, finals = [], [], [], [], []
            for g in range(G):
                flat = total[:, g].reshape(A, Kg * V)
                sel = flat
                if chosen is not None and g > 0:
                    sel = (total[:, g] - diversity_penalty * chosen[:, None, :]).reshape(A, Kg * V)
                top_sel, top_idx = torch.topk(sel, n_cand, dim=-1)  # (A, n_cand), best first
                beam, tok = top_idx // V, top_idx % V
                true = flat.gather(1, top_idx)
                clp = logprobs[:, g].reshape(A, Kg * V).gather(1, top_idx)
                is_eos = torch.isin(tok, eos_t) if eos else torch.zeros_like(tok, dtype=torch.bool)
                alive = top_sel > NEG_INF
                finals.append((is_eos & alive & (rank < Kg), beam + g * Kg, tok, clp))
                order = torch.sort(is_eos.to(torch.int8), dim=1, stable=True).indices[:, :Kg]
                dead = is_eos.gather(1, order) | ~alive.gather(1, order)
                parents.append(beam.gather(1, order) + g * Kg)
                toks.append(tok.gather(1, order))
                new_scores.append(true.gather(1, order).masked_fill(dead, NEG_INF))
                tok_lps.append(clp.gather(1, order))
                if chosen is not None:
                    chosen.scatter_add_(1, toks[-1], (~dead).float())
            parent = torch.cat(parents, 1)  # (A, K) beam index within the prompt
            tok = torch.cat(toks, 1)
            tok_lp = torch.cat(tok_lps, 1)
            new = torch.stack(new_scores, 1)  # (A, G, Kg)

            if not all(generating):  # prompts still feeding their own tokens
                forced = torch.tensor([not g for g in generating], device=device)
                act_t = torch.tensor(active, device=device)
                forced_tok = padded[act_t, min(L, Pmax - 1)]
                parent = torch.where(forced[:, None], ar_k, parent)
                tok = torch.where(forced[:, None], forced_tok[:, None], tok)
                tok_lp = torch.where(forced[:, None], 0.0, tok_lp)
                new = torch.where(forced[:, None, None], scores, new)
            row_parent = (torch.arange(A, device=device)[:, None] * K + parent).reshape(-1)

            # EOS candidates -> hypotheses (built from the parent rows, before reordering)
            fin = torch.stack([f[0] for f in finals], 1) & torch.tensor(generating, device=device)[:, None, None]
            events = fin.nonzero().tolist()  # [a, g, c]
            if events:
                ev = torch.tensor(events, device=device)
                cand_beam = torch.stack([f[1] for f in finals], 1)[ev[:, 0], ev[:, 1], ev[:, 2]]
                cand_tok = torch.stack([f[2] for f in finals], 1)[ev[:, 0], ev[:, 1], ev[:, 2]].tolist()
                cand_lp = torch.stack([f[3] for f in finals], 1)[ev[:, 0], ev[:, 1], ev[:, 2]].tolist()
                ev_rows = ev[:, 0] * K + cand_beam
                ev_hist, ev_lps = hist[ev_rows].tolist(), lp_hist[ev_rows].tolist()
                for j, (i, g, _) in enumerate(events):
                    p = plen[i]
                    store[active[i]][g].add(
                        _make_hyp(ev_hist[j][p:] + [cand_tok[j]], ev_lps[j][p:] + [cand_lp[j]], length_penalty, True, g)
                    )

            hist = torch.cat([hist[row_parent], tok.reshape(-1, 1)], 1)
            lp_hist = torch.cat([lp_hist[row_parent], tok_lp.reshape(-1, 1)], 1)
            scores = new

            # which prompts are finished
            new_cpu = new.cpu()
            done, to_finalize = [], []
            for i, a in enumerate(active):
                if not generating[i]:
                    continue
                n_gen = L + 1 - plen[i]
                if n_gen >= max_new_tokens:
                    done.append(i)
                    to_finalize.append(i)
                elif all(
                    store[a][g].is_done(
                        float(new_cpu[i, g].max()), n_gen, early_stopping, length_penalty, max_new_tokens
                    )
                    for g in range(G)
                ):
                    done.append(i)
            if to_finalize:  # out of steps: running beams become hypotheses
                fin_rows = torch.tensor([i * K + k for i in to_finalize for k in range(K)], device=device)
                f_hist, f_lps = hist[fin_rows].tolist(), lp_hist[fin_rows].tolist()
                for n, i in enumerate(to_finalize):
                    for k in range(K):
                        g, s = divmod(k, Kg)
                        if new_cpu[i, g, s] > NEG_INF:
                            p = plen[i]
                            store[active[i]][g].add(
                                _make_hyp(f_hist[n * K + k][p:], f_lps[n * K + k][p:], length_penalty, False, g)
                            )
            if len(done) == A:
                break
            if done:
                keep = [i for i in range(A) if i not in set(done)]
                keep_t = torch.tensor(keep, device=device)
                keep_rows = (keep_t[:, None] * K + ar_k).reshape(-1)
                row_parent, hist, lp_hist = row_parent[keep_rows], hist[keep_rows], lp_hist[keep_rows]
                scores, tok = scores[keep_t], tok[keep_t]
                active = [active[i] for i in keep]
            logits, state = model(tok.reshape(-1, 1), state.select(row_parent))
            next_logits = logits[:, -1]

    out = []
    for b in range(B):
        hyps = [h for group in store[b] for h in group.items]
        hyps.sort(key=lambda h: h.score, reverse=True)
        out.append(hyps[:num_return_sequences])
    return out


def _make_hyp(tokens: list[int], logprobs: list[float], length_penalty: float, finished: bool, group: int) -> Hypothesis:
    total = math.fsum(logprobs)
    return Hypothesis(
        tokens=[int(t) for t in tokens],
        token_logprobs=logprobs,
        sum_logprob=total,
        score=total / len(tokens) ** length_penalty,
        finished=finished,
        group=group,
    )
