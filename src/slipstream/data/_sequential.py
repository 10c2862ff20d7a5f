"""Sources read from a position onwards: WebDataset tar shards, and iterables or async iterables.

Tar shards are read one after another (rank ``r`` of ``world`` takes every ``world``-th shard of
the epoch's shard order); an iterable is one stream that ranks split by taking every
``world``-th item.
"""

from __future__ import annotations

import asyncio
import itertools
import tarfile
from collections.abc import AsyncIterable, Iterable, Iterator
from typing import IO, Any

from slipstream._core.errors import CorruptDataError, LifecycleError, SourceError
from slipstream.data._files import PathSpec
from slipstream.data._io import expand, is_url, open_binary


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset naming: ``dir/key.ext.more`` has key ``dir/key`` and field ``ext.more``."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext if dot else "")


def _open_tar(f: IO[bytes], *, stream: bool) -> tarfile.TarFile:
    """A stream for remote shards; seekable locally, so skipping a sample reads its headers only."""
    if stream:
        return tarfile.open(fileobj=f, mode="r|*")
    return tarfile.open(fileobj=f, mode="r:*")


class TarSource:
    """WebDataset-layout tar shards: consecutive members sharing a key form one sample.

    A sample is ``{"__key__": key, "__shard__": path, ext: bytes, ...}``.
    """

    def __init__(self, paths: PathSpec, *, name: str = "tar") -> None:
        self.name = name
        self.paths = expand(paths, "from_tar")
        self.num_shards: int | None = len(self.paths)

    def iter_shard(self, shard: int, skip: int) -> Iterator[dict[str, Any]]:
        path = self.paths[shard]
        with open_binary(path) as f:
            try:
                with _open_tar(f, stream=is_url(path)) as tar:
                    yield from itertools.islice(self._samples(tar, path), skip, None)
            except (tarfile.TarError, EOFError, OSError) as e:
                if isinstance(e, SourceError):
                    raise
                raise CorruptDataError(f"from_tar: {path} is not a readable tar file: {e}") from e

    def _samples(self, tar: tarfile.TarFile, path: str) -> Iterator[dict[str, Any]]:
        sample: dict[str, Any] = {}
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split_name(member.name)
            if sample and key != sample["__key__"]:
                yield sample
                sample = {}
            if not sample:
                sample = {"__key__": key, "__shard__": path}
            handle = tar.extractfile(member)
            if handle is None:
                raise CorruptDataError(f"from_tar: {path}: member {member.name} has no data")
            data = handle.read()
            if len(data) != member.size:
                raise CorruptDataError(
                    f"from_tar: {path}: member {member.name} is truncated "
                    f"({len(data)} of {member.size} bytes)"
                )
            sample[ext] = data
        if sample:
            yield sample


def _sync_iter(ait: AsyncIterable[Any]) -> Iterator[Any]:
    """Drive an async iterable from the calling thread, on a loop that thread owns."""
    loop = asyncio.new_event_loop()
    it = ait.__aiter__()
    try:
        while True:
            try:
                yield loop.run_until_complete(it.__anext__())
            except StopAsyncIteration:
                return
    finally:
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            loop.run_until_complete(aclose())
        loop.close()


class IterableSource:
    """One stream of samples from an iterable, an async iterable, or a function returning either.

    Pass a function (``from_iterable(lambda: read_stream())``) to iterate more than one epoch
    or to resume in a new process; a plain iterator is consumed once.
    """

    num_shards: int | None = None

    def __init__(self, data: Any, *, name: str = "iterable") -> None:
        self.name = name
        if not callable(data) and not isinstance(data, Iterable | AsyncIterable):
            raise TypeError(
                f"from_iterable: expected an iterable, an async iterable or a function returning "
                f"one; got {type(data).__name__}"
            )
        self._data = data
        self._used = False

    def _fresh(self) -> Iterable[Any] | AsyncIterable[Any]:
        if callable(self._data) and not isinstance(self._data, Iterable | AsyncIterable):
            made: Iterable[Any] | AsyncIterable[Any] = self._data()
            return made
        once = isinstance(self._data, Iterator) or hasattr(self._data, "__anext__")
        if once and self._used:
            raise LifecycleError(
                "from_iterable: the iterator was consumed by an earlier epoch; pass a function "
                "that returns a fresh iterable, e.g. ss.from_iterable(lambda: make_stream())"
            )
        self._used = True
        return self._data  # type: ignore[no-any-return]

    def iter_shard(self, shard: int, skip: int) -> Iterator[Any]:
        data = self._fresh()
        it = _sync_iter(data) if isinstance(data, AsyncIterable) else iter(data)
        return itertools.islice(it, skip, None)
