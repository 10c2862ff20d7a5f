"""Reading bytes from local paths and fsspec URLs (http, s3, gcs, hdfs, memory) alike.

Local paths need nothing beyond the standard library; a URL needs ``slipstream[remote]``.
:class:`AsyncReader` keeps many reads in flight from one event loop: async fsspec filesystems
(http, s3, gcs) natively, others (local files, memory, hdfs) through a bounded thread pool.
"""

from __future__ import annotations

import asyncio
import glob as globlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

from slipstream._core.errors import ArgumentError, SourceError, SourceTimeoutError
from slipstream._core.extras import require

_GLOB_CHARS = frozenset("*?[")


def is_url(path: str) -> bool:
    """True for ``protocol://…`` locations other than ``file://``."""
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://") :] if path.startswith("file://") else path


def _fs(url: str) -> tuple[Any, str]:
    fsspec = require("fsspec", feature=f"reading {url}")
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def expand(spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], who: str) -> list[str]:
    """Expand one path, glob or URL, or a list of them, into a sorted list of locations."""
    items = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    if not items:
        raise ArgumentError(f"{who}: got an empty list of paths; pass at least one path or glob")
    out: list[str] = []
    for item in [os.fspath(i) for i in items]:
        if not _GLOB_CHARS & set(item):
            out.append(item)
        elif is_url(item):
            fs, path = _fs(item)
            protocol = item.split("://", 1)[0]
            out.extend(sorted(f"{protocol}://{p.split('://', 1)[-1]}" for p in fs.glob(path)))
        else:
            out.extend(sorted(globlib.glob(_local(item))))
    if not out:
        raise SourceError(f"{who}: no files match {spec!r}")
    return out


def open_binary(path: str) -> IO[bytes]:
    """Open a local path or URL for binary reading."""
    if is_url(path):
        fs, p = _fs(path)
        f: IO[bytes] = fs.open(p, "rb")
        return f
    try:
        return open(_local(path), "rb")
    except FileNotFoundError as e:
        raise SourceError(f"no such file: {path}") from e


def _retryable(e: BaseException) -> bool:
    if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError):
        return False
    status = getattr(e, "status", None)
    if isinstance(status, int):
        return status >= 500 or status == 429
    return isinstance(e, TimeoutError | OSError | ConnectionError) or "Client" in type(e).__name__


class AsyncReader:
    """Whole-file reads on one event loop: ``timeout`` per attempt, ``retries`` with backoff.

    Owned by one event-loop thread: create, use and ``aclose`` it on that loop.
    """

    def __init__(self, *, timeout: float | None, retries: int, threads: int = 16) -> None:
        self.timeout = timeout
        self.retries = retries
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="slipstream-io")
        self._async_fs: dict[str, Any] = {}

    async def read(self, path: str) -> bytes:
        delay = 0.05
        for attempt in range(self.retries + 1):
            try:
                data: bytes = await _within(self.timeout, self._read_once(path))
                return data
            except Exception as e:
                last = attempt == self.retries or not is_url(path) or not _retryable(e)
                if last:
                    raise self._error(path, e, attempt + 1) from e
            await asyncio.sleep(delay)  # backoff before the next attempt
            delay *= 2
        raise AssertionError("unreachable")

    def _error(self, path: str, e: BaseException, attempts: int) -> Exception:
        if isinstance(e, TimeoutError):
            return SourceTimeoutError(
                f"reading {path} took longer than timeout={self.timeout} s "
                f"({attempts} attempt{'s' * (attempts > 1)}); raise timeout= or check the storage"
            )
        if isinstance(e, SourceError):
            return e
        kind = "no such file" if isinstance(e, FileNotFoundError) else type(e).__name__
        return SourceError(f"reading {path} failed after {attempts} attempt(s): {kind}: {e}")

    async def _read_once(self, path: str) -> bytes:
        if not is_url(path):
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, _read_local, _local(path))
        protocol = path.split("://", 1)[0]
        if protocol in self._async_fs:
            fs = self._async_fs[protocol]
        else:
            fs = await self._fs_for(protocol, path)
        if fs is not None:
            data: bytes = await fs._cat_file(
                path if protocol in ("http", "https") else _strip(path)
            )
            return data
        sync_fs, p = _fs(path)
        loop = asyncio.get_running_loop()
        data = await loop.run_in_executor(self._pool, sync_fs.cat_file, p)
        return data

    async def _fs_for(self, protocol: str, url: str) -> Any:
        if protocol not in self._async_fs:
            sync_fs, _ = _fs(url)
            fs = None
            if getattr(sync_fs, "async_impl", False):
                options = getattr(sync_fs, "storage_options", {})
                # our own instance (fsspec caches them): its session lives and dies with us
                fs = type(sync_fs)(asynchronous=True, skip_instance_cache=True, **options)
                if hasattr(fs, "set_session"):
                    await fs.set_session()
            self._async_fs[protocol] = fs
        return self._async_fs[protocol]

    async def aclose(self) -> None:
        for fs in self._async_fs.values():
            session = getattr(fs, "_session", None)
            if session is not None:
                await session.close()
        self._async_fs.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


async def _within(timeout: float | None, coro: Any) -> Any:
    """Await ``coro`` with a deadline; ``asyncio.timeout`` avoids a task per call (3.11+)."""
    if timeout is None:
        return await coro
    deadline = getattr(asyncio, "timeout", None)
    if deadline is None:  # Python 3.10
        return await asyncio.wait_for(coro, timeout)
    async with deadline(timeout):
        return await coro


def _strip(url: str) -> str:
    return url.split("://", 1)[1]


def _read_local(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


async def read_many(paths: Sequence[str], *, timeout: float | None, retries: int) -> list[bytes]:
    """Read several files concurrently (used by process workers, which read for themselves)."""
    reader = AsyncReader(timeout=timeout, retries=retries, threads=min(16, max(1, len(paths))))
    try:
        return list(await asyncio.gather(*(reader.read(p) for p in paths)))
    finally:
        await reader.aclose()
