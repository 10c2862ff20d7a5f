"""Shared by the benchmarks: the machine, the JSON line, and memory of a process tree."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil
import torch


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def emit(
    bench: str, figures: dict[str, Any], ratio: float | dict[str, float], config: dict[str, Any]
) -> None:
    """Print the benchmark's one JSON line (DESIGN.md §7)."""
    line = {
        "bench": bench,
        "figures": figures,
        "ratio": ratio,
        "config": config,
        "machine": machine(),
    }
    print(json.dumps(line), flush=True)


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--quick", action="store_true", help="small sizes: finishes in under a minute")
    return p


def tree_memory(proc: psutil.Process | None = None) -> int:
    """Unique plus proportional-shared memory of a process and its children (PSS sum, bytes)."""
    proc = proc or psutil.Process()
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_full_info().pss
    return total


class PeakMemory:
    """Samples :func:`tree_memory` every ``interval`` seconds in a thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_memory())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.peak = tree_memory()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_memory())


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    """Seconds taken by ``fn`` and the count it returns."""
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)
