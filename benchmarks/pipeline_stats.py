"""pipeline_stats: what collecting stats() costs.

Each stage accounts for the items its ``next`` hands on: it counts them down to the next one to
time, times one item at a random place in each block of 64 (every item when items take 100 µs or
more) and times blocking waits where they happen; the rest is derived at snapshot time. The cost
is measured two ways on three paths (vectorised batches over arrays, samples through an inline
map, samples through a thread map):
- accounted: the untimed and timed items each delivered item runs (counted exactly), priced by
  timeit on the real code of a trivial stage against calling its ``_next`` directly (so the
  price includes the call that ``next`` adds): ``Node.next`` for stages below the head, the
  consumer's ``Run._fetch`` (which runs the head's countdown itself) for the head; ÷ the time
  per item;
- A/B: the same pipeline with no accounting at all (callers call ``_next`` directly, nothing is
  counted or timed), paired runs back to back (which goes first alternates), median of the paired
  ratios. On this machine, whose speed drifts by more than 1% within seconds, this one is the
  noisier.
Target: collecting stats costs under 1% of throughput.
"""

from __future__ import annotations

import statistics
import time
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np

import slipstream as ss
from _common import emit, log, parser
from slipstream._core.stats import Meter
from slipstream.data._node import Ctx, Item, Node
from slipstream.data._run import Run, State


def _bare_next(self: Node) -> Item:
    return self._next()


def _bare_fetch(self: Run) -> Item | Exception:
    try:
        return self.head._next()
    except Exception as e:
        return e


def _running(pipe: ss.Pipeline) -> Run:
    """The pass ``pipe`` is running (after ``iter(pipe)``)."""
    run = pipe._run() if pipe._run is not None else None
    assert run is not None
    return run


def _unaccounted(run: Run) -> list[Node]:
    """Strip the accounting from a running pass: every caller calls ``_next``. Returns the
    nodes changed."""
    nodes = [node for node in run.head.chain() if type(node).next is Node.next]
    for node in nodes:
        node.next = node._next  # type: ignore[method-assign]
    return nodes


def run(make: Callable[[], ss.Pipeline], stats: bool = True) -> tuple[float, int]:
    """Items/s of one pass; with ``stats=False``, stages hand items on unaccounted."""
    real = Node.next, Run._fetch
    pipe = make()
    it = iter(pipe)
    stripped: list[Node] = []
    if not stats:
        stripped = _unaccounted(_running(pipe))
        Node.next = _bare_next  # type: ignore[method-assign]  # a subclass's super().next()
        Run._fetch = _bare_fetch  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        n = sum(1 for _ in it)
        return n / (time.perf_counter() - t0), n
    finally:
        Node.next, Run._fetch = real  # type: ignore[method-assign]
        for node in stripped:
            del node.next  # no cycle left for the collector to find during the next run


def calls_per_item(make: Callable[[], ss.Pipeline], cls: type, method: str) -> float:
    """How many calls of ``cls.method`` one delivered item costs."""
    calls = 0
    real = getattr(cls, method)

    def counting(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args)

    setattr(cls, method, counting)
    try:
        _, n = run(make)
    finally:
        setattr(cls, method, real)
    return calls / n


def head_items_per_item(make: Callable[[], ss.Pipeline]) -> float:
    """1 when the head's countdown runs in ``Run._fetch`` (inlined), else 0."""
    pipe = make()
    it = iter(pipe)
    inline = float(_running(pipe)._inline)
    it.close()  # type: ignore[attr-defined]
    return inline


class _Constant(Node):
    """A stage whose own work is nothing: what is left of its ``next`` is the accounting."""

    def __init__(self) -> None:
        super().__init__("constant", None)
        self.item = Item(0, None, 0)

    def _next(self) -> Item:
        return self.item


def section_costs_s() -> tuple[float, float, float]:
    """Seconds of accounting for one untimed item through ``Node.next``, one untimed item
    through ``Run._fetch`` (the head's) and one timed item (timeit, best of 5), each over what
    the call costs with no accounting. Countdowns run on small numbers, as they do."""
    node = _Constant()
    node.start(Ctx(0, 0), None)
    head = Run(_Constant(), State(), Ctx(0, 0), lambda run: None, False)
    g = {"node": node, "head": head, "bare_fetch": _bare_fetch}
    reps = 500_000

    def best(stmt: str) -> float:
        return min(timeit.repeat(stmt, number=reps, repeat=5, globals=g)) / reps

    direct = best("node._next()")
    untimed = best("node.skip = 60\nnode.next()") - best("node.skip = 60") - direct
    fetch = best("head.head.skip = 60\nhead._fetch()") - best("head.head.skip = 60")
    fetch_untimed = fetch - best("bare_fetch(head)")
    timed = best("node.skip = 0\nnode.next()") - best("node.skip = 0") - direct
    return untimed, fetch_untimed, timed


def main() -> None:
    args = parser(__doc__).parse_args()
    rounds = 5 if args.quick else 21
    x = np.random.default_rng(0).random((200_000, 16), dtype=np.float32)
    paths: dict[str, Callable[[], ss.Pipeline]] = {
        "batches": lambda: ss.from_arrays(x).shuffle(seed=0).batch(256),
        "inline_map": lambda: ss.from_arrays(x[:50_000]).map(np.sum, workers=0),
        "thread_map": lambda: ss.from_arrays(x[:20_000]).map(np.sum, workers=2),
    }
    untimed_s, fetch_s, timed_s = section_costs_s()
    # items timed (by stages' next, and by a thread map's threads, which time their own work
    # the same way), stage next calls and the head's countdowns in Run._fetch, per item
    timed = {name: calls_per_item(make, Meter, "timed") for name, make in paths.items()}
    calls = {name: calls_per_item(make, Node, "next") for name, make in paths.items()}
    heads = {name: head_items_per_item(make) for name, make in paths.items()}
    rates: dict[str, list[float]] = {k: [] for k in paths}
    ab: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds):
        for name, make in paths.items():
            if r % 2:  # alternate which runs first: no order bias
                off, on = run(make, stats=False)[0], run(make)[0]
            else:
                on, off = run(make)[0], run(make, stats=False)[0]
            rates[name].append(on)
            ab[name].append(off / on - 1)
        log(f"round {r + 1}: " + ", ".join(f"{k} {100 * v[-1]:+.2f}%" for k, v in ab.items()))
    per_item = {k: 1 / statistics.median(v) for k, v in rates.items()}
    # every next call runs the untimed path; a timed item costs the difference on top
    cost = {
        k: calls[k] * untimed_s + heads[k] * fetch_s + timed[k] * (timed_s - untimed_s)
        for k in paths
    }
    accounted = {k: cost[k] / per_item[k] for k in paths}
    log(
        f"accounting: untimed item {untimed_s * 1e9:.0f} ns ({fetch_s * 1e9:.0f} ns at the head), "
        f"timed item {timed_s * 1e9:.0f} ns; "
        + ", ".join(f"{k} {100 * v:.2f}%" for k, v in accounted.items())
    )
    emit(
        "pipeline_stats",
        {
            "accounting_ns": {
                "untimed_item": round(untimed_s * 1e9),
                "untimed_head_item": round(fetch_s * 1e9),
                "timed_item": round(timed_s * 1e9),
            },
            "stage_next_calls_per_item": {k: round(v, 3) for k, v in calls.items()},
            "head_countdowns_per_item": heads,
            "timed_per_item": {k: round(v, 3) for k, v in timed.items()},
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
