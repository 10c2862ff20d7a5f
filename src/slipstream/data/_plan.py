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
    AsyncPool,
    ErrorPolicy,
    InlineMapNode,
    ParallelMapNode,
    Pool,
    PoolFactory,
    ThreadPool,
    arun_item,
    run_item,
)
from slipstream.data._procs import ProcessOptions, ProcessPool, default_start_method
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
            if blocks is not None and hasattr(source, "cache_blocks") and window is not None:
                per_window = round(window / max(1.0, float(np.mean(blocks))))
                source.cache_blocks = max(source.cache_blocks, per_window + 2)
            rest = specs[:i] + specs[i + 1 :]
            return replace(order, shuffle=True, seed=spec.seed, window=window), rest
    return order, specs


def build(source: Any, specs: list[Spec], order: OrderSpec, timeout: float | None) -> Node:
    """The node chain for one pass; ``specs`` are in the order the user chained them."""
    order, specs = order_of(source, specs, order)
    node, used = _source_node(source, specs, order, timeout)
    for stage in range(used, len(specs)):
        node = _stage_node(node, specs[stage], stage, order)
    return node


def _source_node(
    source: Any, specs: list[Spec], order: OrderSpec, timeout: float | None
) -> tuple[Node, int]:
    first = specs[0] if specs else None
    if isinstance(source, Sequential):
        node: Node = SequentialSourceNode(source, order, timeout=timeout)
        return node, 0
    if (
        isinstance(first, BatchSpec)
        and first.collate is None
        and not isinstance(source, FilesSource)
    ):
        unit = first.size
        return RandomSourceNode(
            source, order, unit=unit, emit="batches", drop_last=first.drop_last, timeout=timeout
        ), 1
    if isinstance(first, MapSpec) and first.mode == "process":
        node = RandomSourceNode(source, order, unit=_ELEMENT_UNIT, emit="indices")
        return _map_node(node, first, 0, source), 1
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
    upstream: Node, spec: MapSpec, stage: int, source: RandomAccess | None = None
) -> Node:
    policy = ErrorPolicy(spec.name, spec.errors, spec.max_skipped, Meter(""))
    if spec.mode == "thread" and spec.workers == 0:
        inline = InlineMapNode(upstream, spec.fn, stage, policy)
        policy.meter = inline.meter
        return inline
    make = _pool_factory(spec, stage, source)
    workers = max(1, spec.workers)
    node = ParallelMapNode(upstream, make, spec.window, spec.ordered, policy, workers, stage)
    policy.meter = node.meter
    return node


def _pool_factory(spec: MapSpec, stage: int, source: RandomAccess | None) -> PoolFactory:
    fn = spec.fn

    def make(ctx: Ctx, done: Any, meter: Meter) -> Pool:
        if spec.mode == "async":

            async def work(item: Item) -> Any:
                return await arun_item(fn, item, ctx, stage)

            return AsyncPool(spec.name, work, done, meter)
        if spec.mode == "process":
            method = spec.start_method or default_start_method()
            chunk = spec.chunk or None
            opts = ProcessOptions(method, spec.shm_bytes, spec.threads, chunk)
            return ProcessPool(spec.name, fn, stage, ctx, done, meter, spec.workers, source, opts)
        return ThreadPool(
            spec.name, lambda item: run_item(fn, item, ctx, stage), spec.workers, done, meter
        )

    return make


def _stage_node(node: Node, spec: Spec, stage: int, order: OrderSpec) -> Node:
    if isinstance(spec, MapSpec):
        return _map_node(node, spec, stage)
    if isinstance(spec, FilterSpec):
        return FilterNode(node, spec.predicate, spec.name)
    if isinstance(spec, BatchSpec):
        return BatchNode(node, spec.size, spec.drop_last, spec.collate, f"batch({spec.size})")
    if isinstance(spec, UnbatchSpec):
        return UnbatchNode("unbatch", node)
    if isinstance(spec, ShuffleSpec):
        window = positive_int("window", spec.window or _SEQ_WINDOW)
        return WindowShuffleNode(node, window, spec.seed, f"shuffle(window={window})")
    if isinstance(spec, PrefetchSpec):
        return PrefetchNode(node, spec.size, f"prefetch({spec.size})")
    assert isinstance(spec, ToDeviceSpec)
    return ToDeviceNode(node, spec.device, f"to_device({spec.device})")
