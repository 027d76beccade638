"""Tokens per second: the numpy reference transformer against lmlab's PyTorch model on CPU.

    python benchmarks/reference_speed.py --out runs/reference_speed.json

The model is the ``lmlab demo`` character transformer (nanoGPT's CPU config: 4 layers,
4 heads, 128 wide, block 64, vocab 69, bias=False, tied weights) with random weights,
saved with ``save_model`` and loaded into numpy with ``load_lmlab_checkpoint``. Two jobs:

- score: full sequences of 64 tokens, ``--batch`` of them per call (one forward pass);
- decode: batch 1, greedy, one prompt token then 63 new tokens through the KV cache.

Each timing is the median of ``--repeats`` runs after one warm-up run. ``--threads N``
(default 1) sets OMP/OpenBLAS/MKL threads for both engines before numpy and torch are
imported (``--threads 0``: the libraries' defaults). Prints a Markdown table and writes
JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    fn()                                                     # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--batch", type=int, default=16, help="sequences per scoring call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for both engines, set before numpy/torch load (0: library defaults)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        for name in THREAD_VARIABLES:
            os.environ[name] = str(args.threads)
    import numpy as np          # after the thread variables: BLAS reads them when it loads
    import torch

    from lmlab.demo import nanogpt_cpu_config
    from lmlab.models import build_model, save_model
    from lmlab.reference import load_lmlab_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    config = nanogpt_cpu_config(vocab_size=69)
    model = build_model("transformer", config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, tmp)
        engine = load_lmlab_checkpoint(tmp)
    T = config.block_size
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, config.vocab_size, (args.batch, T))
    ids_t = torch.from_numpy(ids)

    with torch.inference_mode():
        ref = model(ids_t)[0].numpy()
    max_diff = float(np.abs(engine(ids)[0] - ref).max())

    def torch_score():
        with torch.inference_mode():
            model(ids_t)

    def numpy_score():
        engine(ids)

    def torch_decode() -> list[int]:
        out = [int(ids[0, 0])]
        with torch.inference_mode():
            logits, state = model(ids_t[:1, :1])
            for _ in range(T - 1):
                out.append(int(logits[0, -1].argmax()))
                logits, state = model(torch.tensor([[out[-1]]]), state)
        return out

    def numpy_decode() -> list[int]:
        out = [int(ids[0, 0])]
        logits, state = engine.step(ids[:1, 0], None)
        for _ in range(T - 1):
            out.append(int(logits[0].argmax()))
            logits, state = engine.step(np.array([out[-1]]), state)
        return out

    same_tokens = torch_decode() == numpy_decode()
    rows = []
    for job, tokens, runs in (("score", args.batch * T, (("pytorch", torch_score), ("numpy", numpy_score))),
                              ("decode", T - 1, (("pytorch", torch_decode), ("numpy", numpy_decode)))):
        for engine_name, fn in runs:
            median, times = timed(fn, args.repeats)
            rows.append(dict(job=job, engine=engine_name, tokens=tokens, median_s=median, times_s=times,
                             tokens_per_s=tokens / median))

    result = dict(
        model=dict(vars(config)), params=model.num_parameters(), batch=args.batch, seq_len=T,
        repeats=args.repeats, threads=args.threads or "default", torch_threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(), thread_env={k: os.environ.get(k) for k in THREAD_VARIABLES},
        torch=torch.__version__, numpy=np.__version__, python=platform.python_version(),
        machine=platform.machine(), max_abs_logit_diff=max_diff, greedy_tokens_identical=same_tokens, rows=rows,
    )
    desc = {"score": f"score {args.batch} x {T} tokens (one call)", "decode": f"decode {T - 1} tokens, batch 1"}
    print(f"demo char transformer ({result['params']:,} parameters), CPU ({os.cpu_count()} cores), "
          f"threads {result['threads']} (torch: {result['torch_threads']}), "
          f"median of {args.repeats}; max |logit diff| {max_diff:.1e}, greedy tokens identical: {same_tokens}\n")
    print("| job | PyTorch tokens/s | numpy tokens/s | numpy / PyTorch |")
    print("|---|---:|---:|---:|")
    for job in ("score", "decode"):
        t, n = (next(r for r in rows if r["job"] == job and r["engine"] == e) for e in ("pytorch", "numpy"))
        print(f"| {desc[job]} | {t['tokens_per_s']:,.0f} | {n['tokens_per_s']:,.0f} | "
              f"{n['tokens_per_s'] / t['tokens_per_s']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
