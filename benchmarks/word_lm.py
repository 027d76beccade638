"""Word-level language models on WikiText-2: adaptive against full softmax, a time-bounded
LSTM run, and the interpolation of Kneser-Ney, the LSTM and caches of the text read.

    python benchmarks/word_lm.py speed --out results/word_lm_speed.json
    python benchmarks/word_lm.py train --minutes 25 --out runs/wt2-lstm
    python benchmarks/word_lm.py kn --out results/word_lm_kn.json
    python benchmarks/word_lm.py interpolate --lstm runs/wt2-lstm --kn results/word_lm_kn.npz --out results/word_lm_interpolate.json
    python benchmarks/word_lm.py interpolate --lstm runs/wt2-lstm --kn results/word_lm_kn.npz \
        --cache cache:order=1,decay=0.998,window=3000 --cache cache:order=2,decay=0.999,window=3000 --out results/word_lm_cache.json

Data: the tokenized WikiText-2 files (``--data``, default ../shared/data/wikitext-2:
train.txt, valid.txt, test.txt, ``<unk>`` as given). Every line, empty ones included,
is its words (split on whitespace) followed by ``<eos>``, read as one stream: the
convention of PyTorch's word_language_model and of AWD-LSTM (Merity et al. 2018), whose
perplexities are per word with ``<eos>`` counted. The vocabulary is the training split's
words, most frequent first (what an adaptive softmax needs), after ``<unk>``, ``<s>``,
``</s>`` (lmlab's word tokenizer); each line's end is ``</s>`` (WikiText's ``<eos>``).

``speed``: training tokens per second of the same LSTM with a full softmax and with an
adaptive softmax (``adaptive_cutoffs``), truncated BPTT windows, Adam, on ``--threads``
threads; per second of wall time and per second of this process's CPU time (the figure
that other jobs on a shared machine do not move). ``train``: the LSTM trained for ``--minutes`` of wall time or, with ``--clock cpu``, of
this process's CPU time (evaluations are not counted), learning rate on a cosine over
the budget; perplexity of the first ``--curve-tokens`` validation tokens every
``--eval-every`` minutes (the curve), full validation and test perplexity at the end; the model is saved as
an lmlab checkpoint. ``kn``: KN3 and KN5 (lmlab's n-gram family) per sentence, as KenLM
scores them, and a KN5 over the stream as the LSTM sees it (its target log-probs saved
beside --out). ``interpolate``: the ``interpolate`` family's mixture of (stream KN5,
LSTM), weights fitted by EM on the validation split; perplexities of each.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lmlab.models import build_model, load_model, save_model  # noqa: E402
from lmlab.models.base import State, atomic_write_text  # noqa: E402
from lmlab.models.heads import next_token_loss  # noqa: E402
from lmlab.tokenizers import WordTokenizer, load_tokenizer, split_words  # noqa: E402

WIKITEXT2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"


def frequency_ordered_words(text: str) -> WordTokenizer:
    """lmlab's word tokenizer over the words of ``text``, most frequent first (what an adaptive
    softmax's cutoffs need; ``WordTokenizer.train`` numbers words by first occurrence)."""
    counts = Counter(split_words(text))
    specials = ["<unk>", "<s>", "</s>"]
    words = sorted((w for w in counts if w not in specials), key=lambda w: -counts[w])  # ties: first seen
    return WordTokenizer([*specials, *words])


def load_splits(data: Path, tok: WordTokenizer | None = None):
    """(tokenizer, {split: 1-D int64 stream}) with each line's words followed by <eos>."""
    texts = {s: (data / f"{s}.txt").read_text(encoding="utf-8") for s in ("train", "valid", "test")}
    if tok is None:
        tok = frequency_ordered_words(texts["train"])
    streams = {}
    for split, text in texts.items():
        ids: list[int] = []
        for line in text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"):
            ids.extend(tok.encode(line))
            ids.append(tok.eos_id)
        streams[split] = torch.tensor(ids, dtype=torch.long)
    return tok, streams


