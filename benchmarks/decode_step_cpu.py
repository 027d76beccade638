"""CPU time of one batch-1 decoding step of SmolLM2-135M (from its GGUF file), one thread.

    PYTHONPATH=src python benchmarks/decode_step_cpu.py int8+bfloat16 --steps 16

Reads a 32-token prompt, runs 3 warm-up steps, then times ``--steps`` greedy steps and
prints the process CPU time and the wall time per step. Process CPU time is what a
shared, loaded machine disturbs least, so before/after comparisons of the step are made
with it: run this file under two source trees (``PYTHONPATH``), alternating.
"""

from __future__ import annotations

import argparse
import time

import torch

from cpu_inference import smollm2_gguf
from lmlab.gguf_file import read_gguf_model
from lmlab.quantize import quantize_model, quantize_output, set_dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("path", choices=["float32", "bfloat16", "int8+bfloat16", "int4+bfloat16"]
                    + [f"{p}+output-{s}" for p in ("int8+bfloat16", "int4+bfloat16") for s in ("int8", "int8-dynamic")])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = read_gguf_model(smollm2_gguf(), keep_quantized=args.path.startswith("int4"))
    if args.path.startswith("int8"):
        quantize_model(model, 8)
    if "+output-" in args.path:
        quantize_output(model, args.path.partition("+output-")[2])
    if args.path != "float32":
        set_dtype(model, "bfloat16")
    ids = torch.randint(100, 40000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, state = model.next_token_logits(ids)
        token = logits.argmax(-1, keepdim=True)
        for step in range(3 + args.steps):
            if step == 3:
                cpu, wall = time.process_time(), time.perf_counter()
            logits, state = model.next_token_logits(token, state)
            token = logits.argmax(-1, keepdim=True)
    cpu, wall = (time.process_time() - cpu) / args.steps, (time.perf_counter() - wall) / args.steps
    print(f"{args.label} {args.path}: {cpu * 1e3:.1f} CPU ms/step, {wall * 1e3:.1f} wall ms/step")


if __name__ == "__main__":
    main()
