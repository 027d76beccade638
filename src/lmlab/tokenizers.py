"""Tokenizers: characters, whitespace words, regex tokens, byte-level BPE, and Hugging Face tokenizers.

Every tokenizer answers the same calls::

    ids = tok.encode(text)            # list[int]
    text = tok.decode(ids)            # str; <pad>/<bos>/<eos> are skipped (word tokenizers: see below)
    tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id
    tok.save("tokenizer.json"); tok = load_tokenizer("tokenizer.json")

``encode`` never adds ``<bos>``/``<eos>``: the data and generation code wrap
sequences themselves. Text is plain text: a literal ``"<eos>"`` inside the
input is encoded as characters, never as the ``<eos>`` id — except for word
tokenizers.

Words. :class:`WordTokenizer` follows the convention of word-level language
modeling (PTB, WikiText, KenLM, SRILM): a word is a maximal run of
non-whitespace characters, whitespace being the ASCII space, tab, ``\\n``,
``\\r``, ``\\v`` and ``\\f`` only (:func:`split_words`, KenLM's rule); the
specials ``<unk>``, ``<s>``/``<bos>``, ``</s>``/``<eos>`` written in the text
are those specials, and every newline is ``</s>`` (one per line, as the
literature counts a stream). :class:`RegexTokenizer` is the lossless regex
split (words, punctuation and whitespace runs are all tokens).

Special ids. Char and regex tokenizers reserve ids 0..3 for ``<pad>``,
``<bos>``, ``<eos>``, ``<unk>``; a BPE tokenizer trained here puts its special
tokens at the same ids. A word tokenizer puts them where its vocabulary says
(see :class:`WordTokenizer`). For tokenizers loaded from elsewhere the ids come
from the tokenizer itself (see :class:`BPETokenizer` and :class:`HFTokenizer`).

Decoding ``<unk>``. ``decode`` writes ``unk_text`` in place of ``unk_id``:
``"\\ufffd"`` (U+FFFD REPLACEMENT CHARACTER) for char, BPE and Hugging Face
tokenizers, ``"<unk>"`` for word and regex tokenizers (the convention of word-level
corpora such as PTB, whose text already contains ``<unk>``; these tokenizers
encode that literal back to ``unk_id``, so such corpora round-trip exactly).

Files. Char, word and regex tokenizers are saved as lmlab JSON with a ``"type"``
field (a file of type ``"word"`` with a ``"pattern"`` is a regex tokenizer
saved before the two were told apart, and loads as one); BPE tokenizers as a
standard Hugging Face ``tokenizer.json`` (loadable by
``tokenizers.Tokenizer.from_file``), recognised by its ``"model"`` entry.
:func:`load_tokenizer` reads either. Saving is atomic (temp file + rename).
"""

from __future__ import annotations

import functools
import json
import os
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmlab.files import atomic_write_text

__all__ = [
    "SPECIAL_TOKENS",
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "UNK_ID",
    "REPLACEMENT_CHAR",
    "Tokenizer",
    "CharTokenizer",
    "WordTokenizer",
    "RegexTokenizer",
    "split_words",
    "ASCII_WHITESPACE",
    "read_vocab_file",
    "continuation_text",
    "TextStream",
    "BPETokenizer",
    "HFTokenizer",
    "from_pretrained_dir",
    "build_tokenizer",
    "load_tokenizer",
    "tokenizer_from_json",
    "TOKENIZER_KINDS",
]

SPECIAL_TOKENS: tuple[str, str, str, str] = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
REPLACEMENT_CHAR = "\ufffd"
TOKENIZER_KINDS: tuple[str, ...] = ("char", "word", "regex", "bpe")
_FORMAT_VERSION = 1


