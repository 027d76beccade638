"""Small models with known distributions, shared by the tests."""

from dataclasses import dataclass

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run: a red CI always means a real regression.
settings.register_profile("lmlab", derandomize=True, deadline=None)
settings.load_profile("lmlab")

from lmlab.models.base import LanguageModel, State


@dataclass
class TableConfig:
    vocab_size: int


class BigramTable(LanguageModel):
    """P(x_t | x_{t-1}) = softmax(table[x_{t-1}]); state = the last token. Unbounded context."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.config = TableConfig(table.shape[0])
        self.register_buffer("table", table.float())

    def forward(self, ids, state=None):
        logits = self.table[ids]
        return logits, State({"last": ids[:, -1:]}, (state.length if state else 0) + ids.shape[1])


def save_tiny_hf_bert(directory, words: list[str]) -> None:
    """Write a randomly initialised 2-layer, 16-wide ``BertForMaskedLM`` (seed 0) and a
    WordPiece tokenizer over ``words`` (ids in list order) to ``directory``."""
    transformers = pytest.importorskip("transformers")
    transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    transformers.BertForMaskedLM(config).save_pretrained(directory)


@pytest.fixture
def bigram_table():
    g = torch.Generator().manual_seed(0)
    return BigramTable(torch.randn(6, 6, generator=g) * 2)


def pytest_configure(config):
    # Tiny tensors: one intra-op thread is faster and keeps timings stable on shared machines.
    torch.set_num_threads(1)
