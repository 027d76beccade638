"""Read and write n-gram language models in the ARPA text format.

The ARPA format (used by SRILM, KenLM, IRSTLM) lists, for every order, the
n-grams of the model with a log10 probability and, for all but the highest
order, a log10 backoff weight::

    \\data\\
    ngram 1=5
    ngram 2=3

    \\1-grams:
    -1.0000000	<unk>	0
    -99	<s>	-0.30103
    ...

    \\2-grams:
    -0.3010300	<s> a
    ...

    \\end\\

This module only moves the table between a file and numpy arrays; the
meaning of the numbers (backoff querying) lives in ``lmlab.models.ngram``.

Conventions (KenLM's where they differ from SRILM's):

* Words are separated by ASCII whitespace only (space, tab, newline,
  carriage return, vertical tab, form feed), as KenLM splits them: a word may
  contain U+00A0 or any other non-ASCII space
  (:func:`lmlab.tokenizers.split_words` is that rule for text).
* A log10 value of -99 or less means probability 0 (SRILM's convention);
  :func:`read_arpa` turns it into ``-inf`` and :func:`write_arpa` writes
  ``-inf`` back as ``-99``.
* A positive log10 probability is an error (KenLM refuses it too); a backoff
  weight may be positive.
* Files compressed with gzip, bzip2 or xz are read (detected by their first
  bytes, as KenLM does). A KenLM binary model (``build_binary``) is refused
  with an error that says so.
* Every malformed or truncated file raises :class:`ArpaFormatError`, whose
  message names the file and the line number (1-based) where it went wrong.

Reading is vectorized: the file is read in blocks of whole lines, words are
found by a 64-bit hash of their bytes and length (as KenLM's vocabulary
does) and numbers by numpy's correctly rounded parser; any block that is not
perfectly regular is parsed again line by line, which names the bad line.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np

from lmlab.tokenizers import ASCII_WHITESPACE

__all__ = [
    "ArpaFormatError",
    "ArpaTables",
    "ArpaSection",
    "iter_arpa",
    "read_arpa",
    "write_arpa",
    "KENLM_BINARY_MAGIC",
    "LOG10_ZERO",
]

LOG10_ZERO = -99.0  # what ARPA files write for log10(0)
KENLM_BINARY_MAGIC = b"mmap lm http://kheafield.com/code"  # start of every KenLM binary file (lm/binary_format.cc)

_ASCII_SPACE = re.compile(f"[{re.escape(ASCII_WHITESPACE)}]")
_COMPRESSED = ((b"\x1f\x8b", gzip.open, "gzip"), (b"BZh", bz2.open, "bzip2"), (b"\xfd7zXZ\x00", lzma.open, "xz"))
_BLOCK_BYTES = 1 << 19  # bytes read and parsed at a time
_HASH_MUL = np.uint64(0x100000001B3)
_HASH_SEED = np.uint64(0x9E3779B97F4A7C15)


class ArpaFormatError(ValueError):
    """A malformed or truncated ARPA file; the message names the line."""

    def __init__(self, path: str | os.PathLike | None, line: int | None, message: str):
        where = str(path) if path is not None else "<arpa>"
        if line is not None:
            where += f", line {line}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


@dataclass
class ArpaTables:
    """The content of an ARPA file as arrays.

    ``vocab``: the words of the unigram section, in file order (word id =
    position). ``ngrams[k]`` (k = 0 for unigrams) is an int64 array of shape
    (count, k + 1) of word ids; ``probs[k]`` and ``backoffs[k]`` are float64
    arrays of log10 values (backoff 0.0 where the file gives none; ``-inf``
    for -99). ``lines[k]`` gives the 1-based file line of each entry, so
    later checks can still name a line.
    """

    vocab: list[str]
    ngrams: list[np.ndarray]
    probs: list[np.ndarray]
    backoffs: list[np.ndarray]
    lines: list[np.ndarray] = field(default_factory=list)

    @property
    def order(self) -> int:
        return len(self.ngrams)


@dataclass
class ArpaSection:
    """One ``\\k-grams:`` section as :func:`iter_arpa` yields it: ``ids``
    int32 (count, k) word ids, ``probs``/``backoffs`` (count,) log10 (float64 unless asked)
    values, entry r on line ``first_line + r``. ``vocab`` (the words, id =
    position) is set for the unigram section only."""

    order: int
    ids: np.ndarray
    probs: np.ndarray
    backoffs: np.ndarray
    first_line: int
    vocab: list[str] | None = None


# ---------------------------------------------------------------- the byte stream


def _open_binary(path: Path) -> BinaryIO:
    """The file's bytes, decompressed when it starts with a gzip, bzip2 or xz
    magic number; a KenLM binary model is refused."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(KENLM_BINARY_MAGIC))
    except OSError as e:
        raise ArpaFormatError(path, None, f"cannot read the file ({e.strerror or e})") from None
    for magic, opener, _ in _COMPRESSED:
        if head.startswith(magic):
            return opener(path, "rb")
    return open(path, "rb")


