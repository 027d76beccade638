import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.models import build_model, load_model, save_model
from lmlab.models.transformer import TransformerConfig, sinusoidal_table

VARIANTS = [
    {},
    {"norm_position": "post", "positions": "sinusoidal", "activation": "relu"},
    {"positions": "sinusoidal", "sinusoidal_layout": "concat", "tie_weights": False, "lm_head_bias": True},
    {"norm": "rmsnorm", "positions": "rotary", "activation": "swiglu", "n_kv_head": 2, "bias": False},
    {"norm": "none", "activation": "gelu_tanh"},
]


def tiny(**overrides):
    cfg = dict(vocab_size=11, block_size=32, n_layer=2, n_head=4, n_embd=16)
    cfg.update(overrides)
    torch.manual_seed(0)
    return build_model("transformer", TransformerConfig(**cfg)).eval()


@pytest.mark.parametrize("overrides", VARIANTS)
def test_incremental_decoding_matches_full_forward(overrides):
    model = tiny(**overrides)
    ids = torch.randint(0, 11, (3, 20), generator=torch.Generator().manual_seed(1))
    full, _ = model(ids)
    # prefix of 7, then chunks of 1, 5 and 7 tokens through the cache
    logits, state = model(ids[:, :7])
    pieces = [logits]
    for a, b in [(7, 8), (8, 13), (13, 20)]:
        logits, state = model(ids[:, a:b], state)
        pieces.append(logits)
    assert state.length == 20
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_state_select_reorders_rows():
    model = tiny()
    ids = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(2))
    _, state = model(ids)
    nxt = torch.tensor([[1], [2], [3]])
    order = torch.tensor([2, 0, 0])
    logits_sel, _ = model(nxt[order], state.select(order))
    full, _ = model(torch.cat([ids[order], nxt[order]], 1))
    torch.testing.assert_close(logits_sel[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


def test_causality_future_tokens_do_not_change_past_logits():
    model = tiny()
    a = torch.tensor([[1, 2, 3, 4, 5]])
    b = torch.tensor([[1, 2, 3, 9, 9]])
    la, _ = model(a)
    lb, _ = model(b)
    torch.testing.assert_close(la[:, :3], lb[:, :3])
    assert not torch.allclose(la[:, 3], lb[:, 3])


def test_block_size_is_enforced_with_a_clear_error():
    model = tiny(block_size=8)
    with pytest.raises(ValueError, match="block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    _, state = model(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed"):
        model(torch.zeros(1, 1, dtype=torch.long), state)


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model = tiny(tie_weights=True)
    save_model(model, tmp_path)
    loaded = load_model(tmp_path).eval()
    ids = torch.randint(0, 11, (2, 10))
    torch.testing.assert_close(model(ids)[0], loaded(ids)[0], atol=0, rtol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.wte.weight.data_ptr()


def test_loading_weights_into_a_mismatched_config_names_the_tensor(tmp_path):
    save_model(tiny(), tmp_path)
    cfg = (tmp_path / "config.json").read_text().replace('"n_embd": 16', '"n_embd": 32')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match=r"weight .* has shape \(\d+.*\), the config .* expects \(\d+.*\)"):
        load_model(tmp_path)


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="positions='alibi'"):
        TransformerConfig(vocab_size=5, positions="alibi")
    with pytest.raises(ValueError, match="n_embd=10 must be divisible by n_head=4"):
        TransformerConfig(vocab_size=5, n_embd=10, n_head=4)


def test_sinusoidal_table_values_and_layouts():
    t = sinusoidal_table(4, 6, "interleaved")
    assert t[0].tolist() == [0, 1, 0, 1, 0, 1]
    assert t[1, 0].item() == pytest.approx(math.sin(1.0))
    assert t[1, 3].item() == pytest.approx(math.cos(1.0 / 10000 ** (2 / 6)))
    c = sinusoidal_table(4, 6, "concat")
    assert torch.equal(c[:, :3], t[:, 0::2]) and torch.equal(c[:, 3:], t[:, 1::2])


def test_word_level_embedding_dropout_drops_whole_rows():
    model = tiny(embed_dropout=0.5)
    model.train()
    torch.manual_seed(3)
    x = model.embed(torch.tensor([[4, 4, 4, 4, 5, 5]]), 0) - model.wpe.weight[:6]
    row4, row5 = x[0, :4], x[0, 4:]
    # every occurrence of a token is dropped or kept together, and kept rows are rescaled by 2
    for rows, tok in ((row4, 4), (row5, 5)):
        zero = rows.abs().sum(-1) == 0
        assert zero.all() or (~zero).all()
        if not zero.any():
            torch.testing.assert_close(rows[0], 2 * model.wte.weight[tok])


def test_attention_weights_are_returned_and_rows_sum_to_one():
    model = tiny()
    _, state = model(torch.tensor([[1, 2, 3, 4]]), return_attention=True)
    w = state.tensors["attention0"]
    assert w.shape == (1, 4, 4, 4)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 4, 4))
    assert torch.all(w[0, :, 0, 1:] == 0)


def test_next_token_logits_equal_the_last_row_of_forward():
    from lmlab.models import build_model

    torch.manual_seed(0)
    model = build_model("transformer", {"vocab_size": 11, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}).eval()
    ids = torch.randint(0, 11, (3, 6))
    full, _ = model(ids)
    last, state = model.next_token_logits(ids[:, :4])
    assert last.shape == (3, 11) and torch.allclose(last, full[:, 3], atol=1e-6)
    step, _ = model.next_token_logits(ids[:, 4:5], state)
    assert torch.allclose(step, full[:, 4], atol=1e-5)


def backward_nodes(loss: torch.Tensor) -> set[str]:
    """The names of every node of ``loss``'s autograd graph."""
    seen, names, todo = set(), set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_attention_heads_are_views_whose_backward_fills_no_zeros(positions):
    # q, k and v reach attention as views of their projections (or of q and k rotated at once,
    # then split): no slice of a concatenation, whose backward builds a zero tensor of the
    # whole concatenation per slice and adds them up (a tenth of a CPU training step's time)
    torch.manual_seed(0)
    model = build_model("transformer", TransformerConfig(vocab_size=11, block_size=8, n_layer=2, n_head=4,
                                                         n_kv_head=2, n_embd=16, positions=positions))
    logits, _ = model(torch.randint(0, 11, (2, 8)))
    names = backward_nodes(logits.sum())
    assert "SliceBackward0" not in names and "ScaledDotProductFlashAttentionForCpuBackward0" in names
    assert ("SplitWithSizesBackward0" in names) == (positions == "rotary")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotation_and_rms_norm_round_as_the_textbook_formulas(dtype):
    """The decoding step's shorter forms give the same bits as the formulas they replace: the
    rotation with a rolled x and a signed sine, computed in float32 and rounded once, and RMSNorm
    of a low-precision x normalized in float32 and rounded before the weight."""
    from lmlab.models.transformer import RMSNorm, apply_rotary, rotary_cos_sin

    torch.manual_seed(0)
    x = (torch.randn(2, 5, 6, 16) * 4).to(dtype)
    cos, sin = rotary_cos_sin(torch.arange(7, 12), 16, 10000.0)
    cos, sin = cos[:, None], sin[:, None]
    rotated = torch.cat([-x[..., 8:], x[..., :8]], dim=-1)
    assert torch.equal(apply_rotary(x, cos, sin), (x * cos + rotated * sin).to(dtype))
    norm = RMSNorm(16, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        expected = norm.weight * F.rms_norm(x.float(), (16,), None, 1e-5).to(dtype)
        assert torch.equal(norm(x), expected)
