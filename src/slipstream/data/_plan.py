"""From the user's stage records to a running chain of nodes.

Where a stage sequence allows it the plan fuses: ``batch`` right after a random-access source
becomes one vectorised read per batch; ``map(mode="process")`` right after it lets workers read
the samples themselves; a files source gets an async read stage. A ``shuffle`` before any
``batch``/``unbatch`` of a random-access source changes the source's order (no buffer at all).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from slipstream._core.checks import positive_int
from slipstream._core.stats import Meter
from slipstream.data._files import FilesSource
from slipstream.data._node import Ctx, Item, Node
from slipstream.data._parallel import (
    ErrorPolicy,
    InlineMapNode,
    MapWork,
    ParallelMapNode,
    arun_item,
)
from slipstream.data._pools import AsyncPool, Pool, PoolFactory, ThreadPool
from slipstream.data._procs import KeptPools, ProcessOptions, ProcessPool, default_start_method
from slipstream.data._source import RandomAccess, Sequential
from slipstream.data._sourcenode import OrderSpec, RandomSourceNode, SequentialSourceNode
from slipstream.data._specs import (
    BatchSpec,
    FilterSpec,
    MapSpec,
    PrefetchSpec,
    ShuffleSpec,
    Spec,
    ToDeviceSpec,
    UnbatchSpec,
)
from slipstream.data._stages import (
    BatchNode,
    FilterNode,
    PrefetchNode,
    ToDeviceNode,
    UnbatchNode,
    WindowShuffleNode,
)
from slipstream.data._tree import collate

_ELEMENT_UNIT = 64  # samples per vectorised read when samples flow one by one
_PARQUET_WINDOW_BLOCKS = 8  # default shuffle window of block sources, in blocks
_SEQ_WINDOW = 1024  # default shuffle window of sequential sources, in samples


def order_of(source: Any, specs: list[Spec], order: OrderSpec) -> tuple[OrderSpec, list[Spec]]:
    """Move a leading shuffle of a random-access source into its order.

    A sequential source keeps its shuffle stage (the window) and shuffles its shard order too.
    """
    if not isinstance(source, RandomAccess):
        shuffles = [s for s in specs if isinstance(s, ShuffleSpec)]
        if shuffles:
            return replace(order, shuffle=True, seed=shuffles[0].seed), specs
        return order, specs
    for i, spec in enumerate(specs):
        if isinstance(spec, BatchSpec | UnbatchSpec):
            break
        if isinstance(spec, ShuffleSpec):
            window = spec.window
            blocks = source.block_sizes
            if window is None and blocks is not None and len(blocks):
                window = _PARQUET_WINDOW_BLOCKS * max(1, int(np.mean(blocks)))
            rest = specs[:i] + specs[i + 1 :]
            return replace(order, shuffle=True, seed=spec.seed, window=window), rest
    return order, specs


def build(
    source: Any,
    specs: list[Spec],
    order: OrderSpec,
    timeout: float | None,
    kept: KeptPools | None = None,
) -> Node:
    """The node chain for one pass; ``specs`` are in the order the user chained them.

    Process maps take their pools from ``kept`` where an earlier pass left them, and offer them
    back when the pass takes every result.
    """
    order, specs = order_of(source, specs, order)
    _fit_cache(source, order)
    node, i = _source_node(source, specs, order, timeout, kept)
    while i < len(specs):
        node, i = _stage(node, specs, i, kept)
    return node


def _fit_cache(source: Any, order: OrderSpec) -> None:
    """A block source caches a whole shuffle window (and a little more), so every block is read
    once per epoch."""
    blocks = getattr(source, "block_sizes", None)
    if order.shuffle and order.window is not None and blocks is not None and len(blocks):
        per_window = round(order.window / max(1.0, float(np.mean(blocks))))
        source.cache_blocks = max(source.cache_blocks, per_window + 2)


def _fused_batch(specs: list[Spec], i: int) -> BatchSpec | None:
    """The batch that directly follows map ``i`` when the two can run as one task per batch.

    Workers then map every sample of a batch and collate it themselves: one hand-over per batch
    instead of per sample, and collation in parallel. Skipping errors changes batch contents,
    so only ``errors="raise"`` maps fuse.
    """
    spec, after = specs[i], specs[i + 1] if i + 1 < len(specs) else None
    fusable = isinstance(spec, MapSpec) and spec.errors == "raise" and spec.workers > 0
    if fusable and isinstance(after, BatchSpec) and spec.mode in ("thread", "process"):  # type: ignore[union-attr]
        return after
    return None


def _source_node(
    source: Any, specs: list[Spec], order: OrderSpec, timeout: float | None, kept: KeptPools | None
) -> tuple[Node, int]:
    first = specs[0] if specs else None
    if isinstance(source, Sequential):
        return SequentialSourceNode(source, order, timeout=timeout), 0
    if (
        isinstance(first, BatchSpec)
        and first.collate is None
        and not isinstance(source, FilesSource)
    ):
        node = RandomSourceNode(
            source,
            order,
            unit=first.size,
            emit="batches",
            drop_last=first.drop_last,
            timeout=timeout,
        )
        return node, 1
    if isinstance(first, MapSpec) and first.mode == "process":  # workers read for themselves
        node = RandomSourceNode(source, order, unit=_ELEMENT_UNIT, emit="indices")
        batch = _fused_batch(specs, 0)
        return _map_node(node, first, 0, kept, source, batch), 2 if batch else 1
    if isinstance(source, FilesSource):
        node = RandomSourceNode(source, order, unit=_ELEMENT_UNIT, emit="indices")
        return _files_node(node, source), 0
    return RandomSourceNode(source, order, unit=_ELEMENT_UNIT, emit="elements", timeout=timeout), 0


def _files_node(upstream: Node, source: FilesSource) -> Node:
    reader = source.reader()

    async def read(item: Item) -> Any:
        return await source.aread(item.key, reader)

    def make(ctx: Ctx, done: Any, meter: Meter) -> Pool:
        return AsyncPool(f"read({source.name})", read, done, meter, on_close=reader.aclose)

    policy = ErrorPolicy(f"read({source.name})", "raise", None, Meter(""))
    node = ParallelMapNode(upstream, make, source.concurrency, True, policy, source.concurrency)
    policy.meter = node.meter
    return node


def _map_node(
    upstream: Node,
    spec: MapSpec,
    stage: int,
    kept: KeptPools | None,
    source: RandomAccess | None = None,
    batch: BatchSpec | None = None,
) -> Node:
    policy = ErrorPolicy(spec.name, spec.errors, spec.max_skipped, Meter(""))
    if spec.mode == "thread" and spec.workers == 0:
        inline = InlineMapNode(upstream, spec.fn, stage, policy)
        policy.meter = inline.meter
        return inline
    collate_fn = None
    if batch is not None:
        upstream = BatchNode(upstream, batch.size, batch.drop_last, list, f"batch({batch.size})")
        collate_fn = batch.collate or collate
    work = MapWork(spec.fn, stage, collate_fn, source)
    make = _pool_factory(spec, work, kept)
    keep = kept.offer if kept is not None and spec.mode == "process" else None
    workers = max(1, spec.workers)
    # fused: whole batches in flight, at least two per worker (as DataLoader's prefetch_factor)
    window = spec.window if batch is None else max(2 * workers, -(-spec.window // batch.size))
    node = ParallelMapNode(upstream, make, window, spec.ordered, policy, workers, stage, keep)
    policy.meter = node.meter
    return node


def _pool_factory(spec: MapSpec, work: MapWork, kept: KeptPools | None) -> PoolFactory:
    def make(ctx: Ctx, done: Any, meter: Meter) -> Pool:
        if spec.mode == "async":

            async def run(item: Item) -> Any:
                return await arun_item(work.fn, item, ctx, work.stage)

            return AsyncPool(spec.name, run, done, meter)
        if spec.mode == "process":
            if kept is not None and (pool := kept.take(work.stage)) is not None:
                pool.rebind(ctx, done, meter)
                return pool
            method = spec.start_method or default_start_method()
            opts = ProcessOptions(method, spec.shm_bytes, spec.threads, spec.chunk)
            return ProcessPool(spec.name, work, ctx, done, meter, spec.workers, opts)

        def run_one(item: Item) -> Any:
            return work.run((item.value, item.key, item.keys), ctx.seed, ctx.epoch)

        return ThreadPool(spec.name, run_one, spec.workers, done, meter)

    return make


def _stage(node: Node, specs: list[Spec], i: int, kept: KeptPools | None) -> tuple[Node, int]:
    spec = specs[i]
    if isinstance(spec, MapSpec):
        batch = _fused_batch(specs, i)
        return _map_node(node, spec, i, kept, None, batch), i + (2 if batch else 1)
    if isinstance(spec, FilterSpec):
        return FilterNode(node, spec.predicate, spec.name), i + 1
    if isinstance(spec, BatchSpec):
        return BatchNode(
            node, spec.size, spec.drop_last, spec.collate, f"batch({spec.size})"
        ), i + 1
    if isinstance(spec, UnbatchSpec):
        return UnbatchNode("unbatch", node), i + 1
    if isinstance(spec, ShuffleSpec):
        window = positive_int("window", spec.window or _SEQ_WINDOW)
        return WindowShuffleNode(node, window, spec.seed, f"shuffle(window={window})"), i + 1
    if isinstance(spec, PrefetchSpec):
        return PrefetchNode(node, spec.size, f"prefetch({spec.size})"), i + 1
    assert isinstance(spec, ToDeviceSpec)
    return ToDeviceNode(node, spec.device, f"to_device({spec.device})"), i + 1
