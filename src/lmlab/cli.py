"""The ``lmlab`` command: prepare, train, score, interpolate, generate, plot, demo."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from lmlab import data as data_mod
from lmlab.checkpoints import TRUST_REMOTE_CODE_HELP, add_precision_arguments
from lmlab.decode.commands import add_generate_arguments, run_generate
from lmlab.distill import add_distill_arguments, run_distill
from lmlab.fill import add_fill_arguments, run_fill
from lmlab.finetune import add_finetune_arguments, run_finetune
from lmlab.study import add_eval_generation_arguments
from lmlab.train import CHANGEABLE_ON_RESUME, TrainConfig


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def key_values(pairs: list[str] | None) -> dict:
    """``["n_layer=4", "positions=rotary"]`` -> ``{"n_layer": 4, "positions": "rotary"}`` (JSON values, else strings)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SystemExit(f"error: a setting must be key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.replace("-", "_")] = _parse_value(value)
    return out


# ------------------------------------------------------------------ prepare


def tokenizer_from_args(args, text: str):
    """The tokenizer the options ask for, built from the training ``text`` (or read from --vocab)."""
    from lmlab.tokenizers import WordTokenizer, build_tokenizer

    word_only = [flag for flag, value in (("--vocab", args.vocab), ("--min-count", args.min_count),
                                          ("--max-vocab", args.max_vocab)) if value is not None]
    if word_only and args.tokenizer != "word":
        raise ValueError(f"{word_only[0]} is an option of --tokenizer word, not of --tokenizer {args.tokenizer}")
    if args.vocab is not None:
        if len(word_only) > 1:
            raise ValueError(f"--vocab gives the whole vocabulary; {word_only[1]} does not combine with it")
        return WordTokenizer.from_vocab_file(args.vocab)
    if args.tokenizer == "word":
        return build_tokenizer("word", text, min_count=1 if args.min_count is None else args.min_count,
                               max_size=args.max_vocab)
    return build_tokenizer(args.tokenizer, text, **({"vocab_size": args.vocab_size} if args.tokenizer == "bpe" else {}))


def _val_fraction(args) -> float:
    """--val-fraction, checked against --valid: the held-out share of the training file (0: none)."""
    if args.valid is not None:
        if args.val_fraction not in (None, 0):
            raise ValueError(f"--val-fraction {args.val_fraction} cuts validation from the training file; "
                             f"--valid {args.valid} gives it already (drop one)")
        return 0.0
    if args.val_fraction is None:
        return 0.1
    if not 0.0 <= args.val_fraction < 1.0:
        raise ValueError(f"--val-fraction {args.val_fraction} must be in [0, 1) (0: train on all of the file)")
    return args.val_fraction


def _check_split_files(args) -> None:
    if args.corpus is None and (args.valid is not None or args.test is not None):
        flag = "--valid" if args.valid is not None else "--test"
        raise ValueError(f"{flag} needs the training file too: give --train FILE"
                         + (" (a --data directory holds its splits already)" if getattr(args, "data", None) else ""))


def stream_splits(args):
    """(tokenizer, train ids, val ids or None, test ids or None) of a stream from --train/--valid/--test."""
    _check_split_files(args)
    fraction = _val_fraction(args)
    text = data_mod.read_corpus(args.corpus)
    tokenizer = tokenizer_from_args(args, text)
    dtype = data_mod.ids_dtype(tokenizer.vocab_size)
    ids = np.asarray(tokenizer.encode(text), dtype=dtype)
    train, val = data_mod.split_by_position(ids, fraction) if fraction else (ids, None)
    if args.valid is not None:
        val = np.asarray(tokenizer.encode(data_mod.read_corpus(args.valid)), dtype=dtype)
    test = None if args.test is None else np.asarray(tokenizer.encode(data_mod.read_corpus(args.test)), dtype=dtype)
    return tokenizer, train, val, test


def cmd_prepare(args) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise SystemExit(f"error: {out} already exists; choose a new directory or pass --force to replace it")
    tokenizer, train, val, test = stream_splits(args)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / "tokenizer.json")
    meta = {"corpus": str(args.corpus or data_mod.bundled_corpus_path()), "tokenizer": args.tokenizer,
            "vocab_size": tokenizer.vocab_size}
    for name, ids in (("train", train), ("val", val), ("test", test)):
        if ids is not None:
            data_mod.save_ids(ids, out / f"{name}.bin", tokenizer.vocab_size)
            meta[f"{name}_tokens"] = len(ids)
    for name, path in (("valid", args.valid), ("test", args.test)):
        if path is not None:
            meta[f"{name}_file"] = str(path)
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))
    return 0


