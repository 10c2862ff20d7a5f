"""Metric functions and the epoch averages the loop keeps.

A metric is a function ``(output, target) -> 0-dim tensor``, averaged over an epoch weighted by
batch size. The averages stay tensors on the model's device until an epoch ends, so logging a
step costs no device synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Share of correct predictions: argmax of class scores, or ``> 0`` for one logit."""
    if output.ndim > target.ndim:
        predicted = output.argmax(dim=-1)
    else:
        predicted = (output > 0).to(target.dtype)
    return (predicted == target).float().mean()


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error."""
    return torch.nn.functional.mse_loss(output.float(), target.float().reshape(output.shape))


def mae(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error."""
    return torch.nn.functional.l1_loss(output.float(), target.float().reshape(output.shape))


class Averages:
    """Batch-size-weighted sums of named 0-dim tensors; ``result()`` syncs once per call."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, torch.Tensor], n: int) -> None:
        for name, value in values.items():
            v = value.detach()
            v = (v if v.dtype == torch.float32 else v.float()) * n
            total = self.sums.get(name)
            self.sums[name] = v if total is None else total + v
        self.count += n

    def packed(self) -> torch.Tensor:
        """Sums and count in one float64 tensor (what ranks all-reduce)."""
        values = [s.to("cpu", torch.float64).reshape(()) for s in self.sums.values()]
        return torch.stack([*values, torch.tensor(float(self.count), dtype=torch.float64)])

    def result(self, packed: torch.Tensor | None = None) -> dict[str, float]:
        """Means by name; from ``packed`` (reduced across processes) when given."""
        return means(list(self.sums), self.packed() if packed is None else packed)


def means(names: list[str], packed: torch.Tensor) -> dict[str, float]:
    """Means by name from packed sums (see :meth:`Averages.packed`)."""
    count = float(packed[-1])
    if count == 0:
        return {}
    return {k: float(v) / count for k, v in zip(names, packed[:-1].tolist(), strict=True)}
