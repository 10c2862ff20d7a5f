"""Same seed, same output: whatever the worker count, the mode or the rank layout."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import slipstream as ss
from tests.data.helpers import write_parquet, write_tar


def augment(x: Any) -> Any:
    rng = ss.sample_rng()
    return float(x["v"]) + float(rng.normal()), int(ss.sample_seed() % 1000)


async def aaugment(x: Any) -> Any:
    await asyncio.sleep(0)
    return augment(x)


def test_output_is_identical_across_workers_and_modes() -> None:
    base = ss.from_arrays({"v": np.arange(300, dtype=np.float32)}).shuffle(seed=11)
    reference = list(base.map(augment, workers=0))
    variants = [
        base.map(augment, workers=1),
        base.map(augment, workers=4),
        base.map(augment, mode="process", workers=1),
        base.map(augment, mode="process", workers=3),
        base.map(aaugment, concurrency=7),
    ]
    for pipe in variants:
        assert list(pipe) == reference


def test_different_epochs_and_seeds_draw_differently() -> None:
    pipe = ss.from_arrays({"v": np.zeros(50)}).map(augment, workers=2)
    e0, e1 = list(pipe), list(pipe)
    assert e0 != e1
    other = ss.from_arrays({"v": np.zeros(50)}).options(seed=9).map(augment, workers=2)
    assert list(other) != e0


def test_sample_rng_outside_a_stage_says_where_it_works() -> None:
    with pytest.raises(ss.LifecycleError, match="inside a function"):
        ss.sample_rng()


@pytest.mark.parametrize("world", [2, 3, 5])
def test_ranks_together_cover_each_sample_exactly_once(world: int, tmp_path: Path) -> None:
    write_parquet(tmp_path / "p.parquet", 101, row_group=9)
    for s in range(5):
        write_tar(tmp_path / f"s{s}.tar", list(range(s * 20, s * 20 + 20)))
    makers = {
        "arrays": (lambda: ss.from_arrays(np.arange(101)).shuffle(seed=1), int),
        "parquet": (
            lambda: ss.from_parquet(str(tmp_path / "p.parquet")).shuffle(seed=1),
            lambda r: int(r["id"]),
        ),
        "tar": (
            lambda: ss.from_tar(str(tmp_path / "*.tar")).shuffle(seed=1),
            lambda s: int(s["__key__"][6:]),
        ),
        "stream": (lambda: ss.from_iterable(lambda: range(101)), int),
    }
    for name, (make, key) in makers.items():
        everything = sorted(key(x) for x in make())
        union = sorted(key(x) for r in range(world) for x in make().shard(r, world))
        assert union == everything, name


def test_even_options_give_every_rank_the_same_batch_count() -> None:
    for even in ("pad", "drop"):
        counts = {
            len(list(ss.from_arrays(np.arange(103)).shard(r, 4, even=even).batch(5)))
            for r in range(4)
        }  # type: ignore[arg-type]
        assert len(counts) == 1, even


def test_even_on_a_sequential_source_says_why_not(tmp_path: Path) -> None:
    write_tar(tmp_path / "s.tar", [1, 2])
    with pytest.raises(ss.ArgumentError, match=r"`even='pad'` needs a random-access source"):
        ss.from_tar(str(tmp_path / "s.tar")).shard(0, 2, even="pad")
    with pytest.raises(ss.ArgumentError, match="needs a random-access source"):
        ss.from_iterable(lambda: range(4)).shard(1, 2, even="drop")
