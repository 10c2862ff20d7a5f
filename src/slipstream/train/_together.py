"""``ss.fit_together``: several models trained on the same batches, each read and transformed once.

Each trainer runs its own loop in its own thread (torch releases the GIL in its kernels, so the
models train side by side), fed by a :class:`Tee` over one pass of the pipeline.

Resuming: each trainer's checkpoint holds its branch's place (epoch, batches taken, and the
pipeline's state at that batch). The tee restarts the pipeline where the furthest-behind
branch stopped; a branch further on skips the batches it already trained on.
"""

from __future__ import annotations

import os
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
    starts once no branch still wants an earlier one. Touched by the branches' threads under
    ``cond``; the source is read by one branch at a time, outside the lock.
    """

    def __init__(self, source: Any, n: int, window: int = 4) -> None:
        self.source, self.window = source, window
        self.cond = threading.Condition()
        self.active = set(range(n))
        self.pos = [0] * n
        self.items: dict[int, Any] = {}
        self.states: dict[int, Any] = {}  # the source's state pointing at item k
        self.produced, self.end = 0, 0
        self.epoch = -1
        self.it: Iterator[Any] = iter(())
        self.reading = False
        self.wants: list[int | None] = [None] * n  # the epoch each branch asks for
        self.places: dict[int, tuple[int, int, Any]] = {}  # restored: (epoch, taken, state)

    def restore(self, i: int, epoch: int, taken: int, state: Any) -> None:
        """Branch ``i`` resumes at batch ``taken`` of ``epoch`` (``state``: the source there)."""
        with self.cond:
            self.places[i] = (epoch, taken, state)

    def next(self, i: int, epoch: int) -> Any:
        with self.cond:
            if self.wants[i] != epoch:
                self.wants[i] = epoch
                self.cond.notify_all()
            if epoch < self.epoch:  # it took that pass's last item; the others moved on
                return _END
            if epoch != self.epoch:
                self._wait(lambda: self._due(epoch), f"the other models to reach epoch {epoch}")
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

    def _due(self, epoch: int) -> bool:
        """Whether the pass of ``epoch`` may start: every branch began (after restoring), and
        none still wants an earlier epoch."""
        wants = [self.wants[j] for j in self.active]
        return None not in wants and min(wants, default=epoch) == epoch  # type: ignore[type-var]

    def _start(self, epoch: int) -> None:
        """Begin the pass of ``epoch`` at the earliest place a branch restored into it."""
        here = {j for j in self.active if self.wants[j] == epoch}
        places = {j: self.places.pop(j) for j in here if j in self.places}
        start = min((places[j][1] if j in places else 0 for j in here), default=0)
        state = next((p[2] for p in places.values() if p[1] == start), None)
        if state is not None and hasattr(self.source, "load_state_dict"):
            self.source.load_state_dict(state)  # positions the pass there: no replay
            skip = 0
        else:
            if hasattr(self.source, "set_epoch") and getattr(self.source, "epoch", epoch) != epoch:
                self.source.set_epoch(epoch)
            skip = start  # a source without state reads up to the place again
        self.it, self.epoch = iter(self.source), epoch
        for _ in range(skip):
            next(self.it, None)
        self.items, self.produced, self.end = {}, start, -1
        self.states = {start: _state(self.source)}
        self.pos = [
            (places[j][1] if j in places else start) if j in here else _PAST
            for j in range(len(self.pos))
        ]

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
            self.states[self.produced] = _state(self.source)

    def _drop(self) -> None:
        low = min((self.pos[j] for j in self.active), default=self.produced)
        for k in [k for k in self.items if k < low]:
            del self.items[k]
        for k in [k for k in self.states if k < low]:
            del self.states[k]
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

    def state_at(self, k: int) -> Any:
        with self.cond:
            return self.states.get(k)


_PAST = 1 << 62  # the place of a branch that takes nothing from the current pass (a later one)


def _state(source: Any) -> Any:
    return source.state_dict() if hasattr(source, "state_dict") else None


class Branch:
    """What one trainer iterates: the tee's passes, epoch by epoch. Its state (in the trainer's
    checkpoints) is its place: the epoch, the batches taken, and the source's state there."""

    def __init__(self, tee: Tee, i: int) -> None:
        self.tee, self.i = tee, i
        self.epoch = int(getattr(tee.source, "epoch", 0))
        self.taken = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.taken = epoch, 0

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch
        while (item := self.tee.next(self.i, epoch)) is not _END:
            self.taken += 1
            yield item
        self.epoch, self.taken = epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        source = self.tee.state_at(self.tee.pos[self.i]) if self.taken else None
        return {"epoch": self.epoch, "taken": self.taken, "source": source}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.taken = int(state["epoch"]), int(state["taken"])
        self.tee.restore(self.i, self.epoch, self.taken, state["source"])


def fit_together(
    trainers: Sequence[Trainer],
    train: Any,
    *,
    val: Any = None,
    epochs: int | None = None,
    steps: int | None = None,
    resume: Sequence[str | os.PathLike[str] | None] | None = None,
) -> list[History]:
    """Train every trainer on the same batches of ``train``, read and transformed once.

    >>> keras_hist, torch_hist = ss.fit_together([keras_trainer, torch_trainer], pipe, epochs=5)

    Each trainer keeps its own callbacks and history; one that stops early (EarlyStopping)
    leaves the others going. Trainers must use ``strategy="single"``; those without
    ``threads=`` share the cores. ``val`` must be a slipstream pipeline (each trainer evaluates
    on its own copy of it). ``resume``: one run directory per trainer (as ``fit``'s; ``None``
    for one that starts afresh). Each continues exactly where its checkpoint was taken, on the
    same batches it would have had, while the pipeline reads each batch once.
    """
    _check(trainers, val)
    places = [None] * len(trainers) if resume is None else resume
    if isinstance(places, str | os.PathLike) or len(places) != len(trainers):
        raise ArgumentError(
            f"`resume` must be a list of one run directory (or None) per trainer, "
            f"{len(trainers)} in all; got {resume!r}"
        )
    tee = Tee(train, len(trainers))
    results: list[Any] = [None] * len(trainers)

    def run(i: int) -> None:
        try:
            own_val = None if val is None else val.copy()
            results[i] = trainers[i].fit(
                Branch(tee, i), val=own_val, epochs=epochs, steps=steps, resume=places[i]
            )
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
