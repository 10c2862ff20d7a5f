"""What training processes tell the run's live feed (``Trainer(live=...)``).

Each training process (the single one, every rank, every Hogwild worker) has a
:class:`Recorder`: every ``feed.record_every`` updates it emits one ``"train"`` record with the
window's mean loss and metrics, samples per second and input stall. On a stream these window
means are the prequential figures: each batch is scored by the forward pass that precedes its
update. Figures are read off the step's tensors once per window, so a record costs one device
synchronisation per window, not per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from slipstream._core.errors import ArgumentError
from slipstream._core.events import Feed, Record
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
        self._mark(Averages())
        self._described = False

    def _mark(self, averages: Averages) -> None:
        self._sums, self._count = dict(averages.sums), averages.count
        self._t0, self._fetch0 = time.perf_counter(), self.fetch_s

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
            t = torch.as_tensor(leaf)
            return {"shape": list(t.shape[1:]), "dtype": str(t.dtype).removeprefix("torch.")}

        self.feed.emit({"kind": "inputs", "inputs": tree_map(spec, inputs), **self.where})

    def updated(self, step: int, averages: Averages) -> None:
        """One more update (``step`` is the run's count); a record every ``every``."""
        self.updates += 1
        if self.updates % self.every == 0:
            self.feed.emit(self._record(step, averages))
            self._mark(averages)

    def _record(self, step: int, averages: Averages) -> Record:
        count = averages.count - self._count
        if count <= 0:  # a new epoch's averages: the window restarted with them
            self._sums, count = {}, averages.count
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        record: Record = {"kind": "train", "step": step, **self.where}
        for name, total in averages.sums.items():
            before = self._sums.get(name)
            window = total if before is None else total - before
            record[name] = float(window) / count  # syncs with the device once per name
        record["samples_per_s"] = count / elapsed
        record["stall"] = min(1.0, (self.fetch_s - self._fetch0) / elapsed)
        if self.extra is not None:
            record |= self.extra()
        return record
