"""train_overhead: slipstream's ``single`` loop against a hand-written PyTorch loop.

Both train the same model from the same initial weights on the same pipeline's batches,
computing the same loss and accuracy; Lightning's Trainer runs in the same rounds for
comparison. Two workloads: an MLP on scikit-learn's digits and a mid-size CNN on 32×32×3
generated images. Figures are medians of interleaved rounds of seconds per epoch.
Target: overhead ≤ 3% on the MLP, ≤ 1% on the CNN.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import slipstream as ss
from _common import emit, log, parser


def mlp_workload(quick: bool) -> tuple[Callable[[], torch.nn.Module], ss.Pipeline]:
    d = load_digits()
    x, y = (d.data / 16).astype(np.float32), d.target.astype(np.int64)
    reps = 2 if quick else 6  # the 1,797 digits a few times over, for epochs long enough to time
    x, y = np.tile(x, (reps, 1)), np.tile(y, reps)

    def mlp() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        )  # fmt: skip

    return mlp, ss.from_arrays((x, y)).shuffle(seed=0).batch(64)


def cnn_workload(quick: bool) -> tuple[Callable[[], torch.nn.Module], ss.Pipeline]:
    n = 256 if quick else 768
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, n)

    def cnn() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(64, 128, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(128 * 64, 10),
        )  # fmt: skip

    return cnn, ss.from_arrays((x, y)).shuffle(seed=0).batch(64)


def hand(make: Callable[[], torch.nn.Module], pipe: ss.Pipeline, epoch: int) -> float:
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    pipe.set_epoch(epoch)
    t0 = time.perf_counter()
    loss_sum, acc_sum = torch.zeros(()), torch.zeros(())
    for xb, yb in pipe:
        x, y = torch.as_tensor(xb), torch.as_tensor(yb)
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * len(y)
        acc_sum += ss.metrics.accuracy(out.detach(), y) * len(y)
    float(loss_sum), float(acc_sum)
    return time.perf_counter() - t0


def slipstream(make: Callable[[], torch.nn.Module], pipe: ss.Pipeline, epoch: int) -> float:
    trainer = ss.Trainer(
        make(), optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        loss=F.cross_entropy, metrics={"acc": ss.metrics.accuracy},
        threads=torch.get_num_threads(),
    )  # fmt: skip
    pipe.set_epoch(epoch)
    t0 = time.perf_counter()
    trainer.fit(pipe, epochs=1)
    return time.perf_counter() - t0


def lightning(make: Callable[[], torch.nn.Module], pipe: ss.Pipeline, epoch: int) -> float:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make()

        def training_step(self, batch: Any, i: int) -> torch.Tensor:
            x, y = batch
            out = self.net(x)
            loss = F.cross_entropy(out, y)
            self.log("acc", ss.metrics.accuracy(out.detach(), y), on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    pipe.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(pipe.as_torch(), batch_size=None)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit(Module(), loader)
    return time.perf_counter() - t0


def measure(name: str, workload: Any, rounds: int) -> dict[str, Any]:
    """Interleaved rounds in rotating order; overheads are medians of per-round ratios, so the
    machine's drift between rounds cancels."""
    make, pipe = workload
    loops = {"hand": hand, "slipstream": slipstream, "lightning": lightning}
    times: dict[str, list[float]] = {k: [] for k in loops}
    for r in range(rounds + 1):  # round 0 warms up (allocators, thread pools, imports)
        names = list(loops)[r % 3 :] + list(loops)[: r % 3]
        for loop_name in names:
            seconds = loops[loop_name](make, pipe, r)
            if r:
                times[loop_name].append(seconds)
        log(f"{name} round {r}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items() if v))
    med = {k: statistics.median(v) for k, v in times.items()}

    def overhead(loop: str) -> float:
        return statistics.median(a / b for a, b in zip(times[loop], times["hand"], strict=True)) - 1

    return {"seconds_per_epoch": med, "overhead": overhead("slipstream"),
            "lightning_overhead": overhead("lightning"), "rounds": times}  # fmt: skip


def main() -> None:
    args = parser(__doc__).parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    rounds = 3 if args.quick else 11
    mlp = measure("mlp", mlp_workload(args.quick), rounds)
    cnn = measure("cnn", cnn_workload(args.quick), rounds)
    emit(
        "train_overhead",
        {"mlp": mlp, "cnn": cnn},
        {"mlp_overhead": mlp["overhead"], "cnn_overhead": cnn["overhead"]},
        {"batch": 64, "threads": torch.get_num_threads(), "rounds": rounds},
    )


if __name__ == "__main__":
    main()
