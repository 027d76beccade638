import math

import pytest
import torch

from lmlab.models import build_model
from lmlab.models.transformer import TransformerConfig
from lmlab.score import Score, sequence_logprobs, stream_nll

BOS, EOS, PAD = 1, 2, 0


def exact_logprob(model, seq):
    """Sum of log P(token | previous) for <bos> seq <eos>, computed one token at a time."""
    full = [BOS] + list(seq) + [EOS]
    total = 0.0
    for t in range(1, len(full)):
        logits, _ = model(torch.tensor([full[:t]]))
        total += torch.log_softmax(logits[0, -1].double(), -1)[full[t]].item()
    return total


def test_sequence_logprob_counts_eos_not_bos_and_ignores_padding(bigram_table):
    seqs = [[3, 4, 5, 3], [4], [5, 5, 3]]
    batched = sequence_logprobs(bigram_table, seqs, BOS, EOS, PAD, batch_size=3)
    single = [sequence_logprobs(bigram_table, [s], BOS, EOS, PAD)[0] for s in seqs]
    for (lp, n), (lp1, n1), s in zip(batched, single, seqs):
        assert n == n1 == len(s) + 1
        assert lp == pytest.approx(lp1, abs=1e-5)
        assert lp == pytest.approx(exact_logprob(bigram_table, s), abs=1e-5)


def test_exact_value_on_a_uniform_model():
    # all-zero weights give uniform next-token distributions: log P = -(len+1) log V
    model = build_model("transformer", TransformerConfig(vocab_size=7, block_size=8, n_layer=1, n_head=1, n_embd=4))
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    (lp, n), = sequence_logprobs(model, [[3, 4, 5]], BOS, EOS, PAD)
    assert n == 4
    assert lp == pytest.approx(-4 * math.log(7), abs=1e-5)


def test_corpus_perplexity_is_total_nll_over_total_tokens_not_mean_of_perplexities(bigram_table):
    seqs = [[3, 4, 5, 3, 4, 5, 3, 3, 4], [5]]
    results = sequence_logprobs(bigram_table, seqs, BOS, EOS, PAD)
    score = Score(nll=-sum(lp for lp, _ in results), tokens=sum(n for _, n in results))
    expected = math.exp(-sum(lp for lp, _ in results) / 12)
    mean_of_ppl = sum(math.exp(-lp / n) for lp, n in results) / 2
    assert score.perplexity == pytest.approx(expected)
    assert abs(score.perplexity - mean_of_ppl) > 1e-3


def test_stream_scores_every_token_once_whatever_the_window(bigram_table):
    ids = torch.randint(0, 6, (97,), generator=torch.Generator().manual_seed(1))
    logp = torch.log_softmax(bigram_table.table.double(), -1)
    exact = -sum(logp[ids[t - 1], ids[t]].item() for t in range(1, 97))
    for window, stride in [(10, 10), (10, 3), (10, 1), (96, 96), (200, 200), (7, 5)]:
        s = stream_nll(bigram_table, ids, window=window, stride=stride, batch_size=4)
        assert s.tokens == 96
        assert s.nll == pytest.approx(exact, abs=1e-4)


def test_sliding_window_gives_each_token_the_most_context_allowed():
    torch.manual_seed(0)
    model = build_model("transformer", TransformerConfig(vocab_size=9, block_size=8, n_layer=2, n_head=2, n_embd=8)).eval()
    ids = torch.randint(0, 9, (30,), generator=torch.Generator().manual_seed(2))
    window, stride = 8, 2
    s = stream_nll(model, ids, window=window, stride=stride)
    # Reference: token t is predicted from ids[begin:t] of the window that first reaches it.
    expected, scored, begin = 0.0, 1, 0
    while scored < 30:
        end = min(begin + window, 29)
        for t in range(scored, end + 1):
            logits, _ = model(ids[begin:t][None])
            expected -= torch.log_softmax(logits[0, -1].double(), -1)[ids[t]].item()
        scored, begin = end + 1, begin + stride
    assert s.tokens == 29
    assert s.nll == pytest.approx(expected, abs=1e-4)
    disjoint = stream_nll(model, ids, window=8, stride=8)
    assert disjoint.nll > s.nll  # less context on average


