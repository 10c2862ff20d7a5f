"""``hogwild``: N processes update one set of parameters in shared memory, without locks.

The parent shares the model's parameters (``share_memory()``) and forks the workers; each
worker builds its own optimizer, reads its own shard of the pipeline and runs with
``cores / workers`` intra-op threads. The parent coordinates: it evaluates between epochs (on
the cores the workers leave, at least one), and every ``sync_every`` updates (summed over
workers) or when a callback's deadline comes it pauses the workers between two steps, runs the
step callbacks (checkpoints, timeouts) and resumes them. With no step callback, live feed or step
limit there is nothing to run, and the workers meet only at the end of each epoch.
A paused run is consistent: the shared weights hold exactly the updates of the batches each
worker's pipeline state says it consumed, so a resumed run repeats and skips no sample.

Shared with the workers: the parameters, one update counter per worker (each written by its
own worker only) and the pause flag and next sync count (written by the parent and, to request
a pause, by a worker). Commands and replies travel on each worker's pipe.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from slipstream._core.checks import positive_int
from slipstream._core.errors import ArgumentError, CheckpointError, LifecycleError, TrainingError
from slipstream._core.procs import cpu_count, torch_threads
from slipstream.train._fit import Fit, FitPlan, History, evaluate_sums
from slipstream.train._group import Group, pack, unpack
from slipstream.train._metrics import means
from slipstream.train._strategies import Local, describe, deterministic

if TYPE_CHECKING:
    from slipstream.train._trainer import Trainer

_NEVER = 2**62


class _WorkerFit:
    """What a worker's loop and guards see of the run."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.stopping = False
        self.stopped_by = ""

    def stop(self, reason: str) -> None:
        if not self.stopping:
            self.stopping, self.stopped_by = True, reason


