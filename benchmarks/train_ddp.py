"""train_ddp: 2-process gloo DDP against one process, on a CNN over generated 32×32×3 images.

Single runs with 1 thread (one rank's share of the machine) and with 2; DDP with 2 ranks of 1
thread each, per-rank batch b against single's 2b, so both take the same steps on the same
samples. Reports samples/s (wall time of ``fit``, process start included for DDP), scaling
efficiency (DDP ÷ 2 × single on one thread) and the largest weight difference to single
after the same epochs (parity).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import slipstream as ss
from _common import emit, log, parser

BATCH = 32  # per rank


def cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * 64, 10),
    )  # fmt: skip


def run(strategy: str, threads: int, pipe: ss.Pipeline, epochs: int) -> tuple[float, ss.Trainer]:
    t = ss.Trainer(
        cnn(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05), loss=F.cross_entropy,
        strategy=strategy, workers=None if strategy == "single" else 2, threads=threads,
    )  # fmt: skip
    t0 = time.perf_counter()
    t.fit(pipe.copy(), epochs=epochs)
    return time.perf_counter() - t0, t


def main() -> None:
    args = parser(__doc__).parse_args()
    n, epochs, rounds = (1024, 1, 1) if args.quick else (4096, 2, 3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, n)
    single_pipe = ss.from_arrays((x, y)).shuffle(seed=0).batch(2 * BATCH)
    ddp_pipe = ss.from_arrays((x, y)).shuffle(seed=0).batch(BATCH)
    runs = {"single_1": ("single", 1, single_pipe), "single_2": ("single", 2, single_pipe),
            "ddp_2": ("ddp", 1, ddp_pipe)}  # fmt: skip
    times: dict[str, list[float]] = {k: [] for k in runs}
    models: dict[str, ss.Trainer] = {}
    for r in range(rounds + 1):  # round 0 warms up
        for name, (strategy, threads, pipe) in runs.items():
            seconds, models[name] = run(strategy, threads, pipe, epochs)
            if r:
                times[name].append(seconds)
        log(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items() if v))
    rate = {k: n * epochs / statistics.median(v) for k, v in times.items()}
    diff = max(
        float((a - b).abs().max())
        for a, b in zip(models["single_2"].model.parameters(), models["ddp_2"].model.parameters(),
                        strict=True)
    )  # fmt: skip
    emit(
        "train_ddp",
        {"samples_per_s": rate, "max_weight_diff_vs_single": diff, "rounds": times},
        {"ddp_vs_single_1": rate["ddp_2"] / rate["single_1"],
         "ddp_vs_single_2": rate["ddp_2"] / rate["single_2"],
         "scaling_efficiency": rate["ddp_2"] / (2 * rate["single_1"])},
        {"samples": n, "epochs": epochs, "batch_per_rank": BATCH, "backend": "gloo"},
    )  # fmt: skip


if __name__ == "__main__":
    main()
