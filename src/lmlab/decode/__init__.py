"""Decoding: logits processors (``processors``) and searches (``search``).

    procs = build_processors(temperature=0.8, top_p=0.95, repetition_penalty=1.2)
    logits = apply_processors(procs, logits, ids, num_generated=n)   # (B, V)
    next_ids = sample_pick(logits, generator)                         # (B,)

    nbest = beam_search(model, [[1, 2, 3], [4, 5]], num_beams=4, max_new_tokens=20, eos_id=0)
"""

from lmlab.decode.processors import (
    EpsilonCutoff,
    EtaCutoff,
    ForceEOS,
    FrequencyPenalty,
    LogitBias,
    LogitsProcessor,
    MinNewTokens,
    MinP,
    NoRepeatNGram,
    PresencePenalty,
    RepetitionPenalty,
    SuppressTokens,
    Temperature,
    TopK,
    TopP,
    TypicalP,
    apply_processors,
    build_processors,
)
from lmlab.decode.search import Hypothesis, beam_search, greedy_pick, sample_pick
from lmlab.decode.setups import DecodingSetup, Result, run_setup
from lmlab.decode.tasks import complete, next_n_nll, predict

__all__ = [
    "DecodingSetup",
    "Result",
    "run_setup",
    "complete",
    "next_n_nll",
    "predict",
    "EpsilonCutoff",
    "EtaCutoff",
    "ForceEOS",
    "FrequencyPenalty",
    "Hypothesis",
    "LogitBias",
    "LogitsProcessor",
    "MinNewTokens",
    "MinP",
    "NoRepeatNGram",
    "PresencePenalty",
    "RepetitionPenalty",
    "SuppressTokens",
    "Temperature",
    "TopK",
    "TopP",
    "TypicalP",
    "apply_processors",
    "beam_search",
    "build_processors",
    "greedy_pick",
    "sample_pick",
]
