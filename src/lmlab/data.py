"""Corpora, splits, memmapped token ids, and the two batchers.

- ``StreamBatches``: random contiguous windows of one token stream (Shakespeare, PTB).
- ``SequenceBatches``: complete sequences, one per line, wrapped in
  ``<bos> ... <eos>`` and right-padded; padded targets are ``IGNORE`` (-100) so
  no loss or perplexity ever counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from lmlab.tokenizers import ASCII_WHITESPACE

IGNORE = -100  # target id that losses skip (torch's cross_entropy ignore_index)


def bundled_corpus_path() -> Path:
    """Path of the corpus shipped inside the package (tiny Shakespeare)."""
    return Path(str(files("lmlab") / "corpora" / "tinyshakespeare.txt"))


def read_text(path: str | Path, what: str = "text file") -> str:
    """Text of the UTF-8 file ``path``; bytes that are not UTF-8 are an error naming the file
    (as ``what``, e.g. "corpus") and the byte offset."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{what} {str(path)!r} is not UTF-8: byte {e.start} (0x{data[e.start]:02x}) {e.reason}; "
            "accepted: UTF-8 text (convert it, e.g. with iconv -f latin1 -t utf-8)"
        ) from None


def read_corpus(path: str | Path | None = None) -> str:
    """Text of ``path`` (UTF-8), or of the bundled corpus when ``path`` is None."""
    path = bundled_corpus_path() if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus {str(path)!r} does not exist; give a UTF-8 text file (or no path for the bundled corpus)")
    if path.is_dir():
        raise IsADirectoryError(f"corpus {str(path)!r} is a directory; give a UTF-8 text file")
    text = read_text(path, "corpus")
    if not text.strip():
        raise ValueError(f"corpus {str(path)!r} is empty; it needs at least one non-blank line of text")
    return text


def read_lines(path: str | Path) -> list[str]:
    """Non-blank lines of a text file, one complete sequence each: lines end at
    ``\\n`` only and lose their surrounding ASCII whitespace (KenLM's reading;
    U+00A0 and other Unicode spaces are text)."""
    lines = [line.strip(ASCII_WHITESPACE) for line in read_corpus(path).split("\n")]
    return [line for line in lines if line]


def read_jsonl(path: str | Path, expected: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines file. A line that is
    not JSON, or not a JSON object, is an error naming the file, the line and ``expected``
    (what an object should hold, e.g. "an object with 'text'")."""
    import json

    path = Path(path)
    out = []
    for number, line in enumerate(read_text(path, "JSON-lines file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number} is not valid JSON ({e.msg}): {line[:80]!r}; expected {expected}") from None
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{number} is a JSON {type(item).__name__}; expected {expected}")
        out.append((number, item))
    return out


def read_prompt_file(path: str | Path, extra: str) -> tuple[list[str], list[str | None]]:
    """(prompts, extras) from a prompt file: one prompt per line (blank lines skipped), or
    JSONL (a ``.jsonl`` file, or one whose first line is a JSON object) with a ``"prompt"``
    string and an optional string field ``extra`` (e.g. ``"target"``, ``"reference"``) per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {str(path)!r} does not exist; give a text file (one prompt per line) or JSONL"
        )
    lines = read_text(path, "prompt file").splitlines()
    first = next((line for line in lines if line.strip()), "")
    jsonl = path.suffix == ".jsonl" or first.lstrip().startswith("{")
    prompts: list[str] = [] if jsonl else [line for line in lines if line.strip()]
    extras: list[str | None] = [None] * len(prompts)
    for number, item in read_jsonl(path, 'an object with a "prompt" string') if jsonl else ():
        if not isinstance(item.get("prompt"), str):
            raise ValueError(f"{path}:{number} needs a JSON object with a \"prompt\" string, got {str(item)[:80]!r}")
        if not item["prompt"]:
            raise ValueError(f"{path}:{number} has an empty \"prompt\"; every prompt needs some text")
        value = item.get(extra)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{path}:{number}: \"{extra}\" must be a string, got {value!r}")
        prompts.append(item["prompt"])
        extras.append(value)
    if not prompts:
        raise ValueError(
            f"prompt file {str(path)!r} holds no prompts; write one prompt per line, "
            "or JSONL lines such as {\"prompt\": \"ROMEO:\"}"
        )
    return prompts, extras


