"""From batches to optimizer updates, in one process: the hot loop.

:class:`Stepper` owns the optimizer, LR scheduler, gradient scaler, accumulation and clipping
of one training process; :func:`run_epoch` is the loop every strategy's training processes run:

    fetch → train_step (forward, loss) → backward → [every k batches] clip, step, schedule

Blocking calls are marked: on a GPU they are where the host waits for the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch

from slipstream.data._tree import leaves, tree_map
from slipstream.train._backends import parameters
from slipstream.train._callbacks import overrides
from slipstream.train._metrics import Averages
from slipstream.train._report import Recorder

if TYPE_CHECKING:
    from slipstream.train._trainer import Trainer

_END = object()


def to_device(batch: Any, device: torch.device) -> Any:
    """Arrays and tensors of ``batch`` as tensors on ``device`` (no copy where they are)."""

    def move(leaf: Any) -> Any:
        t = torch.as_tensor(leaf)
        return t if t.device == device else t.to(device, non_blocking=True)

    return tree_map(move, batch)


def batch_size(batch: Any) -> int:
    """Samples in ``batch``: the shortest first dimension among its leaves, so that a flat
    tensor of tokens beside per-sample offsets and labels counts the samples, not the tokens
    (1 when no leaf has a length: 0-dim tensors, scalars)."""
    sized = (x for x in leaves(batch) if hasattr(x, "__len__") and getattr(x, "ndim", 1) > 0)
    return min((len(x) for x in sized), default=1)


class Stepper:
    """Optimizer updates for one process's ``trainer.module`` (which strategies may wrap).

    ``step(batch)`` runs one micro-batch and returns whether an update happened. The user's
    ``train_step`` returns the loss to learn from; a loss that does not require grad means the
    step updated the weights itself (GANs, custom schemes), and the stepper only records it.
    """

    def __init__(
        self,
        trainer: Trainer,
        where: Mapping[str, int] | None = None,
        extra: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.trainer = trainer
        self.optimizer = trainer.make_optimizer(parameters(trainer.model))
        self.scheduler = trainer.make_scheduler(self.optimizer)
        self.scaler = trainer.precision_plan.scaler()
        self.accumulate = trainer.accumulate
        self.pending = 0  # micro-batches whose gradients wait for an update
        self.averages = Averages()
        self.guards = [c for c in trainer.callbacks if overrides(c, "before_update")]
        feed = trainer.live
        self.recorder = None if feed is None else Recorder(feed, where or {}, extra)

    def step(self, batch: Any, fit: Any) -> bool:
        if self.recorder is not None:
            self.recorder.first_batch(self.trainer, batch)
        figures = self.trainer.train_step(to_device(batch, self.trainer.device))
        loss = figures["loss"]
        n = batch_size(batch)
        self.averages.add(figures, n)
        if self.recorder is not None:
            self.recorder.samples += n
        if not loss.requires_grad:  # the user's step updated the weights itself
            return True
        if not all(g.before_update(fit, loss) for g in self.guards):
            self.optimizer.zero_grad(set_to_none=True)
            self.pending = 0
            return False
        self._backward(loss if self.accumulate == 1 else loss / self.accumulate)
        self.pending += 1
        return self.pending == self.accumulate and self.update()

    def _backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()  # type: ignore[no-untyped-call]

    def update(self) -> bool:
        """Apply the accumulated gradients: unscale, clip, step, schedule, zero."""
        if self.pending == 0:
            return False
        self.pending = 0
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if (clip := self.trainer.clip_grad_norm) is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None and self.trainer.schedule_every == "step":
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def end_epoch(self) -> bool:
        """Flush a partial accumulation; step an epoch-wise scheduler."""
        updated = self.update()
        if self.scheduler is not None and self.trainer.schedule_every == "epoch":
            self.scheduler.step()
        return updated

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"optimizer": self.optimizer.state_dict()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        state["averages"] = {"sums": dict(self.averages.sums), "count": self.averages.count}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.averages.sums = dict(state["averages"]["sums"])
        self.averages.count = int(state["averages"]["count"])


def run_epoch(
    stepper: Stepper,
    batches: Iterable[Any],
    fit: Any,
    gate: Gate,
    updated: Callable[[], None],
) -> None:
    """One pass. ``gate.before()`` may end it before the next batch is fetched (a stop: the
    pipeline's position then still points at that batch); ``gate.after(has_batch)`` may end it
    once fetched (a peer rank out of data); ``updated()`` runs after each optimizer update. A
    stopped pass leaves a partial accumulation and an epoch-wise schedule alone."""
    it = iter(batches)
    recorder = stepper.recorder
    if recorder is not None:
        recorder.watch(batches)
    while gate.before():
        fetch_start = time.perf_counter()
        batch = next(it, _END)  # blocks until the pipeline delivers (input stall)
        if recorder is not None:
            recorder.fetch_s += time.perf_counter() - fetch_start
        if not gate.after(batch is not _END):
            break
        if stepper.step(batch, fit):
            updated()
            if recorder is not None:
                recorder.updated(fit.step, stepper.averages)
    if not fit.stopping and stepper.end_epoch():
        updated()


class Gate(Protocol):
    """Whether a training process takes another step (strategies decide together or alone)."""

    def before(self) -> bool: ...

    def after(self, has_batch: bool) -> bool: ...


class Alone:
    """A process that decides alone: go on until stopped or out of data."""

    def __init__(self, fit: Any) -> None:
        self.fit = fit

    def before(self) -> bool:
        return not self.fit.stopping

    def after(self, has_batch: bool) -> bool:
        return has_batch
