"""predict / complete / next_n_nll: the classic exercise's tasks."""

import math

import pytest
import torch

from lmlab.decode.generate import generate
from lmlab.decode.processors import LogitBias
from lmlab.decode.tasks import complete, next_n_nll, predict
from lmlab.models import build_model
from lmlab.models.transformer import TransformerConfig
from lmlab.tokenizers import CharTokenizer


def tiny_transformer(block_size=32, V=13):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=V, block_size=block_size, n_layer=2, n_head=2, n_embd=16)
    return build_model("transformer", cfg).eval()


def stepwise(model, prompt, n):
    """Reference: recompute the full (cropped) prefix each step and follow the argmax."""
    seq, out = list(prompt), []
    for _ in range(n):
        window = seq[-model.max_context:] if model.max_context else seq
        logits = model(torch.tensor([window]))[0][0, -1]
        out.append(logits)
        seq.append(int(logits.argmax()))
    return torch.stack(out)


def test_predict_shape_and_step_by_step_recomputation():
    model = tiny_transformer()
    prompts = [[4, 5, 6, 7, 8], [9], [4, 4, 10]]
    logits = predict(model, prompts, 6)
    assert logits.shape == (3, 6, 13) and logits.dtype == torch.float32
    for b, p in enumerate(prompts):
        assert torch.allclose(logits[b], stepwise(model, p, 6), atol=1e-5)
    greedy = generate(model, prompts, 6, do_sample=False)
    assert logits.argmax(-1).tolist() == [g.token_ids for g in greedy]


def test_predict_slides_past_the_context_and_can_refuse():
    model = tiny_transformer(block_size=8)
    logits = predict(model, [[4, 5, 6]], 10)
    assert torch.allclose(logits[0], stepwise(model, [4, 5, 6], 10), atol=1e-5)
    with pytest.raises(ValueError, match="context of 8"):
        predict(model, [[4, 5, 6]], 10, context_policy="error")


def test_predict_on_a_table_model_follows_the_greedy_path(bigram_table):
    logits = predict(bigram_table, [[3], [1, 4]], 4)
    table = bigram_table.table
    for b, last in enumerate([3, 4]):
        for i in range(4):
            assert torch.equal(logits[b, i], table[last])
            last = int(table[last].argmax())


def test_complete_gives_exactly_n_ordinary_tokens():
    model = tiny_transformer()
    tok = CharTokenizer(list("abcdefghi"))  # <pad> <bos> <eos> <unk> then 9 letters: V = 13
    prompts = [[4, 5, 6], [7]]
    push = LogitBias({0: 40.0, 1: 40.0, 2: 40.0, 3: 40.0})  # specials would win every draw
    out = complete(model, prompts, 25, seed=0, processors=[push], tokenizer=tok)
    for p, seq in zip(prompts, out):
        assert seq[: len(p)] == p and len(seq) == len(p) + 25
        assert min(seq[len(p):]) >= 4
    assert complete(model, prompts, 25, seed=0) == complete(model, prompts, 25, seed=0)
    assert complete(model, prompts, 25, seed=0) != complete(model, prompts, 25, seed=1)
    assert min(complete(model, [[5]], 30, seed=0, special_ids=[7, 8])[0][1:]) >= 0
    assert not {7, 8} & set(complete(model, [[5]], 30, seed=0, special_ids=[7, 8])[0][1:])


def test_complete_without_a_tokenizer_bans_only_declared_specials():
    """No tokenizer and no declared specials: ids 0..3 are ordinary tokens like any other."""
    model = tiny_transformer()
    push = LogitBias({0: 40.0, 1: 40.0})
    (seq,) = complete(model, [[4]], 20, seed=0, processors=[push])
    assert set(seq[1:]) <= {0, 1} and {0, 1} <= set(seq[1:])

    class Declared(type(model)):
        special_ids = {"bos": 0, "eos": 1}

    model.__class__ = Declared  # the same weights, now declaring <bos> 0 and <eos> 1
    (seq,) = complete(model, [[4]], 20, seed=0, processors=[push])
    assert min(seq[1:]) >= 2


