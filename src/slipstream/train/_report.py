"""What training processes tell the run's live feed (``Trainer(live=...)``).

Each training process (the single one, every rank, every Hogwild worker) has a
:class:`Recorder`: every ``feed.record_every`` updates it emits one ``"train"`` record with the
window's mean loss and metrics, samples per second and input stall. On a stream these window
means are the prequential figures: each batch is scored by the forward pass that precedes its
update. Figures are read off the step's tensors once per window, so a record costs one device
synchronisation per window, not per step.

With each ``"train"`` record come ``"pipeline"`` records about the pipeline that fed the window,
one per stage (``items_per_s``, ``busy``: the share of the window its workers worked, ``queue``:
how full its buffer is) and one per worker process of a ``mode="process"`` stage, with the
figures that process measured about itself (``items_per_s``, ``busy``, ``rss_mb``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from slipstream._core.errors import ArgumentError
from slipstream._core.events import Feed, Record
from slipstream._core.stats import PipelineStats, ProcessStats, StageStats
from slipstream.data._tree import tree_map
from slipstream.train._metrics import Averages


class Recorder:
    """The ``"train"`` records of one training process (see the module docstring).

    Touched only by the process's training thread.
    """

    def __init__(
        self,
        feed: Feed,
        where: Mapping[str, int],
        extra: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.feed, self.where, self.extra = feed, dict(where), extra
        self.every = feed.record_every
        self.updates = 0
        self.fetch_s = 0.0  # time blocked on the pipeline, added by the loop
        self.samples = 0  # samples stepped on, added by the loop (across epochs)
        self._mark(Averages())
        self._described = False
        self._stages: _StageWindow | None = None

    def watch(self, batches: Any) -> None:
        """Report on ``batches``' stages too, when it is a pipeline (it has ``stats()``)."""
        stats = getattr(batches, "stats", None)
        if not callable(stats):
            self._stages = None
        elif self._stages is None or self._stages.stats != stats:
            self._stages = _StageWindow(stats)

    def _mark(self, averages: Averages) -> None:
        self._sums, self._count = dict(averages.sums), averages.count
        self._t0, self._fetch0, self._samples0 = time.perf_counter(), self.fetch_s, self.samples

    def first_batch(self, trainer: Any, batch: Any) -> None:
        """Emit the shape and dtype of one sample of the first batch (what a server expects)."""
        if self._described:
            return
        self._described = True
        try:
            inputs, _ = trainer.split(batch)
        except ArgumentError:  # a custom step's batches: nothing a server could check
            return

        def spec(leaf: Any) -> dict[str, Any]:
            if not isinstance(leaf, torch.Tensor):  # no copy (nor a read-only array's warning)
                array = np.asarray(leaf)
                leaf = torch.from_numpy(np.empty((0, *array.shape[1:]), array.dtype))
            return {"shape": list(leaf.shape[1:]), "dtype": str(leaf.dtype).removeprefix("torch.")}

        self.feed.emit({"kind": "inputs", "inputs": tree_map(spec, inputs), **self.where})

    def updated(self, step: int, averages: Averages) -> None:
        """One more update (``step`` is the run's count); a record every ``every``."""
        self.updates += 1
        if self.updates % self.every == 0:
            elapsed = max(time.perf_counter() - self._t0, 1e-9)
            self.feed.emit(self._record(step, averages, elapsed))
            if self._stages is not None:
                for record in self._stages.records(elapsed):
                    self.feed.emit({"kind": "pipeline", "step": step, **self.where, **record})
            self._mark(averages)

    def _record(self, step: int, averages: Averages, elapsed: float) -> Record:
        count = averages.count - self._count
        if count <= 0:  # a new epoch's averages: the window restarted with them
            self._sums, count = {}, averages.count
        record: Record = {"kind": "train", "step": step, **self.where}
        for name, total in averages.sums.items():
            before = self._sums.get(name)
            window = total if before is None else total - before
            record[name] = float(window) / count  # syncs with the device once per name
        record["samples_per_s"] = (self.samples - self._samples0) / elapsed  # across epochs
        record["stall"] = min(1.0, (self.fetch_s - self._fetch0) / elapsed)
        if self.extra is not None:
            record |= self.extra()
        return record


class _StageWindow:
    """A pipeline's figures over one window: the difference of two ``stats()`` snapshots."""

    def __init__(self, stats: Callable[[], PipelineStats]) -> None:
        self.stats = stats
        self._last = stats().stages

    def records(self, elapsed: float) -> list[Record]:
        stages = self.stats().stages
        last = self._last if len(self._last) == len(stages) else ()
        self._last = stages
        records = []
        for i, stage in enumerate(stages):
            before = last[i] if last else None
            records.append(_stage_record(stage, before, elapsed))
            earlier = {} if before is None else {p.index: p for p in before.processes}
            records.extend(
                _process_record(stage.name, p, earlier.get(p.index), elapsed)
                for p in stage.processes
            )
        return records


def _stage_record(now: StageStats, before: StageStats | None, elapsed: float) -> Record:
    items = now.items - (before.items if before else 0)
    busy = now.busy_s - (before.busy_s if before else 0.0)
    record: Record = {
        "stage": now.name,
        "items_per_s": max(0, items) / elapsed,
        "busy": min(1.0, max(0.0, busy) / (elapsed * max(1, now.workers))),
    }
    if now.queue_capacity:
        record["queue"] = now.queue_depth / now.queue_capacity
    return record


def _process_record(
    stage: str, now: ProcessStats, before: ProcessStats | None, elapsed: float
) -> Record:
    items = now.items - (before.items if before else 0)  # both count every pass so far
    busy = now.busy_s - (before.busy_s if before else 0.0)
    return {
        "stage": stage,
        "process": now.index,
        "pid": now.pid,
        "items_per_s": max(0, items) / elapsed,
        "busy": min(1.0, max(0.0, busy) / elapsed),
        "rss_mb": now.rss_bytes / 2**20,
    }
