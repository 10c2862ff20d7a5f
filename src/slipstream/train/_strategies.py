"""Strategies: how processes, parameters and gradients are arranged.

The facade resolves a name or takes an object, then only calls the :class:`Strategy` protocol;
it never asks which strategy it holds. ``single`` lives here; ``ddp`` and ``localsgd`` in
``_distributed``, ``hogwild`` in ``_hogwild``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch

from slipstream._core.checks import positive_int
from slipstream._core.errors import ArgumentError
from slipstream.train._fit import Fit, FitPlan, History, evaluate_sums
from slipstream.train._metrics import Averages
from slipstream.train._precision import Compiled
from slipstream.train._step import Alone, Gate, Stepper, run_epoch

if TYPE_CHECKING:
    from slipstream.train._trainer import Trainer


class Strategy(Protocol):
    """What the loop asks of a strategy.

    ``launch`` starts the processes the strategy needs and runs :class:`Fit` where it belongs,
    returning the coordinating process's history. ``train_epoch`` runs one epoch of updates
    (calling ``fit.after_update`` after each) and returns the epoch's training figures.
    """

    name: str
    workers: int
    rank: int

    @property
    def is_main(self) -> bool: ...

    def clock(self) -> float:
        """Seconds that callbacks acting on time read (``Fit.clock``): ``time.monotonic()`` where
        one process decides; under ddp and localsgd a time the ranks agreed on when they last
        decided together, so that a rule on time fires at the same step on every rank."""
        ...

    def rng_states(self, own: dict[str, Any]) -> list[dict[str, Any]]:
        """The RNG states a checkpoint keeps, in rank order, given this process's ``own``."""
        ...

    def describe(self, trainer: Trainer) -> dict[str, Any]: ...

    def launch(self, trainer: Trainer, plan: FitPlan) -> History: ...

    def train_epoch(self, fit: Fit) -> dict[str, float]: ...

    def evaluate(self, fit: Fit, pipe: Iterable[Any]) -> dict[str, float]: ...

    def state_dict(self, fit: Fit) -> dict[str, Any]: ...

    def load_state_dict(self, fit: Fit, state: dict[str, Any]) -> None: ...


def prepare_module(trainer: Trainer) -> None:
    """Place the model on its device and compile it if asked (in the training process)."""
    trainer.model.to(trainer.device)
    trainer.module = Compiled(trainer.model) if trainer.compile else trainer.model


def epoch_batches(pipe: Any, epoch: int, consumed: bool) -> Iterable[Any]:
    """The batches of ``epoch``: the pipeline positioned at it, or nothing when a resumed run's
    checkpoint was taken after this epoch's last batch (``consumed``)."""
    if consumed:
        return ()
    if hasattr(pipe, "set_epoch") and getattr(pipe, "epoch", epoch) != epoch:
        pipe.set_epoch(epoch)
    return pipe  # type: ignore[no-any-return]


def pipe_state(pipe: Any) -> dict[str, Any] | None:
    return pipe.state_dict() if hasattr(pipe, "state_dict") else None


@contextlib.contextmanager
def deterministic(on: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` for the fit, restored after it."""
    before = torch.are_deterministic_algorithms_enabled()
    if on:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


class Local:
    """The training side shared by strategies whose processes each step their own model copy:
    a stepper, the rank's pipeline, and where the pipeline stands after a resume."""

    def __init__(
        self,
        trainer: Trainer,
        pipe: Any,
        where: Mapping[str, int] | None = None,
        extra: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.stepper = Stepper(trainer, where, extra)
        self.pipe = pipe
        self.consumed = False

    def epoch(self, fit: Fit, gate: Gate, updated: Callable[[], None]) -> Averages:
        batches = epoch_batches(self.pipe, fit.epoch, self.consumed)
        self.consumed = False
        run_epoch(self.stepper, batches, fit, gate, updated)
        averages = self.stepper.averages
        if not fit.stopping:  # a stopped epoch's figures go into its checkpoint
            self.stepper.averages = Averages()
        return averages

    def state_dict(self) -> dict[str, Any]:
        return {"pipe": pipe_state(self.pipe), **self.stepper.state_dict()}

    def load_state_dict(self, fit: Fit, state: dict[str, Any]) -> None:
        self.stepper.load_state_dict(state)
        if state["pipe"] is not None and hasattr(self.pipe, "load_state_dict"):
            self.pipe.load_state_dict(state["pipe"])
            self.consumed = self.pipe.epoch > fit.epoch


class Single:
    """One process; ``threads=`` intra-op threads (default: all cores)."""

    name = "single"
    workers = 1
    rank = 0
    is_main = True

    def __init__(self) -> None:
        self.threads = 0

    def clock(self) -> float:
        return time.monotonic()

    def rng_states(self, own: dict[str, Any]) -> list[dict[str, Any]]:
        return [own]

    def describe(self, trainer: Trainer) -> dict[str, Any]:
        return describe(self, trainer, self.threads)

    def launch(self, trainer: Trainer, plan: FitPlan) -> History:
        self.threads = trainer.set_threads(1)
        prepare_module(trainer)
        self.local = Local(trainer, plan.train)
        with deterministic(trainer.deterministic):
            return Fit(trainer, plan, self).run()

    def train_epoch(self, fit: Fit) -> dict[str, float]:
        return self.local.epoch(fit, Alone(fit), fit.after_update).result()

    def evaluate(self, fit: Fit, pipe: Iterable[Any]) -> dict[str, float]:
        return evaluate_sums(fit.trainer, pipe).result()

    def state_dict(self, fit: Fit) -> dict[str, Any]:
        return self.local.state_dict()

    def load_state_dict(self, fit: Fit, state: dict[str, Any]) -> None:
        self.local.load_state_dict(fit, state)


def describe(strategy: Strategy, trainer: Trainer, threads: int) -> dict[str, Any]:
    """The resolved configuration of a run, recorded in its history and checkpoints."""
    return {
        "strategy": strategy.name,
        "workers": strategy.workers,
        "threads": threads,
        "device": str(trainer.device),
        "precision": trainer.precision_plan.name,
        "compile": trainer.compile,
        "accumulate": trainer.accumulate,
        "clip_grad_norm": trainer.clip_grad_norm,
        "model": type(trainer.model).__name__,
    }


def resolve_strategy(strategy: str | Strategy, workers: int | None) -> Strategy:
    """A strategy from its name (with ``workers``) or as given; unknown names list the valid."""
    if not isinstance(strategy, str):
        if workers is not None:
            raise ArgumentError(
                "`workers=` goes with a strategy name; a strategy object carries its own "
                f"(got workers={workers} and {type(strategy).__name__})"
            )
        return strategy
    from slipstream.train._distributed import DDP, LocalSGD
    from slipstream.train._hogwild import Hogwild

    registry: dict[str, Any] = {
        "single": Single,
        "ddp": DDP,
        "hogwild": Hogwild,
        "localsgd": LocalSGD,
    }
    if strategy not in registry:
        raise ArgumentError(
            f"`strategy={strategy!r}` is not a strategy; choose one of {sorted(registry)} "
            "or pass a strategy object"
        )
    if strategy == "single":
        if workers not in (None, 1):
            raise ArgumentError(f"`workers={workers}` with strategy='single' must be 1 or None")
        return Single()
    n = 2 if workers is None else positive_int("workers", workers)
    return registry[strategy](workers=n)  # type: ignore[no-any-return]
