"""Distillation: masked SFT, teacher data and filters, token-level KL, the trainer and the CLI."""

import argparse

import pytest
import torch
import torch.nn.functional as F

from lmlab.data import IGNORE, StreamBatches
from lmlab.distill import (
    ChatPrompt,
    DistillTrainer,
    Example,
    SFTBatches,
    TextPrompt,
    add_distill_arguments,
    check_same_tokenizer,
    filter_examples,
    generate_teacher_data,
    kd_loss,
    kl_divergence,
    load_examples,
    run_distill,
    save_examples,
    sft_batch,
    sft_pairs,
)
from lmlab.models import build_model, save_model
from lmlab.tokenizers import CharTokenizer
from lmlab.train import TrainConfig, lm_loss

TEXT = "the cat sat on the mat. a dog ran in the park. the sun is hot today. fish swim in the sea.\n" * 20


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.train(TEXT + ":;TLDR")


def tiny(tok, n_embd=16, n_layer=1, seed=0):
    torch.manual_seed(seed)
    return build_model("transformer", dict(vocab_size=tok.vocab_size, block_size=64, n_layer=n_layer, n_head=2, n_embd=n_embd))


# ---------------------------------------------------------------- supervised fine-tuning


def test_sft_batch_targets_only_the_output_and_eos():
    x, y = sft_batch([([5, 6, 7], [8, 9]), ([5], [10])], pad_id=0, eos_id=2, bos_id=1)
    # s = 1 5 6 7 8 9 2 -> x = s[:-1]; targets of prompt tokens (5 6 7) are IGNORE
    assert x.tolist() == [[1, 5, 6, 7, 8, 9], [1, 5, 10, 0, 0, 0]]
    assert y.tolist() == [[IGNORE, IGNORE, IGNORE, 8, 9, 2], [IGNORE, 10, 2, IGNORE, IGNORE, IGNORE]]
    x, y = sft_batch([([5, 6], [8])], pad_id=0, eos_id=None)
    assert x.tolist() == [[5, 6]] and y.tolist() == [[IGNORE, 8]]


def test_masked_prompt_tokens_contribute_exactly_zero_loss_and_gradient(tok):
    model = tiny(tok)
    prompt = TextPrompt("{input}\nTL;DR:", " {output}")
    pairs = sft_pairs(tok, prompt, [("the cat sat on the mat.", "cat"), ("a dog ran in the park.", "dog ran")])
    x, y = SFTBatches(pairs, 2, tok.pad_id, tok.eos_id).windows().__next__()
    logits, _ = model(x)
    logits.retain_grad()
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE, reduction="none")
    masked = (y == IGNORE).reshape(-1)
    assert masked.sum() > 0 and torch.equal(per_token[masked], torch.zeros(int(masked.sum())))
    loss = lm_loss(model, x, y)
    assert loss.item() == pytest.approx(per_token[~masked].mean().item(), rel=1e-6)
    logits, _ = model(x)
    logits.retain_grad()
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE).backward()
    grad = logits.grad.reshape(-1, logits.shape[-1])
    assert torch.equal(grad[masked], torch.zeros_like(grad[masked]))
    assert grad[~masked].abs().sum() > 0
    # the outputs learned are exactly " cat<eos>" and " dog ran<eos>"
    learned = [[t for t in row if t != IGNORE] for row in y.tolist()]
    assert learned == [tok.encode(" cat") + [tok.eos_id], tok.encode(" dog ran") + [tok.eos_id]]


def test_text_prompt_cuts_long_inputs_and_keeps_the_marker(tok):
    p = TextPrompt("{input}\nTL;DR:")
    ids = p.prompt_ids(tok, "the cat sat on the mat " * 10, max_tokens=30)
    assert len(ids) == 30 and tok.decode(ids).endswith("\nTL;DR:")
    pairs = sft_pairs(tok, p, [("the cat sat on the mat " * 10, "a cat")], max_len=40)
    assert len(pairs[0][0]) + len(pairs[0][1]) + 1 == 40
    with pytest.raises(ValueError, match="exactly once"):
        TextPrompt("no input here")


# ---------------------------------------------------------------- teacher data and filters


