"""stats(): where the time goes, per stage and for the consumer."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import pytest

import slipstream as ss


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


def test_fast_stages_count_every_item_though_they_time_one_in_sixteen() -> None:
    def fails_at_900(x: Any) -> Any:
        if x == 900:
            raise ValueError("900")
        return -x

    pipe = ss.from_arrays(np.arange(1003)).map(fails_at_900, workers=0)
    it = iter(pipe)
    for _ in range(37):  # within an untimed window
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
