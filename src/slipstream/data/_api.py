"""Where pipelines start: one constructor per kind of source."""

from __future__ import annotations

from typing import Any

from slipstream._core.checks import positive_number
from slipstream.data._files import FilesSource, PathSpec
from slipstream.data._parquet import ParquetSource
from slipstream.data._pipeline import Pipeline
from slipstream.data._sequential import IterableSource, TarSource
from slipstream.data._source import ArraySource, NpySource


def from_arrays(data: Any, *, name: str = "arrays") -> Pipeline:
    """Samples from in-memory arrays: a numpy array, a torch tensor, a dict or tuple of them, or a
    pandas DataFrame (a dict of its columns). Row ``i`` of every array is sample ``i``.

    >>> ss.from_arrays({"x": x, "y": y}).shuffle(seed=0).batch(256)
    """
    return Pipeline(ArraySource(data, name=name))


def from_numpy(paths: Any, *, name: str = "numpy") -> Pipeline:
    """Samples from ``.npy`` files, memory-mapped (never loaded whole): one path, or a dict or
    tuple of paths for structured samples (``{"x": "x.npy", "y": "y.npy"}``)."""
    return Pipeline(NpySource(paths, name=name))


def from_parquet(
    paths: PathSpec,
    columns: list[str] | None = None,
    *,
    cache_blocks: int = 8,
    timeout: float | None = 120.0,
) -> Pipeline:
    """Rows of Parquet files (a path, glob, URL or list), random access by row group.

    Samples are dicts of the ``columns`` (all when ``None``); ``timeout`` bounds each row-group
    read. Needs ``slipstream[parquet]``.
    """
    positive_number("timeout", timeout, allow_none=True)
    return Pipeline(ParquetSource(paths, columns, cache_blocks=cache_blocks), timeout=timeout)


def from_files(
    paths: PathSpec,
    *,
    concurrency: int = 64,
    timeout: float | None = 60.0,
    retries: int = 3,
) -> Pipeline:
    """Whole files (a list, glob or fsspec URL), read with async I/O, ``concurrency`` at a time.

    Samples are ``{"path": str, "bytes": bytes}``; each read has ``timeout`` seconds, and remote
    reads are retried ``retries`` times with backoff. URLs need ``slipstream[remote]``.
    """
    return Pipeline(FilesSource(paths, concurrency=concurrency, timeout=timeout, retries=retries))


def from_tar(paths: PathSpec, *, timeout: float | None = 120.0) -> Pipeline:
    """Samples from WebDataset-layout tar shards, read sequentially (a path, glob, URL or list).

    Members sharing a key form one sample: ``{"__key__", "__shard__", "jpg": bytes, "cls": ...}``.
    """
    positive_number("timeout", timeout, allow_none=True)
    return Pipeline(TarSource(paths), timeout=timeout)


def from_iterable(data: Any, *, timeout: float | None = None) -> Pipeline:
    """Samples from an iterable, an async iterable, or a function returning one (needed for
    more than one epoch). Streams may be unbounded; ``timeout`` bounds the wait per item."""
    positive_number("timeout", timeout, allow_none=True)
    return Pipeline(IterableSource(data), stall_timeout=None, timeout=timeout)
