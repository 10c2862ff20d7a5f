"""The sinks slipstream ships: JSONL (the run's record), console progress, TensorBoard.

Each is written to by its own thread (see ``_collector``) and never by a training step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from slipstream._core.events import Record
from slipstream._core.extras import require

_SKIP = frozenset(
    {"run", "time", "kind", "step", "epoch", "rank", "worker", "version", "process", "pid"}
)


def figures(record: Record) -> dict[str, float]:
    """The numeric figures of a record (what sinks plot), without its identifying fields."""
    return {
        k: float(v)
        for k, v in record.items()
        if k not in _SKIP and isinstance(v, int | float) and not isinstance(v, bool)
    }


def source(record: Record) -> str:
    """Which process a record came from: ``"rank 1"``, ``"worker 0"`` or ``"main"``."""
    for key in ("rank", "worker"):
        if key in record:
            return f"{key} {record[key]}"
    return "main"


class JsonlSink:
    """One JSON object per line, appended to ``path`` and flushed after every batch, so a
    dashboard following the file sees a record within its sink's batching delay."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close)

    def write(self, records: Sequence[Record]) -> None:
        self._file.write("".join(json.dumps(r) + "\n" for r in records))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: Path) -> list[Record]:
    """The records of a JSONL file; a torn last line (a run killed mid-write) is left out."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class ConsoleSink:
    """A rich progress bar: steps with rate and ETA, then loss, metrics, samples/s and stall."""

    def __init__(self, total: int | None = None, *, console: Any = None) -> None:
        progress = require("rich.progress", feature="Live(console=True)")
        columns = (
            progress.TextColumn("[bold]{task.description}"),
            progress.BarColumn(),
            progress.MofNCompleteColumn(),
            progress.TimeRemainingColumn(),
            progress.TextColumn("{task.fields[figures]}"),
        )
        self.progress = progress.Progress(*columns, console=console, transient=False)
        self.task = self.progress.add_task("training", total=total, figures="")
        self.progress.start()
        self.latest: dict[str, str] = {}

    def write(self, records: Sequence[Record]) -> None:
        for r in records:
            kind = r.get("kind")
            if kind == "train":
                self._train(r)
            elif kind == "epoch":
                val = {k: v for k, v in figures(r).items() if k.startswith("val_")}
                self.latest |= {k: f"{v:.4g}" for k, v in val.items()}
            elif kind == "status" and r.get("event") == "end":
                self.progress.update(self.task, description=f"stopped: {r.get('reason', '')}")
        shown = "  ".join(f"{k} {v}" for k, v in self.latest.items())
        self.progress.update(self.task, figures=shown)

    def _train(self, r: Record) -> None:
        if source(r) in ("main", "rank 0", "worker 0"):
            self.progress.update(self.task, completed=r["step"])
        f = figures(r)
        for k in ("loss", *sorted(set(f) - {"loss", "samples_per_s", "stall", "staleness"})):
            if k in f and math.isfinite(f[k]):
                self.latest[k] = f"{f[k]:.4g}"
        if "samples_per_s" in f:
            self.latest["samples/s"] = f"{f['samples_per_s']:,.0f}"
        if "stall" in f:
            self.latest["stall"] = f"{100 * f['stall']:.1f}%"

    def close(self) -> None:
        self.progress.stop()


class TensorBoardSink:
    """TensorBoard event files under ``directory`` (the ``tensorboard`` extra): one scalar per
    figure, tagged ``train/<figure>``, ``epoch/<figure>`` or ``pipeline/<stage>/<figure>``, and
    per process for ranks and workers."""

    def __init__(self, directory: Path) -> None:
        require("tensorboard", feature="Live(tensorboard=True)")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory))

    def write(self, records: Sequence[Record]) -> None:
        for r in records:
            kind = r.get("kind")
            if kind not in ("train", "epoch", "pipeline") or "step" not in r:
                continue
            where = source(r)
            prefix = kind if where == "main" else f"{kind}/{where.replace(' ', '')}"
            if kind == "pipeline":  # a stage, or one of its worker processes
                prefix += f"/{r.get('stage')}"
                if "process" in r:
                    prefix += f"/process{r['process']}"
            for name, value in figures(r).items():
                self.writer.add_scalar(f"{prefix}/{name}", value, r["step"], walltime=r.get("time"))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
