"""The numpy transformer engine and checkpoint import against lmlab's PyTorch models (float32, 1e-5)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from lmlab.models import build_model, save_model
from lmlab.models.transformer import TransformerConfig, apply_rotary as torch_apply_rotary
from lmlab.models.transformer import sinusoidal_table as torch_sinusoidal_table
from lmlab.reference import (
    KVCache,
    RecurrentLM,
    TransformerLM,
    from_pytorch_state_dict,
    load_lmlab_checkpoint,
    load_npz,
    sinusoidal_table,
)
from lmlab.reference.ops import gelu, log_softmax
from lmlab.reference.transformer import gelu_fast

TOL = dict(rtol=1e-5, atol=1e-5)
V = 23


def perturb(model: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    """Move every parameter off its init (norm weights of 1, zero biases) so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def torch_logits(model, ids, **kw):
    with torch.no_grad():
        return model(torch.as_tensor(ids), **kw)


# ---------------------------------------------------------------- lmlab transformer checkpoints

VARIANTS = {
    "gpt": dict(),
    "post-sinusoidal-relu": dict(positions="sinusoidal", norm_position="post", activation="relu"),
    "concat-rms-gelu_tanh-nobias": dict(positions="sinusoidal", sinusoidal_layout="concat", norm="rmsnorm",
                                        activation="gelu_tanh", bias=False),
    "llama-gqa": dict(positions="rotary", norm="rmsnorm", activation="swiglu", n_kv_head=2, bias=False,
                      tie_weights=False, lm_head_bias=True, rope_theta=500.0),
    "no-norm-dff": dict(norm="none", d_ff=40, norm_position="post"),
    "layernorm-nobias-untied": dict(bias=False, tie_weights=False, n_kv_head=1),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(torch model, numpy model loaded from its saved checkpoint, variant name)."""
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=V, block_size=24, n_layer=2, n_head=4, n_embd=32, **VARIANTS[request.param])
    model = perturb(build_model("transformer", cfg))
    directory = tmp_path_factory.mktemp(request.param)
    save_model(model, directory)
    return model, load_lmlab_checkpoint(directory), request.param


def test_transformer_checkpoint_full_sequence(pair):
    model, engine, _ = pair
    ids = torch.randint(0, V, (3, 20), generator=torch.Generator().manual_seed(1))
    ref, state = torch_logits(model, ids, return_attention=True)
    logits, cache = engine(ids.numpy(), return_attention=True)
    assert logits.dtype == np.float32 and logits.shape == (3, 20, V)
    np.testing.assert_allclose(logits, ref.numpy(), **TOL)
    for i in range(model.config.n_layer):
        np.testing.assert_allclose(cache.attention[i], state.tensors[f"attention{i}"].numpy(), **TOL)
    assert cache.length == 20


def test_transformer_checkpoint_incremental(pair):
    """A prefix, then a chunk through the cache, then one token at a time: the same logits."""
    model, engine, _ = pair
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(2))
    ref, _ = torch_logits(model, ids)
    a, cache = engine(ids[:, :5].numpy())
    b, cache = engine(ids[:, 5:9].numpy(), cache)
    outs = [a, b]
    for t in range(9, 24):
        step, cache = engine.step(ids[:, t].numpy(), cache)
        outs.append(step[:, None])
    np.testing.assert_allclose(np.concatenate(outs, axis=1), ref.numpy(), **TOL)
    with pytest.raises(ValueError, match="block_size=24"):
        engine.step(ids[:, 0].numpy(), cache)


def test_unbatched_and_step_scalar(pair):
    _, engine, _ = pair
    ids = np.array([3, 1, 4, 1, 5])
    full, _ = engine(ids[None])
    one, _ = engine(ids)
    np.testing.assert_array_equal(one, full[0])
    state = None
    for t, y in enumerate(ids):
        logits, state = engine.step(int(y), state)
        assert logits.shape == (V,)
        np.testing.assert_allclose(logits, full[0, t], **TOL)


def test_run_directory_and_float64(tmp_path):
    torch.manual_seed(1)
    model = perturb(build_model("transformer", TransformerConfig(vocab_size=V, block_size=16, n_layer=1, n_head=2,
                                                                 n_embd=16)))
    save_model(model, tmp_path / "best")
    engine = load_lmlab_checkpoint(tmp_path, dtype=np.float64)       # a run directory holding best/
    ids = torch.randint(0, V, (2, 16))
    assert engine(ids.numpy())[0].dtype == np.float64
    np.testing.assert_allclose(engine(ids.numpy())[0], torch_logits(model, ids)[0].numpy(), **TOL)


def test_checkpoint_errors(tmp_path):
    model = build_model("transformer", TransformerConfig(vocab_size=V, block_size=8, n_layer=1, n_head=2, n_embd=8))
    save_model(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 16}))
    with pytest.raises(ValueError, match=r"'wte.weight'.*\(23, 8\).*expected \(23, 16\)"):
        load_lmlab_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "family": "ngram"}))
    with pytest.raises(ValueError, match="family='ngram'.*transformer"):
        load_lmlab_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_lmlab_checkpoint(tmp_path / "nowhere")


# ---------------------------------------------------------------- lmlab recurrent checkpoints

RECURRENT = {
    "rnn-tanh": ("rnn", dict()),
    "rnn-relu-2": ("rnn", dict(nonlinearity="relu", n_layer=2)),
    "gru": ("gru", dict(n_layer=2)),
    "gru-classic": ("gru", dict(gru_variant="classic", n_layer=2)),
    "lstm": ("lstm", dict(n_layer=2)),
    "lstm-tied": ("lstm", dict(n_embd=12, n_hidden=12, tie_weights=True)),
}


@pytest.mark.parametrize("name", sorted(RECURRENT))
def test_recurrent_checkpoints(name, tmp_path):
    family, extra = RECURRENT[name]
    torch.manual_seed(0)
    cfg = {"vocab_size": V, "n_embd": 10, "n_hidden": 12, **extra}
    model = perturb(build_model(family, cfg), scale=0.3)
    save_model(model, tmp_path)
    engine = load_lmlab_checkpoint(tmp_path)
    assert isinstance(engine, RecurrentLM) and engine.kind == family
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(3))
    ref, state = torch_logits(model, ids)
    logits, h = engine(ids.numpy())
    np.testing.assert_allclose(logits, ref.numpy(), **TOL)
    np.testing.assert_allclose(h["h"], state.tensors["h"].numpy(), **TOL)
    more = torch.randint(0, V, (3, 4))
    with torch.no_grad():
        ref2, _ = model(more, state)
    np.testing.assert_allclose(engine(more.numpy(), h)[0], ref2.numpy(), **TOL)


# ---------------------------------------------------------------- .npz of PyTorch-style names


class NpzLayer(nn.Module):
    def __init__(self, C, H, H_kv, F, norms, bias, activation, mask_buffers=False, P=16):
        super().__init__()
        D = C // H
        self.H, self.H_kv, self.D = H, H_kv, D
        self.attention = nn.Module()
        self.attention.wq = nn.Linear(C, C, bias=bias)
        self.attention.wk = nn.Linear(C, H_kv * D, bias=bias)
        self.attention.wv = nn.Linear(C, H_kv * D, bias=bias)
        self.attention.wo = nn.Linear(C, C, bias=bias)
        if mask_buffers:     # nanoGPT's / GPT-2's: ones on and below the diagonal, and a fill value
            self.attention.register_buffer("bias", torch.tril(torch.ones(P, P)).view(1, 1, P, P))
            self.attention.register_buffer("masked_bias", torch.tensor(-1e4))
        self.feed_forward = nn.Sequential(nn.Linear(C, F, bias=bias), activation(), nn.Linear(F, C, bias=bias))
        if norms:
            self.norm1, self.norm2 = nn.LayerNorm(C), nn.LayerNorm(C)

    def attend(self, x, rotary=None):
        B, T, C = x.shape
        a = self.attention
        q = a.wq(x).view(B, T, self.H, self.D).transpose(1, 2)
        k = a.wk(x).view(B, T, self.H_kv, self.D).transpose(1, 2).repeat_interleave(self.H // self.H_kv, 1)
        v = a.wv(x).view(B, T, self.H_kv, self.D).transpose(1, 2).repeat_interleave(self.H // self.H_kv, 1)
        if rotary is not None:
            q, k = (torch_apply_rotary(t, *rotary) for t in (q, k))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.D)
        if hasattr(a, "masked_bias"):
            scores = torch.where(a.bias[:, :, :T, :T] == 0, a.masked_bias, scores)
        else:
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return a.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))


class NpzLM(nn.Module):
    """A small hand-written decoder with the names ``load_npz`` reads.

    ``buffers=True`` saves what such modules often save beside their weights: a sinusoidal
    table ``position_embedding.pe`` (P, 1, C), rotary ``position_embedding.inv_freq`` and
    per-layer causal masks ``attention.bias`` with ``attention.masked_bias``."""

    def __init__(self, *, C=32, H=4, H_kv=4, F=48, L=2, learned=True, layout="interleaved", norms=True,
                 final_norm=False, pre=True, bias=True, activation=nn.ReLU, P=16, rotary=False, theta=10000.0,
                 buffers=False):
        super().__init__()
        self.word_embedding = nn.Embedding(V, C)
        if learned:
            self.position_embedding = nn.Embedding(P, C)
        elif rotary:
            D = C // H
            self.position_embedding = nn.Module()
            self.position_embedding.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, D, 2).float() / D),
                                                    persistent=buffers)
        elif buffers:
            self.position_embedding = nn.Module()
            self.position_embedding.register_buffer("pe", torch_sinusoidal_table(P, C, layout)[:, None, :])
        else:
            self.register_buffer("table", torch_sinusoidal_table(P, C, layout), persistent=False)
        self.layers = nn.ModuleList(NpzLayer(C, H, H_kv, F, norms, bias, activation, buffers, P) for _ in range(L))
        if final_norm:
            self.norm = nn.LayerNorm(C)
        self.fc_out = nn.Linear(C, V, bias=bias)
        self.learned, self.norms, self.pre, self.final_norm, self.rotary = learned, norms, pre, final_norm, rotary

    def forward(self, ids):
        T = ids.shape[1]
        x = self.word_embedding(ids)
        rotary = None
        if self.learned:
            x = x + self.position_embedding.weight[:T]
        elif self.rotary:
            angles = torch.arange(T).float()[:, None] * self.position_embedding.inv_freq[None, :]
            angles = torch.cat([angles, angles], dim=-1)
            rotary = angles.cos(), angles.sin()
        else:
            x = x + (self.position_embedding.pe[:T, 0] if hasattr(self, "position_embedding") else self.table[:T])
        for layer in self.layers:
            n1 = layer.norm1 if self.norms else nn.Identity()
            n2 = layer.norm2 if self.norms else nn.Identity()
            if self.pre:
                x = x + layer.attend(n1(x), rotary)
                x = x + layer.feed_forward(n2(x))
            else:
                x = n1(x + layer.attend(x, rotary))
                x = n2(x + layer.feed_forward(x))
        if self.final_norm:
            x = self.norm(x)
        return self.fc_out(x)


def save_npz(module: nn.Module, path) -> dict[str, np.ndarray]:
    arrays = {k: v.numpy() for k, v in module.state_dict().items()}
    np.savez(path, **arrays)
    return arrays


NPZ = {
    "learned-post-relu": (dict(learned=True, pre=False), dict(norm_position="post")),
    "sinusoidal-concat-nonorm-gelu-nobias": (dict(learned=False, layout="concat", norms=False, bias=False,
                                                  activation=nn.GELU), dict(sinusoidal_layout="concat",
                                                                            activation="gelu")),
    "sinusoidal-interleaved-pre-final-gqa": (dict(learned=False, final_norm=True, H_kv=2), dict()),
    # derived buffers saved beside the weights, checked and accepted
    "rotary-inv_freq-masks": (dict(learned=False, rotary=True, buffers=True, H_kv=2), dict()),
    "rotary-theta500-inv_freq": (dict(learned=False, rotary=True, theta=500.0, buffers=True), dict(rope_theta=500.0)),
    "sinusoidal-pe-concat-masks": (dict(learned=False, layout="concat", buffers=True), dict(sinusoidal_layout="concat")),
    "learned-masks": (dict(buffers=True, pre=False), dict(norm_position="post")),
}


@pytest.mark.parametrize("name", sorted(NPZ))
def test_npz_import(name, tmp_path):
    module_kw, load_kw = NPZ[name]
    torch.manual_seed(0)
    module = perturb(NpzLM(**module_kw))
    save_npz(module, tmp_path / "w.npz")
    engine = load_npz(tmp_path / "w.npz", n_heads=4, **load_kw)
    assert (engine.n_layers, engine.d_model, engine.d_ff, engine.n_kv_heads) == (2, 32, 48, module_kw.get("H_kv", 4))
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = module(ids).numpy()
    np.testing.assert_allclose(engine(ids.numpy())[0], ref, **TOL)
    logits, cache = engine(ids[:, :10].numpy())                # and through the cache
    for t in range(10, 16):
        step, cache = engine.step(ids[:, t].numpy(), cache)
    np.testing.assert_allclose(step, ref[:, -1], **TOL)


def test_npz_errors(tmp_path):
    torch.manual_seed(0)
    arrays = save_npz(NpzLM(), tmp_path / "w.npz")
    with pytest.raises(ValueError, match="n_heads is required"):
        load_npz(tmp_path / "w.npz")
    with pytest.raises(ValueError, match="n_heads=5"):
        load_npz(tmp_path / "w.npz", n_heads=5)

    missing = {k: v for k, v in arrays.items() if k != "layers.1.attention.wv.weight"}
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(ValueError, match=r"missing array 'layers.1.attention.wv.weight' \(expected shape \(32, 32\)\)"):
        load_npz(tmp_path / "missing.npz", n_heads=4)

    bad = dict(arrays, **{"fc_out.weight": np.zeros((V, 31), np.float32)})
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ValueError, match=r"'fc_out.weight'.*has shape \(23, 31\); expected \(23, 32\)"):
        load_npz(tmp_path / "bad.npz", n_heads=4)

    bad = dict(arrays, **{"layers.0.norm2.bias": np.zeros(7, np.float32)})
    with pytest.raises(ValueError, match=r"'layers.0.norm2.bias'.*\(7,\); expected \(32,\)"):
        from_pytorch_state_dict(bad, n_heads=4)

    extra = dict(arrays, **{"layers.0.attention.rotary.freq": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="unexpected arrays.*rotary.freq"):
        from_pytorch_state_dict(extra, n_heads=4)

    np.savez(tmp_path / "pickled.npz", word_embedding=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npz(tmp_path / "pickled.npz", n_heads=4)


def test_npz_derived_buffers_are_checked(tmp_path):
    """Known derived buffers load only when they equal what the engine computes; an error names the array."""
    torch.manual_seed(0)
    rot = save_npz(NpzLM(learned=False, rotary=True, buffers=True), tmp_path / "rot.npz")
    assert "position_embedding.inv_freq" in rot and "layers.1.attention.bias" in rot
    assert load_npz(tmp_path / "rot.npz", n_heads=4).positions == "rotary"       # inferred from inv_freq
    with pytest.raises(ValueError, match=r"'position_embedding.inv_freq'.*rope_theta=500.*pass rope_theta=10000"):
        from_pytorch_state_dict(rot, n_heads=4, rope_theta=500.0)
    with pytest.raises(ValueError, match=r"'position_embedding.inv_freq'.*is not theta\^\(-2j/D\) for head_dim D=4"):
        from_pytorch_state_dict(rot, n_heads=8)
    bad = dict(rot, **{"position_embedding.inv_freq": rot["position_embedding.inv_freq"] * 1.01})
    with pytest.raises(ValueError, match=r"array 'position_embedding.inv_freq' in the state dict"):
        from_pytorch_state_dict(bad, n_heads=4)
    with pytest.raises(ValueError, match=r"holds 'position_embedding.inv_freq'.*positions='sinusoidal'"):
        from_pytorch_state_dict(rot, n_heads=4, positions="sinusoidal")

    sin = save_npz(NpzLM(learned=False, buffers=True), tmp_path / "sin.npz")
    assert sin["position_embedding.pe"].shape == (16, 1, 32)
    with pytest.raises(ValueError, match=r"'position_embedding.pe'.*is not the 'concat'.*pass sinusoidal_layout='interleaved'"):
        load_npz(tmp_path / "sin.npz", n_heads=4, sinusoidal_layout="concat")
    with pytest.raises(ValueError, match=r"'position_embedding.pe'.*has shape \(16, 2, 32\)"):
        from_pytorch_state_dict(dict(sin, **{"position_embedding.pe": np.zeros((16, 2, 32), np.float32)}), n_heads=4)

    not_causal = np.ones((1, 1, 16, 16), np.float32)
    with pytest.raises(ValueError, match=r"array 'layers.1.attention.bias' in the state dict is not a causal mask"):
        from_pytorch_state_dict(dict(sin, **{"layers.1.attention.bias": not_causal}), n_heads=4)
    blocked = np.triu(np.ones((16, 16), bool), 1)                 # True = blocked, and additive, are causal too
    for mask in (blocked, np.where(blocked, -np.inf, 0.0)):
        from_pytorch_state_dict(dict(sin, **{"layers.0.attention.mask": mask}), n_heads=4)
    with pytest.raises(ValueError, match=r"'layers.0.attention.masked_bias'.*must be -inf or <= -1e4"):
        from_pytorch_state_dict(dict(sin, **{"layers.0.attention.masked_bias": np.float32(-10.0)}), n_heads=4)
    with pytest.raises(ValueError, match=r"unexpected arrays \['layers.0.attention.scale'\]"):
        from_pytorch_state_dict(dict(sin, **{"layers.0.attention.scale": np.float32(1.0)}), n_heads=4)


# ---------------------------------------------------------------- scoring, sampling, the cache


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    torch.manual_seed(2)
    model = perturb(build_model("transformer", TransformerConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2,
                                                                 n_embd=16)), scale=0.3)
    directory = tmp_path_factory.mktemp("small")
    save_model(model, directory)
    return model, load_lmlab_checkpoint(directory)


def test_perplexity_reads_the_distribution_before_each_token(small):
    model, engine = small
    prompt, ids = [1, 2, 3], [4, 5, 6, 7, 8]
    full, _ = torch_logits(model, torch.tensor([prompt + ids]))
    logp = log_softmax(full[0].double().numpy())
    want = [-logp[len(prompt) - 1 + t, y] for t, y in enumerate(ids)]
    np.testing.assert_allclose(engine.token_nlls(ids, prompt), want, rtol=1e-5)
    assert engine.perplexity(ids, prompt) == pytest.approx(math.exp(np.mean(want)), rel=1e-5)
    assert engine.sequence_nll(ids, prompt) == pytest.approx(sum(want), rel=1e-5)


def test_greedy_and_temperature_sampling(small):
    model, engine = small
    prompt = [1, 2]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits, state = model(ids)
        want = []
        for _ in range(10):
            y = int(logits[0, -1].argmax())
            want.append(y)
            logits, state = model(torch.tensor([[y]]), state)
    assert engine.sample(prompt, 10, greedy=True).tolist() == want
    a = engine.sample(prompt, 12, temperature=0.8, seed=7)
    assert a.tolist() == engine.sample(prompt, 12, temperature=0.8, seed=7).tolist()
    assert len(a) == 12 and a.min() >= 0 and a.max() < V


def test_cache_select_and_clone(small):
    _, engine = small
    ids = np.random.default_rng(0).integers(0, V, (3, 8))
    _, cache = engine(ids[:, :6])
    branch = cache.clone()
    order = np.array([2, 0, 2])
    picked, _ = engine(ids[order, 6:], cache.select(order))
    want, _ = engine(ids[order])
    np.testing.assert_allclose(picked, want[:, 6:], **TOL)
    first, _ = engine(ids[:, 6:], cache)
    second, _ = engine(ids[:, 6:], branch)
    np.testing.assert_array_equal(first, second)
    assert isinstance(cache, KVCache) and cache.batch_size == 3
    with pytest.raises(ValueError, match="state holds 3 rows"):
        engine(ids[:2, 6:], cache)


def test_random_model_and_validation():
    m = TransformerLM.random(V, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, seed=0, activation="swiglu",
                             positions="rotary", norm="rmsnorm")
    logits, _ = m(np.arange(10)[None] % V)
    assert logits.shape == (1, 10, V) and np.isfinite(logits).all()
    w = dict(m.weights)
    with pytest.raises(ValueError, match="n_heads=3"):
        TransformerLM(w, n_heads=3, positions="rotary", norm="rmsnorm", activation="swiglu")
    del w["l1.Wg"]
    with pytest.raises(ValueError, match=r"missing array 'l1.Wg'; expected shape \(64, 16\)"):
        TransformerLM(w, n_heads=4, positions="rotary", norm="rmsnorm", activation="swiglu")
    with pytest.raises(ValueError, match="activation='swish'"):
        TransformerLM(w, n_heads=4, activation="swish")


def test_sinusoidal_table_and_fast_gelu():
    for layout in ("interleaved", "concat"):
        np.testing.assert_allclose(sinusoidal_table(20, 16, layout), torch_sinusoidal_table(20, 16, layout).numpy(),
                                   atol=1e-7)
    x = np.linspace(-8, 8, 2001)
    np.testing.assert_allclose(gelu_fast(x.astype(np.float32)), gelu(x), atol=3e-7)
    np.testing.assert_array_equal(gelu_fast(x), gelu(x))                  # float64 stays exact


def test_read_safetensors_matches_the_library(tmp_path):
    from safetensors.torch import save_file

    from lmlab.reference.checkpoint import read_safetensors

    tensors = {"f32": torch.randn(3, 4), "f64": torch.randn(5, dtype=torch.float64), "f16": torch.randn(2, 2).half(),
               "bf16": torch.randn(6).bfloat16(), "i64": torch.arange(7), "u8": torch.arange(4, dtype=torch.uint8),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    got = read_safetensors(tmp_path / "t.safetensors")
    assert sorted(got) == sorted(tensors)
    for name, t in tensors.items():
        want = t.float().numpy() if name == "bf16" else t.numpy()
        assert got[name].shape == want.shape and got[name].dtype == want.dtype, name
        np.testing.assert_array_equal(got[name], want)
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_safetensors(tmp_path / "bad.safetensors")


def test_engine_never_imports_torch():
    code = ("import sys; import lmlab.reference, lmlab.reference.checkpoint, lmlab.reference.transformer; "
            "m = lmlab.reference.TransformerLM.random(11, seed=0); m.sample([1], 3); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
