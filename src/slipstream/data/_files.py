"""Files by list, glob or URL, read whole with async I/O: each sample is ``{"path", "bytes"}``."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from typing import Any

from slipstream._core.checks import non_negative_int, positive_int, positive_number
from slipstream.data._io import AsyncReader, expand, read_many
from slipstream.data._order import Int64s
from slipstream.data._source import RandomAccess

PathSpec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


class FilesSource:
    """Whole files; the engine reads ``concurrency`` of them at once on one event loop.

    ``timeout`` bounds each attempt; remote reads are retried ``retries`` times with backoff.
    """

    io_bound = True
    block_sizes: Int64s | None = None

    def __init__(
        self,
        paths: PathSpec,
        *,
        concurrency: int = 64,
        timeout: float | None = 60.0,
        retries: int = 3,
        name: str = "files",
    ) -> None:
        self.name = name
        self.concurrency = positive_int("concurrency", concurrency)
        self.timeout = positive_number("timeout", timeout, allow_none=True)
        self.retries = non_negative_int("retries", retries)
        self.paths = expand(paths, "from_files")

    def __len__(self) -> int:
        return len(self.paths)

    async def aread(self, index: int, reader: AsyncReader) -> dict[str, Any]:
        path = self.paths[index]
        return {"path": path, "bytes": await reader.read(path)}

    def reader(self) -> AsyncReader:
        return AsyncReader(
            timeout=self.timeout, retries=self.retries, threads=min(32, self.concurrency)
        )

    def read(self, indices: Int64s) -> dict[str, list[Any]]:
        paths = [self.paths[i] for i in indices]
        data = asyncio.run(read_many(paths, timeout=self.timeout, retries=self.retries))
        return {"path": paths, "bytes": data}

    def for_workers(self, owner: contextlib.ExitStack, *, fork: bool) -> RandomAccess:
        return self
