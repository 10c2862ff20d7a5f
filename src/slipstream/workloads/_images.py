"""``images-cnn``: a CIFAR-style CNN on 32×32×3 JPEG images in Parquet or tar shards.

The generated images are smooth random colour fields 48 pixels wide whose label (one of three)
is the channel made a little stronger; training crops 32×32 at random and flips. A user's own
CIFAR-10 (the Python format: ``data_batch_1`` … ``test_batch``) is read instead when
``[data] args = {cifar10 = "DIR"}``: its images are written once as JPEG shards the same way.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import slipstream.data as sd
from slipstream._core.config import DataConfig, ModelConfig
from slipstream._core.errors import ArgumentError, CorruptDataError
from slipstream._core.extras import require
from slipstream.data import sample_rng
from slipstream.train._metrics import accuracy
from slipstream.workloads._base import (
    Data,
    Goal,
    Workload,
    dataset_dir,
    feed,
    finish_dataset,
    write_parquet,
)

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SIZE = 50_000  # generated training images by default (about 100 MB of JPEG)
SHARD = 5_000
FORMATS = ("parquet", "tar")


def generate(n: int, seed: int, size: int = 48) -> Iterator[tuple[bytes, int]]:
    """``n`` JPEG images (bytes) and labels: smooth colour fields, the label's channel stronger."""
    image = require("PIL.Image", feature="the images-cnn workload")
    rng = np.random.default_rng(seed)
    for _ in range(n):
        small = rng.integers(0, 200, (size // 8, size // 8, 3), dtype=np.uint8)
        label = int(rng.integers(0, 3))
        small[..., label] += 30
        yield _jpeg(image.fromarray(small).resize((size, size), image.BICUBIC)), label


def _jpeg(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _parquet(path: Path, rows: list[tuple[bytes, int]]) -> None:
    columns = {"image": [r[0] for r in rows], "label": [r[1] for r in rows]}
    write_parquet(path, columns, row_group=256)


def _tar(path: Path, rows: list[tuple[bytes, int]], first: int) -> None:
    """A WebDataset shard: ``<key>.jpg`` and ``<key>.cls`` per sample."""
    with tarfile.open(path, "w") as tar:
        for i, (jpg, label) in enumerate(rows):
            for ext, payload in (("jpg", jpg), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{first + i:08d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _fields(sample: dict[str, Any]) -> tuple[bytes, int]:
    """JPEG bytes and label of a Parquet row or a tar sample."""
    if "jpg" in sample:
        return sample["jpg"], int(sample["cls"])
    return sample["image"], int(sample["label"])


def decode_augment(sample: dict[str, Any]) -> tuple[np.ndarray, int]:
    """JPEG → random 32×32 crop, random flip, normalised CHW float32 (per-sample randomness)."""
    image = require("PIL.Image", feature="decoding images")
    rng = sample_rng()
    jpg, label = _fields(sample)
    img = image.open(io.BytesIO(jpg)).convert("RGB")
    w, h = img.size
    x0, y0 = int(rng.integers(0, w - 31)), int(rng.integers(0, h - 31))
    x = np.asarray(img.crop((x0, y0, x0 + 32, y0 + 32)), dtype=np.float32) / 255
    if rng.random() < 0.5:
        x = x[:, ::-1]
    return _normalised(x), label


def decode_center(sample: dict[str, Any]) -> tuple[np.ndarray, int]:
    """JPEG → the central 32×32, normalised CHW float32 (evaluation)."""
    image = require("PIL.Image", feature="decoding images")
    jpg, label = _fields(sample)
    img = image.open(io.BytesIO(jpg)).convert("RGB")
    x0, y0 = (img.size[0] - 32) // 2, (img.size[1] - 32) // 2
    x = np.asarray(img.crop((x0, y0, x0 + 32, y0 + 32)), dtype=np.float32) / 255
    return _normalised(x), label


def _normalised(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(((x - MEAN) / STD).transpose(2, 0, 1))


class ImagesCNN(torch.nn.Sequential):
    """Three 3×3 convolution blocks (``width``, 2×, 4× channels) with pooling, a linear head."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        def block(cin: int, cout: int) -> list[torch.nn.Module]:
            return [
                torch.nn.Conv2d(cin, cout, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
            ]

        super().__init__(
            *block(3, width), *block(width, 2 * width), *block(2 * width, 4 * width),
            torch.nn.Flatten(), torch.nn.Linear(4 * width * 16, classes),
        )  # fmt: skip


class _ArraysOnly(pickle.Unpickler):
    """CIFAR-10's Python batches are pickles of a dict of numpy arrays: allow only that."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR-10 batch")
        return super().find_class(module, name)


def read_cifar10(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N×32×32×3 uint8) and labels of one CIFAR-10 Python batch file."""
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="bytes").load()
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
        raise CorruptDataError(f"{path} is not a CIFAR-10 Python batch: {e}") from e
    return images.transpose(0, 2, 3, 1), labels


def _cifar_rows(directory: Path, split: str) -> list[tuple[bytes, int]]:
    image = require("PIL.Image", feature="the images-cnn workload")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (directory / n).exists()]
    if missing:
        raise ArgumentError(
            f"data.args.cifar10 = {str(directory)!r}: no {missing[0]} there; point it at the "
            "extracted cifar-10-batches-py directory"
        )
    rows = []
    for name in names:
        images, labels = read_cifar10(directory / name)
        rows += [(_jpeg(image.fromarray(x)), int(y)) for x, y in zip(images, labels, strict=True)]
    return rows


def _write(config: DataConfig, root: Path, fmt: str, n: int) -> None:
    cifar = config.args.get("cifar10")
    if cifar is not None:
        train, test = _cifar_rows(Path(cifar), "train"), _cifar_rows(Path(cifar), "test")
    else:
        train, test = list(generate(n, seed=1)), list(generate(max(1000, n // 10), seed=0))
    for s, start in enumerate(range(0, len(train), SHARD)):
        rows = train[start : start + SHARD]
        if fmt == "tar":
            _tar(root / f"train-{s:03d}.tar", rows, start)
        else:
            _parquet(root / f"train-{s:03d}.parquet", rows)
    _parquet(root / "test.parquet", test)


def model(config: ModelConfig) -> Any:
    return ImagesCNN(**config.args)


def data(config: DataConfig) -> Data:
    fmt = config.format or "parquet"
    if fmt not in FORMATS:
        raise ArgumentError(f"data.format = {fmt!r}: images-cnn stores 'parquet' or 'tar' shards")
    unknown = set(config.args) - {"cifar10"}
    if unknown:
        raise ArgumentError(f"data.args: images-cnn takes only 'cifar10'; got {sorted(unknown)}")
    n = config.size or SIZE
    recipe = {"size": n, "format": fmt, "cifar10": config.args.get("cifar10"), "version": 1}
    root, fresh = dataset_dir(config, "images-cnn", recipe)
    if fresh:
        _write(config, root, fmt, n)
        finish_dataset(root, recipe)
    source = (
        sd.from_tar(str(root / "train-*.tar"))
        if fmt == "tar"
        else sd.from_parquet(str(root / "train-*.parquet"))
    )
    train = feed(source, config, decode_augment)
    val = sd.from_parquet(str(root / "test.parquet")).map(decode_center).batch(500)
    return Data(train, val)


WORKLOAD = Workload(
    name="images-cnn",
    summary="a CIFAR-style CNN on 32×32×3 JPEGs in Parquet or tar shards (or your CIFAR-10)",
    model=model,
    data=data,
    loss=torch.nn.functional.cross_entropy,
    metrics={"acc": accuracy},
    goal=Goal("val_acc", 0.9),
)
