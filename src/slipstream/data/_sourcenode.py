"""Source nodes: where the order meets the data.

:class:`RandomSourceNode` turns this rank's slice of the epoch order into units of ``unit``
positions and reads each unit with one vectorised ``read`` (or not at all when workers read for
themselves). Storage-bound sources are read ahead by one owned thread with a deadline per read.
:class:`SequentialSourceNode` reads shards (or one stream) in a thread into a bounded channel.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from slipstream._core.errors import ArgumentError, SourceTimeoutError, StallError
from slipstream._core.stats import StageStats
from slipstream.data._node import Channel, Ctx, Cursor, Item, Node, Pump, timed
from slipstream.data._order import Even, Int64s, Permutation, RankSlice, make_order, mix64
from slipstream.data._source import RandomAccess, Sequential
from slipstream.data._tree import take

_INDEX_CHUNK = 16384  # positions whose order is computed at once (amortises numpy call costs)
_READ_AHEAD = 2  # units read ahead of the consumer for storage-bound sources
_SEQ_BUFFER = 64  # samples read ahead from sequential sources

Emit = Literal["elements", "batches", "indices"]


@dataclass(frozen=True, slots=True)
class OrderSpec:
    """How a source is ordered and cut: shuffle (with a window in samples) and rank slicing."""

    shuffle: bool = False
    seed: int | None = None
    window: int | None = None
    rank: int = 0
    world: int = 1
    even: Even = None

    def key(self, ctx: Ctx) -> int:
        return mix64(ctx.seed if self.seed is None else self.seed, ctx.epoch)


def _read_ahead(node: Any, pump: Pump, what: Callable[[], str]) -> Any:
    """The next thing the node's reader thread produced, within the read deadline."""
    try:
        return pump.channel.get(node.timeout or node.ctx.stall_timeout, pump.alive, what)
    except StallError as e:
        raise SourceTimeoutError(f"{node.name}: {e}; raise timeout= or check the storage") from e


@dataclass(slots=True)
class _Unit:
    end: int  # cursor after this unit
    indices: Int64s
    value: Any


class RandomSourceNode(Node):
    """Reads this rank's positions of a random-access source, ``unit`` positions at a time.

    ``emit="batches"`` yields each unit as one collated batch (the vectorised path),
    ``"elements"`` splits units into samples, ``"indices"`` yields sample indices unread (for
    stages that read for themselves). Cursor: the count of this rank's positions consumed.
    """

    def __init__(
        self,
        source: RandomAccess,
        spec: OrderSpec,
        *,
        unit: int,
        emit: Emit,
        drop_last: bool = False,
        timeout: float | None = None,
    ) -> None:
        super().__init__(f"read({source.name})", None)
        self.source, self.spec, self.unit, self.emit = source, spec, unit, emit
        self.drop_last, self.timeout = drop_last, timeout
        self._pending: deque[Item] = deque()
        self._pump: Pump | None = None
        self._reading: Int64s | None = None
        self.background = source.io_bound and emit != "indices"  # read ahead by a thread

    def _start(self, ctx: Ctx, cursor: Cursor) -> None:
        n = len(self.source)
        s = self.spec
        self._order = make_order(
            n,
            shuffle=s.shuffle,
            seed=ctx.seed if s.seed is None else s.seed,
            epoch=ctx.epoch,
            block_sizes=self.source.block_sizes,
            window=s.window,
        )
        self._slice = RankSlice(n, ctx.origin, s.rank, s.world, s.even)
        self._k = 0 if cursor is None else int(cursor)
        self._chunk: tuple[int, Int64s] = (0, np.empty(0, dtype=np.int64))
        self._pending.clear()
        if self.background:
            reads = timed(self._read_unit, self.meter)
            self._pump = Pump(self.name, reads, Channel(_READ_AHEAD, self.meter))

    def _indices(self, k0: int, count: int) -> Int64s:
        start, cached = self._chunk
        if not (start <= k0 and k0 + count <= start + len(cached)):
            positions = self._slice.positions(k0, max(count, _INDEX_CHUNK))
            self._chunk = start, cached = k0, self._order(positions)
        return cached[k0 - start : k0 - start + count]

    def _read_unit(self) -> _Unit:
        count = min(self.unit, self._slice.length - self._k)
        if count <= 0 or (self.drop_last and count < self.unit):
            raise StopIteration
        idx = self._indices(self._k, count)
        self._k += count
        self._reading = idx
        value = None if self.emit == "indices" else self.source.read(idx)
        return _Unit(self._k, idx, value)

    def _unit(self) -> _Unit:
        if self._pump is None:
            return self._read_unit()
        unit: _Unit = _read_ahead(self, self._pump, self._what)
        return unit

    def _what(self) -> str:
        idx = self._reading
        describe = getattr(self.source, "describe", None)
        if idx is None or describe is None:
            return f"a read from {self.name}"
        return f"a read of {describe(idx)}"

    def next(self) -> Item:
        if self._pending:  # most samples come out of the unit already read: nothing to time
            return self._pending.popleft()  # nor count: counted with their unit (see stats)
        return super().next()

    def _next(self) -> Item:
        if self.emit == "batches":
            u = self._unit()
            return Item(u.value, u.end, int(u.indices[0]), u.indices.tolist())
        u = self._unit()  # next() serves what is pending; here a new unit is needed
        first = u.end - len(u.indices)
        for j, idx in enumerate(u.indices.tolist()):
            value = None if u.value is None else take(u.value, j)
            self._pending.append(Item(value, first + j + 1, idx))
        self.meter.items += len(self._pending) - 1  # delivered once none is pending
        return self._pending.popleft()

    def stats(self) -> StageStats:
        snap = super().stats()
        return dataclasses.replace(snap, items=snap.items - len(self._pending))

    def depth(self) -> tuple[int, int]:
        if self._pump is None:
            return len(self._pending), 0
        return len(self._pump.channel), self._pump.channel.capacity

    def _close(self) -> None:
        if self._pump is not None:
            self._pump.stop()
            self._pump = None


