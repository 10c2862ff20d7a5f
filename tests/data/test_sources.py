"""Each source on real files it writes itself; local paths and fsspec URLs alike."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

import slipstream as ss
from tests.data.helpers import ids, write_files, write_parquet, write_tar


def test_from_arrays_numpy_torch_dicts_tuples() -> None:
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    y = torch.arange(10)
    samples = list(ss.from_arrays({"x": x, "y": y}))
    assert len(samples) == 10
    assert np.array_equal(samples[3]["x"], x[3]) and samples[3]["y"].item() == 3
    batch = next(iter(ss.from_arrays((x, y)).batch(4)))
    assert (
        isinstance(batch, tuple) and batch[0].shape == (4, 2) and isinstance(batch[1], torch.Tensor)
    )


def test_from_arrays_dataframe() -> None:
    df = pd.DataFrame({"a": np.arange(6), "name": list("abcdef")})
    rows = list(ss.from_arrays(df))
    assert rows[2] == {"a": 2, "name": "c"}
    batch = next(iter(ss.from_arrays(df).batch(6)))
    assert batch["name"] == list("abcdef") and batch["a"].tolist() == list(range(6))


def test_from_arrays_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match=r"same length.*\['x'\]: 3.*\['y'\]: 4"):
        ss.from_arrays({"x": np.zeros(3), "y": np.zeros(4)})


def test_from_numpy_memory_maps(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(50))
    pipe = ss.from_numpy({"x": str(tmp_path / "x.npy"), "y": str(tmp_path / "y.npy")})
    assert isinstance(pipe.source._tree["x"], np.memmap)  # type: ignore[attr-defined]
    got = next(iter(pipe.shuffle(seed=0).batch(50)))
    assert np.allclose(x[got["y"]], got["x"])


def test_from_parquet_reads_row_groups_and_columns(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", 250, row_group=40)
    write_parquet(tmp_path / "b.parquet", 100, row_group=30, start=250)
    pipe = ss.from_parquet(str(tmp_path / "*.parquet"))
    assert len(pipe) == 350
    assert pipe.source.block_sizes.tolist() == [40] * 6 + [10] + [30] * 3 + [10]  # type: ignore[union-attr]
    rows = list(pipe)
    assert ids(rows) == list(range(350))
    assert rows[260]["blob"] == b"row-260" and rows[260]["vec"].tolist() == [260.0] * 3
    only = next(iter(ss.from_parquet(str(tmp_path / "*.parquet"), columns=["id"]).batch(8)))
    assert set(only) == {"id"}
    batch = next(iter(pipe.batch(16)))  # arrays the batch owns: writable, torch takes them
    assert batch["id"].flags.writeable and batch["vec"].flags.writeable


def test_from_parquet_random_access_batch_equals_row_by_row(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", 300, row_group=64)
    pipe = ss.from_parquet(str(tmp_path / "a.parquet")).shuffle(seed=5)
    fused = list(pipe.batch(32))  # one vectorised read per batch
    rowwise = list(pipe.map(lambda r: r, workers=0).batch(32))
    for a, b in zip(fused, rowwise, strict=True):
        assert a["id"].tolist() == b["id"].tolist() and a["blob"] == b["blob"]
        assert np.array_equal(a["vec"], b["vec"])


def test_a_dropped_parquet_pipeline_closes_its_files(tmp_path: Path) -> None:
    import gc
    import warnings

    write_parquet(tmp_path / "a.parquet", 100, row_group=30)
    pipe = ss.from_parquet(str(tmp_path / "a.parquet")).batch(16)
    assert len(list(pipe)) == 7  # the source keeps its files open for the next epoch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del pipe  # never closed: dropping it must close the files, not leave them to warn
        gc.collect()
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


def test_from_parquet_unknown_column_is_named(tmp_path: Path) -> None:
    write_parquet(tmp_path / "a.parquet", 10, row_group=5)
    with pytest.raises(ss.ArgumentError, match=r"\['nope'\] not in .*a.parquet"):
        ss.from_parquet(str(tmp_path / "a.parquet"), columns=["id", "nope"])


def test_from_files_local_glob_list_and_memory_url(tmp_path: Path) -> None:
    paths = write_files(tmp_path, 30)
    by_glob = list(ss.from_files(str(tmp_path / "*.bin")))
    by_list = list(ss.from_files([str(p) for p in paths], concurrency=3))
    assert [s["path"] for s in by_glob] == [str(p) for p in paths]
    assert by_glob == by_list and by_glob[7]["bytes"] == (7).to_bytes(4, "little") * 8

    import fsspec

    mem = fsspec.filesystem("memory")
    for i in range(5):
        mem.pipe(f"/slipstream-test/{i}.bin", bytes([i]) * 3)
    try:
        got = list(ss.from_files("memory://slipstream-test/*.bin"))
        assert [s["bytes"] for s in got] == [bytes([i]) * 3 for i in range(5)]
    finally:
        mem.rm("/slipstream-test", recursive=True)


def test_from_files_no_match_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ss.SourceError, match="no files match"):
        ss.from_files(str(tmp_path / "*.none"))


def test_from_tar_groups_members_by_key(tmp_path: Path) -> None:
    write_tar(tmp_path / "s0.tar", list(range(0, 4)))
    write_tar(tmp_path / "s1.tar", list(range(4, 7)))
    samples = list(ss.from_tar(str(tmp_path / "s*.tar")))
    assert [s["__key__"] for s in samples] == [f"sample{k:05d}" for k in range(7)]
    assert samples[5]["txt"] == b"5:txt" and samples[5]["cls"] == b"5:cls"


def test_from_iterable_sync_async_and_factories() -> None:
    assert list(ss.from_iterable(range(4))) == [0, 1, 2, 3]

    async def agen():  # type: ignore[no-untyped-def]
        for i in range(3):
            await asyncio.sleep(0)
            yield i * 10

    assert list(ss.from_iterable(agen())) == [0, 10, 20]
    pipe = ss.from_iterable(lambda: iter(range(3)))
    assert list(pipe) == list(pipe) == [0, 1, 2]  # a factory gives every epoch afresh


def test_a_consumed_iterator_says_how_to_get_more_epochs() -> None:
    pipe = ss.from_iterable(iter(range(3)))
    assert list(pipe) == [0, 1, 2]
    with pytest.raises(ss.LifecycleError, match="pass a function"):
        list(pipe)


class Squares:
    """A source of one's own: the protocol is a handful of attributes and methods."""

    name = "squares"
    io_bound = False
    block_sizes = None

    def __len__(self) -> int:
        return 1000

    def read(self, indices: np.ndarray) -> np.ndarray:
        return indices**2

    def for_workers(self, owner: object, *, fork: bool) -> Squares:
        return self


