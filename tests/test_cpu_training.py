"""CPU training options train as the plain float32 path does: bfloat16 autocast where
the CPU has native bfloat16, torch.compile, the fused AdamW (the default on a CPU)."""

import json

import numpy as np
import pytest
import torch

import lmlab.hardware as hardware
from lmlab.data import StreamBatches
from lmlab.hardware import autocast_dtype, native_bfloat16
from lmlab.models import build_model
from lmlab.models.transformer import TransformerConfig
from lmlab.train import Trainer, TrainConfig, lm_loss, make_optimizer

IDS = (np.arange(2000) * 7 % 13).astype(np.uint16)


def model():
    # no biases: the key projection's bias has a zero gradient up to rounding, which Adam
    # scales up to steps of either sign, so it would differ between any two summation orders
    torch.manual_seed(0)
    return build_model("transformer", TransformerConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16,
                                                        bias=False))


def train(tmp_path, name, **kw):
    config = TrainConfig(max_iters=20, batch_size=4, eval_interval=10, eval_iters=2, log_interval=2, warmup_iters=2,
                         lr=3e-3, progress=False, device="cpu", **kw)
    net = model()
    summary = Trainer(net, StreamBatches(IDS, 8, 4), StreamBatches(IDS, 8, 4), config, tmp_path / name).fit()
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    losses = [r["train_loss"] for r in map(json.loads, lines) if "train_loss" in r]
    return summary, losses, net


def test_native_bfloat16_detection_and_the_auto_choice():
    assert native_bfloat16({"avx2", "fma"}) is None
    assert native_bfloat16({"avx512f", "avx512_bf16"}) == "avx512_bf16"
    assert native_bfloat16({"avx512_bf16", "amx_bf16"}) == "amx_bf16"
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu, {"avx2"})[0] == torch.float32
    assert autocast_dtype("auto", cpu, {"amx_bf16"}) == (torch.bfloat16, "bfloat16 autocast (auto: the CPU has amx_bf16)")
    assert autocast_dtype("float32", cpu, {"amx_bf16"})[0] == torch.float32
    assert autocast_dtype("bfloat16", cpu, set())[0] == torch.bfloat16
    assert autocast_dtype("auto", torch.device("cuda"), set())[0] == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='half'"):
        autocast_dtype("half", cpu)


def test_bfloat16_autocast_on_a_cpu_with_native_bf16_trains_like_float32(tmp_path, monkeypatch):
    # tolerance: bfloat16 keeps 8 bits of mantissa (relative error 2**-9 per rounding); over 20
    # steps the logged losses stay within 2% of float32's
    monkeypatch.setattr(hardware, "cpu_flags", lambda info=None: {"avx2", "fma"})
    plain, plain_losses, _ = train(tmp_path, "fp32")
    assert plain["precision"].startswith("float32 (auto: the CPU has no native bfloat16")
    monkeypatch.setattr(hardware, "cpu_flags", lambda info=None: {"avx512f", "avx512_bf16"})
    bf16, bf16_losses, _ = train(tmp_path, "bf16")
    assert bf16["precision"] == "bfloat16 autocast (auto: the CPU has avx512_bf16)"
    assert bf16_losses != plain_losses  # bfloat16 did run
    np.testing.assert_allclose(bf16_losses, plain_losses, rtol=0.02)
    assert bf16["val_loss"] == pytest.approx(plain["val_loss"], rel=0.02)


def test_fused_adamw_takes_the_same_steps_as_foreach():
    # tolerance: the fused kernel orders the same float32 operations differently (1e-6 relative)
    nets = [model(), model()]
    config = TrainConfig(lr=3e-3, warmup_iters=1)
    optimizers = [make_optimizer(nets[0], config, torch.device("cpu"), fused=True),
                  make_optimizer(nets[1], config, torch.device("cpu"), fused=False)]
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    assert make_optimizer(nets[0], config, torch.device("cpu")).defaults["fused"]  # the default on a CPU
    batches, generator = StreamBatches(IDS, 8, 4), torch.Generator().manual_seed(0)
    for _ in range(20):
        x, y = batches.sample(generator)
        for net, opt in zip(nets, optimizers):
            lm_loss(net, x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_evaluation_after_fused_steps_reads_the_updated_weights(tmp_path):
    # The fused CPU kernel writes the parameters without bumping their version counters, so
    # a copy of weights cached by version (once: q/k/v concatenated for inference) went stale
    # and evaluation read the weights of an earlier step, 4e-3 off in loss after 10 steps.
    assert make_optimizer(model(), TrainConfig(), torch.device("cpu")).defaults["fused"]
    summary, _, net = train(tmp_path, "fused")
    fresh = model()
    fresh.load_state_dict(net.state_dict())
    net.eval(), fresh.eval()
    x = torch.as_tensor(IDS[:32].astype(np.int64)).view(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0], fresh(x)[0], rtol=0, atol=0)
        _, state = net(x[:, :7])
        _, fresh_state = fresh(x[:, :7])
        torch.testing.assert_close(net.next_token_logits(x[:, 7:], state)[0],
                                   fresh.next_token_logits(x[:, 7:], fresh_state)[0], rtol=0, atol=0)
        batches = StreamBatches(IDS, 8, 4)
        generator = torch.Generator().manual_seed(12345)
        nll = [float(lm_loss(fresh, *batches.sample(generator))) for _ in range(2)]
    assert summary["val_loss"] == sum(nll) / len(nll)  # the trainer's last evaluation


def test_compiled_training_forward_trains_like_eager(tmp_path, monkeypatch):
    # Inductor's C++ code generation takes about a minute on two cores, so the test compiles
    # through AOTAutograd with the eager backend: the same captured forward and backward
    # graphs the trainer runs, without the generated kernels (whose numbers the benchmark
    # reports). Tolerance: graph capture reorders float32 operations (1e-5 relative).
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: real_compile(module, backend="aot_eager", **kw))
    eager, eager_losses, eager_net = train(tmp_path, "eager")
    compiled, compiled_losses, compiled_net = train(tmp_path, "compiled", compile=True)
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-5)
    for (name, a), b in zip(compiled_net.named_parameters(), eager_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert compiled["compile_cold_start_seconds"] > 0 and eager["compile_cold_start_seconds"] is None
