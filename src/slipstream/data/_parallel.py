"""``map``: the same stage run inline, by threads, by coroutines or by processes.

:class:`ParallelMapNode` keeps a bounded window of items in flight: a feeder thread pulls from
upstream and submits to a pool; pools report results by sequence number; the consumer takes them
back in order (or as they finish with ``ordered=False``). Errors follow an :class:`ErrorPolicy`
applied in the consumer's order, so skips are deterministic too.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from slipstream._core.errors import (
    LifecycleError,
    SourceError,
    StageError,
    StallError,
    TooManySkippedError,
)
from slipstream._core.stats import Meter, now
from slipstream.data._node import POLL_S, Ctx, Cursor, Item, Node, join_all
from slipstream.data._pools import Err, Pool, PoolFactory
from slipstream.data._rng import acall_with_sample, call_with_sample
from slipstream.data._tree import Alloc, Stacker, collate, take, uncollate

Errors = Literal["raise", "skip"]


SKIP = object()  # outcome of an item dropped without running (known bad sample)


class ErrorPolicy:
    """``errors="raise"`` re-raises with stage and sample; ``"skip"`` drops and counts.

    ``max_skipped`` is a count, or a fraction of the samples seen (checked once at least
    ``1/max_skipped`` were seen). Skipped indices persist in the pipeline state: a resumed or
    later epoch drops them without running the function again.
    """

    def __init__(self, stage: str, errors: Errors, max_skipped: float | None, meter: Meter) -> None:
        self.stage, self.errors, self.max_skipped, self.meter = stage, errors, max_skipped, meter
        self.known: set[int] = set()
        self.seen = 0

    def load(self, skipped: list[int]) -> None:
        self.meter.skipped = list(skipped)
        self.known = set(skipped)

    def fail(self, item: Item, err: Err) -> None:
        """Raise for ``item``, or record it as skipped. Source errors name their location."""
        if isinstance(err.exc, SourceError):
            raise err.exc
        if self.errors == "raise":
            key = item.key if err.key is None else err.key
            raise StageError(
                f"stage '{self.stage}' failed on sample {key}: {type(err.exc).__name__}: {err.exc}",
                stage=self.stage,
                index=key,
            ) from err.exc
        self.skip(item.key)

    def skip(self, key: int) -> None:
        if key not in self.known:
            self.known.add(key)
            self.meter.skipped.append(key)
        count, limit = len(self.meter.skipped), self.max_skipped
        if limit is None:
            return
        over = (
            count > limit if limit >= 1 else (self.seen * limit >= 1 and count > limit * self.seen)
        )
        if over:
            raise TooManySkippedError(
                f"stage '{self.stage}' skipped {count} samples, more than max_skipped={limit} "
                f"(after {self.seen} seen); the first were {self.meter.skipped[:10]}"
            )


Unit = tuple[Any, int, "list[int] | None"]  # (value, key, keys): what a worker receives


@dataclass(frozen=True, slots=True)
class MapWork:
    """What a worker does with units: map each sample, or (``collate`` set) map every sample of
    a group and collate the results into one batch, so a map followed by batch hands over
    whole batches. With a ``source``, units arrive unread and are read by their keys first.

    Shared by thread pools and process workers (it pickles when the function does).
    """

    fn: Callable[[Any], Any]
    stage: int
    collate: Callable[[list[Any]], Any] | None = None
    source: Any = None

    def run_many(
        self, units: list[Unit], seed: int, epoch: int, alloc: Alloc | None = None
    ) -> list[Any]:
        """The result (or :class:`Err`) of each unit; ``alloc`` places default-collated arrays."""
        if self.collate is None and self.source is not None and units:
            try:  # one vectorised read for the whole chunk
                batch = self.source.read(np.asarray([u[1] for u in units], dtype=np.int64))
            except Exception as e:
                return [Err(e, units[0][1])] * len(units)
            units = [(take(batch, j), u[1], u[2]) for j, u in enumerate(units)]
        return [self.run(u, seed, epoch, alloc) for u in units]

    def run(self, unit: Unit, seed: int, epoch: int, alloc: Alloc | None = None) -> Any:
        value, key, keys = unit
        if self.collate is None:
            try:
                return call_with_sample(self.fn, value, seed, epoch, self.stage, key)
            except Exception as e:
                return Err(e, key)
        keys = keys or [key]
        try:
            values = value if self.source is None else uncollate(self.source.read(np.asarray(keys)))
        except Exception as e:
            return Err(e, key)
        # the default collation copies each result into the batch as it is made (into shared
        # memory in a process worker), so a batch's results never all live at once
        stack = Stacker(len(keys), alloc) if self.collate is collate else None
        out: list[Any] = []
        add = out.append if stack is None else stack.add
        for v, k in zip(values, keys, strict=True):
            try:
                add(call_with_sample(self.fn, v, seed, epoch, self.stage, k))
            except Exception as e:
                return Err(e, k)
        try:
            return self.collate(out) if stack is None else stack.result()
        except Exception as e:
            return Err(e, key)


def run_item(fn: Callable[[Any], Any], item: Item, ctx: Ctx, stage: int) -> Any:
    """``fn(item.value)`` with the sample's random key set; an exception becomes :class:`Err`."""
    try:
        return call_with_sample(fn, item.value, ctx.seed, ctx.epoch, stage, item.key)
    except Exception as e:
        return Err(e)


