"""Measuring: the three probes (pipeline alone, step alone, both together) and a trial.

A trial trains a copy of the model with one setting under its real strategy (processes and
all) for a fixed number of updates, and reads the per-process ``"train"`` records every
training process writes: each process's first window is warm-up (threads starting, compiling),
the median of its other windows is its rate, and the run's rate is the sum over processes.
The records travel through a file each process appends to (a line is one atomic write), which
works from forked, spawned and torchrun processes alike.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from slipstream._core.events import Record
from slipstream._core.procs import torch_threads
from slipstream.data import Pipeline
from slipstream.train import Timeout, Trainer
from slipstream.train._step import batch_size, to_device
from slipstream.tune._search import Setting, Trial

WINDOWS = 4  # measured windows per process, after one of warm-up


class FileFeed:
    """A :class:`~slipstream._core.events.Feed` that appends records to a file (no weights)."""

    def __init__(self, path: Path, record_every: int) -> None:
        self.path, self.record_every = path, record_every
        self._fd: int | None = None
        self._pid = -1

    def start(self, meta: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> None:
        """Nothing to prepare: processes open the file on their first record."""

    def emit(self, record: Record) -> None:
        if self._pid != os.getpid():  # a new process: its own descriptor
            self._fd, self._pid = (
                os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT),
                os.getpid(),
            )
        assert self._fd is not None
        os.write(self._fd, (json.dumps(record, default=float) + "\n").encode())

    def publish_due(self, step: int, *, final: bool = False) -> bool:
        return False

    def publish(self, step: int, weights: Mapping[str, torch.Tensor]) -> None:
        """Trials publish nothing."""

    def finish(self, reason: str) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
            self._fd = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "record_every": self.record_every, "_fd": None, "_pid": -1}

    def records(self) -> list[Record]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def rate_of(records: list[Record]) -> tuple[float, float]:
    """Samples per second summed over processes, and the median stall (see module docstring)."""
    windows: dict[tuple[Any, Any], list[Record]] = defaultdict(list)
    for r in records:
        if r.get("kind") == "train":
            windows[(r.get("rank"), r.get("worker"))].append(r)
    rates, stalls = [], []
    for process in windows.values():
        measured = process[1:] or process  # the first window warms up
        rates.append(statistics.median(r["samples_per_s"] for r in measured))
        stalls += [r["stall"] for r in measured]
    return sum(rates), statistics.median(stalls) if stalls else 0.0


def pipeline_alone(pipe: Pipeline, seconds: float) -> float:
    """Samples per second the pipeline delivers with nothing consuming them (after 2 batches)."""
    samples, t0, seen = 0, 0.0, 0
    pipe = pipe.copy()
    try:
        while True:
            for batch in pipe:
                seen += 1
                if seen == 2:
                    t0 = time.perf_counter()
                elif seen > 2:
                    samples += batch_size(batch)
                    if time.perf_counter() - t0 >= seconds:
                        return samples / (time.perf_counter() - t0)
            if seen == 0:
                raise ValueError("the training pipeline is empty")
    finally:
        pipe.close()


def cached_batch(pipe: Pipeline) -> Any:
    pipe = pipe.copy()
    try:
        return next(iter(pipe))
    finally:
        pipe.close()


def step_alone(trainer: Trainer, batch: Any, seconds: float, threads: int) -> float:
    """Samples per second of training steps on one cached batch, in this process."""
    model = copy.deepcopy(trainer.model)
    t = trainer.replace(model=model, strategy="single", workers=None, live=None, callbacks=())
    optimizer = t.make_optimizer(model.parameters())
    batch = to_device(batch, t.device)
    n = batch_size(batch)
    with torch_threads(threads):
        steps, t0 = -5, 0.0  # warm-up steps: allocations, threads, caches
        while True:
            figures = t.train_step(batch)
            optimizer.zero_grad(set_to_none=True)
            figures["loss"].backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            steps += 1
            if steps == 0:
                t0 = time.perf_counter()
            elif steps > 0 and time.perf_counter() - t0 >= seconds:
                return steps * n / (time.perf_counter() - t0)


def channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with channels-last weights, converting 4-d inputs to match before each call."""
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.register_forward_pre_hook(_to_channels_last)
    return model


def _to_channels_last(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A forward pre-hook (module level: spawned ranks unpickle it)."""
    return tuple(
        a.contiguous(memory_format=torch.channels_last)
        if isinstance(a, torch.Tensor) and a.ndim == 4
        else a
        for a in args
    )


TRAINER_KNOBS = ("threads", "precision", "compile")
PIPELINE_KNOBS = ("batch", "map_workers", "map_mode", "prefetch")


def variant(trainer: Trainer, pipe: Pipeline, setting: Setting) -> tuple[Trainer, Pipeline]:
    """A trainer (on a copy of the model) and a pipeline with ``setting`` applied."""
    model = copy.deepcopy(trainer.model)
    if setting.get("channels_last"):
        model = channels_last(model)
    strategy, workers = setting.get("strategy", (trainer.strategy.name, trainer.strategy.workers))
    changes = {k: setting[k] for k in TRAINER_KNOBS if k in setting}
    t = trainer.replace(
        model=model, strategy=strategy, workers=workers if strategy != "single" else None, **changes
    )
    p = pipe.tuned(**{k: setting[k] for k in PIPELINE_KNOBS if k in setting})
    return t, p


def trial(
    trainer: Trainer,
    pipe: Pipeline,
    setting: Setting,
    record_every: int,
    cap_s: float,
) -> Trial:
    """Train ``setting`` for one warm-up and ``WINDOWS`` measured windows per process."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slipstream-tune-") as tmp, _environ_kept():
        feed = FileFeed(Path(tmp) / "records.jsonl", record_every)
        try:
            t, p = variant(trainer, pipe, setting)
            t = t.replace(live=feed, callbacks=[Timeout(seconds=cap_s)])
            per_process = record_every * (1 + WINDOWS)
            # fit's steps count updates summed over Hogwild's workers, per rank for the others
            hogwild = t.strategy.name == "hogwild"
            steps = per_process * (t.strategy.workers if hogwild else 1)
            try:
                t.fit(p, epochs=1_000_000, steps=steps)
            finally:
                p.close()
        except Exception as e:  # a setting that cannot run (out of memory, no compiler)
            return Trial(setting, 0.0, 0.0, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
        records = feed.records()
    seconds = time.perf_counter() - t0
    if not any(r.get("kind") == "train" for r in records):
        return Trial(setting, 0.0, 0.0, seconds, f"no window measured within {cap_s:.0f} s")
    rate, stall = rate_of(records)
    return Trial(setting, rate, stall, seconds)


@contextlib.contextmanager
def _environ_kept() -> Iterator[None]:
    """Leave the environment as it was (torch.compile sets variables of its own)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
