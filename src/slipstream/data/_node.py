"""The running form of a pipeline: a chain of nodes, each pulling from the one upstream.

Every item carries its *cursor*: the state that, loaded into a fresh chain, continues right after
that item. A node's cursor format is its upstream's, wrapped where the node buffers (unbatch,
shuffle window), so the pipeline's state is the cursor of the last item the consumer received.

The framework owns ``next``: it times each stage and counts items; subclasses write ``_start``
and ``_next``.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from slipstream._core.errors import LifecycleError, StallError
from slipstream._core.stats import Meter, StageStats, now

Cursor = Any  # JSON-able: None (start of the epoch), ints, and lists of cursors

# How often a waiting consumer wakes to check its deadline and its producer's health.
POLL_S = 0.1
# How long closing waits, in all, for threads still inside user code or a blocking read.
CLOSE_S = 2.0


def join_all(threads: Iterable[threading.Thread], what: str, timeout: float = CLOSE_S) -> None:
    """Join ``threads`` within one shared deadline; warn about any left running.

    A thread blocked in a user function or a hung read cannot be stopped from outside; it is a
    daemon thread and ends when that call returns.
    """
    deadline = now() + timeout
    stuck = []
    for t in threads:
        if t is not threading.current_thread():
            t.join(max(0.0, deadline - now()))
            if t.is_alive():
                stuck.append(t.name)
    if stuck:
        warnings.warn(
            f"{what}: {len(stuck)} thread(s) still inside a user function or a blocking read "
            f"after close ({', '.join(stuck)}); they end when that call returns",
            RuntimeWarning,
            stacklevel=2,
        )


@dataclass(frozen=True, slots=True)
class Ctx:
    """What every node needs to start an epoch: seed, epoch, origin and the stall deadline."""

    seed: int
    epoch: int
    origin: int = 0
    stall_timeout: float | None = None


@dataclass(slots=True)
class Item:
    """One value on its way down the chain, with its resume cursor and its sample index.

    A batch's ``key`` is its first sample's index and ``keys`` lists them all.
    """

    value: Any
    cursor: Cursor
    key: int
    keys: list[int] | None = None


class Node:
    """One stage of a running pipeline.

    ``start`` (re)starts at a cursor, ``next`` returns an :class:`Item` or raises StopIteration,
    ``close`` releases threads and processes and closes upstream. Unless a subclass says
    otherwise, all three are called from the consumer's thread only. A ``background`` node works
    in threads or processes of its own, which add to its ``meter.busy``; its ``next`` only hands
    items over. Other nodes' busy time is their time in ``next`` less their input wait.
    """

    background = False

    def __init__(self, name: str, upstream: Node | None, workers: int = 1) -> None:
        self.name = name
        self.upstream = upstream
        self.meter = Meter(name, workers)
        self.ctx = Ctx(0, 0)
        self._closed = False
        self._waits, self._waits_from = self.meter, 0.0
        self.skip = 0  # untimed items before the next timed one (the meter's, kept here: cheaper)

    def start(self, ctx: Ctx, cursor: Cursor) -> None:
        self.ctx = ctx
        self._waits = self._blocking()
        self._waits_from = self._waits.waited
        self._start(ctx, cursor)

    def _start(self, ctx: Ctx, cursor: Cursor) -> None:
        if self.upstream is not None:
            self.upstream.start(ctx, cursor)

    def next(self) -> Item:
        if self.skip:  # a fast stage: this item is neither timed nor counted (Meter.timed)
            item = self._next()
            self.skip -= 1  # after: an item that failed is no item
            return item
        return self.timed_next()

    def timed_next(self) -> Item:
        """``_next``, timed; the meter chooses how many items go untimed after it."""
        m, w = self.meter, self._waits
        waited = w.waited
        t0 = now()
        item = self._next()
        m.timed(now() - t0 - (w.waited - waited))  # the only clock reads per item and stage
        self.skip = m.skip
        return item

    def total(self) -> float:
        """Seconds callers spent in this stage's ``next``: its own time, estimated from timed
        items, plus every blocking wait inside it, timed exactly."""
        return self.meter.total + self._waits.waited - self._waits_from

    def _blocking(self) -> Meter:
        """The meter that times the blocking waits inside this stage's ``next``: the nearest
        background stage at or above it, which the same thread reaches only through here."""
        if self.background or self.upstream is None:
            return self.meter
        return self.upstream._blocking()

    def _next(self) -> Item:
        raise NotImplementedError

    def pull(self) -> Item:
        """The next upstream item (the upstream times it: that is this stage's input wait)."""
        assert self.upstream is not None
        return self.upstream.next()

    def pull_up_to(self, n: int) -> list[Item]:
        """Up to ``n`` upstream items (fewer at the end of the epoch)."""
        items: list[Item] = []
        while len(items) < n:
            try:
                items.append(self.pull())
            except StopIteration:
                break
        return items

    def depth(self) -> tuple[int, int]:
        """Items buffered in this stage and its bound."""
        return 0, 0

    def stats(self) -> StageStats:
        wait_in = 0.0 if self.upstream is None else self.upstream.total()
        busy = self.meter.busy if self.background else max(0.0, self.total() - wait_in)
        return self.meter.snapshot(busy, wait_in, *self.depth(), self.skip)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()
        if self.upstream is not None:
            self.upstream.close()

    def _close(self) -> None:
        """Release this stage's own threads and processes (upstream is closed after)."""

    def chain(self) -> list[Node]:
        """This node and everything upstream, source first."""
        nodes: list[Node] = []
        node: Node | None = self
        while node is not None:
            nodes.append(node)
            node = node.upstream
        return nodes[::-1]


class _End:
    pass


_END = _End()


class Channel:
    """A bounded queue from one producer thread to one consumer thread.

    The producer calls ``put`` (blocks while full; returns False once the consumer closed the
    channel), then ``finish`` or ``fail``. The consumer calls ``get``, which never waits past its
    deadline and says what it was waiting for when it gives up.
    """

    def __init__(self, capacity: int, meter: Meter) -> None:
        self.capacity = capacity
        self._q: deque[Any] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._meter = meter

    def __len__(self) -> int:
        return len(self._q)

    def put(self, item: Any) -> bool:
        with self._cond:
            if len(self._q) >= self.capacity and not self._closed:
                t0 = now()
                while len(self._q) >= self.capacity and not self._closed:
                    self._cond.wait()
                self._meter.wait_out += now() - t0
            if self._closed:
                return False
            self._q.append(item)
            self._cond.notify_all()
            return True

    def finish(self) -> None:
        self.put(_END)

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            self._q.append(_Failure(exc))
            self._cond.notify_all()

    def get(
        self, timeout: float | None, alive: Callable[[], bool], waiting_for: Callable[[], str]
    ) -> Any:
        """Next item; StopIteration after ``finish``; the producer's error after ``fail``."""
        with self._cond:
            if not self._q:
                t0 = now()  # clock reads only where the consumer blocks
                try:
                    self._wait(t0, timeout, alive, waiting_for)
                finally:
                    self._meter.waited += now() - t0
            item = self._q.popleft()
            self._cond.notify_all()
        if item is _END:
            with self._cond:
                self._q.appendleft(_END)  # stay ended for repeated calls
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.exc
        return item

    def _wait(
        self,
        t0: float,
        timeout: float | None,
        alive: Callable[[], bool],
        waiting_for: Callable[[], str],
    ) -> None:
        """Wait for an item (called with ``_cond`` held), within ``timeout`` of ``t0``."""
        deadline = None if timeout is None else t0 + timeout
        while not self._q:
            if self._closed:
                raise LifecycleError("the pipeline was closed while a consumer waited on it")
            if deadline is not None and now() > deadline:
                raise StallError(f"no item within {timeout} s: waiting for {waiting_for()}")
            if not alive():
                raise StallError(f"the thread producing {waiting_for()} exited unexpectedly")
            self._cond.wait(POLL_S)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._q.clear()
            self._cond.notify_all()


@dataclass(frozen=True, slots=True)
class _Failure:
    exc: BaseException


def timed(
    fn: Callable[..., Any], meter: Meter, lock: threading.Lock | None = None
) -> Callable[..., Any]:
    """``fn`` with its time added to ``meter.busy`` (for work done in a thread of the stage's
    own), sampled as stages sample their ``next`` (see ``Meter.timed``). One per thread; with
    ``lock`` where several threads add to the same meter."""
    sampled = Meter(meter.name)
    guard = lock or contextlib.nullcontext()

    def run(*args: Any) -> Any:
        if sampled.skip:
            sampled.skip -= 1
            return fn(*args)
        t0 = now()
        try:
            return fn(*args)
        finally:
            dt = sampled.timed(now() - t0)
            with guard:
                meter.busy += dt

    return run


class Pump:
    """A thread that moves items from ``produce()`` into a :class:`Channel` until told to stop."""

    def __init__(self, name: str, produce: Callable[[], Any], channel: Channel) -> None:
        self.channel = channel
        self._produce = produce
        self._thread = threading.Thread(target=self._run, name=f"slipstream-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._produce()
                except StopIteration:
                    self.channel.finish()
                    return
                if not self.channel.put(item):
                    return
        except BaseException as e:
            self.channel.fail(e)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Close the channel and wait for the thread; a thread stuck in user code is left."""
        self.channel.close()
        join_all([self._thread], f"closing {self._thread.name}")
