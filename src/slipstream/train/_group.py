"""Training processes started by slipstream itself (``ddp`` spawned locally, ``hogwild``).

Each child runs ``target(rank, conn)`` and talks to the parent over its own duplex pipe. A child
that raises sends its traceback and exits; a child that dies without a word is noticed through
its sentinel. Either way :meth:`Group.recv` raises :class:`TrainingError` naming the process and
the cause, and :meth:`Group.close` stops every child within a deadline, so nothing is orphaned.
Children are forked: they share the parent's model (Hogwild's parameters live in shared memory)
and need nothing pickled to start. Only the parent's thread touches a Group.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch

from slipstream._core.errors import TrainingError
from slipstream._core.procs import die_with_parent, how_it_ended, stop_process
from slipstream.data._procs import close_kept_pools

Target = Callable[[int, Any], Any]


def pack(obj: Any) -> bytes:
    """``obj`` (tensors, numbers, strings, containers) as bytes for a pipe.

    A tensor sent as it is would travel as a shared-memory handle served by a thread of the
    sender, which is gone once the sender exits; bytes do not depend on the sender.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


_spawned = False  # set in the children a Group starts


def spawned() -> bool:
    """Whether this process is a child a :class:`Group` started (a rank, a Hogwild worker)."""
    return _spawned


def stop_signals() -> list[signal.Signals]:
    """SIGINT and SIGTERM, less those this process ignores: a process started with one ignored
    (SIGINT under ``nohup … &``) keeps ignoring it."""
    ours = (signal.SIGINT, signal.SIGTERM)
    return [s for s in ours if signal.getsignal(s) is not signal.SIG_IGN]


def _child(target: Target, rank: int, conn: Any, parent: int) -> None:
    global _spawned
    _spawned = True
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides how to stop
    # Its pipelines may start process workers, which multiprocessing refuses to a daemonic
    # process; this one is stopped by its parent (Group.close) or with it (die_with_parent).
    mp.current_process()._config["daemon"] = False  # type: ignore[attr-defined]
    code = 0
    try:
        conn.send(("done", pack(target(rank, conn))))
    except BaseException as e:
        code = 1
        detail = "".join(traceback.format_exception(e))
        with contextlib.suppress(BrokenPipeError, OSError):
            conn.send(("error", f"{type(e).__name__}: {e}", detail))
    finally:
        conn.close()
        close_kept_pools()  # this process's pipeline workers: no finalizer runs past os._exit
    os._exit(code)  # skip atexit handlers inherited from the parent


class Group:
    """``n`` forked processes named ``{what} {rank}`` in errors."""

    def __init__(self, what: str, n: int, target: Target) -> None:
        # Every child builds an optimizer, and torch's first optimizer imports torch._dynamo:
        # about 1.3 s of CPU in each child, all at once. Imported here, the children inherit it.
        import torch._dynamo  # noqa: F401

        ctx = mp.get_context("fork")
        self.what = what
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        self.exited: set[int] = set()
        for rank in range(n):
            mine, theirs = ctx.Pipe(duplex=True)
            proc = ctx.Process(
                target=_child,
                args=(target, rank, theirs, os.getpid()),
                name=f"slipstream-{what}-{rank}",
                daemon=True,
            )
            proc.start()
            theirs.close()
            self.conns.append(mine)
            self.procs.append(proc)

    def send(self, rank: int, msg: Any) -> None:
        self.conns[rank].send(msg)

    def broadcast(self, msg: Any) -> None:
        for rank in range(len(self.conns)):
            if rank not in self.exited:
                self.send(rank, msg)

    def recv(self, timeout: float | None) -> tuple[int, Any] | None:
        """The next message ``(rank, msg)``; ``None`` after ``timeout`` seconds without one.

        Raises :class:`TrainingError` when a process reports an error or dies.
        """
        live = [c for r, c in enumerate(self.conns) if r not in self.exited]
        sentinels = [p.sentinel for r, p in enumerate(self.procs) if r not in self.exited]
        ready = mpc.wait(live + sentinels, timeout)
        for rank, conn in enumerate(self.conns):
            if conn in ready:
                return rank, self._message(rank, conn)
        for rank, proc in enumerate(self.procs):
            if proc.sentinel in ready:
                self._died(rank)
        return None

    def _message(self, rank: int, conn: Any) -> Any:
        try:
            msg = conn.recv()  # our own child's message (trusted)
        except (EOFError, OSError):
            self._died(rank)
        if msg[0] == "error":
            raise TrainingError(f"{self.what} {rank} failed: {msg[1]}\n\nits traceback:\n{msg[2]}")
        if msg[0] == "done":
            self.exited.add(rank)
            return ("done", unpack(msg[1]))
        return msg

    def _died(self, rank: int) -> None:
        proc = self.procs[rank]
        proc.join(1.0)
        raise TrainingError(
            f"{self.what} {rank} (pid {proc.pid}) {how_it_ended(proc.exitcode)} without reporting "
            "an error; the run stopped. The OOM killer or a crash in native code are the usual "
            "causes"
        )

    @contextlib.contextmanager
    def forwarding_signals(self) -> Iterator[list[str]]:
        """While inside, a SIGINT or SIGTERM to this process is passed on to the children as
        SIGUSR1 (a rank's ``fit`` stops cleanly after its step on it); a second one interrupts
        at once. Yields the names of the signals received. Only in the main thread, where
        signals arrive; a signal this process ignores stays ignored."""
        received: list[str] = []
        if threading.current_thread() is not threading.main_thread():
            yield received
            return

        def handler(signum: int, frame: Any) -> None:
            received.append(signal.Signals(signum).name)
            if len(received) > 1:
                raise KeyboardInterrupt(f"a second {received[-1]}: stopping at once")
            for rank, proc in enumerate(self.procs):
                if rank not in self.exited and proc.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGUSR1)

        previous = {s: signal.signal(s, handler) for s in stop_signals()}
        try:
            yield received
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def close(self, grace: float = 5.0) -> None:
        """Stop every child: those still working are terminated after ``grace`` seconds."""
        for proc in self.procs:
            stop_process(proc, grace if proc.pid and proc.is_alive() else 0.0)
        for conn in self.conns:
            conn.close()
