"""Adaptive softmax output layer (lmlab.models.heads) in the recurrent and transformer families."""

import pytest
import torch

from lmlab.data import IGNORE
from lmlab.models import build_model, load_model, save_model
from lmlab.models.heads import AdaptiveSoftmaxHead, next_token_loss
from lmlab.score import score_sequences
from lmlab.train import lm_loss

V = 50
CUTOFFS = [6, 20]

CONFIGS = {
    "lstm": {"n_embd": 12, "n_hidden": 16, "n_layer": 2},
    "gru": {"n_embd": 12, "n_hidden": 16},
    "rnn": {"n_embd": 12, "n_hidden": 16},
    "transformer": {"n_embd": 16, "n_head": 2, "n_layer": 2, "tie_weights": False},
}


def adaptive_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    values = {"vocab_size": V, "block_size": 32, "adaptive_cutoffs": CUTOFFS, **CONFIGS[family]}
    return build_model(family, values).eval()


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_logits_are_normalized_log_probabilities(family):
    model = adaptive_model(family)
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(1))
    logits, _ = model(ids)
    assert logits.shape == (3, 9, V)
    torch.testing.assert_close(torch.logsumexp(logits, dim=-1), torch.zeros(3, 9), atol=1e-5, rtol=0)
    # they are the adaptive module's own exact log_prob
    hidden, _ = model.hidden_states(ids)
    torch.testing.assert_close(logits, model.adaptive_head.adaptive.log_prob(hidden.reshape(-1, hidden.shape[-1])).view(3, 9, V))


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_incremental_equals_full_forward(family):
    model = adaptive_model(family)
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(2))
    full, _ = model(ids)
    state, steps = None, []
    for t in range(ids.shape[1]):
        out, state = model(ids[:, t : t + 1], state)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    last, _ = model.next_token_logits(ids)
    torch.testing.assert_close(last, full[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_training_loss_is_the_mean_nll_of_the_targets(family, monkeypatch):
    model = adaptive_model(family)
    x = torch.randint(0, V, (4, 7), generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, V, (4, 7), generator=torch.Generator().manual_seed(4))
    y[0, :3] = IGNORE
    y[2, 5] = IGNORE
    logp, _ = model(x)
    keep = y != IGNORE
    expected = -logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)[keep].mean()
    # the training loss never builds the full distribution: it goes through the adaptive loss
    monkeypatch.setattr(model.adaptive_head.adaptive, "log_prob", lambda *a: pytest.fail("full log_prob in training"))
    loss = lm_loss(model, x, y)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert model.adaptive_head.adaptive.tail[1][1].weight.grad is not None


def test_next_token_loss_carries_the_state():
    model = adaptive_model("lstm")
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(5))
    x, y = ids[:, :-1], ids[:, 1:]
    whole, _ = next_token_loss(model, x, y)
    first, state = next_token_loss(model, x[:, :4], y[:, :4])
    second, _ = next_token_loss(model, x[:, 4:], y[:, 4:], state)
    torch.testing.assert_close((first * 4 + second * 6) / 10, whole, atol=1e-5, rtol=1e-5)


def test_save_load_and_score_are_exact(tmp_path):
    from lmlab.tokenizers import CharTokenizer

    tok = CharTokenizer.train("abcdefghij")
    torch.manual_seed(0)
    model = build_model("lstm", {"vocab_size": tok.vocab_size, "n_embd": 8, "n_hidden": 16, "adaptive_cutoffs": [5, 9]}).eval()
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m").eval()
    ids = torch.tensor([[1, 4, 5, 6, 7]])
    torch.testing.assert_close(again(ids)[0], model(ids)[0])
    texts = ["abc", "jihgf"]
    logp = 0.0
    for text in texts:
        seq = torch.tensor([[tok.bos_id, *tok.encode(text), tok.eos_id]])
        out, _ = model(seq[:, :-1])
        logp += float(out[0].detach().gather(-1, seq[0, 1:, None]).sum())
    assert score_sequences(model, tok, texts).nll == pytest.approx(-logp, abs=1e-4)


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match=r"adaptive_cutoffs=\[20, 6\]"):
        build_model("lstm", {"vocab_size": V, "adaptive_cutoffs": [20, 6]})
    with pytest.raises(ValueError, match=r"adaptive_cutoffs=\[6, 50\].*\[1, 49\]"):
        build_model("transformer", {"vocab_size": V, "adaptive_cutoffs": [6, 50], "tie_weights": False})
    with pytest.raises(ValueError, match="cannot be combined with tie_weights=true"):
        build_model("transformer", {"vocab_size": V, "adaptive_cutoffs": [6]})
    with pytest.raises(ValueError, match="adaptive_div_value=1"):
        AdaptiveSoftmaxHead(8, V, [6], div_value=1.0)
    with pytest.raises(ValueError, match="0 features"):
        AdaptiveSoftmaxHead(8, V, [6, 20], div_value=4.0)