def test_stream_errors_name_the_value(bigram_table):
    with pytest.raises(ValueError, match="stride=11"):
        stream_nll(bigram_table, torch.arange(5) % 6, window=10, stride=11)
    with pytest.raises(ValueError, match="1 token"):
        stream_nll(bigram_table, [3])
    model = build_model("transformer", TransformerConfig(vocab_size=9, block_size=8, n_layer=1, n_head=1, n_embd=4))
    with pytest.raises(ValueError, match="window=16 is larger than the model's context of 8"):
        stream_nll(model, torch.arange(20) % 9, window=16)


def test_bits_per_character():
    s = Score(nll=10 * math.log(2), tokens=5, characters=20)
    assert s.bits_per_character == pytest.approx(0.5)
    assert s.bits_per_token == pytest.approx(2.0)


def test_carried_state_conditions_every_token_on_all_before_it():
    """--carry-state: the whole stream read once with the state carried equals one forward pass
    over it (an LSTM, a cache and their mixture); windows restart the state, so they differ."""
    from lmlab.models.interpolate import InterpolatedLM

    torch.manual_seed(0)
    V = 12
    lstm = build_model("lstm", {"vocab_size": V, "n_embd": 8, "n_hidden": 8}).eval()
    cache = build_model("cache", {"vocab_size": V, "order": 1, "decay": 0.95, "window": 40})
    mixture = InterpolatedLM.from_models([lstm, cache], [0.7, 0.3]).eval()
    ids = torch.randint(0, V, (700,), generator=torch.Generator().manual_seed(1))
    for model in (lstm, cache, mixture):
        with torch.no_grad():
            logits, _ = model(ids[None, :-1])
        want = torch.log_softmax(logits[0].double(), -1).gather(-1, ids[1:, None]).sum().item()
        per_token: list[float] = []
        carried = stream_nll(model, ids, carry_state=True, token_logprobs=per_token)
        assert carried.tokens == 699 and len(per_token) == 699
        assert -carried.nll == pytest.approx(want, rel=1e-5)
        windows = stream_nll(model, ids, window=100)
        assert windows.tokens == 699
        if model is not cache:  # the cache alone gives 0 to the words it has not seen: infinite either way
            assert math.isfinite(carried.nll) and windows.nll != pytest.approx(carried.nll, rel=1e-6)
    with pytest.raises(ValueError, match="window=100"):
        stream_nll(lstm, ids, window=100, carry_state=True)
    transformer = build_model("transformer", TransformerConfig(vocab_size=V, block_size=16, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="at most 16 tokens"):
        stream_nll(transformer, ids, carry_state=True)


def test_cli_score_carry_state(tmp_path, capsys):
    import json

    from lmlab.cli import main
    from lmlab.models import save_model
    from lmlab.tokenizers import CharTokenizer

    text = "abcab cabba acbca bbacc abcba\n" * 60
    tok = CharTokenizer.train(text)
    torch.manual_seed(0)
    model = build_model("gru", {"vocab_size": tok.vocab_size, "n_embd": 8, "n_hidden": 8}).eval()
    save_model(model, tmp_path / "m")
    tok.save(tmp_path / "m" / "tokenizer.json")
    (tmp_path / "t.txt").write_text(text)
    assert main(["score", "--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"), "--carry-state", "--json"]) == 0
    carried = json.loads(capsys.readouterr().out)
    ids = torch.tensor(tok.encode(text))
    with torch.no_grad():
        logits, _ = model(ids[None, :-1])
    nll = -torch.log_softmax(logits[0].double(), -1).gather(-1, ids[1:, None]).sum().item()
    assert carried["tokens"] == len(ids) - 1
    assert carried["nll"] == pytest.approx(nll, rel=1e-5)
    assert main(["score", "--model", str(tmp_path / "m"), "--text", str(tmp_path / "t.txt"), "--carry-state",
                 "--window", "64"]) == 2
    assert "window=64" in capsys.readouterr().err
