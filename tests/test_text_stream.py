"""TextStream: streamed text equals continuation_text exactly, for every kind of tokenizer lmlab has.

Each token decodes only a short window, so the pieces must agree with one decode of the whole
prompt + continuation: checked on random token sequences (specials, <unk>, byte pieces that
split a character, prompt/continuation boundaries inside a character) and on encoded text
cut at random points.
"""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmlab.tokenizers import (BPETokenizer, CharTokenizer, RegexTokenizer, TextStream, WordTokenizer, continuation_text,
                              text_offsets)

from test_tokenizers import small_text

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPECIALS = ["<unk>", "<s>", "</s>"]
PIECES = list("▁abcdefghijklmnopqrstuvwxyz,.") + ["▁t", "he", "▁the", "▁a"]
MERGES = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a")]
TEXT = st.text(alphabet="the cat, a hat.\n é€🙂xyZ\u00a0", max_size=30)


def _sentencepiece_backend():
    """A Llama-style tokenizer.json: SentencePiece spaces (▁, the first one stripped on decoding),
    BPE with byte fallback (<0xHH> pieces for what the vocabulary lacks)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + PIECES)}
    tok = Tokenizer(models.BPE(vocab, MERGES, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(SPECIALS)
    return tok


def _write_gguf_tokenizer(path) -> None:
    """A GGUF file with a SentencePiece ('llama') tokenizer in its metadata (and one tensor)."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    tokens = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + PIECES
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(PIECES))])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(PIECES))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(8)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@functools.cache
def tokenizer(kind: str):
    text = small_text()
    if kind == "char":
        return CharTokenizer.train(text + "é€🙂\ufffd")
    if kind == "regex":
        return RegexTokenizer.train(text)
    if kind == "word":
        return WordTokenizer.train(text)
    if kind == "byte-level bpe":
        return BPETokenizer.train(text + "é€🙂", vocab_size=300)
    if kind == "sentencepiece bpe":
        return BPETokenizer(_sentencepiece_backend(), bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    transformers = pytest.importorskip("transformers")
    from lmlab.tokenizers import HFTokenizer

    if kind == "hf sentencepiece":
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=_sentencepiece_backend(), bos_token="<s>",
                                                    eos_token="</s>", unk_token="<unk>")
        return HFTokenizer(fast)
    if kind == "gguf":
        import tempfile
        from pathlib import Path

        directory = Path(tempfile.mkdtemp(prefix="lmlab-gguf-tok-"))
        _write_gguf_tokenizer(directory / "tok.gguf")
        return HFTokenizer.from_pretrained_dir(directory, gguf_file="tok.gguf")
    raise AssertionError(kind)


KINDS = ["char", "regex", "word", "byte-level bpe", "sentencepiece bpe", "hf sentencepiece", "gguf"]


def _check(tok, prompt: list[int], ids: list[int]) -> None:
    stream = TextStream(tok, prompt)
    streamed = ""
    for k, t in enumerate(ids, 1):
        streamed += stream.add(t)
        # At every step: the settled text and the pending rest are the continuation so far.
        assert streamed + stream.pending == continuation_text(tok, prompt, ids[:k])
    assert streamed + stream.pending == continuation_text(tok, prompt, ids)


def token_ids(kind: str, tok) -> st.SearchStrategy[int]:
    """Ids of ``tok``, with byte pieces and specials often: the cases where a window could decode
    differently from the whole."""
    ids = st.integers(0, tok.vocab_size - 1)
    if kind == "byte-level bpe":
        return st.one_of(ids, st.integers(4, 4 + 255))
    if kind in ("sentencepiece bpe", "hf sentencepiece", "gguf"):
        return st.one_of(ids, st.integers(0, 2), st.sampled_from([3 + b for b in (0x20, 0x41, 0xC3, 0xA9, 0xE2, 0x82,
                                                                                   0xAC, 0xF0, 0x9F, 0x99, 0x80)]))
    return ids


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_random_ids_stream_to_the_continuation_text(kind, data):
    tok = tokenizer(kind)
    ids = token_ids(kind, tok)
    prompt = data.draw(st.lists(ids, max_size=8), label="prompt")
    _check(tok, prompt, data.draw(st.lists(ids, max_size=14), label="ids"))


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(text=TEXT, cut=st.integers(0, 40))
def test_encoded_text_cut_anywhere_streams_to_the_continuation_text(kind, text, cut):
    tok = tokenizer(kind)
    ids = tok.encode(text)
    cut = min(cut, len(ids))
    _check(tok, ids[:cut], ids[cut:])
    if kind != "word":  # the text comes back whole (a word tokenizer normalises blanks)
        stream = TextStream(tok, [])
        assert "".join(stream.add(t) for t in ids) + stream.pending == tok.decode(ids)


