"""Cores and owned child processes: intra-op threads, dying with the parent, stopping in time,
saying how one ended."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing.connection as mpc
import os
import signal
from collections.abc import Iterator
from typing import Any

import torch


def cpu_count() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads in this process, then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def die_with_parent(parent: int | None) -> None:
    """Die with the parent: at once on Linux (``PR_SET_PDEATHSIG``); elsewhere, and under a
    forkserver (whose children have the forkserver as parent), the closed pipe ends the loop."""
    if parent is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def ended(proc: Any) -> bool:
    """Whether ``proc`` (a started ``multiprocessing`` process) has exited. Unlike ``is_alive``
    this holds however its exit status was collected: when two threads wait on one child, the
    second learns nothing from ``waitpid`` and ``is_alive`` tells it the child still lives."""
    return bool(mpc.wait([proc.sentinel], timeout=0))


def stop_process(proc: Any, grace: float) -> None:
    """Wait ``grace`` seconds for ``proc`` (asked to stop) to exit; then terminate, then kill."""
    proc.join(grace)
    if not ended(proc):
        proc.terminate()
        proc.join(2.0)
    if not ended(proc):
        proc.kill()
        proc.join(2.0)


def how_it_ended(exitcode: int | None) -> str:
    """``"was killed by SIGKILL"`` or ``"exited with code 3"``."""
    if exitcode is None:  # its exit status went to another waiter
        return "ended"
    if exitcode < 0:
        return f"was killed by {signal.Signals(-exitcode).name}"
    return f"exited with code {exitcode}"
