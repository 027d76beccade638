import numpy as np
import pytest
import torch

from lmlab.data import (
    IGNORE,
    SequenceBatches,
    StreamBatches,
    bundled_corpus_path,
    load_ids,
    makemore_split,
    pad_sequences,
    read_corpus,
    save_ids,
    split_by_position,
)


def test_bundled_corpus_is_tiny_shakespeare():
    text = read_corpus()
    assert len(text) == 1_115_394 and text.startswith("First Citizen:")
    assert bundled_corpus_path().is_file()


def test_split_by_position_is_nanogpt_90_10():
    ids = np.arange(1000)
    train, val = split_by_position(ids)
    assert len(train) == 900 and train[-1] == 899 and val[0] == 900


def test_empty_and_missing_corpora_get_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(ValueError, match="empty"):
        read_corpus(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_corpus(tmp_path / "nope.txt")


def test_memmap_round_trip(tmp_path):
    ids = [0, 5, 65535, 7]
    mm = save_ids(ids, tmp_path / "ids.bin", vocab_size=65536)
    assert mm.dtype == np.uint16 and list(load_ids(tmp_path / "ids.bin", 65536)) == ids
    big = save_ids([70000, 1], tmp_path / "big.bin", vocab_size=80000)
    assert big.dtype == np.int32 and list(big) == [70000, 1]


def test_stream_windows_are_shifted_by_one_and_cover_the_stream():
    ids = np.arange(50, dtype=np.uint16)
    batches = StreamBatches(ids, block_size=8, batch_size=4)
    x, y = batches.sample(torch.Generator().manual_seed(0))
    assert x.shape == (4, 8) and torch.equal(y, x + 1)
    covered = torch.cat([x.flatten() for x, _ in batches.windows()])
    assert covered.tolist() == list(range(48))
    with pytest.raises(ValueError, match="fewer than block_size"):
        StreamBatches(ids[:5], block_size=8, batch_size=1)


def test_sequences_are_wrapped_in_bos_eos_and_padding_is_ignored():
    x, y = pad_sequences([[7, 8, 9], [5]], bos_id=1, eos_id=2, pad_id=0)
    assert x.tolist() == [[1, 7, 8, 9], [1, 5, 0, 0]]
    assert y.tolist() == [[7, 8, 9, 2], [5, 2, IGNORE, IGNORE]]
    batches = SequenceBatches([[7, 8, 9], [5]], batch_size=2, bos_id=1, eos_id=2, pad_id=0)
    assert batches.block_size == 4
    assert sum(int((y != IGNORE).sum()) for _, y in batches.windows()) == 6


def test_makemore_split_sizes_and_determinism():
    names = [f"n{i}" for i in range(32032)]
    train, test = makemore_split(names)
    assert len(test) == 1000 and len(train) == 31032
    assert makemore_split(names)[1] == test
    assert set(train).isdisjoint(test)
