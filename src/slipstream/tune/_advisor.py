"""``ss.tune``: probe, name the bottleneck, search the knobs that matter for it, report.

The probes (DESIGN.md §5): the pipeline alone (how fast data can come), the step alone on a
cached batch (how fast compute can go, in one process), and the two together as configured.
Which is slowest names the bottleneck; the search then tries the knobs for it first and the
others with what budget is left. Results are cached per machine, software and subject.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slipstream._core.errors import ArgumentError
from slipstream._core.procs import cpu_count
from slipstream.data import Pipeline
from slipstream.train import Trainer
from slipstream.train._step import batch_size
from slipstream.tune._measure import (
    WINDOWS,
    cached_batch,
    pipeline_alone,
    step_alone,
    trial,
)
from slipstream.tune._search import Knob, Setting, Trial, search

PROBE_S = 1.5  # seconds each of the pipeline and step probes measures
WINDOW_S = 0.4  # the length a trial's measuring window aims at
GAP = 0.8  # one side is the bottleneck when the other is this much faster or more


@dataclass(frozen=True)
class Probes:
    """Samples per second: the pipeline alone, one process's steps alone, both together."""

    pipeline: float
    step: float
    together: float
    processes: int
    bottleneck: str

    def __str__(self) -> str:
        return (
            f"bottleneck: {self.bottleneck} (pipeline alone {_k(self.pipeline)} samples/s, "
            f"step alone {_k(self.step)} samples/s"
            + (f" per process × {self.processes}" if self.processes > 1 else "")
            + f", together {_k(self.together)})"
        )


def bottleneck(pipeline: float, step: float, together: float, processes: int, sync: bool) -> str:
    """``"input"``, ``"compute"``, ``"communication"`` or ``"balanced"`` from the probes.

    Compute capacity is one process's step rate times the processes. Synchronous strategies
    that reach well under both capacities together lose the difference to communication.
    """
    compute = step * processes
    if sync and processes > 1 and together < 0.6 * min(pipeline, compute):
        return "communication"
    if pipeline < GAP * compute:
        return "input"
    if compute < GAP * pipeline:
        return "compute"
    return "balanced"


