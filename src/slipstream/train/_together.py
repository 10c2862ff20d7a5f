"""``ss.fit_together``: several models trained on the same batches, each read and transformed once.

Each trainer runs its own loop in its own thread (torch releases the GIL in its kernels, so the
models train side by side), fed by a :class:`Tee` over one pass of the pipeline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from slipstream._core.errors import ArgumentError, StallError
from slipstream.train._fit import History
from slipstream.train._trainer import Trainer

_END = object()
WAIT_S = 600.0  # the longest a branch waits for a slower one (an epoch of the slowest model)


class Tee:
    """One pass over ``source`` at a time, shared by ``n`` branches that each get every item.

    The branch that first needs item k reads it; an item is dropped once every branch took it;
    a branch ``window`` items ahead of the slowest waits, so memory stays bounded. A new epoch
    starts once every branch finished the last. Touched by the branches' threads under
    ``cond``; the source is read by one branch at a time, outside the lock.
    """

    def __init__(self, source: Any, n: int, window: int = 4) -> None:
        self.source, self.window = source, window
        self.cond = threading.Condition()
        self.active = set(range(n))
        self.pos = [0] * n
        self.items: dict[int, Any] = {}
        self.produced, self.end = 0, 0
        self.epoch = -1
        self.it: Iterator[Any] = iter(())
        self.reading = False

    def next(self, i: int, epoch: int) -> Any:
        with self.cond:
            if epoch < self.epoch:  # it took that pass's last item; the others moved on
                return _END
            if epoch != self.epoch:
                self._wait(lambda: self._pass_done(), f"the other models to finish epoch {epoch}")
                if epoch != self.epoch:
                    self._start(epoch)
            k = self.pos[i]
            while k >= self.produced:
                if self.end >= 0 and k >= self.end and self.epoch == epoch:
                    return _END
                self._wait(
                    lambda: self._can_read() or k < self.produced or self.end >= 0,
                    "a slower model to take the batches ahead of it",
                )
                if k < self.produced or self.end >= 0:
                    continue
                self._read()
            item = self.items[k]
            self.pos[i] = k + 1
            self._drop()
            return item

    def _pass_done(self) -> bool:
        return self.end >= 0 and all(self.pos[j] >= self.end for j in self.active)

    def _start(self, epoch: int) -> None:
        if hasattr(self.source, "set_epoch") and getattr(self.source, "epoch", epoch) != epoch:
            self.source.set_epoch(epoch)
        self.it, self.epoch = iter(self.source), epoch
        self.items, self.produced, self.end = {}, 0, -1
        self.pos = [0] * len(self.pos)

    def _can_read(self) -> bool:
        ahead = self.produced - min((self.pos[j] for j in self.active), default=self.produced)
        return not self.reading and ahead < self.window

    def _read(self) -> None:
        self.reading = True
        self.cond.release()
        try:
            item = next(self.it, _END)  # blocks on the pipeline, with the lock released
        finally:
            self.cond.acquire()
            self.reading = False
            self.cond.notify_all()
        if item is _END:
            self.end = self.produced
        else:
            self.items[self.produced] = item
            self.produced += 1

    def _drop(self) -> None:
        low = min((self.pos[j] for j in self.active), default=self.produced)
        for k in [k for k in self.items if k < low]:
            del self.items[k]
        self.cond.notify_all()

    def _wait(self, ready: Any, what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not ready():
            if not self.cond.wait(deadline - time.monotonic()):
                raise StallError(f"fit_together: waited {WAIT_S:.0f} s for {what}")

    def leave(self, i: int) -> None:
        """Branch ``i`` takes nothing more (its model stopped); the others no longer wait."""
        with self.cond:
            self.active.discard(i)
            self.cond.notify_all()


class Branch:
    """What one trainer iterates: the tee's passes, epoch by epoch."""

    def __init__(self, tee: Tee, i: int) -> None:
        self.tee, self.i = tee, i
        self.epoch = int(getattr(tee.source, "epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch
        while (item := self.tee.next(self.i, epoch)) is not _END:
            yield item
        self.epoch = epoch + 1


def fit_together(
    trainers: Sequence[Trainer],
    train: Any,
    *,
    val: Any = None,
    epochs: int | None = None,
    steps: int | None = None,
) -> list[History]:
    """Train every trainer on the same batches of ``train``, read and transformed once.

    >>> keras_hist, torch_hist = ss.fit_together([keras_trainer, torch_trainer], pipe, epochs=5)

    Each trainer keeps its own callbacks and history; one that stops early (EarlyStopping)
    leaves the others going. Trainers must use ``strategy="single"``; those without
    ``threads=`` share the cores. ``val`` must be a slipstream pipeline (each trainer evaluates
    on its own copy of it). The data position is not part of their checkpoints.
    """
    _check(trainers, val)
    tee = Tee(train, len(trainers))
    results: list[Any] = [None] * len(trainers)

    def run(i: int) -> None:
        try:
            own_val = None if val is None else val.copy()
            results[i] = trainers[i].fit(Branch(tee, i), val=own_val, epochs=epochs, steps=steps)
        except BaseException as e:
            results[i] = e
        finally:
            tee.leave(i)

    threads = [threading.Thread(target=run, args=(i,), name=f"slipstream-together-{i}")
               for i in range(len(trainers))]  # fmt: skip
    for th in threads:
        th.start()
    for th in threads:
        th.join()  # each ends with its fit; a failed one leaves the tee, so none waits on it
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def _check(trainers: Sequence[Trainer], val: Any) -> None:
    if not trainers:
        raise ArgumentError("`trainers` is empty; pass the trainers to train together")
    for t in trainers:
        if t.strategy.name != "single":
            raise ArgumentError(
                f"fit_together runs trainers side by side in one process; a trainer has "
                f"strategy={t.strategy.name!r}: use strategy='single'"
            )
        t.threads = t.threads_for(len(trainers))
    if val is not None and not hasattr(val, "copy"):
        raise ArgumentError("`val` must be a slipstream pipeline (each trainer reads a copy)")
