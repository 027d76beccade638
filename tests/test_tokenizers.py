"""Tests for lmlab.tokenizers: round trips, unknowns, files, errors."""

from __future__ import annotations

import functools
import json
import re
from importlib import resources

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmlab.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    HFTokenizer,
    RegexTokenizer,
    WordTokenizer,
    build_tokenizer,
    default_word_pattern,
    from_pretrained_dir,
    load_tokenizer,
    read_vocab_file,
    split_words,
    tokenizer_from_json,
)

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPEECH_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ' "


@functools.cache
def shakespeare() -> str:
    return resources.files("lmlab").joinpath("corpora/tinyshakespeare.txt").read_text(encoding="utf-8")


@functools.cache
def small_text() -> str:
    return shakespeare()[:8000]


@functools.cache
def char_tok() -> CharTokenizer:
    return CharTokenizer.train(small_text())


@functools.cache
def regex_tok() -> RegexTokenizer:
    return RegexTokenizer.train(small_text())


@functools.cache
def word_tok() -> WordTokenizer:
    return WordTokenizer.train(small_text())


@functools.cache
def bpe_tok() -> BPETokenizer:
    return BPETokenizer.train(small_text(), vocab_size=300)


# --------------------------------------------------------------------------- char


@SETTINGS
@given(st.data())
def test_char_round_trip(data):
    tok = char_tok()
    s = data.draw(st.text(alphabet=tok.chars))
    ids = tok.encode(s)
    assert len(ids) == len(s)
    assert all(4 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == s


def test_char_vocab_is_sorted_characters_after_specials():
    tok = CharTokenizer.train("hello world")
    assert tok.chars == sorted(set("hello world"))
    assert tok.vocab_size == 4 + len(set("hello world"))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.id_to_token(i) for i in range(4)] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert tok.encode("ole") == [tok.chars.index(c) + 4 for c in "ole"]


@SETTINGS
@given(st.text())
def test_char_fast_encode_matches_dict_lookup(s):
    tok = char_tok()
    expected = [tok._index.get(c, tok.unk_id) for c in s]
    assert tok.encode(s) == expected


def test_char_fast_encode_matches_dict_lookup_on_shakespeare():
    text = shakespeare()
    tok = CharTokenizer.train(text)
    ids = tok.encode_to_array(text)
    assert ids.dtype == np.uint16
    assert ids.tolist() == [tok._index[c] for c in text]
    assert tok.decode(ids) == text


def test_char_lone_surrogate_is_an_unknown_character():
    tok = CharTokenizer(["a", "b"])
    assert tok.encode("a\ud800b") == [4, 3, 5]


def test_char_fixed_alphabet_unknown_to_unk():
    tok = CharTokenizer.train("HELLO WORLD", alphabet=SPEECH_ALPHABET, unknown="unk")
    assert tok.chars == list(SPEECH_ALPHABET)  # a fixed alphabet keeps its order
    ids = tok.encode("HI, YOU")
    assert ids[2] == tok.unk_id
    assert tok.decode(ids) == "HI\ufffd YOU"


def test_char_fixed_alphabet_unknown_error_names_char_position_alphabet():
    tok = CharTokenizer.train("HELLO WORLD", alphabet=SPEECH_ALPHABET, unknown="error")
    assert tok.decode(tok.encode("IT'S ME")) == "IT'S ME"
    with pytest.raises(ValueError) as e:
        tok.encode("HI, YOU")
    msg = str(e.value)
    assert "','" in msg and "position 2" in msg and repr(SPEECH_ALPHABET) in msg


def test_char_train_with_alphabet_checks_text_when_error():
    with pytest.raises(ValueError, match=r"'h' at position 0"):
        CharTokenizer.train("hello", alphabet=SPEECH_ALPHABET, unknown="error")


def test_char_constructor_validation():
    tok = CharTokenizer(["x", "a"])
    assert tok.encode("ax") == [5, 4]
    with pytest.raises(ValueError, match="'ab'"):
        CharTokenizer(["ab"])
    with pytest.raises(ValueError, match="'a' appears twice"):
        CharTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="'maybe'.*'unk', 'error'"):
        CharTokenizer(["a"], unknown="maybe")


