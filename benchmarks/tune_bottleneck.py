"""tune_bottleneck: the advisor names the bottleneck of generated cases made input-bound (a slow
map), compute-bound (a large model on in-memory data) and balanced (a map as slow as the step).

Each case runs the advisor's probes (pipeline alone, step alone, both together) and prints the
figures it named the bottleneck from. The balanced case first measures the model's step rate
and gives the batches a map (two workers) whose delay makes the pipeline deliver at about that
rate.
Target: the named bottleneck is right in each case.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

import slipstream as ss
from _common import emit, log, parser
from slipstream.tune._advisor import Prober
from slipstream.tune._measure import cached_batch, step_alone


class Sleepy:
    """A map that waits ``delay`` seconds per sample (as a remote read would)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __call__(self, sample: Any) -> Any:
        time.sleep(self.delay)
        return sample


def arrays(n: int, features: int) -> ss.Pipeline:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, features)).astype(np.float32)
    return ss.from_arrays((x, rng.integers(0, 10, n))).shuffle(seed=0)


def mlp(features: int, hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(features, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10),
    )  # fmt: skip


def trainer(model: torch.nn.Module) -> ss.Trainer:
    return ss.Trainer(
        model, optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
        loss=torch.nn.functional.cross_entropy,
    )  # fmt: skip


def cases(n: int) -> list[tuple[str, ss.Trainer, ss.Pipeline]]:
    small = trainer(mlp(32, 64))
    large = trainer(mlp(256, 1024))
    balanced = trainer(mlp(128, 512))
    base = arrays(n, 128).batch(64)
    batch, threads = cached_batch(base), torch.get_num_threads()
    rate = max(step_alone(balanced, batch, 1.5, threads) for _ in range(2))  # the 2nd is warm
    per_batch = 2 * 64 / rate  # two workers, each as slow per batch as the step
    return [
        ("input", small, arrays(n, 32).map(Sleepy(0.002), workers=2).batch(64)),
        ("compute", large, arrays(n, 256).batch(64)),
        ("balanced", balanced, base.map(Sleepy(per_batch), workers=2)),
    ]


def main() -> None:
    args = parser(__doc__).parse_args()
    n = 4000 if args.quick else 20000
    results: dict[str, Any] = {}
    for expected, t, pipe in cases(n):
        prober = Prober(t, pipe, budget_s=60, say=lambda _: None)
        p = prober.probes
        log(f"{expected}: named {p.bottleneck} ({p})")
        results[expected] = {
            "named": p.bottleneck,
            "pipeline_alone": round(p.pipeline),
            "step_alone": round(p.step),
            "together": round(p.together),
        }
    right = sum(r["named"] == k for k, r in results.items())
    emit(
        "tune_bottleneck",
        {"cases": results, "right": right, "of": len(results)},
        {"right": right / len(results)},
        {"samples": n, "batch": 64},
    )


if __name__ == "__main__":
    main()