def test_a_source_of_ones_own_gets_every_stage() -> None:
    pipe = (
        ss.Pipeline(Squares()).shuffle(seed=1).map(lambda v: int(v) + 1, mode="process", workers=2)
    )
    out = sorted(pipe)
    assert out == [i * i + 1 for i in range(1000)]
    assert next(iter(ss.Pipeline(Squares()).batch(4))).tolist() == [0, 1, 4, 9]


def test_parquet_and_tar_through_an_fsspec_url(tmp_path: Path) -> None:
    import fsspec

    write_parquet(tmp_path / "a.parquet", 50, row_group=20)
    write_tar(tmp_path / "s.tar", list(range(6)))
    mem = fsspec.filesystem("memory")
    mem.pipe("/slipstream-url/a.parquet", (tmp_path / "a.parquet").read_bytes())
    mem.pipe("/slipstream-url/s.tar", (tmp_path / "s.tar").read_bytes())
    try:
        rows = list(ss.from_parquet("memory://slipstream-url/*.parquet").shuffle(seed=1))
        assert sorted(ids(rows)) == list(range(50))
        samples = list(ss.from_tar("memory://slipstream-url/s.tar"))
        assert [s["txt"] for s in samples] == [f"{k}:txt".encode() for k in range(6)]
    finally:
        mem.rm("/slipstream-url", recursive=True)


def double_x(sample: dict[str, Any]) -> Any:
    return sample["x"] * 2


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_spawned_workers_map_arrays_from_shared_memory(method: str) -> None:
    x = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    pipe = ss.from_arrays({"x": x}).map(double_x, mode="process", workers=2, start_method=method)
    out = next(iter(pipe.batch(20)))
    assert torch.equal(torch.as_tensor(out), x * 2)
    # the conftest leak check proves the shared copy of the arrays was released
