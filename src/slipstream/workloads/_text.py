"""``text-clf``: topic classification of generated documents, with a tokenizer stage in the
pipeline and an embedding-bag model.

The corpus is made of pronounceable made-up words: each of four topics has its own words, mixed
into documents of common words (and a few of another topic's), so a bag of words decides the
topic but no single word does. The tokenizer lowercases, splits on letters and hashes each word
(CRC-32, the same in every process) into a fixed number of buckets.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

import slipstream.data as sd
from slipstream._core.config import DataConfig, ModelConfig
from slipstream.train._metrics import accuracy
from slipstream.workloads._base import Data, Goal, Workload, feed, generated_shards, write_parquet

TOPICS = 4
BUCKETS = 1 << 15
SIZE = 40_000  # training documents by default; the test set is a tenth of that
SHARD = 10_000
_WORD = re.compile(r"[a-z]+")


class BagOfWords(torch.nn.Module):
    """An ``EmbeddingBag`` (mean of word vectors) and a linear layer; takes ``(ids, offsets)``."""

    def __init__(self, dim: int = 64, buckets: int = BUCKETS, classes: int = TOPICS) -> None:
        super().__init__()
        self.bag = torch.nn.EmbeddingBag(buckets, dim, mode="mean")
        self.out = torch.nn.Linear(dim, classes)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, offsets = inputs
        return self.out(self.bag(ids, offsets))  # type: ignore[no-any-return]


def tokenize(row: dict[str, Any]) -> tuple[np.ndarray, int]:
    """A document's hashed word ids, and its label."""
    words = _WORD.findall(row["text"].lower())
    ids = np.fromiter((zlib.crc32(w.encode()) % BUCKETS for w in words), np.int64, len(words))
    return ids, int(row["label"])


def collate(samples: list[tuple[np.ndarray, int]]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Ragged documents as one flat id tensor with offsets (what ``EmbeddingBag`` takes)."""
    lengths = [len(ids) for ids, _ in samples]
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64))
    ids = torch.from_numpy(np.concatenate([ids for ids, _ in samples]))
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return (ids, offsets), labels


def _words(rng: np.random.Generator, n: int) -> list[str]:
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    return ["".join(rng.choice(syllables, rng.integers(2, 4))) for _ in range(n)]


COMMON, TOPICAL = 600, 80  # words shared by all topics; words of each topic


def generate(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    """``n`` documents and their topics (the vocabulary is fixed; ``seed`` draws documents).

    A word is one of its document's topic's words with probability 0.25, one of another
    (random) topic's with 0.05, else a common word.
    """
    vocab_rng = np.random.default_rng(0)
    vocab = np.array(_words(vocab_rng, COMMON + TOPICS * TOPICAL))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, TOPICS, n)
    others = rng.integers(0, TOPICS, n)
    lengths = rng.integers(12, 48, n)
    doc = np.repeat(np.arange(n), lengths)
    draw = rng.random(len(doc))
    pick = rng.integers(0, TOPICAL, len(doc))
    index = np.where(
        draw < 0.25,
        COMMON + labels[doc] * TOPICAL + pick,
        np.where(
            draw < 0.3, COMMON + others[doc] * TOPICAL + pick, rng.integers(0, COMMON, len(doc))
        ),
    )
    words = np.split(vocab[index], np.cumsum(lengths)[:-1])
    docs = [" ".join(w).capitalize() + "." for w in words]
    return docs, labels.astype(np.int64)


def _write(path: Path, n: int, seed: int) -> None:
    docs, labels = generate(n, seed)
    write_parquet(path, {"text": docs, "label": labels}, row_group=1000)


def model(config: ModelConfig) -> Any:
    return BagOfWords(**config.args)


def data(config: DataConfig) -> Data:
    n = config.size or SIZE
    root = generated_shards(config, "text-clf", n, SHARD, max(1000, n // 10), _write)
    train = feed(sd.from_parquet(str(root / "train-*.parquet")), config, tokenize, collate=collate)
    val = sd.from_parquet(str(root / "test.parquet")).map(tokenize).batch(1000, collate=collate)
    return Data(train, val)


WORKLOAD = Workload(
    name="text-clf",
    summary="topic classification of generated text: a tokenizer stage, an embedding bag",
    model=model,
    data=data,
    loss=torch.nn.functional.cross_entropy,
    metrics={"acc": accuracy},
    goal=Goal("val_acc", 0.9),
)
