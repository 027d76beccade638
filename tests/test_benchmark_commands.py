"""The commands benchmarks/nanogpt_shakespeare.py runs side by side train what its preset says."""

import dataclasses
import importlib.util
from pathlib import Path

from lmlab.cli import _train_config, build_from_args, build_parser
from lmlab.models.transformer import TransformerConfig
from lmlab.train import TrainConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "nanogpt_shakespeare.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("nanogpt_shakespeare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lmlab_train_of_the_side_by_side_is_the_cpu_preset():
    bench = load_benchmark()
    preset = bench.PRESETS["cpu"]
    command = bench.lmlab_command(2000, Path("out"), processes=1)
    assert command[1:4] == ["-m", "lmlab", "train"]
    args = build_parser().parse_args(command[3:])
    expected = TrainConfig(**preset["train"], device="cpu", progress=False)
    assert dataclasses.asdict(_train_config(args)) == dataclasses.asdict(expected)
    model = build_from_args(args, vocab_size=69, block_size=args.block_size)
    assert model.config == TransformerConfig(vocab_size=69, bias=False, **preset["model"])
    assert args.nproc_per_node is None
    ddp = build_parser().parse_args(bench.lmlab_command(2000, Path("out"), processes=2)[3:])
    assert ddp.nproc_per_node == 2 and _train_config(ddp) == _train_config(args)


def test_the_settings_alternated_name_each_tool_and_thread_count():
    bench = load_benchmark()
    settings = bench.variants(["1", "default"], ddp=True)
    assert [bench.label(v) for v in settings] == [
        "lmlab, 1 process(es) x 1 thread(s)", "nanoGPT, 1 process(es) x 1 thread(s)",
        "lmlab, 1 process(es) x default threads", "nanoGPT, 1 process(es) x default threads",
        "lmlab, 2 process(es) x 1 thread(s)"]