# ------------------------------------------------------------------ train


def _train_config(args) -> TrainConfig:
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return TrainConfig(**values)


def load_training_data(args, block_size: int):
    """(tokenizer, train batches, val batches or None, test texts or None) from --data
    (a prepared directory) or --train/--valid/--test (a validation split cut from
    the training file unless --valid is given or --val-fraction is 0)."""
    from lmlab.tokenizers import load_tokenizer

    batch_size = args.batch_size or TrainConfig.batch_size
    _check_split_files(args)
    if args.sequences:
        lines = data_mod.read_lines(args.corpus)
        tokenizer = tokenizer_from_args(args, "\n".join(lines))
        if args.valid is not None or args.val_fraction == 0:
            _val_fraction(args)
            train_lines, val_lines = lines, (None if args.valid is None else data_mod.read_lines(args.valid))
        elif args.val_fraction is not None:
            raise ValueError(f"--val-fraction {args.val_fraction}: with --sequences the held-out lines are makemore's "
                             "split (min(1000, 10%)); --val-fraction takes only 0 there (or give --valid FILE)")
        else:
            train_lines, val_lines = data_mod.makemore_split(lines, seed=args.split_seed)
        test = None if args.test is None else data_mod.read_lines(args.test)
        enc = lambda ls: [tokenizer.encode(s) for s in ls]  # noqa: E731
        make = lambda seqs: data_mod.SequenceBatches(seqs, batch_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)  # noqa: E731
        return tokenizer, make(enc(train_lines)), None if val_lines is None else make(enc(val_lines)), test
    if args.data:
        directory = Path(args.data)
        tokenizer = load_tokenizer(directory / "tokenizer.json")
        train_ids = data_mod.load_ids(directory / "train.bin", tokenizer.vocab_size)
        val_path = directory / "val.bin"
        val_ids = data_mod.load_ids(val_path, tokenizer.vocab_size) if val_path.is_file() else None
        test = None
    else:
        tokenizer, train_ids, val_ids, _ = stream_splits(args)
        test = None if args.test is None else data_mod.read_corpus(args.test)
    stream = lambda ids: data_mod.StreamBatches(ids, block_size, batch_size)  # noqa: E731
    return tokenizer, stream(train_ids), None if val_ids is None else stream(val_ids), test


def score_test(args, model, tokenizer, test) -> dict:
    """The score of the --test split (lines with --sequences, else one stream), as a dict."""
    from lmlab.score import score_sequences, score_text

    model.eval()
    if args.sequences:
        return score_sequences(model, tokenizer, test).as_dict()
    return score_text(model, tokenizer, test).as_dict()


def build_from_args(args, vocab_size: int, block_size: int):
    from lmlab.models import build_model
    from lmlab.models.base import config_from_dict

    values = {"vocab_size": vocab_size, "block_size": block_size}
    for name in ("n_layer", "n_head", "n_embd", "dropout"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    values.update(key_values(args.set))
    return build_model(args.model, config_from_dict(args.model, values))


def estimate_ngram(args, tokenizer, train, out: Path) -> dict:
    """Counts-based n-gram models are estimated from the training split, not trained."""
    import time

    from lmlab.models import build_model, save_model
    from lmlab.models.base import staged_directory
    from lmlab.rundir import RunDirectoryError

    values = {"vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
              "unk_id": tokenizer.unk_id, **key_values(args.set)}
    model = build_model("ngram", values)
    t0 = time.perf_counter()
    if args.sequences:
        model.fit([np.asarray(s, dtype=np.int64) for s in train.sequences], add_bos_eos=True)
    else:
        model.fit(np.asarray(train.ids, dtype=np.int64), add_bos_eos=False)
    seconds = time.perf_counter() - t0
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"run directory {str(out)!r} already exists; choose a new directory")
    try:
        with staged_directory(out / "best") as tmp:  # complete or absent, even with another process on --out
            save_model(model, tmp)
            tokenizer.save(tmp / "tokenizer.json")
    except OSError as e:
        if isinstance(e, FileExistsError):
            raise
        raise RunDirectoryError(f"cannot write {e.filename or out / 'best'}: {e.strerror or e}; nothing was kept") from e
    return {"family": "ngram", "order": model.config.order, "method": model.config.method,
            "ngrams": model.config.sizes, "vocab_size": tokenizer.vocab_size, "seconds": seconds}, model