def _kenlm_binary_error(path) -> ArpaFormatError:
    return ArpaFormatError(
        path, None,
        "this is a KenLM binary model (written by build_binary), not an ARPA file; lmlab reads ARPA text, "
        "plain or compressed with gzip, bzip2 or xz: give the ARPA file the binary was built from",
    )


class _LineReader:
    """Lines of a byte stream with their 1-based numbers, one at a time or in
    blocks of whole lines."""

    def __init__(self, f: BinaryIO, path):
        self.f, self.path = f, path
        self.buf = b""
        self.pos = 0
        self.eof = False
        self.lineno = 0  # lines handed out so far
        self.pushed: tuple[int, bytes] | None = None

    def _more(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.f.read(_BLOCK_BYTES)
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise ArpaFormatError(self.path, self.lineno + 1, f"cannot decompress the file: {e}") from None
        if not data:
            self.eof = True
            return False
        self.buf = self.buf[self.pos:] + data
        self.pos = 0
        return True

    def readline(self) -> tuple[int, bytes] | None:
        if self.pushed is not None:
            out, self.pushed = self.pushed, None
            return out
        while True:
            j = self.buf.find(b"\n", self.pos)
            if j >= 0:
                line = self.buf[self.pos:j]
                self.pos = j + 1
                break
            if not self._more():
                if self.pos == len(self.buf):
                    return None
                line = self.buf[self.pos:]
                self.pos = len(self.buf)
                break
        self.lineno += 1
        return self.lineno, line

    def push_back(self, item: tuple[int, bytes]) -> None:
        self.pushed = item

    def next_nonblank(self) -> tuple[int, bytes] | None:
        while True:
            item = self.readline()
            if item is None or item[1].strip():
                return item

    def block(self, max_lines: int) -> tuple[int, bytes, int]:
        """(number of its first line, up to ``max_lines`` whole lines as one
        bytes object, how many); 0 lines only at the end of the file."""
        assert self.pushed is None
        while len(self.buf) - self.pos < _BLOCK_BYTES and self._more():
            pass
        end = self.buf.rfind(b"\n", self.pos) + 1
        while end == 0 and not self.eof:  # a line longer than a block
            self._more()
            end = self.buf.rfind(b"\n", self.pos) + 1
        n = self.buf.count(b"\n", self.pos, end) if end else 0
        if self.eof and len(self.buf) > max(end, self.pos):
            end, n = len(self.buf), n + 1  # a last line without a newline
        if n > max_lines:
            nl = np.flatnonzero(np.frombuffer(self.buf, dtype=np.uint8, count=end - self.pos, offset=self.pos) == 10)
            end, n = self.pos + int(nl[max_lines - 1]) + 1, max_lines
        first = self.lineno + 1
        blk = self.buf[self.pos:end]
        self.pos = end
        self.lineno += n
        return first, blk, n


# ---------------------------------------------------------------- words


def _u64_at(blk: bytes) -> np.ndarray:
    """A view whose element i is the 8 bytes of ``blk`` from byte i on (little
    endian, zero-padded past the end): one gather reads 8 bytes of a word."""
    padded = blk + bytes(8)
    return np.ndarray(shape=(len(blk) + 1,), dtype="<u8", buffer=padded, strides=(1,))


_LOW_BYTES = np.array([(1 << (8 * i)) - 1 for i in range(8)] + [2**64 - 1], dtype=np.uint64)


def _hash_tokens(at: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """64-bit hash (uint64) of each token: bytes ``starts[i]`` to
    ``starts[i] + lengths[i]`` of the buffer ``at`` views (see ``_u64_at``).
    Words of up to 8 bytes and equal length never collide."""
    h = lengths.astype(np.uint64) * _HASH_SEED
    if not lengths.size:
        return h
    h ^= at[starts] & _LOW_BYTES[np.minimum(lengths, 8)]  # every token's first 8 bytes
    h *= _HASH_MUL
    live = np.flatnonzero(lengths > 8)
    for j in range(8, int(lengths.max()), 8):  # the longer words, 8 bytes at a time
        if j > 8:
            live = live[lengths[live] > j]
        rest = np.minimum(lengths[live] - j, 8)
        chunk = at[starts[live] + j] & _LOW_BYTES[rest]
        h[live] = (h[live] ^ chunk) * _HASH_MUL
    return h


class _Vocab:
    """The unigram words: id by exact bytes (dict) and by hash (vectorized)."""

    def __init__(self):
        self.words: list[str] = []
        self.index: dict[bytes, int] = {}
        self._hashes: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []
        self.table_hash = None

    def add(self, word: bytes, path, lineno: int) -> int:
        if word in self.index:
            raise ArpaFormatError(path, lineno, f"duplicate unigram {_show(word)!r} (first given on line "
                                  f"{self._first_line + self.index[word]})")
        try:
            text = word.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ArpaFormatError(path, lineno, f"word {word!r} is not valid UTF-8 ({e.reason})") from None
        i = len(self.words)
        self.index[word] = i
        self.words.append(text)
        return i

    def freeze(self) -> None:
        """Build the hash table the vectorized lookup uses (open addressing,
        linear probing, at most half full)."""
        words = list(self.index)
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        starts = np.cumsum(lengths) - lengths
        h = _hash_tokens(_u64_at(b"".join(words)), starts, lengths)
        if np.unique(h).size != h.size:
            self.table_hash = None  # two words share a hash: look words up one by one
            return
        self.bits = max(4, int(math.ceil(math.log2(2 * len(words) + 1))))
        size = 1 << self.bits
        self.table_hash = np.zeros(size, dtype=np.uint64)
        self.table_id = np.full(size, -1, dtype=np.int32)
        self.table_len = np.zeros(size, dtype=np.int64)
        todo, slot = np.arange(h.size), self._home(h)
        while todo.size:  # place each word in its first free slot
            free = self.table_id[slot] < 0
            place, first = np.unique(slot[free], return_index=True)
            ids = todo[free][first]
            self.table_hash[place], self.table_id[place], self.table_len[place] = h[ids], ids, lengths[ids]
            placed = np.zeros(todo.size, dtype=bool)
            placed[np.flatnonzero(free)[first]] = True
            todo, slot = todo[~placed], (slot[~placed] + 1) & (size - 1)

    def _home(self, h: np.ndarray) -> np.ndarray:
        return (h * _HASH_SEED >> np.uint64(64 - self.bits)).astype(np.int64)

    def lookup(self, at: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray | None:
        """int32 ids of the tokens, or None if one is not a word of the vocabulary."""
        if self.table_hash is None:
            return None
        h = _hash_tokens(at, starts, lengths)
        slot = self._home(h)
        mask = self.table_id.size - 1
        # an empty slot has length 0, which no token has: equal lengths also say "occupied"
        tl = self.table_len[slot]
        hit = tl == lengths
        hit &= self.table_hash[slot] == h
        out = self.table_id[slot]  # right where hit; the rest probe on
        todo = np.flatnonzero(~hit)
        slot, h, lengths = slot[todo], h[todo], lengths[todo]
        while todo.size:
            if (self.table_len[slot] == 0).any():
                return None  # an empty slot reached: not a word of the vocabulary
            slot = (slot + 1) & mask
            hit = (self.table_len[slot] == lengths) & (self.table_hash[slot] == h)
            out[todo[hit]] = self.table_id[slot[hit]]
            go = ~hit
            todo, slot, h, lengths = todo[go], slot[go], h[go], lengths[go]
        return out


def _show(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


# ---------------------------------------------------------------- entries


def _parse_float(token: bytes, path, lineno: int, what: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise ArpaFormatError(path, lineno, f"{what} {_show(token)!r} is not a number") from None
    if math.isnan(value):
        raise ArpaFormatError(path, lineno, f"{what} is NaN; a log10 probability or backoff must be a number")
    if value == math.inf:
        raise ArpaFormatError(path, lineno, f"{what} is +inf; log10 values must be finite or -99 for zero")
    if value <= LOG10_ZERO:
        value = -math.inf
    return value


def _tokens_per_line(x: np.ndarray, starts: np.ndarray, ends: np.ndarray, n: int, widths) -> np.ndarray | None:
    """Number of tokens on each of the n lines of the block (None if a line
    has none); checked per line cheaply when every line has the same width."""
    newlines = np.flatnonzero(x == 10)[: n - 1]  # the end of every line but the last
    for w in widths:
        if starts.size == n * w:
            if (ends[w - 1::w][: n - 1] <= newlines).all() and (starts[w::w] > newlines).all():
                return np.full(n, w, dtype=np.int64)
            break
    line_of = np.searchsorted(newlines, starts)
    per_line = np.bincount(line_of, minlength=n)
    return per_line if per_line.size == n else None


_POW10 = 10.0 ** np.arange(23)  # exact in float64
_EXACT_MANTISSA = 2**53


def _parse_numbers(x: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    """float64 value of each token ``x[starts[i]:ends[i]]``, correctly rounded
    (what ``float()`` gives), or None if one is not a number. Plain decimals
    (``-1.2345``, ``-99``) of at most 17 digits whose mantissa is below 2**53
    and with at most 22 decimals are computed vectorized as mantissa / 10**decimals,
    one correctly rounded division of two exact values (Clinger's fast path);
    the rest (exponents, long mantissas, ``inf``) go through ``float()`` one by one."""
    n = starts.size
    if not n:
        return np.zeros(0)
    negative = x[starts] == 45  # '-'
    first = starts + negative
    lengths = ends - first
    m = np.zeros(n, dtype=np.int64)  # the digits as one integer
    good = np.zeros(n, dtype=np.int64)  # digits and dots seen
    dots = np.zeros(n, dtype=np.int64)
    dot_at = np.zeros(n, dtype=np.int64)
    last = x.size - 1
    width = min(int(lengths.max()), 24)
    for j in range(width):
        live = lengths > j
        c = x[np.minimum(first + j, last)]
        d = c - np.uint8(48)
        is_digit = d < 10
        is_digit &= live
        is_dot = c == 46
        is_dot &= live
        good += is_digit
        good += is_dot
        dots += is_dot
        dot_at[is_dot] = j
        m = np.where(is_digit, m * 10 + d, m)
    digits = lengths - dots
    decimals = np.where(dots > 0, lengths - 1 - dot_at, 0)
    bad = (good != lengths) | (lengths > width) | (dots > 1)
    bad |= (digits == 0) | (digits > 17) | (decimals > 22)
    bad |= m >= _EXACT_MANTISSA
    values = m / _POW10[np.clip(decimals, 0, 22)]
    np.negative(values, out=values, where=negative)
    for i in np.flatnonzero(bad).tolist():
        try:
            values[i] = float(x[starts[i]:ends[i]].tobytes())
        except ValueError:
            return None
    return values


def _parse_block_fast(blk: bytes, n: int, k: int, has_backoff: bool, vocab: _Vocab):
    """Vectorized parse of n whole lines of the k-grams section: (ids or
    word tokens, probs, backoffs), or None at the first doubt."""
    x = np.frombuffer(blk, dtype=np.uint8)
    edge = np.ones(x.size + 2, dtype=bool)
    ws = edge[1:-1]
    np.less(x - np.uint8(9), np.uint8(5), out=ws)  # \t \n \v \f \r (uint8 wraps below 9)
    ws |= x == 32
    t = np.flatnonzero(edge[1:] != edge[:-1])  # token starts and ends, alternating
    starts, ends = t[0::2], t[1::2]
    del edge, t
    per_line = _tokens_per_line(x, starts, ends, n, (k + 2, k + 1) if has_backoff else (k + 1,))
    if per_line is None:
        return None
    with_bo = per_line == k + 2
    if not ((per_line == k + 1) | (with_bo & has_backoff)).all():
        return None
    first = np.cumsum(per_line) - per_line  # token index of each line's probability
    num = np.concatenate([first, first[with_bo] + k + 1])
    values = _parse_numbers(x, starts[num], ends[num])
    if values is None:
        return None
    del num
    pr = values[:n]
    bo = np.zeros(n)
    bo[with_bo] = values[n:]
    if np.isnan(values).any() or (values == np.inf).any() or (pr > 0).any():
        return None
    pr[pr <= LOG10_ZERO] = -np.inf
    bo[bo <= LOG10_ZERO] = -np.inf
    wt = (first[:, None] + np.arange(1, k + 1)[None, :]).reshape(-1)
    ws, wl = starts[wt], ends[wt] - starts[wt]
    if k == 1:
        return (x, ws, wl), pr, bo
    ids = vocab.lookup(_u64_at(blk), ws, wl)
    if ids is None:
        return None
    return ids.reshape(n, k), pr, bo


def _parse_block_slow(blk: bytes, first_line: int, done: int, count: int, k: int, has_backoff: bool,
                      vocab: _Vocab, path):
    """Line-by-line parse of a block; raises ArpaFormatError naming the bad line."""
    lines = blk.split(b"\n")
    if blk.endswith(b"\n"):
        lines.pop()
    n = len(lines)
    ids = np.empty((n, k), dtype=np.int32)
    pr = np.empty(n, dtype=np.float64)
    bo = np.zeros(n, dtype=np.float64)
    for r, raw in enumerate(lines):
        lineno = first_line + r
        fields = raw.split()
        if not fields or fields[0].startswith(b"\\"):
            raise ArpaFormatError(path, lineno, f"the \\{k}-grams: section has {done + r} entries, the header announces {count}")
        nf = len(fields)
        if nf == k + 1:
            b = 0.0
        elif nf == k + 2 and has_backoff:
            b = _parse_float(fields[-1], path, lineno, "backoff")
        else:
            expect = f"{k + 1} or {k + 2}" if has_backoff else f"{k + 1}"
            raise ArpaFormatError(
                path, lineno, f"a {k}-gram entry needs {expect} fields (log10 prob, {k} word(s)"
                f"{', backoff' if has_backoff else ''}), got {nf}: {_show(raw[:80])!r}"
            )
        p = _parse_float(fields[0], path, lineno, "log10 probability")
        if p > 0:
            raise ArpaFormatError(
                path, lineno, f"log10 probability {_show(fields[0])} is positive (a probability above 1); "
                "KenLM refuses such files too (IRSTLM writes them): fix the file"
            )
        if k == 1:
            ids[r, 0] = vocab.add(fields[1], path, lineno)
        else:
            for j in range(k):
                wid = vocab.index.get(fields[1 + j])
                if wid is None:
                    raise ArpaFormatError(path, lineno, f"word {_show(fields[1 + j])!r} is not in the \\1-grams: section")
                ids[r, j] = wid
        pr[r] = p
        bo[r] = b
    return ids, pr, bo


# ---------------------------------------------------------------- reading


def iter_arpa(path: str | os.PathLike, dtype=np.float64) -> Iterator[list[int] | ArpaSection]:
    """Parse an ARPA file section by section: yields the list of n-gram
    counts of the ``\\data\\`` header first, then one :class:`ArpaSection`
    per order, so a reader can build order k before order k+1 is parsed.
    Raises :class:`ArpaFormatError` as :func:`read_arpa` describes (duplicate
    n-grams above the unigrams are left to the caller). ``dtype``: of the
    probabilities and backoffs (numbers are parsed as float64, then cast;
    float32 halves a section for a reader that keeps float32)."""
    path = Path(path)
    with _open_binary(path) as f:
        reader = _LineReader(f, path)
        first = reader.readline()
        if first is not None and first[1].startswith(KENLM_BINARY_MAGIC):
            raise _kenlm_binary_error(path)
        if first is not None:
            reader.push_back(first)
        # -- header: skip anything before \data\ (SRILM and KenLM may write comments)
        while True:
            item = reader.readline()
            if item is None:
                raise ArpaFormatError(path, max(reader.lineno, 1), "no \\data\\ header found; this is not an ARPA file")
            if item[1].strip() == b"\\data\\":
                break
        counts: list[int] = []
        while True:
            item = reader.readline()
            if item is None:
                break
            lineno, line = item
            s = line.strip()
            if not s:
                if counts:
                    break
                continue
            if not s.startswith(b"ngram "):
                if s.startswith(b"\\") and counts:
                    reader.push_back(item)
                    break
                raise ArpaFormatError(path, lineno, f"expected 'ngram K=COUNT' in the \\data\\ section, got {_show(s[:60])!r}")
            try:
                lhs, rhs = s[6:].split(b"=")
                k, c = int(lhs), int(rhs)
            except ValueError:
                raise ArpaFormatError(path, lineno, f"expected 'ngram K=COUNT' with integers, got {_show(s[:60])!r}") from None
            if k != len(counts) + 1:
                raise ArpaFormatError(path, lineno, f"expected 'ngram {len(counts) + 1}=...', got order {k}")
            if c < 0:
                raise ArpaFormatError(path, lineno, f"negative n-gram count {c}")
            counts.append(c)
        if not counts:
            raise ArpaFormatError(path, max(reader.lineno, 1), "the \\data\\ section lists no 'ngram K=COUNT' lines")
        if counts[0] == 0:
            raise ArpaFormatError(path, reader.lineno, "the model has no unigrams (ngram 1=0)")
        yield list(counts)
        order = len(counts)
        vocab = _Vocab()
        for k in range(1, order + 1):
            item = reader.next_nonblank()
            if item is None:
                raise ArpaFormatError(path, reader.lineno, f"file ends before the \\{k}-grams: section (truncated?)")
            lineno, header = item
            if header.strip() != f"\\{k}-grams:".encode():
                raise ArpaFormatError(path, lineno, f"expected '\\{k}-grams:', got {_show(header.strip()[:60])!r}")
            yield _read_section(reader, path, k, counts[k - 1], k < order, vocab, dtype)
            item = reader.next_nonblank()  # the section must end here (blank lines, then a header or \end\)
            if item is not None:
                if not item[1].strip().startswith(b"\\"):
                    raise ArpaFormatError(
                        path, item[0], f"the \\{k}-grams: section has more entries than the {counts[k - 1]} the header announces"
                    )
                reader.push_back(item)
        item = reader.next_nonblank()
        if item is None:
            raise ArpaFormatError(path, reader.lineno, "file ends without '\\end\\' (truncated?)")
        if item[1].strip() != b"\\end\\":
            raise ArpaFormatError(path, item[0], f"expected '\\end\\', got {_show(item[1].strip()[:60])!r}")


def _read_section(reader: _LineReader, path, k: int, count: int, has_backoff: bool, vocab: _Vocab,
                  dtype) -> ArpaSection:
    ids = np.empty((count, k), dtype=np.int32)
    pr = np.empty(count, dtype=dtype)
    bo = np.empty(count, dtype=dtype)
    first_line = reader.lineno + 1
    done = 0
    while done < count:
        start, blk, n = reader.block(count - done)
        if n == 0:
            raise ArpaFormatError(
                path, reader.lineno, f"file ends after {done} of the {count} {k}-grams the header announces (truncated?)"
            )
        fast = _parse_block_fast(blk, n, k, has_backoff, vocab)
        if fast is not None and k == 1:
            (x, ws, wl), p, b = fast
            for r, (s, ln) in enumerate(zip(ws.tolist(), wl.tolist())):
                ids[done + r, 0] = vocab.add(blk[s:s + ln], path, start + r)
        elif fast is not None:
            ids[done:done + n], p, b = fast
        else:
            ids[done:done + n], p, b = _parse_block_slow(blk, start, done, count, k, has_backoff, vocab, path)
        pr[done:done + n] = p
        bo[done:done + n] = b
        done += n
    if k == 1:
        vocab._first_line = first_line
        vocab.freeze()
    return ArpaSection(k, ids, pr, bo, first_line, list(vocab.words) if k == 1 else None)


def read_arpa(path: str | os.PathLike) -> ArpaTables:
    """Parse an ARPA file (UTF-8 text, plain or compressed with gzip, bzip2 or xz).

    Raises :class:`ArpaFormatError` naming the line for: a KenLM binary file,
    a missing ``\\data\\`` header, a bad ``ngram k=count`` line, sections out
    of order, an entry with the wrong number of fields, a probability or
    backoff that is not a number (or NaN), a positive log10 probability, a
    word missing from the unigram section (or a unigram that is not UTF-8),
    a duplicate n-gram, a section whose number of entries differs from the
    header, and a file that ends before ``\\end\\`` (truncated).
    """
    vocab: list[str] = []
    ngrams, probs, backoffs, where = [], [], [], []
    for item in iter_arpa(path):
        if isinstance(item, list):
            continue
        if item.vocab is not None:
            vocab = item.vocab
        ids = item.ids.astype(np.int64)
        ln = np.arange(item.first_line, item.first_line + ids.shape[0], dtype=np.int64)
        if item.order > 1 and ids.shape[0] > 1:
            _check_duplicates(ids, ln, path, item.order)
        ngrams.append(ids)
        probs.append(item.probs)
        backoffs.append(item.backoffs)
        where.append(ln)
    return ArpaTables(vocab, ngrams, probs, backoffs, where)


def _check_duplicates(ids: np.ndarray, ln: np.ndarray, path, k: int) -> None:
    order = np.lexsort(ids.T[::-1])
    s = ids[order]
    same = np.all(s[1:] == s[:-1], axis=1)
    if same.any():
        j = int(np.flatnonzero(same)[0])
        a, b = sorted((int(ln[order[j]]), int(ln[order[j + 1]])))
        raise ArpaFormatError(path, b, f"duplicate {k}-gram (first given on line {a})")


# ---------------------------------------------------------------- writing


def _format_values(values: np.ndarray) -> list[str]:
    v = np.asarray(values, dtype=np.float64)
    out = np.char.mod("%.9g", np.where(np.isneginf(v), LOG10_ZERO, v))
    return out.tolist()


_WRITE_ROWS = 1 << 16  # entries formatted and written at a time


def write_arpa(
    path: str | os.PathLike,
    vocab: Sequence[str],
    ngrams: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    backoffs: Sequence[np.ndarray],
) -> None:
    """Write an ARPA file.

    ``ngrams[k]`` is an int array (count, k+1) of ids into ``vocab`` (or
    anything with a length whose slices are such arrays: it is read a block of
    entries at a time); ``probs[k]``/``backoffs[k]`` are log10 values (float32
    or float64, written as float64; ``-inf`` is written as -99).
    Backoffs of the highest order are not written. Words may contain any
    character but ASCII whitespace. The text is streamed to a temporary file
    in blocks of entries (never whole in memory), renamed onto ``path`` when
    complete.
    """
    from lmlab.files import atomic_output

    vocab = list(vocab)
    for w in vocab:
        if not w or _ASCII_SPACE.search(w):
            raise ValueError(
                f"vocabulary entry {w!r} cannot be written to ARPA: words must be non-empty without ASCII whitespace"
            )
    if len(set(vocab)) != len(vocab):
        seen: set[str] = set()
        dup = next(w for w in vocab if w in seen or seen.add(w))
        raise ValueError(f"vocabulary entry {dup!r} appears twice; ARPA words must be unique")
    words = np.array(vocab, dtype=object)
    order = len(ngrams)
    with atomic_output(path) as f:
        head = ["\\data\\\n"] + [f"ngram {k + 1}={len(ngrams[k])}\n" for k in range(order)] + ["\n"]
        f.write("".join(head).encode("utf-8"))
        for k in range(order):
            f.write(f"\\{k + 1}-grams:\n".encode("utf-8"))
            ids = ngrams[k]
            for s in range(0, len(ids), _WRITE_ROWS):
                rows = np.asarray(ids[s:s + _WRITE_ROWS])
                cols = [words[rows[:, j]].tolist() for j in range(k + 1)]
                text = cols[0] if k == 0 else [" ".join(t) for t in zip(*cols)]
                ps = _format_values(probs[k][s:s + _WRITE_ROWS])
                if k + 1 < order:
                    bs = _format_values(backoffs[k][s:s + _WRITE_ROWS])
                    block = "".join(f"{p}\t{t}\t{b}\n" for p, t, b in zip(ps, text, bs))
                else:
                    block = "".join(f"{p}\t{t}\n" for p, t in zip(ps, text))
                f.write(block.encode("utf-8"))
            f.write(b"\n")
        f.write(b"\\end\\\n")
