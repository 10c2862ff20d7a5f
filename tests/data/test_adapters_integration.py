"""The same pipeline feeding Lightning's Trainer.fit and Keras's model.fit, on real digits."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import slipstream as ss

pytestmark = pytest.mark.integration


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return xtr, xte, ytr.astype(np.int64), yte.astype(np.int64)


def as_pair(sample: dict[str, Any]) -> tuple[Any, Any]:
    return sample["x"], sample["y"]


def test_lightning_trains_to_95_percent_from_a_pipeline(
    tmp_path: Path, framework_env: None
) -> None:
    import lightning as L

    xtr, xte, ytr, yte = digits()
    torch.manual_seed(0)

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
            )

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=3e-3)

    pipe = (
        ss.from_arrays({"x": xtr, "y": ytr})
        .shuffle(seed=0)
        .map(as_pair, workers=0)
        .batch(64)
        .to_device("cpu")
    )
    model = Net()
    trainer = L.Trainer(
        max_epochs=15,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, train_dataloaders=pipe.as_torch())
    with torch.no_grad():
        acc = (model.net(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean()
    assert acc >= 0.95, acc
    assert pipe.epoch == 15  # Lightning stops after len(pipe) batches; each epoch still ended


def test_dataloader_workers_are_refused_with_a_reason() -> None:
    ds = ss.from_arrays(np.arange(8)).batch(2).as_torch()
    assert [b.tolist() for b in torch.utils.data.DataLoader(ds, batch_size=None)] == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
    ]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1)
    with pytest.raises(Exception, match="runs its own workers") as info:
        list(loader)
    del info  # its traceback holds DataLoader's worker; let it go now


def test_keras_fit_trains_to_95_percent_from_a_pipeline(framework_env: None) -> None:
    assert os.environ["KERAS_BACKEND"] == "torch"
    import keras

    xtr, xte, ytr, yte = digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    train = ss.from_arrays({"x": xtr, "y": ytr}).shuffle(seed=0).map(as_pair, workers=0).batch(64)
    val = ss.from_arrays({"x": xte, "y": yte}).map(as_pair, workers=0).batch(256)
    history = model.fit(train.as_keras(), validation_data=val.as_keras(), epochs=15, verbose=0)
    assert history.history["val_accuracy"][-1] >= 0.95, history.history["val_accuracy"]
    assert train.epoch == 15
