"""The search: coordinate descent over knobs, within a time budget it keeps.

A *setting* maps each knob's name to a value. Starting from the configured setting, the search
takes the knobs in order and tries each of a knob's options with everything else at the best
setting so far. Passes repeat while one changed something, because knobs interact (threads per
process after the process count changed).

Measurements are noisy, so no single trial decides: a setting measured near the best (less
than ``doubt`` behind) or ahead of it is measured again, alternating with the best, until the
pairs tell them apart, and it replaces the best only if the lower median of its ratios to the
best, pair by pair, is above ``1 + margin`` (a pair: two measurements one right after the
other; a setting the budget left no pair for stays behind). A lucky trial is not believed, and
an unlucky one does not bury a good setting.
Budget left once the search converges goes to measuring the settings that came closest to the
best again, side by side with it, by the same rule. A trial is started only when the time it
is expected to take fits in what is left: a setting measured before, what it took then; a new
one, the slowest trial so far.

Measurement is a function passed in, so the search is tested on a deterministic objective.
"""

from __future__ import annotations

import statistics
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


REPEATS = 3  # measurements of each leading setting, when the budget allows
LEADERS = 3  # the settings measured again against the best once the search converged


@dataclass(frozen=True)
class Trial:
    """A measured setting: samples per second (the median of ``repeats`` measurements; 0 when
    it failed, ``error`` says why), input stall, and the seconds its measurements cost."""

    setting: Setting
    rate: float
    stall: float = 0.0
    seconds: float = 0.0
    error: str = ""
    repeats: int = 1


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
    doubt: float = 0.12,
    clock: Callable[[], float] = time.monotonic,
    max_passes: int = 3,
) -> Search:
    """Search ``knobs`` from ``start`` (which is measured first) for ``budget_s`` seconds.

    A setting replaces the best when, measured side by side with it, it is ahead by
    ``margin``; one measured within ``doubt`` below the best is measured so too."""
    runner = _Runner(measure, clock() + budget_s, clock)
    best = runner.run(dict(start))
    assert best is not None  # the first trial always runs
    stopped = "passes"
    for _ in range(max_passes):
        changed = False
        for knob in knobs:
            for option in knob.options:
                if all(best.setting.get(k) == v for k, v in option.items()):
                    continue
                trial = runner.run({**best.setting, **option})
                if trial is not None and trial.rate > best.rate * (1 - doubt):
                    trial, best, ratio = runner.duel(trial, best, margin)
                    if ratio > 1 + margin:
                        best, changed = trial, True
        if runner.skipped or not changed:
            stopped = "budget" if runner.skipped else "converged"
            break
    return runner.finish(best, stopped, margin)


def _key(setting: Setting) -> str:
    """A setting's identity, whatever the order of its entries."""
    return repr(sorted(setting.items()))


