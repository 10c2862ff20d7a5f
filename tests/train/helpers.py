"""Small models and the digits data the trainer tests share."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

import slipstream as ss


def _first_use() -> None:
    """Third-party first uses that set environment variables once per process (scikit-learn's
    import sets KMP_*, torch's first optimizer step TORCHINDUCTOR_CACHE_DIR): done at import,
    so the leak check of the first test does not see them."""
    import sklearn.datasets  # noqa: F401

    layer = torch.nn.Linear(1, 1)
    torch.optim.SGD(layer.parameters(), lr=0.1).step()


_first_use()


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16).astype(np.float32).reshape(-1, 1, 8, 8), d.target.astype(np.int64)


def pipes(batch: int = 32, seed: int = 0, n: int = 1500) -> tuple[ss.Pipeline, ss.Pipeline]:
    x, y = digits()
    train = ss.from_arrays((x[:n], y[:n])).shuffle(seed=seed).batch(batch)
    test = ss.from_arrays((x[1500:], y[1500:])).batch(256)
    return train, test


def cnn(seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        *([torch.nn.Dropout(dropout)] if dropout else []),
        torch.nn.Linear(16 * 64, 10),
    )


class SeedPerRank(ss.Callback):
    """Ranks draw different random numbers (dropout masks), as a script seeding by rank does."""

    def on_fit_start(self, fit: Any) -> None:
        if fit.step == 0:  # a fresh run; a resumed one restores its generators
            torch.manual_seed(100 + fit.strategy.rank)


def trainer(model: torch.nn.Module | None = None, **kw: Any) -> ss.Trainer:
    kw.setdefault("optimizer", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    kw.setdefault("loss", torch.nn.functional.cross_entropy)
    kw.setdefault("metrics", {"acc": ss.metrics.accuracy})
    return ss.Trainer(cnn() if model is None else model, **kw)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
