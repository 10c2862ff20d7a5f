"""``ss.Live``: live figures and live weights for a training run, in one argument.

>>> trainer = ss.Trainer(model, ..., live=ss.Live("runs/clicks", dashboard=True,
...                                               publish_every_steps=50))

A run directory holds what the run tells the world:

    events.jsonl           every record (the run's record; the dashboard replays it)
    live.json              the model's factory, the input spec, where the weight store is
    weights/v<step>.safetensors   published versions, for readers on other machines
    tensorboard/           event files, with tensorboard=True

Under torchrun every rank other than 0 writes only ``events-rank<r>.jsonl``.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from slipstream._core.checks import positive_int, positive_number
from slipstream._core.events import Record, Sink
from slipstream.live._collector import Collector
from slipstream.live._dashboard import DashboardProcess
from slipstream.live._sinks import ConsoleSink, JsonlSink, TensorBoardSink
from slipstream.live._weights import WeightFiles, WeightStore

RUN_FILE = "live.json"
EVENTS = "events.jsonl"
WEIGHTS_DIR = "weights"


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` atomically with ``data`` as JSON."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class _RunFile:
    """A sink that keeps ``live.json`` up to date (the input spec arrives with the first step)."""

    def __init__(self, path: Path, info: dict[str, Any]) -> None:
        self.path, self.info = path, info
        write_json(path, info)

    def write(self, records: Sequence[Record]) -> None:
        specs = [r["inputs"] for r in records if r.get("kind") == "inputs"]
        if specs and self.info.get("inputs") != specs[-1]:
            self.info["inputs"] = specs[-1]
            write_json(self.path, self.info)

    def close(self) -> None:
        """Nothing held open."""


class _FilesSink:
    """A sink that writes the store's newest version to ``weights/`` when a ``weights`` record
    arrives. On its own thread, so a slow disk never delays publishing; versions that arrive
    faster than the disk takes them are skipped, the newest wins."""

    def __init__(self, store: WeightStore, files: WeightFiles) -> None:
        self.store, self.files = store, files
        self.written = -1

    def write(self, records: Sequence[Record]) -> None:
        if any(r.get("kind") == "weights" for r in records):
            self._flush()

    def _flush(self) -> None:
        snap = self.store.read()
        if snap is not None and snap.version != self.written:
            self.files.write(snap.version, snap.tensors, snap.published)
            self.written = snap.version

    def close(self) -> None:
        self._flush()  # the last version, published just before the run ended


class Live:
    """Live feedback and live weights for ``Trainer(live=...)`` (see the module docstring).

    ``console`` (default: when stderr is a terminal) shows a progress bar; ``jsonl`` records
    every event; ``tensorboard`` writes event files; ``dashboard`` starts the web dashboard and
    prints its URL (``host``/``port``; any host but loopback needs ``token``). With
    ``publish_every_steps`` or ``publish_every_seconds`` the weights are published to a
    shared-memory store and ``weights/`` for ``slipstream serve``. ``model`` is
    ``"package.module:factory"`` when the model's class cannot be built without arguments.
    ``record_every`` steps make one training record per process.
    """

    def __init__(
        self,
        dir: str | os.PathLike[str] | None = None,
        *,
        console: bool | None = None,
        jsonl: bool = True,
        tensorboard: bool = False,
        dashboard: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        publish_every_steps: int | None = None,
        publish_every_seconds: float | None = None,
        record_every: int = 10,
        model: str | None = None,
        keep_versions: int = 5,
        sinks: Sequence[Sink] = (),
    ) -> None:
        self.dir = None if dir is None else Path(dir)
        self.console, self.jsonl, self.tensorboard = console, bool(jsonl), bool(tensorboard)
        self.dashboard_opts = (host, int(port), token) if dashboard else None
        self.every_steps = (
            None
            if publish_every_steps is None
            else positive_int("publish_every_steps", publish_every_steps)
        )
        self.every_seconds = positive_number(
            "publish_every_seconds", publish_every_seconds, allow_none=True
        )
        self.record_every = positive_int("record_every", record_every)
        self.model = model
        self.keep_versions = positive_int("keep_versions", keep_versions)
        self.extra_sinks = list(sinks)
        self.dashboard: DashboardProcess | None = None
        self.store: WeightStore | None = None
        self.collector: Collector | None = None
        self._published = -1
        self._next_publish = float("inf")

    @property
    def publishing(self) -> bool:
        return self.every_steps is not None or self.every_seconds is not None

    # -- the Feed protocol ----------------------------------------------------------------------

    def start(self, meta: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> None:
        rank = int(meta.get("rank", 0))
        run_dir = self.dir or Path(
            meta.get("checkpoints") or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        if rank != 0:
            self.collector = Collector(
                run_dir.name, [JsonlSink(run_dir / f"events-rank{rank}.jsonl")]
            )
            return
        info = {**meta, "model": self.model or meta.get("model"), "started": time.time()}
        if self.publishing:
            self.store = WeightStore.create({k: v.detach() for k, v in weights.items()})
            info["store"] = self.store.describe()
            self._published, self._next_publish = -1, self._next_time()
        self.collector = Collector(run_dir.name, self._sinks(run_dir, info, meta))
        if self.dashboard_opts is not None and self.dashboard is None:
            host, port, token = self.dashboard_opts
            self.dashboard = DashboardProcess([run_dir], host=host, port=port, token=token)
            atexit.register(self.close)
            print(f"slipstream dashboard: {self.dashboard.url}", file=sys.stderr, flush=True)
        self.emit({"kind": "status", "event": "start", "strategy": meta.get("strategy")})

    def _sinks(self, run_dir: Path, info: dict[str, Any], meta: Mapping[str, Any]) -> list[Sink]:
        sinks: list[Sink] = [_RunFile(run_dir / RUN_FILE, info)]
        if self.jsonl or self.dashboard_opts is not None:
            sinks.append(JsonlSink(run_dir / EVENTS))
        console = sys.stderr.isatty() if self.console is None else self.console
        if console:
            sinks.append(ConsoleSink(meta.get("steps")))
        if self.tensorboard:
            sinks.append(TensorBoardSink(run_dir / "tensorboard"))
        if self.store is not None:
            sinks.append(
                _FilesSink(self.store, WeightFiles(run_dir / WEIGHTS_DIR, self.keep_versions))
            )
        return [*sinks, *self.extra_sinks]

    def _next_time(self) -> float:
        return float("inf") if self.every_seconds is None else time.monotonic() + self.every_seconds

    def emit(self, record: Record) -> None:
        if self.collector is not None:
            self.collector.emit(record)

    def publish_due(self, step: int, *, final: bool = False) -> bool:
        """Whether to publish after ``step`` (``final``: the run ends there)."""
        if self.store is None or step == self._published:
            return False
        if final:
            return True
        n = self.every_steps
        return (n is not None and step // n > max(self._published, 0) // n) or (
            time.monotonic() >= self._next_publish
        )

    def publish(self, step: int, weights: Mapping[str, torch.Tensor]) -> None:
        """Write ``weights`` as version ``step`` to the store (a memory copy; files follow on
        the collector's thread)."""
        if self.store is None:
            return
        self.store.write(step, weights)
        self._published, self._next_publish = step, self._next_time()
        self.emit({"kind": "weights", "version": step})

    def finish(self, reason: str) -> None:
        self.emit({"kind": "status", "event": "end", "reason": reason})
        if self.collector is not None:
            self.collector.close()
            self.collector = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def close(self) -> None:
        """Stop the dashboard (it otherwise runs until this Python process exits)."""
        if self.dashboard is not None:
            self.dashboard.close()
            self.dashboard = None
