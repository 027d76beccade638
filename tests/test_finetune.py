"""Fine-tuning: LoRA through PEFT (add, merge, save/load, wrong base), continued LM
training, sequence classification (lora / full / probe), the CLI.

Every model is tiny and random: lmlab transformers built from a config, Hugging Face
Llama / GPT-2 models built from a config and saved to tmp_path. Nothing is downloaded.
"""

import argparse
import json
import logging
import warnings

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from lmlab.checkpoints import load_checkpoint  # noqa: E402
from lmlab.finetune import (  # noqa: E402
    ClassificationData,
    ClassifyConfig,
    LoraSettings,
    add_finetune_arguments,
    add_lora,
    build_classifier,
    count_parameters,
    default_target_modules,
    load_adapter,
    load_classifier,
    merge_lora,
    pad_batch,
    predict,
    read_labelled,
    run_finetune,
    save_adapter,
    save_classifier,
    train_classifier,
    unmerge_lora,
)
from lmlab.hf import HFModel  # noqa: E402
from lmlab.models import build_model, load_model, save_model  # noqa: E402
from lmlab.tokenizers import BPETokenizer, CharTokenizer  # noqa: E402
from conftest import save_tiny_hf_bert  # noqa: E402

hf_logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

TEXT = "the cat sat on the mat. a dog ran in the park. the sun is hot today.\n" * 30


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer.train(TEXT)


def tiny(vocab, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, block_size=64, n_layer=2, n_head=2, n_embd=32)
    return build_model("transformer", {**cfg, **kw}).eval()


def _llama(vocab, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               tie_word_embeddings=False)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **kw})).eval()


def _gpt2(vocab, seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(TEXT + "aaaa bbbb", vocab_size=300)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, bpe):
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("llama")
    _llama(bpe.vocab_size).save_pretrained(str(d))
    PreTrainedTokenizerFast(tokenizer_object=bpe.backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(d))
    return d


def _ids(vocab, B=3, T=10, seed=1):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


def _lmlab_dir(path, model, tok):
    save_model(model, path)
    tok.save(path / "tokenizer.json")
    return path


def _step(model, ids, lr=1e-2):
    """One AdamW step on the mean logit (any loss moves every trainable weight)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    model(ids)[0].pow(2).mean().backward()
    opt.step()
    model.eval()


# ---------------------------------------------------------------- settings and targets


def test_settings_are_validated_with_clear_errors():
    for kwargs, match in [(dict(r=0), "rank r=0"), (dict(r=2.5), "rank r=2.5"), (dict(alpha=0), "alpha=0"),
                          (dict(dropout=1.0), r"dropout=1.0 must be a number in \[0, 1\)"),
                          (dict(bias="some"), "bias='some'.*'none', 'all', 'lora_only'"),
                          (dict(target_modules=[]), "non-empty list")]:
        with pytest.raises(ValueError, match=match):
            LoraSettings(**kwargs)
    assert LoraSettings(target_modules="q").target_modules == ["q"]


def test_default_targets_per_model_kind(tok, bpe):
    assert default_target_modules(tiny(tok.vocab_size)) == ["q", "k", "v", "o"]
    assert default_target_modules(_llama(bpe.vocab_size)) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert default_target_modules(_gpt2(bpe.vocab_size)) == ["c_attn", "c_proj"]
    with pytest.raises(ValueError, match="no default LoRA target modules for lmlab family 'mlp'.*embedding, hidden.0"):
        default_target_modules(build_model("mlp", dict(vocab_size=tok.vocab_size)))
    lora = add_lora(_llama(bpe.vocab_size), LoraSettings())
    names = [n for n, _ in lora.named_parameters() if "lora_A" in n]
    assert len(names) == 2 * 4 and {n.split(".")[-4] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_unknown_target_lists_the_layers_that_exist(tok):
    with pytest.raises(ValueError, match="'query' names no layer.*fc, k, lm_head, o, proj, q, v, wpe, wte"):
        add_lora(tiny(tok.vocab_size), LoraSettings(target_modules=["q", "query"]))
    with pytest.raises(ValueError, match="'lm_head' shares its weight with 'wte'"):
        add_lora(tiny(tok.vocab_size), LoraSettings(target_modules=["lm_head"]))
    model = add_lora(tiny(tok.vocab_size), LoraSettings(target_modules=["attn.q", "mlp.fc"]))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {f"base_model.model.blocks.{i}.{m}" for i in range(2) for m in ("attn.q", "mlp.fc")}


def test_unsupported_model_for_classification(tok):
    with pytest.raises(ValueError, match="does not expose.*lmlab 'transformer' checkpoints.*Hugging Face causal LMs and BERT-like masked LMs"):
        build_classifier(build_model("mlp", dict(vocab_size=tok.vocab_size)), ["a", "b"], "probe")


def test_recurrent_nets_classify_from_their_top_layer(tok):
    """A recurrent net's features are the vectors its output layer reads (n_hidden wide, not n_embd)."""
    torch.manual_seed(0)
    gru = build_model("gru", dict(vocab_size=tok.vocab_size, n_embd=8, n_hidden=12)).eval()
    clf = build_classifier(gru, ["a", "b"], "probe")
    assert clf.head.in_features == 12
    ids = torch.tensor([tok.encode("the cat")])
    with torch.no_grad():
        feats = clf.features(ids, torch.ones_like(ids, dtype=torch.bool))
        torch.testing.assert_close(feats[0], gru.hidden_states(ids)[0][0, -1])


