"""``sequence-lstm``: an LSTM regressor on generated sequences (the Keras LSTM scenario), as a
PyTorch model or, with ``[model] backend = "keras"``, a Keras 3 model on the torch backend.

Each sample is a window of ``LENGTH`` steps of a noisy sum of two sines (random frequency and
phases); the target is the next value. Stored as ``.npy`` files, read memory-mapped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import slipstream.data as sd
from slipstream._core.config import DataConfig, ModelConfig
from slipstream._core.extras import require
from slipstream.train._metrics import mae
from slipstream.workloads._base import Data, Goal, Workload, dataset_dir, feed, finish_dataset

LENGTH = 40
SIZE = 20_000  # training windows by default; the test set is a fifth of that
NOISE = 0.05  # the noise's standard deviation: an MSE of NOISE**2 is the floor


class SequenceLSTM(torch.nn.Module):
    """One LSTM layer over the window; a linear head on its last output."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(1, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])  # type: ignore[no-any-return]


def keras_lstm(hidden: int = 32) -> Any:
    """The same model in Keras 3, compiled with its loss and metric (the optimizer is the one
    ``[train]`` names, as for the PyTorch model)."""
    keras = require("keras", feature="sequence-lstm with backend = 'keras'")
    model = keras.Sequential(
        [keras.Input((LENGTH, 1)), keras.layers.LSTM(hidden), keras.layers.Dense(1)]
    )
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    return model


def generate(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` windows (n×LENGTH×1) and the value that follows each (n×1)."""
    rng = np.random.default_rng(seed)
    t = np.arange(LENGTH + 1, dtype=np.float32)
    freq = rng.uniform(0.1, 0.4, (n, 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, (n, 2)).astype(np.float32)
    wave = np.sin(freq * t + phase[:, :1]) + 0.5 * np.sin(2.3 * freq * t + phase[:, 1:])
    wave += rng.normal(0, NOISE, wave.shape).astype(np.float32)
    wave = wave.astype(np.float32)
    return wave[:, :LENGTH, None].copy(), wave[:, LENGTH:].copy()


def model(config: ModelConfig) -> Any:
    return keras_lstm(**config.args) if config.backend == "keras" else SequenceLSTM(**config.args)


def data(config: DataConfig) -> Data:
    n = config.size or SIZE
    recipe = {"size": n, "version": 1}
    root, fresh = dataset_dir(config, "sequence-lstm", recipe)
    if fresh:
        for split, size, seed in (("train", n, 1), ("test", max(1000, n // 5), 0)):
            x, y = generate(size, seed)
            np.save(root / f"{split}-x.npy", x)
            np.save(root / f"{split}-y.npy", y)
        finish_dataset(root, recipe)

    def files(split: str) -> tuple[str, str]:
        return str(root / f"{split}-x.npy"), str(root / f"{split}-y.npy")

    train = feed(sd.from_numpy(files("train")), config)
    return Data(train, sd.from_numpy(files("test")).batch(1000))


WORKLOAD = Workload(
    name="sequence-lstm",
    summary="an LSTM regressor on generated sequences, in PyTorch or Keras 3",
    model=model,
    data=data,
    loss=torch.nn.functional.mse_loss,
    metrics={"mae": mae},
    goal=Goal("val_loss", 0.02, higher=False),
)
