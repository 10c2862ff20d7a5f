"""``digits-cnn``: scikit-learn's handwritten digits (real data, 1,797 8×8 images), a small CNN."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import slipstream.data as sd
from slipstream._core.config import DataConfig, ModelConfig
from slipstream._core.errors import ArgumentError
from slipstream._core.extras import require
from slipstream.train._metrics import accuracy
from slipstream.workloads._base import Data, Goal, Workload, feed

HELD_OUT = 0.2  # the test split: a fixed fifth of the samples, whatever the seed


class DigitsCNN(torch.nn.Sequential):
    """Two 3×3 convolutions (``width`` and 2×``width`` channels), a pooling, a linear layer."""

    def __init__(self, width: int = 16) -> None:
        super().__init__(
            torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(width, 2 * width, 3, padding=1), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Flatten(),
            torch.nn.Linear(2 * width * 16, 10),
        )  # fmt: skip


def arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and test images (N×1×8×8 in [0, 1]) and labels, split by a fixed permutation."""
    datasets = require("sklearn.datasets", feature="the digits-cnn workload")
    d = datasets.load_digits()
    x = (d.data / 16).astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(1234).permutation(len(y))
    cut = len(y) - int(len(y) * HELD_OUT)
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def model(config: ModelConfig) -> Any:
    return DigitsCNN(**config.args)


def data(config: DataConfig) -> Data:
    x, y, tx, ty = arrays()
    if config.size is not None:
        if config.size > len(y):
            raise ArgumentError(f"data.size = {config.size}: digits has {len(y)} training samples")
        x, y = x[: config.size], y[: config.size]
    train = feed(sd.from_arrays((x, y), name="digits"), config)
    return Data(train, sd.from_arrays((tx, ty), name="digits-test").batch(512))


WORKLOAD = Workload(
    name="digits-cnn",
    summary="scikit-learn's handwritten digits (real data), a small CNN",
    model=model,
    data=data,
    loss=torch.nn.functional.cross_entropy,
    metrics={"acc": accuracy},
    goal=Goal("val_acc", 0.97),
)
