import pytest
import torch

from lmlab.decode.generate import generate, stream
from lmlab.models import build_model
from lmlab.models.transformer import TransformerConfig


def tiny_transformer(block_size=64):
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=13, block_size=block_size, n_layer=2, n_head=2, n_embd=16)
    return build_model("transformer", cfg).eval()


def greedy_by_recomputation(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        window = ids[-model.max_context:] if model.max_context else ids
        logits, _ = model(torch.tensor([window]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_with_cache_equals_recomputation_for_prompts_of_different_lengths():
    model = tiny_transformer()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [3], [9, 9, 2]]
    out = generate(model, prompts, 12, do_sample=False)
    for p, g in zip(prompts, out):
        assert g.prompt_ids == p
        assert g.token_ids == greedy_by_recomputation(model, p, 12)
        assert g.finish_reason == "length"


def test_batched_equals_one_by_one_for_every_family_that_has_state(bigram_table):
    for model in (tiny_transformer(), bigram_table):
        prompts = [[1, 2, 3, 4], [5], [2, 2]]
        batched = generate(model, prompts, 6, seed=0, do_sample=False)
        for p, g in zip(prompts, batched):
            assert g.token_ids == generate(model, [p], 6, do_sample=False)[0].token_ids


def test_logprobs_are_the_models_log_probabilities():
    model = tiny_transformer()
    g = generate(model, [[4, 5]], 5, seed=3)[0]
    ids = [4, 5] + g.token_ids
    logits, _ = model(torch.tensor([ids[:-1]]))
    logp = torch.log_softmax(logits[0], -1)
    expected = [logp[t - 1, ids[t]].item() for t in range(2, len(ids))]
    assert g.logprobs == pytest.approx(expected, abs=1e-5)


def test_same_seed_same_sample_and_different_seed_differs():
    model = tiny_transformer()
    a = generate(model, [[1]] * 4, 20, seed=5)
    b = generate(model, [[1]] * 4, 20, seed=5)
    c = generate(model, [[1]] * 4, 20, seed=6)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_eos_stops_a_row_on_its_own(bigram_table):
    # make token 2 the certain successor of 4, and 2 the eos
    bigram_table.table[4] = -50.0
    bigram_table.table[4, 2] = 50.0
    out = generate(bigram_table, [[4], [3]], 10, eos_id=2, do_sample=False)
    assert out[0].token_ids == [2] and out[0].finish_reason == "eos"
    assert len(out[1].token_ids) in range(1, 11)


def test_sliding_context_policy_and_error_policy():
    model = tiny_transformer(block_size=8)
    out = generate(model, [[1, 2, 3]], 12, do_sample=False)[0]
    assert out.token_ids == greedy_by_recomputation(model, [1, 2, 3], 12)
    with pytest.raises(ValueError, match="longer than the model's context of 8"):
        generate(model, [list(range(10))], 2, context_policy="error")


def test_stream_yields_tokens_in_order():
    model = tiny_transformer()
    events = list(stream(model, [[1], [2, 3]], 4, seed=1))
    final = generate(model, [[1], [2, 3]], 4, seed=1)
    for row in (0, 1):
        assert [t for r, t in events if r == row] == final[row].token_ids


def test_bad_input_errors():
    model = tiny_transformer()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], 3)
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        generate(model, [[1]], -1)
