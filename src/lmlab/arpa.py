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

Conventions:

* A log10 value of -99 or less means probability 0 (SRILM's convention);
  :func:`read_arpa` turns it into ``-inf`` and :func:`write_arpa` writes
  ``-inf`` back as ``-99``.
* Every malformed or truncated file raises :class:`ArpaFormatError`, whose
  message names the file and the line number (1-based) where it went wrong.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["ArpaFormatError", "ArpaTables", "read_arpa", "write_arpa", "LOG10_ZERO"]

LOG10_ZERO = -99.0  # what ARPA files write for log10(0)


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


def _parse_float(token: str, path, lineno: int, what: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise ArpaFormatError(path, lineno, f"{what} {token!r} is not a number") from None
    if math.isnan(value):
        raise ArpaFormatError(path, lineno, f"{what} is NaN; a log10 probability or backoff must be a number")
    if value == math.inf:
        raise ArpaFormatError(path, lineno, f"{what} is +inf; log10 values must be finite or -99 for zero")
    if value <= LOG10_ZERO:
        value = -math.inf
    return value


def read_arpa(path: str | os.PathLike) -> ArpaTables:
    """Parse an ARPA file (plain text, UTF-8).

    Raises :class:`ArpaFormatError` naming the line for: a missing ``\\data\\``
    header, a bad ``ngram k=count`` line, sections out of order, an entry with
    the wrong number of fields, a probability or backoff that is not a number
    (or NaN), a word missing from the unigram section, a duplicate n-gram, a
    section whose number of entries differs from the header, and a file that
    ends before ``\\end\\`` (truncated).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        # find the line of the bad byte
        data = path.read_bytes()
        line = data[: e.start].count(b"\n") + 1
        raise ArpaFormatError(path, line, f"not valid UTF-8 ({e.reason})") from None
    lines = text.split("\n")
    n_lines = len(lines)
    if lines and lines[-1] == "":
        n_lines -= 1  # trailing newline

    i = 0
    # -- header: skip anything before \data\ (SRILM and KenLM may write comments)
    while i < n_lines and lines[i].strip() != "\\data\\":
        i += 1
    if i == n_lines:
        raise ArpaFormatError(path, n_lines if n_lines else 1, "no \\data\\ header found; this is not an ARPA file")
    i += 1
    counts: list[int] = []
    while i < n_lines:
        s = lines[i].strip()
        if not s:
            i += 1
            if counts:
                break
            continue
        if not s.startswith("ngram "):
            if s.startswith("\\") and counts:
                break
            raise ArpaFormatError(path, i + 1, f"expected 'ngram K=COUNT' in the \\data\\ section, got {s[:60]!r}")
        try:
            lhs, rhs = s[6:].split("=")
            k, c = int(lhs), int(rhs)
        except ValueError:
            raise ArpaFormatError(path, i + 1, f"expected 'ngram K=COUNT' with integers, got {s[:60]!r}") from None
        if k != len(counts) + 1:
            raise ArpaFormatError(path, i + 1, f"expected 'ngram {len(counts) + 1}=...', got order {k}")
        if c < 0:
            raise ArpaFormatError(path, i + 1, f"negative n-gram count {c}")
        counts.append(c)
        i += 1
    if not counts:
        raise ArpaFormatError(path, i, "the \\data\\ section lists no 'ngram K=COUNT' lines")
    if counts[0] == 0:
        raise ArpaFormatError(path, i, "the model has no unigrams (ngram 1=0)")
    order = len(counts)

    vocab: list[str] = []
    index: dict[str, int] = {}
    ngrams: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    backoffs: list[np.ndarray] = []
    where: list[np.ndarray] = []

    for k in range(1, order + 1):
        # find the section header, skipping blank lines
        while i < n_lines and not lines[i].strip():
            i += 1
        if i >= n_lines:
            raise ArpaFormatError(path, n_lines, f"file ends before the \\{k}-grams: section (truncated?)")
        header = lines[i].strip()
        if header != f"\\{k}-grams:":
            raise ArpaFormatError(path, i + 1, f"expected '\\{k}-grams:', got {header[:60]!r}")
        i += 1
        count = counts[k - 1]
        has_backoff = k < order
        # unigrams (they define the vocabulary) and any doubtful section: line by line
        fast = _parse_section_fast(lines[i:i + count], k, count, has_backoff, index) if k > 1 else None
        if fast is not None:
            ids, pr, bo = fast
            ln = np.arange(i + 1, i + 1 + count, dtype=np.int64)
            i += count
        else:
            ids = np.empty((count, k), dtype=np.int64)
            pr = np.empty(count, dtype=np.float64)
            bo = np.zeros(count, dtype=np.float64)
            ln = np.empty(count, dtype=np.int64)
        for r in range(0 if fast is not None else count):
            if i >= n_lines:
                raise ArpaFormatError(
                    path, n_lines, f"file ends after {r} of the {count} {k}-grams the header announces (truncated?)"
                )
            raw = lines[i]
            fields = raw.split()
            if not fields or fields[0].startswith("\\"):
                raise ArpaFormatError(
                    path, i + 1, f"the \\{k}-grams: section has {r} entries, the header announces {count}"
                )
            nf = len(fields)
            if nf == k + 1:
                b = 0.0
            elif nf == k + 2 and has_backoff:
                b = _parse_float(fields[-1], path, i + 1, "backoff")
            else:
                expect = f"{k + 1} or {k + 2}" if has_backoff else f"{k + 1}"
                raise ArpaFormatError(
                    path, i + 1, f"a {k}-gram entry needs {expect} fields (log10 prob, {k} word(s)"
                    f"{', backoff' if has_backoff else ''}), got {nf}: {raw[:80]!r}"
                )
            p = _parse_float(fields[0], path, i + 1, "log10 probability")
            if k == 1:
                w = fields[1]
                if w in index:
                    raise ArpaFormatError(path, i + 1, f"duplicate unigram {w!r}")
                index[w] = len(vocab)
                vocab.append(w)
                ids[r, 0] = index[w]
            else:
                for j in range(k):
                    w = fields[1 + j]
                    wid = index.get(w)
                    if wid is None:
                        raise ArpaFormatError(path, i + 1, f"word {w!r} is not in the \\1-grams: section")
                    ids[r, j] = wid
            pr[r] = p
            bo[r] = b
            ln[r] = i + 1
            i += 1
        # the section must end here (blank line or next header / \end\)
        while i < n_lines and not lines[i].strip():
            i += 1
        if i < n_lines and not lines[i].strip().startswith("\\"):
            raise ArpaFormatError(
                path, i + 1, f"the \\{k}-grams: section has more entries than the {count} the header announces"
            )
        if k > 1 and count > 1:
            _check_duplicates(ids, ln, path, k)
        ngrams.append(ids)
        probs.append(pr)
        backoffs.append(bo)
        where.append(ln)

    while i < n_lines and not lines[i].strip():
        i += 1
    if i >= n_lines:
        raise ArpaFormatError(path, n_lines, "file ends without '\\end\\' (truncated?)")
    if lines[i].strip() != "\\end\\":
        raise ArpaFormatError(path, i + 1, f"expected '\\end\\', got {lines[i].strip()[:60]!r}")
    return ArpaTables(vocab, ngrams, probs, backoffs, where)


def _parse_section_fast(section: list[str], k: int, count: int, has_backoff: bool, index: dict):
    """Bulk parse of a well-formed section (every line: prob, k words and,
    below the highest order, a backoff). Returns None at the first doubt; the
    line-by-line parser then finds and names the bad line."""
    if len(section) != count:
        return None
    toks = "\n".join(section).split()
    if len(toks) != count * (k + 2):
        if has_backoff or len(toks) != count * (k + 1):
            return None
    width = len(toks) // count if count else k + 1
    cols = [toks[j::width] for j in range(width)]
    try:
        pr = np.array(cols[0], dtype=np.float64)
        bo = np.array(cols[k + 1], dtype=np.float64) if width == k + 2 else np.zeros(count)
        ids = np.empty((count, k), dtype=np.int64)
        for j in range(k):
            ids[:, j] = [index[w] for w in cols[1 + j]]
    except (ValueError, KeyError):
        return None
    if np.isnan(pr).any() or np.isnan(bo).any() or (pr == np.inf).any() or (bo == np.inf).any():
        return None
    pr[pr <= LOG10_ZERO] = -np.inf
    bo[bo <= LOG10_ZERO] = -np.inf
    return ids, pr, bo


def _check_duplicates(ids: np.ndarray, ln: np.ndarray, path, k: int) -> None:
    order = np.lexsort(ids.T[::-1])
    s = ids[order]
    same = np.all(s[1:] == s[:-1], axis=1)
    if same.any():
        j = int(np.flatnonzero(same)[0])
        a, b = sorted((int(ln[order[j]]), int(ln[order[j + 1]])))
        raise ArpaFormatError(path, b, f"duplicate {k}-gram (first given on line {a})")


def _format_values(values: np.ndarray) -> list[str]:
    v = np.asarray(values, dtype=np.float64)
    out = np.char.mod("%.9g", np.where(np.isneginf(v), LOG10_ZERO, v))
    return out.tolist()


def write_arpa(
    path: str | os.PathLike,
    vocab: Sequence[str],
    ngrams: Sequence[np.ndarray],
    probs: Sequence[np.ndarray],
    backoffs: Sequence[np.ndarray],
) -> None:
    """Write an ARPA file.

    ``ngrams[k]`` is an int array (count, k+1) of ids into ``vocab``;
    ``probs[k]``/``backoffs[k]`` are log10 values (``-inf`` is written as -99).
    Backoffs of the highest order are not written. Written atomically.
    """
    from lmlab.models.base import atomic_write_text

    vocab = list(vocab)
    for w in vocab:
        if not w or any(c.isspace() for c in w):
            raise ValueError(f"vocabulary entry {w!r} cannot be written to ARPA: words must be non-empty without whitespace")
    if len(set(vocab)) != len(vocab):
        seen: set[str] = set()
        dup = next(w for w in vocab if w in seen or seen.add(w))
        raise ValueError(f"vocabulary entry {dup!r} appears twice; ARPA words must be unique")
    words = np.array(vocab, dtype=object)
    order = len(ngrams)
    parts = ["\\data\\\n"]
    for k in range(order):
        parts.append(f"ngram {k + 1}={len(ngrams[k])}\n")
    parts.append("\n")
    for k in range(order):
        parts.append(f"\\{k + 1}-grams:\n")
        ids = np.asarray(ngrams[k])
        if len(ids):
            cols = [words[ids[:, j]] for j in range(k + 1)]
            if k == 0:
                text = cols[0].tolist()
            else:
                text = [" ".join(t) for t in zip(*(c.tolist() for c in cols))]
            ps = _format_values(probs[k])
            if k + 1 < order:
                bs = _format_values(backoffs[k])
                parts.append("".join(f"{p}\t{t}\t{b}\n" for p, t, b in zip(ps, text, bs)))
            else:
                parts.append("".join(f"{p}\t{t}\n" for p, t in zip(ps, text)))
        parts.append("\n")
    parts.append("\\end\\\n")
    atomic_write_text(Path(path), "".join(parts))
