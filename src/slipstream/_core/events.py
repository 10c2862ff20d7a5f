"""Events: the records a run emits, and the two seams between training and the live layer.

A record is a flat JSON-able dict::

    {"run": "digits-1732", "time": 1732.5, "kind": "train", "step": 120, "rank": 0,
     "loss": 0.31, "acc": 0.91, "samples_per_s": 5210.0, "stall": 0.02}

``kind`` is ``"train"`` (a window of steps in one training process), ``"pipeline"`` (the
window's figures of one stage of the pipeline feeding that process, or of one of the stage's
worker processes: ``stage``, ``process``, ``pid``), ``"epoch"`` (an epoch's figures with its
evaluation), ``"weights"`` (a published version), ``"inputs"`` (the shape of one sample, once)
or ``"status"`` (start and end of a run). ``rank`` / ``worker`` say which training process
emitted it.

:class:`Sink` is where records end up (console, JSONL, TensorBoard); :class:`Feed` is what
``Trainer(live=...)`` holds. The train layer knows only these protocols (DESIGN.md §1, §4).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

Record = dict[str, Any]


class Sink(Protocol):
    """A consumer of records. ``write`` runs on the sink's own thread, never a training step's;
    a sink that falls behind has records dropped for it."""

    def write(self, records: Sequence[Record]) -> None: ...

    def close(self) -> None: ...


class Feed(Protocol):
    """What the trainer reports to while it trains.

    ``start`` and ``finish`` run in the process that called ``fit``; ``emit`` in any process of
    the run (ranks, Hogwild workers) and never blocks; ``publish`` in the process that holds the
    run's weights (``single``, rank 0, the Hogwild parent).
    """

    record_every: int  # training steps per "train" record in each process

    def start(self, meta: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> None: ...

    def emit(self, record: Record) -> None: ...

    def publish_due(self, step: int, *, final: bool = False) -> bool: ...

    def publish(self, step: int, weights: Mapping[str, torch.Tensor]) -> None: ...

    def finish(self, reason: str) -> None: ...