class _Runner:
    """Measures settings while the budget allows, and keeps each one's measurements."""

    def __init__(
        self, measure: Callable[[Setting], Trial], deadline: float, clock: Callable[[], float]
    ) -> None:
        self.measure, self.deadline, self.clock = measure, deadline, clock
        self.measured: dict[str, list[Trial]] = {}  # by setting, in the order first tried
        self.last: list[str] = []  # the settings of the latest two measurements, in order
        self.skipped: list[Setting] = []

    def _fits(self, *keys: str) -> bool:
        """Whether trials of the settings ``keys``, one after the other (none: one setting
        never measured), would end within the budget. Each is expected to take what it took
        before; a new one, what the slowest trial so far took. So one slow setting (bf16
        without hardware support, a trial cut at its cap) does not stop the others from being
        measured again."""
        if not self.measured:
            return True
        cost = sum(map(self._cost, keys)) if keys else self._cost(None)
        return self.clock() + cost <= self.deadline

    def _cost(self, key: str | None) -> float:
        runs = self.measured.get(key or "") or [t for ts in self.measured.values() for t in ts]
        return max(t.seconds for t in runs)

    def run(self, setting: Setting) -> Trial | None:
        """The setting's trial: measured now if it never was (and the budget allows)."""
        key = _key(setting)
        if key in self.measured:
            return self.summary(key)
        if not self._fits():
            self.skipped.append(setting)
            return None
        self.measured[key] = [self._measure(setting)]
        return self.summary(key)

    def _measure(self, setting: Setting) -> Trial:
        self.last = [*self.last[-1:], _key(setting)]
        return self.measure(setting)

    def again(self, trial: Trial) -> Trial:
        """``trial``'s setting measured once more (unless it failed): the median so far. The
        caller has checked that the budget allows it."""
        key = _key(trial.setting)
        if not trial.error:
            self.measured[key].append(self._measure(trial.setting))
        return self.summary(key)

    def duel(self, trial: Trial, best: Trial, margin: float) -> tuple[Trial, Trial, float]:
        """Measure ``trial`` and ``best`` again, one after the other, until the lower median
        of their paired ratios is ahead by ``margin``, a pair puts ``trial`` behind, or each
        has ``REPEATS`` measurements. Pairs, not each one's median over all its measurements:
        the best's older measurements were taken while the machine may have run faster or
        slower. A pair is two measurements one right after the other: when ``trial`` was just
        measured but not right after the best, the best is measured again first. With no pair
        at all (the budget allowed none) the ratio is 0: a setting never measured beside the
        best is not believed. Returns both trials and that ratio."""
        tk, bk = _key(trial.setting), _key(best.setting)
        if self.last[-1:] == [tk] and self.last != [bk, tk] and self._fits(bk):
            best = self.again(best)  # now right after the trial's measurement
        ratios = [self._pair(trial, best)] if self.last in ([bk, tk], [tk, bk]) else []
        while trial.repeats < REPEATS and not trial.error:
            if not self._fits(tk, bk):
                break  # the budget allows no more pairs
            trial, best = self.again(trial), self.again(best)
            ratios.append(self._pair(trial, best))
            if statistics.median_low(ratios) > 1 + margin or ratios[-1] <= 1:
                break  # ahead by the margin, or behind when measured side by side again
        return trial, best, statistics.median_low(ratios) if ratios else 0.0

    def _pair(self, trial: Trial, best: Trial) -> float:
        """The ratio of the two settings' latest measurements."""
        latest = [self.measured[_key(t.setting)][-1].rate for t in (trial, best)]
        return latest[0] / max(latest[1], 1e-9)

    def summary(self, key: str) -> Trial:
        runs = self.measured[key]
        ok = [t for t in runs if not t.error]
        return Trial(
            runs[0].setting,
            statistics.median_low([t.rate for t in ok] or [0.0]),  # a tie never flatters
            statistics.median_low([t.stall for t in ok] or [0.0]),
            sum(t.seconds for t in runs),
            "" if ok else runs[-1].error,
            len(runs),
        )

    def finish(self, best: Trial, stopped: str, margin: float) -> Search:
        """Budget left goes to the settings that came closest to ``best``, fastest first: each
        is measured side by side with it again (:meth:`duel`) and replaces it only when ahead
        by ``margin`` there."""
        for trial in sorted(self._trials(), key=lambda t: -t.rate)[:LEADERS]:
            if _key(trial.setting) == _key(best.setting) or trial.error or trial.repeats >= REPEATS:
                continue  # the best itself, failed, or measured all it may be
            if not self._fits(_key(trial.setting), _key(best.setting)):
                continue  # no pair fits in what is left
            trial, best, ratio = self.duel(trial, best, margin)
            if ratio > 1 + margin:
                best = trial
        return Search(self._trials(), self.summary(_key(best.setting)), stopped, self.skipped)

    def _trials(self) -> list[Trial]:
        return [self.summary(key) for key in self.measured]
