"""A generated image workload: JPEG images in Parquet shards, a decode/augment map, a small CNN."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slipstream._core.extras import require
from slipstream.data import sample_rng

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def write_shards(root: Path, images: int, shards: int, size: int = 48, seed: int = 0) -> list[Path]:
    """``images`` smooth random colour JPEGs (label: the dominant channel) in Parquet shards."""
    pa = require("pyarrow", feature="the demo dataset")
    pq = require("pyarrow.parquet", feature="the demo dataset")
    image = require("PIL.Image", feature="the demo dataset")
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    per = -(-images // shards)
    for s in range(shards):
        rows, labels = [], []
        for _ in range(min(per, images - s * per)):
            small = rng.integers(0, 200, (size // 8, size // 8, 3), dtype=np.uint8)
            label = int(rng.integers(0, 3))
            small[..., label] += 30  # the label: which colour is a little stronger
            buf = io.BytesIO()
            image.fromarray(small).resize((size, size), image.BICUBIC).save(
                buf, format="JPEG", quality=90
            )
            rows.append(buf.getvalue())
            labels.append(label)
        path = root / f"train-{s:03d}.parquet"
        pq.write_table(pa.table({"image": rows, "label": labels}), path, row_group_size=256)
        paths.append(path)
    return paths


def decode_augment(row: dict[str, Any]) -> tuple[np.ndarray, int]:
    """JPEG → random 32×32 crop, random flip, normalised CHW float32 (per-sample randomness)."""
    image = require("PIL.Image", feature="decoding images")
    rng = sample_rng()
    img = image.open(io.BytesIO(row["image"])).convert("RGB")
    w, h = img.size
    x0, y0 = int(rng.integers(0, w - 31)), int(rng.integers(0, h - 31))
    x = np.asarray(img.crop((x0, y0, x0 + 32, y0 + 32)), dtype=np.float32) / 255
    if rng.random() < 0.5:
        x = x[:, ::-1]
    x = (x - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)), int(row["label"])


def small_cnn(classes: int = 3) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 8 * 8, classes),
    )  # fmt: skip