# --------------------------------------------------------------------------- word


@SETTINGS
@given(st.text())
def test_default_word_pattern_covers_any_text(s):
    assert "".join(re.findall(default_word_pattern(), s)) == s


def _word_kind(t: str) -> str:
    return "w" if re.fullmatch(r"\w+", t) else "s" if t.isspace() else "p"


@SETTINGS
@given(st.data())
def test_regex_round_trip_of_in_vocabulary_tokens(data):
    tok = regex_tok()
    drawn = data.draw(st.lists(st.sampled_from(tok.tokens), max_size=30))
    # Drop tokens that would merge with their neighbour into a different token
    # (two word runs or two whitespace runs side by side).
    parts: list[str] = []
    for t in drawn:
        if parts and _word_kind(t) == _word_kind(parts[-1]) != "p":
            continue
        parts.append(t)
    s = "".join(parts)
    ids = tok.encode(s)
    assert tok.unk_id not in ids
    assert len(ids) == len(parts)
    assert tok.decode(ids) == s


@SETTINGS
@given(st.text(alphabet=st.sampled_from("abc .,\n!éXY") | st.characters()))
def test_regex_unknown_tokens_decode_to_unk_text(s):
    tok = regex_tok()
    vocab = set(tok.tokens)
    expected = "".join(t if t in vocab else "<unk>" for t in re.findall(tok.pattern, s))
    assert tok.decode(tok.encode(s)) == expected


def test_regex_min_count_exact():
    tok = RegexTokenizer.train("a b a c a b", min_count=2)
    # counts: ' ' 5, 'a' 3, 'b' 2, 'c' 1 -> 'c' is too rare
    assert tok.tokens == [" ", "a", "b"]
    assert tok.vocab_size == 7
    assert tok.encode("a c b") == [5, 4, 3, 4, 6]
    assert tok.decode(tok.encode("a c b")) == "a <unk> b"
    assert RegexTokenizer.train("a b a c a b").tokens == [" ", "a", "b", "c"]


def test_regex_max_size_counts_specials():
    tok = RegexTokenizer.train("a b a c a b", max_size=6)
    assert tok.vocab_size == 6 and tok.tokens == [" ", "a"]
    with pytest.raises(ValueError, match="max_size.*> 4.*3"):
        RegexTokenizer.train("a b", max_size=3)
    with pytest.raises(ValueError, match="min_count.*0"):
        RegexTokenizer.train("a b", min_count=0)


def test_regex_literal_unk_round_trips_like_ptb():
    text = "the <unk> said , <unk> .\n"
    tok = RegexTokenizer.train(text)
    assert "<unk>" not in tok.tokens
    ids = tok.encode(text)
    assert ids.count(tok.unk_id) == 2
    assert tok.decode(ids) == text


def test_regex_punctuation_and_whitespace_are_tokens():
    tok = RegexTokenizer.train("Hello,  world!\n")
    assert tok.split("Hello,  world!\n") == ["Hello", ",", "  ", "world", "!", "\n"]


def test_regex_user_pattern():
    tok = RegexTokenizer.train("Hello, World. hello", pattern=r"[A-Za-z]+")
    assert set(tok.tokens) == {"Hello", "World", "hello"}
    assert tok.decode(tok.encode("hello, World")) == "helloWorld"  # text between matches is dropped
    with pytest.raises(ValueError, match=r"pattern '\(' is not a valid"):
        RegexTokenizer.train("x", pattern="(")


# --------------------------------------------------------------------------- word (whitespace)


def test_split_words_is_kenlm_ascii_whitespace():
    text = "a\tb\nc\rd\x0be\x0cf g\u00a0h\u2003i\u3000j"
    assert split_words(text) == ["a", "b", "c", "d", "e", "f", "g\u00a0h\u2003i\u3000j"]
    assert "g\u00a0h".split() == ["g", "h"]  # what str.split() would do instead
    assert split_words("  \n ") == []