# ---------------------------------------------------------------- LoRA: train, merge, save, load


def test_lora_starts_as_the_base_and_trains_only_the_adapters(tok):
    model = tiny(tok.vocab_size)
    ids = _ids(tok.vocab_size)
    ref = _logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = add_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0))
    assert torch.equal(_logits(lora, ids), ref)  # B = 0: exactly the base function
    b_weights = [p for n, p in lora.named_parameters() if "lora_B" in n]
    assert b_weights and all(torch.count_nonzero(p) == 0 for p in b_weights)
    trainable, total = count_parameters(lora)
    assert trainable == 2 * 4 * (4 * 32 + 4 * 32)  # layers x targets x (A: r*in + B: out*r)
    assert total == trainable + model.num_parameters() - trainable
    adapters = {n: p.clone() for n, p in lora.named_parameters() if "lora_" in n}
    _step(lora, ids)
    for name, p in lora.get_base_model().state_dict().items():
        if "lora_" not in name:
            assert torch.equal(p, before[name.replace(".base_layer", "")]), name  # base bit-identical
    changed = [n for n, p in lora.named_parameters() if "lora_" in n and not torch.equal(p, adapters[n])]
    assert len(changed) == len(adapters)
    assert not torch.allclose(_logits(lora, ids), ref)


def test_merged_equals_unmerged_and_saves_as_a_plain_checkpoint(tok, tmp_path):
    lora = add_lora(tiny(tok.vocab_size), LoraSettings(r=4, dropout=0.0))
    ids = _ids(tok.vocab_size)
    _step(lora, ids)
    adapted = _logits(lora, ids)
    merge_lora(lora, unload=False)
    torch.testing.assert_close(_logits(lora, ids), adapted, atol=1e-5, rtol=0)
    unmerge_lora(lora)
    torch.testing.assert_close(_logits(lora, ids), adapted, atol=1e-5, rtol=0)
    merged = merge_lora(lora)
    assert type(merged).__name__ == "Transformer" and not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(_logits(merged, ids), adapted, atol=1e-5, rtol=0)
    save_model(merged, tmp_path / "merged")
    reloaded = load_model(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(reloaded, ids), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["lmlab", "llama", "gpt2"])
