"""Each stage's behaviour."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest
import torch

import slipstream as ss


def test_batch_collates_dicts_tuples_arrays_and_tensors() -> None:
    samples = [
        {"img": np.full((2, 2), i), "t": torch.tensor([i]), "pair": (i, f"s{i}")} for i in range(5)
    ]
    batch = next(iter(ss.from_iterable(samples).batch(5)))
    assert batch["img"].shape == (5, 2, 2) and batch["t"].shape == (5, 1)
    assert batch["pair"][0].tolist() == [0, 1, 2, 3, 4] and batch["pair"][1] == [
        f"s{i}" for i in range(5)
    ]


def test_batch_drop_last_and_ragged_collate() -> None:
    assert [len(b) for b in ss.from_arrays(np.arange(10)).batch(4)] == [4, 4, 2]
    assert [len(b) for b in ss.from_arrays(np.arange(10)).batch(4, drop_last=True)] == [4, 4]
    ragged = ss.from_iterable(lambda: (np.arange(i) for i in range(1, 6)))
    with pytest.raises(ss.StageError, match=r"batch starting at sample 0.*collate="):
        list(ragged.batch(2))
    lengths = [[len(x) for x in b] for b in ragged.batch(2, collate=list)]
    assert lengths == [[1, 2], [3, 4], [5]]


def test_unbatch_inverts_batch() -> None:
    data = {"x": np.arange(10), "y": np.arange(10) * 2}
    out = list(ss.from_arrays(data).batch(3).unbatch())
    assert [int(s["y"]) for s in out] == list(range(0, 20, 2))


def test_filter_keeps_matching_samples() -> None:
    assert list(ss.from_arrays(np.arange(10)).filter(lambda v: v % 2 == 0)) == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_map_runs_in_parallel_workers(mode: str) -> None:
    def who(_: Any) -> str:
        import os

        return f"{os.getpid()}-{threading.get_ident()}"

    seen = set(ss.from_arrays(np.arange(400)).map(who, mode=mode, workers=3))
    assert len(seen) >= 2


def test_async_map_overlaps_waits() -> None:
    started = 0
    peak = 0

    async def slow(v: Any) -> Any:
        nonlocal started, peak
        started += 1
        peak = max(peak, started)
        await asyncio.sleep(0.01)
        started -= 1
        return v

    out = list(ss.from_arrays(np.arange(100)).map(slow, concurrency=32))
    assert out == list(range(100)) and peak >= 16


def test_unordered_map_yields_everything() -> None:
    out = list(ss.from_arrays(np.arange(200)).map(lambda v: v * 2, workers=4, ordered=False))
    assert sorted(out) == list(range(0, 400, 2))


def test_shuffle_window_on_a_stream_is_bounded_and_complete() -> None:
    out = list(ss.from_iterable(lambda: range(100)).shuffle(seed=1, window=10))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert all(j // 10 == v // 10 for j, v in enumerate(out))  # stays within its window


def test_shuffle_of_tar_shards_changes_shard_order(tmp_path: Any) -> None:
    from tests.data.helpers import write_tar

    for s in range(6):
        write_tar(tmp_path / f"s{s}.tar", [s * 10 + k for k in range(3)])
    pipe = ss.from_tar(str(tmp_path / "*.tar")).shuffle(seed=0, window=1)
    first = [int(x["__key__"][6:]) // 10 for x in pipe][::3]
    assert sorted(first) == list(range(6)) and first != list(range(6))


def test_prefetch_runs_ahead_in_a_thread() -> None:
    produced = []
    gate = threading.Event()

    def record(v: Any) -> Any:
        produced.append(v)
        if len(produced) == 3:
            gate.set()
        return v

    pipe = ss.from_arrays(np.arange(20)).map(record, workers=0).prefetch(3)
    it = iter(pipe)
    assert next(it) == 0
    assert gate.wait(5.0)  # ran ahead of the consumer
    assert list(it) == list(range(1, 20))


def test_to_device_on_cpu_makes_tensors() -> None:
    batch = next(iter(ss.from_arrays({"x": np.ones((4, 3), np.float32)}).batch(4).to_device("cpu")))
    assert isinstance(batch["x"], torch.Tensor) and batch["x"].device.type == "cpu"


def test_length_is_known_where_it_can_be() -> None:
    pipe = ss.from_arrays(np.arange(10))
    assert len(pipe) == 10 and len(pipe.batch(3)) == 4 and len(pipe.batch(3, drop_last=True)) == 3
    assert len(pipe.shard(1, 3)) == 3 and len(pipe.shard(0, 3).batch(2)) == 2
    with pytest.raises(TypeError, match="unknown"):
        len(pipe.filter(bool))