def test_word_vocabulary_order_counts_and_specials():
    tok = WordTokenizer.train("b a <unk> b\nc a b </s> <eos> <s>\n")
    # specials first (KenLM's order), then words by first occurrence; specials in the text are not words
    assert tok.words == ["<unk>", "<s>", "</s>", "b", "a", "c"]
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 2)
    assert tok.vocab_size == 6 and tok.unk_text == "<unk>"
    assert WordTokenizer.train("b a b c a b", min_count=2).words[3:] == ["b", "a"]
    assert WordTokenizer.train("c b a b c a b", max_size=5).words[3:] == ["c", "b"]  # a and c tie at 2: c first
    with pytest.raises(ValueError, match="max_size must be an int >= 4.*3 special words.*got 3"):
        WordTokenizer.train("a b", max_size=3)
    with pytest.raises(ValueError, match="min_count must be an int >= 1, got 0"):
        WordTokenizer.train("a b", min_count=0)


def test_word_encode_lines_end_with_eos_and_literal_specials():
    tok = WordTokenizer.train("the cat sat\non the mat\n")
    the, cat, sat, on, mat = (tok.words.index(w) for w in ["the", "cat", "sat", "on", "mat"])
    assert tok.encode("the  cat\tsat\r\non dog\n") == [the, cat, sat, 2, on, 0, 2]
    assert tok.encode("the cat ") == tok.encode("the cat") == [the, cat]  # no </s> without a newline
    assert tok.encode("<s> the <bos> </s> <eos> <unk>") == [1, the, 1, 2, 2, 0]
    assert tok.decode([1, the, cat, 2, on, 0, 2]) == "the cat\non <unk>\n"
    assert tok.decode(tok.encode("the   mat \n\n on")) == "the mat\n\non"


@SETTINGS
@given(st.lists(st.lists(st.sampled_from(["the", "cat", "zebra", "<unk>", "a\u00a0b"]), max_size=6), max_size=5),
       st.sampled_from([" ", "  ", "\t", " \x0b "]))
def test_word_decode_encode_normalises_blanks(lines, sep):
    tok = WordTokenizer.train("the cat a\u00a0b")
    text = "\n".join(sep + sep.join(line) + sep for line in lines)
    expected = "\n".join(" ".join(w if w in tok.words else "<unk>" for w in line) for line in lines)
    assert tok.decode(tok.encode(text)) == expected
    assert len(tok.encode(text)) == sum(map(len, lines)) + max(len(lines) - 1, 0)


def test_word_given_vocabulary_keeps_ids(tmp_path):
    (tmp_path / "vocab.txt").write_text("the\n<eos>\ncat\n<unk>\n")
    tok = WordTokenizer.from_vocab_file(tmp_path / "vocab.txt")
    # the file's ids are kept; the missing <s> is appended
    assert tok.words == ["the", "<eos>", "cat", "<unk>", "<s>"]
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (3, 4, 1)
    assert tok.encode("the cat dog </s> <eos>\nthe") == [0, 2, 3, 1, 1, 1, 0]
    (tmp_path / "bare.txt").write_text("x\ny")
    assert WordTokenizer.from_vocab_file(tmp_path / "bare.txt").words == ["x", "y", "<unk>", "<s>", "</s>"]
    tok.save(tmp_path / "t.json")
    assert load_tokenizer(tmp_path / "t.json").words == tok.words


@pytest.mark.parametrize("content, message", [
    ("a\n\nb\n", r"v.txt:2 is blank"),
    ("a\nb c\n", r"v.txt:2 holds more than one word"),
    ("a\nb\na\n", r"v.txt:3: word 'a' is already on line 1"),
    ("<s>\n<bos>\n", r"both '<s>' and '<bos>'"),
    ("", r"is empty"),
])
def test_word_vocabulary_file_errors(tmp_path, content, message):
    (tmp_path / "v.txt").write_text(content)
    with pytest.raises(ValueError, match=message):
        WordTokenizer.from_vocab_file(tmp_path / "v.txt")


