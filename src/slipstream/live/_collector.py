"""One collector per run: records from every process in, one bounded queue per sink out.

Any process of the run (the trainer, forked ranks and Hogwild workers) writes a record as one
line of JSON to a pipe it inherited. The write end is non-blocking and a line is at most
``PIPE_BUF`` bytes, so a write is atomic and a full pipe drops the record rather than stall a
step. In the owning process a reader thread parses the lines and offers each record to every
sink's queue; each sink runs on its own thread, so a slow sink only loses its own records.

Threads: ``emit`` runs on training threads of any process; ``_read`` on the collector's reader;
``_SinkThread._run`` on one thread per sink; ``close`` on the owner's thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Sequence
from typing import Any

from slipstream._core.events import Record, Sink

log = logging.getLogger("slipstream.live")

_PIPE_BUF = select.PIPE_BUF
_F_SETPIPE_SZ = 1031  # Linux: grow the pipe so bursts fit (the default holds 64 KiB)
_STOP = object()


class _SinkThread:
    """One sink, its bounded queue and the thread that feeds it batches of records."""

    def __init__(self, sink: Sink, capacity: int) -> None:
        self.sink = sink
        self.name = type(sink).__name__
        self.queue: queue.Queue[Any] = queue.Queue(capacity)
        self.dropped = 0
        self.failed: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, name=f"slipstream-{self.name}", daemon=True
        )
        self.thread.start()

    def offer(self, record: Record) -> None:
        if self.failed is not None:
            return
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("live: %s is falling behind; dropping its records", self.name)

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]  # blocks until there is a record (or the stop)
            while len(batch) < 1000 and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            stop = batch[-1] is _STOP
            records = [r for r in batch if r is not _STOP]
            if records and self.failed is None:
                self._write(records)
            if stop:
                return

    def _write(self, records: list[Record]) -> None:
        try:
            self.sink.write(records)
        except Exception as e:  # a broken sink must not take the run down with it
            self.failed = e
            log.warning(
                "live: %s failed (%s: %s); its records are dropped from now on",
                self.name,
                type(e).__name__,
                e,
            )

    def close(self, deadline: float) -> None:
        try:
            self.queue.put(_STOP, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            log.warning("live: %s did not drain its queue in time", self.name)
        self.thread.join(max(0.0, deadline - time.monotonic()))
        try:
            self.sink.close()
        except Exception as e:
            log.warning("live: closing %s failed: %s", self.name, e)


class Collector:
    """Gathers the run's records (see the module docstring) and feeds ``sinks``.

    ``emit`` adds ``run`` and ``time`` to each record. ``dropped`` counts records this process
    could not hand over; the sinks count their own.
    """

    def __init__(self, run: str, sinks: Sequence[Sink], *, capacity: int = 10_000) -> None:
        self.run = run
        self.sinks = [_SinkThread(s, capacity) for s in sinks]
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        with contextlib.suppress(OSError):  # not Linux, or over its limit: the default serves
            fcntl.fcntl(self._write_fd, _F_SETPIPE_SZ, 1 << 20)
        self.dropped = 0
        self._owner = os.getpid()
        self._reader = threading.Thread(target=self._read, name="slipstream-collector", daemon=True)
        self._reader.start()

    def emit(self, record: Record) -> None:
        """Hand ``record`` to the collector without blocking (from any process of the run)."""
        line = json.dumps({"run": self.run, "time": time.time(), **record}, default=_plain)
        data = (line + "\n").encode()
        if len(data) > _PIPE_BUF:
            self._drop(f"a record of {len(data)} bytes is over the {_PIPE_BUF}-byte limit")
            return
        try:
            os.write(self._write_fd, data)
        except BlockingIOError:
            self._drop("the collector is falling behind")
        except OSError:  # closed: the run is over
            self._drop("the run's collector is closed")

    def _drop(self, why: str) -> None:
        self.dropped += 1
        if self.dropped == 1:
            log.warning("live: dropping records in process %d: %s", os.getpid(), why)

    def _read(self) -> None:
        pending = b""
        while True:
            chunk = os.read(self._read_fd, 1 << 16)  # blocks until a process writes
            if not chunk:
                return
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line == b"stop":
                    return
                record = json.loads(line)
                for sink in self.sinks:
                    sink.offer(record)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what was emitted before this call, then stop every sink (owner only)."""
        if os.getpid() != self._owner or self._write_fd < 0:
            return
        deadline = time.monotonic() + timeout
        os.set_blocking(self._write_fd, True)
        os.write(self._write_fd, b"stop\n")
        os.close(self._write_fd)
        self._write_fd = -1
        self._reader.join(max(0.0, deadline - time.monotonic()))
        os.close(self._read_fd)
        for sink in self.sinks:
            sink.close(deadline)


def _plain(value: Any) -> Any:
    """JSON for numpy and torch scalars in records."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
