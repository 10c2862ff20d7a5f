"""``ss.Trainer``: the facade. It validates, resolves the strategy, and owns the user's hooks.

Subclass and override :meth:`Trainer.train_step` / :meth:`Trainer.eval_step` (and
:meth:`Trainer.split`) for custom steps; everything else (processes, devices, precision,
accumulation, checkpoints) stays with the loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, cast

import torch

from slipstream._core.checks import one_of, positive_int, positive_number
from slipstream._core.errors import ArgumentError
from slipstream._core.events import Feed
from slipstream._core.procs import cpu_count
from slipstream.train._backends import Backend, backend_of
from slipstream.train._callbacks import Callback, Checkpoint
from slipstream.train._distributed import launching_rank
from slipstream.train._fit import FitPlan, History
from slipstream.train._metrics import Metric
from slipstream.train._precision import Precision, PrecisionName
from slipstream.train._strategies import Strategy, resolve_strategy

log = logging.getLogger("slipstream")

OptimizerArg = torch.optim.Optimizer | Callable[[Iterable[torch.nn.Parameter]], Any] | None


class Trainer:
    """Train ``model`` with one loop under any strategy.

    >>> trainer = ss.Trainer(model, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3),
    ...                      loss=F.cross_entropy, metrics={"acc": ss.metrics.accuracy})
    >>> history = trainer.fit(train_pipe, val=val_pipe, epochs=10)

    ``optimizer`` is a factory of the parameters (each training process builds its own) or an
    instance. ``strategy`` is ``"single" | "ddp" | "hogwild" | "localsgd"`` or a strategy object;
    ``workers`` is its number of processes. ``threads`` sets intra-op threads per process
    (default: the cores divided by the processes on this machine). ``accumulate`` batches make
    one update; ``clip_grad_norm`` clips the gradients' global norm; ``scheduler`` is a factory
    of the optimizer, stepped every update (``schedule_every="step"``) or epoch.
    """

    def __init__(
        self,
        model: Any,
        *,
        optimizer: OptimizerArg = None,
        loss: Callable[[Any, Any], torch.Tensor] | None = None,
        metrics: Mapping[str, Metric] | None = None,
        strategy: str | Strategy = "single",
        workers: int | None = None,
        precision: PrecisionName = "fp32",
        compile: bool = False,
        callbacks: Sequence[Callback] = (),
        accumulate: int = 1,
        clip_grad_norm: float | None = None,
        scheduler: Callable[[Any], Any] | None = None,
        schedule_every: Literal["step", "epoch"] = "step",
        device: str | torch.device | None = None,
        threads: int | None = None,
        deterministic: bool = False,
        live: Feed | None = None,
    ) -> None:
        self._args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.backend: Backend = backend_of(model)
        self.model: torch.nn.Module = self.backend.module
        self.module: torch.nn.Module = self.model  # what steps call; strategies may wrap it
        self.strategy = resolve_strategy(strategy, workers)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision_plan = Precision(precision, self.device)
        self.compile = bool(compile)
        loss_fn = loss or self.backend.loss()
        if loss_fn is None:
            raise ArgumentError(
                "`loss=None`: a torch model (or an uncompiled Keras model) needs a loss "
                "function, e.g. loss=torch.nn.functional.cross_entropy"
            )
        self.loss_fn = loss_fn
        self.metric_fns = dict(metrics or {})
        self.keras_metrics = None if metrics is not None else self.backend.metrics()
        self._optimizer = self._check_optimizer(optimizer)
        self.callbacks = list(_check_callbacks(callbacks))
        self.accumulate = positive_int("accumulate", accumulate)
        self.clip_grad_norm = positive_number("clip_grad_norm", clip_grad_norm, allow_none=True)
        self.scheduler_factory = scheduler
        self.schedule_every = one_of("schedule_every", schedule_every, ("step", "epoch"))
        self.threads = None if threads is None else positive_int("threads", threads)
        self.deterministic = bool(deterministic)
        self.live = _check_live(live)

    def replace(self, **changes: Any) -> Trainer:
        """A new trainer with this one's arguments but ``changes`` (``threads=1``,
        ``strategy="hogwild", workers=2``, ``model=copy.deepcopy(trainer.model)``, ...)."""
        unknown = set(changes) - set(self._args)
        if unknown:
            raise ArgumentError(
                f"Trainer.replace: {sorted(unknown)} are not Trainer arguments; it takes "
                f"{', '.join(self._args)}"
            )
        return type(self)(**(self._args | changes))

    def _check_optimizer(self, optimizer: OptimizerArg) -> OptimizerArg:
        if optimizer is None and self.backend.optimizer() is None:
            raise ArgumentError(
                "`optimizer=None`: pass a factory such as "
                "optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3) (or compile the "
                "Keras model with an optimizer)"
            )
        if optimizer is not None and not (
            isinstance(optimizer, torch.optim.Optimizer) or callable(optimizer)
        ):
            raise ArgumentError(
                f"`optimizer` must be a torch optimizer or a factory of the parameters; got "
                f"{type(optimizer).__name__}"
            )
        return optimizer

    # -- what training processes call -----------------------------------------------------

    def make_optimizer(self, params: Iterable[torch.nn.Parameter]) -> Any:
        if self._optimizer is None:
            return self.backend.optimizer()
        if isinstance(self._optimizer, torch.optim.Optimizer):
            return self._optimizer
        return self._optimizer(params)

    def make_scheduler(self, optimizer: Any) -> Any:
        return None if self.scheduler_factory is None else self.scheduler_factory(optimizer)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The precision context of forward passes (a no-op for fp32)."""
        return self.precision_plan.autocast()

    def threads_for(self, processes: int) -> int:
        """Intra-op threads per process: ``threads=``, or the cores shared by ``processes``."""
        return self.threads or max(1, cpu_count() // processes)

    def set_threads(self, processes: int) -> int:
        """Set this process's intra-op threads to :meth:`threads_for` and return them."""
        n = self.threads_for(processes)
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return n

    # -- the user's hooks -------------------------------------------------------------------

    def split(self, batch: Any) -> tuple[Any, Any]:
        """``(inputs, target)`` of a batch: a pair, or a dict with ``"x"`` and ``"y"``."""
        if isinstance(batch, Mapping) and "x" in batch and "y" in batch:
            return batch["x"], batch["y"]
        if isinstance(batch, tuple | list) and len(batch) == 2:
            return batch[0], batch[1]
        kind = f"dict with keys {sorted(batch)}" if isinstance(batch, Mapping) else type(batch)
        raise ArgumentError(
            f"cannot tell inputs from targets in a batch that is a {kind}; batch (x, y) pairs "
            "or dicts with 'x' and 'y', or override Trainer.split(batch)"
        )

    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Forward and loss of one batch: ``{"loss": ..., metric: ...}``.

        Return a loss that requires grad and the loop backpropagates and updates; a custom
        step that updates the weights itself returns detached figures.
        """
        return self.figures(batch)

    @torch.no_grad()
    def eval_step(self, batch: Any) -> dict[str, torch.Tensor]:
        """Loss and metrics of one batch, without gradients."""
        return self.figures(batch)

    def figures(self, batch: Any) -> dict[str, torch.Tensor]:
        """The default step's forward pass: loss and metrics of ``batch``."""
        inputs, target = self.split(batch)
        with self.autocast():
            output = self.module(inputs)
            loss = self.loss_fn(output, target)
        return {"loss": loss, **self.compute_metrics(output, target)}

    @torch.no_grad()
    def compute_metrics(self, output: Any, target: Any) -> dict[str, torch.Tensor]:
        if self.keras_metrics is not None:
            return self.keras_metrics(output, target)
        out = output.detach()
        return {name: fn(out, target) for name, fn in self.metric_fns.items()}

    # -- running ---------------------------------------------------------------------------

    def fit(
        self,
        train: Any,
        *,
        val: Any = None,
        epochs: int | None = None,
        steps: int | None = None,
        resume: str | os.PathLike[str] | None = None,
    ) -> History:
        """Train on ``train`` for ``epochs`` (default 1) or ``steps`` updates.

        ``resume`` is a run directory (or one checkpoint) written by :class:`ss.Checkpoint`:
        the run continues exactly where it stopped, with the same remaining samples. A run
        directory without a checkpoint yet starts from the beginning.
        """
        plan = FitPlan.of(train, val, epochs, steps, resume)
        if self.live is None:
            return self.strategy.launch(self, plan)
        self.live.start(self._live_meta(plan), self.model.state_dict())
        ended = "error"
        try:
            history = self.strategy.launch(self, plan)
            ended = history.stopped_by
            return history
        finally:
            self.live.finish(ended)

    def _live_meta(self, plan: FitPlan) -> dict[str, Any]:
        """What a run's live feed records about it (a server rebuilds the model from it)."""
        cls = type(self.backend.module)
        checkpoints = [str(c.dir) for c in self.callbacks if isinstance(c, Checkpoint)]
        return {
            "model": f"{cls.__module__}:{cls.__qualname__}",
            "strategy": self.strategy.name,
            "workers": self.strategy.workers,
            "epochs": plan.epochs,
            "steps": plan.steps,
            "rank": launching_rank(),
            "checkpoints": checkpoints[0] if checkpoints else None,
        }

    def evaluate(self, pipe: Iterable[Any]) -> dict[str, float]:
        """Loss and metrics over ``pipe``, in this process."""
        from slipstream.train._fit import evaluate

        return evaluate(self, pipe)


def _check_live(live: Any) -> Feed | None:
    needed = ("start", "emit", "publish_due", "publish", "finish")
    if live is not None and not all(callable(getattr(live, m, None)) for m in needed):
        raise ArgumentError(
            f"`live` must be an ss.Live (or an object with {', '.join(needed)}); "
            f"got {type(live).__name__}"
        )
    return cast("Feed | None", live)


def _check_callbacks(callbacks: Sequence[Callback]) -> Sequence[Callback]:
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise ArgumentError(
                f"`callbacks` must hold ss.Callback objects (subclass ss.Callback for your own); "
                f"got {type(cb).__name__}"
            )
    return callbacks
