"""live_overhead: training with everything live on, against everything off.

On: JSONL records every 10 steps, the dashboard process with a client following its event
stream, and weights published every 50 steps (shared memory and safetensors files). Off:
``live=None``. Same model, weights, data and threads; interleaved rounds, the overhead is the
median of per-round ratios of the steps' seconds per epoch (the feed's once-per-fit start and
finish, a few ms, are left out: they are not step time). Target: ≤ 2% slower.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import slipstream as ss
from _common import emit, log, parser

# One intra-op thread: the faster setting for this small CNN on a 2-core machine, and the one
# that leaves a core for the live side (with two, any other process's wake-up stalls a step).
THREADS = 1


def digits_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(32 * 64, 10),
    )  # fmt: skip


def pipeline(reps: int) -> ss.Pipeline:
    d = load_digits()
    x = np.tile((d.data / 16).astype(np.float32).reshape(-1, 1, 8, 8), (reps, 1, 1, 1))
    y = np.tile(d.target.astype(np.int64), reps)
    return ss.from_arrays((x, y)).shuffle(seed=0).batch(64)


class Clock(ss.Callback):
    """The training steps' time: from the first step to the last, without the once-per-fit
    start and finish of the live feed (creating the store, joining the sink threads)."""

    def on_fit_start(self, fit: Any) -> None:
        self.start = time.perf_counter()

    def on_fit_end(self, fit: Any) -> None:
        self.seconds = time.perf_counter() - self.start


def epoch_seconds(pipe: ss.Pipeline, live: ss.Live | None, epoch: int) -> float:
    clock = Clock()
    trainer = ss.Trainer(
        digits_cnn(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        loss=F.cross_entropy, metrics={"acc": ss.metrics.accuracy}, live=live, threads=THREADS,
        callbacks=[clock],
    )  # fmt: skip
    pipe.set_epoch(epoch)
    trainer.fit(pipe, epochs=1)
    return clock.seconds


def main() -> None:
    args = parser(__doc__).parse_args()
    rounds, reps = (3, 2) if args.quick else (21, 4)
    pipe = pipeline(reps)
    with tempfile.TemporaryDirectory() as tmp:
        live = ss.Live(
            Path(tmp) / "run", dashboard=True, console=False, record_every=10,
            publish_every_steps=50,
        )  # fmt: skip
        assert live.dir is not None
        live.dir.mkdir(parents=True)
        assert live.dashboard is None
        follower: Any = None
        try:
            times: dict[str, list[float]] = {"off": [], "on": []}
            for r in range(rounds + 1):  # round 0 warms up, and starts the dashboard
                order = ("off", "on") if r % 2 else ("on", "off")
                for mode in order:
                    seconds = epoch_seconds(pipe, live if mode == "on" else None, r)
                    if r:
                        times[mode].append(seconds)
                if follower is None and live.dashboard is not None:  # a browser's event stream
                    url = live.dashboard.url.rstrip("/") + "/events"
                    follower = subprocess.Popen(["curl", "-sN", url], stdout=subprocess.DEVNULL)
                if r:
                    log(f"round {r}: off {times['off'][-1]:.3f}s on {times['on'][-1]:.3f}s")
        finally:
            if follower is not None:
                follower.kill()
                follower.wait()
            live.close()
        records = sum(1 for _ in (Path(tmp) / "run" / "events.jsonl").open())
        versions = len(list((Path(tmp) / "run" / "weights").iterdir()))
    overhead = (
        statistics.median(on / off for on, off in zip(times["on"], times["off"], strict=True)) - 1
    )
    emit(
        "live_overhead",
        {
            "seconds_per_epoch": {k: statistics.median(v) for k, v in times.items()},
            "overhead": overhead, "records": records, "weight_files_kept": versions,
            "rounds": times,
        },
        {"overhead": overhead},
        {"batch": 64, "samples": len(pipe) * 64, "record_every": 10, "publish_every_steps": 50,
         "threads": THREADS, "rounds": rounds},
    )  # fmt: skip


if __name__ == "__main__":
    main()
