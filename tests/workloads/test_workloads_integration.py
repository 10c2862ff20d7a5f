"""Each built-in workload reaches its stated quality (at small sizes here; full sizes in
``slipstream train NAME``), through the same path as ``slipstream train``."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import slipstream as ss
from slipstream._core.config import ConfigError, DataConfig, parse
from slipstream.workloads import Data
from slipstream.workloads._build import load_config, train
from slipstream.workloads._digits import arrays
from slipstream.workloads._images import read_cifar10

# scikit-learn and Keras set environment variables of their own when first imported
pytestmark = pytest.mark.usefixtures("framework_env")

# name -> overrides that make it small; the stated goal must still be reached
SMALL = {
    "digits-cnn": [],  # its full size: 15 epochs of 1,437 images
    "mlp-784": ["data.size=6000", "train.epochs=4"],
    "text-clf": ["data.size=4000", "train.epochs=4"],
    "sequence-lstm": ["data.size=4000", "train.epochs=5", "data.batch=32", "train.lr=0.005"],
    "images-cnn": ["data.size=2000", "train.epochs=3", "data.batch=64"],
}


def run(tmp_path: Path, name: str, *extra: str) -> ss.History:
    overrides = [
        *SMALL[name],
        *extra,
        f"run={tmp_path / 'run'}",
        f"data.root={tmp_path / 'data'}",
        "live.console=false",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a workload trains without a single warning
        outcome = train(load_config(name, overrides), say=lambda _: None)
    assert outcome.goal is not None
    assert outcome.goal_met, f"{name}: {outcome.goal} not reached: {outcome.final}"
    assert (tmp_path / "run" / "config.toml").exists()
    return outcome.history


@pytest.mark.parametrize("name", sorted(SMALL))
def test_each_workload_reaches_its_stated_quality(tmp_path: Path, name: str) -> None:
    run(tmp_path, name)


def test_sequence_lstm_in_keras_reaches_the_same_goal(tmp_path: Path) -> None:
    history = run(tmp_path, "sequence-lstm", "model.backend=keras")
    assert history.config["model"] == "Sequential"


def test_images_from_tar_shards_and_a_dataset_is_written_once(tmp_path: Path) -> None:
    run(tmp_path, "images-cnn", "data.format=tar")
    shards = sorted((tmp_path / "data" / "images-cnn").glob("train-*.tar"))
    assert shards
    stamp = shards[0].stat().st_mtime_ns
    run(tmp_path, "images-cnn", "data.format=tar")
    assert shards[0].stat().st_mtime_ns == stamp  # found, not rewritten


def _cifar_batch(path: Path, n: int, seed: int) -> None:
    """A file in CIFAR-10's Python format: images whose strongest channel is the label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 180, (n, 3, 32, 32), dtype=np.uint8)
    images[np.arange(n), labels] += 60
    with open(path, "wb") as f:
        pickle.dump({b"data": images.reshape(n, -1), b"labels": labels.tolist()}, f)


def test_a_users_cifar10_directory_is_read_instead(tmp_path: Path) -> None:
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for i in range(1, 6):
        _cifar_batch(cifar / f"data_batch_{i}", 300, i)
    _cifar_batch(cifar / "test_batch", 300, 0)
    images, labels = read_cifar10(cifar / "test_batch")
    assert images.shape == (300, 32, 32, 3) and labels.shape == (300,)
    run(tmp_path, "images-cnn", f"data.args={{cifar10 = '{cifar}'}}", "train.epochs=2")


def test_a_cifar_file_that_is_not_one_is_refused_unexecuted(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(ss.CorruptDataError, match=r"not a CIFAR-10 Python batch: builtins.print"):
        read_cifar10(path)


def tiny(width: int = 8) -> torch.nn.Module:
    """A model factory of the user's own (``[model] name = "module:tiny"``)."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, width), torch.nn.ReLU(),
                               torch.nn.Linear(width, 10))  # fmt: skip


def digits_data(config: DataConfig) -> Data:
    """A data factory of the user's own (``[data] name = "module:digits_data"``)."""
    x, y, tx, ty = arrays()
    return Data(ss.from_arrays((x, y)).shuffle(seed=config.seed).batch(config.batch),
                ss.from_arrays((tx, ty)).batch(256))  # fmt: skip


def not_data(config: DataConfig) -> int:
    return 3


def test_your_own_model_and_data_factories(tmp_path: Path) -> None:
    here = "tests.workloads.test_workloads_integration"
    table = {
        "run": str(tmp_path / "run"),
        "model": {"name": f"{here}:tiny", "args": {"width": 32}},
        "data": {"name": f"{here}:digits_data", "batch": 32},
        "train": {"loss": "cross_entropy", "epochs": 3, "lr": 0.01},
        "live": {"console": False},
    }
    outcome = train(parse(table), say=lambda _: None)
    assert outcome.goal is None and outcome.goal_met is None  # no stated quality: not a workload
    assert outcome.final["val_acc"] > 0.8  # cross-entropy and accuracy, as train.loss said
    with pytest.raises(ConfigError, match="returned int; a data factory returns"):
        train(parse({**table, "data": {"name": f"{here}:not_data"}}), say=lambda _: None)
    with pytest.raises(ConfigError, match=r"cannot import nothing from tests\.workloads"):
        train(parse({**table, "model": {"name": f"{here}:nothing"}}), say=lambda _: None)
