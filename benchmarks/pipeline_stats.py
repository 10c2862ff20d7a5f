"""pipeline_stats: what collecting stats() costs.

Each stage times its own ``next`` (two clock reads) and derives everything else at snapshot
time. The cost is measured two ways on three paths (vectorised batches over arrays, samples
through an inline map, samples through a thread map):
- accounted: the accounting each delivered item runs (stage ``next`` calls and clock reads per
  item, counted exactly) priced by timeit (an untimed item: a countdown, not counted one by one;
  a timed one: two clock reads and the updates), ÷ the time per item. Stages whose items take
  under 20 µs are timed on one item in 16 (``_core.stats.weighed``);
- A/B: the same pipeline with the clock replaced by a constant, paired runs back to back
  (which goes first alternates), median of the paired ratios. On this machine, whose speed
  drifts by more than 1% within seconds, this one is the noisier.
Target: collecting stats costs under 1% of throughput.
"""

from __future__ import annotations

import statistics
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np

import slipstream as ss
from _common import emit, log, parser
from slipstream._core.stats import Meter


def _clocked_modules() -> list[Any]:
    from slipstream._core import stats

    return [
        m
        for name, m in sys.modules.items()
        if name.startswith("slipstream") and getattr(m, "now", None) is stats.now
    ]


def run(
    make: Callable[[], ss.Pipeline], clock: Callable[[], float] | None = None
) -> tuple[float, int]:
    """Items/s of one pass, with the stages' clock replaced by ``clock`` when given."""
    modules = _clocked_modules()
    real = modules[0].now
    if clock is not None:
        for m in modules:
            m.now = clock
    try:
        pipe = make()
        t0 = time.perf_counter()
        n = sum(1 for _ in pipe)
        return n / (time.perf_counter() - t0), n
    finally:
        for m in modules:
            m.now = real


def reads_per_item(make: Callable[[], ss.Pipeline]) -> float:
    calls = 0

    def counting() -> float:
        nonlocal calls
        calls += 1
        return time.perf_counter()

    _, n = run(make, counting)
    return calls / n


def next_calls_per_item(make: Callable[[], ss.Pipeline]) -> float:
    """How many stage ``next`` calls one delivered item costs (each runs the accounting)."""
    from slipstream.data._node import Node

    calls = 0
    real = Node.next

    def counting(self: Node) -> Any:
        nonlocal calls
        calls += 1
        return real(self)

    Node.next = counting  # type: ignore[method-assign]
    try:
        _, n = run(make)
    finally:
        Node.next = real  # type: ignore[method-assign]
    return calls / n


def section_costs_s() -> tuple[float, float]:
    """Seconds of accounting for one untimed item and for one timed item (timeit, best of 5)."""
    from slipstream._core.stats import now, weighed

    m = Meter("x")
    g = {"now": now, "m": m, "weighed": weighed}
    untimed = (
        "m.skip = 1\nif m.skip:\n    m.skip -= 1\n"
        "    try:\n        pass\n    except BaseException:\n        raise"
    )
    timed = (
        "m.skip = 0\nif not m.skip:\n    t0 = now(); dt, skip = weighed(now() - t0)\n"
        "    m.total += dt; m.items += 1 + m.window; m.window = m.skip = skip"
    )
    base = "m.skip = 1"
    reps = 500_000

    def best(stmt: str) -> float:
        return min(timeit.repeat(stmt, number=reps, repeat=5, globals=g)) / reps

    floor = best(base)
    return best(untimed) - floor, best(timed) - floor


def main() -> None:
    args = parser(__doc__).parse_args()
    rounds = 5 if args.quick else 21
    x = np.random.default_rng(0).random((200_000, 16), dtype=np.float32)
    paths: dict[str, Callable[[], ss.Pipeline]] = {
        "batches": lambda: ss.from_arrays(x).shuffle(seed=0).batch(256),
        "inline_map": lambda: ss.from_arrays(x[:50_000]).map(np.sum, workers=0),
        "thread_map": lambda: ss.from_arrays(x[:20_000]).map(np.sum, workers=2),
    }
    untimed_s, timed_s = section_costs_s()
    reads = {name: reads_per_item(make) for name, make in paths.items()}
    calls = {name: next_calls_per_item(make) for name, make in paths.items()}
    rates: dict[str, list[float]] = {k: [] for k in paths}
    ab: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds):
        for name, make in paths.items():
            if r % 2:  # alternate which runs first: no order bias
                off, on = run(make, lambda: 0.0)[0], run(make)[0]
            else:
                on, off = run(make)[0], run(make, lambda: 0.0)[0]
            rates[name].append(on)
            ab[name].append(off / on - 1)
        log(f"round {r + 1}: " + ", ".join(f"{k} {100 * v[-1]:+.2f}%" for k, v in ab.items()))
    per_item = {k: 1 / statistics.median(v) for k, v in rates.items()}
    # every next call runs the untimed path's checks; a timed one (2 reads) costs the difference
    cost = {k: calls[k] * untimed_s + reads[k] / 2 * (timed_s - untimed_s) for k in paths}
    accounted = {k: cost[k] / per_item[k] for k in paths}
    log(
        f"accounting: untimed item {untimed_s * 1e9:.0f} ns, timed item {timed_s * 1e9:.0f} ns; "
        + ", ".join(f"{k} {100 * v:.2f}%" for k, v in accounted.items())
    )
    emit(
        "pipeline_stats",
        {
            "accounting_ns": {
                "untimed_item": round(untimed_s * 1e9),
                "timed_item": round(timed_s * 1e9),
            },
            "stage_next_calls_per_item": {k: round(v, 3) for k, v in calls.items()},
            "clock_reads_per_item": {k: round(v, 3) for k, v in reads.items()},
            "time_per_item_us": {k: round(v * 1e6, 3) for k, v in per_item.items()},
            "accounted_overhead_percent": {k: round(100 * v, 2) for k, v in accounted.items()},
            "ab_overhead_percent_median": {
                k: round(100 * statistics.median(v), 2) for k, v in ab.items()
            },
        },
        {k: round(1 + v, 4) for k, v in accounted.items()},
        {"rounds": rounds, "quick": args.quick},
    )


if __name__ == "__main__":
    main()
