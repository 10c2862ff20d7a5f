"""Shared fixtures.

Every test fails if it leaks a thread, process, shared-memory block or environment variable.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")


def _infrastructure() -> set[int]:
    """Python's own long-lived helpers (the shared-memory resource tracker, a forkserver)."""
    from multiprocessing import forkserver, resource_tracker

    pids = {resource_tracker._resource_tracker._pid, forkserver._forkserver._forkserver_pid}
    return {p for p in pids if p is not None}


def _ours() -> tuple[set[str], set[int], set[str]]:
    threads = {t.name for t in threading.enumerate() if t.name.startswith("slipstream-")}
    children = {p.pid for p in psutil.Process().children(recursive=True)} - _infrastructure()
    try:
        blocks = {n for n in os.listdir("/dev/shm") if n.startswith(f"ss_{os.getpid()}_")}
    except FileNotFoundError:
        blocks = set()
    return threads, children, blocks


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fails the test if anything it started outlives it (after a short grace for exits)."""
    env = dict(os.environ)
    before = _ours()
    yield
    deadline = time.monotonic() + 5.0
    while True:
        gc.collect()
        multiprocessing.active_children()  # reaps finished children
        now = _ours()
        leaked = [sorted(a - b) for a, b in zip(now, before, strict=True)]
        if not any(leaked) or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # test harness only: waiting for exits to be observable
    assert not any(leaked), f"leaked threads={leaked[0]} processes={leaked[1]} shm={leaked[2]}"
    keys = (set(env) | set(os.environ)) - {"PYTEST_CURRENT_TEST"}
    changed = {k for k in keys if env.get(k) != os.environ.get(k)}
    assert not changed, f"the test changed environment variables {sorted(changed)}"


@pytest.fixture
def framework_env() -> Iterator[None]:
    """For tests of third-party frameworks that set environment variables of their own
    (Lightning sets TORCHINDUCTOR_CACHE_DIR): restore the environment before the leak check."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
