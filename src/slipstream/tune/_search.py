"""The search: coordinate descent over knobs, within a time budget it keeps.

A *setting* maps each knob's name to a value. Starting from the configured setting, the search
takes the knobs in order and tries each of a knob's values with everything else at the best
setting so far; a value is kept when it is faster by more than ``margin`` (measurement noise
must not pick a change). Passes repeat while one changed something, because knobs interact
(threads per process after the process count changed). A trial is started only when the time
it is expected to take (the slowest trial so far) fits in what is left of the budget.

Measurement is a function passed in, so the search is tested on a deterministic objective.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Setting = dict[str, Any]


@dataclass(frozen=True)
class Knob:
    """A thing to tune and its options, in the order to try them. An option sets one or more
    entries of the setting together (``{"strategy": ("hogwild", 2), "threads": 1}``: more
    processes come with their share of the cores)."""

    name: str
    options: tuple[Mapping[str, Any], ...]

    @classmethod
    def of(cls, name: str, values: Sequence[Any]) -> Knob:
        """A knob whose options each set ``name`` alone."""
        return cls(name, tuple({name: v} for v in values))


@dataclass(frozen=True)
class Trial:
    """One measured setting: samples per second (0 when it failed, ``error`` says why),
    input stall, and the seconds it cost."""

    setting: Setting
    rate: float
    stall: float = 0.0
    seconds: float = 0.0
    error: str = ""


@dataclass
class Search:
    """Trials so far, the best one, and why the search stopped."""

    trials: list[Trial] = field(default_factory=list)
    best: Trial | None = None
    stopped: str = ""
    skipped: list[Setting] = field(default_factory=list)  # not tried: the budget ran out


def search(
    start: Mapping[str, Any],
    knobs: Sequence[Knob],
    measure: Callable[[Setting], Trial],
    budget_s: float,
    *,
    margin: float = 0.03,
    clock: Callable[[], float] = time.monotonic,
    max_passes: int = 3,
) -> Search:
    """Search ``knobs`` from ``start`` (which is measured first) for ``budget_s`` seconds."""
    runner = _Runner(measure, clock() + budget_s, clock)
    first = runner.run(dict(start))
    assert first is not None  # the first trial always runs
    out = runner.out
    out.best = first
    for _ in range(max_passes):
        changed = False
        for knob in knobs:
            for option in knob.options:
                best = out.best
                if all(best.setting.get(k) == v for k, v in option.items()):
                    continue
                trial = runner.run({**best.setting, **option})
                if trial is not None and trial.rate > best.rate * (1 + margin):
                    out.best, changed = trial, True
        if out.skipped or not changed:
            out.stopped = "budget" if out.skipped else "converged"
            return out
    out.stopped = "passes"
    return out


class _Runner:
    """Runs each setting once, while the budget allows."""

    def __init__(
        self, measure: Callable[[Setting], Trial], deadline: float, clock: Callable[[], float]
    ) -> None:
        self.measure, self.deadline, self.clock = measure, deadline, clock
        self.out = Search()
        self.tried: dict[str, Trial] = {}

    def run(self, setting: Setting) -> Trial | None:
        key = repr(sorted(setting.items()))
        if key in self.tried:
            return self.tried[key]
        expected = max((t.seconds for t in self.out.trials), default=0.0)
        if self.out.trials and self.clock() + expected > self.deadline:
            self.out.skipped.append(setting)
            return None
        trial = self.measure(setting)
        self.tried[key] = trial
        self.out.trials.append(trial)
        return trial
