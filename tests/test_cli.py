import json

import pytest

from lmlab.cli import main
from lmlab.throughput import TIMED_FIELDS

TEXT = "to be or not to be, that is the question.\n" * 60
TRAIN = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--max-iters", "12",
         "--eval-interval", "6", "--eval-iters", "2", "--batch-size", "4", "--no-progress", "--device", "cpu"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def test_prepare_train_score_generate(tmp_path, corpus, capsys):
    data = tmp_path / "data"
    assert main(["prepare", "--corpus", str(corpus), "--out", str(data)]) == 0
    meta = json.loads((data / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] == len(TEXT)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(run), *TRAIN]) == 0
    capsys.readouterr()
    assert main(["score", "--model", str(run), "--text", str(corpus), "--window", "16", "--stride", "8", "--json"]) == 0
    score = json.loads(capsys.readouterr().out)
    assert score["tokens"] == len(TEXT) - 1 and score["perplexity"] > 1
    assert main(["generate", "--model", str(run), "--prompt", "to be", "--max-new-tokens", "20", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "to be" in out and "sample 0" in out
    # resume continues the same run directory
    more = [a if a != "12" else "18" for a in TRAIN]
    assert main(["train", "--data", str(data), "--out", str(run), "--resume", *more]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 18


def test_train_on_sequences(tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(["emma", "olivia", "ava", "isabella", "sophia", "mia", "amelia"] * 20))
    assert main(["train", "--corpus", str(names), "--sequences", "--out", str(tmp_path / "run"), *TRAIN]) == 0
    capsys.readouterr()
    assert main(["score", "--model", str(tmp_path / "run"), "--text", str(names), "--sequences", "--json"]) == 0
    score = json.loads(capsys.readouterr().out)
    assert score["tokens"] == sum(len(n) + 1 for n in names.read_text().split())


def test_errors_are_clear_and_lose_nothing(tmp_path, corpus, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["train", "--corpus", str(empty), "--out", str(tmp_path / "r1"), *TRAIN]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["train", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r2"), *TRAIN]) == 2
    assert "does not exist" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("precious")
    assert main(["train", "--corpus", str(corpus), "--out", str(run), *TRAIN]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run / "keep.txt").read_text() == "precious"
    assert main(["score", "--model", str(tmp_path), "--text", str(corpus)]) == 2
    assert "no lmlab model" in capsys.readouterr().err


def test_checkpoint_with_a_mismatched_tokenizer_is_refused(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", "--corpus", str(corpus), "--out", str(run), *TRAIN]) == 0
    from lmlab.tokenizers import CharTokenizer

    CharTokenizer.train("abc").save(run / "best" / "tokenizer.json")
    capsys.readouterr()
    assert main(["score", "--model", str(run), "--text", str(corpus)]) == 2
    assert "do not belong together" in capsys.readouterr().err


def test_block_size_beyond_positions_is_refused(tmp_path, corpus, capsys):
    run = tmp_path / "run"
    assert main(["train", "--corpus", str(corpus), "--out", str(run), *TRAIN]) == 0
    capsys.readouterr()
    assert main(["score", "--model", str(run), "--text", str(corpus), "--window", "32"]) == 2
    assert "window=32 is larger than the model's context of 16" in capsys.readouterr().err


def test_plot_commands(tmp_path, corpus):
    assert main(["plot", "positions", "--out", str(tmp_path / "pos.png"), "--positions", "16", "--dim", "8"]) == 0
    assert (tmp_path / "pos.png").stat().st_size > 1000
    run = tmp_path / "run"
    assert main(["train", "--corpus", str(corpus), "--out", str(run), *TRAIN]) == 0
    assert main(["plot", "attention", "--model", str(run), "--text", "to be or", "--layer", "0",
                 "--out", str(tmp_path / "att.png")]) == 0
    assert (tmp_path / "att.png").stat().st_size > 1000


def test_ngram_is_estimated_by_train_and_scored(tmp_path, corpus, capsys):
    run = tmp_path / "kn"
    assert main(["train", "--model", "ngram", "--set", "order=4", "--corpus", str(corpus), "--out", str(run)]) == 0
    assert json.loads(capsys.readouterr().out)["order"] == 4
    assert main(["score", "--model", str(run), "--text", str(corpus), "--window", "64", "--stride", "60", "--json"]) == 0
    score = json.loads(capsys.readouterr().out)
    assert score["tokens"] == len(TEXT) - 1 and 1 < score["perplexity"] < 3  # the text repeats: KN learns it
    assert main(["generate", "--model", str(run), "--prompt", "to be", "--max-new-tokens", "10", "--seed", "1"]) == 0


def _records(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMED_FIELDS} for line in lines]


def test_resume_restores_the_run_settings_from_the_out_directory_alone(tmp_path, corpus, capsys, monkeypatch):
    import torch

    from lmlab.data import StreamBatches
    from lmlab.models.base import load_model

    options = ["--corpus", str(corpus), *TRAIN, "--log-interval", "2", "--lr-decay-iters", "12", "--lr", "0.003",
               "--set", "positions=sinusoidal"]
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(["train", "--out", str(reference), *options]) == 0
    real_sample, steps = StreamBatches.sample, []

    def dies_at_step_9(self, generator, device):
        if generator.initial_seed() == 1337:  # the training stream (evaluations use their own seed)
            steps.append(len(steps))
            if steps[-1] == 9:
                raise KeyboardInterrupt
        return real_sample(self, generator, device)

    monkeypatch.setattr(StreamBatches, "sample", dies_at_step_9)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "--out", str(run), *options])
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume"]) == 0  # the README's command, nothing else
    assert json.loads(capsys.readouterr().out)["steps"] == 12
    assert _records(run) == _records(reference)
    done, expected = load_model(run / "last"), load_model(reference / "last")
    assert done.config.positions == "sinusoidal"
    for name, tensor in expected.state_dict().items():
        assert torch.equal(tensor, done.state_dict()[name]), name
    # options given again: equal ones and the changeable ones are accepted ...
    assert main(["train", "--out", str(run), "--resume", "--n-layer", "1", "--lr", "0.003", "--max-iters", "14"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 14
    assert json.loads((run / "settings.json").read_text())["max_iters"] == 14  # the next resume goes on to 14
    # ... any other difference is an error naming both values
    other = tmp_path / "other.txt"
    other.write_text(TEXT)
    assert main(["train", "--out", str(run), "--resume", "--lr", "0.01", "--corpus", str(other), "--tokenizer", "char",
                 "--warmup-iters", "100"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: cannot resume")
    assert f"--corpus {str(other)!r} (the run has {str(corpus)!r})" in err and "--lr 0.01 (the run has 0.003)" in err
    assert "--tokenizer" not in err and "--warmup-iters" not in err  # equal to the recorded (default) values
    assert "only --max-iters" in err
    settings = json.loads((run / "settings.json").read_text())
    (run / "settings.json").write_text(json.dumps({**settings, "bogus": 1}))
    assert main(["train", "--out", str(run), "--resume"]) == 2
    assert "records option(s) --bogus" in capsys.readouterr().err


def test_an_ngram_estimate_is_written_whole_or_not_at_all(tmp_path, corpus, capsys, monkeypatch):
    import errno

    from lmlab.tokenizers import Tokenizer

    run = tmp_path / "kn"
    args = ["train", "--model", "ngram", "--set", "order=3", "--corpus", str(corpus), "--out", str(run)]

    def full_disk(self, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Tokenizer, "save", full_disk)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: cannot write {run / 'best'}: No space left on device; nothing was kept"
    assert not (run / "best").exists() and list(run.iterdir()) == []  # no half-written checkpoint to load
    monkeypatch.undo()
    assert main(args) == 0
    assert main([*args, "--resume"]) == 2
    assert "no run to resume" in capsys.readouterr().err
