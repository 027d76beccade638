"""Beam search with penalties gives Hugging Face's sequences and scores: both apply the
logits processors to the log-softmax scores (greedy and sampling apply them to the logits)."""

import logging

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from lmlab.decode.processors import build_processors  # noqa: E402
from lmlab.decode.search import beam_search  # noqa: E402
from lmlab.decode.setups import DecodingSetup, run_setup  # noqa: E402
from lmlab.hf import HFModel  # noqa: E402

hf_logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

V, EOS, P = 48, 7, 5


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    # small initializer_range: flat distributions, so the penalties change which beams win
    cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.08,
                     bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


PROMPTS = torch.tensor([[3, 9, 9, 4, 3], [11, 12, 11, 12, 11], [20, 21, 22, 20, 21], [5, 5, 5, 5, 6]])
CASES = [
    dict(repetition_penalty=1.5),
    dict(repetition_penalty=0.7),
    dict(no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=1),
    dict(repetition_penalty=1.3, no_repeat_ngram_size=3),
]


def _hf(gpt2, num_beams, length_penalty, options, max_new=10):
    out = gpt2.generate(PROMPTS, max_new_tokens=max_new, do_sample=False, num_beams=num_beams,
                        num_return_sequences=num_beams, length_penalty=length_penalty, early_stopping=True,
                        eos_token_id=EOS, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                        attention_mask=torch.ones_like(PROMPTS), **options)
    rows = []
    for row in out.sequences[:, P:].tolist():
        rows.append(row[: row.index(EOS) + 1] if EOS in row else row)  # padding follows an EOS only
    return rows, out.sequences_scores.tolist()


@pytest.mark.parametrize("options", CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("num_beams, length_penalty", [(4, 1.0), (3, 0.5)])
def test_beam_search_with_penalties_matches_hugging_face(gpt2, options, num_beams, length_penalty):
    ref_rows, ref_scores = _hf(gpt2, num_beams, length_penalty, options)
    model = HFModel(gpt2)
    hyps = beam_search(model, PROMPTS, num_beams, 10, eos_id=EOS, length_penalty=length_penalty,
                       num_return_sequences=num_beams, processors=build_processors(**options))
    assert [h.tokens for hs in hyps for h in hs] == ref_rows
    assert [h.score for hs in hyps for h in hs] == pytest.approx(ref_scores, abs=1e-4)
    # the same through a DecodingSetup (no special token banned, as in Hugging Face)
    setup = DecodingSetup(num_beams=num_beams, num_return_sequences=num_beams, length_penalty=length_penalty,
                          suppress_specials="none", **options)
    results = run_setup(model, None, PROMPTS.tolist(), setup, 10, eos_id=EOS)
    assert [r.token_ids for rs in results for r in rs] == ref_rows
    assert [r.score for rs in results for r in rs] == pytest.approx(ref_scores, abs=1e-4)


def test_a_hugging_face_model_declares_its_config_specials(gpt2):
    assert HFModel(gpt2).special_ids == {"pad": 0, "bos": 1, "eos": EOS}
    other = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                       bos_token_id=None, eos_token_id=[5, 6], pad_token_id=None))
    assert HFModel(other).special_ids == {"eos": 5}  # the first of a list ends a row


def test_the_old_order_gives_other_beams(gpt2):
    """Renormalising the penalised logits (the generation loop's order) is another search: the
    cases above would not all pass with it, so the test can tell the two orders apart."""
    model = HFModel(gpt2)
    differ = 0
    for options in CASES:
        ref_rows, ref_scores = _hf(gpt2, 4, 1.0, options)
        procs = build_processors(**options)
        renormalised = [lambda logp, ids, p=p: torch.log_softmax(p(logp, ids, num_generated=None), -1) for p in procs]
        hyps = beam_search(model, PROMPTS, 4, 10, eos_id=EOS, num_return_sequences=4, processors=renormalised)
        rows, scores = [h.tokens for hs in hyps for h in hs], [h.score for hs in hyps for h in hs]
        differ += rows != ref_rows or any(abs(a - b) > 1e-4 for a, b in zip(scores, ref_scores))
    assert differ >= 3
