"""One ``fit`` call in the process that coordinates it: epochs, evaluation, callbacks, checkpoints.

The loop, as a hand-written one would read::

    for epoch in epochs:
        logs = strategy.train_epoch(fit)          # the strategy's processes step the model
        logs |= evaluate(val)                     # val_* figures
        callbacks.on_epoch_end(logs)              # early stopping, checkpoints
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slipstream._core.checks import positive_int
from slipstream._core.errors import ArgumentError, CheckpointError
from slipstream.train import _checkpoint as ckpt
from slipstream.train._callbacks import overrides
from slipstream.train._group import spawned, stop_signals
from slipstream.train._metrics import Averages
from slipstream.train._step import batch_size, to_device

if TYPE_CHECKING:
    from slipstream.train._strategies import Strategy
    from slipstream.train._trainer import Trainer


@dataclass(frozen=True)
class FitPlan:
    """What ``fit`` was asked to do, validated."""

    train: Any
    val: Any
    epochs: int | None
    steps: int | None
    resume: Path | None

    @classmethod
    def of(cls, train: Any, val: Any, epochs: Any, steps: Any, resume: Any) -> FitPlan:
        for name, pipe in (("train", train), ("val", val)):
            if pipe is not None and not isinstance(pipe, Iterable):
                raise ArgumentError(f"`{name}` must be a pipeline or iterable of batches")
        if epochs is None and steps is None:
            epochs = 1
        epochs = None if epochs is None else positive_int("epochs", epochs)
        steps = None if steps is None else positive_int("steps", steps)
        return cls(train, val, epochs, steps, None if resume is None else Path(resume))


@dataclass
class History:
    """What a fit did: one dict of figures per epoch, and how it ended.

    ``history["val_loss"]`` is that figure's list over epochs (as Keras's ``History.history``).
    """

    epochs: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    stopped_by: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> list[float]:
        return [e[name] for e in self.epochs if name in e]

    def as_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "steps": self.steps,
            "stopped_by": self.stopped_by,
            "config": self.config,
        }


class Fit:
    """The coordinating side of one ``fit`` call (see the module docstring).

    Callbacks see it: ``step``, ``epoch``, ``is_main``, ``stop(reason)``, ``weights()``.
    """

    def __init__(self, trainer: Trainer, plan: FitPlan, strategy: Strategy) -> None:
        self.trainer, self.plan, self.strategy = trainer, plan, strategy
        self.callbacks = trainer.callbacks
        self.step = 0
        self.epoch = 0
        self.resumed_from: Path | None = None  # the checkpoint this run continues
        self.stopping = False
        self.stopped_by = ""
        self.history = History(config=strategy.describe(trainer))
        self._after_step = [c for c in self.callbacks if overrides(c, "on_step_end")]
        self.feed = trainer.live if strategy.is_main else None  # rank 0 reports for the run

    @property
    def is_main(self) -> bool:
        return self.strategy.is_main

    def stop(self, reason: str) -> None:
        """End the run after the current step (a callback's way to stop it)."""
        if not self.stopping:
            self.stopping, self.stopped_by = True, reason

    def run(self) -> History:
        if self.plan.resume is not None:
            self.restore(self.plan.resume)
        for cb in self.callbacks:
            cb.on_fit_start(self)
        with stop_on_signals(self):
            while not self.stopping and not self._done():
                logs = self.strategy.train_epoch(self)
                if self.plan.val is not None and not self.stopping:
                    val = self.strategy.evaluate(self, self.plan.val)
                    logs |= {f"val_{k}": v for k, v in val.items()}
                if self._stopped():  # a stopped epoch is not a finished one
                    break
                self._end_epoch(logs)
        return self._finish()

    def _end_epoch(self, logs: dict[str, float]) -> None:
        self.epoch += 1
        self.history.epochs.append({"epoch": self.epoch, "step": self.step, **logs})
        if self.feed is not None:
            self.feed.emit({"kind": "epoch", "epoch": self.epoch, "step": self.step, **logs})
        for cb in self.callbacks:
            cb.on_epoch_end(self, logs)

    def _finish(self) -> History:
        if not self.stopped_by:
            self.stopped_by = "steps" if self._steps_done() else "epochs"
        if self.feed is not None and self.feed.publish_due(self.step, final=True):
            self.feed.publish(self.step, self.weights())
        for cb in self.callbacks:
            cb.on_fit_end(self)
        self.history.steps, self.history.stopped_by = self.step, self.stopped_by
        self.history.config = self.strategy.describe(self.trainer)  # with its final counters
        return self.history

    def _stopped(self) -> bool:
        return self.stopping

    def _done(self) -> bool:
        epochs = self.plan.epochs
        return (epochs is not None and self.epoch >= epochs) or self._steps_done()

    @property
    def watches_steps(self) -> bool:
        """Whether anything acts between updates: a step callback, a live feed (it publishes
        weights), or a step limit. Hogwild pauses its workers for them; nothing else needs it."""
        return bool(self._after_step) or self.feed is not None or self.plan.steps is not None

    def _steps_done(self) -> bool:
        return self.plan.steps is not None and self.step >= self.plan.steps

    def after_update(self, count: int = 1) -> None:
        """``count`` more optimizer updates happened (summed over Hogwild workers)."""
        self.step += count
        for cb in self._after_step:
            cb.on_step_end(self)
        if self.feed is not None and self.feed.publish_due(self.step):
            self.feed.publish(self.step, self.weights())
        if self._steps_done():
            self.stop("steps")

    def deadline(self) -> float:
        """The earliest time a callback wants to be consulted (``inf`` when none does)."""
        times = [t for cb in self.callbacks if (t := cb.deadline()) is not None]
        return min(times, default=math.inf)

    # -- weights and checkpoints ------------------------------------------------------------

    def weights(self) -> dict[str, torch.Tensor]:
        return self.trainer.model.state_dict()

    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        ckpt.apply_weights(self.trainer.model, weights, "memory")

    def weights_finite(self) -> bool:
        return all(
            bool(torch.isfinite(t).all()) for t in self.weights().values() if t.is_floating_point()
        )

    def clock(self) -> float:
        """The time, in seconds, that callbacks acting on wall-clock time read: the same on every
        rank at the same step, so that ranks act together (see ``Strategy.clock``)."""
        return self.strategy.clock()

    def save(self, root: Path) -> Path | None:
        """Write this run's complete state as a checkpoint under ``root``; every rank calls it at
        the same step and the main one writes. ``None`` where nothing was written: on the other
        ranks, and when the model has NaN or Inf weights (never checkpointed)."""
        rngs = self.strategy.rng_states(rng_state())  # under ddp a collective
        if not self.is_main:
            return None
        if not self.weights_finite():
            warnings.warn(
                f"Checkpoint: not saving step {self.step}: the model has NaN or Inf weights",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        state = {
            "strategy": self.strategy.state_dict(self),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "rng": rngs,
        }
        meta = {
            "step": self.step,
            "epoch": self.epoch,
            "history": self.history.as_dict(),
            "config": self.history.config,
            "saved_at": time.time(),
        }
        return ckpt.write(root, ckpt.step_name(self.step), self.weights(), state, meta)

    def restore(self, where: Path) -> None:
        """Continue from the checkpoint at ``where`` (a run directory or one checkpoint)."""
        saved = (where / "latest").exists() or (where / ckpt.WEIGHTS).exists()
        if not saved and (not where.exists() or where.is_dir()):
            return  # nothing saved there yet: a fresh start (the first run of a script)
        loaded = ckpt.read(where)
        self._check_compatible(loaded)
        self.resumed_from = loaded.path
        ckpt.apply_weights(self.trainer.model, loaded.weights, str(loaded.path))
        self.step, self.epoch = int(loaded.meta["step"]), int(loaded.meta["epoch"])
        saved = loaded.meta["history"]
        self.history.epochs = list(saved["epochs"])
        cb_states = loaded.state["callbacks"]
        if len(cb_states) != len(self.callbacks):
            raise CheckpointError(
                f"{str(loaded.path)!r} was saved with {len(cb_states)} callbacks and this trainer "
                f"has {len(self.callbacks)}; resume with the same callbacks"
            )
        for cb, s in zip(self.callbacks, cb_states, strict=True):
            cb.load_state_dict(s)
        self.strategy.load_state_dict(self, loaded.state["strategy"])
        rngs = loaded.state["rng"]
        rngs = rngs if isinstance(rngs, list) else [rngs]  # saved before states were per rank
        if self.strategy.rank < len(rngs):  # a rank the run did not have keeps its own
            _set_rng_state(rngs[self.strategy.rank])

    def _check_compatible(self, loaded: ckpt.Loaded) -> None:
        saved = loaded.meta.get("config", {}).get("strategy")
        now = self.history.config.get("strategy")
        if saved != now:
            raise CheckpointError(
                f"{str(loaded.path)!r} was saved by strategy {saved!r} and this trainer runs "
                f"{now!r}; resume with the same strategy and worker count"
            )


@contextlib.contextmanager
def stop_on_signals(fit: Fit) -> Iterator[None]:
    """SIGINT and SIGTERM stop the run cleanly after the current step (callbacks then save the
    final checkpoint); a second one interrupts at once. Only where signals arrive (the main
    thread). Ranks that slipstream spawned (SIGINT ignored: a terminal's Ctrl-C must not reach
    them besides their parent) stop this way on SIGUSR1, which their parent sends when it is
    stopped; SIGTERM still ends them at once (how a failed run's ranks are cleared away). A
    process started with a signal ignored (SIGINT under ``nohup … &``) keeps ignoring it, and
    stops cleanly on the other."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = [signal.SIGUSR1] if spawned() else stop_signals()

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if fit.stopped_by == f"signal {name}":
            raise KeyboardInterrupt(f"a second {name}: stopping at once")
        fit.stop(f"signal {name}")

    previous = {s: signal.signal(s, handler) for s in stops}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def evaluate(trainer: Trainer, pipe: Iterable[Any]) -> dict[str, float]:
    """Mean loss and metrics of ``trainer.eval_step`` over ``pipe``."""
    return evaluate_sums(trainer, pipe).result()


def evaluate_sums(trainer: Trainer, pipe: Iterable[Any]) -> Averages:
    """The sums behind :func:`evaluate` (which ranks add up before dividing)."""
    averages = Averages()
    module = trainer.module
    was_training = module.training
    module.eval()
    try:
        for batch in pipe:
            figures = trainer.eval_step(to_device(batch, trainer.device))
            averages.add(figures, batch_size(batch))
    finally:
        module.train(was_training)
    return averages


def rng_state() -> dict[str, Any]:
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
        "numpy_pos": int(np_state[2]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
