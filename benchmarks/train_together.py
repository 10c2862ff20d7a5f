"""train_together: a Keras model and a PyTorch model trained from one pipeline.

The pipeline decodes and augments JPEGs (CPU-heavy). One after the other, each model's fit runs
the pipeline again; with ``ss.fit_together`` each batch is decoded once and both models train
on it side by side. Figures are medians of interleaved rounds.
Target: together ≤ 0.65× the time of one after the other.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras
import numpy as np
import torch
import torch.nn.functional as F

import slipstream as ss
from _common import emit, log, parser
from _images import make_jpegs
from pipeline_stall import ss_augment


def keras_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    m = keras.Sequential([
        keras.Input((3, 32, 32)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu", data_format="channels_first"),
        keras.layers.MaxPooling2D(2, data_format="channels_first"),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])  # fmt: skip
    m.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return m


def torch_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(16 * 16 * 16, 10),
    )  # fmt: skip


def trainers() -> list[ss.Trainer]:
    return [
        ss.Trainer(keras_model(), threads=1),
        ss.Trainer(torch_model(), optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
                   loss=F.cross_entropy, threads=1),
    ]  # fmt: skip


def main() -> None:
    args = parser(__doc__).parse_args()
    n, rounds = (512, 1) if args.quick else (2048, 3)
    source = ss.from_arrays({"jpg": np.array(make_jpegs(n, size=96), dtype=object)})
    pipe = source.shuffle(seed=0).map(ss_augment, workers=2).batch(64).prefetch(4)
    times: dict[str, list[float]] = {"one_after_the_other": [], "together": []}
    for r in range(rounds + 1):  # round 0 warms up
        a, b = trainers()
        t0 = time.perf_counter()
        a.fit(pipe.copy(), epochs=1)
        b.fit(pipe.copy(), epochs=1)
        seq = time.perf_counter() - t0
        t0 = time.perf_counter()
        ss.fit_together(trainers(), pipe.copy(), epochs=1)
        tog = time.perf_counter() - t0
        log(f"round {r}: one after the other {seq:.2f} s, together {tog:.2f} s")
        if r:
            times["one_after_the_other"].append(seq)
            times["together"].append(tog)
    med = {k: statistics.median(v) for k, v in times.items()}
    emit(
        "train_together",
        {"seconds": med, "rounds": times, "samples": n},
        med["together"] / med["one_after_the_other"],
        {"models": ["keras cnn", "torch cnn"], "transform": "jpeg decode+augment, 2 threads",
         "batch": 64},
    )  # fmt: skip


if __name__ == "__main__":
    main()
