import json

import numpy as np
import pytest
import torch

import lmlab.hardware as hardware
import lmlab.throughput as throughput
from lmlab.data import StreamBatches
from lmlab.hardware import PeakFlops, cpu_peak_flops, gpu_peak_flops, peak_flops
from lmlab.models import build_model
from lmlab.models.neural import BigramConfig, ContextAverageConfig, MLPConfig
from lmlab.models.recurrent import RecurrentConfig
from lmlab.models.transformer import TransformerConfig
from lmlab.throughput import ThroughputMeter, flops_per_token, model_flops_utilisation
from lmlab.train import Trainer, TrainConfig


def tiny_transformer(**kw):
    return build_model("transformer", TransformerConfig(vocab_size=10, block_size=4, n_layer=1, n_head=2, n_embd=8,
                                                        bias=False, **kw))


def test_transformer_flops_per_token_by_hand():
    # tied wte 10x8 = 80 (the output layer multiplies by it); ln1, ln2, ln_f weights 3 x 8;
    # q, k, v, o 4 x 8x8; fc 8x32, proj 32x8 -> N = 80 + 24 + 256 + 512 = 872 (wpe 4x8 is a lookup)
    # attention: 12 * n_layer * n_embd * T = 12 * 1 * 8 * 4 = 384
    model = tiny_transformer()
    assert flops_per_token(model, 4) == 6 * 872 + 384
    # nanoGPT's estimate_mfu: 6 N + 12 L H Q T, N = parameters less the position table
    assert 6 * (model.num_parameters() - 4 * 8) + 12 * 1 * 2 * 4 * 4 == 6 * 872 + 384
    # untied: wte is a lookup, lm_head (10x8) multiplies: the same count
    assert flops_per_token(tiny_transformer(tie_weights=False), 4) == 6 * 872 + 384
    # grouped-query (one kv head of 4): k and v are 8x4; the attention term is the queries'
    assert flops_per_token(tiny_transformer(n_kv_head=1), 4) == 6 * (872 - 2 * 32) + 384
    # the attention term grows with the window, the dense part does not
    assert flops_per_token(model, 2) == 6 * 872 + 12 * 8 * 2


