"""Retrieval-augmented generation, worked offline on tiny Shakespeare; and RAG-token's decoding cost.

    python benchmarks/rag_example.py --out runs/rag-example

1. The collection: one document per speech of the bundled corpus ("NAME:\\nlines",
   blank-line separated), retrieved with BM25 (k1 = 1.5, b = 0.75).
2. The model: a char transformer trained briefly on the first 90% of the corpus
   (or ``--model DIR``, an lmlab checkpoint with a char tokenizer).
3. The questions: speeches from the last 10% of the corpus (never trained on),
   short enough to fit in ``--max-doc-tokens``. The question is the speaker and the
   start of the speech's first line ("ROMEO:\\nIs the day so young"), the answer the
   next ``--answer-chars`` characters of that line. The answer is in exactly that
   document (its text), so a model that reads the document can copy it.
   Then (``--generator-iters``) the generator is fine-tuned on the layout RAG feeds it,
   made from the first 90% of the corpus only: each short speech, a blank line, and its
   speaker and first line again (as in RAG, where the generator is trained on retrieved
   documents); both generators are evaluated.
4. Reported: the mean log-likelihood of the right answer (nats) without retrieval,
   with RAG-sequence and RAG-token over the top k BM25 documents, and with the true
   document given (an upper bound of what retrieval can give); BM25's recall@k.
5. Speed: greedy decoding of ``--new-tokens`` tokens for B prompts with RAG-token at
   k = 1, 2, 4, 8 against the wrapped model decoding the same B*k (document, query)
   rows itself, and against the plain model on the B queries.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmlab.data import StreamBatches, bundled_corpus_path, read_corpus, split_by_position  # noqa: E402
from lmlab.decode import run_setup  # noqa: E402
from lmlab.models import build_model  # noqa: E402
from lmlab.rag import (  # noqa: E402
    BM25Retriever,
    DenseRetriever,
    RAGTokenModel,
    continuation_logprobs,
    document_prefix,
    load_collection,
    rag_sequence_scores,
)
from lmlab.tokenizers import CharTokenizer  # noqa: E402
from lmlab.train import TrainConfig, Trainer  # noqa: E402


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def get_model(a, text, tok):
    if a.model:
        from lmlab.checkpoints import load_checkpoint

        model, mtok = load_checkpoint(a.model)
        if mtok.to_json() != tok.to_json():
            raise SystemExit(f"{a.model} does not use the corpus' char tokenizer")
        return model.eval(), {"loaded": a.model}
    ids = np.asarray(tok.encode(text), dtype=np.int64)
    train_ids, val_ids = split_by_position(ids)
    torch.manual_seed(a.seed)
    model = build_model("transformer", dict(vocab_size=tok.vocab_size, block_size=a.block, n_layer=a.n_layer,
                                            n_head=4, n_embd=a.n_embd))
    conf = TrainConfig(max_iters=a.iters, batch_size=a.batch, lr=2e-3, min_lr=2e-4, warmup_iters=50,
                       eval_interval=a.iters, eval_iters=10, log_interval=50, seed=a.seed, progress=False)
    out = Path(a.out) / "model"
    t0 = time.perf_counter()
    summary = Trainer(model, StreamBatches(train_ids, a.block, a.batch), StreamBatches(val_ids, a.block, a.batch),
                      conf, out, tokenizer=tok, resume=(out / "last" / "trainer.json").is_file()).fit()
    summary["wall_seconds"] = time.perf_counter() - t0
    return model.eval(), summary


def finetune_generator(model, docs, text, tok, a):
    """Continue training on (document, question, answer) text from the first 90% of the corpus:
    each short speech followed by its speaker and first line again, the layout RAG feeds."""
    cut = int(len(text) * 0.9)
    head_text = text[:cut]
    rng = random.Random(a.seed + 7)
    pieces = []
    for d in docs:
        head, _, body = d.text.partition("\n")
        if d.text in head_text and head.endswith(":") and body and len(d.text) + 2 <= a.max_doc_tokens:
            pieces.append(f"{d.text}\n\n{head}\n{body.split(chr(10))[0]}\n\n")
    rng.shuffle(pieces)
    ids = np.asarray(tok.encode("".join(pieces)), dtype=np.int64)
    train_ids, val_ids = split_by_position(ids)
    conf = TrainConfig(max_iters=a.generator_iters, batch_size=a.batch, lr=1e-3, min_lr=1e-4, warmup_iters=20,
                       eval_interval=a.generator_iters, eval_iters=10, log_interval=50, seed=a.seed, progress=False)
    out = Path(a.out) / "model-rag"
    t0 = time.perf_counter()
    summary = Trainer(model.train(), StreamBatches(train_ids, a.block, a.batch), StreamBatches(val_ids, a.block, a.batch),
                      conf, out, tokenizer=tok, resume=(out / "last" / "trainer.json").is_file()).fit()
    summary.update(wall_seconds=time.perf_counter() - t0, pieces=len(pieces), tokens=len(ids))
    return model.eval(), summary


def make_questions(docs, text, a):
    cut = int(len(text) * 0.9)  # the validation part of the corpus
    tail = text[cut:]
    rng = random.Random(a.seed)
    out = []
    for i, d in enumerate(docs):
        if d.text not in tail or len(d.text) + 2 > a.max_doc_tokens:
            continue
        head, _, body = d.text.partition("\n")
        if not head.endswith(":") or not body:
            continue
        line = body.split("\n")[0]
        if len(line) < a.query_chars + a.answer_chars:
            continue
        out.append({"doc": i, "query": f"{head}\n{line[: a.query_chars]}",
                    "answer": line[a.query_chars : a.query_chars + a.answer_chars]})
    rng.shuffle(out)
    return out[: a.questions]


@torch.no_grad()
def rag_token_logprob(rag, tok, query, answer):
    q, y = tok.encode(query), tok.encode(answer)
    # retrieve for the question alone (decoding the fed ids would put the answer in the query)
    logits, _ = rag(torch.tensor([q + y[:-1]]), retrieval=rag.retrieve([query]))
    lp = logits[0, len(q) - 1 :]
    return float(lp[torch.arange(len(y)), torch.tensor(y)].sum())


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed(model, tok, retriever, questions, a):
    B, n = a.speed_batch, a.new_tokens
    queries = [q["query"] for q in questions[:B]]
    q_ids = [tok.encode(x) for x in queries]
    L = min(len(x) for x in q_ids)
    q_ids = [x[:L] for x in q_ids]  # equal lengths: one prompt call, then one call per new token
    base = timed(lambda: run_setup(model, tok, q_ids, "greedy", n, eos_id=-1), a.repeats)
    rows = []
    for k in (1, 2, 4, 8):
        rag = RAGTokenModel(model, tok, retriever, k=k, max_doc_tokens=a.max_doc_tokens)
        t_rag = timed(lambda: run_setup(rag, tok, q_ids, "greedy", n, eos_id=-1), a.repeats)
        # the same B*k rows (left-padded document prefixes + query) decoded by the model itself
        hits = rag.retrieve([tok.decode(x) for x in q_ids])
        prefixes = [rag.prefix_ids(int(i)) for i in hits.indices.reshape(-1)]
        P = max(map(len, prefixes))
        flat = [rag.padded(p, P) + q_ids[r // k] for r, p in enumerate(prefixes)]
        t_rows = timed(lambda: run_setup(model, tok, flat, "greedy", n, eos_id=-1), a.repeats)
        rows.append({"k": k, "rag_token_s": t_rag, "model_on_Bk_rows_s": t_rows, "model_on_B_queries_s": base,
                     "rag_over_Bk_rows": t_rag / t_rows, "rag_over_plain": t_rag / base,
                     "ms_per_step_rag": 1000 * t_rag / n})
        log(json.dumps(rows[-1]))
    return {"batch": B, "new_tokens": n, "repeats": a.repeats, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/rag-example")
    p.add_argument("--model", help="an lmlab checkpoint with the corpus' char tokenizer (default: train one)")
    p.add_argument("--iters", type=int, default=1500)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--generator-iters", type=int, default=400,
                   help="then fine-tune the generator on (document, question, answer) text of the training part (0: no)")
    p.add_argument("--questions", type=int, default=100)
    p.add_argument("--query-chars", type=int, default=16, help="characters of the line in the question")
    p.add_argument("--answer-chars", type=int, default=20)
    p.add_argument("--max-doc-tokens", type=int, default=160)
    p.add_argument("--k", type=int, nargs="+", default=[1, 4])
    p.add_argument("--temperature", type=float, default=1.0, help="of P(D | x) = softmax(BM25 / T)")
    p.add_argument("--dense", help="a sentence-transformers model directory: also report dense retrieval")
    p.add_argument("--hf-generator", help="also evaluate a Hugging Face causal LM directory as the generator "
                                          "(e.g. SmolLM2-135M-Instruct, see benchmarks/distill_study.py)")
    p.add_argument("--hf-questions", type=int, default=40, help="the first N questions for --hf-generator")
    p.add_argument("--hf-max-doc-tokens", type=int, default=96)
    p.add_argument("--speed-batch", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    text = read_corpus()
    tok = CharTokenizer.train(text)
    docs = load_collection(bundled_corpus_path())
    t0 = time.perf_counter()
    retrievers = {"BM25": BM25Retriever(docs)}
    index_seconds = time.perf_counter() - t0
    if a.dense:
        retrievers["dense"] = DenseRetriever(docs, a.dense)
    log(f"{len(docs)} documents; BM25 index in {index_seconds:.2f} s")
    model, train_summary = get_model(a, text, tok)
    questions = make_questions(docs, text, a)
    log(f"{len(questions)} questions, e.g. {questions[0]}")
    qs, ans = [q["query"] for q in questions], [q["answer"] for q in questions]
    mdt = a.max_doc_tokens

    def evaluate(model, label, tok=tok, n=None, mdt=mdt):
        qs_, ans_ = qs[:n], ans[:n]
        return _evaluate(model, label, tok, questions[:n], qs_, ans_, mdt)

    def _evaluate(model, label, tok, questions, qs, ans, mdt):
        results = {"none": continuation_logprobs(model, [tok.encode(q) for q in qs], [tok.encode(x) for x in ans])}
        true = [document_prefix(tok, docs[q["doc"]].text, "{doc}\n\n", mdt) for q in questions]
        results["true document"] = continuation_logprobs(
            model, [p + tok.encode(q) for p, q in zip(true, qs)], [tok.encode(x) for x in ans])
        for pad in ("filler", "repeat"):
            padder = RAGTokenModel(model, tok, retrievers["BM25"], k=1, max_doc_tokens=mdt, pad=pad)
            results[f"true document, left-padded to {mdt} tokens ({pad})"] = continuation_logprobs(
                model, [padder.padded(p, mdt) + tok.encode(q) for p, q in zip(true, qs)], [tok.encode(x) for x in ans])
        for rname, retriever in retrievers.items():
            temperature = a.temperature if rname == "BM25" else 0.05
            for k in a.k:
                seq = rag_sequence_scores(model, tok, retriever, qs, [[x] for x in ans], k=k, temperature=temperature,
                                          max_doc_tokens=mdt)
                results[f"{rname} RAG-sequence k={k}"] = [s[0].logprob for s in seq]
                for pad in ("repeat", "filler") if k > 1 else ("repeat",):
                    rag = RAGTokenModel(model, tok, retriever, k=k, temperature=temperature, max_doc_tokens=mdt, pad=pad)
                    method = f"{rname} RAG-token k={k}" + (f" (pad: {pad})" if k > 1 else "")
                    results[method] = [rag_token_logprob(rag, tok, q, x) for q, x in zip(qs, ans)]
        chars = sum(len(x) for x in ans)
        rows = []
        for name, lps in results.items():
            total = float(np.sum(lps))
            rows.append({"model": label, "method": name, "mean_logprob": total / len(lps), "nats_per_char": -total / chars,
                         "gain_vs_none": (total - float(np.sum(results["none"]))) / len(lps)})
            log(json.dumps(rows[-1]))
        return rows

    recall = {}
    for rname, retriever in retrievers.items():
        hits = retriever.search(qs, max(a.k), a.temperature if rname == "BM25" else 0.05)
        for k in sorted(set(a.k) | {1}):
            recall[f"{rname} recall@{k}"] = float(np.mean([q["doc"] in hits.indices[i, :k] for i, q in enumerate(questions)]))
    table = evaluate(model, "LM")
    summaries = {"LM": train_summary}
    if a.generator_iters:
        model, gen_summary = finetune_generator(model, docs, text, tok, a)
        summaries["RAG-tuned"] = gen_summary
        table += evaluate(model, "RAG-tuned")
    if a.hf_generator:
        from lmlab.checkpoints import load_checkpoint

        hf_model, hf_tok = load_checkpoint(f"hf:{a.hf_generator}")
        name = Path(a.hf_generator).name
        t0 = time.perf_counter()
        table += evaluate(hf_model, name, hf_tok, a.hf_questions, a.hf_max_doc_tokens)
        summaries[name] = {"questions": a.hf_questions, "max_doc_tokens": a.hf_max_doc_tokens,
                           "eval_seconds": time.perf_counter() - t0, "parameters": hf_model.num_parameters()}
    sp = speed(model, tok, retrievers["BM25"], questions, a)
    out = {"documents": len(docs), "questions": len(questions), "example": questions[0], "recall": recall,
           "bm25_index_seconds": index_seconds, "training": summaries,
           "parameters": model.num_parameters(), "max_doc_tokens": mdt, "temperature": a.temperature,
           "table": table, "speed": sp, "seconds": time.perf_counter() - t_start,
           "command": "python benchmarks/rag_example.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    (Path(a.out) / "results.json").write_text(json.dumps(out, indent=2))
    print(f"{len(docs)} documents, {len(questions)} questions; " + ", ".join(f"{k} = {v:.2f}" for k, v in recall.items()))
    print("\n| generator | method | mean log P(answer) (nats) | nats/char | gain vs no retrieval (nats/answer) |")
    print("|---|---|---:|---:|---:|")
    for r in table:
        print(f"| {r['model']} | {r['method']} | {r['mean_logprob']:.2f} | {r['nats_per_char']:.3f} | {r['gain_vs_none']:+.2f} |")
    print(f"\nRAG-token decoding, B = {sp['batch']} prompts, {sp['new_tokens']} greedy tokens (median of {sp['repeats']}):\n")
    print("| k | RAG-token (s) | model on the same B*k rows (s) | ratio | model on the B queries (s) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in sp["rows"]:
        print(f"| {r['k']} | {r['rag_token_s']:.3f} | {r['model_on_Bk_rows_s']:.3f} | {r['rag_over_Bk_rows']:.2f} | "
              f"{r['model_on_B_queries_s']:.3f} | {r['rag_over_plain']:.2f} |")
    print(f"\n{out['command']}  ({out['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
