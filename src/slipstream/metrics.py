"""Metric functions for ``Trainer(metrics={...})``: ``(output, target) -> 0-dim tensor``.

>>> trainer = ss.Trainer(model, ..., metrics={"acc": ss.metrics.accuracy})
"""

from slipstream.train._metrics import accuracy, mae, mse

__all__ = ["accuracy", "mae", "mse"]