def test_word_vocabulary_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocabulary file .*nope.txt"):
        read_vocab_file(tmp_path / "nope.txt")


def test_old_word_files_load_as_regex_tokenizers(tmp_path):
    old = {"type": "word", "version": 1, "special_tokens": ["<pad>", "<bos>", "<eos>", "<unk>"],
           "pattern": default_word_pattern(), "unk_text": "<unk>", "tokens": [" ", "a", "b"]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(old))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(tok, RegexTokenizer) and tok.encode("a b") == [5, 4, 6]
    assert json.loads(tok.to_json())["type"] == "regex"


# --------------------------------------------------------------------------- bpe


@SETTINGS
@given(st.text())
def test_bpe_round_trip_any_unicode(s):
    tok = bpe_tok()
    ids = tok.encode(s)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == s


def test_bpe_round_trip_special_strings_and_controls():
    tok = bpe_tok()
    s = "<pad><bos> hi <eos><unk>\x00\r\n\t é 🙂 漢字 \u200d"
    ids = tok.encode(s)
    assert not {0, 1, 2, 3} & set(ids)  # special-token strings in text are plain text
    assert tok.decode(ids) == s


def test_bpe_vocab_and_special_ids():
    tok = bpe_tok()
    assert 260 < tok.vocab_size <= 300
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.id_to_token(i) for i in range(4)] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert tok.encode_to_array("hello").dtype == np.uint16


def test_bpe_vocab_size_too_small():
    with pytest.raises(ValueError, match=r"vocab_size=259.*minimum is 260"):
        BPETokenizer.train("some text", vocab_size=259)


@SETTINGS
@given(st.text(alphabet=st.sampled_from("ab \n.Z9'") | st.characters(exclude_categories=["Cs"]), max_size=200))
def test_bpe_chunked_encode_equals_whole_encode(s):
    tok = BPETokenizer(bpe_tok().backend)
    tok.chunk_chars = 4
    assert tok._chunkable
    whole = tok.backend.encode(s, add_special_tokens=False).ids
    assert tok.encode(s) == whole
    assert tok.encode_batch([s, "x"]) == [whole, tok.encode("x")]


def test_bpe_lone_surrogate_error():
    with pytest.raises(ValueError, match=r"'\\ud800' at position 1"):
        bpe_tok().encode("a\ud800b")


def test_bpe_unk_decodes_to_replacement_char():
    tok = bpe_tok()
    ids = tok.encode("ab")
    assert tok.decode([ids[0], tok.unk_id, *ids[1:]]) == tok.decode(ids[:1]) + "\ufffd" + tok.decode(ids[1:])


def test_bpe_file_is_a_standard_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer

    tok = bpe_tok()
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    hf = Tokenizer.from_file(str(path))
    text = small_text()[:2000]
    assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert hf.get_vocab_size() == tok.vocab_size


def test_bpe_from_file_foreign_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "hello": 4, "world": 5}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = BPETokenizer.from_file(path)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 2, 3, 1)
    assert tok.encode("hello there world") == [4, 1, 5]
    tok = BPETokenizer.from_file(path, eos_token="world")
    assert tok.eos_id == 5
    with pytest.raises(ValueError, match="'nope' is not in the vocabulary"):
        BPETokenizer.from_file(path, eos_token="nope")
    hf2 = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    with pytest.raises(ValueError, match="end-of-sequence.*eos_token"):
        BPETokenizer(hf2)


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("kind", ["char", "word", "regex", "bpe"])
def test_save_load_round_trip(kind, tmp_path):
    tok = {"char": char_tok, "word": word_tok, "regex": regex_tok, "bpe": bpe_tok}[kind]()
    path = tmp_path / "sub" / "tok.json"
    tok.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["tok.json"]  # no temp file left behind
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tok)
    assert loaded.vocab_size == tok.vocab_size
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.unk_id) == (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id)
    text = shakespeare()[10000:14000] + " zebra \u00e9 ~"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert tokenizer_from_json(tok.to_json()).encode(text) == tok.encode(text)
    tok.save(path)  # overwrite in place
    assert load_tokenizer(path).encode(text) == tok.encode(text)


