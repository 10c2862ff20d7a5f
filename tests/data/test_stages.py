"""Each stage's behaviour."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from typing import Any

import numpy as np
import psutil
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


def _sample(i: int) -> Any:
    """Samples (64 KiB: copied into the batch as made) of arrays, tensors, numbers, strings."""
    img = np.full((128, 128), i, dtype=np.float32 if i != 6 else np.float64)  # one float64
    return {"img": img, "t": torch.arange(3) * i, "meta": (i, f"s{i}", [i / 2])}


def _grows(i: int) -> np.ndarray:
    return np.zeros((128, 128 if i < 5 else 129))


def _rekeyed(i: int) -> dict[str, np.ndarray]:
    return {"a": np.zeros((128, 128))} if i < 5 else {"b": np.zeros((128, 128))}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.shape == b.shape and np.array_equal(a, b)
    return bool(a == b)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_workers_collate_as_results_come_what_batch_collates(mode: str) -> None:
    """A map followed by batch runs as one task per batch: each result is copied into the batch
    as it is made. Batches match a plain batch of the same samples, whatever the leaves."""
    source = ss.from_arrays(np.arange(12))
    reference = list(source.map(_sample, workers=0).batch(8))  # batch collates the list
    fused = list(source.map(_sample, workers=2, mode=mode).batch(8))
    assert len(fused) == len(reference) == 2
    for got, want in zip(fused, reference, strict=True):
        got["img"] = got["img"].astype(want["img"].dtype)  # a shared-memory batch keeps float32
        assert _equal(got, want), (got, want)
    for fn, why in ((_grows, "cannot stack"), (_rekeyed, "differ in structure")):
        with pytest.raises(ss.StageError, match=why):
            list(source.map(fn, workers=2, mode=mode).batch(8))


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


def _pid(_: Any) -> int:
    return os.getpid()


def _pids(pipe: ss.Pipeline) -> set[int]:
    return {int(pid) for batch in pipe for pid in batch}


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_process_workers_live_from_epoch_to_epoch_until_the_pipeline_closes() -> None:
    pipe = ss.from_arrays(np.arange(64)).map(_pid, mode="process", workers=2).batch(8)
    first = _pids(pipe)
    assert len(first) == 2 and _pids(pipe) == first  # the same workers served the next epoch
    dead = min(first)
    os.kill(dead, signal.SIGKILL)  # dies between epochs: the next epoch starts new workers
    deadline = time.monotonic() + 10
    while not _gone(dead):
        assert time.monotonic() < deadline, "the killed worker did not exit"
        time.sleep(0.01)
    fresh = _pids(pipe)
    assert len(fresh) == 2 and fresh.isdisjoint(first)
    pipe.close()
    assert all(_gone(pid) for pid in fresh)


def test_a_worker_reaped_by_another_thread_is_not_kept_for_the_next_epoch() -> None:
    # The collector's join and the next pass's check both wait on a dead worker; whichever
    # reaps it second learns nothing from waitpid. Reaping it here, usually before the
    # collector, stands in for the collector winning that race.
    pipe = ss.from_arrays(np.arange(64)).map(_pid, mode="process", workers=2).batch(8)
    first = _pids(pipe)
    dead = min(first)
    os.kill(dead, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):  # the collector was first this time
        os.waitpid(dead, 0)
    fresh = _pids(pipe)
    assert len(fresh) == 2 and fresh.isdisjoint(first)
    pipe.close()


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