RUN_OPTIONS = ("func", "command_parser", "argv", "out", "resume", "nproc_per_node", "max_restarts")  # what a run's settings.json does not keep


class _Unset(list):
    """A default no parsed value is: a list, so that append actions copy it into a new one."""


def given_options(parser: argparse.ArgumentParser, argv: list[str], names) -> set[str]:
    """Which of the options ``names`` (dests) are written in ``argv``, whatever their values:
    ``argv`` is parsed again with every default replaced by a marker."""
    unset = _Unset()
    defaults = {name: parser.get_default(name) for name in names}
    parser.set_defaults(**{name: unset for name in names})
    try:
        parsed = vars(parser.parse_args(argv))
    finally:
        parser.set_defaults(**defaults)
    return {name for name in names if parsed.get(name, unset) is not unset}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def restore_train_settings(args) -> tuple[argparse.Namespace, Path | None]:
    """``lmlab train --resume``: the run's saved options (settings.json), with the options
    given again checked against them: equal, or one of CHANGEABLE_ON_RESUME, or an error
    naming both values. Returns (the options to use, the settings file or None when the run
    has none: then the command line is used as it is)."""
    from lmlab.rundir import SETTINGS_FILE

    path = Path(args.out) / SETTINGS_FILE
    if not path.is_file():
        return args, None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the run's settings {path}: {e}") from None
    current = {k: v for k, v in vars(args).items() if k not in RUN_OPTIONS}
    unknown = sorted(set(saved) - set(current))
    if unknown:
        raise ValueError(f"{path} records option(s) {', '.join(map(_flag, unknown))} that `lmlab train` does not have")
    parser = args.command_parser
    command = args.argv[args.argv.index("train") + 1:]
    given = given_options(parser, command, list(current))
    conflicts = []
    for name in sorted(given):
        recorded = saved.get(name, parser.get_default(name))
        if name not in CHANGEABLE_ON_RESUME and current[name] != recorded:
            conflicts.append(f"{_flag(name)} {current[name]!r} (the run has {recorded!r})")
    if conflicts:
        raise ValueError(
            f"cannot resume {args.out} with other settings: {'; '.join(conflicts)}, recorded in {path}; "
            f"only {', '.join(map(_flag, CHANGEABLE_ON_RESUME))} may change on resume"
        )
    restored = {**current, **saved, **{name: current[name] for name in given}}
    return argparse.Namespace(**{**vars(args), **restored}), path


LAUNCH_OPTIONS = ("--nproc-per-node", "--max-restarts")


def cmd_train(args) -> int:
    from lmlab import distributed
    from lmlab.train import resolve_device

    if args.nproc_per_node is not None:  # start torchrun's agent, which runs this command without these options
        command = distributed.without_options(args.argv, LAUNCH_OPTIONS)
        distributed.launch(args.nproc_per_node, ["lmlab", *command], max_restarts=args.max_restarts)
        return 0
    if distributed.restart_count() > 0:  # torchrun restarted the workers: continue from the last checkpoint
        args.resume = True
    distributed.setup(resolve_device(args.device or TrainConfig.device))
    try:
        return train_from_args(args)
    except distributed.RankFailedError as e:  # rank 0 stopped with its own message; the others say why they stop
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()


