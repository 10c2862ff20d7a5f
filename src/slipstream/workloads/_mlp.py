"""``mlp-784``: the 784-input, 10-class MLP scenario, on a generated dataset written as Parquet.

Each class is a Gaussian (unit noise) around its own centre in 784 dimensions, passed through a
fixed random rotation and a ``tanh``: the classes overlap a little, the boundary is not linear.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

import slipstream.data as sd
from slipstream._core.config import DataConfig, ModelConfig
from slipstream._core.extras import require
from slipstream.train._metrics import accuracy
from slipstream.workloads._base import Data, Goal, Workload, feed, generated_shards, write_parquet

FEATURES, CLASSES = 784, 10
SIZE = 60_000  # training samples by default; the test set is a sixth of that
SHARD = 8192
SPREAD = 0.14  # the class centres' scale against unit noise: how much classes overlap


class MLP784(torch.nn.Sequential):
    def __init__(self, hidden: int = 256) -> None:
        super().__init__(
            torch.nn.Linear(FEATURES, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, CLASSES),
        )  # fmt: skip


def generate(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of the task (the task itself is fixed; ``seed`` draws the samples)."""
    task = np.random.default_rng(0)
    centres = task.normal(0, SPREAD, (CLASSES, FEATURES)).astype(np.float32)
    rotation = np.linalg.qr(task.normal(size=(FEATURES, FEATURES)))[0].astype(np.float32)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = centres[y] + rng.normal(0, 1, (n, FEATURES)).astype(np.float32)
    return np.tanh(x @ rotation).astype(np.float32), y.astype(np.int64)


def _write(path: Path, n: int, seed: int) -> None:
    pa = require("pyarrow", feature="the mlp-784 workload")
    x, y = generate(n, seed)
    column = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), FEATURES)
    write_parquet(path, {"x": column, "y": y}, row_group=1024)


def model(config: ModelConfig) -> Any:
    return MLP784(**config.args)


def data(config: DataConfig) -> Data:
    n = config.size or SIZE
    root = generated_shards(config, "mlp-784", n, SHARD, max(1024, n // 6), _write)
    train = feed(sd.from_parquet(str(root / "train-*.parquet")), config)
    return Data(train, sd.from_parquet(str(root / "test.parquet")).batch(1024))


WORKLOAD = Workload(
    name="mlp-784",
    summary="a 784-input, 10-class MLP on generated data in Parquet shards",
    model=model,
    data=data,
    loss=torch.nn.functional.cross_entropy,
    metrics={"acc": accuracy},
    goal=Goal("val_acc", 0.9),
)
