"""Measurement records: where a pipeline's time goes, stage by stage.

A :class:`Meter` is the mutable accumulator a stage owns; :class:`StageStats` and
:class:`PipelineStats` are the frozen snapshots users read. Meters are written by the threads of
their stage and read (without a lock: every field is a single Python number) by ``stats()``.
"""

from __future__ import annotations

import itertools
import os
import random
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ProcessStats:
    """One worker process of a ``mode="process"`` stage, as the process measured itself:
    items it mapped, seconds it spent on them, and its resident memory after its last chunk."""

    index: int
    pid: int
    items: int
    busy_s: float
    rss_bytes: int


@dataclass(frozen=True, slots=True)
class StageStats:
    """One stage's figures since the pipeline was built.

    ``busy_s`` sums the stage's own work over its workers; ``wait_input_s`` is time spent waiting
    for the stage upstream, ``wait_output_s`` time spent waiting for room downstream (a stage that
    waits on its output is not the bottleneck).
    """

    name: str
    items: int
    busy_s: float
    wait_input_s: float
    wait_output_s: float
    queue_depth: int
    queue_capacity: int
    workers: int
    skipped: tuple[int, ...] = ()
    processes: tuple[ProcessStats, ...] = ()

    @property
    def rate(self) -> float:
        """Items per second of busy time per worker (0 when idle)."""
        return self.items * self.workers / self.busy_s if self.busy_s > 0 else 0.0


@dataclass(frozen=True, slots=True)
class PipelineStats:
    """Snapshot of a pipeline: every stage, and the consumer's stall (time blocked in ``next``)."""

    stages: tuple[StageStats, ...]
    items: int
    elapsed_s: float
    stall_s: float
    skipped: tuple[int, ...] = field(default=())

    @property
    def throughput(self) -> float:
        """Items delivered per second of wall time."""
        return self.items / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def stall_fraction(self) -> float:
        """Share of wall time the consumer spent waiting for the pipeline."""
        return self.stall_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def __str__(self) -> str:
        head = (
            f"{'stage':<28}{'items':>10}{'busy s':>9}{'wait in':>9}{'wait out':>9}"
            f"{'queue':>9}{'workers':>8}"
        )
        rows = [head]
        rows.extend(
            f"{s.name[:27]:<28}{s.items:>10}{s.busy_s:>9.2f}{s.wait_input_s:>9.2f}"
            f"{s.wait_output_s:>9.2f}{f'{s.queue_depth}/{s.queue_capacity}':>9}{s.workers:>8}"
            for s in self.stages
        )
        rows.extend(
            f"  {s.name[:20]} worker {p.index} (pid {p.pid}): {p.items} items, "
            f"{p.busy_s:.2f} s busy, {p.rss_bytes / 2**20:.0f} MiB resident"
            for s in self.stages
            for p in s.processes
        )
        rows.append(
            f"consumer: {self.items} items in {self.elapsed_s:.2f} s "
            f"({self.throughput:,.0f}/s), stall {self.stall_s:.2f} s "
            f"({100 * self.stall_fraction:.1f}%), skipped {len(self.skipped)}"
        )
        return "\n".join(rows)


# Timing an item costs 0.5 to 1 µs in a running pipeline (two clock reads and the updates), so
# a stage is timed on every item only while its items take HOLD_S or more: such an item keeps
# its stage timing every item for one item per HOLD_S of its time (under 1% of its cost), and
# periodic slow items of a few milliseconds are timed item by item. The first WARM items of
# every stage are timed too. Otherwise the stage's items fall in blocks of SAMPLE and one item
# at a random place in each block is timed, standing for the block: the estimate is unbiased
# whatever the pattern of item times (a stage slow on every 16th item cannot hide between the
# timed ones); when items take the same time, only the last, unfinished block is off.
# Blocking waits are not sampled: they are timed where they happen (``Meter.waited``), and a
# wait is slow already. So stats cost under 1% of throughput but on trivial per-sample stages
# (docs/results.md, pipeline_stats).
HOLD_S = 100e-6
SAMPLE = 64
WARM = SAMPLE


def _places(n: int = 4096, seed: int = 0) -> Iterator[int]:
    """Where in its block each timed item falls: uniform in ``[0, SAMPLE)``, drawn once (a draw
    per timed item would cost more than timing it)."""
    draw = random.Random(seed).randrange
    return itertools.cycle([draw(SAMPLE) for _ in range(n)])


_next_place = _places().__next__  # shared by every stage's meter


class Meter:
    """Mutable counters of one stage. Each field is written by the stage's own threads only.

    ``total`` is the time callers spent inside the stage's ``next`` less its blocking waits,
    estimated from timed items (:meth:`timed`); ``waited`` is the time the stage blocked on its
    queue for callers, timed exactly where it blocks (background stages). ``busy`` is filled by
    stages that work in threads or processes of their own. ``skip`` is how many untimed items
    come before the next timed one, which stands for ``weight`` items (the caller counts them
    down, a stage in a copy of its own); ``window`` is how many the last timed item left, and
    ``rest`` how many of its block come after it. Untimed items are not counted one by one:
    ``items`` holds the rest, and :meth:`delivered` adds the window's.
    """

    __slots__ = (
        "busy",
        "hold",
        "items",
        "name",
        "processes",
        "rest",
        "skip",
        "skipped",
        "total",
        "wait_out",
        "waited",
        "weight",
        "window",
        "workers",
    )

    def __init__(self, name: str, workers: int = 1) -> None:
        self.name = name
        self.workers = workers
        self.items = 0
        self.skip = 0
        self.window = 0
        self.rest = 0
        self.hold = WARM
        self.weight = 1.0
        self.total = 0.0
        self.waited = 0.0
        self.busy = 0.0
        self.wait_out = 0.0
        self.skipped: list[int] = []
        self.processes: dict[int, ProcessStats] = {}  # by worker index (process stages)

    def timed(self, own: float) -> float:
        """Account a timed item that took ``own`` seconds besides blocking waits, and choose
        the next one to time. Returns the time the item stands for."""
        weighted = own * self.weight
        self.total += weighted
        self.items += 1 + self.window
        self.hold = max(self.hold - 1, int(own / HOLD_S))
        rest, self.rest = self.rest, 0
        if self.hold:  # every item from the end of this one's block on
            self.window = self.skip = rest
            self.weight = 1.0
        else:  # one item at a random place in the next block
            place = _next_place()
            self.window = self.skip = rest + place
            self.rest = SAMPLE - 1 - place
            self.weight = float(SAMPLE)
        return weighted

    def delivered(self, skip: int) -> int:
        """Items the stage handed on so far, ``skip`` being what its countdown has left."""
        return self.items + self.window - skip

    def snapshot(
        self, busy: float, wait_in: float, depth: int, capacity: int, skip: int
    ) -> StageStats:
        return StageStats(
            self.name,
            self.delivered(skip),
            busy,
            wait_in,
            self.wait_out,
            depth,
            capacity,
            self.workers,
            tuple(self.skipped),
            tuple(self.processes[i] for i in sorted(self.processes)),
        )


now = time.perf_counter

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident memory now (Linux), else its peak."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
