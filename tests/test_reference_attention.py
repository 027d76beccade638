"""The numpy attention layers against PyTorch autograd and finite differences (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmlab.models.transformer import attention_weights
from lmlab.reference import MultiHeadAttention, SelfAttention, attention, attention_backward
from lmlab.reference.ops import causal_mask, gelu, layer_norm, log_softmax, masked_softmax, rms_norm, softmax

RTOL, ATOL = 1e-6, 1e-12
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def close(a, b, rtol=RTOL, atol=ATOL, what=""):
    if isinstance(b, torch.Tensor):
        b = b.detach().numpy()
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=what)


def numeric_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar f() with respect to every entry of x (changed in place)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        up = f()
        x[i] = old - eps
        down = f()
        x[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


# ---------------------------------------------------------------- single head

def torch_self_attention(X, W_q, W_k, W_v, causal):
    """The math written with torch ops; intermediates keep their .grad."""
    Q, K, V = X @ W_q, X @ W_k, X @ W_v
    A_w = Q @ K.transpose(1, 2)
    scores = A_w / math.sqrt(W_q.shape[1])
    if causal:
        T = X.shape[1]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    A_sig = torch.softmax(scores, dim=-1)
    for t in (Q, K, V, A_w, A_sig):
        t.retain_grad()
    return A_sig @ V, dict(Q=Q, K=K, V=V, A_w=A_w, A_sig=A_sig)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.integers(1, 4), st.integers(1, 4))


@FAST
@given(shape=shapes, causal=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_self_attention_matches_torch_autograd(shape, causal, seed):
    B, T, D, D_k, D_v = shape
    rng = np.random.default_rng(seed)
    layer = SelfAttention.random(D, D_k, D_v, causal=causal, seed=seed)
    X = rng.standard_normal((B, T, D))
    G = rng.standard_normal((B, T, D_v))
    Y = layer.forward(X)
    dX = layer.backward(G)

    tX = torch.tensor(X, requires_grad=True)
    tw = {k: torch.tensor(v, requires_grad=True) for k, v in layer.params.items()}
    tY, inter = torch_self_attention(tX, tw["W_q"], tw["W_k"], tw["W_v"], causal)
    (tY * torch.tensor(G)).sum().backward()

    close(Y, tY, what="Y")
    for name in ("Q", "K", "V", "A_w", "A_sig"):
        close(getattr(layer, name), inter[name], what=name)
        close(getattr(layer, "d" + name), inter[name].grad, what="d" + name)
    for name in ("W_q", "W_k", "W_v"):
        close(layer.grads[name], tw[name].grad, what="d" + name)
    close(dX, tX.grad, what="dX")
    assert Y.shape == (B, T, D_v) and dX.shape == X.shape


@FAST
@given(shape=shapes, causal=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_self_attention_finite_differences(shape, causal, seed):
    B, T, D, D_k, D_v = shape
    rng = np.random.default_rng(seed)
    layer = SelfAttention.random(D, D_k, D_v, causal=causal, seed=seed)
    X = rng.standard_normal((B, T, D))
    G = rng.standard_normal((B, T, D_v))
    loss = lambda: float(np.sum(layer.forward(X) * G))  # noqa: E731
    loss()
    dX = layer.backward(G)
    grads = {k: v.copy() for k, v in layer.grads.items()}
    dA_w, A_w, V = layer.dA_w.copy(), layer.A_w.copy(), layer.V.copy()

    close(dX, numeric_grad(loss, X), rtol=1e-5, atol=1e-6, what="dX")
    for name, W in layer.params.items():
        close(grads[name], numeric_grad(loss, W), rtol=1e-5, atol=1e-6, what="d" + name)

    # dL/dA_w through the scale and the softmax Jacobian, as a function of A_w alone
    mask = np.where(causal_mask(T), -np.inf, 0.0) if causal else 0.0
    loss_aw = lambda: float(np.sum(softmax(A_w / math.sqrt(D_k) + mask) @ V * G))  # noqa: E731
    close(dA_w, numeric_grad(loss_aw, A_w), rtol=1e-5, atol=1e-6, what="dA_w")


def test_self_attention_t1_b1_is_v():
    """One token attends only to itself: Y = V, and A_sig = 1."""
    layer = SelfAttention.random(3, 2, 4, seed=0)
    X = np.random.default_rng(1).standard_normal((1, 1, 3))
    Y = layer(X)
    close(Y, X @ layer.W_v)
    close(layer.A_sig, np.ones((1, 1, 1)))


def test_causal_first_row_attends_to_itself():
    layer = SelfAttention.random(4, 3, 3, causal=True, seed=0)
    X = np.random.default_rng(2).standard_normal((2, 5, 4))
    Y = layer(X)
    close(Y[:, 0], (X @ layer.W_v)[:, 0])
    assert np.all(np.triu(layer.A_sig[0], 1) == 0)
    # output at t depends only on X[:, :t+1]
    X2 = X.copy()
    X2[:, 3:] += 1.0
    close(layer(X2)[:, :3], Y[:, :3])


def test_self_attention_shape_errors():
    with pytest.raises(ValueError, match=r"W_k has shape \(3, 2\); expected \(4, 2\)"):
        SelfAttention(np.zeros((4, 2)), np.zeros((3, 2)), np.zeros((4, 5)))
    layer = SelfAttention.random(4, 2, 3, seed=0)
    with pytest.raises(ValueError, match=r"X has shape \(2, 4\); expected \(\*, \*, 4\)"):
        layer(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"X has shape \(1, 2, 5\)"):
        layer(np.zeros((1, 2, 5)))
    layer(np.zeros((1, 2, 4)))
    with pytest.raises(ValueError, match=r"dY has shape \(1, 2, 2\); expected \(1, 2, 3\)"):
        layer.backward(np.zeros((1, 2, 2)))


# ---------------------------------------------------------------- multi-head

mha_shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 3), st.integers(1, 3))


def torch_mha(D, H, bias, seed):
    torch.manual_seed(seed)
    m = torch.nn.MultiheadAttention(D, H, bias=bias, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return m


def ours_from_torch(m, causal):
    sd = {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
    return MultiHeadAttention.from_state_dict(sd, m.num_heads, causal=causal)


@FAST
@given(shape=mha_shapes, bias=st.booleans(), causal=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_multihead_matches_torch_multiheadattention(shape, bias, causal, seed):
    B, T, H, d = shape
    D = H * d
    m = torch_mha(D, H, bias, seed % 10_000)
    ours = ours_from_torch(m, causal)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((B, T, D))
    G = rng.standard_normal((B, T, D))

    tX = torch.tensor(X, requires_grad=True)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1) if causal else None
    tY, _ = m(tX, tX, tX, attn_mask=mask, need_weights=False)
    (tY * torch.tensor(G)).sum().backward()

    Y = ours.forward(X)
    dX = ours.backward(G)
    close(Y, tY, what="Y")
    close(dX, tX.grad, what="dX")
    close(ours.d_in_proj_weight, m.in_proj_weight.grad, what="d in_proj_weight")
    close(ours.dW_o, m.out_proj.weight.grad, what="d out_proj.weight")
    if bias:
        close(ours.d_in_proj_bias, m.in_proj_bias.grad, what="d in_proj_bias")
        close(ours.db_o, m.out_proj.bias.grad, what="d out_proj.bias")


def test_multihead_explicit_mask_matches_torch():
    """A boolean and an additive float mask give what nn.MultiheadAttention gives."""
    m = torch_mha(6, 2, True, 0)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2, 4, 6))
    bool_mask = np.array([[0, 1, 0, 1], [0, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=bool)
    float_mask = rng.standard_normal((4, 4))
    for mask in (bool_mask, float_mask):
        ours = ours_from_torch(m, causal=False)
        tY, _ = m(*(torch.tensor(X),) * 3, attn_mask=torch.tensor(mask), need_weights=False)
        close(ours(X, attn_mask=mask), tY)


def torch_general_mha(X, p, H, causal):
    """Multi-head attention with separate (out, in) weights and d_k != d_v, in torch ops."""
    B, T, _ = X.shape
    split = lambda x: x.view(B, T, H, -1).transpose(1, 2)  # noqa: E731
    Q, K, V = (split(X @ p[w].T + p[b]) for w, b in (("W_q", "b_q"), ("W_k", "b_k"), ("W_v", "b_v")))
    scores = Q @ K.transpose(-1, -2) / math.sqrt(Q.shape[-1])
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    O = (torch.softmax(scores, -1) @ V).transpose(1, 2).reshape(B, T, -1)
    return O @ p["W_o"].T + p["b_o"]


@FAST
@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3),
                       st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
       causal=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_multihead_separate_weights_dk_ne_dv(shape, causal, seed):
    """wq/wk/wv/wo stored (out, in), head sizes d_k != d_v, D_out != D: torch autograd and FD."""
    B, T, H, d_k, d_v, D, D_out = shape
    rng = np.random.default_rng(seed)
    sd = {"attn.wq.weight": rng.standard_normal((H * d_k, D)), "attn.wk.weight": rng.standard_normal((H * d_k, D)),
          "attn.wv.weight": rng.standard_normal((H * d_v, D)), "attn.wo.weight": rng.standard_normal((D_out, H * d_v)),
          "attn.wq.bias": rng.standard_normal(H * d_k), "attn.wo.bias": rng.standard_normal(D_out)}
    ours = MultiHeadAttention.from_state_dict(sd, H, prefix="attn.", causal=causal)
    X = rng.standard_normal((B, T, D))
    G = rng.standard_normal((B, T, D_out))
    Y = ours(X)
    dX = ours.backward(G)
    grads = {k: v.copy() for k, v in ours.grads.items()}

    tX = torch.tensor(X, requires_grad=True)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in ours.params.items()}
    tY = torch_general_mha(tX, tp, H, causal)
    (tY * torch.tensor(G)).sum().backward()
    close(Y, tY, what="Y")
    close(dX, tX.grad, what="dX")
    for k in grads:
        close(grads[k], tp[k].grad, what="d" + k)

    loss = lambda: float(np.sum(ours.forward(X) * G))  # noqa: E731
    close(dX, numeric_grad(loss, X), rtol=1e-5, atol=1e-6, what="FD dX")
    for k in ("W_q", "W_v", "b_k"):
        close(grads[k], numeric_grad(loss, ours.params[k]), rtol=1e-5, atol=1e-6, what="FD d" + k)


def test_multihead_from_q_proj_weight_naming():
    """nn.MultiheadAttention with kdim/vdim stores q/k/v_proj_weight; same math for self-attention."""
    m = torch_mha(6, 3, True, 1)
    sd = {k: v.detach().numpy() for k, v in m.state_dict().items()}
    w = sd.pop("in_proj_weight")
    sd.update(q_proj_weight=w[:6], k_proj_weight=w[6:12], v_proj_weight=w[12:])
    ours = MultiHeadAttention.from_state_dict(sd, 3)
    X = np.random.default_rng(0).standard_normal((2, 3, 6))
    tY, _ = m(*(torch.tensor(X),) * 3, need_weights=False)
    close(ours(X), tY)


def test_multihead_errors_name_the_array():
    with pytest.raises(ValueError, match=r"in_proj_weight has shape \(7, 3\); expected \(3\*D, D\)"):
        MultiHeadAttention.from_in_proj(np.zeros((7, 3)), np.zeros((3, 3)), 1)
    with pytest.raises(ValueError, match=r"W_o has shape \(4, 5\); expected \(\*, 4\)"):
        MultiHeadAttention.from_in_proj(np.zeros((12, 4)), np.zeros((4, 5)), 2)
    with pytest.raises(ValueError, match=r"in_proj_bias has shape \(11,\); expected \(12,\)"):
        MultiHeadAttention.from_in_proj(np.zeros((12, 4)), np.zeros((4, 4)), 2, in_proj_bias=np.zeros(11))
    with pytest.raises(ValueError, match=r"divisible by n_heads = 3"):
        MultiHeadAttention.from_in_proj(np.zeros((12, 4)), np.zeros((4, 4)), 3)
    with pytest.raises(ValueError, match=r"missing array 'out_proj.weight'"):
        MultiHeadAttention.from_state_dict({"in_proj_weight": np.zeros((12, 4))}, 2)
    with pytest.raises(ValueError, match=r"no attention weights under prefix 'x.'"):
        MultiHeadAttention.from_state_dict({"in_proj_weight": np.zeros((12, 4))}, 2, prefix="x.")


# ---------------------------------------------------------------- the attention function and ops

def test_attention_function_cache_and_grouped_query():
    rng = np.random.default_rng(0)
    B, H, H_kv, T, d = 2, 4, 2, 5, 3
    q, k, v = rng.standard_normal((B, H, T, d)), rng.standard_normal((B, H_kv, T, d)), rng.standard_normal((B, H_kv, T, d))
    rep = lambda x: torch.tensor(x).repeat_interleave(H // H_kv, dim=1)  # noqa: E731
    full = attention(q, k, v, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(torch.tensor(q), rep(k), rep(v), is_causal=True)
    close(full, ref)
    # the last 2 queries against all 5 keys (a KV cache) give the last 2 rows
    close(attention(q[:, :, 3:], k, v, causal=True), full[:, :, 3:])


# ---------------------------------------------------------------- the attention backward, fully masked rows

def torch_sdpa(q, k, v, blocked, scale):
    """torch's scaled_dot_product_attention, k/v heads repeated for grouped-query attention.
    ``blocked``: numpy bool (True = blocked) or additive float mask, or None."""
    rep = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    mask = None if blocked is None else torch.tensor(~blocked if blocked.dtype == bool else blocked)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@st.composite
def sdpa_cases(draw):
    """(q, k, v, dout, kwargs for attention, the same mask as one array for torch, scale)."""
    B, H_kv, rep = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    T_q, T_k, d, d_v = (draw(st.integers(1, 4)) for _ in range(4))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    H = H_kv * rep
    q, k = rng.standard_normal((B, H, T_q, d)), rng.standard_normal((B, H_kv, T_k, d))
    v, dout = rng.standard_normal((B, H_kv, T_k, d_v)), rng.standard_normal((B, H, T_q, d_v))
    kind = draw(st.sampled_from(["none", "causal", "bool", "additive", "causal+bool"]))
    kw, blocked = {}, None
    if "causal" in kind:
        kw["causal"] = True
        blocked = np.broadcast_to(causal_mask(T_q, T_k), (B, H, T_q, T_k))
    if "bool" in kind:
        kw["mask"] = rng.random((B, H, T_q, T_k)) < 0.4             # some rows end up fully blocked
        blocked = kw["mask"] if blocked is None else blocked | kw["mask"]
    if kind == "additive":
        add = rng.standard_normal((T_q, T_k))
        add[rng.random((T_q, T_k)) < 0.3] = -np.inf
        kw["mask"] = blocked = add
    scale = draw(st.sampled_from([None, 0.3]))
    if scale is not None:
        kw["scale"] = scale
    return q, k, v, dout, kw, None if blocked is None else np.ascontiguousarray(blocked), scale


@FAST
@given(case=sdpa_cases())
def test_attention_backward_matches_torch_autograd(case):
    """dq, dk, dv against autograd through torch's SDPA (float64): causal, bool and additive masks,
    T = 1, d_k != d_v, grouped-query heads; fully blocked rows give 0 and no gradient, as in torch."""
    q, k, v, dout, kw, blocked, scale = case
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    ty = torch_sdpa(tq, tk, tv, blocked, scale)
    (ty * torch.tensor(dout)).sum().backward()
    y = attention(q, k, v, **kw)
    dq, dk, dv = attention_backward(q, k, v, dout, **kw)
    assert np.isfinite(y).all() and dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    close(y, ty, what="y")
    close(dq, tq.grad, what="dq")
    close(dk, tk.grad, what="dk")
    close(dv, tv.grad, what="dv")


def test_attention_backward_finite_differences_and_errors():
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((2, 3, 2)), rng.standard_normal((2, 4, 2)), rng.standard_normal((2, 4, 5))
    dout = rng.standard_normal((2, 3, 5))
    mask = np.array([[0, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]], dtype=bool)     # query 1 sees nothing
    grads = attention_backward(q, k, v, dout, mask=mask)
    for a, g in zip((q, k, v), grads):
        close(g, numeric_grad(lambda: float(np.sum(attention(q, k, v, mask=mask) * dout)), a),
              rtol=1e-5, atol=1e-6)
    assert np.all(grads[0][:, 1] == 0)
    with pytest.raises(ValueError, match=r"dout has shape \(2, 3, 4\); expected \(2, 3, 5\)"):
        attention_backward(q, k, v, dout[..., :4])


def test_fully_masked_rows_give_zero_not_nan():
    """A query with nothing to attend to: output 0, zero gradient -- in the numpy function, the
    numpy multi-head layer and lmlab's torch path alike, as torch's SDPA and nn.MultiheadAttention do."""
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 3))
    blocked = np.zeros((3, 5), dtype=bool)
    blocked[1] = True
    additive = np.where(blocked, -np.inf, 0.0)
    for mask in (blocked, additive):
        y = attention(q, k, v, mask=mask)
        assert np.isfinite(y).all() and np.all(y[:, 1] == 0)
        close(y, torch_sdpa(*(torch.tensor(a) for a in (q, k, v)), blocked, None))
    assert np.all(masked_softmax(np.full((2, 3), -np.inf)) == 0)
    close(masked_softmax(additive), softmax(np.where(blocked, -1e300, 0.0)) * ~blocked[:, :1])

    # lmlab's torch attention weights (the return_attention path) follow the same convention
    scores = torch.tensor(rng.standard_normal((2, 3, 5)), requires_grad=True)
    tv = torch.tensor(v, requires_grad=True)
    w = attention_weights(scores.masked_fill(torch.tensor(blocked), float("-inf")))
    close(masked_softmax(np.where(blocked, -np.inf, scores.detach().numpy())), w)
    (w @ tv).sum().backward()
    assert torch.isfinite(scores.grad).all() and torch.all(scores.grad[:, 1] == 0)

    # the multi-head layer: the blocked query's output is the output bias alone; gradients finite
    m = torch_mha(6, 2, True, 3)
    ours = ours_from_torch(m, causal=False)
    X, G = rng.standard_normal((2, 3, 6)), rng.standard_normal((2, 3, 6))
    mask = np.zeros((3, 3), dtype=bool)
    mask[2] = True
    tX = torch.tensor(X, requires_grad=True)
    tY, _ = m(tX, tX, tX, attn_mask=torch.tensor(mask), need_weights=False)
    (tY * torch.tensor(G)).sum().backward()
    Y = ours(X, attn_mask=mask)
    close(Y[:, 2], np.broadcast_to(ours.b_o, (2, 6)))
    close(Y, tY)
    close(ours.backward(G), tX.grad)
    close(ours.d_in_proj_weight, m.in_proj_weight.grad)


def test_ops_match_torch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 7)) * 4
    tx = torch.tensor(x)
    close(softmax(x), torch.softmax(tx, -1))
    close(log_softmax(x), torch.log_softmax(tx, -1))
    close(gelu(x), torch.nn.functional.gelu(tx), rtol=1e-12)
    close(gelu(x, "tanh"), torch.nn.functional.gelu(tx, approximate="tanh"))
    w, b = rng.standard_normal(7), rng.standard_normal(7)
    close(layer_norm(x, w, b), torch.nn.functional.layer_norm(tx, (7,), torch.tensor(w), torch.tensor(b)))
    ms = (tx * tx).mean(-1, keepdim=True)
    close(rms_norm(x, w), tx / torch.sqrt(ms + 1e-6) * torch.tensor(w))
    assert softmax(np.array([0.0, -np.inf]))[1] == 0
    assert softmax(np.ones(3, dtype=np.float32)).dtype == np.float32


def test_reference_package_imports_only_numpy_and_h5py():
    """The reference engine is independent of torch (and of the rest of lmlab)."""
    import ast
    from pathlib import Path

    import lmlab.reference

    allowed = {"numpy", "h5py", "math", "json", "os", "typing", "__future__", "lmlab"}
    for path in Path(lmlab.reference.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
                if name.startswith("lmlab"):
                    assert name.startswith("lmlab.reference"), f"{path.name} imports {name}"
