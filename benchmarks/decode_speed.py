"""Decoding speed: KV cache vs recomputation, batching, and the loop's own overhead.

    python benchmarks/decode_speed.py --out runs/decode_speed.json
    python benchmarks/decode_speed.py --quick --out /tmp/decode_speed.json   # a fast smoke run

(a) Per-token time with the KV cache at positions 64, 256 and 1024 against
    recomputing the whole prefix at the same positions (demo width: 4 layers,
    4 heads, 128 wide, vocabulary 69, block 1152 so position 1024 fits).
(b) Batched decoding of 32 prompts of different lengths against the same 32
    prompts one by one (demo char transformer, block 64).
(c) The decoding loop's own overhead (processors, search, bookkeeping) as a
    fraction of the model's forward time: ``generate`` against a bare loop of
    the same forward calls (same prompt, same number of steps, same state).

Random weights (speed does not depend on them). Every figure is the median of
``--repeats`` runs after a warm-up. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from lmlab.decode.generate import generate
from lmlab.decode.processors import build_processors
from lmlab.decode.setups import run_setup
from lmlab.models import build_model
from lmlab.models.base import LanguageModel, State
from lmlab.models.transformer import TransformerConfig

VOCAB = 69  # tiny Shakespeare characters + 4 specials


def demo_config(block_size: int = 64) -> TransformerConfig:
    return TransformerConfig(vocab_size=VOCAB, block_size=block_size, n_layer=4, n_head=4, n_embd=128,
                             dropout=0.0, bias=False, tie_weights=True)


CLOCK = time.perf_counter  # --clock cpu: time.process_time (robust on a shared, loaded machine)


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------- (a)


@torch.no_grad()
def kv_cache_vs_recompute(positions: list[int], repeats: int, steps: int = 16, device: str = "cpu") -> list[dict]:
    torch.manual_seed(0)
    model = build_model("transformer", demo_config(block_size=max(positions) + steps + 64)).eval().to(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (1, max(positions) + steps + 1), generator=g).to(device)
    rows = []
    for p in positions:
        _, state = model(ids[:, :p])
        _, state = model(ids[:, p : p + 1], state)  # the first append grows the cache; start after it

        def cached() -> None:
            s = state.clone()
            for j in range(steps):
                _, s = model(ids[:, p + 1 + j : p + 2 + j], s)

        def clone_only() -> None:
            state.clone()

        t_cached = (median_time(cached, repeats) - median_time(clone_only, repeats)) / steps
        t_full = median_time(lambda: model(ids[:, : p + 1]), repeats)
        rows.append({"position": p, "cached_ms_per_token": 1e3 * t_cached, "recompute_ms_per_token": 1e3 * t_full,
                     "speedup": t_full / t_cached})
    return rows


# ---------------------------------------------------------------- (b)


def batched_vs_sequential(n_prompts: int, max_new: int, repeats: int, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    model = build_model("transformer", demo_config()).eval().to(device)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 21, (n_prompts,), generator=g).tolist()
    prompts = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]
    procs = build_processors(temperature=0.8, top_k=40)

    def batched() -> None:
        generate(model, prompts, max_new, processors=procs, seed=0)

    def one_by_one() -> None:
        for p in prompts:
            generate(model, [p], max_new, processors=procs, seed=0)

    t_b = median_time(batched, repeats)
    t_s = median_time(one_by_one, max(1, repeats // 2))
    tokens = n_prompts * max_new
    return {"prompts": n_prompts, "prompt_lengths": f"{min(lengths)}-{max(lengths)}", "max_new_tokens": max_new,
            "batched_s": t_b, "sequential_s": t_s, "batched_tokens_per_s": tokens / t_b,
            "sequential_tokens_per_s": tokens / t_s, "throughput_ratio": t_s / t_b}


# ---------------------------------------------------------------- (c)


class ConstantModel(LanguageModel):
    """Costs (almost) nothing: returns the same next-token logits at every position.
    Running ``generate`` over it measures the loop alone (processors, search, bookkeeping)."""

    def __init__(self, logits: torch.Tensor, max_context: int | None) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=logits.shape[-1])
        self.register_buffer("row", logits.float())
        self._ctx = max_context

    @property
    def max_context(self):
        return self._ctx

    def forward(self, ids, state=None):
        start = state.length if state is not None else 0
        return self.row.expand(ids.shape[0], ids.shape[1], -1), State({}, start + ids.shape[1])


def loop_overhead(batch: int, prompt_len: int, max_new: int, repeats: int, device: str = "cpu") -> list[dict]:
    """Loop time (generate over a constant model minus the same forward calls on it) as a
    fraction of the demo model's forward time for the same calls. Measuring the loop on its
    own keeps the model's timing noise out of a small difference of two large numbers."""
    torch.manual_seed(0)
    model = build_model("transformer", demo_config()).eval().to(device)
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(4, VOCAB, (batch, prompt_len), generator=g).tolist()
    x = torch.tensor(prompts, device=device)
    steps = torch.randint(4, VOCAB, (batch, max_new), generator=g).to(device)
    with torch.no_grad():
        row = model(x[:1])[0][0, -1]
    null = ConstantModel(row, model.max_context).to(device)

    def bare(m) -> None:  # the forward calls generate makes: prefill + (max_new - 1) single steps
        with torch.no_grad():
            _, state = m(x)
            for j in range(max_new - 1):
                _, state = m(steps[:, j : j + 1], state)

    temperature = build_processors(temperature=0.8)
    sampling = build_processors(temperature=0.8, top_k=40, top_p=0.95)
    cases = {
        "generate, greedy, no processors": lambda m: generate(m, prompts, max_new, do_sample=False),
        "generate, sample T=0.8": lambda m: generate(m, prompts, max_new, processors=temperature, seed=0),
        "generate, sample T=0.8 top-k 40 top-p 0.95": lambda m: generate(m, prompts, max_new, processors=sampling,
                                                                          seed=0),
        "run_setup('top-k 40, top-p 0.95, temperature 0.8')": lambda m: run_setup(
            m, None, prompts, "top-k 40, top-p 0.95, temperature 0.8", max_new, seed=0),
    }
    t_forward = median_time(lambda: bare(model), repeats)
    t_null = median_time(lambda: bare(null), repeats * 3)
    rows = []
    for name, fn in cases.items():
        t_loop = median_time(lambda: fn(null), repeats * 3) - t_null
        t_full = median_time(lambda: fn(model), repeats)
        rows.append({"case": name, "batch": batch, "steps": max_new, "forward_ms": 1e3 * t_forward,
                     "loop_ms": 1e3 * t_loop, "generate_ms": 1e3 * t_full,
                     "overhead_fraction": t_loop / t_forward, "end_to_end_fraction": t_full / t_forward - 1,
                     "loop_us_per_step": 1e6 * t_loop / max_new})
    return rows