async def arun_item(fn: Callable[[Any], Any], item: Item, ctx: Ctx, stage: int) -> Any:
    """The coroutine form of :func:`run_item`."""
    try:
        return await acall_with_sample(fn, item.value, ctx.seed, ctx.epoch, stage, item.key)
    except Exception as e:
        return Err(e)


class InlineMapNode(Node):
    """``map`` with ``workers=0``: runs in the consumer's thread, for cheap functions."""

    def __init__(self, upstream: Node, fn: Callable[[Any], Any], stage: int, policy: ErrorPolicy):
        super().__init__(policy.stage, upstream)
        self.fn, self.stage, self.policy = fn, stage, policy

    def _next(self) -> Item:
        while True:
            item = self.pull()
            self.policy.seen += 1
            if item.key in self.policy.known:
                self.policy.skip(item.key)
                continue
            out = run_item(self.fn, item, self.ctx, self.stage)
            if isinstance(out, Err):
                self.policy.fail(item, out)
                continue
            return Item(out, item.cursor, item.key, item.keys)


def format_remote(exc: BaseException) -> str:
    """The traceback of ``exc`` as text, for errors that cross a process boundary."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


class ParallelMapNode(Node):
    """A window of at most ``window`` items in flight through a :class:`Pool`.

    Threads: the feeder thread pulls upstream and submits; pool threads call ``_done``; the
    consumer's thread takes results. All shared fields are guarded by ``_cond``.
    Ordered cursor: the item's own. Unordered cursor: ``["u", watermark, keys delivered past it]``.
    """

    background = True

    def __init__(
        self,
        upstream: Node,
        make_pool: PoolFactory,
        window: int,
        ordered: bool,
        policy: ErrorPolicy,
        workers: int,
        stage: int = -1,
        keep: Callable[[Pool], bool] | None = None,
    ) -> None:
        super().__init__(policy.stage, upstream, workers)
        self.make_pool, self.window, self.ordered, self.policy = make_pool, window, ordered, policy
        self.stage = stage  # the user's stage number (keys sample randomness); -1 for reads
        self.keep = keep  # offered the pool when a pass took every result; True if it kept it
        self._pool: Pool | None = None
        self._feeder: threading.Thread | None = None
        self._cond = threading.Condition()

    def _start(self, ctx: Ctx, cursor: Cursor) -> None:
        ahead: set[int] = set()
        if cursor is not None and isinstance(cursor, list) and cursor[:1] == ["u"]:
            cursor, ahead = cursor[1], set(cursor[2])
        # Workers start before anything upstream starts a thread (process pools fork here).
        self._pool = self.make_pool(ctx, self._done, self.meter)
        assert self.upstream is not None
        self.upstream.start(ctx, cursor)
        self._results: dict[int, tuple[Item, Any]] = {}
        self._submitted: dict[int, int] = {}  # sequence number -> sample index, in flight
        # results taken so far; in ordered mode also the sequence number to deliver next
        self._taken, self._inflight, self._stopping = 0, 0, False
        self._end: int | None = None
        self._fatal: tuple[int, BaseException] | None = None
        self._watermark: tuple[int, Cursor] = (-1, cursor)
        self._delivered: dict[int, Item] = {}
        self._ahead = ahead
        self._feeder = threading.Thread(
            target=self._feed, name=f"slipstream-{self.name}-feeder", daemon=True
        )
        self._feeder.start()

    def _feed(self) -> None:
        seq = 0
        try:
            while True:
                self._wait_for_room()
                if self._stopping:
                    return
                try:
                    item = self.pull()
                except StopIteration:
                    assert self._pool is not None
                    self._pool.flush()
                    with self._cond:
                        self._end = seq
                        self._cond.notify_all()
                    return
                if item.key in self._ahead:  # delivered before the resume point (unordered)
                    self._ahead.discard(item.key)
                    continue
                self._submit(seq, item)
                seq += 1
        except BaseException as e:
            with self._cond:
                self._fatal = (seq, e)
                self._cond.notify_all()

    def _wait_for_room(self) -> None:
        with self._cond:
            if self._inflight < self.window or self._stopping:
                return
        assert self._pool is not None
        self._pool.flush()
        with self._cond:
            t0 = now()
            while self._inflight >= self.window and not self._stopping:
                self._cond.wait()
            self.meter.wait_out += now() - t0

    def _submit(self, seq: int, item: Item) -> None:
        assert self._pool is not None
        with self._cond:
            self._inflight += 1
            self._submitted[seq] = item.key
        if item.key in self.policy.known:
            self._done(seq, item, SKIP)
        else:
            self._pool.submit(seq, item)

    def _done(self, seq: int, item: Item, out: Any) -> None:
        with self._cond:
            self._results[seq] = (item, out)
            self._submitted.pop(seq, None)
            self._cond.notify_all()

    def _ready(self) -> int | None:
        """The sequence number to deliver next, if any is ready (call with ``_cond`` held)."""
        if self.ordered:
            return self._taken if self._taken in self._results else None
        return next(iter(self._results), None)

    def _take(self) -> tuple[int, Item, Any]:
        with self._cond:
            if (seq := self._ready()) is None:
                t0 = now()  # clock reads only where the consumer blocks
                try:
                    seq = self._wait(t0)
                finally:
                    self.meter.waited += now() - t0
            item, out = self._results.pop(seq)
            self._inflight -= 1
            self._taken += 1
            self._cond.notify_all()
        return seq, item, out

    def _wait(self, t0: float) -> int:
        """Wait for a result to deliver (called with ``_cond`` held); its sequence number."""
        timeout = self.ctx.stall_timeout
        deadline = None if timeout is None else t0 + timeout
        while (seq := self._ready()) is None:
            self._check_stuck(deadline)
            self._cond.wait(POLL_S)
        return seq

    def _check_stuck(self, deadline: float | None) -> None:
        """Raise whatever keeps the next result from coming (called with ``_cond`` held)."""
        fatal, end, taken = self._fatal, self._end, self._taken
        if fatal is not None and (not self.ordered or fatal[0] <= taken):
            raise fatal[1]
        if end is not None and taken >= end:
            raise StopIteration
        if self._stopping or self._pool is None:
            raise LifecycleError(f"stage '{self.name}' was closed while a consumer waited on it")
        if (failure := self._pool.failure()) is not None:
            raise failure
        if deadline is not None and now() > deadline:
            raise StallError(f"stage '{self.name}' made no progress: {self._waiting_for()}")

    def _waiting_for(self) -> str:
        if not self._submitted:
            return f"waiting for its input, stage '{self.upstream.name if self.upstream else ''}'"
        _, key = min(self._submitted.items())
        return f"{len(self._submitted)} item(s) in flight, the oldest sample {key}"

    def _next(self) -> Item:
        while True:
            seq, item, out = self._take()
            self.policy.seen += 1
            cursor = item.cursor if self.ordered else self._advance(seq, item)
            if out is SKIP:
                self.policy.skip(item.key)
            elif isinstance(out, Err):
                self.policy.fail(item, out)
            else:
                return Item(out, cursor, item.key, item.keys)

    def _advance(self, seq: int, item: Item) -> Cursor:
        """Unordered cursor: the last contiguous delivery, and keys delivered beyond it."""
        self._delivered[seq] = item
        low, cursor = self._watermark
        while low + 1 in self._delivered:
            low += 1
            cursor = self._delivered.pop(low).cursor
        self._watermark = (low, cursor)
        return ["u", cursor, sorted(i.key for i in self._delivered.values())]

    def depth(self) -> tuple[int, int]:
        return (len(self._results), self.window) if self._pool is not None else (0, self.window)

    def _close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self.upstream is not None:
            self.upstream.close()  # unblocks a feeder waiting on upstream
        if self._feeder is not None:
            join_all([self._feeder], f"closing stage '{self.name}'")
            self._feeder = None
        if self._pool is not None:
            took_all = self._end is not None and self._taken >= self._end and self._fatal is None
            if not (took_all and self.keep is not None and self.keep(self._pool)):
                self._pool.close()
            self._pool = None