def train_from_args(args) -> int:
    from lmlab import distributed
    from lmlab.train import Trainer

    if args.resume:
        args, _ = restore_train_settings(args)
    if args.model == "ngram":
        if args.resume:
            raise ValueError("an n-gram model is estimated in one pass, so there is no run to resume; "
                             "estimate it into a new --out")
        if distributed.active():
            raise ValueError("an n-gram model is estimated in one pass by one process; run it without torchrun")
        tokenizer, train, _, test = load_training_data(args, 1)  # no windows: the whole split is counted
        summary, model = estimate_ngram(args, tokenizer, train, Path(args.out))
        if test is not None:
            summary["test"] = score_test(args, model, tokenizer, test)
        print(json.dumps(summary, indent=2))
        return 0
    config = _train_config(args)
    if args.model == "masked-transformer" and args.sequences:
        raise ValueError("a masked-transformer trains on windows of a token stream; --sequences is not supported for it")
    block = args.block_size or 256
    tokenizer, train, val, test = load_training_data(args, block)
    if args.sequences:
        block = max(train.block_size, val.block_size if val is not None else 0,
                    *(1 + len(tokenizer.encode(t)) for t in test or ()))
    size = len(train.ids) if hasattr(train, "ids") else len(train.sequences)
    distributed.check_same_on_every_rank(f"{tokenizer.to_json()}\n{block}\n{size}",
                                         "the vocabulary, block size or training-split size")
    torch.manual_seed(config.seed)  # the same seed gives the same initial weights (a resume loads its own)
    model = build_from_args(args, tokenizer.vocab_size, block)
    if distributed.is_main():
        print(f"{args.model}: {model.num_parameters():,} parameters, vocabulary {tokenizer.vocab_size}", file=sys.stderr)
    # recorded as used: an option left to its default (None) is saved with the value it took
    effective = {**dataclasses.asdict(model.config), **dataclasses.asdict(config)}
    settings = {k: effective[k] if v is None and k in effective else v
                for k, v in vars(args).items() if k not in RUN_OPTIONS}
    summary = Trainer(model, train, val, config, args.out, tokenizer=tokenizer, resume=args.resume,
                      settings=settings).fit()
    if not distributed.is_main():
        return 0
    if test is not None:
        from lmlab.checkpoints import load_checkpoint

        best, _ = load_checkpoint(args.out, "cpu")
        summary["test"] = score_test(args, best, tokenizer, test)
    print(json.dumps(summary, indent=2))
    return 0


# ------------------------------------------------------------------ score


def cmd_score(args) -> int:
    from lmlab.checkpoints import load_checkpoint
    from lmlab.score import score_sequences, score_text

    if args.per_text and not args.sequences:
        raise ValueError("--per-text averages the perplexities of the lines of --text; add --sequences")
    model, tokenizer = load_checkpoint(args.model, args.device, trust_remote_code=args.trust_remote_code,
                                       dtype=args.dtype, quantize=args.quantize,
                                       quantize_output=args.quantize_output)
    if args.sequences:
        result = score_sequences(model, tokenizer, data_mod.read_lines(args.text))
        if not args.per_text:
            result.mean_text_perplexity = None
    else:
        result = score_text(model, tokenizer, data_mod.read_corpus(args.text), args.window, args.stride,
                            carry_state=args.carry_state)
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.summary())
    return 0


# ------------------------------------------------------------------ quantize


def cmd_quantize(args) -> int:
    from lmlab.checkpoints import write_quantized

    out = write_quantized(args.model, args.out, bits=args.bits, group_size=args.group_size)
    print(out)
    return 0


# ------------------------------------------------------------------ interpolate

CACHE_PREFIX = "cache:"