def test_other_families_flops_per_token_by_hand():
    mlp = build_model("mlp", MLPConfig(vocab_size=7, context=3, n_embd=2, n_hidden=5))
    assert flops_per_token(mlp, 8) == 6 * ((6 * 5 + 5) + (5 * 7 + 7))  # hidden + output layer; the table is a lookup
    lstm = build_model("lstm", RecurrentConfig(vocab_size=6, cell="lstm", n_embd=3, n_hidden=4))
    gates = 4 * 4
    assert flops_per_token(lstm, 8) == 6 * (gates * 3 + gates * 4 + 2 * gates + (4 * 6 + 6))
    gru = build_model("gru", RecurrentConfig(vocab_size=6, cell="gru", n_embd=3, n_hidden=4))
    assert flops_per_token(gru, 8) == 6 * (12 * 3 + 12 * 4 + 2 * 12 + (4 * 6 + 6))
    average = build_model("context-average", ContextAverageConfig(vocab_size=5, n_embd=3))
    assert flops_per_token(average, 8) == 6 * (3 * 5 + 5)
    assert flops_per_token(build_model("bigram", BigramConfig(vocab_size=5)), 8) == 0


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_meter_counts_training_time_only_and_computes_mfu(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(throughput.time, "perf_counter", clock)
    model = tiny_transformer()
    meter = ThroughputMeter(model, PeakFlops(1e6, "given"))
    x = torch.zeros(3, 4, dtype=torch.long)
    meter.count(x)
    clock.now += 2.0
    meter.step_done()
    first = meter.interval()
    assert first["tokens_per_second"] == 12 / 2.0
    assert first["mfu"] == pytest.approx(12 * 5616 / 2.0 / 1e6)
    with meter.paused():  # an evaluation: not training time
        clock.now += 30.0
    meter.count(x)
    meter.count(x[:, :2])  # a shorter window: fewer attention FLOPs per token
    clock.now += 1.0
    meter.step_done()
    second = meter.interval()
    flops = 12 * 5616 + 6 * (6 * 872 + 12 * 8 * 2)
    assert second["tokens_per_second"] == 18 / 1.0
    assert second["mfu"] == pytest.approx(flops / 1.0 / 1e6)
    summary = meter.summary()
    assert summary["train_tokens_per_second"] == 30 / 3.0
    assert summary["mfu"] == pytest.approx((12 * 5616 + flops) / 3.0 / 1e6)
    assert summary["flops_per_token"] == pytest.approx((12 * 5616 + flops) / 30)
    assert meter.cold_start_seconds() == pytest.approx(1.0)  # first step 2 s, the next 1 s
    assert model_flops_utilisation(5.0, None) is None
    assert ThroughputMeter(model, PeakFlops(None, "unknown")).summary()["mfu"] is None


def test_bigram_reports_no_mfu():
    meter = ThroughputMeter(build_model("bigram", BigramConfig(vocab_size=5)), PeakFlops(1e9, "given"))
    meter.count(torch.zeros(2, 3, dtype=torch.long))
    meter.step_done()
    assert meter.interval()["mfu"] is None and meter.interval()["tokens_per_second"] == 0.0


CPUINFO = """processor\t: 0
model name\t: Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz
siblings\t: 4
cpu cores\t: 2
flags\t\t: fpu sse avx avx2 fma avx512f avx512_vnni
"""


def test_cpu_peak_flops_from_cpuinfo():
    # 2 threads on hyper-threaded cores (4 siblings / 2 cores): 1 physical core x 2.5 GHz x 64
    peak = cpu_peak_flops(bfloat16=False, threads=2, info=CPUINFO)
    assert peak.flops == pytest.approx(2.5e9 * 64) and "avx512f" in peak.source
    assert cpu_peak_flops(bfloat16=False, threads=4, info=CPUINFO).flops == pytest.approx(2 * 2.5e9 * 64)
    avx2 = CPUINFO.replace(" avx512f avx512_vnni", "")
    assert cpu_peak_flops(bfloat16=False, threads=2, info=avx2).flops == pytest.approx(2.5e9 * 32)
    bf16 = cpu_peak_flops(bfloat16=True, threads=2, info=CPUINFO + "")
    assert bf16.flops is None and "--peak-flops" in bf16.source  # no avx512_bf16/amx_bf16 in these flags
    amx = CPUINFO.replace("avx512_vnni", "avx512_bf16 amx_bf16")
    assert cpu_peak_flops(bfloat16=True, threads=2, info=amx).flops == pytest.approx(2.5e9 * 1024)
    none = cpu_peak_flops(bfloat16=False, threads=2, info="model name\t: something @ 2.00GHz\nflags\t: fpu sse\n")
    assert none.flops is None and "pass --peak-flops" in none.source


def test_gpu_table_and_given_peak():
    assert gpu_peak_flops("NVIDIA H100 PCIe", half=True).flops == 756e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", half=True).flops == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", half=False).flops == 19.5e12
    unknown = gpu_peak_flops("Some Future GPU", half=True)
    assert unknown.flops is None and "--peak-flops" in unknown.source
    assert peak_flops(torch.device("cpu"), torch.float32, given=2e11) == PeakFlops(2e11, "given (--peak-flops)")
    with pytest.raises(ValueError, match="peak_flops=-1.0 must be a positive"):
        peak_flops(torch.device("cpu"), torch.float32, given=-1.0)


def test_every_logged_step_reports_tokens_per_second_and_mfu(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda info=None: {"avx2", "fma"})  # no native bfloat16
    ids = np.arange(400, dtype=np.uint16) % 10
    torch.manual_seed(0)
    model = tiny_transformer()
    config = TrainConfig(max_iters=6, batch_size=3, eval_interval=3, eval_iters=1, log_interval=2, warmup_iters=1,
                         progress=False, device="cpu", peak_flops=1e9)
    summary = Trainer(model, StreamBatches(ids, 4, 3), StreamBatches(ids, 4, 3), config, tmp_path / "run").fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 6]
    for r in steps:
        assert r["tokens_per_second"] > 0
        assert r["mfu"] == pytest.approx(r["tokens_per_second"] * 5616 / 1e9)
    assert summary["flops_per_token"] == 5616 and summary["peak_flops"] == 1e9
    assert summary["mfu"] == pytest.approx(summary["train_tokens_per_second"] * 5616 / 1e9)
    assert summary["peak_flops_source"] == "given (--peak-flops)"
    assert summary["precision"].startswith("float32 (auto: the CPU has no native bfloat16")
    assert summary["compile_cold_start_seconds"] is None


def test_cli_prints_mfu_and_refuses_a_bad_peak(tmp_path, capsys):
    from lmlab.cli import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 60)
    options = ["--corpus", str(corpus), "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
               "--max-iters", "4", "--batch-size", "4", "--eval-iters", "1", "--log-interval", "2", "--no-progress"]
    assert main(["train", "--out", str(tmp_path / "bad"), *options, "--peak-flops", "-1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: peak_flops=-1.0 must be a positive number of FLOPs per second, e.g. 1.5e11")
    assert not (tmp_path / "bad").exists()
    assert main(["train", "--out", str(tmp_path / "run"), *options, "--peak-flops", "1e9"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["peak_flops_source"] == "given (--peak-flops)"
    assert summary["mfu"] == pytest.approx(summary["train_tokens_per_second"] * summary["flops_per_token"] / 1e9)
