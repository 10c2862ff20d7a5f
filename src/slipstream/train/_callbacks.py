"""Callbacks: a handful of hooks with no-op defaults, and the ones slipstream ships.

Hooks run in the process that coordinates the run (the only process for ``single``, every rank
for ``ddp`` and ``localsgd`` with the same values, the parent for ``hogwild``). ``step`` is the
number of optimizer updates so far, summed over Hogwild workers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from slipstream._core.checks import non_negative_int, one_of, positive_int, positive_number
from slipstream._core.errors import ArgumentError
from slipstream.train import _checkpoint as ckpt

if TYPE_CHECKING:
    from slipstream.train._fit import Fit

Mode = Literal["min", "max", "auto"]


class Callback:
    """Override the hooks you need; each has a no-op default.

    ``deadline()`` is the time, on ``fit.clock()``, by which the callback wants ``on_step_end``
    to run again (for wall-clock rules); ``None`` when it has no such need. Rules on time read
    ``fit.clock()``, which ranks agree on, so that they act at the same step on every rank.
    """

    def on_fit_start(self, fit: Fit) -> None:
        """Before the first step (after a resumed run's state is loaded)."""

    def on_step_end(self, fit: Fit) -> None:
        """After an optimizer update."""

    def on_epoch_end(self, fit: Fit, logs: dict[str, float]) -> None:
        """After an epoch's training and evaluation; ``logs`` holds both."""

    def on_fit_end(self, fit: Fit) -> None:
        """After the last step, however the run stopped."""

    def before_update(self, fit: Fit, loss: torch.Tensor) -> bool:
        """Before backward; return ``False`` to skip this batch's update."""
        return True

    def deadline(self) -> float | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def overrides(callback: object, hook: str) -> bool:
    """Whether ``callback`` has its own ``hook`` (the loop skips the no-op defaults)."""
    return getattr(type(callback), hook) is not getattr(Callback, hook)


def _sense(monitor: str, mode: Mode) -> Literal["min", "max"]:
    one_of("mode", mode, ("min", "max", "auto"))
    if mode != "auto":
        return mode
    return "max" if any(k in monitor for k in ("acc", "auc", "f1", "precision")) else "min"


class _Best:
    """The best value of a monitored figure so far."""

    def __init__(self, monitor: str, mode: Mode, min_delta: float = 0.0) -> None:
        self.monitor, self.sense, self.min_delta = monitor, _sense(monitor, mode), min_delta
        self.value = math.inf if self.sense == "min" else -math.inf

    def improved(self, logs: Mapping[str, float]) -> bool:
        if self.monitor not in logs:
            raise ArgumentError(
                f"`monitor={self.monitor!r}` is not among this epoch's figures "
                f"{sorted(logs)}; pass val= to fit for val_* figures"
            )
        value = logs[self.monitor]
        if self.sense == "min":
            better = value < self.value - self.min_delta
        else:
            better = value > self.value + self.min_delta
        if better:
            self.value = value
        return better


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved for ``patience`` epochs.

    With ``restore_best_weights`` the model ends with the weights of its best epoch.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        *,
        mode: Mode = "auto",
        patience: int = 3,
        min_delta: float = 0.0,
        restore_best_weights: bool = True,
    ) -> None:
        self.best = _Best(monitor, mode, float(min_delta))
        self.patience = non_negative_int("patience", patience)
        self.restore = restore_best_weights
        self.waited = 0
        self.weights: dict[str, torch.Tensor] = {}

    def on_epoch_end(self, fit: Fit, logs: dict[str, float]) -> None:
        if self.best.improved(logs):
            self.waited = 0
            if self.restore:
                self.weights = {k: v.detach().clone() for k, v in fit.weights().items()}
        else:
            self.waited += 1
            if self.waited >= self.patience:
                fit.stop(
                    f"EarlyStopping: {self.best.monitor} did not improve for "
                    f"{self.patience} epochs (best {self.best.value:.6g})"
                )

    def on_fit_end(self, fit: Fit) -> None:
        if self.restore and self.weights and fit.stopped_by.startswith("EarlyStopping"):
            fit.set_weights(self.weights)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best.value, "waited": self.waited, "weights": self.weights}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best.value, self.waited = float(state["best"]), int(state["waited"])
        self.weights = dict(state["weights"])


