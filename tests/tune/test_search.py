"""The search on a deterministic objective, the bottleneck rule and the knobs it picks."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from slipstream.tune import Knob, Trial, search
from slipstream.tune._advisor import bottleneck, knobs_for, parse_budget
from slipstream.tune._search import Setting

# A planted optimum: hogwild with 2 workers of 1 thread each, batch=256, bf16. The threads
# factor depends on the process count: the strategy knob, like the advisor's, moves threads
# with it (each process its share of the cores).
START: Setting = {"threads": 2, "strategy": ("single", 1), "batch": 64, "precision": "fp32"}
KNOBS = [
    Knob.of("threads", [1, 2]),
    Knob("strategy", ({"strategy": ("single", 1)}, {"strategy": ("hogwild", 2), "threads": 1})),
    Knob.of("batch", [128, 256, 512]),
    Knob.of("precision", ["bf16"]),
]


def objective(s: Setting) -> float:
    workers = s["strategy"][1]
    threads = (
        {1: 1.6, 2: 1.0}[s["threads"]] if workers == 1 else (1.0 if s["threads"] == 1 else 0.4)
    )
    strategy = 1.8 if workers == 2 else 1.0
    batch = {64: 1.0, 128: 1.2, 256: 1.3, 512: 0.9}[s["batch"]]
    precision = 1.1 if s["precision"] == "bf16" else 1.0
    return 1000 * threads * strategy * batch * precision


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def measured(clock: FakeClock, cost: float = 5.0) -> Any:
    def measure(setting: Setting) -> Trial:
        clock.now += cost
        return Trial(dict(setting), objective(setting), seconds=cost)

    return measure


def grid() -> list[Setting]:
    out = []
    for t, s, b, p in itertools.product([1, 2], [("single", 1), ("hogwild", 2)],
                                        [64, 128, 256, 512], ["fp32", "bf16"]):  # fmt: skip
        out.append({"threads": t, "strategy": s, "batch": b, "precision": p})
    return out


def test_the_search_finds_the_planted_optimum_within_its_budget() -> None:
    clock = FakeClock()
    found = search(START, KNOBS, measured(clock), budget_s=150, clock=clock)
    best = max(grid(), key=objective)
    assert found.best is not None and found.best.setting == best
    assert found.stopped == "converged" and clock.now <= 150
    assert len(found.trials) < len(grid()) / 2  # far fewer settings than the exhaustive grid
    assert sum(t.repeats for t in found.trials) < len(grid())  # repeats of close calls too


def test_the_search_keeps_its_budget_and_says_what_it_left() -> None:
    clock = FakeClock()
    found = search(START, KNOBS, measured(clock, cost=10.0), budget_s=45, clock=clock)
    assert clock.now <= 45  # no trial started that would end past the budget
    assert sum(t.repeats for t in found.trials) == 4 and found.stopped == "budget"
    assert found.skipped
    assert found.best is not None and found.best.rate == max(t.rate for t in found.trials)


def test_noise_below_the_margin_does_not_pick_a_change() -> None:
    clock = FakeClock()

    def flat(setting: Setting) -> Trial:
        clock.now += 1
        return Trial(dict(setting), 1000 + (20 if setting["batch"] == 128 else 0), seconds=1)

    found = search(START, KNOBS, flat, budget_s=100, clock=clock)
    assert found.best is not None and found.best.setting == START  # 2% is within the noise


def test_a_lucky_measurement_is_measured_again_before_it_is_believed() -> None:
    clock = FakeClock()
    lucky = {"count": 0}

    def measure(setting: Setting) -> Trial:
        clock.now += 1
        rate = 1000.0
        if setting["batch"] == 128:  # fast the first time it is measured, and never again
            lucky["count"] += 1
            rate = 1500.0 if lucky["count"] == 1 else 990.0
        return Trial(dict(setting), rate, seconds=1)

    found = search(START, KNOBS, measure, budget_s=100, clock=clock)
    assert found.best is not None and found.best.setting == START
    again = next(t for t in found.trials if t.setting["batch"] == 128)
    assert again.repeats >= 2 and again.rate == 990.0  # the lower median of its measurements


def test_an_unlucky_measurement_does_not_bury_a_better_setting() -> None:
    """Batch 256 is the best setting but is measured slow the first time, below the best so
    far: it is measured again, alternating with the best, and then chosen."""
    clock = FakeClock()
    first = {"count": 0}

    def measure(setting: Setting) -> Trial:
        clock.now += 1
        rate = {64: 1000.0, 128: 1000.0, 256: 1200.0, 512: 900.0}[setting["batch"]]
        if setting["batch"] == 256:
            first["count"] += 1
            rate = 950.0 if first["count"] == 1 else rate
        return Trial(dict(setting), rate, seconds=1)

    # the start, batch 128 and one pair, batch 256 and three pairs: 9 trials of 1 s
    found = search(START, [KNOBS[2]], measure, budget_s=9, clock=clock)
    assert found.best is not None and found.best.setting["batch"] == 256


def test_a_setting_never_measured_beside_the_best_is_not_believed() -> None:
    """Batch 256 measures 20% ahead of the start, but batch 128 was measured between them and
    the budget (3 trials) leaves no trial to put the two side by side: the start stays."""
    clock = FakeClock()

    def measure(setting: Setting) -> Trial:
        clock.now += 1
        rate = {64: 1000.0, 128: 500.0, 256: 1200.0}[setting["batch"]]
        return Trial(dict(setting), rate, seconds=1)

    found = search(START, [Knob.of("batch", [128, 256])], measure, budget_s=3, clock=clock)
    assert found.best is not None and found.best.setting == START
    assert [t.setting["batch"] for t in found.trials] == [64, 128, 256]
    # one trial more: the start measured again right after batch 256 makes a pair, which
    # confirms it
    clock = FakeClock()
    found = search(START, [Knob.of("batch", [128, 256])], measure, budget_s=4, clock=clock)
    assert found.best is not None and found.best.setting["batch"] == 256
    assert [t.repeats for t in found.trials] == [2, 1, 1]


def test_one_slow_setting_does_not_keep_the_others_from_being_measured_again() -> None:
    """bf16 takes 20 s a trial, the others 1 s. Batch 128, new, is expected to take as long as
    the slowest so far and just fits (21 + 20 s of 41); its lucky first measurement is then
    measured again beside the best, 1 s each, not believed."""
    clock = FakeClock()
    lucky = {"count": 0}

    def measure(setting: Setting) -> Trial:
        cost = 20.0 if setting["precision"] == "bf16" else 1.0
        clock.now += cost
        rate = 500.0 if setting["precision"] == "bf16" else 1000.0
        if setting["batch"] == 128:
            lucky["count"] += 1
            rate = 1500.0 if lucky["count"] == 1 else 990.0
        return Trial(dict(setting), rate, seconds=cost)

    knobs = [Knob.of("precision", ["bf16"]), Knob.of("batch", [128])]
    found = search(START, knobs, measure, budget_s=41, clock=clock)
    assert found.best is not None and found.best.setting == START
    again = next(t for t in found.trials if t.setting["batch"] == 128)
    assert again.repeats >= 2 and clock.now <= 41


def test_a_failed_trial_is_never_chosen() -> None:
    clock = FakeClock()

    def measure(setting: Setting) -> Trial:
        clock.now += 1
        if setting["precision"] == "bf16":
            return Trial(dict(setting), 0.0, seconds=1, error="RuntimeError: no bf16 here")
        return Trial(dict(setting), objective(setting), seconds=1)

    found = search(START, KNOBS, measure, budget_s=100, clock=clock)
    assert found.best is not None and found.best.setting["precision"] == "fp32"
    assert any(t.error for t in found.trials)


@pytest.mark.parametrize(
    ("pipeline", "step", "together", "processes", "sync", "expected"),
    [
        (1_000, 10_000, 950, 1, False, "input"),
        (100_000, 5_000, 4_800, 1, False, "compute"),
        (6_000, 5_500, 4_000, 1, False, "balanced"),
        (100_000, 5_000, 3_000, 2, True, "communication"),
        (100_000, 5_000, 9_000, 2, True, "compute"),
    ],
)
def test_the_bottleneck_is_named_from_the_probes(
    pipeline: float, step: float, together: float, processes: int, sync: bool, expected: str
) -> None:
    assert bottleneck(pipeline, step, together, processes, sync) == expected


def test_the_knobs_that_matter_for_the_bottleneck_come_first() -> None:
    start = {"threads": 2, "batch": 64, "map_workers": 2, "map_mode": "thread", "prefetch": 2}
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3))
    names = [k.name for k in knobs_for("input", start, conv, cores=2, cuda=False)]
    assert names[:3] == ["map_workers", "map_mode", "prefetch"]
    names = [k.name for k in knobs_for("compute", start, conv, cores=2, cuda=False)]
    assert names[:2] == ["threads", "strategy"] and "channels_last" in names
    assert names.index("compile") < names.index("map_workers")
    linear = torch.nn.Linear(2, 2)
    assert "channels_last" not in [k.name for k in knobs_for("compute", start, linear, 2, False)]
    precisions = next(
        k for k in knobs_for("compute", start, linear, 2, True) if k.name == "precision"
    )
    assert {"precision": "fp16"} in precisions.options  # only where CUDA is


def test_budgets_parse_and_bad_ones_say_how() -> None:
    assert [parse_budget(b) for b in (90, "90", "90s", "2m", "1.5m", "1h")] == [
        90, 90, 90, 120, 90, 3600,
    ]  # fmt: skip
    for bad in ("soon", "-3m", "0", 0, "2 minutes"):
        with pytest.raises(ValueError, match="give seconds"):
            parse_budget(bad)  # type: ignore[arg-type]
