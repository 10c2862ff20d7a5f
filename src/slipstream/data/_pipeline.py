"""The public pipeline: chained stages, iteration, resumable state and statistics."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch.distributed as dist

from slipstream._core.checks import non_negative_int, one_of, positive_int, positive_number
from slipstream._core.errors import ArgumentError, LifecycleError
from slipstream._core.stats import PipelineStats, StageStats, now
from slipstream.data._node import Ctx
from slipstream.data._order import Even, RankSlice
from slipstream.data._plan import build, order_of
from slipstream.data._procs import KeptPools
from slipstream.data._run import (
    PipelineIterator,
    Run,
    State,
    add_stats,
    empty_stats,
    parse_state,
    policies,
    rebase,
)
from slipstream.data._sequential import IterableSource
from slipstream.data._source import RandomAccess, Sequential
from slipstream.data._sourcenode import OrderSpec
from slipstream.data._specs import (
    BatchSpec,
    Errors,
    FilterSpec,
    MapSpec,
    Mode,
    PrefetchSpec,
    Spec,
    StartMethod,
    UnbatchSpec,
    batch_spec,
    device_spec,
    fn_name,
    map_spec,
    retuned_map,
    shuffle_spec,
)
from slipstream.data._tree import Collate

_DEFAULT_STALL_S = 600.0


class Pipeline:
    """An input pipeline: a source and a chain of stages, iterated one epoch at a time.

    Builders (``map``, ``filter``, ``batch``, ...) return a new pipeline; iterating runs one
    epoch (or the rest of one after ``load_state_dict``) and then moves to the next epoch.
    Only one pass runs at a time: starting a new one stops the previous.

    >>> pipe = ss.from_arrays(np.arange(10)).shuffle(seed=0).batch(4)
    >>> [len(b) for b in pipe]
    [4, 4, 2]
    """

    def __init__(
        self,
        source: RandomAccess | Sequential,
        specs: tuple[Spec, ...] = (),
        *,
        order: OrderSpec | None = None,
        explicit_shard: bool = False,
        stall_timeout: float | None = _DEFAULT_STALL_S,
        timeout: float | None = None,
        seed: int = 0,
    ) -> None:
        self.source = source
        self._specs = specs
        self._order = order or OrderSpec()
        self._explicit_shard = explicit_shard
        self._stall_timeout = stall_timeout
        self._timeout = timeout
        self._state = State(seed=seed)
        self._totals: list[StageStats] = []
        self._consumer = (0, 0.0, 0.0)  # items, elapsed, stall over finished passes
        self._run: weakref.ref[Run] | None = None
        self._kept = KeptPools()  # process workers a finished pass left for the next one
        weakref.finalize(self, self._kept.close)  # also at interpreter exit
        self._closed = False

    # -- building -------------------------------------------------------------------------

    def _with(
        self, spec: Spec | None = None, *, specs: tuple[Spec, ...] | None = None, **changes: Any
    ) -> Pipeline:
        kwargs: dict[str, Any] = dict(
            order=self._order,
            explicit_shard=self._explicit_shard,
            stall_timeout=self._stall_timeout,
            timeout=self._timeout,
            seed=self._state.seed,
        )
        kwargs.update(changes)
        if specs is None:
            specs = self._specs if spec is None else (*self._specs, spec)
        return Pipeline(self.source, specs, **kwargs)

    def map(
        self,
        fn: Callable[[Any], Any],
        *,
        mode: Mode | None = None,
        workers: int | None = None,
        concurrency: int | None = None,
        ordered: bool = True,
        errors: Errors = "raise",
        max_skipped: float | None = None,
        window: int | None = None,
        name: str | None = None,
        start_method: StartMethod | None = None,
        threads: int = 1,
        shm_bytes: int = 64 << 20,
        chunk: int | None = None,
    ) -> Pipeline:
        """Apply ``fn`` to every sample, in parallel.

        ``mode="thread"`` (default; for numpy, PIL, torch, pyarrow work that releases the GIL)
        with ``workers`` threads (default: the core count; 0 runs inline); ``"process"`` for
        Python-heavy functions, with ``workers`` processes (started with ``start_method``, each
        with ``threads`` torch threads and a ``shm_bytes`` arena for results, kept from epoch to
        epoch until the pipeline closes or a pass is left early); ``"async"`` for
        ``async def`` functions, ``concurrency`` at once (chosen automatically for them).
        At most ``window`` samples are in flight. With ``ordered=True`` the output order, and
        with ``ss.sample_rng()`` the output itself, do not depend on workers or mode.
        ``errors="skip"`` drops samples whose function raises, up to ``max_skipped`` (a count or
        a fraction); ``"raise"`` re-raises with the stage name and sample index.
        """
        return self._with(
            map_spec(
                fn,
                mode=mode,
                workers=workers,
                concurrency=concurrency,
                ordered=ordered,
                errors=errors,
                max_skipped=max_skipped,
                window=window,
                name=name,
                start_method=start_method,
                threads=threads,
                shm_bytes=shm_bytes,
                chunk=chunk,
            )
        )

    def filter(self, predicate: Callable[[Any], bool], *, name: str | None = None) -> Pipeline:
        """Keep the samples for which ``predicate(sample)`` is true."""
        if not callable(predicate):
            raise ArgumentError(f"`predicate` must be callable; got {type(predicate).__name__}")
        return self._with(FilterSpec(predicate, name or f"filter({fn_name(predicate)})"))

    def batch(
        self, size: int, *, drop_last: bool = False, collate: Collate | None = None
    ) -> Pipeline:
        """Group ``size`` samples; dicts, tuples, arrays and tensors are stacked leaf by leaf.

        ``collate(list_of_samples)`` replaces the stacking (ragged data); ``drop_last`` drops a
        final smaller batch.
        """
        return self._with(batch_spec(size, drop_last, collate))

    def unbatch(self) -> Pipeline:
        """Split batches back into samples."""
        return self._with(UnbatchSpec())

    def shuffle(self, seed: int | None = 0, *, window: int | None = None) -> Pipeline:
        """Shuffle, re-keyed every epoch by ``(seed, epoch)``.

        On a random-access source before any ``batch``: a global permutation in O(1) memory
        (for Parquet, row groups in random order mixed within ``window`` samples, default 8 row
        groups). On a sequential source: shard order plus a window of ``window`` samples
        (default 1024). Elsewhere: a window of ``window`` items.
        """
        return self._with(shuffle_spec(seed, window))

    def prefetch(self, size: int = 2) -> Pipeline:
        """Run everything upstream in a thread of its own, keeping ``size`` items ready."""
        return self._with(PrefetchSpec(positive_int("size", size)))

    def to_device(self, device: Any = "cuda") -> Pipeline:
        """Make arrays tensors on ``device``; on CUDA from pinned memory on a side stream."""
        return self._with(device_spec(device))

    def shard(self, rank: int, world: int, *, even: Even = None) -> Pipeline:
        """Read only rank ``rank`` of ``world``'s share of every epoch.

        Without ``even`` the ranks together see every sample exactly once; ``even="drop"``
        drops the last few samples and ``even="pad"`` repeats the first few, so that every rank
        gets the same count. Under an initialised ``torch.distributed`` a pipeline that is not
        sharded explicitly is sharded by its rank and world automatically.
        """
        positive_int("world", world)
        if not 0 <= non_negative_int("rank", rank) < world:
            raise ArgumentError(f"`rank={rank}` must be in [0, world={world})")
        one_of("even", even, (None, "pad", "drop"))
        if even is not None and isinstance(self.source, Sequential):
            raise ArgumentError(
                f"`even={even!r}` needs a random-access source: a sequential source's length is "
                "not known before reading it, and tar shards go to ranks whole (write shards of "
                "equal size to give ranks equal counts)"
            )
        order = replace(self._order, rank=rank, world=world, even=even)
        return self._with(order=order, explicit_shard=True)

    def options(
        self,
        *,
        stall_timeout: float | None = _DEFAULT_STALL_S,
        timeout: float | None = None,
        seed: int | None = None,
    ) -> Pipeline:
        """``stall_timeout``: seconds any stage may go without progress before an error naming
        what it waits for (``None``: wait forever, as an unbounded stream may need).
        ``timeout``: deadline of each source read. ``seed``: for sample randomness when no
        ``shuffle`` gives one."""
        positive_number("stall_timeout", stall_timeout, allow_none=True)
        positive_number("timeout", timeout, allow_none=True)
        new_seed = self._state.seed if seed is None else non_negative_int("seed", seed)
        return self._with(stall_timeout=stall_timeout, timeout=timeout, seed=new_seed)

    def knobs(self) -> dict[str, Any]:
        """The settings the advisor tunes, as they are: ``batch`` (the first batch stage's size),
        ``map_workers`` and ``map_mode`` (of the first thread or process map), ``prefetch``
        (the first prefetch's size; 0 without one). A setting the pipeline lacks is absent."""
        knobs: dict[str, Any] = {"prefetch": 0}
        for spec in reversed(self._specs):  # the first of each kind wins
            if isinstance(spec, BatchSpec):
                knobs["batch"] = spec.size
            elif isinstance(spec, MapSpec) and spec.mode != "async":
                knobs["map_workers"], knobs["map_mode"] = spec.workers, spec.mode
            elif isinstance(spec, PrefetchSpec):
                knobs["prefetch"] = spec.size
        return knobs

    def tuned(
        self,
        *,
        batch: int | None = None,
        map_workers: int | None = None,
        map_mode: Mode | None = None,
        prefetch: int | None = None,
    ) -> Pipeline:
        """The same pipeline with other settings (see :meth:`knobs`), at the start of epoch 0:
        every batch stage's size, every thread or process map's workers and mode (with their
        default window), every prefetch's depth (``prefetch=0`` removes them; a pipeline
        without one gets one at its end)."""
        specs: list[Spec] = []
        for spec in self._specs:
            if isinstance(spec, BatchSpec) and batch is not None:
                spec = replace(spec, size=positive_int("batch", batch))
            elif isinstance(spec, MapSpec):
                spec = retuned_map(spec, map_workers, map_mode)
            elif isinstance(spec, PrefetchSpec) and prefetch is not None:
                if prefetch == 0:
                    continue
                spec = PrefetchSpec(positive_int("prefetch", prefetch))
            specs.append(spec)
        if prefetch and not any(isinstance(s, PrefetchSpec) for s in specs):
            specs.append(PrefetchSpec(positive_int("prefetch", prefetch)))
        return self._with(specs=tuple(specs))

    def copy(self) -> Pipeline:
        """The same source and stages at the start of epoch 0, with a state of its own (to
        read the same data from two places at once)."""
        return self._with()

    # -- running --------------------------------------------------------------------------

    def _layout(self) -> OrderSpec:
        if self._explicit_shard:
            return self._order
        if dist.is_available() and dist.is_initialized():
            return replace(self._order, rank=dist.get_rank(), world=dist.get_world_size())
        return self._order

    @property
    def seed(self) -> int:
        """The seed of sample randomness and of a ``shuffle`` given no seed of its own."""
        return self._state.seed

    def __iter__(self) -> Iterator[Any]:
        if self._closed:
            raise LifecycleError("this pipeline was closed; build a new one to iterate again")
        self._stop_run()
        layout = self._layout()
        state = rebase(self._state, layout.world, self._sharded())
        self._state = state
        head = build(self.source, list(self._specs), layout, self._timeout, self._kept)
        for stage, policy in policies(head.chain()).items():
            policy.load(state.skipped.get(stage, []))
        ctx = Ctx(state.seed, state.epoch, state.origin, self._stall_timeout)
        # Streams deliver each item as it comes; a finite source looks one item ahead.
        lookahead = not isinstance(self.source, IterableSource)
        run = Run(head, state, ctx, self._finished, lookahead)
        self._run = weakref.ref(run)
        return PipelineIterator(run)

    def _sharded(self) -> bool:
        return isinstance(self.source, Sequential) and self.source.num_shards is not None

    def _live(self) -> Run | None:
        run = self._run() if self._run is not None else None
        return None if run is None or run.closed else run

    def _sync_skipped(self, run: Run) -> None:
        for stage, policy in policies(run.head.chain()).items():
            self._state.skipped[stage] = list(policy.meter.skipped)

    def _stage_totals(self, run: Run) -> list[StageStats]:
        """Finished passes' figures plus ``run``'s, stage by stage."""
        snaps = [n.stats() for n in run.head.chain()]
        if len(self._totals) == len(snaps):
            snaps = [add_stats(a, b) for a, b in zip(self._totals, snaps, strict=True)]
        return snaps

    def _finished(self, run: Run) -> None:
        self._sync_skipped(run)
        self._totals = self._stage_totals(run)
        items, elapsed, stall = self._consumer
        self._consumer = (items + run.items, elapsed + _elapsed(run), stall + run.stall)
        if run.ended:
            self._state = State(
                self._state.seed,
                self._state.epoch + 1,
                0,
                self._state.world,
                None,
                self._state.skipped,
            )

    def _stop_run(self) -> None:
        if (run := self._live()) is not None:
            run.close()
        self._run = None

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` at the next iteration; the current epoch (resumed or not) continues."""
        non_negative_int("epoch", epoch)
        if epoch != self._state.epoch:
            self._stop_run()
            s = self._state
            self._state = State(s.seed, epoch, 0, s.world, None, s.skipped)

    @property
    def epoch(self) -> int:
        return self._state.epoch

    def state_dict(self) -> dict[str, Any]:
        """Where the consumer is: a few integers, O(1) in the dataset size.

        Taken after an epoch's last item, it points at the start of the next epoch (read
        ``pipe.epoch`` after loading it to know which epoch a resumed loop is in).
        """
        if (run := self._live()) is not None:
            self._sync_skipped(run)
        self._state.world = self._layout().world
        return self._state.as_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken, at the next iteration; no replay."""
        parsed = parse_state(state, seed=self._state.seed)
        self._stop_run()
        self._state = parsed

    def stats(self) -> PipelineStats:
        """Where the time went, stage by stage, since the pipeline was built.

        A ``map`` followed by ``batch`` runs as one task per batch (workers map and collate):
        it shows as the batch's grouping followed by the map, which then counts batches.
        """
        items, elapsed, stall = self._consumer
        run = self._live()
        if run is None:
            if not self._totals:
                return empty_stats()
            return PipelineStats(tuple(self._totals), items, elapsed, stall, _skipped(self._totals))
        stages = tuple(self._stage_totals(run))
        return PipelineStats(
            stages, items + run.items, elapsed + _elapsed(run), stall + run.stall, _skipped(stages)
        )

    def __len__(self) -> int:
        """Items per epoch for this rank, where it can be known without reading."""
        n = self._length()
        if n is None:
            raise TypeError(
                "the length of this pipeline is unknown (a filter, unbatch or stream source)"
            )
        return n

    def _length(self) -> int | None:
        if not isinstance(self.source, RandomAccess):
            return None
        layout = self._layout()
        n: int | None = RankSlice(
            len(self.source), 0, layout.rank, layout.world, layout.even
        ).length
        _, specs = order_of(self.source, list(self._specs), layout)
        for spec in specs:
            if isinstance(spec, FilterSpec | UnbatchSpec) or n is None:
                return None
            if isinstance(spec, MapSpec) and spec.errors == "skip":
                return None
            if isinstance(spec, BatchSpec):
                n = n // spec.size if spec.drop_last else -(-n // spec.size)
        return n

    def close(self) -> None:
        """Stop the running pass and the workers kept for the next; it cannot be iterated again."""
        self._stop_run()
        self._kept.close()
        self._closed = True

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if hasattr(self, "_run"):  # not when __init__ failed
            self._stop_run()

    def __repr__(self) -> str:
        stages = " → ".join(type(s).__name__.removesuffix("Spec").lower() for s in self._specs)
        return f"Pipeline({self.source.name}{' → ' + stages if stages else ''})"

    # -- adapters -------------------------------------------------------------------------

    def as_torch(self) -> Any:
        """A ``torch.utils.data.IterableDataset`` (for DataLoader(batch_size=None) or Lightning)."""
        from slipstream.data._adapters import TorchDataset

        return TorchDataset(self)

    def as_keras(self) -> Any:
        """A ``keras.utils.PyDataset`` for Keras's own ``model.fit`` (any backend)."""
        from slipstream.data._adapters import keras_dataset

        return keras_dataset(self)


def _elapsed(run: Run) -> float:
    return now() - run.started


def _skipped(stages: tuple[StageStats, ...] | list[StageStats]) -> tuple[int, ...]:
    return tuple(k for s in stages for k in s.skipped)
