"""States of rows at different positions stacked into one batch (``merge_states``):
every family gives each row the logits it would get alone."""

import numpy as np
import pytest
import torch

from lmlab.models import build_model
from lmlab.models.base import State

V = 11
FAMILIES = [
    ("transformer", dict(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=16)),
    ("transformer", dict(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=16,
                         positions="rotary", norm="rmsnorm", activation="swiglu", bias=False)),
    ("transformer", dict(vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=16, positions="sinusoidal")),
    ("context-average", dict(vocab_size=V, n_embd=8)),
    ("mlp", dict(vocab_size=V, context=3)),
    ("bigram", dict(vocab_size=V)),
    ("gru", dict(vocab_size=V, n_embd=8, n_hidden=8)),
    ("lstm", dict(vocab_size=V, n_embd=8, n_hidden=8)),
    ("ngram", dict(vocab_size=V, order=3, method="addk", k=0.5)),
    ("cache", dict(vocab_size=V, order=2, decay=0.9, window=5)),
]


def _model(family, config):
    torch.manual_seed(0)
    model = build_model(family, config).eval()
    if family == "bigram":
        torch.nn.init.normal_(model.E)
    if family == "ngram":
        model.fit(np.random.default_rng(0).integers(0, V, 400), add_bos_eos=False)
    return model


@pytest.mark.parametrize("family,config", FAMILIES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(FAMILIES)])
def test_merged_rows_continue_as_if_alone(family, config):
    model = _model(family, config)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, V, (1, 7), generator=g)
    b = torch.randint(0, V, (2, 3), generator=g)
    _, state_a = model(a)
    _, state_b = model(b)
    merged = model.merge_states([state_a, state_b])
    assert merged.batch_size == 3
    assert merged.positions.tolist() == [7, 3, 3]
    more = torch.randint(0, V, (3, 2), generator=g)
    logits, state = model(more, merged)
    alone_a, _ = model(torch.cat([a, more[:1]], 1))
    alone_b, _ = model(torch.cat([b, more[1:]], 1))
    torch.testing.assert_close(logits[:1], alone_a[:, -2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1:], alone_b[:, -2:], atol=1e-5, rtol=1e-5)
    assert state.positions.tolist() == [9, 5, 5]
    # The longest row leaves: the slots nobody fills are dropped and the others go on.
    rest = model.merge_states([state.select(torch.tensor([1, 2]))])
    assert rest.length == 5 and rest.offsets is None
    step = torch.randint(0, V, (2, 1), generator=g)
    logits, _ = model(step, rest)
    alone, _ = model(torch.cat([b, more[1:], step], 1))
    torch.testing.assert_close(logits[:, 0], alone[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,config", FAMILIES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(FAMILIES)])
def test_prompt_blocks_read_together_as_if_alone(family, config):
    """read_prompt_blocks (the transformer: one padded pass) gives every row the logits and the
    state it gets read alone and merged: the next steps continue the same."""
    model = _model(family, config)
    g = torch.Generator().manual_seed(2)
    blocks = [torch.randint(0, V, (1, 6), generator=g), torch.randint(0, V, (2, 2), generator=g),
              torch.randint(0, V, (1, 6), generator=g), torch.randint(0, V, (1, 1), generator=g)]
    logits, state = model.read_prompt_blocks(blocks)
    read = [model.next_token_logits(block, None) for block in blocks]
    torch.testing.assert_close(logits, torch.cat([l for l, _ in read]), atol=1e-5, rtol=1e-5)
    assert state.positions.tolist() == [6, 2, 2, 6, 1]
    steps = torch.randint(0, V, (5, 3), generator=g)
    together, _ = model(steps, state)
    alone, _ = model(steps, model.merge_states([s for _, s in read]))
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    same_length, _ = model.read_prompt_blocks([blocks[0], blocks[2]])
    torch.testing.assert_close(same_length, torch.cat([read[0][0], read[2][0]]), atol=1e-5, rtol=1e-5)


def test_transformer_merge_pads_the_cache_at_the_start():
    model = _model(*FAMILIES[0])
    _, long = model(torch.ones(1, 5, dtype=torch.long))
    _, short = model(torch.ones(1, 2, dtype=torch.long))
    merged = model.merge_states([long, short])
    assert merged.length == 5 and merged.offsets.tolist() == [0, 3]
    k0 = merged.tensors["k0"]
    assert k0.shape[2] >= 5  # room to grow: the next steps write in place
    assert torch.equal(k0[1, :, :3], torch.zeros_like(k0[1, :, :3]))
    assert torch.equal(k0[0, :, :5], long.tensors["k0"][0, :, :5])
    assert torch.equal(k0[1, :, 3:5], short.tensors["k0"][0, :, :2])
    _, after = model(torch.ones(2, 1, dtype=torch.long), merged)
    assert after.tensors["k0"].data_ptr() == k0.data_ptr()
    # Compacting what is left after the long row leaves drops its slots without a copy.
    rest = model.merge_states([after.select(torch.tensor([1]))])
    assert rest.length == 3 and rest.offsets is None
    assert torch.equal(rest.tensors["k0"][0, :, :3], after.tensors["k0"][1, :, 3:6])


def test_attention_weights_never_read_empty_slots():
    model = _model(*FAMILIES[0])
    _, long = model(torch.ones(1, 6, dtype=torch.long))
    _, short = model(torch.ones(1, 2, dtype=torch.long))
    _, state = model(torch.tensor([[3], [4]]), model.merge_states([long, short]), return_attention=True)
    w = state.tensors["attention0"]  # (B, H, 1, 7)
    assert torch.all(w[1, :, :, :4] == 0)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))


def test_merge_refuses_unknown_state_kinds():
    class OtherState(State):
        pass

    model = _model(*FAMILIES[4])
    _, s = model(torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="one at a time"):
        model.merge_states([s, OtherState(dict(s.tensors), 2)])
    with pytest.raises(ValueError, match="at least one state"):
        model.merge_states([])


def test_fill_rows_moves_only_the_last_rows_into_the_holes():
    t = torch.arange(5 * 2 * 3, dtype=torch.float32).view(5, 2, 3)
    state = State({"h": t.clone()}, 3, offsets=torch.tensor([0, 1, 2, 0, 1]))
    out = state.fill_rows(torch.tensor([1]), torch.tensor([4]), 4)  # row 1 leaves; row 4 takes its place
    assert out.batch_size == 4 and out.length == 3
    assert torch.equal(out.tensors["h"], t[[0, 4, 2, 3]])
    assert out.offsets.tolist() == [0, 1, 2, 0]
    assert out.tensors["h"].data_ptr() == state.tensors["h"].data_ptr()  # a view: no copy of the rows that stay
    model = _model(*FAMILIES[0])
    _, s = model(torch.ones(3, 4, dtype=torch.long))
    ref = s.select(torch.tensor([0, 2]))
    moved = s.clone().fill_rows(torch.tensor([1]), torch.tensor([2]), 2)
    step = torch.tensor([[5], [6]])
    torch.testing.assert_close(model(step, moved)[0], model(step, ref)[0], atol=0, rtol=0)