def test_generate_teacher_data_and_filters(tok, tmp_path):
    teacher = tiny(tok, seed=1).eval()
    inputs = ["the cat sat", "a dog ran in the park", "fish"]
    prompt = TextPrompt("{input}\nTL;DR:", stop=None)
    ex = generate_teacher_data(teacher, tok, inputs, prompt, "greedy", max_new_tokens=6, batch_size=2, progress=False)
    assert [e.input for e in ex] == inputs and all(e.tokens <= 6 for e in ex)
    for e in ex:  # same as decoding each prompt alone
        from lmlab.decode import run_setup

        alone = run_setup(teacher, tok, [prompt.prompt_ids(tok, e.input)], "greedy", 6)[0][0]
        assert e.raw == alone.text and e.logprob == pytest.approx(sum(alone.logprobs) / len(alone.logprobs))
    examples = [
        Example("a", "one two three", logprob=-1.0),
        Example("b", "One  two three", logprob=-0.5),   # duplicate up to case/spacing
        Example("c", "", logprob=-0.1),
        Example("d", "x", logprob=-0.2),
        Example("e", "a b c d e f g", logprob=-0.3),
        Example("f", "no marker here", logprob=-0.3, marker_found=False),
        Example("g", "low confidence words", logprob=-5.0),
        Example("h", "scored low", logprob=-0.3),
    ]
    kept, counts = filter_examples(examples, min_words=2, max_words=5, require_marker=True, min_logprob=-2.0,
                                   score=lambda e: 0.0 if e.input == "h" else 1.0, min_score=0.5)
    assert [e.input for e in kept] == ["a"]
    assert counts == {"empty": 1, "no_marker": 1, "too_short": 1, "too_long": 1, "low_logprob": 1, "low_score": 1,
                      "duplicate": 1, "kept": 1}
    save_examples(tmp_path / "ex.jsonl", kept)
    assert load_examples(tmp_path / "ex.jsonl") == kept


class FakeChatTokenizer:
    """Just enough of a Hugging Face tokenizer for chat_ids."""

    chat_template = "fake"

    def __init__(self, char_tok):
        self.t = char_tok
        self.hf = self

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "".join(f"[{m['role']}]{m['content']}" for m in messages) + ("[assistant]" if add_generation_prompt else "")

    def encode(self, text, add_special_tokens=False):
        return self.t.encode(text.replace("[", "").replace("]", ":"))


def test_chat_prompt_messages_and_extraction(tok):
    p = ChatPrompt()
    assert p.messages("Some article.") == [
        {"role": "system", "content": "You are a helpful assistant and an expert at summarizing articles."},
        {"role": "user", "content": "Summarize the following article. Some article. Start your summary with 'TL;DR:'"},
    ]
    assert p.extract("Sure! TL;DR: the cat sat.") == "the cat sat."
    assert p.extract("no marker") is None
    assert ChatPrompt(marker=None).extract("  all of it ") == "all of it"
    assert ChatPrompt(system=None).messages("x")[0]["role"] == "user"
    fake = FakeChatTokenizer(tok)
    plain = ChatPrompt("the", "sea", None)
    assert tok.decode(plain.prompt_ids(fake, "cat")) == "user:the cat seaassistant:"


# ---------------------------------------------------------------- token-level


def test_kd_with_the_teacher_as_student_gives_zero_kl(tok):
    model = tiny(tok)
    x = torch.randint(0, tok.vocab_size, (3, 12))
    y = torch.randint(0, tok.vocab_size, (3, 12))
    y[:, :4] = IGNORE
    logits, _ = model(x)
    for div in ("forward", "reverse"):
        for T in (0.5, 1.0, 3.0):
            assert kd_loss(logits, logits.detach(), y, div, T).item() == pytest.approx(0.0, abs=1e-6)
    other = logits + torch.randn_like(logits)
    assert kl_divergence(logits, other, None, "forward", 2.0) > 0 and kl_divergence(logits, other, None, "reverse") > 0
    # nll_weight=1 is the plain data loss; the KL only counts unmasked positions
    assert kd_loss(logits, other, y, nll_weight=1.0).item() == pytest.approx(
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE).item(), rel=1e-6)
    changed = other.clone()
    changed[:, :4] += 10 * torch.randn_like(changed[:, :4])
    assert kd_loss(logits, changed, y).item() == pytest.approx(kd_loss(logits, other, y).item(), rel=1e-6)
    # forward KL by hand at T = 2, scaled by T^2
    p, q = torch.softmax(other / 2, -1), torch.log_softmax(logits / 2, -1)
    by_hand = (p * (p.log() - q)).sum(-1)[y != IGNORE].mean() * 4
    assert kd_loss(logits, other, y, "forward", 2.0).item() == pytest.approx(by_hand.item(), rel=1e-5)
    with pytest.raises(ValueError, match="accepted: forward, reverse"):
        kd_loss(logits, other, y, "jsd")