class SequentialSourceNode(Node):
    """Reads a sequential source in a thread: whole shards per rank, or every ``world``-th item.

    Cursor: ``[shard_position, offset]`` for sharded sources, an item count for streams.
    """

    background = True  # read by a thread of its own

    def __init__(self, source: Sequential, spec: OrderSpec, *, timeout: float | None) -> None:
        super().__init__(f"read({source.name})", None)
        self.source, self.spec, self.timeout = source, spec, timeout
        self._pump: Pump | None = None
        shards = source.num_shards
        if shards is not None and shards < spec.world:
            raise ArgumentError(
                f"{source.name}: {shards} shard(s) cannot be split over world={spec.world} "
                "ranks; write at least one shard per rank"
            )

    def _start(self, ctx: Ctx, cursor: Cursor) -> None:
        items = (
            self._stream(ctx, cursor)
            if self.source.num_shards is None
            else self._shards(ctx, cursor)
        )
        reads = timed(items.__next__, self.meter)
        self._pump = Pump(self.name, reads, Channel(_SEQ_BUFFER, self.meter))

    def _stream(self, ctx: Ctx, cursor: Cursor) -> Iterator[Item]:
        k = 0 if cursor is None else int(cursor)
        first = ctx.origin + self.spec.rank + k * self.spec.world
        values = itertools.islice(self.source.iter_shard(0, first), 0, None, self.spec.world)
        for j, value in enumerate(values, start=k):
            yield Item(value, j + 1, ctx.origin + self.spec.rank + j * self.spec.world)

    def _shards(self, ctx: Ctx, cursor: Cursor) -> Iterator[Item]:
        n = self.source.num_shards
        assert n is not None
        order = np.arange(n, dtype=np.int64)
        if self.spec.shuffle:
            order = Permutation(n, self.spec.key(ctx))(order)
        mine = order[self.spec.rank :: self.spec.world].tolist()
        ks, offset = (0, 0) if cursor is None else (int(cursor[0]), int(cursor[1]))
        for k in range(ks, len(mine)):
            shard = mine[k]
            for j, value in enumerate(self.source.iter_shard(shard, offset), start=offset):
                yield Item(value, [k, j + 1], (shard << 32) | j)
            offset = 0

    def _next(self) -> Item:
        assert self._pump is not None
        item: Item = _read_ahead(self, self._pump, lambda: self.name)
        return item

    def depth(self) -> tuple[int, int]:
        return (0, 0) if self._pump is None else (len(self._pump.channel), _SEQ_BUFFER)

    def _close(self) -> None:
        if self._pump is not None:
            self._pump.stop()
            self._pump = None
