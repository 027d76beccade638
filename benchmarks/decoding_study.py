"""The decoding study of docs/evaluation.md, end to end, on the bundled tiny Shakespeare.

    python benchmarks/decoding_study.py                 # about 4 minutes on 2 CPU cores

1. the generator: a small char transformer (113k parameters), trained with
   ``lmlab train --out OUT/gen --n-layer 2 --n-head 2 --n-embd 64 --block-size 128 --max-iters 4000``;
2. the oracle: a 5-gram interpolated Kneser-Ney char model fitted on the same
   training split (the first 90% of the corpus), saved as an lmlab checkpoint
   (family "ngram" + the char tokenizer) in OUT/oracle-5gram;
3. the prompts: the first 20 distinct speaker lines ("GREMIO:") of the held-out
   last 10% of the corpus, each followed by a newline, in OUT/prompts.jsonl;
4. the study: ``lmlab eval-generation`` with the default setups (greedy; sample;
   temperature 0.8; top-k 20; top-p 0.7; beam 4), 5 continuations of 100
   characters per prompt, seed 0, into OUT/study.

Validation bits per character of both models are printed (and written to
OUT/models.json) so the reader can check that the oracle is the stronger model.
Tokens/s are indicative only on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/decoding-study")
    p.add_argument("--max-iters", type=int, default=4000)
    p.add_argument("--order", type=int, default=5, help="oracle n-gram order")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("-k", "--num-continuations", type=int, default=5)
    p.add_argument("--length", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    p.add_argument("--reuse", action="store_true",
                   help="keep a generator already trained in OUT/gen (same numbers; only tokens/s move)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lmlab.cli import main as lmlab_main
    from lmlab.checkpoints import load_checkpoint
    from lmlab.data import read_corpus, split_by_position
    from lmlab.models.base import save_model
    from lmlab.models.ngram import NGramConfig, NGramModel
    from lmlab.score import stream_nll
    from lmlab.study import add_eval_generation_arguments, run_eval_generation
    from lmlab.tokenizers import build_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    # 1. the generator (the lmlab command itself)
    gen = out / "gen"
    reused = args.reuse and (gen / "best" / "config.json").is_file()
    if not reused:
        train = ["train", "--out", str(gen), "--n-layer", "2", "--n-head", "2", "--n-embd", "64",
                 "--block-size", "128", "--max-iters", str(args.max_iters), "--device", "cpu", "--no-progress"]
        if gen.exists():
            import shutil

            shutil.rmtree(gen)
        print("$ lmlab " + shlex.join(train), flush=True)
        # `lmlab train` seeds its batches (TrainConfig.seed) but builds the model before seeding
        # torch, so the initial weights come from the global generator: seed it for a repeatable run.
        torch.manual_seed(args.seed)
        if lmlab_main(train) != 0:
            return 1
    train_seconds = time.perf_counter() - t0

    # 2. the oracle: n-gram KN on the same char tokenizer and training split
    text = read_corpus()
    tok = build_tokenizer("char", text)
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    train_ids, val_ids = split_by_position(ids, 0.1)
    t1 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KN discounts fall back on char data; see lmlab.models.ngram
        ngram = NGramModel(NGramConfig(vocab_size=tok.vocab_size, order=args.order))
        ngram.fit([np.asarray(train_ids, dtype=np.int64)], add_bos_eos=False)
    oracle_dir = out / f"oracle-{args.order}gram"
    save_model(ngram, oracle_dir)
    tok.save(oracle_dir / "tokenizer.json")
    fit_seconds = time.perf_counter() - t1

    val = torch.as_tensor(np.asarray(val_ids, dtype=np.int64))
    generator, _ = load_checkpoint(gen)
    report = {
        "generator": {"checkpoint": str(gen / "best"), "parameters": generator.num_parameters(),
                      "train_seconds": None if reused else round(train_seconds, 1),
                      "val_bits_per_char": stream_nll(generator, val, window=128, stride=64).bits_per_token},
        "oracle": {"checkpoint": str(oracle_dir), "order": args.order, "fit_seconds": round(fit_seconds, 1),
                   "ngrams": sum(ngram.sizes),
                   "val_bits_per_char": stream_nll(ngram, val, window=512, stride=512 - args.order).bits_per_token},
    }
    (out / "models.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2), flush=True)

    # 3. held-out prompts: speaker lines of the validation part
    names = [line for line in tok.decode(val_ids.tolist()).split("\n") if re.fullmatch(r"[A-Z][A-Z ]+:", line)]
    names = list(dict.fromkeys(names))[: args.prompts]
    prompts = out / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": n + "\n"}) + "\n" for n in names))

    # 4. the study, with exactly the options of `lmlab eval-generation`
    study = ["--model", str(gen), "--oracle", str(oracle_dir), "--prompts", str(prompts),
             "--num-continuations", str(args.num_continuations), "--length", str(args.length),
             "--seed", str(args.seed), "--out", str(out / "study"), "--no-progress"]
    print("$ lmlab eval-generation " + shlex.join(study), flush=True)
    t2 = time.perf_counter()
    parsed = add_eval_generation_arguments(argparse.ArgumentParser()).parse_args(study)
    status = run_eval_generation(parsed)
    print(f"study: {time.perf_counter() - t2:.0f} s; everything: {time.perf_counter() - t0:.0f} s "
          f"({torch.get_num_threads()} torch thread(s))")
    return status


if __name__ == "__main__":
    sys.exit(main())
