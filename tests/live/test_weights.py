"""The weight store never hands a reader a half-written model; weight files are atomic."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest
import torch

from slipstream import LifecycleError, SlipstreamError
from slipstream.live import WeightFiles, WeightStore
from slipstream.live._weights import slots_from


def _model(value: float) -> dict[str, torch.Tensor]:
    # about 4 MB in three tensors of different dtypes: a write takes long enough to be caught
    return {
        "a": torch.full((512, 1024), value),
        "b": torch.full((1000,), value, dtype=torch.float64),
        "c": torch.full((300, 1024), int(value), dtype=torch.int32),
    }


def test_a_store_round_trips_versions_and_attaches_by_name() -> None:
    store = WeightStore.create(_model(0))
    try:
        assert store.version == -1 and store.read() is None
        store.write(7, _model(7))
        other = WeightStore.attach(store.name, slots_from(store.describe()["layout"]))
        snap = other.read()
        assert snap is not None and snap.version == 7 and other.version == 7
        for name, t in _model(7).items():
            assert torch.equal(snap.tensors[name], t)
        assert abs(snap.published - time.time()) < 60
        other.close()
    finally:
        store.close()
    with pytest.raises(LifecycleError, match="is gone"):
        WeightStore.attach(store.name, store.layout)


def _hammer(store: WeightStore, model: dict[str, torch.Tensor], versions: int) -> None:
    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool
    for v in range(1, versions + 1):
        for t in model.values():
            t.fill_(v)
        store.write(v, model)
        time.sleep(0.002)  # pacing: a writer that never pauses starves every seqlock reader
    os._exit(0)


def _torn(tensors: dict[str, torch.Tensor], version: int) -> bool:
    return not all(bool((t == version).all()) for t in tensors.values())


def test_hammer_no_reader_ever_sees_a_torn_model() -> None:
    store = WeightStore.create(_model(0))
    writer = mp.get_context("fork").Process(target=_hammer, args=(store, _model(0), 400))
    try:
        writer.start()
        seen, torn_raw, reads = set(), 0, 0
        deadline = time.monotonic() + 120
        while (writer.is_alive() or reads == 0) and time.monotonic() < deadline:
            snap = store.read()
            if snap is not None:
                reads += 1
                seen.add(snap.version)
                assert not _torn(snap.tensors, snap.version), f"torn read of {snap.version}"
            # the same copy without the seqlock's check: proves the hammer does overlap writes
            raw = store._views(store._data.clone())
            torn_raw += _torn(raw, int(raw["b"][0]))
        writer.join(30)
        assert writer.exitcode == 0
        assert len(seen) > 10, f"the reader saw only versions {sorted(seen)}"
        assert torn_raw > 0, "no unchecked copy overlapped a write: the hammer proves nothing"
    finally:
        if writer.is_alive():
            writer.kill()
            writer.join()
        store.close()


def test_weight_files_are_atomic_and_pruned(tmp_path: Path) -> None:
    files = WeightFiles(tmp_path / "weights", keep=3)
    for v in (10, 20, 30, 40):
        files.write(v, {"w": torch.full((4,), float(v))}, published=123.5)
    assert files.versions() == [20, 30, 40]
    snap = files.read()
    assert snap is not None and snap.version == 40 and snap.published == 123.5
    assert torch.equal(snap.tensors["w"], torch.full((4,), 40.0))
    assert not [p for p in (tmp_path / "weights").iterdir() if p.name.startswith(".")]
    with pytest.raises(SlipstreamError, match=r"version 10 is not on disk.*\[20, 30, 40\]"):
        files.read(10)
    assert WeightFiles(tmp_path / "none").read() is None