def test_different_tokenizers_are_refused_for_token_level_kd(tok, tmp_path):
    other = CharTokenizer.train("abcdefghijklmnopqrstuvwxyz .")
    with pytest.raises(ValueError, match="share a tokenizer.*sequence-level"):
        check_same_tokenizer(tok, other)
    check_same_tokenizer(tok, CharTokenizer.train(TEXT + ":;TLDR"))
    with pytest.raises(ValueError, match="same size but map tokens to different ids"):
        check_same_tokenizer(CharTokenizer.train("abc"), CharTokenizer.train("abd"))
    ids = torch.tensor(tok.encode(TEXT), dtype=torch.long)
    batches = StreamBatches(ids.numpy(), 16, 4)
    with pytest.raises(ValueError, match="share a tokenizer"):
        DistillTrainer(tiny(tok), tiny(tok), batches, None, TrainConfig(max_iters=1, progress=False), tmp_path / "r",
                       tokenizer=other, teacher_tokenizer=tok)


def test_distill_trainer_trains_on_kl_and_evaluates_nll(tok, tmp_path):
    ids = torch.tensor(tok.encode(TEXT), dtype=torch.long).numpy()
    train, val = StreamBatches(ids[:1500], 16, 4), StreamBatches(ids[1500:], 16, 4)
    teacher = tiny(tok, n_embd=32, seed=3)
    config = TrainConfig(max_iters=4, batch_size=4, eval_interval=2, eval_iters=2, warmup_iters=1, progress=False)
    seen = []
    trainer = DistillTrainer(tiny(tok), teacher, train, val, config, tmp_path / "kd", tokenizer=tok,
                             teacher_tokenizer=tok, divergence="reverse", temperature=2.0, nll_weight=0.25)
    original = trainer.train_loss
    trainer.train_loss = lambda x, y: seen.append(1) or original(x, y)
    summary = trainer.fit()
    assert len(seen) == 4 and summary["divergence"] == "reverse" and summary["steps"] == 4
    assert trainer.loss_fn is lm_loss
    # the evaluation is the plain NLL of the student
    est = trainer.estimate_loss()
    assert est["val"] == pytest.approx(summary["val_loss"], rel=1e-6)
    assert all(p.grad is None for p in teacher.parameters())


# ---------------------------------------------------------------- command line


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_distill_arguments(parser)
    return parser.parse_args(argv)


def test_cli_generate_sft_kd(tok, tmp_path):
    for name, n_embd in (("teacher", 32), ("student", 16)):
        save_model(tiny(tok, n_embd=n_embd), tmp_path / name)
        tok.save(tmp_path / name / "tokenizer.json")
    (tmp_path / "inputs.txt").write_text("the cat sat on the mat.\n\na dog ran in the park.\n\nthe sun is hot.\n")
    args = _parse(["generate", "--teacher", str(tmp_path / "teacher"), "--inputs", str(tmp_path / "inputs.txt"),
                   "--out", str(tmp_path / "ex.jsonl"), "--max-new-tokens", "5", "--no-dedupe", "--setup", "top-k 5"])
    assert run_distill(args) == 0
    examples = load_examples(tmp_path / "ex.jsonl")
    assert len(examples) == 3 and examples[1].input == "a dog ran in the park."
    common = ["--max-iters", "2", "--batch-size", "2", "--eval-interval", "1", "--eval-iters", "1", "--no-progress"]
    args = _parse(["sft", "--student", str(tmp_path / "student"), "--data", str(tmp_path / "ex.jsonl"),
                   "--out", str(tmp_path / "sft"), "--val-fraction", "0.34", *common])
    assert run_distill(args) == 0 and (tmp_path / "sft" / "best" / "config.json").is_file()
    (tmp_path / "corpus.txt").write_text(TEXT)
    args = _parse(["kd", "--teacher", str(tmp_path / "teacher"), "--new-student", "transformer", "--set", "n_layer=1",
                   "--set", "n_embd=8", "--set", "n_head=2", "--block-size", "16", "--corpus", str(tmp_path / "corpus.txt"),
                   "--out", str(tmp_path / "kd"), "--temperature", "2", "--nll-weight", "0.5", *common])
    assert run_distill(args) == 0 and (tmp_path / "kd" / "last" / "tokenizer.json").is_file()
    other = tmp_path / "other"
    save_model(build_model("transformer", dict(vocab_size=5, block_size=16, n_layer=1, n_head=1, n_embd=4)), other)
    CharTokenizer.train("a").save(other / "tokenizer.json")
    args = _parse(["kd", "--teacher", str(tmp_path / "teacher"), "--student", str(other), "--corpus",
                   str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "kd2"), *common])
    with pytest.raises(ValueError, match="share a tokenizer"):
        run_distill(args)