def _k(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 10_000 else f"{x:,.0f}"


@dataclass
class TuneResult:
    """What the advisor found; ``best.setting`` is the configuration it chose."""

    probes: Probes
    trials: list[Trial]
    best: Trial
    stopped: str
    seconds: float
    budget_s: float
    skipped: int = 0
    cached: bool = False
    created: float = field(default_factory=time.time)

    @property
    def start(self) -> Trial:
        return self.trials[0]

    @property
    def speedup(self) -> float:
        return self.best.rate / self.start.rate if self.start.rate > 0 else float("nan")

    def changes(self, trial: Trial | None = None) -> Setting:
        """What ``trial`` (default: the best) sets differently from the start."""
        return changes(self.start.setting, (trial or self.best).setting)

    def label(self, trial: Trial) -> str:
        return setting_label(self.start.setting, trial.setting)

    def table(self) -> str:
        width = min(72, max(len(self.label(t)) for t in self.trials))
        rows = [str(self.probes), f"  {'':<{width}}{'samples/s':>11}{'vs start':>10}{'runs':>6}"]
        for t in self.trials:
            ratio = t.rate / self.start.rate if self.start.rate > 0 else float("nan")
            mark = "   ← chosen" if t.setting == self.best.setting else ""
            if t.error:
                mark = f"   failed: {t.error[:60]}"
            label = self.label(t)[:width]
            rows.append(f"  {label:<{width}}{t.rate:>11,.0f}{ratio:>9.2f}×{t.repeats:>6}{mark}")
        tail = (
            f"{len(self.trials)} trials in {self.seconds:.0f} s of a {self.budget_s:.0f} s budget"
        )
        if self.skipped:
            tail += f"; {self.skipped} more not tried (budget)"
        rows.append(tail + (" (cached result)" if self.cached else ""))
        return "\n".join(rows)

    def as_dict(self) -> dict[str, Any]:
        return {
            "probes": asdict(self.probes),
            "trials": [asdict(t) for t in self.trials],
            "best": [t.setting for t in self.trials].index(self.best.setting),
            "stopped": self.stopped,
            "seconds": self.seconds,
            "budget_s": self.budget_s,
            "skipped": self.skipped,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TuneResult:
        trials = [Trial(**{**t, "setting": _settings(t["setting"])}) for t in d["trials"]]
        return cls(
            Probes(**d["probes"]),
            trials,
            trials[d["best"]],
            d["stopped"],
            d["seconds"],
            d["budget_s"],
            d["skipped"],
            cached=True,
            created=d["created"],
        )


def _settings(setting: dict[str, Any]) -> Setting:
    """A setting read back from JSON (the strategy is a (name, workers) pair)."""
    if isinstance(setting.get("strategy"), list):
        setting["strategy"] = tuple(setting["strategy"])
    return setting


def _show(key: str, value: Any) -> str:
    if key == "strategy":
        name, workers = value
        return name if name == "single" else f"{name} workers={workers}"
    return f"{key}={value}"


def parse_budget(budget: str | float) -> float:
    """Seconds from ``120``, ``"120s"``, ``"2m"`` or ``"1h"``."""
    if isinstance(budget, int | float) and not isinstance(budget, bool) and budget > 0:
        return float(budget)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(budget))
    if not match or float(match[1]) <= 0:
        raise ArgumentError(
            f"budget={budget!r}: give seconds (120), or a number with s, m or h ('2m')"
        )
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def start_setting(trainer: Trainer, pipe: Pipeline) -> Setting:
    strategy = trainer.strategy
    return {
        "strategy": (strategy.name, strategy.workers),
        "threads": trainer.threads_for(strategy.workers),
        "precision": trainer._args["precision"],
        "compile": trainer.compile,
        "channels_last": False,
        **pipe.knobs(),
    }


def knobs_for(
    found: str, start: Setting, model: torch.nn.Module, cores: int, cuda: bool
) -> list[Knob]:
    """The knobs worth trying for bottleneck ``found``, the most promising first."""
    threads = Knob.of("threads", sorted({1, max(1, cores // 2), cores} - {start["threads"]}))
    procs = [("single", 1)] + [("hogwild", w) for w in (2, 4) if w <= cores]
    procs += [("ddp", 2)] if cores >= 2 or cuda else []
    strategy = Knob(
        "strategy", tuple({"strategy": p, "threads": max(1, cores // p[1])} for p in procs)
    )
    batch = start.get("batch")
    batches = Knob.of("batch", [batch * 2, batch * 4] if batch else [])
    precision = Knob.of("precision", ["bf16", *(["fp16"] if cuda else [])])
    compute = [threads, strategy, batches, precision]
    if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        compute.append(Knob.of("channels_last", [True]))
    compute.append(Knob.of("compile", [True]))  # last: compiling is the dearest trial
    data = []
    if "map_workers" in start:
        data.append(Knob.of("map_workers", [w for w in (1, 2, 4, 8) if w <= 4 * cores]))
        data.append(Knob.of("map_mode", ["thread", "process"]))
    data.append(Knob.of("prefetch", [2, 4, 8]))
    if found == "input":
        return [*data, batches, *compute]
    if found == "communication":
        return [strategy, batches, *compute, *data]
    return [*compute, *data]


def fingerprint() -> dict[str, Any]:
    """What a measurement depends on besides the subject: hardware and software."""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": cpu_count(),
        "gpus": gpus,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def describe(trainer: Trainer, pipe: Pipeline) -> str:
    """The subject of a tuning: the model's layers and the pipeline's stages and source."""
    shapes = [tuple(p.shape) for p in trainer.model.parameters()]
    try:
        length: int | None = len(pipe)
    except TypeError:
        length = None
    subject = (type(trainer.model).__qualname__, shapes, start_setting(trainer, pipe))
    return repr((*subject, repr(pipe), length))


def cache_dir() -> Path:
    return (
        Path(os.environ.get("SLIPSTREAM_CACHE") or Path.home() / ".cache" / "slipstream") / "tune"
    )


def tune(
    trainer: Trainer,
    train_pipe: Pipeline,
    budget: str | float = "2m",
    *,
    cache: bool = True,
    key: str | None = None,
    say: Callable[[str], None] = print,
) -> TuneResult:
    """Find the fastest configuration of ``trainer`` fed by ``train_pipe`` on this machine.

    >>> result = ss.tune(trainer, train_pipe, budget="2m")
    >>> print(result.table())
    >>> result.best.setting   # threads, strategy, precision, batch, map workers, ...

    Trials train copies of the model; ``trainer`` and ``train_pipe`` are left as they were.
    Results are cached per machine, software and subject (``key``, default: a description of
    the model and pipeline); ``cache=False`` measures again.
    """
    budget_s = parse_budget(budget)
    if not isinstance(trainer, Trainer) or not isinstance(train_pipe, Pipeline):
        raise ArgumentError("tune(trainer, train_pipe): give an ss.Trainer and an ss.Pipeline")
    ident = json.dumps([fingerprint(), key or describe(trainer, train_pipe), budget_s])
    path = cache_dir() / f"{hashlib.sha256(ident.encode()).hexdigest()[:24]}.json"
    if cache and path.exists():
        return TuneResult.from_dict(json.loads(path.read_text()))
    result = _measure_and_search(trainer, train_pipe, budget_s, say)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.as_dict()))
        tmp.replace(path)
    return result


class Prober:
    """The probes of one subject, and trials of its settings (what the search measures).

    ``Prober(trainer, pipe, budget_s)`` runs the pipeline and step probes and measures the
    configured setting; ``measure(setting)`` runs a trial; ``knobs()`` are the knobs for the
    bottleneck found.
    """

    def __init__(
        self,
        trainer: Trainer,
        pipe: Pipeline,
        budget_s: float,
        say: Callable[[str], None] = print,
    ) -> None:
        self.trainer, self.pipe, self.say = trainer, pipe, say
        self.start = start_setting(trainer, pipe)
        say(f"probing: the pipeline alone, then {type(trainer.model).__name__}'s step alone")
        p_rate = pipeline_alone(pipe, PROBE_S)
        batch = cached_batch(pipe)
        s_rate = step_alone(trainer, batch, PROBE_S, self.start["threads"])
        n = max(1, batch_size(batch))
        guess = min(p_rate, s_rate)  # samples/s together can be no more than either alone
        self.every = int(min(200, max(2, round(WINDOW_S * guess / n))))
        expected = (1 + WINDOWS) * self.every * n / max(guess, 1e-9)
        self.cap_s = min(budget_s, max(10.0, 10 * expected))  # a far slower trial is cut
        say("measuring as configured")
        self.first = self._trial(self.start)
        strategy = trainer.strategy
        sync = strategy.name in ("ddp", "localsgd")
        found = bottleneck(p_rate, s_rate, self.first.rate, strategy.workers, sync)
        self.probes = Probes(p_rate, s_rate, self.first.rate, strategy.workers, found)
        say(str(self.probes))

    def measure(self, setting: Setting, *, fresh: bool = False) -> Trial:
        """A trial of ``setting`` (the configured one was measured with the probes, and is
        measured again only when ``fresh``)."""
        return self.first if setting == self.start and not fresh else self._trial(setting)

    def _trial(self, setting: Setting) -> Trial:
        # a window is as many samples whatever the batch: fewer steps of a larger batch
        start, batch = self.start.get("batch"), setting.get("batch")
        every = max(2, round(self.every * start / batch)) if start and batch else self.every
        t = trial(self.trainer, self.pipe, setting, every, self.cap_s)
        error = f"  ({t.error})" if t.error else ""
        self.say(f"  {setting_label(self.start, setting):<40} {t.rate:>10,.0f} samples/s{error}")
        return t

    def knobs(self) -> list[Knob]:
        cuda = torch.cuda.is_available()
        return knobs_for(self.probes.bottleneck, self.start, self.trainer.model, cpu_count(), cuda)


def _measure_and_search(
    trainer: Trainer, pipe: Pipeline, budget_s: float, say: Callable[[str], None]
) -> TuneResult:
    t0 = time.monotonic()
    prober = Prober(trainer, pipe, budget_s, say)
    left = budget_s - (time.monotonic() - t0)
    found = search(prober.start, prober.knobs(), prober.measure, left)
    return TuneResult(
        prober.probes,
        found.trials,
        found.best or prober.first,
        found.stopped,
        time.monotonic() - t0,
        budget_s,
        len(found.skipped),
    )


def changes(start: Setting, setting: Setting) -> Setting:
    """The entries of ``setting`` that differ from ``start``."""
    return {k: v for k, v in setting.items() if start.get(k) != v}


def setting_label(start: Setting, setting: Setting) -> str:
    shown = ", ".join(_show(k, v) for k, v in changes(start, setting).items())
    return shown or "start (as configured)"
