"""Backends: what the loop needs from a model, for torch modules and compiled Keras 3 models.

A Keras 3 model on the torch backend is a ``torch.nn.Module`` whose weights are torch
parameters, so every strategy handles both alike; the backend only supplies the defaults a
compiled Keras model carries (its loss, metrics and optimizer).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch

from slipstream._core.errors import ArgumentError

LossFn = Callable[[Any, Any], torch.Tensor]
MetricFn = Callable[[Any, Any], dict[str, torch.Tensor]]


class Backend(Protocol):
    """Defaults a model brings with it; ``None`` where it brings none."""

    module: torch.nn.Module

    def loss(self) -> LossFn | None: ...

    def metrics(self) -> MetricFn | None: ...

    def optimizer(self) -> Any | None: ...


class TorchBackend:
    """A plain ``torch.nn.Module``: it brings no loss, metrics or optimizer."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def loss(self) -> LossFn | None:
        return None

    def metrics(self) -> MetricFn | None:
        return None

    def optimizer(self) -> Any | None:
        return None


class KerasBackend:
    """A Keras 3 model on the torch backend, compiled or not."""

    def __init__(self, model: Any) -> None:
        self.module = model
        self.compiled = bool(getattr(model, "compiled", False))

    def loss(self) -> LossFn | None:
        if not self.compiled or getattr(self.module, "loss", None) is None:
            return None
        model = self.module
        return lambda out, target: model.compute_loss(y=target, y_pred=out)

    def metrics(self) -> MetricFn | None:
        if not self.compiled:
            return None
        model = self.module

        def compiled_metrics(out: Any, target: Any) -> dict[str, torch.Tensor]:
            model.reset_metrics()  # the batch's own values; the loop averages over the epoch
            values = model.compute_metrics(None, target, out, sample_weight=None)
            return {k: torch.as_tensor(v) for k, v in values.items() if k != "loss"}

        return compiled_metrics

    def optimizer(self) -> Any | None:
        opt = getattr(self.module, "optimizer", None) if self.compiled else None
        return None if opt is None else KerasOptimizer(self.module)


class KerasOptimizer:
    """A compiled Keras optimizer behind the calls the loop makes on a torch optimizer."""

    def __init__(self, model: Any) -> None:
        self.opt = model.optimizer
        self.variables = list(model.trainable_variables)
        self.param_groups = [{"params": [v.value for v in self.variables]}]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for v in self.variables:
            v.value.grad = None

    def step(self) -> None:
        grads = [v.value.grad for v in self.variables]
        self.opt.apply(grads, self.variables)

    def state_dict(self) -> dict[str, Any]:
        return {"variables": [v.value.detach().clone() for v in self.opt.variables]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not self.opt.built:
            self.opt.build(self.variables)
        for var, value in zip(self.opt.variables, state["variables"], strict=True):
            var.assign(value)


def is_keras(model: object) -> bool:
    return any(c.__module__.startswith("keras") for c in type(model).__mro__)


def backend_of(model: object) -> Backend:
    """The backend for ``model``; a clear error for what no strategy can train."""
    if is_keras(model):
        backend = os.environ.get("KERAS_BACKEND") or _keras_backend()
        if backend != "torch" or not isinstance(model, torch.nn.Module):
            raise ArgumentError(
                f"a Keras model on the {backend!r} backend cannot be trained by slipstream's "
                "strategies, which run torch; set KERAS_BACKEND=torch before importing keras "
                "(or feed Keras's own model.fit with pipe.as_keras())"
            )
        return KerasBackend(model)
    if isinstance(model, torch.nn.Module):
        return TorchBackend(model)
    raise ArgumentError(
        f"`model` must be a torch.nn.Module or a Keras 3 model; got {type(model).__name__}"
    )


def _keras_backend() -> str:
    import keras

    return str(keras.backend.backend())


def parameters(module: torch.nn.Module) -> Iterator[torch.nn.Parameter]:
    return (p for p in module.parameters() if p.requires_grad)
