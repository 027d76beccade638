"""Bigram table, context average and MLP: the one interface, incremental decoding, save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.models import State, build_model, load_model, save_model
from lmlab.models.neural import BigramConfig, ContextAverageConfig, MLPConfig

V = 11
CONFIGS = {
    "bigram": ("bigram", {"vocab_size": V}),
    "context-average": ("context-average", {"vocab_size": V, "n_embd": 8}),
    "context-average-nobias": ("context-average", {"vocab_size": V, "n_embd": 8, "bias": False}),
    "mlp": ("mlp", {"vocab_size": V, "context": 4, "n_embd": 5, "n_hidden": 16}),
    "mlp-deep-direct": ("mlp", {"vocab_size": V, "context": 3, "n_embd": 4, "n_hidden": 8, "n_layer": 2, "direct": True, "pad_id": 7}),
    "mlp-context1": ("mlp", {"vocab_size": V, "context": 1, "n_embd": 4, "n_hidden": 8}),
}


def make(name: str):
    family, cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = build_model(family, cfg)
    with torch.no_grad():  # the bigram table starts at zeros: give every family non-trivial weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


def chunked(model, ids: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, State]:
    out, state, t = [], None, 0
    for size in sizes:
        logits, state = model(ids[:, t : t + size], state)
        out.append(logits)
        t += size
    return torch.cat(out, dim=1), state


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shapes_and_state(name):
    model = make(name)
    ids = torch.randint(0, V, (3, 9))
    logits, state = model(ids)
    assert logits.shape == (3, 9, V) and logits.dtype == torch.float32
    assert state.length == 9 and state.batch_size == 3
    assert all(t.shape[0] == 3 for t in state.tensors.values())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_incremental_equals_full(name):
    model = make(name)
    ids = torch.randint(0, V, (2, 13))
    full, full_state = model(ids)
    for sizes in ([1] * 13, [5, 1, 7], [13], [2, 0, 11]):
        inc, state = chunked(model, ids, sizes)
        torch.testing.assert_close(inc, full, atol=1e-5, rtol=1e-5)
        assert state.length == 13
        for k in full_state.tensors:
            torch.testing.assert_close(state.tensors[k], full_state.tensors[k], atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(st.sampled_from(list(CONFIGS)), st.lists(st.integers(1, 5), min_size=1, max_size=6), st.integers(0, 1000))
def test_incremental_equals_full_any_split(name, sizes, seed):
    model = make(name)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, sum(sizes)), generator=g)
    inc, _ = chunked(model, ids, sizes)
    torch.testing.assert_close(inc, model(ids)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_round_trip(name, tmp_path):
    model = make(name)
    ids = torch.randint(0, V, (2, 7))
    save_model(model, tmp_path / name)
    loaded = load_model(tmp_path / name).eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0], atol=0, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_select_reorders_rows(name):
    model = make(name)
    ids = torch.randint(0, V, (3, 6))
    nxt = torch.randint(0, V, (3, 2))
    _, state = model(ids)
    index = torch.tensor([2, 0, 2])
    logits, _ = model(nxt[index], state.select(index))
    expected, _ = model(torch.cat([ids, nxt], 1)[index])
    torch.testing.assert_close(logits, expected[:, 6:], atol=1e-5, rtol=1e-5)


def test_bigram_is_a_table_lookup():
    model = make("bigram")
    ids = torch.randint(0, V, (2, 5))
    logits, state = model(ids)
    torch.testing.assert_close(logits, model.E.t()[ids])
    torch.testing.assert_close(logits.softmax(-1), model.conditional().t()[ids])
    assert torch.equal(state.tensors["last"], ids[:, -1:])
    fresh = build_model("bigram", BigramConfig(vocab_size=4))
    torch.testing.assert_close(fresh.conditional(), torch.full((4, 4), 0.25))  # starts uniform


def test_context_average_is_the_mean_of_the_prefix():
    model = make("context-average")
    ids = torch.randint(0, V, (2, 6))
    logits, state = model(ids)
    emb = model.embedding.weight[ids]  # (B, T, E)
    for t in range(6):
        c = emb[:, : t + 1].mean(1)
        torch.testing.assert_close(logits[:, t], c @ model.lm_head.weight.t() + model.lm_head.bias)
    torch.testing.assert_close(state.tensors["sum"], emb.sum(1))


def test_mlp_window_and_padding():
    model = make("mlp-deep-direct")  # context 3, pad_id 7
    n, pad = 3, 7
    ids = torch.randint(0, V, (2, 8))
    logits, state = model(ids)
    # The first positions read pad_id before the start.
    padded = torch.cat([torch.full((2, n - 1), pad), ids], 1)
    for t in range(8):
        window = padded[:, t : t + n]
        torch.testing.assert_close(logits[:, t], model(window)[0][:, -1])  # a window of n sees exactly itself
        x = model.embedding(window).reshape(2, -1)
        h = model.hidden(x)
        torch.testing.assert_close(logits[:, t], model.lm_head(h) + model.direct(x), atol=1e-6, rtol=1e-5)
    # Tokens older than the window do not matter.
    changed = ids.clone()
    changed[:, 0] = (changed[:, 0] + 1) % V
    torch.testing.assert_close(model(changed)[0][:, n:], logits[:, n:])
    assert not torch.allclose(model(changed)[0][:, 0], logits[:, 0])
    assert torch.equal(state.tensors["context"], ids[:, -(n - 1) :])


def test_dropout_only_in_training():
    model = build_model("mlp", MLPConfig(vocab_size=V, dropout=0.5))
    ids = torch.randint(0, V, (2, 5))
    model.train()
    assert not torch.equal(model(ids)[0], model(ids)[0])
    model.eval()
    assert torch.equal(model(ids)[0], model(ids)[0])


def test_gradients_reach_every_parameter():
    for name in CONFIGS:
        model = make(name).train()
        ids = torch.randint(0, V, (2, 6))
        logits, _ = model(ids)
        F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1)).backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (name, pname)


def test_learns_a_deterministic_sequence():
    """A context-average model cannot count, but an MLP with a 2-token window learns the
    period-3 pattern 0 1 2 0 1 2 ... exactly."""
    torch.manual_seed(0)
    model = build_model("mlp", {"vocab_size": 3, "context": 2, "n_embd": 4, "n_hidden": 16})
    ids = torch.tensor([[0, 1, 2] * 8])
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.0)
    for _ in range(60):
        logits, _ = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 3), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_config_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="pad_id=9"):
        MLPConfig(vocab_size=5, pad_id=9)
    with pytest.raises(ValueError, match="context=0"):
        MLPConfig(vocab_size=5, context=0)
    with pytest.raises(ValueError, match="dropout=1.0"):
        ContextAverageConfig(vocab_size=5, dropout=1.0)
    with pytest.raises(ValueError, match="vocab_size=0"):
        BigramConfig(vocab_size=0)
    with pytest.raises(ValueError, match="unknown mlp config field"):
        build_model("mlp", {"vocab_size": 5, "hidden": 3})


def test_state_errors():
    model = make("context-average")
    _, state = model(torch.randint(0, V, (2, 3)))
    with pytest.raises(ValueError, match="batch size 2"):
        model(torch.randint(0, V, (3, 1)), state)
    with pytest.raises(ValueError, match="holds 'context'"):
        make("mlp")(torch.randint(0, V, (2, 1)), state)
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        model(torch.randint(0, V, (5,)))
