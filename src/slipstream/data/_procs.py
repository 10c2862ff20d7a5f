"""``map(mode="process")``: worker processes for Python-heavy functions.

Workers start (fork by default) before any thread of the pipeline does. They receive sample
indices and read from the source themselves when the map follows the source directly, so the
dataset never travels; results come back through a per-worker shared-memory arena (one copy),
falling back to the pipe only for results larger than the arena. Per-item IPC is amortised by
sending chunks sized to about 5 ms of work.

A pass that takes every result leaves its pool to the pipeline's next pass (:class:`KeptPools`),
so workers live from epoch to epoch: no fork, no new arena, nothing to warm up again.

Threads: the feeder thread calls ``submit``/``flush``; one collector thread receives results and
watches the workers' sentinels; ``close`` is called from the consumer's thread.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import signal
import threading
import warnings
import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch

from slipstream._core import shm
from slipstream._core.errors import ArgumentError, WorkerDiedError
from slipstream._core.procs import die_with_parent, ended, how_it_ended, stop_process
from slipstream._core.stats import Meter, ProcessStats, now, rss_bytes
from slipstream.data._node import CLOSE_S, POLL_S, Ctx, Item
from slipstream.data._parallel import MapWork, format_remote
from slipstream.data._pools import Done, Err, Pool
from slipstream.data._wire import SLOTS, ParentArena, WorkerArena, encode_inband

_TARGET_CHUNK_S = 0.005


@dataclass(frozen=True, slots=True)
class ProcessOptions:
    """How process workers are started and fed."""

    start_method: str
    shm_bytes: int = 64 << 20
    threads: int = 1
    chunk: int | None = None


class _RemoteTraceback(Exception):
    def __str__(self) -> str:
        return f"\n\nthe error happened in a worker process:\n{self.args[0]}"


def _run_chunk(msg: tuple[Any, ...], work: MapWork, arena: WorkerArena | None) -> list[Any]:
    _, slot, seed, epoch, units = msg
    if arena is None:
        return [_wire(out) for out in work.run_many(units, seed, epoch)]
    arena.start(slot)
    return [_wire(out) for out in work.run_many(units, seed, epoch, arena.alloc)]


def _wire(out: Any) -> Any:
    """A result as sent back: ``("v", value)`` or ``("e", exception, traceback text, key)``."""
    if isinstance(out, Err):
        return (*_err(out.exc), out.key)
    return ("v", out)


def _err(e: BaseException) -> tuple[str, Any, str]:
    try:  # does the exception survive pickling? (our own bytes, just made)
        picklable: Any = pickle.loads(pickle.dumps(e))
    except Exception:
        picklable = None
    return ("e", picklable or RuntimeError(f"{type(e).__name__}: {e}"), format_remote(e))


def _worker_main(
    parent: int | None,
    inbox: mpc.Connection,
    outbox: mpc.Connection,
    arena_name: str | None,
    arena_bytes: int,
    work: MapWork,
    threads: int,
) -> None:
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides how to stop
    torch.set_num_threads(threads)
    arena = None if arena_name is None else WorkerArena(arena_name, arena_bytes)
    while True:
        try:
            msg = inbox.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        t0 = now()
        outs = _run_chunk(msg, work, arena)
        task = msg[0]
        meta, layout = (encode_inband(outs), None) if arena is None else arena.encode(outs)
        outbox.send((task, now() - t0, meta, layout, rss_bytes()))


@dataclass(slots=True)
class _Worker:
    index: int
    proc: Any
    inbox: mpc.Connection
    outbox: mpc.Connection
    arena: ParentArena | None
    free: list[int]
    tasks: dict[int, tuple[int, list[tuple[int, Item]]]]  # task -> (arena slot, entries)


class ProcessPool:
    """``workers`` processes running ``fn``; see the module docstring for who does what."""

    def __init__(
        self,
        name: str,
        work: MapWork,
        ctx: Ctx,
        done: Done,
        meter: Meter,
        workers: int,
        opts: ProcessOptions,
    ) -> None:
        self.name, self._done, self._meter, self._opts = name, done, meter, opts
        self._owner = contextlib.ExitStack()
        self._cond = threading.Condition()
        self._pending: list[tuple[int, Item]] = []
        self._task_ids = itertools.count()
        self._closing = False
        self._failure: BaseException | None = None
        self._warned_inband = False
        self._chunk = opts.chunk or 1
        self._adapt = opts.chunk is None and work.collate is None  # a batch is one task already
        self._ctx = ctx
        self.stage = work.stage
        fork = opts.start_method == "fork"
        if work.source is not None:
            work = replace(work, source=work.source.for_workers(self._owner, fork=fork))
        arena = self._arena_bytes(workers)
        try:
            self._workers = [self._spawn(i, work, arena) for i in range(workers)]
        except BaseException:
            self.close()
            raise
        self._collector = threading.Thread(
            target=self._collect, name=f"slipstream-{name}-collector", daemon=True
        )
        self._collector.start()

    def _arena_bytes(self, workers: int) -> int:
        free = shm.shm_free_bytes()
        if free is None:
            return 0
        return min(self._opts.shm_bytes, free // (2 * workers)) // 4096 * 4096

    def _spawn(self, i: int, work: MapWork, arena: int) -> _Worker:
        ctx = mp.get_context(self._opts.start_method)
        block = None
        if arena > 0:  # reserved slot by slot by the worker, as results need it
            block = shm.create(arena, what=f"stage '{self.name}' worker {i}", reserve=False)
            self._owner.callback(shm.release, block)
        inbox_r, inbox_w = ctx.Pipe(duplex=False)
        outbox_r, outbox_w = ctx.Pipe(duplex=False)
        parent = None if self._opts.start_method == "forkserver" else os.getpid()
        args = (parent, inbox_r, outbox_w, block and block.name, arena, work)
        proc = ctx.Process(  # type: ignore[attr-defined]
            target=_worker_main,
            args=(*args, self._opts.threads),
            name=f"slipstream-{self.name}-{i}",
            daemon=True,
        )
        try:
            proc.start()
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise ArgumentError(
                f"stage '{self.name}': with start_method='{self._opts.start_method}' the function "
                f"and source must pickle ({e}); define the function at module level, or use "
                "start_method='fork' or mode='thread'"
            ) from e
        inbox_r.close()
        outbox_w.close()
        worker = _Worker(i, proc, inbox_w, outbox_r, None, list(range(SLOTS)), {})
        if block is not None:
            worker.arena = ParentArena(block, lambda slot: self._free_slot(worker, slot))
        return worker

    def rebind(self, ctx: Ctx, done: Done, meter: Meter) -> None:
        """Serve a new pass (a kept pool): its position, results and figures."""
        with self._cond:
            self._ctx, self._done, self._meter = ctx, done, meter

    def idle(self) -> bool:
        """Every worker alive and nothing pending or in flight: able to serve another pass."""
        with self._cond:
            busy = self._pending or any(w.tasks for w in self._workers)
            if busy or self._failure is not None or self._closing:
                return False
        return not any(ended(w.proc) for w in self._workers)  # the collector may reap them

    def _free_slot(self, w: _Worker, slot: int) -> None:
        with self._cond:
            w.free.append(slot)
            self._cond.notify_all()

    def submit(self, seq: int, item: Item) -> None:
        self._pending.append((seq, item))
        if len(self._pending) >= self._chunk:
            self.flush()

    def flush(self) -> None:
        """Send the pending items as one chunk to the least loaded worker with a free slot."""
        if not self._pending:
            return
        entries, self._pending = self._pending, []
        with self._cond:
            while (w := self._free_worker()) is None:
                if self._closing or self._failure is not None:
                    return
                self._cond.wait(POLL_S)
            slot = w.free.pop()
            task = next(self._task_ids)
            w.tasks[task] = (slot, entries)
        units = [(it.value, it.key, it.keys) for _, it in entries]
        with contextlib.suppress(OSError):  # a dead worker is reported by the collector
            w.inbox.send((task, slot, self._ctx.seed, self._ctx.epoch, units))

    def _free_worker(self) -> _Worker | None:
        free = [w for w in self._workers if w.free]
        return min(free, key=lambda w: len(w.tasks)) if free else None

    def _collect(self) -> None:
        by_conn = {w.outbox: w for w in self._workers}
        by_sentinel = {w.proc.sentinel: w for w in self._workers}
        while not self._closing:
            ready = mpc.wait([*by_conn, *by_sentinel], timeout=POLL_S)
            for r in ready:
                if r in by_conn:
                    with contextlib.suppress(EOFError, OSError):
                        self._receive(by_conn[r], by_conn[r].outbox.recv())
            dead = [by_sentinel[r] for r in ready if r in by_sentinel]
            if dead and not self._closing:
                self._died(dead[0])
                return

    def _receive(self, w: _Worker, msg: tuple[int, float, bytes, Any, int]) -> None:
        task, busy, meta, layout, rss = msg
        with self._cond:
            slot, entries = w.tasks.pop(task)
        if layout is None and w.arena is not None:
            self._warn_inband()
        if w.arena is None:
            self._free_slot(w, slot)
            outs = pickle.loads(meta)  # from our own worker over a private pipe
        else:
            outs = w.arena.decode(meta, layout, slot)
        self._meter.busy += busy
        self._account(w, len(entries), busy, rss)
        if self._adapt:
            self._chunk = max(1, min(64, round(_TARGET_CHUNK_S * len(entries) / max(busy, 1e-6))))
        for (seq, item), out in zip(entries, outs, strict=True):
            self._done(seq, item, out[1] if out[0] == "v" else _remote_err(out))

    def _account(self, w: _Worker, items: int, busy: float, rss: int) -> None:
        """Add a chunk to the figures worker ``w`` reported about itself."""
        figures = self._meter.processes
        was = figures.get(w.index)
        items_before, busy_before = (0, 0.0) if was is None else (was.items, was.busy_s)
        figures[w.index] = ProcessStats(
            w.index, w.proc.pid, items_before + items, busy_before + busy, rss
        )

    def _warn_inband(self) -> None:
        if not self._warned_inband:
            self._warned_inband = True
            warnings.warn(
                f"stage '{self.name}': a chunk's results did not fit a shared-memory slot "
                f"({self._opts.shm_bytes // SLOTS >> 20} MiB: shm_bytes/{SLOTS}) or /dev/shm is "
                "full; they went through a pipe, which is slower. Raise shm_bytes=, or batch less",
                RuntimeWarning,
                stacklevel=1,
            )

    def _died(self, w: _Worker) -> None:
        w.proc.join(1.0)
        how = how_it_ended(w.proc.exitcode)
        with self._cond:
            keys = [it.key for _, entries in w.tasks.values() for _, it in entries]
            self._failure = WorkerDiedError(
                f"stage '{self.name}': worker {w.index} (pid {w.proc.pid}) {how} while processing "
                f"samples {keys or '(none)'}; the pipeline stopped. A segfault or the OOM killer "
                "are the usual causes; mode='thread' shows a Python traceback instead"
            )
            self._cond.notify_all()

    def failure(self) -> BaseException | None:
        return self._failure

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for w in getattr(self, "_workers", []):
            with contextlib.suppress(BrokenPipeError, OSError):
                w.inbox.send(None)
        for w in getattr(self, "_workers", []):
            stop_process(w.proc, CLOSE_S)  # a worker busy in a long call is terminated
            w.inbox.close()
            w.outbox.close()
        collector = getattr(self, "_collector", None)
        if collector is not None and collector is not threading.current_thread():
            collector.join(CLOSE_S)
        self._owner.close()


class KeptPools:
    """Process pools that passes which took every result leave to the pipeline's next pass.

    Keyed by stage number: a pipeline's stages never change, so a number names the same work in
    every pass. The pipeline closes them with itself (``close()``, garbage collection or exit);
    a pass left early closes its pools instead of offering them. A process forked from the
    owner (a Hogwild worker) starts with none: the parent's pools are not its own to use, and
    it calls :func:`close_kept_pools` before it ends with ``os._exit``.
    """

    def __init__(self) -> None:
        self._pools: dict[int, ProcessPool] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _here(self) -> dict[int, ProcessPool]:
        """This process's pools (call with the lock held)."""
        if self._pid != os.getpid():
            self._pid, self._pools = os.getpid(), {}
        return self._pools

    def take(self, stage: int) -> ProcessPool | None:
        """The pool kept for ``stage``, if all its workers still live (else it is closed)."""
        with self._lock:
            pool = self._here().pop(stage, None)
        if pool is not None and not pool.idle():
            pool.close()
            return None
        return pool

    def offer(self, pool: Pool) -> bool:
        """Keep ``pool`` if it can serve another pass; ``False`` if the caller should close it."""
        if not isinstance(pool, ProcessPool) or not pool.idle():
            return False
        with self._lock:
            old = self._here().pop(pool.stage, None)
            self._pools[pool.stage] = pool
        _KEEPERS.add(self)
        if old is not None:
            old.close()
        return True

    def close(self) -> None:
        with self._lock:
            pools = list(self._here().values())
            self._pools = {}
        for pool in pools:
            pool.close()


_KEEPERS: weakref.WeakSet[KeptPools] = weakref.WeakSet()


def close_kept_pools() -> None:
    """Close the pools every pipeline keeps in this process, for a process about to end with
    ``os._exit`` (which runs no finalizer). Pools of the process it was forked from are left."""
    for kept in list(_KEEPERS):
        kept.close()


def _remote_err(out: tuple[str, Any, str, int | None]) -> Err:
    _, exc, text, key = out
    exc.__cause__ = _RemoteTraceback(text)
    return Err(exc, key)


def default_start_method() -> str:
    """``fork`` where the platform has it (workers share the parent's pages), else ``spawn``."""
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"
