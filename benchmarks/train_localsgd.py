"""train_localsgd: local SGD (parameters averaged every k steps) against DDP, on digits.

Both run 2 gloo ranks with the same data, model, optimizer and epochs; reports the all-reduces
each rank made (DDP: one per gradient bucket per step; local SGD: one parameter average every
k steps, plus the small per-step or per-sync agreement on whether to go on), the test accuracy,
and the wall time.
Target: parameter all-reduces cut by k; accuracy within 1 point of DDP after the same epochs.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import slipstream as ss
from _common import emit, log, parser

K = 8


def cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(16 * 16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10),
    )  # fmt: skip


def run(strategy: Any, epochs: int) -> dict[str, Any]:
    d = load_digits()
    x = (d.data / 16).astype(np.float32).reshape(-1, 1, 8, 8)
    xtr, xte, ytr, yte = train_test_split(x, d.target.astype(np.int64), test_size=0.2,
                                          random_state=0)  # fmt: skip
    t = ss.Trainer(
        cnn(), optimizer=lambda p: torch.optim.Adam(p, lr=2e-3), loss=F.cross_entropy,
        metrics={"acc": ss.metrics.accuracy}, strategy=strategy, threads=1,
    )  # fmt: skip
    t0 = time.perf_counter()
    history = t.fit(ss.from_arrays((xtr, ytr)).shuffle(seed=0).batch(16),
                    val=ss.from_arrays((xte, yte)).batch(512), epochs=epochs)  # fmt: skip
    return {"seconds": time.perf_counter() - t0, "acc": history["val_acc"][-1],
            "steps": history.steps, "allreduces": history.config["allreduces"]}  # fmt: skip


def main() -> None:
    args = parser(__doc__).parse_args()
    epochs = 4 if args.quick else 12
    ddp = run(ss.DDP(workers=2), epochs)
    local = run(ss.LocalSGD(workers=2, sync_every=K), epochs)
    diloco = run(ss.LocalSGD(workers=2, sync_every=K, outer_lr=0.7, outer_momentum=0.9), epochs)
    log(f"ddp {ddp}\nlocalsgd {local}\ndiloco {diloco}")
    emit(
        "train_localsgd",
        {"ddp": ddp, "localsgd": local, "localsgd_diloco": diloco},
        {"allreduce_cut": ddp["allreduces"]["gradients"] / local["allreduces"]["parameters"],
         "acc_gap_points": 100 * (ddp["acc"] - local["acc"]),
         "diloco_acc_gap_points": 100 * (ddp["acc"] - diloco["acc"])},
        {"k": K, "epochs": epochs, "batch_per_rank": 16, "workers": 2},
    )  # fmt: skip


if __name__ == "__main__":
    main()