def _check_corpus(text: str, who: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{who}: text must be a str, got {type(text).__name__}")
    if not text:
        raise ValueError(f"cannot train a {who}: the corpus is empty (got '')")


def _as_id_list(ids: Sequence[int] | np.ndarray) -> list[int]:
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise ValueError(f"decode expects a 1-D sequence of ids, got an array of shape {ids.shape}")
        return ids.tolist()
    if hasattr(ids, "tolist"):  # torch tensors
        out = ids.tolist()
        if out and isinstance(out[0], list):
            raise ValueError("decode expects a 1-D sequence of ids; use decode_batch for 2-D input")
        return out
    return list(ids)


class Tokenizer(ABC):
    """The interface all lmlab tokenizers share."""

    pad_id: int
    bos_id: int
    eos_id: int
    unk_id: int
    #: What ``decode`` writes for ``unk_id``.
    unk_text: str

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids; valid ids are ``0 .. vocab_size - 1``."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (no ``<bos>``/``<eos>`` added)."""

    @abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def id_to_token(self, id: int) -> str:
        """The vocabulary entry of ``id`` (special tokens by name)."""

    @abstractmethod
    def to_json(self) -> str:
        """The file contents that :meth:`save` writes."""

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; ``<pad>``/``<bos>``/``<eos>`` are skipped, ``unk_id`` becomes ``unk_text``."""
        ids = _as_id_list(ids)
        self._check_ids(ids)
        return self._decode(ids)

    @property
    def unsettled_ids(self) -> frozenset[int]:
        """Ids whose text depends on the tokens after them (byte-fallback pieces ``<0xHH>``, decoded
        together with the whole run of such pieces): streamed text waits for the next token."""
        return frozenset()

    def token_bytes(self, id: int) -> bytes:
        """The UTF-8 bytes that ``id`` contributes to a text (the chat API's ``bytes``): a token
        holding part of a character gives those bytes, where its text alone is U+FFFD. Tokens
        of whole characters: the UTF-8 of their text; skipped special tokens: empty."""
        return self.decode([id]).encode("utf-8")

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]`` (BPE does it in parallel)."""
        return [self.encode(t) for t in texts]

    def decode_batch(self, batch: Iterable[Sequence[int]]) -> list[str]:
        """``[decode(ids) for ids in batch]``."""
        return [self.decode(ids) for ids in batch]

    @property
    def id_dtype(self) -> np.dtype:
        """Smallest dtype that holds every id: uint16 when vocab_size <= 65536, else int32."""
        return np.dtype(np.uint16 if self.vocab_size <= 65536 else np.int32)

    def encode_to_array(self, text: str) -> np.ndarray:
        """``encode(text)`` as a 1-D numpy array of dtype :attr:`id_dtype`."""
        return np.asarray(self.encode(text), dtype=self.id_dtype)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_json` to ``path`` atomically (read back with :func:`load_tokenizer`)."""
        atomic_write_text(path, self.to_json())

    def _check_ids(self, ids: list[int]) -> None:
        if not ids:
            return
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"token id {bad} is out of range for {type(self).__name__}: "
                f"valid ids are 0..{self.vocab_size - 1}"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------
# Characters
# ---------------------------------------------------------------------------


def _short_alphabet(chars: Sequence[str], limit: int = 200) -> str:
    s = "".join(chars)
    if len(s) <= limit:
        return repr(s)
    return f"{s[:limit]!r}... ({len(s)} characters)"


def _codepoints(text: str) -> np.ndarray:
    """Code points of ``text`` (one per Python character, lone surrogates included)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


class CharTokenizer(Tokenizer):
    """One id per character: ids 0..3 are the special tokens, then ``chars`` in order.

    ``unknown`` decides what happens to a character outside the vocabulary:
    ``"unk"`` maps it to ``unk_id``; ``"error"`` raises ValueError naming the
    character, its position and the accepted alphabet. ``unk_id`` decodes to
    ``unk_text`` (default U+FFFD, one character, so positions are kept).

    ``decode(encode(s)) == s`` for every ``s`` made of vocabulary characters.
    """

    def __init__(
        self,
        chars: Iterable[str],
        *,
        unknown: Literal["unk", "error"] = "unk",
        unk_text: str = REPLACEMENT_CHAR,
    ) -> None:
        chars = list(chars)
        if not chars:
            raise ValueError("CharTokenizer needs at least one character, got an empty list")
        seen: set[str] = set()
        for i, c in enumerate(chars):
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"CharTokenizer characters must be strings of length 1; item {i} is {c!r}")
            if c in seen:
                raise ValueError(f"CharTokenizer character {c!r} appears twice (second time at item {i})")
            seen.add(c)
        if unknown not in ("unk", "error"):
            raise ValueError(f"unknown={unknown!r} is not a policy; accepted: 'unk', 'error'")
        self.chars: list[str] = chars
        self.unknown = unknown
        self.unk_text = unk_text
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID
        n = len(SPECIAL_TOKENS)
        self._index = {c: i + n for i, c in enumerate(chars)}
        cps = np.array([ord(c) for c in chars], dtype=np.uint32)
        order = np.argsort(cps, kind="stable")
        self._sorted_cps = cps[order]
        self._sorted_ids = (order + n).astype(np.int64)
        self._decode_table = ["", "", "", unk_text] + chars

    @classmethod
    def train(
        cls,
        text: str,
        alphabet: str | Iterable[str] | None = None,
        unknown: Literal["unk", "error"] = "unk",
        *,
        unk_text: str = REPLACEMENT_CHAR,
    ) -> "CharTokenizer":
        """Vocabulary = sorted characters of ``text``, or the fixed ``alphabet`` (kept in its order).

        With a fixed alphabet and ``unknown="error"``, ``text`` is checked now
        so that a stray character is reported at training time.
        """
        _check_corpus(text, "CharTokenizer")
        if alphabet is None:
            return cls(sorted(set(text)), unknown=unknown, unk_text=unk_text)
        tok = cls(list(alphabet), unknown=unknown, unk_text=unk_text)
        if unknown == "error":
            tok.encode_to_array(text)
        return tok

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.chars)

    def encode_to_array(self, text: str) -> np.ndarray:
        """Ids of ``text`` as a numpy array (vectorised: ~10 ms per MB)."""
        cps = _codepoints(text)
        pos = np.searchsorted(self._sorted_cps, cps)
        pos = np.minimum(pos, len(self._sorted_cps) - 1)
        found = self._sorted_cps[pos] == cps
        ids = self._sorted_ids[pos]
        if not found.all():
            if self.unknown == "error":
                i = int(np.argmin(found))
                raise ValueError(
                    f"character {text[i]!r} at position {i} is not in the alphabet "
                    f"{_short_alphabet(self.chars)}; add it to the alphabet or use unknown='unk'"
                )
            ids[~found] = self.unk_id
        return ids.astype(self.id_dtype, copy=False)

    def encode(self, text: str) -> list[int]:
        return self.encode_to_array(text).tolist()

    def _decode(self, ids: list[int]) -> str:
        table = self._decode_table
        return "".join([table[i] for i in ids])

    def id_to_token(self, id: int) -> str:
        self._check_ids([id])
        return SPECIAL_TOKENS[id] if id < len(SPECIAL_TOKENS) else self.chars[id - len(SPECIAL_TOKENS)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "char",
            "version": _FORMAT_VERSION,
            "special_tokens": list(SPECIAL_TOKENS),
            "chars": self.chars,
            "unknown": self.unknown,
            "unk_text": self.unk_text,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CharTokenizer":
        return cls(d["chars"], unknown=d.get("unknown", "unk"), unk_text=d.get("unk_text", REPLACEMENT_CHAR))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, unknown={self.unknown!r})"


# ---------------------------------------------------------------------------
# Whitespace words (the convention of word-level language modeling)
# ---------------------------------------------------------------------------

#: What separates words: ASCII space, tab, newline, carriage return, vertical tab, form feed (as KenLM).
ASCII_WHITESPACE = " \t\n\r\v\f"
_WORD_RUN = re.compile(r"[^ \t\n\r\x0b\x0c]+")
_HAS_WHITESPACE = re.compile(r"[ \t\n\r\x0b\x0c]")
#: The spellings of each special word; the first is the one added when a vocabulary lacks it.
WORD_SPECIALS: dict[str, tuple[str, ...]] = {"unk": ("<unk>",), "bos": ("<s>", "<bos>"), "eos": ("</s>", "<eos>")}


#: Characters ``str.split()`` also splits on (Unicode and ASCII separator spaces) that are not ASCII whitespace.
_OTHER_SPACE = re.compile("[\x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")


def split_words(text: str) -> list[str]:
    """The words of ``text``: maximal runs of characters other than ASCII whitespace
    (:data:`ASCII_WHITESPACE`, KenLM's rule). Unicode spaces such as U+00A0 are
    part of words, unlike ``str.split()``."""
    if _OTHER_SPACE.search(text) is None:
        return text.split()  # the same words, about 3 times faster than the regular expression
    return _WORD_RUN.findall(text)


def read_vocab_file(path: str | os.PathLike[str]) -> list[str]:
    """The words of a vocabulary file: one word per line, in id order (line 1 is id 0).

    Surrounding ASCII whitespace of a line is dropped; a blank line, a line with
    two words, or a word given twice is an error naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vocabulary file {str(path)!r} does not exist; give a text file with one word per line")
    from lmlab.data import read_text  # lmlab.data imports this module

    lines = read_text(path, "vocabulary file").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    words: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        word = line.strip(ASCII_WHITESPACE)
        if not word:
            raise ValueError(f"{path}:{number} is blank; a vocabulary file holds one word per line")
        if _HAS_WHITESPACE.search(word):
            raise ValueError(f"{path}:{number} holds more than one word ({line[:60]!r}); give one word per line")
        if word in first_line:
            raise ValueError(f"{path}:{number}: word {word!r} is already on line {first_line[word]}")
        first_line[word] = number
        words.append(word)
    if not words:
        raise ValueError(f"vocabulary file {str(path)!r} is empty; give one word per line")
    return words


def _check_count(name: str, value: Any, minimum: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{why}, got {value!r}")


class WordTokenizer(Tokenizer):
    """Whitespace-separated words, as PTB, WikiText, KenLM and SRILM count them.

    ``words`` is the whole vocabulary in id order (word i has id i). The special
    words are found in it by spelling: ``<unk>``; ``<s>`` or ``<bos>``; ``</s>``
    or ``<eos>``; those missing are appended in that order as ``<unk>``, ``<s>``,
    ``</s>``, so the ids of a given vocabulary are never shifted. There is no
    padding entry: ``pad_id`` is ``eos_id`` (padding is never scored).
    ``append_specials=False`` keeps the vocabulary exactly as given (the words
    of a model that cannot predict any other id, such as an ARPA file's
    unigrams): a missing special's id is None, and without ``<unk>`` a word
    outside the vocabulary is a ValueError naming it.

    ``encode`` splits each line with :func:`split_words`; every newline is
    ``</s>`` (one end of sentence per line, as the word-level literature
    counts a stream); a literal special in the text (``<unk>``, ``<s>``,
    ``<bos>``, ``</s>``, ``<eos>``) is that special's id, and a word outside
    the vocabulary is ``unk_id``. ``decode`` joins words with single spaces,
    writes ``</s>`` as a newline and skips ``<s>``, so
    ``decode(encode(s))`` is ``s`` with each run of blanks in a line made one
    space and the lines' ends stripped (out-of-vocabulary words as ``<unk>``).
    """

    #: Scores of text in this tokenizer's ids are reported per word (see lmlab.score).
    score_unit = "word"

    def __init__(self, words: Iterable[str], *, append_specials: bool = True) -> None:
        words = list(words)
        index: dict[str, int] = {}
        for i, w in enumerate(words):
            if not isinstance(w, str) or not w or _HAS_WHITESPACE.search(w):
                raise ValueError(f"WordTokenizer words must be non-empty strings without whitespace; item {i} is {w!r}")
            if w in index:
                raise ValueError(f"WordTokenizer word {w!r} appears twice (items {index[w]} and {i})")
            index[w] = i
        ids: dict[str, int | None] = {}
        for role, spellings in WORD_SPECIALS.items():
            found = [w for w in spellings if w in index]
            if len(found) > 1:
                raise ValueError(f"the vocabulary holds both {found[0]!r} and {found[1]!r}; "
                                 f"they name the same special word, keep one")
            if not found:
                ids[role] = None
                if not append_specials:
                    continue
                index[spellings[0]] = len(words)
                words.append(spellings[0])
                found = [spellings[0]]
            ids[role] = index[found[0]]
            for w in spellings:  # every spelling of a special is that special
                index[w] = ids[role]
        self.words: list[str] = words
        self.append_specials = append_specials
        self.unk_id, self.bos_id, self.eos_id = ids["unk"], ids["bos"], ids["eos"]
        self.pad_id = self.eos_id if self.eos_id is not None else 0  # padding is masked; any id will do
        self.unk_text = words[self.unk_id] if self.unk_id is not None else None
        self._index = index

    @classmethod
    def train(cls, text: str, *, min_count: int = 1, max_size: int | None = None) -> "WordTokenizer":
        """Vocabulary from ``text``: ``<unk>``, ``<s>``, ``</s>`` (ids 0, 1, 2, KenLM's
        order), then the words seen at least ``min_count`` times in order of first
        occurrence. ``max_size`` caps ``vocab_size`` (the 3 specials included),
        keeping the most frequent words (on a tie, the one seen first). Specials
        in the text are not words of their own."""
        _check_corpus(text, "WordTokenizer")
        _check_count("min_count", min_count, 1)
        n = sum(1 for _ in WORD_SPECIALS)
        if max_size is not None:
            _check_count("max_size", max_size, n + 1, f" (it counts the {n} special words)")
        counts = Counter(split_words(text))  # insertion order = first occurrence
        for spellings in WORD_SPECIALS.values():
            for w in spellings:
                counts.pop(w, None)
        kept = [w for w, c in counts.items() if c >= min_count]
        if max_size is not None and len(kept) > max_size - n:
            top = set(sorted(kept, key=lambda w: -counts[w])[: max_size - n])  # stable: ties by first occurrence
            kept = [w for w in kept if w in top]
        return cls([spellings[0] for spellings in WORD_SPECIALS.values()] + kept)

    @classmethod
    def from_vocab_file(cls, path: str | os.PathLike[str]) -> "WordTokenizer":
        """The tokenizer of a vocabulary file (:func:`read_vocab_file`): line i is id i - 1."""
        return cls(read_vocab_file(path))

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        get, unk, eos = self._index.get, self.unk_id, self.eos_id
        out: list[int] = []
        for i, line in enumerate(text.split("\n") if eos is not None else [text]):
            if i:
                out.append(eos)
            out.extend([get(w, unk) for w in _WORD_RUN.findall(line)])
        if unk is None and None in out:
            word = next(w for w in _WORD_RUN.findall(text) if w not in self._index)
            raise ValueError(f"word {word!r} is not in the vocabulary, which has no <unk>")
        return out

    def _decode(self, ids: list[int]) -> str:
        """Words joined by single spaces; ``</s>`` (= ``pad_id``) is a newline, ``<s>`` is skipped."""
        words, bos, eos = self.words, self.bos_id, self.eos_id
        lines: list[str] = []
        line: list[str] = []
        for i in ids:
            if i == eos:
                lines.append(" ".join(line))
                line = []
            elif i != bos:
                line.append(words[i])
        lines.append(" ".join(line))
        return "\n".join(lines)

    def id_to_token(self, id: int) -> str:
        self._check_ids([id])
        return self.words[id]

    def to_dict(self) -> dict[str, Any]:
        d = {"type": "word", "version": 2, "words": self.words}
        if not self.append_specials:
            d["append_specials"] = False
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WordTokenizer":
        return cls(d["words"], append_specials=d.get("append_specials", True))

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, unk_id={self.unk_id}, bos_id={self.bos_id}, eos_id={self.eos_id})"


# ---------------------------------------------------------------------------
# Regex tokens (lossless)
# ---------------------------------------------------------------------------


def default_word_pattern(unk_text: str = "<unk>") -> str:
    """The default split: the ``unk_text`` literal, runs of word characters, single
    punctuation characters, and whitespace runs. Every character of any string
    falls in exactly one match, so joining the tokens gives the string back."""
    return rf"{re.escape(unk_text)}|\w+|[^\w\s]|\s+"


class RegexTokenizer(Tokenizer):
    """Regex-split tokens: ids 0..3 are the special tokens, then ``tokens`` in order.

    With the default pattern (:func:`default_word_pattern`) words, punctuation
    and whitespace runs are all tokens, so ``decode(encode(s)) == s`` exactly
    whenever every token of ``s`` is in the vocabulary; an out-of-vocabulary
    token decodes to ``unk_text`` (``"<unk>"``), and a literal ``"<unk>"`` in
    the text encodes to ``unk_id``. With a user ``pattern`` the text between
    matches is dropped, so the round trip holds only if the matches cover the text.
    """

    def __init__(
        self,
        tokens: Iterable[str],
        *,
        pattern: str | None = None,
        unk_text: str = "<unk>",
    ) -> None:
        tokens = list(tokens)
        seen: set[str] = set()
        for i, t in enumerate(tokens):
            if not isinstance(t, str) or not t:
                raise ValueError(f"RegexTokenizer tokens must be non-empty strings; item {i} is {t!r}")
            if t == unk_text:
                raise ValueError(f"RegexTokenizer token {t!r} (item {i}) is the unk_text; it maps to unk_id already")
            if t in seen:
                raise ValueError(f"RegexTokenizer token {t!r} appears twice (second time at item {i})")
            seen.add(t)
        self.pattern = default_word_pattern(unk_text) if pattern is None else pattern
        self._regex = _compile_pattern(self.pattern)
        self.tokens: list[str] = tokens
        self.unk_text = unk_text
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID
        n = len(SPECIAL_TOKENS)
        self._index = {t: i + n for i, t in enumerate(tokens)}
        self._index[unk_text] = UNK_ID
        self._decode_table = ["", "", "", unk_text] + tokens

    @classmethod
    def train(
        cls,
        text: str,
        *,
        min_count: int = 1,
        max_size: int | None = None,
        pattern: str | None = None,
        unk_text: str = "<unk>",
    ) -> "RegexTokenizer":
        """Vocabulary = tokens of ``text`` seen at least ``min_count`` times, most
        frequent first (ties by string). ``max_size`` caps ``vocab_size``
        (special tokens included); the rarest tokens are dropped."""
        _check_corpus(text, "RegexTokenizer")
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be an int >= 1, got {min_count!r}")
        n = len(SPECIAL_TOKENS)
        if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int) or max_size <= n):
            raise ValueError(f"max_size must be an int > {n} (it counts the {n} special tokens), got {max_size!r}")
        pat = default_word_pattern(unk_text) if pattern is None else pattern
        counts = Counter(_split(_compile_pattern(pat), text))
        counts.pop(unk_text, None)
        vocab = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
        if max_size is not None:
            vocab = vocab[: max_size - n]
        return cls(vocab, pattern=pat, unk_text=unk_text)

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.tokens)

    def split(self, text: str) -> list[str]:
        """The token strings of ``text`` (before vocabulary lookup)."""
        return _split(self._regex, text)

    def encode(self, text: str) -> list[int]:
        get, unk = self._index.get, self.unk_id
        return [get(t, unk) for t in _split(self._regex, text)]

    def _decode(self, ids: list[int]) -> str:
        table = self._decode_table
        return "".join([table[i] for i in ids])

    def id_to_token(self, id: int) -> str:
        self._check_ids([id])
        return SPECIAL_TOKENS[id] if id < len(SPECIAL_TOKENS) else self.tokens[id - len(SPECIAL_TOKENS)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "regex",
            "version": _FORMAT_VERSION,
            "special_tokens": list(SPECIAL_TOKENS),
            "pattern": self.pattern,
            "unk_text": self.unk_text,
            "tokens": self.tokens,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RegexTokenizer":
        return cls(d["tokens"], pattern=d["pattern"], unk_text=d.get("unk_text", "<unk>"))

    def __repr__(self) -> str:
        return f"RegexTokenizer(vocab_size={self.vocab_size}, pattern={self.pattern!r})"


def _compile_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None


def _split(regex: re.Pattern[str], text: str) -> list[str]:
    if regex.groups == 0:
        toks = regex.findall(text)
    else:
        toks = [m.group(0) for m in regex.finditer(text)]
    if "" in toks:  # a pattern that can match the empty string
        toks = [t for t in toks if t]
    return toks


# ---------------------------------------------------------------------------
# Byte-level BPE (Hugging Face `tokenizers` backend) and any tokenizer.json
# ---------------------------------------------------------------------------

# Token names tried, in order, when a tokenizer.json does not say which is which.
_SPECIAL_CANDIDATES: dict[str, tuple[str, ...]] = {
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
    "bos": ("<bos>", "<s>", "[CLS]", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>"),
    "eos": ("<eos>", "</s>", "[SEP]", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
}

# Cut long texts after a newline that sits between two plain ASCII characters:
# the GPT-2 pre-tokenizer regex always ends a piece there, so encoding the
# pieces separately gives exactly the ids of the whole text.
_SAFE_CUT = re.compile(r"(?<=[!-~])\n(?=[A-Za-z0-9])")


def _safe_chunks(text: str, size: int) -> list[str]:
    """Split ``text`` into pieces of about ``size`` characters at :data:`_SAFE_CUT` points."""
    chunks, start, n = [], 0, len(text)
    while n - start > size:
        m = _SAFE_CUT.search(text, start + size)
        if m is None:
            break
        chunks.append(text[start : m.end()])
        start = m.end()
    chunks.append(text[start:])
    return chunks


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _byte_piece_ids(vocab: dict[str, int]) -> frozenset[int]:
    """Ids of the ``<0xHH>`` tokens of a vocabulary (what a ByteFallback decoder turns into bytes)."""
    return frozenset(i for t, i in vocab.items() if len(t) == 6 and _BYTE_PIECE.fullmatch(t))


def _gpt2_byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character of each byte (GPT-2's table), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _piece_bytes_function(backend: Any) -> Any:
    """``piece -> bytes | None`` for the pieces of a ``tokenizers.Tokenizer``, by its decoder: the
    byte-level alphabet, byte-fallback ``<0xHH>`` pieces and SentencePiece's ``▁`` (Replace or
    Metaspace); None when the decoder is none of these (the caller decodes the token instead)."""
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    steps = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    kinds = {step.get("type") for step in steps}
    if "ByteLevel" in kinds:
        alphabet = _gpt2_byte_alphabet()
        return lambda piece: bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else None
    replaces = [(step["pattern"]["String"], step["content"]) for step in steps
                if step.get("type") == "Replace" and "String" in step.get("pattern", {})]
    replaces += [(step.get("replacement", "▁"), " ") for step in steps if step.get("type") == "Metaspace"]
    if not replaces and "ByteFallback" not in kinds:
        return None

    def piece_bytes(piece: str) -> bytes:
        if "ByteFallback" in kinds and _BYTE_PIECE.fullmatch(piece):
            return bytes([int(piece[3:5], 16)])
        for old, new in replaces:
            piece = piece.replace(old, new)
        return piece.encode("utf-8")

    return piece_bytes


def _backend_token_bytes(tok: Tokenizer, backend: Any, id: int) -> bytes:
    """:meth:`Tokenizer.token_bytes` through the pieces of a ``tokenizers.Tokenizer`` (specials:
    their decoded text, empty when skipped)."""
    text = tok.decode([id])
    if id in tok._special_piece_ids:
        return text.encode("utf-8")
    piece = backend.id_to_token(id)
    convert = tok._piece_bytes
    found = None if piece is None or convert is None else convert(piece)
    return text.encode("utf-8") if found is None else found


def _decode_segments(tok: Tokenizer, ids: list[int], dec: Any) -> str:
    """Drop pad/bos/eos, decode the runs between ``unk_id`` with ``dec`` and join them with ``unk_text``."""
    skip = {tok.pad_id, tok.bos_id, tok.eos_id}
    ids = [i for i in ids if i not in skip]
    if tok.unk_id in skip or tok.unk_id not in ids:
        return dec(ids)
    parts: list[str] = []
    cur: list[int] = []
    for i in ids:
        if i == tok.unk_id:
            parts.append(dec(cur))
            cur = []
        else:
            cur.append(i)
    parts.append(dec(cur))
    return tok.unk_text.join(parts)


class BPETokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer``, normally byte-level BPE trained by :meth:`train`.

    A byte-level tokenizer from :meth:`train` round-trips any Unicode string
    exactly: ``decode(encode(s)) == s``. It is saved as a standard
    ``tokenizer.json``. :meth:`from_file` wraps any ``tokenizer.json``; its
    special ids are the tokens named by ``pad_token``/... or, when not given,
    the first of the usual names found in the vocabulary (``<pad>``, ``[PAD]``,
    ``<eos>``, ``</s>``, ``<|endoftext|>``, ...). A missing ``<pad>``,
    ``<bos>`` or ``<unk>`` falls back to the ``<eos>`` id. These names are not
    stored in the file: a wrapper built with explicit names must be given them
    again on loading.

    With ``split_special_tokens=True`` (default) a special-token string inside
    the text is encoded as ordinary text (set on the wrapped tokenizer in place).
    ``decode`` skips every special token of the backend; ``unk_id`` (when not
    also pad/bos/eos) decodes to U+FFFD.
    """

    #: Texts longer than this are cut at safe newlines and encoded in parallel.
    chunk_chars: int = 1 << 13

    def __init__(
        self,
        tokenizer: Any,
        *,
        pad_token: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        split_special_tokens: bool = True,
    ) -> None:
        self.backend = tokenizer
        self.split_special_tokens = split_special_tokens
        tokenizer.encode_special_tokens = split_special_tokens
        self.unk_text = REPLACEMENT_CHAR
        given = {"pad": pad_token, "bos": bos_token, "eos": eos_token, "unk": unk_token}
        found: dict[str, int | None] = {}
        for role, name in given.items():
            if name is not None:
                i = tokenizer.token_to_id(name)
                if i is None:
                    raise ValueError(f"{role}_token={name!r} is not in the vocabulary of this tokenizer")
                found[role] = i
            else:
                found[role] = next(
                    (i for c in _SPECIAL_CANDIDATES[role] if (i := tokenizer.token_to_id(c)) is not None), None
                )
        if found["eos"] is None:
            raise ValueError(
                "cannot find an end-of-sequence token in this tokenizer; tried "
                f"{list(_SPECIAL_CANDIDATES['eos'])}; pass eos_token=... naming one"
            )
        self.eos_id = found["eos"]
        self.pad_id = self.eos_id if found["pad"] is None else found["pad"]
        self.bos_id = self.eos_id if found["bos"] is None else found["bos"]
        self.unk_id = self.eos_id if found["unk"] is None else found["unk"]
        self._chunkable = self._is_plain_byte_level()

    @classmethod
    def train(
        cls,
        text: str,
        vocab_size: int = 1024,
        *,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> "BPETokenizer":
        """Train byte-level BPE on ``text``: ids 0..3 are the special tokens, then the
        256 byte symbols, then merges up to ``vocab_size`` (fewer if the text runs
        out of pairs seen ``min_frequency`` times)."""
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, models, pre_tokenizers, trainers

        _check_corpus(text, "BPETokenizer")
        minimum = 256 + len(SPECIAL_TOKENS)
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < minimum:
            raise ValueError(
                f"vocab_size={vocab_size!r} is too small for byte-level BPE: the minimum is {minimum} "
                f"(256 byte symbols + {len(SPECIAL_TOKENS)} special tokens)"
            )
        tok = HFTok(models.BPE(unk_token=SPECIAL_TOKENS[UNK_ID]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        # Safe chunks give the trainer the same pre-tokenized words as the whole text.
        tok.train_from_iterator(_safe_chunks(text, 1 << 14), trainer=trainer)
        out = cls(tok)
        assert (out.pad_id, out.bos_id, out.eos_id, out.unk_id) == (PAD_ID, BOS_ID, EOS_ID, UNK_ID)
        return out

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **kwargs: Any) -> "BPETokenizer":
        """Wrap the Hugging Face ``tokenizer.json`` at ``path`` (keyword args as in the constructor)."""
        from tokenizers import Tokenizer as HFTok

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {str(path)!r}")
        return cls(HFTok.from_file(str(path)), **kwargs)

    @classmethod
    def from_str(cls, s: str, **kwargs: Any) -> "BPETokenizer":
        """Wrap a Hugging Face tokenizer given as its JSON text."""
        from tokenizers import Tokenizer as HFTok

        return cls(HFTok.from_str(s), **kwargs)

    def _is_plain_byte_level(self) -> bool:
        from tokenizers import pre_tokenizers

        t = self.backend
        pre = t.pre_tokenizer
        if t.normalizer is not None or not isinstance(pre, pre_tokenizers.ByteLevel):
            return False
        if pre.add_prefix_space or not pre.use_regex:
            return False
        added = t.get_added_tokens_decoder().values()
        return all("\n" not in a.content and (a.special and self.split_special_tokens) for a in added)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        try:
            if self._chunkable and len(text) > self.chunk_chars:
                encs = self.backend.encode_batch(_safe_chunks(text, self.chunk_chars), add_special_tokens=False)
                return [i for e in encs for i in e.ids]
            return self.backend.encode(text, add_special_tokens=False).ids
        except TypeError:
            self._raise_if_surrogate(text)
            raise

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        texts = list(texts)
        if self._chunkable and any(len(t) > self.chunk_chars for t in texts):
            return [self.encode(t) for t in texts]
        try:
            return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        except TypeError:
            for t in texts:
                self._raise_if_surrogate(t)
            raise

    @staticmethod
    def _raise_if_surrogate(text: str) -> None:
        m = re.search("[\ud800-\udfff]", text)
        if m:
            raise ValueError(
                f"character {m.group()!r} at position {m.start()} is a lone surrogate, not a Unicode "
                "scalar value; BPE tokenizers accept only valid Unicode text"
            )

    def _decode(self, ids: list[int]) -> str:
        return _decode_segments(self, ids, lambda xs: self.backend.decode(xs, skip_special_tokens=True))

    @functools.cached_property
    def unsettled_ids(self) -> frozenset[int]:
        return _byte_piece_ids(self.backend.get_vocab(with_added_tokens=True))

    @functools.cached_property
    def _piece_bytes(self) -> Any:
        return _piece_bytes_function(self.backend)

    @functools.cached_property
    def _special_piece_ids(self) -> frozenset[int]:
        return frozenset(self.backend.get_added_tokens_decoder()) | {self.pad_id, self.bos_id, self.eos_id, self.unk_id}

    def token_bytes(self, id: int) -> bytes:
        return _backend_token_bytes(self, self.backend, id)

    def id_to_token(self, id: int) -> str:
        self._check_ids([id])
        tok = self.backend.id_to_token(id)
        if tok is None:  # a hole in a foreign vocabulary
            raise ValueError(f"token id {id} has no token in this vocabulary")
        return tok

    def to_json(self) -> str:
        """The standard Hugging Face ``tokenizer.json`` text."""
        return self.backend.to_str(pretty=True)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, model={type(self.backend.model).__name__})"


# ---------------------------------------------------------------------------
# Hugging Face transformers tokenizer from a local directory
# ---------------------------------------------------------------------------


class HFTokenizer(Tokenizer):
    """A ``transformers`` tokenizer (``AutoTokenizer``) behind the lmlab interface.

    Special ids come from the tokenizer: ``eos_id`` is its ``eos_token_id``
    (else ``sep_token_id``); a missing ``pad``, ``bos`` or ``unk`` id falls
    back to ``eos_id`` (GPT-2 style). ``encode`` adds no special tokens and, with
    ``split_special_tokens=True``, treats special-token strings in the text as
    text. ``decode`` skips all special tokens and does no clean-up of spaces.
    ``vocab_size`` is ``len(tokenizer)`` (added tokens included). ``save(path)``
    writes the tokenizer's own files beside ``path`` (a self-contained copy); a
    reference file (``"pretrained_dir"``) is only followed inside the directory
    of the file that holds it. No code from a tokenizer directory runs unless
    ``trust_remote_code=True``.
    """

    def __init__(self, tokenizer: Any, *, split_special_tokens: bool = True, source_dir: str | None = None) -> None:
        self.hf = tokenizer
        self.split_special_tokens = split_special_tokens
        self.source_dir = source_dir
        self.unk_text = REPLACEMENT_CHAR
        eos = tokenizer.eos_token_id
        if eos is None:
            eos = getattr(tokenizer, "sep_token_id", None)
        if eos is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no eos_token_id (nor sep_token_id); "
                "set tokenizer.eos_token before wrapping it"
            )
        self.eos_id = int(eos)
        self.pad_id = self.eos_id if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
        self.bos_id = self.eos_id if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id)
        self.unk_id = self.eos_id if tokenizer.unk_token_id is None else int(tokenizer.unk_token_id)

    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike[str], **kwargs: Any) -> "HFTokenizer":
        """``AutoTokenizer.from_pretrained(path, local_files_only=True)``, wrapped.

        Extra keyword arguments go to ``from_pretrained``; ``split_special_tokens``
        goes to the wrapper.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no tokenizer directory at {str(path)!r} (expected a local directory)")
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError(
                "loading a Hugging Face tokenizer needs the optional 'transformers' package: "
                "pip install 'lmlab[hf]'"
            ) from e
        from lmlab.untrusted import refuse_remote_code

        split = kwargs.pop("split_special_tokens", True)
        trust = bool(kwargs.pop("trust_remote_code", False))
        refuse_remote_code(path, trust)
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust, **kwargs)
        return cls(tok, split_special_tokens=split, source_dir=str(path.resolve()))

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False, split_special_tokens=self.split_special_tokens))

    def _decode(self, ids: list[int]) -> str:
        return _decode_segments(
            self, ids, lambda xs: self.hf.decode(xs, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        )

    def id_to_token(self, id: int) -> str:
        self._check_ids([id])
        return self.hf.convert_ids_to_tokens(id)

    @functools.cached_property
    def unsettled_ids(self) -> frozenset[int]:
        return _byte_piece_ids(self.hf.get_vocab())

    @functools.cached_property
    def _piece_bytes(self) -> Any:
        backend = getattr(self.hf, "backend_tokenizer", None)  # fast tokenizers only
        return None if backend is None else _piece_bytes_function(backend)

    @functools.cached_property
    def _special_piece_ids(self) -> frozenset[int]:
        return frozenset(self.hf.all_special_ids) | {self.pad_id, self.bos_id, self.eos_id, self.unk_id}

    def token_bytes(self, id: int) -> bytes:
        backend = getattr(self.hf, "backend_tokenizer", None)
        return super().token_bytes(id) if backend is None else _backend_token_bytes(self, backend, id)

    def to_json(self) -> str:
        if self.source_dir is None:
            raise ValueError(
                "this HFTokenizer was not loaded from a directory, so it cannot be saved as a reference; "
                "use HFTokenizer.from_pretrained_dir(...) or the tokenizer's own save_pretrained"
            )
        return json.dumps(
            {
                "type": "hf",
                "version": _FORMAT_VERSION,
                "pretrained_dir": self.source_dir,
                "split_special_tokens": self.split_special_tokens,
            },
            indent=1,
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """The tokenizer's own files (``save_pretrained``) into ``path``'s directory and, unless that wrote
        ``path`` itself (a fast tokenizer's ``tokenizer.json``), a reference to that directory at ``path``."""
        path = Path(path)
        self.hf.save_pretrained(str(path.parent))
        if path.name == "tokenizer.json" and path.is_file():
            return
        reference = {"type": "hf", "version": _FORMAT_VERSION, "pretrained_dir": ".",
                     "split_special_tokens": self.split_special_tokens}
        atomic_write_text(path, json.dumps(reference, indent=1))

    def __repr__(self) -> str:
        return f"HFTokenizer({type(self.hf).__name__}, vocab_size={self.vocab_size})"


def from_pretrained_dir(path: str | os.PathLike[str], **kwargs: Any) -> HFTokenizer:
    """Shorthand for :meth:`HFTokenizer.from_pretrained_dir`."""
    return HFTokenizer.from_pretrained_dir(path, **kwargs)


def continuation_text(tokenizer: Any, prompt_ids: Sequence[int], ids: Sequence[int]) -> str:
    """The text that ``ids`` add after ``prompt_ids``: ``decode(prompt + ids)`` less
    ``decode(prompt)``, so that ``prompt_text + continuation`` reads right — for a word
    tokenizer it starts with the space between two words (``decode(ids)`` alone
    would glue them); with a tokenizer whose ``decode`` drops a leading space
    (SentencePiece) the space is kept."""
    prompt_ids, ids = list(prompt_ids), list(ids)
    head = tokenizer.decode(prompt_ids) if prompt_ids else ""
    if not head:
        return tokenizer.decode(ids)
    full = tokenizer.decode(prompt_ids + ids)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(ids)


class TextStream:
    """``continuation_text(tokenizer, prompt_ids, ids)`` piece by piece as the ids arrive, each
    token decoding only the few tokens since the last settled point (not the whole text):

        stream = TextStream(tokenizer, prompt_ids)
        pieces = [stream.add(t) for t in ids]
        "".join(pieces) + stream.pending == continuation_text(tokenizer, prompt_ids, ids)

    ``add`` returns text once it is settled: the window of recent tokens decodes to more than
    its settled part, not ending in U+FFFD (an unfinished multi-byte character) nor in a
    byte-fallback piece (``tokenizer.unsettled_ids``, whose run decodes as a whole). The
    window then moves up to the token before: a short look-back keeps the context that
    decoders need (the space between two words, SentencePiece's leading space, the bytes of a
    character split across tokens). ``pending`` is the rest, which a later token may still
    change (text ending in U+FFFD, an <unk>, ...); it is decoded only when asked for.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self._unsettled = getattr(tokenizer, "unsettled_ids", frozenset())
        self._silent_ids: dict[int, bool] = {}
        prompt = list(prompt_ids)
        head = tokenizer.decode(prompt) if prompt else ""
        # As continuation_text: the text after the prompt's, or (the prompt decodes to nothing, or a
        # prompt ending in a part of a character that the continuation changes) the ids' text alone.
        self._window: list[int] = []  # the tokens from the window start; _read of them are settled
        self._prefix = ""  # text of the settled tokens of the window
        self._ids: list[int] | None = None  # all ids while it is not yet known which of the two it is
        if head:
            self._window, self._prefix = self._prompt_tail(prompt)
            self._ids = []
        self._read = len(self._window)
        self._run_open = bool(prompt) and not self._run_closed(prompt)
        self._pending: str | None = ""
        self._settled = 0  # characters returned by add so far
        self._offset = 0  # the last offset given

    def _prompt_tail(self, prompt: list[int]) -> tuple[list[int], str]:
        """The last tokens of the prompt (and their text) that start the window: text that does
        not start inside a character (U+FFFD) nor inside a run of byte-fallback pieces, so that
        the tokens before the window cannot change what follows."""
        k = 4
        while True:
            start = max(0, len(prompt) - k)
            text = self.tokenizer.decode(prompt[start:])
            if start == 0 or (text and not text.startswith(REPLACEMENT_CHAR) and self._run_closed(prompt[:start])):
                return prompt[start:], text
            k *= 2

    def _silent(self, token: int) -> bool:
        """Whether ``token`` decodes to nothing alone (a skipped special token): it does not end a
        run of byte-fallback pieces, whose decoder sees the run without it."""
        silent = self._silent_ids.get(token)
        if silent is None:
            silent = self._silent_ids[token] = self.tokenizer.decode([token]) == ""
        return silent

    def _run_closed(self, ids: list[int]) -> bool:
        """Whether ``ids`` end outside a run of byte-fallback pieces (silent tokens looked through)."""
        for t in reversed(ids):
            if t in self._unsettled:
                return False
            if not self._silent(t):
                return True
        return True

    def add(self, token: int) -> str:
        """Append ``token``; the text settled by it (often empty)."""
        self._window.append(token)
        self._pending = None
        if self._ids is not None:
            self._ids.append(token)
        if token in self._unsettled:
            self._run_open = True
            return ""
        if self._run_open:
            if self._silent(token):
                return ""
            self._run_open = False
        text = self.tokenizer.decode(self._window)
        if text.endswith(REPLACEMENT_CHAR):
            return ""
        if self._ids is not None:  # the prompt's text is settled: decide as continuation_text does
            if not text.startswith(self._prefix):
                self._window, self._prefix, self._read = self._ids, "", 0
                text = self.tokenizer.decode(self._window)
            self._ids = None
            if text.endswith(REPLACEMENT_CHAR):
                return ""
        if len(text) <= len(self._prefix):
            self._pending = ""
            return ""
        piece = text[len(self._prefix):]
        self._window = self._window[self._read:]
        self._read = len(self._window)
        self._prefix = self.tokenizer.decode(self._window)
        self._pending = ""
        self._settled += len(piece)
        return piece

    @property
    def offset(self) -> int:
        """Where the next token's text will begin in the continuation: the text so far without
        a trailing unfinished character (the next token may complete it, and then points at its
        start). Never less than before: bytes that turn out invalid may turn earlier text into
        U+FFFD."""
        self._offset = max(self._offset, self._settled + len(self.pending.rstrip(REPLACEMENT_CHAR)))
        return self._offset

    @property
    def pending(self) -> str:
        """The text of the ids added so far that ``add`` has not returned yet."""
        if self._pending is None:
            text = self.tokenizer.decode(self._window)
            if self._ids is None or text.startswith(self._prefix):
                self._pending = text[len(self._prefix):]
            else:  # only before the prompt's text is settled: continuation_text's other case
                self._pending = self.tokenizer.decode(self._ids)
        return self._pending



def text_offsets(tokenizer: Any, prompt_ids: Sequence[int], ids: Sequence[int]) -> list[int]:
    """Where each of ``ids`` begins in ``continuation_text(tokenizer, prompt_ids, ids)`` (the
    ``text_offset`` of the OpenAI API, :attr:`TextStream.offset` before each token): the
    length of the text of the tokens before it, less a trailing unfinished character, so that
    the tokens of a character split across several point at its start (a sum of per-token
    decodes would count a replacement character for each part)."""
    stream, offsets = TextStream(tokenizer, prompt_ids), []
    for token in ids:
        offsets.append(stream.offset)
        stream.add(token)
    return offsets

# ---------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------


def build_tokenizer(kind: str, text: str, **opts: Any) -> Tokenizer:
    """Train a tokenizer of ``kind`` ("char", "word", "regex" or "bpe") on ``text``;
    ``opts`` go to that class's ``train`` (e.g. ``vocab_size=1024`` for bpe,
    ``min_count=2`` for word)."""
    trainers = {"char": CharTokenizer.train, "word": WordTokenizer.train, "regex": RegexTokenizer.train,
                "bpe": BPETokenizer.train}
    if kind not in trainers:
        raise ValueError(f"unknown tokenizer kind {kind!r}; accepted kinds: {', '.join(map(repr, TOKENIZER_KINDS))}")
    return trainers[kind](text, **opts)


def _referenced_dir(pretrained_dir: Any, base_dir: Path) -> Path:
    """``pretrained_dir`` (relative to ``base_dir``, the directory of the file naming it) if it lies
    inside ``base_dir``; a reference that leaves it is refused."""
    if not isinstance(pretrained_dir, str) or not pretrained_dir:
        raise ValueError(f"the 'hf' tokenizer reference in {base_dir} has pretrained_dir={pretrained_dir!r}; expected a directory name")
    base = base_dir.resolve()
    target = (base / pretrained_dir).resolve()
    if target != base and base not in target.parents:
        raise ValueError(
            f"the tokenizer file in {base_dir} points to {pretrained_dir!r}, outside its own directory; a tokenizer "
            "reference may only point inside the checkpoint (re-save the tokenizer with HFTokenizer.save)"
        )
    return target


def tokenizer_from_json(s: str, base_dir: str | os.PathLike[str] | None = None) -> Tokenizer:
    """The tokenizer whose :meth:`Tokenizer.to_json` text is ``s``. ``base_dir``: the directory of the
    file ``s`` was read from; an ``"hf"`` reference is then resolved against it and must stay inside it."""
    try:
        d = json.loads(s)
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer file is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"tokenizer JSON must be an object, got {type(d).__name__}")
    if isinstance(d.get("model"), dict):  # a Hugging Face tokenizer.json
        return BPETokenizer.from_str(s)
    kind = d.get("type")
    if kind == "char":
        return CharTokenizer.from_dict(d)
    if kind == "regex" or (kind == "word" and "pattern" in d):  # regex tokenizers were once saved as "word"
        return RegexTokenizer.from_dict(d)
    if kind == "word":
        return WordTokenizer.from_dict(d)
    if kind == "hf":
        target = d.get("pretrained_dir")
        if base_dir is not None:
            target = _referenced_dir(target, Path(base_dir))
        elif not isinstance(target, str) or not target:
            raise ValueError(f"an 'hf' tokenizer reference needs a pretrained_dir string, got {target!r}")
        return HFTokenizer.from_pretrained_dir(target, split_special_tokens=d.get("split_special_tokens", True))
    raise ValueError(
        f"unknown tokenizer type {kind!r}; accepted: 'char', 'word', 'regex', 'hf', "
        "or a Hugging Face tokenizer.json (an object with a 'model' entry)"
    )


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer saved by :meth:`Tokenizer.save`, any Hugging Face
    ``tokenizer.json``, or a directory holding a Hugging Face tokenizer
    (``tokenizer_config.json``, loaded with transformers) or a ``tokenizer.json``."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer_config.json").is_file():
            return HFTokenizer.from_pretrained_dir(path)
        if (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        else:
            raise FileNotFoundError(
                f"directory {str(path)!r} holds neither tokenizer_config.json nor tokenizer.json"
            )
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {str(path)!r}")
    from lmlab.data import read_text  # lmlab.data imports this module

    return tokenizer_from_json(read_text(path, "tokenizer file"), base_dir=path.parent)
