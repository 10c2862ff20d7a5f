"""Stages that run in the consumer's thread or one thread of their own.

filter, batch, unbatch, a bounded shuffle window, prefetch and to_device. Each is a small node
wrapping its upstream; parallel ``map`` lives in ``_parallel``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from slipstream._core.errors import StageError
from slipstream.data._node import Channel, Ctx, Cursor, Item, Node, Pump
from slipstream.data._order import Permutation, mix64
from slipstream.data._tree import Collate, collate, tree_map, uncollate


def cursor_hash(cursor: Cursor) -> int:
    """A stable integer for a cursor (keys the shuffle of the window starting there)."""
    if cursor is None:
        return 0
    if isinstance(cursor, list | tuple):
        return mix64(*(cursor_hash(c) for c in cursor), len(cursor))
    return mix64(int(cursor))


class FilterNode(Node):
    """Keeps the items for which ``predicate(value)`` is true."""

    def __init__(self, upstream: Node, predicate: Callable[[Any], bool], name: str) -> None:
        super().__init__(name, upstream)
        self.predicate = predicate

    def _next(self) -> Item:
        while True:
            item = self.pull()
            try:
                keep = self.predicate(item.value)
            except Exception as e:
                raise StageError(
                    f"stage '{self.name}' failed on sample {item.key}: {type(e).__name__}: {e}",
                    stage=self.name,
                    index=item.key,
                ) from e
            if keep:
                return item


class BatchNode(Node):
    """Groups ``size`` items into one; the batch resumes after its last item."""

    def __init__(
        self, upstream: Node, size: int, drop_last: bool, fn: Collate | None, name: str
    ) -> None:
        super().__init__(name, upstream)
        self.size, self.drop_last, self.fn = size, drop_last, fn or collate

    def _next(self) -> Item:
        items = self.pull_up_to(self.size)
        if not items or (self.drop_last and len(items) < self.size):
            raise StopIteration
        try:
            value = self.fn([i.value for i in items])
        except Exception as e:
            raise StageError(
                f"stage '{self.name}' could not collate the batch starting at sample "
                f"{items[0].key}: {type(e).__name__}: {e}",
                stage=self.name,
                index=items[0].key,
            ) from e
        keys = [k for i in items for k in (i.keys or [i.key])]
        return Item(value, items[-1].cursor, items[0].key, keys)


class UnbatchNode(Node):
    """Splits batches into samples. Cursor: ``[cursor before the batch, samples taken]``."""

    def _start(self, ctx: Ctx, cursor: Cursor) -> None:
        inner, skip = (None, 0) if cursor is None else (cursor[0], int(cursor[1]))
        assert self.upstream is not None
        self.upstream.start(ctx, inner)
        self._prev, self._skip = inner, skip
        self._buf: deque[Item] = deque()

    def _next(self) -> Item:
        while not self._buf:
            item = self.pull()
            samples = uncollate(item.value)
            keys = item.keys or [item.key + j for j in range(len(samples))]
            last = len(samples) - 1
            for j in range(self._skip, len(samples)):
                cursor = [item.cursor, 0] if j == last else [self._prev, j + 1]
                self._buf.append(Item(samples[j], cursor, keys[j]))
            self._prev, self._skip = item.cursor, 0
        return self._buf.popleft()

    def depth(self) -> tuple[int, int]:
        return len(self._buf), 0


class WindowShuffleNode(Node):
    """Reads ``window`` items, emits them in a keyed random order, repeats.

    Memory is bounded by ``window``; resuming re-reads at most one window.
    Cursor: ``[cursor where the window starts, items emitted from it]``.
    """

    def __init__(self, upstream: Node, window: int, seed: int | None, name: str) -> None:
        super().__init__(name, upstream)
        self.window, self.seed = window, seed

    def _start(self, ctx: Ctx, cursor: Cursor) -> None:
        inner, skip = (None, 0) if cursor is None else (cursor[0], int(cursor[1]))
        assert self.upstream is not None
        self.upstream.start(ctx, inner)
        self._begin, self._skip = inner, skip
        self._out: list[Item] = []
        self._pos = 0

    def _fill(self) -> None:
        items = self.pull_up_to(self.window)
        if not items:
            raise StopIteration
        self._end = items[-1].cursor
        seed = self.ctx.seed if self.seed is None else self.seed
        key = mix64(seed, self.ctx.epoch, cursor_hash(self._begin))
        order = Permutation(len(items), key)(np.arange(len(items), dtype=np.int64))
        self._out = [items[p] for p in order.tolist()]
        self._pos, self._skip = self._skip, 0

    def _next(self) -> Item:
        while self._pos >= len(self._out):
            if self._out:
                self._begin = self._end
            self._fill()
        item = self._out[self._pos]
        self._pos += 1
        done = self._pos == len(self._out)
        cursor = [self._end, 0] if done else [self._begin, self._pos]
        return Item(item.value, cursor, item.key, item.keys)

    def depth(self) -> tuple[int, int]:
        return len(self._out) - self._pos, self.window


class PrefetchNode(Node):
    """Runs everything upstream in one owned thread, keeping up to ``size`` items ready."""

    background = True

    def __init__(self, upstream: Node, size: int, name: str) -> None:
        super().__init__(name, upstream)
        self.size = size
        self._pump: Pump | None = None

    def _start(self, ctx: Ctx, cursor: Cursor) -> None:
        super()._start(ctx, cursor)
        self._pump = Pump(self.name, self.pull, Channel(self.size, self.meter))

    def _next(self) -> Item:
        assert self._pump is not None and self.upstream is not None
        upstream = self.upstream.name
        got: Item = self._pump.channel.get(
            self.ctx.stall_timeout, self._pump.alive, lambda: f"stage '{upstream}'"
        )
        return got

    def depth(self) -> tuple[int, int]:
        return (0, self.size) if self._pump is None else (len(self._pump.channel), self.size)

    def _close(self) -> None:
        if self._pump is not None:
            self._pump.stop()
            self._pump = None


def _to_tensor(leaf: Any) -> Any:
    if isinstance(leaf, np.ndarray) and leaf.dtype != object:
        return torch.from_numpy(np.ascontiguousarray(leaf))
    return leaf


class ToDeviceNode(Node):
    """Turns arrays into tensors on ``device``.

    On CUDA the copies come from pinned memory, issued by an owned thread on a side stream, and
    the consumer's stream waits on an event (no host sync); elsewhere this only converts.
    """

    def __init__(self, upstream: Node, device: torch.device, name: str) -> None:
        super().__init__(name, upstream)
        self.device = device
        self._cuda = device.type == "cuda"
        self._pump: Pump | None = None
        self.background = self._cuda

    def _start(self, ctx: Ctx, cursor: Cursor) -> None:
        super()._start(ctx, cursor)
        if self._cuda:
            self._stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            self._pump = Pump(self.name, self._copy, Channel(2, self.meter))

    def _copy(self) -> tuple[Item, Any]:
        item = self.pull()

        def move(leaf: Any) -> Any:
            t = _to_tensor(leaf)
            if not isinstance(t, torch.Tensor):
                return t
            return t.pin_memory().to(self.device, non_blocking=True)

        with torch.cuda.stream(self._stream):
            value = tree_map(move, item.value)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(self._stream)
        return item, (value, event)

    def _next(self) -> Item:
        if self._pump is None:
            item = self.pull()
            moved = tree_map(lambda x: _moved(_to_tensor(x), self.device), item.value)
            return Item(moved, item.cursor, item.key, item.keys)
        item, (value, event) = self._pump.channel.get(
            self.ctx.stall_timeout, self._pump.alive, lambda: "a host-to-device copy"
        )
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)  # the compute stream waits on the copy; the host does not

        def adopt(t: Any) -> Any:
            if isinstance(t, torch.Tensor):
                t.record_stream(current)  # keep the caching allocator from reusing it early
            return t

        return Item(tree_map(adopt, value), item.cursor, item.key, item.keys)

    def _close(self) -> None:
        if self._pump is not None:
            self._pump.stop()
            self._pump = None


def _moved(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) and x.device != device else x
