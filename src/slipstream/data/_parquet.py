"""Parquet files as a random-access source that reads whole row groups.

Indices are grouped by row group and each row group is read once into a small LRU cache, so a
block-window shuffle (the default for Parquet) reads every row group once per epoch.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Any

import numpy as np

from slipstream._core.checks import positive_int
from slipstream._core.errors import ArgumentError, CorruptDataError
from slipstream._core.extras import require
from slipstream.data._files import PathSpec
from slipstream.data._io import expand, open_binary
from slipstream.data._order import Int64s
from slipstream.data._source import RandomAccess

# What pyarrow raises for damaged files (ArrowInvalid is a ValueError, ArrowIOError an OSError).
_DAMAGED = (OSError, ValueError, EOFError)


def _column(col: Any) -> Any:
    pa = require("pyarrow", feature="from_parquet")
    t = col.type
    if pa.types.is_fixed_size_list(t) and not pa.types.is_nested(t.value_type):
        flat = col.combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return _own(flat.reshape(len(col), t.list_size))
    numeric = pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
    if numeric and col.null_count == 0:
        return _own(col.to_numpy())
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        rows = [np.asarray(v) for v in col.to_pylist()]
        same = rows and all(r.shape == rows[0].shape for r in rows)
        return np.stack(rows) if same else rows
    return col.to_pylist()


def _own(array: np.ndarray) -> np.ndarray:
    """A writable array: a zero-copy view of Arrow's memory is read-only, and torch warns of
    (and a user's in-place augmentation would fail on) read-only arrays."""
    return array if array.flags.writeable else array.copy()


class ParquetSource:
    """Rows of one or more Parquet files; ``columns`` picks columns (all when ``None``).

    ``read`` is called from one thread at a time (the engine's reader, or a worker process).
    """

    io_bound = True

    def __init__(
        self,
        paths: PathSpec,
        columns: list[str] | None = None,
        *,
        cache_blocks: int = 8,
        name: str = "parquet",
    ) -> None:
        self.pq = require("pyarrow.parquet", feature="from_parquet")
        self.name = name
        self.paths = expand(paths, "from_parquet")
        self.columns = columns
        self.cache_blocks = positive_int("cache_blocks", cache_blocks)
        self._files: OrderedDict[int, Any] = OrderedDict()  # a few open files, most recent last
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()  # the process that opened them
        blocks = [(f, rg, n) for f in range(len(self.paths)) for rg, n in self._row_groups(f)]
        self._block_file = np.array([b[0] for b in blocks], dtype=np.int64)
        self._block_rg = np.array([b[1] for b in blocks], dtype=np.int64)
        self.block_sizes: Int64s | None = np.array([b[2] for b in blocks], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self.block_sizes)]).astype(np.int64)

    def _open(self, f: int) -> Any:
        if self._pid != os.getpid():  # forked (a Hogwild worker, a rank): the parent's open
            self._files.clear()  # files share their offsets with it, so each process opens its
            self._pid = os.getpid()  # own (the parent's stay open for the parent)
        if f in self._files:
            self._files.move_to_end(f)
            return self._files[f][0]
        path = self.paths[f]
        handle = open_binary(path)
        try:
            pf = self.pq.ParquetFile(handle)
        except _DAMAGED as e:
            handle.close()
            raise CorruptDataError(
                f"from_parquet: {path} is not a readable Parquet file: {e}"
            ) from e
        self._files[f] = (pf, handle)
        while len(self._files) > 4:
            self._files.popitem(last=False)[1][1].close()
        return pf

    def close(self) -> None:
        """Close the open files (reads reopen them)."""
        while self._files:
            self._files.popitem()[1][1].close()
        self._cache.clear()

    def __del__(self) -> None:
        # A pipeline dropped without close(): its files close here, not in ResourceWarnings.
        if "_cache" in self.__dict__:  # also when __init__ failed after opening a file
            self.close()

    def _row_groups(self, f: int) -> list[tuple[int, int]]:
        pf = self._open(f)
        if self.columns is not None:
            names = pf.schema_arrow.names
            missing = [c for c in self.columns if c not in names]
            if missing:
                raise ArgumentError(
                    f"from_parquet: columns={missing} not in {self.paths[f]}; it has {names}"
                )
        meta = pf.metadata
        return [(rg, meta.row_group(rg).num_rows) for rg in range(meta.num_row_groups)]

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_files=OrderedDict(), _cache=OrderedDict(), pq=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.pq = require("pyarrow.parquet", feature="from_parquet")

    def _block(self, b: int) -> Any:
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        f, rg = int(self._block_file[b]), int(self._block_rg[b])
        pf = self._open(f)
        try:
            table = pf.read_row_group(rg, columns=self.columns)
        except _DAMAGED as e:
            raise CorruptDataError(
                f"from_parquet: cannot read row group {rg} of {self.paths[f]}: {e}"
            ) from e
        self._cache[b] = table
        while len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        return table

    def read(self, indices: Int64s) -> dict[str, Any]:
        pa = require("pyarrow", feature="from_parquet")
        blocks = np.searchsorted(self._starts, indices, side="right") - 1
        order = np.argsort(blocks, kind="stable")
        parts = []
        for b in np.unique(blocks):
            local = indices[blocks == b] - self._starts[b]
            parts.append(self._block(int(b)).take(pa.array(local)))
        table = pa.concat_tables(parts).take(pa.array(np.argsort(order)))
        return {name: _column(table.column(name)) for name in table.column_names}

    def for_workers(self, owner: contextlib.ExitStack, *, fork: bool) -> RandomAccess:
        """A copy without open files or cache: a forked worker must not share file offsets."""
        clone = object.__new__(type(self))
        clone.__setstate__(self.__getstate__())
        return clone

    def describe(self, indices: Int64s) -> str:
        b = int(np.searchsorted(self._starts, indices[0], side="right") - 1)
        return f"row group {int(self._block_rg[b])} of {self.paths[int(self._block_file[b])]}"