def cache_from_spec(spec: str, vocab_size: int):
    """A cache model (``lmlab.models.cache``) from ``cache:order=N,decay=D,window=W`` (each optional)."""
    from lmlab.models import build_model

    values: dict = {}
    for item in filter(None, spec[len(CACHE_PREFIX):].split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in ("order", "decay", "window"):
            raise ValueError(f"{item!r} in {spec!r} is not a cache setting; accepted: order=N, decay=D, window=W")
        try:
            values[key] = float(value) if key == "decay" else int(value)
        except ValueError:
            raise ValueError(f"{key}={value!r} in {spec!r} is not a number") from None
    return build_model("cache", {"vocab_size": vocab_size, **values})


def cmd_interpolate(args) -> int:
    """Mix trained models (same tokenizer); fit the weights by EM on --valid; save the mixture."""
    import math

    from lmlab.checkpoints import load_checkpoint
    from lmlab.models.base import staged_directory
    from lmlab.models.interpolate import (InterpolatedLM, check_same_tokenizer, check_weights,
                                          component_target_logprobs, fit_weights, mixture_logprobs)

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{str(out)!r} already exists; choose a new directory")
    if args.weights is not None:
        check_weights(args.weights, len(args.models))
    checkpoints = [spec for spec in args.models if not spec.startswith(CACHE_PREFIX)]
    if not checkpoints:
        raise ValueError(f"--models {' '.join(args.models)} has no trained model; a cache needs one beside it "
                         "(e.g. --models runs/kn5 cache:order=1,decay=0.998)")
    loaded = {spec: load_checkpoint(spec, args.device) for spec in checkpoints}
    tokenizers = [tok for _, tok in loaded.values()]
    check_same_tokenizer(tokenizers, checkpoints)
    tokenizer = tokenizers[0]
    components = [loaded[spec][0] if spec in loaded else cache_from_spec(spec, tokenizer.vocab_size)
                  for spec in args.models]
    if args.sequences:
        lines = [tokenizer.encode(t) for t in data_mod.read_lines(args.valid)]
        logps = np.concatenate([component_target_logprobs(components, [tokenizer.bos_id, *s, tokenizer.eos_id])
                                for s in lines])
    else:
        logps = component_target_logprobs(components, tokenizer.encode(data_mod.read_corpus(args.valid)))
    if args.weights is not None:
        weights, history = np.asarray(args.weights, dtype=np.float64), []
    else:
        weights, history = fit_weights(logps)
    model = InterpolatedLM.from_models(components, weights.tolist())
    with staged_directory(out) as tmp:
        model.save_directory(tmp)
        tokenizer.save(tmp / "tokenizer.json")
    nll = [float(-logps[:, k].mean()) for k in range(len(components))]
    mixed = float(-mixture_logprobs(logps, weights).mean())
    report = {"out": str(out), "models": args.models, "weights": weights.tolist(), "valid_tokens": int(logps.shape[0]),
              "valid_nll_per_token": {"components": nll, "interpolated": mixed},
              "valid_perplexity": {"components": [math.exp(v) for v in nll], "interpolated": math.exp(mixed)},
              "em_iterations": max(len(history) - 1, 0)}
    print(json.dumps(report, indent=2))
    return 0


# ------------------------------------------------------------------ plot


def cmd_plot(args) -> int:
    from lmlab import plots

    if args.what == "positions":
        path = plots.plot_position_similarity(args.positions, args.dim, args.layout, args.out)
    elif args.what == "gradient-flow":
        curves = plots.gradient_flow(args.steps, args.hidden, seed=args.seed)
        path = plots.plot_gradient_flow(curves, args.out, title=f"gradient flow, width {args.hidden}, seed {args.seed}")
    else:
        if not args.model or args.text is None:
            raise ValueError("lmlab plot attention needs --model and --text")
        from lmlab.checkpoints import load_checkpoint

        model, tokenizer = load_checkpoint(args.model)
        tokens, weights = plots.attention_for_text(model, tokenizer, args.text, layer=args.layer)
        heads = weights if args.head is None else weights[args.head]
        title = f"layer {args.layer}" + ("" if args.head is None else f", head {args.head}")
        path = plots.plot_attention(tokens, heads, args.out, title=title)
    print(path)
    return 0


# ------------------------------------------------------------------ eval-generation


def cmd_eval_generation(args) -> int:
    from lmlab.study import run_eval_generation

    return run_eval_generation(args)


# ------------------------------------------------------------------ serve


def cmd_serve(args) -> int:
    from lmlab.serve.app import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
          max_tokens_limit=args.max_tokens_limit, device=args.device, dtype=args.dtype, quantize=args.quantize,
          quantize_output=args.quantize_output, decoding_threads=args.threads, convert_hf=not args.hf_as_is)
    return 0


# ------------------------------------------------------------------ demo


def cmd_demo(args) -> int:
    from lmlab.demo import run_demo

    run_demo(out=args.out, seconds=args.seconds, device=args.device, max_iters=args.max_iters)
    return 0