def test_adapter_round_trip_gives_identical_outputs(kind, tok, bpe, tmp_path):
    make = {"lmlab": lambda: tiny(tok.vocab_size), "llama": lambda: HFModel(_llama(bpe.vocab_size)),
            "gpt2": lambda: HFModel(_gpt2(bpe.vocab_size))}[kind]
    vocab = tok.vocab_size if kind == "lmlab" else bpe.vocab_size
    ids = _ids(vocab)
    lora = add_lora(make(), LoraSettings(r=4, dropout=0.0))
    _step(lora, ids)
    adapted = _logits(lora, ids)
    save_adapter(lora, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "lmlab_base.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_adapter(make(), tmp_path / "adapter")
    assert not [w for w in caught if "different weights" in str(w.message)]  # the same base: no warning
    assert torch.equal(_logits(loaded, ids), adapted)
    merged = merge_lora(loaded)
    torch.testing.assert_close(_logits(merged, ids), adapted, atol=1e-5, rtol=0)
    if kind != "lmlab":  # a plain PEFT adapter of the Hugging Face model
        from peft import PeftModel

        raw = PeftModel.from_pretrained(make().hf, str(tmp_path / "adapter"))
        torch.testing.assert_close(raw(ids).logits, adapted, atol=1e-6, rtol=0)


def test_adapter_for_a_different_base_is_refused(tok, bpe, tmp_path):
    lora = add_lora(tiny(tok.vocab_size), LoraSettings(r=4))
    save_adapter(lora, tmp_path / "a")
    with pytest.raises(ValueError, match="different base model.*n_embd: adapter 32, model 48"):
        load_adapter(tiny(tok.vocab_size, n_embd=48), tmp_path / "a")
    with pytest.raises(ValueError, match="n_layer: adapter 2, model 3"):
        load_adapter(tiny(tok.vocab_size, n_layer=3), tmp_path / "a")
    with pytest.raises(ValueError, match="trained on an lmlab 'transformer' model, but the model given is a Hugging Face 'llama'"):
        load_adapter(HFModel(_llama(bpe.vocab_size)), tmp_path / "a")
    with pytest.warns(UserWarning, match="same shapes but different weights"):
        load_adapter(tiny(tok.vocab_size, seed=5), tmp_path / "a")
    with pytest.raises(FileExistsError, match="already exists"):
        save_adapter(lora, tmp_path / "a")
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        load_adapter(lora, tmp_path / "a")


def test_missing_or_malformed_adapter_directory(tok, tmp_path):
    base = tiny(tok.vocab_size)
    with pytest.raises(FileNotFoundError, match="no adapter directory at .*adapter_config.json"):
        load_adapter(base, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(base, tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_adapter(base, tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(ValueError, match="'IA3' adapter; accepted: 'LORA'"):
        load_adapter(base, tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (tmp_path / "empty" / "adapter_model.bin").write_bytes(b"\x80")
    with pytest.raises(ValueError, match="pickle"):
        load_adapter(base, tmp_path / "empty")
    with pytest.raises(ValueError, match="has no LoRA adapters to save"):
        save_adapter(base, tmp_path / "x")


# ---------------------------------------------------------------- labelled data


def test_read_labelled_csv_jsonl_splits_and_errors(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text('label,text,is_valid\npos,"good, very good",False\nneg,bad,False\npos,fine,True\nneg,"a\nb",True\n')
    d = read_labelled(csv_path)
    assert d.labels == ["neg", "pos"]
    assert d.train_texts == ["good, very good", "bad"] and d.train_labels == [1, 0]
    assert d.val_texts == ["fine", "a\nb"] and d.val_labels == [1, 0]
    rows = [{"text": f"text {i}", "label": "b" if i % 3 else "a"} for i in range(20)]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    d1, d2 = read_labelled(jsonl, 0.25, seed=1), read_labelled(jsonl, 0.25, seed=1)
    assert d1 == d2 and len(d1.val_texts) == 5 and len(d1.train_texts) == 15
    assert sorted(d1.train_texts + d1.val_texts) == sorted(r["text"] for r in rows)
    assert read_labelled(jsonl, 0.25, seed=2).val_texts != d1.val_texts
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nhello,pos\n")
    with pytest.raises(ValueError, match="no 'text' column.*found columns: \\['sentence', 'label'\\]"):
        read_labelled(bad)
    bad.write_text("text,label\nhello,pos\nhi,pos\n")
    with pytest.raises(ValueError, match="one class only \\('pos'\\)"):
        read_labelled(bad)
    bad.write_text("text,label,is_valid\nhello,pos,maybe\nhi,neg,no\n")
    with pytest.raises(ValueError, match="record 1: is_valid='maybe'"):
        read_labelled(bad)
    bad.write_text("text,label,is_valid\nhello,pos,true\nhi,neg,yes\n")
    with pytest.raises(ValueError, match="the training split is empty; mark some rows is_valid=False"):
        read_labelled(bad)
    (tmp_path / "t.txt").write_text("text,label\n")
    with pytest.raises(ValueError, match="suffix '.txt'; accepted: .csv, .tsv, .jsonl"):
        read_labelled(tmp_path / "t.txt")


# ---------------------------------------------------------------- classification


def _ab_data(n_train=24, n_val=12, seed=0):
    """'a' texts vs 'b' texts of random lengths: trivially separable."""
    g = torch.Generator().manual_seed(seed)

    def rows(n):
        labels = [i % 2 for i in range(n)]
        lengths = torch.randint(3, 12, (n,), generator=g).tolist()
        return [("b" if y else "a") * k for y, k in zip(labels, lengths)], labels

    tt, tl = rows(n_train)
    vt, vl = rows(n_val)
    return ClassificationData(["a-text", "b-text"], tt, tl, vt, vl)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooling_ignores_right_padding(pooling, tok):
    clf = build_classifier(tiny(tok.vocab_size), ["x", "y"], "probe", pooling=pooling)
    seqs = [tok.encode("the cat"), tok.encode("a dog ran in")]
    ids, mask = pad_batch(seqs, tok.pad_id)
    assert mask.tolist()[0] == [True] * 7 + [False] * 5
    with torch.no_grad():
        batched = clf.features(ids, mask)
        alone = clf.features(torch.tensor([seqs[0]]), torch.ones(1, 7, dtype=torch.bool))
        other_pad = clf.features(*pad_batch([seqs[0], seqs[1] + [5] * 4], tok.pad_id))
    torch.testing.assert_close(batched[0], alone[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(other_pad[0], alone[0], atol=1e-6, rtol=0)
    if pooling == "last":  # the hidden vector at the last real token
        h, _ = clf.base.hidden_states(torch.tensor([seqs[0]]))
        torch.testing.assert_close(alone[0], h[0, -1], atol=1e-6, rtol=0)


def test_probe_trains_only_the_head_and_separates(tok):
    model = tiny(tok.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clf = build_classifier(model, ["a-text", "b-text"], "probe")
    assert torch.count_nonzero(clf.head.weight) == 0  # uniform predictions before training
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    s = train_classifier(clf, tok, _ab_data(), ClassifyConfig(epochs=8, batch_size=8, head_lr=0.05, progress=False))
    assert s["val_accuracy"] == 1.0 and s["train_loss"] < 0.5 and s["steps"] == 8 * 3
    assert calls == [False] * (3 + 2)  # features once, without gradients: 3 training + 2 validation batches
    assert s["trainable_params"] == 32 * 2 + 2 and s["total_params"] == model.num_parameters() + 66
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.count_nonzero(clf.head.weight) > 0


def test_lora_classifier_separates_and_trains_adapters_and_head(tok):
    model = tiny(tok.vocab_size)
    clf = build_classifier(model, ["a-text", "b-text"], "lora", lora=LoraSettings(r=4, dropout=0.0))
    frozen = {n: p.clone() for n, p in clf.named_parameters() if not p.requires_grad}
    trained = {n: p.clone() for n, p in clf.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("head.") for n in trained) and any("lora_B" in n for n in trained)
    s = train_classifier(clf, tok, _ab_data(), ClassifyConfig(epochs=4, batch_size=8, lr=1e-2, head_lr=0.05,
                                                             progress=False))
    assert s["val_accuracy"] == 1.0 and s["steps"] == 12
    assert all(torch.equal(p, frozen[n]) for n, p in clf.named_parameters() if n in frozen)
    assert all(not torch.equal(p, trained[n]) for n, p in clf.named_parameters() if n in trained)
    assert s["trainable_params"] == sum(p.numel() for p in trained.values())


def test_full_mode_trains_every_weight(tok):
    clf = build_classifier(tiny(tok.vocab_size), ["a-text", "b-text"], "full")
    before = {n: p.clone() for n, p in clf.named_parameters()}
    s = train_classifier(clf, tok, _ab_data(16, 8), ClassifyConfig(epochs=1, batch_size=8, lr=1e-3, progress=False))
    assert s["trainable_params"] == s["total_params"] == sum(p.numel() for p in before.values())
    unchanged = [n for n, p in clf.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == ["base.wpe.weight"] or not unchanged  # positions past the longest text get no gradient
    with pytest.raises(ValueError, match="max_length=100 exceeds the model's context of 64"):
        build_classifier(tiny(tok.vocab_size), ["x", "y"], "full", max_length=100)


def test_hf_lora_classifier_saves_and_loads(llama_dir, tmp_path):
    model, hf_tok = load_checkpoint(f"hf:{llama_dir}")
    clf = build_classifier(model, ["a-text", "b-text"], "lora", lora=LoraSettings(r=4, dropout=0.0), pooling="mean")
    data = _ab_data(16, 8)
    data.train_texts = [" ".join(t) for t in data.train_texts]  # a a a / b b b: word tokens
    data.val_texts = [" ".join(t) for t in data.val_texts]
    s = train_classifier(clf, hf_tok, data, ClassifyConfig(epochs=3, lr=1e-2, head_lr=0.05, progress=False))
    assert s["val_accuracy"] == 1.0
    clf.eval()
    save_classifier(clf, tmp_path / "clf", hf_tok, base=f"hf:{llama_dir}")
    loaded, tok2 = load_classifier(tmp_path / "clf")
    with torch.no_grad():
        ids, mask = pad_batch([hf_tok.encode(t) for t in data.val_texts], hf_tok.pad_id)
        torch.testing.assert_close(loaded(ids, mask), clf(ids, mask), atol=1e-6, rtol=0)
    assert predict(loaded, tok2, data.val_texts) == [data.labels[y] for y in data.val_labels]


# ---------------------------------------------------------------- command line


def _run(args):
    parser = add_finetune_arguments(argparse.ArgumentParser())
    return run_finetune(parser.parse_args([str(a) for a in args] + ["--no-progress"]))


def test_cli_lm_lora_merge_end_to_end(tok, tmp_path, capsys):
    base_dir = _lmlab_dir(tmp_path / "base", tiny(tok.vocab_size), tok)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "out"
    assert _run(["--model", base_dir, "--task", "lm", "--corpus", corpus, "--lora", "--rank", 4, "--alpha", 8,
                 "--out", out, "--merge", "--max-iters", 6, "--block-size", 32, "--batch-size", 4,
                 "--eval-interval", 3, "--eval-iters", 2, "--warmup-iters", 1, "--lr", 1e-2]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 6 and summary["lora"] and summary["trainable_params"] == 2 * 4 * (4 * 32 * 2)
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert (out / "last" / "adapter_model.safetensors").is_file() and (out / "best" / "lmlab_base.json").is_file()
    merged, _ = load_checkpoint(out / "merged")
    adapted = load_adapter(load_checkpoint(base_dir)[0], out / "last")
    ids = _ids(tok.vocab_size)
    torch.testing.assert_close(_logits(merged, ids), _logits(adapted, ids), atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(merged, ids), _logits(load_checkpoint(base_dir)[0], ids))
    with pytest.raises(FileExistsError, match="already exists"):
        _run(["--model", base_dir, "--task", "lm", "--corpus", corpus, "--out", out])


def test_cli_lm_full_on_an_hf_model(llama_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = tmp_path / "out"
    assert _run(["--model", f"hf:{llama_dir}", "--task", "lm", "--corpus", corpus, "--out", out, "--max-iters", 3,
                 "--block-size", 16, "--batch-size", 2, "--eval-interval", 3, "--eval-iters", 1]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trainable_params"] == summary["total_params"] and not summary["lora"]
    tuned, _ = load_checkpoint(f"hf:{out / 'last'}")
    base, _ = load_checkpoint(f"hf:{llama_dir}")
    assert not torch.allclose(_logits(tuned, _ids(64)), _logits(base, _ids(64)))


def test_cli_classify_end_to_end_and_bad_input(tok, tmp_path, capsys):
    base_dir = _lmlab_dir(tmp_path / "base", tiny(tok.vocab_size), tok)
    d = _ab_data(24, 8)
    rows = [(t, d.labels[y], False) for t, y in zip(d.train_texts, d.train_labels)]
    rows += [(t, d.labels[y], True) for t, y in zip(d.val_texts, d.val_labels)]
    data = tmp_path / "texts.csv"
    data.write_text("text,label,is_valid\n" + "".join(f"{t},{y},{v}\n" for t, y, v in rows))
    out = tmp_path / "clf"
    assert _run(["--model", base_dir, "--task", "classify", "--data", data, "--mode", "probe", "--epochs", 8,
                 "--head-lr", 0.05, "--out", out, "--max-length", 16]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["val_accuracy"] == 1.0 and summary["trainable_params"] == 66 and summary["val_examples"] == 8
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["labels"] == ["a-text", "b-text"] and meta["label_ids"] == {"a-text": 0, "b-text": 1}
    clf, tok2 = load_classifier(out)
    assert predict(clf, tok2, ["aaaaa", "bbbbbbb"]) == ["a-text", "b-text"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "clf", "texts.csv"]  # no staging left behind
    for args, err, match in [
        (["--task", "classify", "--out", tmp_path / "x"], ValueError, "needs --data"),
        (["--task", "lm", "--out", tmp_path / "x", "--data", data], ValueError, "needs --corpus"),
        (["--task", "classify", "--data", data, "--out", tmp_path / "x", "--merge"], ValueError, "--merge belong"),
        (["--task", "classify", "--data", data, "--out", out], FileExistsError, "already exists"),
        (["--task", "classify", "--data", data, "--out", tmp_path / "x", "--target-modules", "nope"], ValueError,
         "'nope' names no layer"),
    ]:
        with pytest.raises(err, match=match):
            _run(["--model", base_dir, *args])
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- encoders: [CLS] pooling, LoRA targets


def _masked(vocab, seed=0):
    torch.manual_seed(seed)
    return build_model("masked-transformer", dict(vocab_size=vocab, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


def test_masked_transformer_has_default_lora_targets(tok):
    model = _masked(tok.vocab_size)
    assert default_target_modules(model) == ["q", "k", "v", "o"]
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in add_lora(model, LoraSettings()).named_parameters() if "lora_A" in n}
    assert adapted == {f"base_model.model.body.blocks.{i}.attn.{m}" for i in range(2) for m in "qkvo"}


def test_an_encoder_pools_its_first_cls_token_and_ignores_padding(tok):
    from lmlab.finetune import cls_id, default_pooling, encode_texts

    model = _masked(tok.vocab_size)
    assert default_pooling(model) == "first" and default_pooling(tiny(tok.vocab_size)) == "last"
    clf = build_classifier(model, ["x", "y"], "probe")
    assert clf.pooling == "first" and cls_id(tok) == tok.bos_id
    seqs = encode_texts(tok, ["the cat", "a dog ran in"], 6, prefix_id=cls_id(tok))
    assert seqs == [[tok.bos_id, *tok.encode("the cat")[:5]], [tok.bos_id, *tok.encode("a dog ran in")[:5]]]
    short = [tok.bos_id, *tok.encode("the")]
    with torch.no_grad():
        batched = clf.features(*pad_batch([short, seqs[1]], tok.pad_id))
        alone = model.hidden_states(torch.tensor([short]))[0][0, 0]
    # A bidirectional encoder would read the padding; each row is read at its own length instead.
    torch.testing.assert_close(batched[0], alone, atol=1e-6, rtol=0)


def test_an_encoder_classifier_trains_and_predicts_with_cls_pooling(tok):
    clf = build_classifier(_masked(tok.vocab_size), ["a-text", "b-text"], "probe")
    s = train_classifier(clf, tok, _ab_data(), ClassifyConfig(epochs=8, batch_size=8, head_lr=0.05, progress=False))
    assert s["val_accuracy"] == 1.0
    assert predict(clf, tok, ["aaaa", "bbbbbbb"]) == ["a-text", "b-text"]


def test_a_hugging_face_bert_classifies_with_cls_pooling(tmp_path):
    """A BERT directory is refused as a causal LM, but classification loads it as the encoder
    it is: [CLS] first, the encoder's own hidden states with padding masked, LoRA trains."""
    import transformers
    from lmlab.finetune import default_pooling, encode_texts, hidden_states, load_for_classification

    save_tiny_hf_bert(tmp_path, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "very", "a", "."])
    model, tok = load_for_classification(f"hf:{tmp_path}")
    assert default_pooling(model) == "first"
    clf = build_classifier(model, ["neg", "pos"], "lora", max_length=8)
    assert clf.pooling == "first"
    ids = encode_texts(tok, ["good film", "very very bad film ."], 8, prefix_id=2)
    assert [row[0] for row in ids] == [2, 2]  # [CLS] first
    batch, mask = pad_batch(ids, tok.pad_id)
    bert = transformers.BertModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = hidden_states(model, batch, mask)
        alone = bert(input_ids=torch.tensor([ids[0]])).last_hidden_state
    torch.testing.assert_close(got[0, : len(ids[0])], alone[0], atol=1e-5, rtol=1e-5)
    texts = ["good film", "very good film", "bad film", "very bad film"] * 3
    labels = [1, 1, 0, 0]
    data = ClassificationData(["neg", "pos"], texts, labels * 3, texts[:4], labels)
    report = train_classifier(clf, tok, data, ClassifyConfig(epochs=30, batch_size=4, lr=1e-2, head_lr=5e-2, seed=0))
    assert predict(clf, tok, ["good film", "bad film"]) == ["pos", "neg"], report
    save_classifier(clf, tmp_path / "clf", tok)
    again, tok2 = load_classifier(tmp_path / "clf", base=f"hf:{tmp_path}")
    assert again.pooling == "first" and predict(again, tok2, ["good film", "bad film"]) == ["pos", "neg"]
