"""Compiled Keras 3 models (torch backend) trained by every strategy with their compiled loss,
metrics and optimizer: a CNN on digits and an LSTM regressor on generated sequences."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import slipstream as ss
from tests.train.helpers import pipes

keras = pytest.importorskip("keras")
pytestmark = pytest.mark.integration

STRATEGIES = ["single", "ddp", "hogwild", "localsgd"]


def keras_cnn() -> Any:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((1, 8, 8)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu", data_format="channels_first"),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])  # fmt: skip
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_compiled_keras_cnn_learns_digits(strategy: str) -> None:
    model = keras_cnn()
    workers = None if strategy == "single" else 2
    t = ss.Trainer(model, strategy=strategy, workers=workers)
    train, test = pipes()
    history = t.fit(train, val=test, epochs=4)
    assert history["val_accuracy"][-1] > 0.85, history.epochs
    x, y = next(iter(pipes()[1]))
    assert float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y)) > 0.85


def sequences(n: int, seed: int) -> ss.Pipeline:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 12, 1)).astype(np.float32)
    y = x.sum(axis=(1, 2)).astype(np.float32)[:, None] / 4  # the scaled sum of the sequence
    return ss.from_arrays((x, y)).shuffle(seed=seed).batch(32)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_keras_lstm_regressor_reaches_its_loss(strategy: str) -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12, 1)), keras.layers.LSTM(16), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", metrics=["mae"])
    workers = None if strategy == "single" else 2
    t = ss.Trainer(model, strategy=strategy, workers=workers)
    history = t.fit(sequences(1024, 0), val=sequences(256, 1), epochs=6)
    assert history["val_loss"][-1] < 0.02, history.epochs  # predicting the mean gives 0.083


def test_torch_loss_and_metrics_with_a_keras_model() -> None:
    import torch

    t = ss.Trainer(
        keras_cnn(),
        optimizer=lambda p: torch.optim.Adam(p, lr=2e-3),
        loss=torch.nn.functional.cross_entropy,
        metrics={"acc": ss.metrics.accuracy},
    )
    history = t.fit(pipes()[0], val=pipes()[1], epochs=3)
    assert history["val_acc"][-1] > 0.85
