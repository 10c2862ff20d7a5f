"""train_hogwild: time to 97% test accuracy on scikit-learn's digits with a small CNN.

Runs ``single`` with 1 and with 2 intra-op threads and ``hogwild`` with 2 workers (one thread
each), each until the test accuracy after an epoch reaches the target, in interleaved rounds
(round r draws the initial weights and the shuffle from seed r, the same for every contender);
reports the medians, and the final accuracy of each after the same number of epochs. Also
times each contender's first ``fit`` in a fresh interpreter (torch's lazy imports included).
Target: hogwild ≥ 1.6× faster than the best single; accuracy after the same epochs within
0.5 points.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import slipstream as ss
from _common import emit, log, parser

TARGET = 0.97
CONFIGS = {"single_1": ("single", 1), "single_2": ("single", 2), "hogwild_2": ("hogwild", 1)}


def data() -> tuple[Any, ...]:
    d = load_digits()
    x = (d.data / 16).astype(np.float32).reshape(-1, 1, 8, 8)
    return tuple(train_test_split(x, d.target.astype(np.int64), test_size=0.2, random_state=0))


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(16 * 16, 64), torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )  # fmt: skip


class Reached(ss.Callback):
    """Stops at the first epoch whose test accuracy reaches ``target``; notes when, counted
    from the ``fit`` call (so Hogwild's process start is included)."""

    def __init__(self, target: float | None) -> None:
        self.target, self.start, self.seconds, self.epoch = target, 0.0, float("nan"), 0

    def on_epoch_end(self, fit: Any, logs: dict[str, float]) -> None:
        if self.target is not None and logs["val_acc"] >= self.target:
            self.seconds, self.epoch = time.perf_counter() - self.start, fit.epoch
            fit.stop("target reached")


def run(
    strategy: str, threads: int | None, epochs: int, target: float | None, seed: int = 0
) -> dict[str, Any]:
    xtr, xte, ytr, yte = data()
    reached = Reached(target)
    t = ss.Trainer(
        model(seed), optimizer=lambda p: torch.optim.Adam(p, lr=2e-3), loss=F.cross_entropy,
        metrics={"acc": ss.metrics.accuracy}, strategy=strategy,
        workers=None if strategy == "single" else 2, threads=threads, callbacks=[reached],
    )  # fmt: skip
    train = ss.from_arrays((xtr, ytr)).shuffle(seed=seed).batch(32)
    reached.start = time.perf_counter()
    history = t.fit(train, val=ss.from_arrays((xte, yte)).batch(512), epochs=epochs)
    fit_seconds = time.perf_counter() - reached.start
    return {"seconds": reached.seconds, "epochs": reached.epoch, "acc": history["val_acc"][-1],
            "per_epoch": fit_seconds / len(history.epochs), "fit_seconds": fit_seconds}  # fmt: skip


def cold_fit(name: str, epochs: int) -> float:
    """Seconds of ``epochs`` epochs of ``name`` as the first fit of a fresh interpreter."""
    code = (
        "import train_hogwild as b; "
        f"print(b.run(*b.CONFIGS[{name!r}], {epochs}, None)['fit_seconds'])"
    )
    here = Path(__file__).parent
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=here, capture_output=True, text=True, check=True
    )
    return float(out.stdout.split()[-1])


def main() -> None:
    args = parser(__doc__).parse_args()
    rounds, max_epochs, same = (2, 30, 6) if args.quick else (7, 40, 15)
    times: dict[str, list[float]] = {k: [] for k in CONFIGS}
    epochs: dict[str, list[int]] = {k: [] for k in CONFIGS}
    for r in range(rounds + 1):  # round 0 warms up
        for name, (strategy, threads) in CONFIGS.items():
            out = run(strategy, threads, max_epochs, TARGET, seed=r)
            log(f"round {r} {name}: {out['seconds']:.2f} s to {TARGET:.0%} ({out['epochs']} ep)")
            if r:
                times[name].append(out["seconds"])
                epochs[name].append(out["epochs"])
    finals = {name: run(s, th, same, None) for name, (s, th) in CONFIGS.items()}
    cold = {name: cold_fit(name, 5) for name in CONFIGS}
    accs = {name: out["acc"] for name, out in finals.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    best_single = min(med["single_1"], med["single_2"])
    emit(
        "train_hogwild",
        {"seconds_to_97": med, "epochs_to_97": epochs, f"acc_after_{same}_epochs": accs,
         f"seconds_per_epoch_over_{same}": {k: v["per_epoch"] for k, v in finals.items()},
         "first_fit_of_5_epochs_in_a_fresh_process": cold,
         "rounds": times},
        {"hogwild_vs_best_single": best_single / med["hogwild_2"],
         "acc_gap_points": 100 * (max(accs["single_1"], accs["single_2"]) - accs["hogwild_2"])},
        {"target": TARGET, "batch": 32, "optimizer": "Adam(lr=2e-3)", "workers": 2},
    )  # fmt: skip


if __name__ == "__main__":
    main()
