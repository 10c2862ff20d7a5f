"""Pools that run a map stage's work: owned threads, or one event loop for coroutines.

A pool takes items from the feeder thread of a :class:`~slipstream.data._parallel.ParallelMapNode`
and reports each result through the ``done`` callback it was made with. Process workers are in
``_procs``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from slipstream._core.errors import StallError
from slipstream._core.stats import Meter, now
from slipstream.data._node import CLOSE_S, Ctx, Item, join_all, timed

Work = Callable[[Item], Any]  # what a pool runs per item; returns the new value (or an Err)
Done = Callable[[int, Item, Any], None]  # (sequence number, item, value or Err)


@dataclass(frozen=True, slots=True)
class Err:
    """A failed item: the exception, and the index of the sample that raised it."""

    exc: BaseException
    key: int | None = None


class Pool(Protocol):
    """Runs work on items; results come back through the ``done`` callback it was made with.

    ``flush`` is called when the feeder is about to wait, so a pool that batches submissions
    sends what it holds.
    """

    def submit(self, seq: int, item: Item) -> None: ...

    def flush(self) -> None: ...

    def failure(self) -> BaseException | None:
        """``None`` while healthy, else the error that stops the stage (a dead worker)."""

    def close(self) -> None: ...


PoolFactory = Callable[[Ctx, Done, Meter], Pool]


class ThreadPool:
    """``workers`` owned threads. The feeder thread submits; worker threads call ``done``."""

    def __init__(self, name: str, work: Work, workers: int, done: Done, meter: Meter) -> None:
        self._q: queue.SimpleQueue[tuple[int, Item] | None] = queue.SimpleQueue()
        self._work, self._done, self._meter = work, done, meter
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, name=f"slipstream-{name}-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        work = timed(self._work, self._meter, self._lock)
        while (task := self._q.get()) is not None:
            seq, item = task
            self._done(seq, item, work(item))

    def submit(self, seq: int, item: Item) -> None:
        self._q.put((seq, item))

    def flush(self) -> None:
        pass

    def failure(self) -> BaseException | None:
        return None

    def close(self) -> None:
        for _ in self._threads:
            self._q.put(None)
        join_all(self._threads, "closing a thread map")


class AsyncPool:
    """One owned event-loop thread running ``work`` coroutines; the window bounds concurrency."""

    def __init__(
        self,
        name: str,
        work: Callable[[Item], Any],
        done: Done,
        meter: Meter,
        on_close: Callable[[], Any] | None = None,
    ) -> None:
        self._work, self._done, self._meter, self._on_close = work, done, meter, on_close
        self._loop = asyncio.new_event_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._inbox: deque[tuple[int, Item]] = deque()  # submitted, not yet started
        self._woken = False
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"slipstream-{name}-loop", daemon=True
        )
        self._thread.start()

    def submit(self, seq: int, item: Item) -> None:
        self._inbox.append((seq, item))
        if not self._woken:  # one wake-up of the loop per burst of submissions
            self._woken = True
            self._loop.call_soon_threadsafe(self._spawn)

    def _spawn(self) -> None:
        self._woken = False
        while self._inbox:
            seq, item = self._inbox.popleft()
            task = self._loop.create_task(self._run(seq, item))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, seq: int, item: Item) -> None:
        t0 = now()
        try:
            out = await self._work(item)
        except Exception as e:
            out = Err(e)
        self._meter.busy += now() - t0  # only the loop thread writes busy
        self._done(seq, item, out)

    def flush(self) -> None:
        pass

    def failure(self) -> BaseException | None:
        if self._thread.is_alive():
            return None
        return StallError("the event loop thread of an async map exited unexpectedly")

    def close(self) -> None:
        async def shutdown() -> None:
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._on_close is not None:
                await self._on_close()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(CLOSE_S)
            self._loop.call_soon_threadsafe(self._loop.stop)
            join_all([self._thread], "closing an async map")
        self._loop.close()
