"""stats(): where the time goes, per stage and for the consumer."""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import slipstream as ss
from slipstream._core.stats import Meter


def slow(x: Any) -> Any:
    time.sleep(0.002)  # stands in for real work that releases the GIL
    return x


def test_stats_name_every_stage_and_count_items() -> None:
    pipe = ss.from_arrays(np.arange(200)).shuffle(seed=0).map(slow, workers=4).batch(10).prefetch(2)
    assert list(pipe)
    st = pipe.stats()
    # a map followed by batch runs as one task per batch: samples are grouped, then mapped
    assert [s.name for s in st.stages] == ["read(arrays)", "batch(10)", "map(slow)", "prefetch(2)"]
    by = {s.name: s for s in st.stages}
    assert by["read(arrays)"].items == 200
    assert (
        by["batch(10)"].items == by["map(slow)"].items == by["prefetch(2)"].items == st.items == 20
    )
    assert by["map(slow)"].busy_s >= 0.3  # 200 × 2 ms over its workers
    assert by["map(slow)"].workers == 4 and by["map(slow)"].queue_capacity == 8
    assert 0 < st.stall_s <= st.elapsed_s and 0 < st.stall_fraction <= 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.items = 0  # type: ignore[misc]
    assert "map(slow)" in str(st) and "stall" in str(st)


def test_fast_stages_count_every_item_though_they_time_a_sample() -> None:
    def fails_at_900(x: Any) -> Any:
        if x == 900:
            raise ValueError("900")
        return -x

    pipe = ss.from_arrays(np.arange(1003)).map(fails_at_900, workers=0)
    it = iter(pipe)
    for _ in range(37):  # most likely within an untimed window
        next(it)
    st = pipe.stats()  # the consumer's iterator holds one item ahead
    assert [s.items for s in st.stages] == [38, 38] and st.items == 37
    with pytest.raises(ss.StageError, match="sample 900"):
        list(it)
    assert [s.items for s in pipe.stats().stages] == [901, 900]  # 900 was read, not mapped
    pipe = ss.from_arrays(np.arange(1003)).map(np.negative, workers=0)
    assert len(list(pipe)) == 1003
    assert [s.items for s in pipe.stats().stages] == [1003, 1003] and pipe.stats().items == 1003


def test_a_slow_consumer_shows_as_output_wait_not_stall() -> None:
    pipe = ss.from_arrays(np.arange(40)).map(lambda x: x, workers=2).prefetch(2)
    for _ in pipe:
        time.sleep(0.01)  # the consumer is the bottleneck
    st = pipe.stats()
    assert st.stall_fraction < 0.3
    assert st.stages[-1].wait_output_s > 0.1  # prefetch waited for room


def test_stats_accumulate_over_epochs_and_survive_close() -> None:
    pipe = ss.from_arrays(np.arange(30)).map(lambda x: x, workers=2)
    list(pipe)
    list(pipe)
    st = pipe.stats()
    assert st.items == 60 and st.stages[1].items == 60
    pipe.close()
    assert pipe.stats().items == 60


def test_skipped_indices_appear_in_stats() -> None:
    def bad_fives(x: Any) -> Any:
        if x % 5 == 0:
            raise ValueError
        return x

    pipe = ss.from_arrays(np.arange(20)).map(bad_fives, errors="skip")
    list(pipe)
    assert pipe.stats().skipped == (0, 5, 10, 15)


def _consume_timing_next(pipe: ss.Pipeline) -> float:
    """Iterate ``pipe`` to the end; the seconds spent inside ``next``, as the consumer saw them."""
    it, inside = iter(pipe), 0.0
    while True:
        t0 = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            return inside
        finally:
            inside += time.perf_counter() - t0


@pytest.mark.parametrize("period", [16, 5])
@pytest.mark.parametrize("inline_head", [False, True])
def test_waits_count_in_full_whatever_their_period(period: int, inline_head: bool) -> None:
    def reads() -> Iterator[int]:
        for i in range(30 * period):
            if i % period == 0:
                time.sleep(0.002)  # a slow read every `period` items: the consumer waits on it
            yield i

    pipe = ss.from_iterable(reads)
    if inline_head:  # a fast stage in the consumer's thread, above the waiting one
        pipe = pipe.map(abs, workers=0)
    inside = _consume_timing_next(pipe)
    stall = pipe.stats().stall_s
    assert inside >= 0.06  # 30 reads of 2 ms
    # the waits exact, the rest sampled: a timed item stands for its block of 64, so one that
    # the OS paused counts 64 times (unbiased, yet a few ms either way); counting a wait twice
    # would add 60 ms
    assert 0.85 * inside <= stall <= 1.05 * inside + 0.01


def test_a_fast_stage_with_periodic_slow_items_is_timed_in_full() -> None:
    spent = 0.0

    def slow_every_16th(x: Any) -> Any:
        nonlocal spent
        if x % 16 == 0:
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 0.002:  # 2 ms of work on every 16th sample
                pass
            spent += time.perf_counter() - t0
        return x

    pipe = ss.from_arrays(np.arange(1600)).map(slow_every_16th, workers=0)
    list(pipe)
    busy = pipe.stats().stages[-1].busy_s
    assert spent >= 0.2
    assert 0.95 * spent <= busy <= 1.1 * spent + 0.02  # plus the 1,500 fast samples' few µs


def test_sampled_timing_is_unbiased_on_mixed_item_times() -> None:
    # one item in ten takes 20x longer, at random: timing one item in 16 after every fast one
    # (the old rule) counted the windows as fast and came to 0.4x the true total
    draw = random.Random(1).random
    times = [100e-6 if draw() < 0.1 else 5e-6 for _ in range(100_000)]
    m, timed = Meter("x"), 0
    for t in times:
        if m.skip:
            m.skip -= 1
        else:
            m.timed(t)
            timed += 1
    assert m.delivered(m.skip) == len(times)
    assert m.total == pytest.approx(sum(times), rel=0.15)
    assert timed < len(times) / 4  # a sample: most items were not timed