# ------------------------------------------------------------------ parser


def add_split_and_tokenizer_arguments(p: argparse.ArgumentParser) -> None:
    """The options shared by prepare and train: given splits and the tokenizer."""
    p.add_argument("--valid", help="UTF-8 validation text (default: the last --val-fraction of the training text)")
    p.add_argument("--test", help="UTF-8 test text: tokenized with the training vocabulary (train: scored at the end)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="share of the training text held out for validation (default 0.1; 0: train on all of it)")
    p.add_argument("--tokenizer", default="char", choices=["char", "word", "regex", "bpe"],
                   help="char; word (whitespace words, KenLM's convention); regex (words, punctuation and "
                        "spaces, lossless); bpe")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size")
    p.add_argument("--vocab", help="word: a vocabulary file, one word per line (line i = id i - 1)")
    p.add_argument("--min-count", type=int, help="word: keep words seen at least N times (others are <unk>)")
    p.add_argument("--max-vocab", type=int, help="word: at most N entries, <unk> <s> </s> included (most frequent words)")


TRAIN_OPTION_HELP = {
    "batch_size": "rows per optimizer step (per micro-step with --grad-accum), the global batch: with N processes "
                  "each takes batch_size / N of them, so the run sees the same examples as one process",
    "fsdp": "under torchrun: shard a transformer's weights, gradients and optimizer state over the processes "
            "(FSDP2) instead of replicating them (DDP)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmlab", description="A laboratory for language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize a corpus into train/val(/test) id files")
    p.add_argument("--corpus", "--train", dest="corpus",
                   help="UTF-8 training text (default: the bundled tiny Shakespeare)")
    add_split_and_tokenizer_arguments(p)
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model; a run directory holds checkpoints, metrics and plots")
    p.add_argument("--model", default="transformer", help="model family")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="a directory written by `lmlab prepare`")
    src.add_argument("--corpus", "--train", dest="corpus",
                     help="UTF-8 training text (default: the bundled corpus)")
    p.add_argument("--sequences", action="store_true", help="one complete sequence per line (makemore split)")
    p.add_argument("--split-seed", type=int, default=3407)
    add_split_and_tokenizer_arguments(p)
    p.add_argument("--out", required=True, help="run directory (must not exist unless --resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out with its recorded settings; of those, only "
                        + ", ".join(map(_flag, CHANGEABLE_ON_RESUME)) + " may change")
    p.add_argument("--block-size", type=int)
    p.add_argument("--n-layer", type=int)
    p.add_argument("--n-head", type=int)
    p.add_argument("--n-embd", type=int)
    p.add_argument("--dropout", type=float)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any model config field, e.g. --set positions=sinusoidal")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=TRAIN_OPTION_HELP.get(f.name))
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], None)
            if f.name == "time_budget":
                kind = float
            p.add_argument(flag, type=kind or str, default=None,
                           help=TRAIN_OPTION_HELP.get(f.name))
    p.add_argument("--nproc-per-node", type=int,
                   help="train in N processes on this machine: starts torchrun's agent (torch.distributed.run), "
                        "which runs this command in each; the same as `torchrun --standalone --nproc-per-node N "
                        "-m lmlab train ...`")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="with --nproc-per-node: restart the processes this many times after a failure; a restart "
                        "resumes from the run's last checkpoint")
    p.set_defaults(func=cmd_train, command_parser=p)  # the parser: --resume tells the options given from the defaults

    p = sub.add_parser("score", help="NLL, perplexity and bits per character of a text")
    p.add_argument("--model", required=True, help="checkpoint or run directory, or hf:<dir>")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--sequences", action="store_true", help="score each line as a complete sequence (with <eos>)")
    p.add_argument("--per-text", action="store_true",
                   help="with --sequences: also the mean of the lines' own perplexities (Hugging Face evaluate's figure)")
    p.add_argument("--window", type=int, help="tokens per forward pass (default: the model's context, or 1024)")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: --window; smaller slides)")
    p.add_argument("--carry-state", action="store_true",
                   help="read --text as one stream with the model's state carried, every token conditioned on all "
                        "before it (recurrent nets, n-grams, caches and their mixtures: models without a context limit)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print every figure as JSON, named by its unit")
    add_precision_arguments(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("quantize", help="write a weight-only int8/int4 copy of a checkpoint")
    p.add_argument("--model", required=True, help="lmlab checkpoint or run directory, or gguf:FILE")
    p.add_argument("--out", required=True, help="new directory for the quantized checkpoint")
    p.add_argument("--bits", type=int, choices=[8, 4], required=True)
    p.add_argument("--group-size", type=int, help="inputs per scale (default: a whole row for 8 bits, 32 for 4)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("interpolate", help="mix trained models that share a tokenizer; weights fitted by EM on held-out text")
    p.add_argument("--models", nargs="+", required=True, metavar="DIR",
                   help="two or more checkpoints or run directories; 'cache:order=1,decay=0.998,window=2000' adds "
                        "a cache of the text being read (see docs/models.md)")
    p.add_argument("--valid", required=True, help="held-out UTF-8 text the weights are fitted on")
    p.add_argument("--sequences", action="store_true", help="each line of --valid is a complete sequence (with <eos>)")
    p.add_argument("--weights", type=float, nargs="+", help="use these weights instead of fitting them")
    p.add_argument("--out", required=True, help="directory for the interpolated model (must not exist)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser("generate", help="continue prompts with any decoding setup; compare setups; predict/complete tasks")
    add_generate_arguments(p)
    p.set_defaults(func=run_generate)

    p = sub.add_parser("plot", help="pictures: positional-encoding similarity, attention weights, gradient flow")
    p.add_argument("what", choices=["positions", "attention", "gradient-flow"])
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--positions", type=int, default=128, help="positions: how many")
    p.add_argument("--dim", type=int, default=128, help="positions: encoding width")
    p.add_argument("--layout", default="interleaved", choices=["interleaved", "concat"])
    p.add_argument("--model", help="attention: checkpoint or run directory")
    p.add_argument("--text", help="attention: the text to look at")
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--head", type=int, help="attention: one head (default: all heads in a grid)")
    p.add_argument("--steps", type=int, default=50, help="gradient-flow: sequence length")
    p.add_argument("--hidden", type=int, default=32, help="gradient-flow: width of the tanh RNN and the LSTM")
    p.add_argument("--seed", type=int, default=0, help="gradient-flow: weights and input")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("eval-generation", help="compare decoding setups: oracle perplexity, fluency, diversity")
    add_eval_generation_arguments(p)
    p.set_defaults(func=cmd_eval_generation)

    p = sub.add_parser("distill", help="distillation: teacher data, SFT on it, token-level KD")
    add_distill_arguments(p)
    p.set_defaults(func=run_distill)

    p = sub.add_parser("finetune", help="LoRA or full fine-tuning: continued LM training, text classification")
    add_finetune_arguments(p)
    p.set_defaults(func=run_finetune)

    p = sub.add_parser("fill", help="fill masked tokens in a text with a masked LM (lmlab masked-transformer or hf:DIR)")
    add_fill_arguments(p)
    p.set_defaults(func=run_fill)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching, and a playground")
    p.add_argument("--model", required=True, help="checkpoint or run directory, or hf:DIR")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ routes")
    p.add_argument("--max-batch", type=int, default=16, help="most rows decoded together")
    p.add_argument("--max-tokens-limit", type=int,
                   help="most new tokens per request (n x max_tokens; default: the model's context)")
    p.add_argument("--device", default="cpu")
    add_precision_arguments(p)
    p.add_argument("--threads", type=int,
                   help="torch threads of the decoding process (default: every core but one; the HTTP process "
                        "keeps one for its own work)")
    p.add_argument("--hf-as-is", action="store_true",
                   help="serve an hf:DIR model through transformers, one request at a time (default: a GPT-2 or "
                        "Llama model is converted to lmlab's transformer, the same logits up to float rounding, "
                        "and gets continuous batching)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="train a char transformer on the bundled corpus, report, generate")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seconds", type=float, default=240.0, help="training time budget")
    p.add_argument("--max-iters", type=int, default=2000)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError) as e:  # OSError: FileNotFoundError, a full or read-only disk, ...
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