class Hogwild:
    """Lock-free asynchronous updates by ``workers`` processes on this machine (CPU)."""

    name = "hogwild"
    rank = 0
    is_main = True

    def __init__(self, workers: int = 2, *, sync_every: int = 50) -> None:
        self.workers = positive_int("workers", workers)
        self.sync_every = positive_int("sync_every", sync_every)
        self.threads = 0

    def describe(self, trainer: Trainer) -> dict[str, Any]:
        return describe(self, trainer, self.threads)

    def clock(self) -> float:
        return time.monotonic()

    def rng_states(self, own: dict[str, Any]) -> list[dict[str, Any]]:
        return [own]  # the parent's; workers draw from their own generators

    # -- parent ------------------------------------------------------------------------------

    def launch(self, trainer: Trainer, plan: FitPlan) -> History:
        if trainer.device.type != "cpu":
            raise ArgumentError(
                f"strategy='hogwild' shares parameters in host memory; got device="
                f"{trainer.device}. Use device='cpu', or strategy='ddp' on GPUs"
            )
        if not hasattr(plan.train, "shard"):
            raise ArgumentError(
                "strategy='hogwild' gives each worker its own shard of a slipstream pipeline; "
                f"`train` is a {type(plan.train).__name__}"
            )
        n = self.workers
        self.threads = trainer.threads_for(n)
        trainer.model.share_memory()
        self.counts = mp.RawArray("q", n)
        self.pause = mp.RawValue("i", 0)
        self.next_sync = mp.RawValue("q", _NEVER)
        shards = [plan.train.shard(rank, n) for rank in range(n)]
        # The parent evaluates on the cores the workers leave, at least one: its idle intra-op
        # threads spin after each evaluation, and on a worker's core they slow that worker.
        with torch_threads(max(1, cpu_count() - n * self.threads)):
            self.group = Group(
                "hogwild worker", n, lambda r, conn: self._worker(trainer, shards[r], r, conn)
            )
            try:
                with deterministic(trainer.deterministic):
                    return Fit(trainer, plan, self).run()
            finally:
                self._shut_down()

    def _shut_down(self) -> None:
        """Ask the workers to exit, then reap them; a failure here never hides the run's own."""
        with contextlib.suppress(TrainingError, OSError, EOFError):
            self.group.broadcast(("exit",))
            deadline = time.monotonic() + 10.0
            while len(self.group.exited) < self.workers and time.monotonic() < deadline:
                self.group.recv(deadline - time.monotonic())
        self.group.close(grace=2.0)

    def _request(self, msg: tuple[Any, ...], expect: str) -> list[Any]:
        """Send ``msg`` to every worker and collect one ``expect`` reply from each."""
        self.group.broadcast(msg)
        return self._collect(msg[0], expect)

    def _collect(self, what: str, expect: str) -> list[Any]:
        replies: dict[int, Any] = {}
        while len(replies) < self.workers:
            got = self.group.recv(timeout=60.0)
            if got is None:
                raise LifecycleError(f"hogwild workers did not answer {what!r} within 60 s")
            rank, reply = got
            if reply[0] != expect:
                raise LifecycleError(f"hogwild worker {rank} answered {reply[0]!r} to {what!r}")
            replies[rank] = reply[1]
        return [replies[r] for r in range(self.workers)]

    def train_epoch(self, fit: Fit) -> dict[str, float]:
        self._arm(fit)
        self.group.broadcast(("epoch", fit.epoch))
        running, paused, parts = set(range(self.workers)), set(), []
        while running:
            wait = fit.deadline() - fit.clock()
            got = self.group.recv(timeout=None if wait == float("inf") else max(wait, 0.0))
            if got is None:  # a callback's deadline: pause everyone to consult it
                self.pause.value = 1
                continue
            rank, msg = got
            if msg[0] == "epoch_done":
                running.discard(rank)
                parts.append(unpack(msg[1]))
                if msg[2]:
                    fit.stop(msg[2])
                    self.pause.value = 1
            elif msg[0] == "paused":
                paused.add(rank)
            if paused and paused >= running:
                self._at_pause(fit, paused)
                paused = set()
        fit.after_update(self._total() - fit.step)
        if not parts:
            return {}
        return means(parts[0][0], torch.stack([packed for _, packed in parts]).sum(0))

    def _total(self) -> int:
        return int(sum(self.counts))

    def _arm(self, fit: Fit) -> None:
        goal = _NEVER  # with nothing to run between updates, workers meet only at epoch ends
        if fit.watches_steps:
            goal = (fit.step // self.sync_every + 1) * self.sync_every
        if fit.plan.steps is not None:
            goal = min(goal, fit.plan.steps)
        self.next_sync.value = goal
        self.pause.value = 0

    def _at_pause(self, fit: Fit, paused: set[int]) -> None:
        fit.after_update(self._total() - fit.step)  # step callbacks: checkpoints, timeouts
        self._arm(fit)
        for rank in paused:
            self.group.send(rank, ("stop",) if fit.stopping else ("go",))

    def evaluate(self, fit: Fit, pipe: Iterable[Any]) -> dict[str, float]:
        return evaluate_sums(fit.trainer, pipe).result()

    def state_dict(self, fit: Fit) -> dict[str, Any]:
        return {"workers": [unpack(s) for s in self._request(("state",), "state")]}

    def load_state_dict(self, fit: Fit, state: dict[str, Any]) -> None:
        saved = state["workers"]
        if len(saved) != self.workers:
            raise CheckpointError(
                f"this checkpoint holds {len(saved)} Hogwild workers' positions and the run has "
                f"workers={self.workers}; resume with the same number of workers"
            )
        for rank, s in enumerate(saved):
            self.group.send(rank, ("load", fit.epoch, pack(s)))
        self._collect("load", "loaded")

    # -- worker --------------------------------------------------------------------------------

    def _worker(self, trainer: Trainer, pipe: Any, rank: int, conn: Any) -> None:
        torch.set_num_threads(self.threads)
        _Worker(self, trainer, pipe, rank, conn).serve()


class _Worker:
    """One Hogwild worker process: serves the parent's commands, trains epochs of its shard."""

    def __init__(self, strategy: Hogwild, trainer: Trainer, pipe: Any, rank: int, conn: Any):
        self.s, self.rank, self.conn = strategy, rank, conn
        self.local = Local(trainer, pipe, {"worker": rank}, self.staleness)
        self.fit = _WorkerFit()
        self.seen = 0  # the run's update count when this worker last fetched a batch
        self.stale_sum, self.stale_n = 0, 0

    def serve(self) -> None:
        while (msg := self.conn.recv())[0] != "exit":  # blocks for the parent's next command
            self.command(msg)

    def command(self, msg: Any) -> None:
        kind = msg[0]
        if kind == "epoch":
            self.epoch(msg[1])
        elif kind == "state":
            state = {"updates": self.s.counts[self.rank], **self.local.state_dict()}
            self.conn.send(("state", pack(state)))
        elif kind == "load":
            self.fit.epoch, state = msg[1], unpack(msg[2])
            self.local.load_state_dict(self.fit, state)  # type: ignore[arg-type]
            self.s.counts[self.rank] = int(state["updates"])
            self.conn.send(("loaded", None))

    def epoch(self, epoch: int) -> None:
        self.fit.epoch, self.fit.stopping, self.fit.stopped_by = epoch, False, ""
        averages = self.local.epoch(self.fit, self, self.count)  # type: ignore[arg-type]
        sums = pack((list(averages.sums), averages.packed()))
        self.conn.send(("epoch_done", sums, self.fit.stopped_by))

    def count(self) -> None:
        counts = self.s.counts
        total = sum(counts)
        self.stale_sum += total - self.seen  # other workers' updates since this one's read
        self.stale_n += 1
        counts[self.rank] += 1
        self.fit.step = total + 1
        if total + 1 >= self.s.next_sync.value:
            self.s.pause.value = 1

    def staleness(self) -> dict[str, float]:
        """Mean updates by other workers between this worker's read and its write (since the
        last call)."""
        mean = self.stale_sum / self.stale_n if self.stale_n else 0.0
        self.stale_sum = self.stale_n = 0
        return {"staleness": mean}

    def before(self) -> bool:
        """A step boundary: pause here when the parent asked for it."""
        if self.s.pause.value and not self.fit.stopping:
            self.conn.send(("paused", None))
            self.paused()
        return not self.fit.stopping

    def after(self, has_batch: bool) -> bool:
        self.seen = sum(self.s.counts)  # the forward pass about to run reads these weights
        return has_batch

    def paused(self) -> None:
        """Serve the parent (state for a checkpoint) until it says go on or stop."""
        while True:
            msg = self.conn.recv()  # blocks while the parent runs its step callbacks
            if msg[0] == "go":
                return
            if msg[0] == "stop":
                self.fit.stop("stopped by the parent")
                return
            self.command(msg)
