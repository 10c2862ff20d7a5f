"""tune_quality: the advisor's choice against the best of an exhaustive grid over the same knobs.

On the digits-cnn, images-cnn and text-clf workloads (``--quick``: digits-cnn alone;
``--workload NAME``, repeatable: that one alone): the advisor probes, names the bottleneck and
searches the knobs for it; the grid measures every combination of the same knobs' options
(torch.compile left out of both: one compile costs more than a grid row). Both use the same
trials (warm-up window, then the median of four windows per process). The grid runs first; the
advisor's budget, its probes included, is then a quarter of the grid's time (at most 180 s), so
the question is whether that much time finds a setting as fast. The advisor's choice and the
grid's best are then measured again, five times each in alternation, so that neither is
favoured by the noise of its first measurement.
Target: the choice reaches ≥ 95% of the grid best's throughput in ≤ 25% of the grid's time.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from typing import Any

from _common import emit, log, parser
from slipstream.tune._advisor import Prober
from slipstream.tune._search import Knob, Setting, _key, search
from slipstream.workloads._build import build, load_config, resolve

BUDGET_S = 180  # the advisor's budget at most
SHARE = 0.25  # of the grid's time: the advisor's budget
ROUNDS = 5  # re-measurements of the advisor's choice and the grid's best, alternating
MAX_GRID = 600  # settings; images-cnn's grid over every knob (1,152) would take hours
COMPUTE = ("threads", "strategy", "batch", "precision", "channels_last")
INPUT = ("map_workers", "map_mode", "prefetch", "batch")

WORKLOADS = {
    "digits-cnn": [],
    "images-cnn": ["data.size=8000"],
    "text-clf": ["data.size=20000"],
}


def grid(start: Setting, knobs: list[Knob]) -> list[Setting]:
    """Every combination of the knobs' options (and of leaving each as it starts)."""
    settings: dict[str, Setting] = {}
    for combo in itertools.product(*[(None, *k.options) for k in knobs]):
        setting = dict(start)
        for option in combo:
            setting.update(option or {})
        settings.setdefault(_key(setting), setting)
    return list(settings.values())


def one(name: str, overrides: list[str], budget: float, root: str) -> dict[str, Any]:
    config = resolve(load_config(name, [*overrides, "live.console=false", f"data.root={root}"]))
    parts = build(config)
    try:
        trainer, pipe = parts.trainer(callbacks=False), parts.data.train
        t0 = time.perf_counter()
        prober = Prober(trainer, pipe, budget, say=lambda line: log(f"{name}: {line.strip()}"))
        probes_s = time.perf_counter() - t0
        knobs = [k for k in prober.knobs() if k.name != "compile"]
        if len(grid(prober.start, knobs)) > MAX_GRID:  # the compute or the input knobs alone
            group = INPUT if prober.probes.bottleneck == "input" else COMPUTE
            knobs = [k for k in knobs if k.name in group]
        settings = grid(prober.start, knobs)
        log(f"{name}: {prober.probes}; grid of {len(settings)}")
        t0 = time.perf_counter()
        rows = [prober.measure(s, fresh=True) for s in settings]
        grid_s = time.perf_counter() - t0
        grid_best = max(rows, key=lambda t: t.rate)
        budget = min(budget, SHARE * grid_s)
        t0 = time.perf_counter()
        found = search(prober.start, knobs, prober.measure, budget - probes_s)
        advisor_s = probes_s + time.perf_counter() - t0
        assert found.best is not None
        log(f"{name}: advisor {len(found.trials)} trials in {advisor_s:.0f} s of {budget:.0f} s")
        again: dict[str, list[float]] = {"advisor": [], "grid": []}
        for _ in range(ROUNDS):
            again["advisor"].append(prober.measure(found.best.setting, fresh=True).rate)
            again["grid"].append(prober.measure(grid_best.setting, fresh=True).rate)
        advisor, best = statistics.median(again["advisor"]), statistics.median(again["grid"])
        log(f"{name}: advisor {advisor:,.0f}/s, grid best {best:,.0f}/s; "
            f"time {advisor_s:.0f} s against {grid_s:.0f} s")  # fmt: skip
        return {
            "bottleneck": prober.probes.bottleneck,
            "advisor": {"choice": _plain(found.best.setting), "samples_per_s": advisor,
                        "seconds": advisor_s, "budget_s": budget, "trials": len(found.trials)},
            "grid": {"best": _plain(grid_best.setting), "samples_per_s": best,
                     "seconds": grid_s, "trials": len(rows)},
            "throughput_ratio": advisor / best,
            "time_ratio": advisor_s / grid_s,
        }  # fmt: skip
    finally:
        parts.close()


def _plain(setting: Setting) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in setting.items()}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--workload", action="append", choices=list(WORKLOADS), help="only this one")
    args = p.parse_args()
    chosen = args.workload or (["digits-cnn"] if args.quick else list(WORKLOADS))
    with tempfile.TemporaryDirectory(prefix="tune-quality-") as root:
        results = {name: one(name, WORKLOADS[name], BUDGET_S, root) for name in chosen}
    emit(
        "tune_quality",
        results,
        {
            "throughput": min(r["throughput_ratio"] for r in results.values()),
            "time": max(r["time_ratio"] for r in results.values()),
        },
        {"advisor_budget_s": BUDGET_S, "share": SHARE, "rounds": ROUNDS, "workloads": WORKLOADS},
    )


if __name__ == "__main__":
    main()