class Timeout(Callback):
    """Stop cleanly after a wall-clock budget for this ``fit`` call.

    With a :class:`Checkpoint` among the callbacks the stopped run is saved, so
    ``fit(resume=...)`` continues it.
    """

    def __init__(self, *, minutes: float = 0.0, seconds: float = 0.0) -> None:
        total = float(minutes) * 60 + float(seconds)
        positive_number("minutes*60 + seconds", total)
        self.budget = total
        self.ends = math.inf

    def on_fit_start(self, fit: Fit) -> None:
        self.ends = fit.clock() + self.budget

    def on_step_end(self, fit: Fit) -> None:
        if fit.clock() >= self.ends:
            fit.stop(f"Timeout: the {self.budget:g} s budget ran out")

    def deadline(self) -> float | None:
        return self.ends


class NonFiniteGuard(Callback):
    """On a NaN or Inf loss: ``action="skip"`` drops that batch's update, ``"stop"`` ends the run.

    Checking costs one device synchronisation per batch. Whatever the guard, a model with
    non-finite weights is never written as a checkpoint.
    """

    def __init__(self, action: Literal["skip", "stop"] = "skip", *, max_skipped: int = 100) -> None:
        self.action = one_of("action", action, ("skip", "stop"))
        self.max_skipped = non_negative_int("max_skipped", max_skipped)
        self.skipped = 0

    def before_update(self, fit: Fit, loss: torch.Tensor) -> bool:
        if bool(torch.isfinite(loss.detach()).all()):  # device sync
            return True
        self.skipped += 1
        if self.action == "stop" or self.skipped > self.max_skipped:
            fit.stop(f"NonFiniteGuard: loss was {loss.item()} at step {fit.step}")
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.skipped = int(state["skipped"])


class Checkpoint(Callback):
    """Save the run every ``every_steps`` updates, ``every_seconds``, or ``every_epochs``.

    Keeps the newest ``keep`` checkpoints, and with ``monitor`` also the best one (pointed to
    by ``dir/best``). The final state is saved when the run stops, however it stops.
    ``fit(resume=dir)`` continues from ``dir/latest``. ``dir`` holds one run: once it holds
    checkpoints, a run that did not resume from its ``latest`` is refused (``CheckpointError``).
    """

    def __init__(
        self,
        dir: str | Path,
        *,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        every_epochs: int | None = None,
        keep: int = 3,
        monitor: str | None = None,
        mode: Mode = "auto",
    ) -> None:
        self.dir = Path(dir)
        self.every_steps = None if every_steps is None else positive_int("every_steps", every_steps)
        self.every_seconds = positive_number("every_seconds", every_seconds, allow_none=True)
        if every_steps is None and every_seconds is None and every_epochs is None:
            every_epochs = 1
        self.every_epochs = (
            None if every_epochs is None else positive_int("every_epochs", every_epochs)
        )
        self.keep = positive_int("keep", keep)
        self.best = None if monitor is None else _Best(monitor, mode)
        self.best_name: str | None = None
        self.saved_step = -1
        self.next_time = math.inf

    def on_fit_start(self, fit: Fit) -> None:
        if fit.is_main:
            ckpt.clean_partial(self.dir)
            ckpt.claim(self.dir, fit.resumed_from)
        self.saved_step = fit.step
        self._arm(fit)

    def _arm(self, fit: Fit) -> None:
        if self.every_seconds is not None:
            self.next_time = fit.clock() + self.every_seconds

    def deadline(self) -> float | None:
        return self.next_time if self.every_seconds is not None else None

    def on_step_end(self, fit: Fit) -> None:
        n = self.every_steps
        due_steps = n is not None and fit.step // n > self.saved_step // n
        if due_steps or fit.clock() >= self.next_time:
            self.save(fit)

    def on_epoch_end(self, fit: Fit, logs: dict[str, float]) -> None:
        best = self.best is not None and self.best.improved(logs)
        due = self.every_epochs is not None and fit.epoch % self.every_epochs == 0
        if best:
            self.best_name = ckpt.step_name(fit.step)
        written = (best or due) and self.save(fit, force=True)
        if best and written and self.best_name is not None:
            ckpt.point(self.dir, "best", self.best_name)

    def on_fit_end(self, fit: Fit) -> None:
        if fit.step != self.saved_step:
            self.save(fit)

    def save(self, fit: Fit, *, force: bool = False) -> bool:
        """Save now (every rank calls it at the same step); whether this process wrote."""
        if fit.step == self.saved_step and not force:
            return False
        self.saved_step = fit.step
        self._arm(fit)
        if fit.save(self.dir) is None:
            return False
        ckpt.prune(self.dir, self.keep, {self.best_name} if self.best_name else set())
        return True

    def state_dict(self) -> dict[str, Any]:
        best = None if self.best is None else self.best.value
        return {"best": best, "best_name": self.best_name}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.best is not None and state["best"] is not None:
            self.best.value = float(state["best"])
        self.best_name = state["best_name"]