def batchify(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """(N,) -> (batch, N // batch): parallel streams read left to right."""
    n = len(ids) // batch
    return ids[: n * batch].view(batch, n)


def detach(state: State) -> State:
    return State({k: v.detach() for k, v in state.tensors.items()}, 0)


def lstm_config(args, vocab_size: int, adaptive: bool) -> dict:
    return {"vocab_size": vocab_size, "block_size": args.bptt, "n_embd": args.embd, "n_hidden": args.hidden,
            "n_layer": args.layers, "dropout": args.dropout, "embed_dropout": args.embed_dropout,
            "variational_dropout": True, "adaptive_cutoffs": args.cutoffs if adaptive else None}


def train_step(model, opt, data: torch.Tensor, i: int, bptt: int, state, clip: float):
    x, y = data[:, i : i + bptt], data[:, i + 1 : i + 1 + bptt]
    x = x[:, : y.shape[1]]
    loss, state = next_token_loss(model, x, y, state)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss.item(), detach(state), y.numel()


@torch.no_grad()
def stream_perplexity(model, ids: torch.Tensor, batch: int, chunk: int = 200) -> float:
    """exp(mean NLL per token), the stream read as ``batch`` parallel streams with the state carried."""
    model.eval()
    data = batchify(ids, batch)
    state, total, count = None, 0.0, 0
    for i in range(0, data.shape[1] - 1, chunk):
        x, y = data[:, i : i + chunk], data[:, i + 1 : i + 1 + chunk]
        x = x[:, : y.shape[1]]
        loss, state = next_token_loss(model, x, y, state)
        total += float(loss) * y.numel()
        count += y.numel()
    model.train()
    return math.exp(total / count)


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def cmd_speed(args) -> dict:
    tok, streams = load_splits(Path(args.data))
    data = batchify(streams["train"], args.batch)
    rows = []
    for adaptive in (False, True):
        torch.manual_seed(0)
        model = build_model("lstm", lstm_config(args, tok.vocab_size, adaptive))
        opt = torch.optim.Adam(model.parameters(), lr=args.lr)
        state, tokens, t0, c0 = None, 0, None, None
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                tokens, t0, c0 = 0, time.perf_counter(), time.process_time()
            _, state, n = train_step(model, opt, data, step * args.bptt, args.bptt, state, args.clip)
            tokens += n
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows.append({"output": "adaptive" if adaptive else "full softmax", "tokens_per_cpu_second": tokens / cpu,
                     "tokens_per_second": tokens / wall, "parameters": model.num_parameters(),
                     "load_average": load_average()})
        print(json.dumps(rows[-1]), flush=True)
    return {"vocab_size": tok.vocab_size, "threads": torch.get_num_threads(), "config": vars(args), "rows": rows,
            "speedup_cpu": rows[1]["tokens_per_cpu_second"] / rows[0]["tokens_per_cpu_second"],
            "speedup_wall": rows[1]["tokens_per_second"] / rows[0]["tokens_per_second"]}


def cmd_train(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    tok, streams = load_splits(Path(args.data))
    torch.manual_seed(args.seed)
    model = build_model("lstm", lstm_config(args, tok.vocab_size, not args.full_softmax))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    data = batchify(streams["train"], args.batch)
    budget = args.minutes * 60.0
    print(f"vocabulary {tok.vocab_size}; {len(streams['train']):,} training tokens, {len(streams['valid']):,} "
          f"validation, {len(streams['test']):,} test; {model.num_parameters():,} parameters", flush=True)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    curve, trained, tokens, epoch, stop = [], 0.0, 0, 0, "budget"
    next_eval = args.eval_every * 60.0
    state, i, wall0 = None, 0, time.perf_counter()
    curve_ids = streams["valid"][: args.curve_tokens]
    while trained < budget:
        if time.perf_counter() - wall0 > args.wall_limit * 60.0:
            stop = "wall_limit"
            break
        if i >= data.shape[1] - 1:
            i, state, epoch = 0, None, epoch + 1
        for group in opt.param_groups:
            group["lr"] = args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(trained / budget, 1.0))))
        t = clock()
        loss, state, n = train_step(model, opt, data, i, args.bptt, state, args.clip)
        trained += clock() - t
        tokens += n
        i += args.bptt
        if trained >= next_eval:
            next_eval += args.eval_every * 60.0
            point = {"minutes": round(trained / 60, 2), "wall_minutes": round((time.perf_counter() - wall0) / 60, 2),
                     "tokens": tokens, "epochs": round(tokens / len(streams["train"]), 3), "train_loss": round(loss, 4),
                     "val_ppl_prefix": round(stream_perplexity(model, curve_ids, 10), 2), "load_average": load_average()}
            curve.append(point)
            print(json.dumps(point), flush=True)
    save_model(model, out / "model")
    tok.save(out / "model" / "tokenizer.json")
    result = {"config": vars(args), "parameters": model.num_parameters(), "threads": torch.get_num_threads(),
              "clock": args.clock, "stop": stop, "train_minutes": trained / 60, "tokens_per_second": tokens / trained,
              "curve": curve}
    atomic_write_text(out / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def kneser_ney(tok, order: int):
    """An unfitted interpolated modified Kneser-Ney model over the tokenizer's ids."""
    return build_model("ngram", {"vocab_size": tok.vocab_size, "order": order, "bos_id": tok.bos_id,
                                 "eos_id": tok.eos_id, "unk_id": tok.unk_id})


def cmd_kn(args) -> dict:
    """KN3/KN5 per sentence (KenLM's way) and the stream KN5's target log-probs for the interpolation."""
    from lmlab.models.interpolate import component_target_logprobs

    tok, streams = load_splits(Path(args.data))
    result: dict = {"vocab_size": tok.vocab_size, "load_average_start": load_average()}

    def lines(split):  # per-line ids without the <eos> (the n-gram adds <s> ... </s>)
        s = streams[split].numpy()
        return [x[:-1] for x in np.split(s, np.flatnonzero(s == tok.eos_id) + 1)[:-1]]

    for order in (3, 5):
        t = time.perf_counter()
        kn = kneser_ney(tok, order).fit(lines("train"), add_bos_eos=True)
        test = lines("test")
        result[f"kn{order}_sentences_test_ppl"] = kn.perplexity(test, add_bos_eos=True)
        result[f"kn{order}_nonempty_sentences_test_ppl"] = kn.perplexity([x for x in test if len(x)], add_bos_eos=True)
        result[f"kn{order}_sentences_seconds"] = time.perf_counter() - t
        print(json.dumps({k: v for k, v in result.items() if k.startswith(f"kn{order}")}), flush=True)
    kn5 = kneser_ney(tok, 5).fit(streams["train"].numpy(), add_bos_eos=False)  # n-grams span lines, as the LSTM reads
    logps = {split: component_target_logprobs([kn5], streams[split])[:, 0] for split in ("valid", "test")}
    result["kn5_stream_valid_ppl"] = math.exp(-float(logps["valid"].mean()))
    result["kn5_stream_test_ppl"] = math.exp(-float(logps["test"].mean()))
    result["load_average_end"] = load_average()
    np.savez(Path(args.out).with_suffix(".npz"), **logps)
    return result


def cmd_interpolate(args) -> dict:
    """The interpolate family over stream KN5, the LSTM (--lstm) and caches (--cache SPEC ...), weights
    by EM on validation; the KN5 target log-probs come from ``kn``'s .npz (the same tokenizer: the
    training split's vocabulary)."""
    from lmlab.cli import cache_from_spec
    from lmlab.models.interpolate import component_target_logprobs, fit_weights, mixture_logprobs

    if args.lstm:
        tok = load_tokenizer(Path(args.lstm) / "model" / "tokenizer.json")
        _, streams = load_splits(Path(args.data), tok)
        extra = [("lstm", load_model(Path(args.lstm) / "model").eval())]
    else:
        tok, streams = load_splits(Path(args.data))
        extra = []
    extra += [(spec, cache_from_spec(spec, tok.vocab_size)) for spec in args.cache or []]
    kn = np.load(Path(args.kn))
    result: dict = {"load_average_start": load_average(), "components": ["kn5_stream"] + [n for n, _ in extra]}
    logps, seconds = {}, {}
    for split in ("valid", "test"):
        columns = [kn[split]]
        for name, model in extra:
            t = time.process_time()
            columns.append(component_target_logprobs([model], streams[split])[:, 0])
            seconds[f"{name} {split}"] = round(time.process_time() - t, 1)
        logps[split] = np.stack(columns, axis=1)
    weights, history = fit_weights(logps["valid"])
    for k, name in enumerate(result["components"]):
        result[f"{name}_valid_ppl"] = math.exp(-float(logps["valid"][:, k].mean()))
        result[f"{name}_test_ppl"] = math.exp(-float(logps["test"][:, k].mean()))
    # The mixture of these per-token log-probs is what InterpolatedLM computes (tests/test_interpolate.py).
    for split in ("valid", "test"):
        result[f"interpolated_{split}_ppl"] = math.exp(-float(mixture_logprobs(logps[split], weights).mean()))
    result["weights"] = weights.tolist()
    result["em_valid_nll"] = history
    result["cpu_seconds"] = seconds
    result["load_average_end"] = load_average()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["speed", "train", "kn", "interpolate"])
    ap.add_argument("--data", default=str(WIKITEXT2))
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embd", type=int, default=400)
    ap.add_argument("--hidden", type=int, default=400)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=0.25)
    ap.add_argument("--embed-dropout", type=float, default=0.0)
    ap.add_argument("--cutoffs", type=int, nargs="+", default=[2000, 10000])
    ap.add_argument("--full-softmax", action="store_true", help="train: a full softmax instead of the adaptive one")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--bptt", type=int, default=35)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--clip", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=20, help="speed: timed steps per output layer")
    ap.add_argument("--warmup", type=int, default=3, help="speed: untimed steps first")
    ap.add_argument("--minutes", type=float, default=25.0, help="train: training budget in minutes of --clock")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="train: what --minutes counts: wall time, or this process's CPU time (all threads) "
                         "- the fair measure of work on a machine shared with other jobs")
    ap.add_argument("--wall-limit", type=float, default=600.0, help="train: stop after this many wall minutes anyway")
    ap.add_argument("--eval-every", type=float, default=2.5, help="train: minutes (of --clock) between curve points")
    ap.add_argument("--curve-tokens", type=int, default=50_000,
                    help="train: curve points use the first N validation tokens; the end uses all of it")
    ap.add_argument("--lstm", help="interpolate: the directory `train` wrote (optional)")
    ap.add_argument("--cache", action="append", metavar="SPEC",
                    help="interpolate: add a cache component, e.g. cache:order=1,decay=0.998,window=3000 (repeatable)")
    ap.add_argument("--kn", help="interpolate: the .npz `kn` wrote beside its --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"speed": cmd_speed, "train": cmd_train, "kn": cmd_kn, "interpolate": cmd_interpolate}[args.command](args)
    if args.command != "train":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("curve", "config", "em_valid_nll")}, indent=2))


if __name__ == "__main__":
    main()