def test_save_load_keeps_char_options(tmp_path):
    tok = CharTokenizer.train("AB", alphabet=SPEECH_ALPHABET, unknown="error", unk_text="?")
    tok.save(tmp_path / "t.json")
    loaded = load_tokenizer(tmp_path / "t.json")
    assert loaded.chars == tok.chars and loaded.unknown == "error" and loaded.unk_text == "?"
    assert json.loads((tmp_path / "t.json").read_text())["type"] == "char"


def test_load_tokenizer_errors(tmp_path):
    (tmp_path / "x.json").write_text('{"type": "sentencepiece"}')
    with pytest.raises(ValueError, match="'sentencepiece'.*'char', 'word', 'regex', 'hf'"):
        load_tokenizer(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")


def test_load_tokenizer_directory_with_tokenizer_json(tmp_path):
    bpe_tok().save(tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path).encode("hello") == bpe_tok().encode("hello")


# --------------------------------------------------------------------------- common


@pytest.mark.parametrize("kind", ["char", "regex", "bpe"])
def test_decode_skips_pad_bos_eos(kind):
    tok = {"char": char_tok, "regex": regex_tok, "bpe": bpe_tok}[kind]()
    s = "First Citizen:\nBefore we proceed"
    ids = tok.encode(s)
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]) == s
    assert tok.decode(np.array(ids)) == s
    assert tok.decode_batch([ids, []]) == [s, ""]
    assert tok.encode_batch([s, ""]) == [ids, []]


@pytest.mark.parametrize("kind", ["char", "word", "regex", "bpe"])
def test_decode_rejects_out_of_range_ids(kind):
    tok = {"char": char_tok, "word": word_tok, "regex": regex_tok, "bpe": bpe_tok}[kind]()
    with pytest.raises(ValueError, match=rf"token id {tok.vocab_size} is out of range.*0\.\.{tok.vocab_size - 1}"):
        tok.decode([4, tok.vocab_size])
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        tok.decode([-1])


@pytest.mark.parametrize("kind", ["char", "word", "regex", "bpe"])
def test_empty_corpus(kind):
    with pytest.raises(ValueError, match="corpus is empty"):
        build_tokenizer(kind, "")


def test_build_tokenizer():
    assert isinstance(build_tokenizer("char", "abc"), CharTokenizer)
    assert isinstance(build_tokenizer("word", "a b", min_count=1), WordTokenizer)
    assert isinstance(build_tokenizer("regex", "a b", min_count=1), RegexTokenizer)
    tok = build_tokenizer("bpe", small_text(), vocab_size=280)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size <= 280
    with pytest.raises(ValueError, match="'sentencepiece'.*'char', 'word', 'regex', 'bpe'"):
        build_tokenizer("sentencepiece", "abc")


# --------------------------------------------------------------------------- transformers


def test_hf_missing_transformers_gives_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"lmlab\[hf\]"):
        from_pretrained_dir(tmp_path)


def test_hf_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        from_pretrained_dir(tmp_path / "nowhere")


def test_hf_tokenizer_from_local_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    bpe = bpe_tok()
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(bpe.to_json())  # a copy: transformers may reconfigure it
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    fast.save_pretrained(str(tmp_path / "hf"))
    tok = from_pretrained_dir(tmp_path / "hf")
    assert isinstance(tok, HFTokenizer)
    # Only eos is declared: pad, bos and unk fall back to it.
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (2, 2, 2, 2)
    assert tok.vocab_size == bpe.vocab_size
    s = "Hello <eos> world \u00e9 \U0001f642\n  x"
    assert tok.encode(s) == bpe.encode(s)
    assert tok.decode([tok.bos_id, *tok.encode(s), tok.eos_id]) == s
    tok.save(tmp_path / "ref.json")
    again = load_tokenizer(tmp_path / "ref.json")
    assert isinstance(again, HFTokenizer) and again.encode(s) == tok.encode(s)
    assert isinstance(load_tokenizer(tmp_path / "hf"), HFTokenizer)