# ---------------------------------------------------------------- report


def markdown(result: dict) -> str:
    lines = ["### (a) KV cache vs recomputing the prefix (batch 1, ms per token)", "",
             "| position | with KV cache | recompute prefix | speed-up |", "|---:|---:|---:|---:|"]
    for r in result["kv_cache"]:
        lines.append(f"| {r['position']} | {r['cached_ms_per_token']:.2f} | {r['recompute_ms_per_token']:.2f} | "
                     f"{r['speedup']:.1f}x |")
    b = result["batching"]
    lines += ["", f"### (b) {b['prompts']} prompts (lengths {b['prompt_lengths']}, {b['max_new_tokens']} new tokens "
                  "each): batched vs one by one", "",
              "| mode | seconds | tokens/s |", "|---|---:|---:|",
              f"| one by one | {b['sequential_s']:.2f} | {b['sequential_tokens_per_s']:,.0f} |",
              f"| batched | {b['batched_s']:.2f} | {b['batched_tokens_per_s']:,.0f} |",
              f"| **ratio** | | **{b['throughput_ratio']:.1f}x** |",
              "", "### (c) Loop overhead over the bare forward calls (demo config, block 64)", "",
              "| case | batch | steps | model forward ms | loop ms | loop / forward | loop per step | generate ms |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["overhead"]:
        lines.append(f"| {r['case']} | {r['batch']} | {r['steps']} | {r['forward_ms']:.1f} | {r['loop_ms']:.1f} | "
                     f"**{100 * r['overhead_fraction']:.1f}%** | {r['loop_us_per_step']:.0f} µs | {r['generate_ms']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: time.perf_counter; cpu: time.process_time (CPU seconds of this process, "
                             "insensitive to other jobs on a shared machine; use with --threads 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats (a smoke run)")
    args = parser.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK = time.process_time
    repeats = 3 if args.quick else args.repeats
    positions = [64, 256] if args.quick else [64, 256, 1024]
    started = time.perf_counter()
    result = {
        "command": "python benchmarks/decode_speed.py" + (" --quick" if args.quick else "")
                   + (f" --repeats {args.repeats}" if args.repeats != 7 else "")
                   + (f" --threads {args.threads}" if args.threads else "")
                   + (f" --clock {args.clock}" if args.clock != "wall" else "") + f" --out {args.out}",
        "clock": args.clock,
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "kv_cache": kv_cache_vs_recompute(positions, repeats, device=args.device),
        "batching": batched_vs_sequential(8 if args.quick else 32, 20 if args.quick else 44, repeats, args.device),
        "overhead": [row for b in ((1,) if args.quick else (1, 32))
                     for row in loop_overhead(b, 8, 56, repeats, args.device)],
    }
    result["seconds"] = time.perf_counter() - started
    print(markdown(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