def test_a_character_split_across_byte_pieces_comes_out_whole_once_complete():
    tok = tokenizer("sentencepiece bpe")
    prompt = tok.encode("the")
    stream = TextStream(tok, prompt)
    ids = tok.encode("the é a")[len(prompt):]
    assert [tok.id_to_token(t) for t in ids] == ["▁", "<0xC3>", "<0xA9>", "▁a"]
    # The byte pieces wait for the token after them (a later byte could still spoil the run), then "é" comes out whole.
    assert [stream.add(t) for t in ids] == [" ", "", "", "é a"]
    assert stream.pending == ""


def test_the_window_stays_short():
    tok = tokenizer("byte-level bpe")
    calls = []
    real = tok.decode

    class Counting:
        unsettled_ids = tok.unsettled_ids

        def decode(self, ids):
            calls.append(len(ids))
            return real(ids)

    ids = tok.encode(small_text()[:3000])
    stream = TextStream(Counting(), ids[:500])
    text = "".join(stream.add(t) for t in ids[500:]) + stream.pending
    assert text == continuation_text(tok, ids[:500], ids[500:])
    assert max(calls[1:]) <= 8  # after the one decode of the prompt: windows of a few tokens


@pytest.mark.parametrize("kind", ["char", "word", "byte-level bpe", "sentencepiece bpe"])
@SETTINGS
@given(data=st.data())
def test_stop_scan_fires_at_the_first_token_whose_continuation_holds_a_stop_string(kind, data):
    from lmlab.decode.generate import StopScan

    tok = tokenizer(kind)
    text = data.draw(TEXT, label="text")
    ids = tok.encode(text)
    cut = data.draw(st.integers(0, len(ids)), label="cut")
    prompt, ids = ids[:cut], ids[cut:]
    whole = continuation_text(tok, prompt, ids)
    stops = data.draw(st.lists(st.one_of(st.text("the cat, a hat.\n é€🙂xyZ", min_size=1, max_size=4),
                                         st.just(whole[-3:] or "x")).filter(bool), min_size=1, max_size=3), label="stops")
    scan = StopScan(tok, prompt, stops)
    fired = next((k for k, t in enumerate(ids, 1) if scan.add(t)), None)
    expected = next((k for k in range(1, len(ids) + 1)
                     if any(s in continuation_text(tok, prompt, ids[:k]) for s in stops)), None)
    assert fired == expected


def test_text_offsets_point_every_part_of_a_split_character_at_its_start():
    tok = tokenizer("sentencepiece bpe")
    prompt = tok.encode("the")
    ids = tok.encode("the é a")[len(prompt):]  # "▁", "<0xC3>", "<0xA9>", "▁a" -> " é a"
    assert text_offsets(tok, prompt, ids) == [0, 1, 1, 2]
    word = tokenizer("word")
    ids = word.encode("we hear the people.")
    assert text_offsets(word, [], ids) == [0, 2, 7, 11]  # "we", " hear", " the", " people."
    assert text_offsets(word, ids[:1], ids[1:]) == [0, 5, 9]  # after the prompt "we"


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_text_offsets_are_the_text_before_each_token_less_an_unfinished_character(kind, data):
    tok = tokenizer(kind)
    ids = token_ids(kind, tok)
    prompt = data.draw(st.lists(ids, max_size=6), label="prompt")
    ids = data.draw(st.lists(ids, max_size=12), label="ids")
    offsets = text_offsets(tok, prompt, ids)
    assert offsets == sorted(offsets)
    for k, offset in enumerate(offsets):
        before = continuation_text(tok, prompt, ids[:k])
        assert len(before.rstrip("\ufffd")) <= offset <= len(before)


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(text=TEXT)
def test_token_bytes_join_to_the_text(kind, text):
    """The bytes of the tokens of a text are the text's UTF-8, also where a character is split
    across byte tokens (whose text alone is U+FFFD): SentencePiece kinds with the space of their
    first piece (which decoding drops), a word tokenizer with its words and no spaces."""
    tok = tokenizer(kind)
    ids = tok.encode(text)
    joined = b"".join(tok.token_bytes(t) for t in ids)
    if kind == "word":
        assert joined == "".join(tok.decode([t]) for t in ids).encode("utf-8")
    elif kind in ("sentencepiece bpe", "hf sentencepiece", "gguf"):
        assert joined == ((" " + tok.decode(ids)).encode("utf-8") if ids else b"")  # decode drops that space
    elif tok.unk_id not in ids:  # char, regex, byte-level: every character in the vocabulary
        assert joined == text.encode("utf-8")


def test_a_byte_piece_has_its_byte():
    tok = tokenizer("sentencepiece bpe")
    ids = tok.encode("é")
    assert [tok.id_to_token(t) for t in ids] == ["▁", "<0xC3>", "<0xA9>"]
    assert [tok.token_bytes(t) for t in ids] == [b" ", b"\xc3", b"\xa9"]
    assert tok.decode(ids[1:2]) == "\ufffd"  # what the token's text alone says
    assert tok.token_bytes(tok.eos_id) == b""
