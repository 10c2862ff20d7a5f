"""What the user asked for, validated: one frozen record per stage.

Builders on :class:`~slipstream.data.Pipeline` create these; ``_plan`` turns them into nodes.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from slipstream._core.checks import non_negative_int, one_of, positive_int
from slipstream._core.errors import ArgumentError
from slipstream.data._tree import Collate

Mode = Literal["thread", "process", "async"]
MODES: tuple[Mode, ...] = ("thread", "process", "async")
Errors = Literal["raise", "skip"]
StartMethod = Literal["fork", "forkserver", "spawn"]
START_METHODS: tuple[StartMethod, ...] = ("fork", "forkserver", "spawn")


def fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


@dataclass(frozen=True, slots=True)
class MapSpec:
    fn: Callable[[Any], Any]
    mode: Mode
    workers: int
    window: int
    ordered: bool
    errors: Literal["raise", "skip"]
    max_skipped: float | None
    name: str
    start_method: str | None = None
    threads: int = 1
    shm_bytes: int = 64 << 20
    chunk: int | None = None


@dataclass(frozen=True, slots=True)
class FilterSpec:
    predicate: Callable[[Any], bool]
    name: str


@dataclass(frozen=True, slots=True)
class BatchSpec:
    size: int
    drop_last: bool
    collate: Collate | None


@dataclass(frozen=True, slots=True)
class UnbatchSpec:
    pass


@dataclass(frozen=True, slots=True)
class ShuffleSpec:
    seed: int | None
    window: int | None


@dataclass(frozen=True, slots=True)
class PrefetchSpec:
    size: int


@dataclass(frozen=True, slots=True)
class ToDeviceSpec:
    device: torch.device


Spec = MapSpec | FilterSpec | BatchSpec | UnbatchSpec | ShuffleSpec | PrefetchSpec | ToDeviceSpec


def _callable(name: str, fn: object) -> None:
    if not callable(fn):
        raise ArgumentError(f"`{name}` must be callable; got {type(fn).__name__}")


def _mode(fn: Callable[..., Any], mode: str | None) -> Mode:
    is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callables (objects) count too
    )
    if mode is None:
        return "async" if is_async else "thread"
    checked: Mode = one_of("mode", mode, MODES)  # type: ignore[arg-type]
    if is_async != (checked == "async"):
        want = "mode='async'" if is_async else "mode='thread' or mode='process'"
        raise ArgumentError(
            f"map: {fn_name(fn)} is {'' if is_async else 'not '}an async function; use {want}"
        )
    return checked


def _max_skipped(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ArgumentError(
            f"`max_skipped={value!r}` must be a count (int ≥ 0), a fraction (0 < float < 1) or None"
        )
    if isinstance(value, float) and not 0 < value < 1:
        raise ArgumentError(f"`max_skipped={value!r}`: a float is a fraction and must be in (0, 1)")
    return value


def map_spec(
    fn: Callable[[Any], Any],
    *,
    mode: str | None,
    workers: int | None,
    concurrency: int | None,
    ordered: bool,
    errors: str,
    max_skipped: float | None,
    window: int | None,
    name: str | None,
    start_method: str | None,
    threads: int,
    shm_bytes: int,
    chunk: int | None,
) -> MapSpec:
    """Validate ``map``'s arguments (see :meth:`Pipeline.map`)."""
    _callable("fn", fn)
    m = _mode(fn, mode)
    if m == "async":
        if workers is not None:
            raise ArgumentError(
                "map: mode='async' runs coroutines on one thread; use concurrency=, not workers="
            )
        n = positive_int("concurrency", 64 if concurrency is None else concurrency)
        win = n
    else:
        if concurrency is not None:
            raise ArgumentError(f"map: concurrency= is for mode='async'; mode='{m}' takes workers=")
        n = non_negative_int("workers", (os.cpu_count() or 1) if workers is None else workers)
        if m == "process" and n == 0:
            raise ArgumentError("map: mode='process' needs workers ≥ 1; got workers=0")
        win = _window(m, n)
    return MapSpec(
        fn=fn,
        mode=m,
        workers=n,
        window=win if window is None else positive_int("window", window),
        ordered=bool(ordered),
        errors=one_of("errors", errors, ("raise", "skip")),  # type: ignore[arg-type]
        max_skipped=_max_skipped(max_skipped),
        name=name or f"map({fn_name(fn)})",
        start_method=None
        if start_method is None
        else one_of("start_method", start_method, START_METHODS),
        threads=positive_int("threads", threads),
        shm_bytes=positive_int("shm_bytes", shm_bytes),
        chunk=None if chunk is None else positive_int("chunk", chunk),
    )


def _window(mode: Mode, workers: int) -> int:
    """Samples in flight by default: enough to keep every worker busy (processes get chunks)."""
    return max(1, workers) * (32 if mode == "process" else 4)


def retuned_map(spec: MapSpec, workers: int | None, mode: Mode | None) -> MapSpec:
    """``spec`` with other workers or mode (async stages keep theirs), and the default window
    for them."""
    if spec.mode == "async" or (workers is None and mode is None):
        return spec
    m: Mode = spec.mode if mode is None else one_of("map_mode", mode, ("thread", "process"))
    n = spec.workers if workers is None else positive_int("map_workers", workers)
    return replace(spec, mode=m, workers=n, window=_window(m, n))


def batch_spec(size: int, drop_last: bool, collate: Collate | None) -> BatchSpec:
    if collate is not None:
        _callable("collate", collate)
    return BatchSpec(positive_int("size", size), bool(drop_last), collate)


def shuffle_spec(seed: int | None, window: int | None) -> ShuffleSpec:
    if seed is not None:
        non_negative_int("seed", seed)
    return ShuffleSpec(seed, None if window is None else positive_int("window", window))


def device_spec(device: str | torch.device) -> ToDeviceSpec:
    try:
        return ToDeviceSpec(torch.device(device))
    except (RuntimeError, TypeError) as e:
        raise ArgumentError(
            f"`device={device!r}` is not a torch device (e.g. 'cuda', 'cuda:1', 'cpu')"
        ) from e
