"""Per-sample randomness that does not depend on which worker, mode or rank ran the sample."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import numpy as np

from slipstream._core.errors import LifecycleError

_SAMPLE: ContextVar[tuple[int, int, int, int] | None] = ContextVar(
    "slipstream_sample", default=None
)
_MASK = (1 << 63) - 1


def _key() -> tuple[int, int, int, int]:
    key = _SAMPLE.get()
    if key is None:
        raise LifecycleError(
            "ss.sample_rng() and ss.sample_seed() work only inside a function that a pipeline "
            "stage (map, filter) is running"
        )
    return key


def sample_rng() -> np.random.Generator:
    """A generator seeded by ``(seed, epoch, stage, sample index)`` for the sample being mapped.

    The same sample gets the same numbers whatever the worker count, mode or rank layout::

        def augment(x):
            return x + ss.sample_rng().normal(0, 0.1, x.shape)
    """
    return np.random.default_rng(list(_key()))


def sample_seed() -> int:
    """An integer seed for the sample being mapped (for ``torch.Generator().manual_seed``)."""
    return int(np.random.SeedSequence(list(_key())).generate_state(1, np.uint64)[0] & _MASK)


async def acall_with_sample(
    fn: Callable[[Any], Any], value: Any, seed: int, epoch: int, stage: int, key: int
) -> Any:
    """Await ``fn(value)`` with the sample's random key in this task's context."""
    token = _SAMPLE.set((seed & _MASK, epoch, stage, key & _MASK))
    try:
        return await fn(value)
    finally:
        _SAMPLE.reset(token)


def call_with_sample(
    fn: Callable[[Any], Any], value: Any, seed: int, epoch: int, stage: int, key: int
) -> Any:
    """Run ``fn(value)`` with the sample's random key in context."""
    token = _SAMPLE.set((seed & _MASK, epoch, stage, key & _MASK))
    try:
        return fn(value)
    finally:
        _SAMPLE.reset(token)