def test_complete_draws_from_the_renormalised_distribution(bigram_table):
    # token 4 follows 5 with probability p(4|5) / (1 - p(banned|5)) once the specials 0..3 are removed
    logits = bigram_table.table[5]
    probs = torch.softmax(logits[4:], -1)
    out = complete(bigram_table, [[5]] * 4000, 1, seed=0, special_ids=[0, 1, 2, 3])
    freq = torch.bincount(torch.tensor([s[1] for s in out]), minlength=6)[4:].float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_next_n_nll_is_exact_on_a_table_model(bigram_table):
    prompts = [[3], [1, 5, 0]]
    true_next = torch.tensor([[4, 4, 2], [1, 3, 5]])
    logp = torch.log_softmax(bigram_table.table.double(), -1)
    expected = []
    for p, t in zip(prompts, true_next.tolist()):
        prev = p[-1]
        for tok in t:
            expected.append(-logp[prev, tok].item())
            prev = tok  # teacher forcing: the TRUE token is fed
    assert next_n_nll(bigram_table, prompts, true_next) == pytest.approx(sum(expected) / 6, abs=1e-5)
    assert next_n_nll(bigram_table, prompts, true_next.tolist(), reduction="sum") == pytest.approx(sum(expected), abs=1e-4)
    per_token = next_n_nll(bigram_table, prompts, true_next, reduction="none")
    assert per_token.shape == (2, 3)
    assert per_token.flatten().tolist() == pytest.approx(expected, abs=1e-5)


def test_teacher_forced_and_greedy_path_nll_agree_only_where_the_paths_agree(bigram_table):
    prompt = [[3]]
    n = 4
    greedy = predict(bigram_table, prompt, n)
    greedy_tokens = greedy.argmax(-1)
    on_greedy_path = lambda t: -torch.log_softmax(greedy[0], -1)[torch.arange(n), t[0]]  # noqa: E731
    # the true text IS the greedy path: both NLLs are the same
    same = next_n_nll(bigram_table, prompt, greedy_tokens, reduction="none")[0]
    assert torch.allclose(same, on_greedy_path(greedy_tokens), atol=1e-6)
    # a text that leaves the greedy path: step 0 agrees, later steps do not
    first = int(greedy_tokens[0, 0])
    other = next(t for t in range(6) if t != first and int(bigram_table.table[t].argmax()) != int(bigram_table.table[first].argmax()))
    true = torch.tensor([[other, 0, 0, 0]])
    forced = next_n_nll(bigram_table, prompt, true, reduction="none")[0]
    naive = on_greedy_path(true)
    assert forced[0] == pytest.approx(float(naive[0]), abs=1e-6)
    assert not torch.allclose(forced[1:], naive[1:])


def test_next_n_nll_with_a_transformer_equals_one_forward_pass():
    model = tiny_transformer()
    prompts = [[4, 5, 6], [7]]
    true_next = torch.tensor([[8, 9, 10, 11], [12, 4, 5, 6]])
    expected = []
    for p, t in zip(prompts, true_next.tolist()):
        ids = torch.tensor([p + t])
        logp = torch.log_softmax(model(ids[:, :-1])[0][0], -1)
        expected += [-logp[len(p) - 1 + i, tok].item() for i, tok in enumerate(t)]
    assert next_n_nll(model, prompts, true_next) == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def test_task_errors_name_the_bad_value(bigram_table):
    with pytest.raises(ValueError, match="n must be an integer >= 1.*got 0"):
        predict(bigram_table, [[1]], 0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        complete(bigram_table, [[1], []], 3)
    with pytest.raises(ValueError, match="prompt 0 holds token id 9, outside the vocabulary 0..5"):
        predict(bigram_table, [[9]], 2)
    with pytest.raises(ValueError, match=r"true_next must have shape \(B, n\) with B=2.*got \(1, 3\)"):
        next_n_nll(bigram_table, [[1], [2]], [[1, 2, 3]])
    with pytest.raises(ValueError, match="true_next holds token id 7"):
        next_n_nll(bigram_table, [[1]], [[1, 7]])
    with pytest.raises(ValueError, match="prompt 0 is text"):
        predict(bigram_table, ["abc"], 2)
    with pytest.raises(ValueError, match="reduction='avg'"):
        next_n_nll(bigram_table, [[1]], [[2]], reduction="avg")
    assert math.isfinite(next_n_nll(bigram_table, [[1]], [[2]]))