def split_by_position(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """First (1 - val_fraction) of the stream for training, the rest for validation (as nanoGPT)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    n = int(len(ids) * (1 - val_fraction))
    return ids[:n], ids[n:]


def makemore_split(items: Sequence, seed: int = 3407) -> tuple[list, list]:
    """makemore's split: test = min(1000, 10%) of items by a seeded permutation; (train, test)."""
    test_size = min(1000, int(len(items) * 0.1))
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in perm[:-test_size]], [items[i] for i in perm[-test_size:]]


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def save_ids(ids: Sequence[int] | np.ndarray, path: str | Path, vocab_size: int) -> np.memmap:
    """Write token ids as a flat binary file (uint16 or int32) and return a read-only memmap."""
    path = Path(path)
    arr = np.asarray(ids, dtype=ids_dtype(vocab_size))
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    arr.tofile(tmp)
    tmp.replace(path)
    return load_ids(path, vocab_size)


def load_ids(path: str | Path, vocab_size: int) -> np.memmap:
    return np.memmap(path, dtype=ids_dtype(vocab_size), mode="r")


@dataclass
class StreamBatches:
    """Random windows of a token stream: ``sample()`` -> x, y of shape (B, T), y = x shifted by one."""

    ids: np.ndarray
    block_size: int
    batch_size: int

    def __post_init__(self) -> None:
        if len(self.ids) < self.block_size + 1:
            raise ValueError(
                f"the stream has {len(self.ids)} tokens, fewer than block_size + 1 = {self.block_size + 1}; "
                "use a smaller block_size or a longer corpus"
            )

    def sample(self, generator: torch.Generator, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.ids) - self.block_size, (self.batch_size,), generator=generator).numpy()
        window = np.stack([np.asarray(self.ids[s : s + self.block_size + 1], dtype=np.int64) for s in starts])
        w = torch.from_numpy(window)
        x, y = w[:, :-1], w[:, 1:]
        if torch.device(device).type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def windows(self, device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every disjoint window once, in order, in batches (for an exact evaluation)."""
        n = (len(self.ids) - 1) // self.block_size
        for b in range(0, n, self.batch_size):
            starts = range(b * self.block_size, min(n, b + self.batch_size) * self.block_size, self.block_size)
            window = np.stack([np.asarray(self.ids[s : s + self.block_size + 1], dtype=np.int64) for s in starts])
            w = torch.from_numpy(window).to(device)
            yield w[:, :-1], w[:, 1:]


def pad_sequences(
    sequences: Sequence[Sequence[int]], bos_id: int, eos_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wrap each sequence as x = <bos> s, y = s <eos>; right-pad x with pad_id and y with IGNORE.

    Returns x, y of shape (B, L) with L = 1 + the longest sequence.
    """
    L = 1 + max(len(s) for s in sequences)
    x = torch.full((len(sequences), L), pad_id, dtype=torch.long)
    y = torch.full((len(sequences), L), IGNORE, dtype=torch.long)
    for i, s in enumerate(sequences):
        s = torch.as_tensor(list(s), dtype=torch.long)
        x[i, 0] = bos_id
        x[i, 1 : 1 + len(s)] = s
        y[i, : len(s)] = s
        y[i, len(s)] = eos_id
    return x, y


@dataclass
class SequenceBatches:
    """Complete sequences (lists of ids) in padded batches; padding is never a target."""

    sequences: list[list[int]]
    batch_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def __post_init__(self) -> None:
        if not self.sequences:
            raise ValueError("no sequences: the file has no non-empty lines")

    @property
    def block_size(self) -> int:
        return 1 + max(len(s) for s in self.sequences)

    def sample(self, generator: torch.Generator, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.randint(len(self.sequences), (self.batch_size,), generator=generator).tolist()
        x, y = pad_sequences([self.sequences[i] for i in rows], self.bos_id, self.eos_id, self.pad_id)
        return x.to(device), y.to(device)

    def windows(self, device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every sequence once, in order, in batches."""
        for b in range(0, len(self.sequences), self.batch_size):
            x, y = pad_sequences(self.sequences[b : b + self.batch_size], self.bos_id, self.eos_id, self.pad_id)
            yield x.to(device), y.to(device)
