"""Argument validation that names the argument, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Collection
from typing import TypeVar

from slipstream._core.errors import ArgumentError

T = TypeVar("T")


def positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is an int ≥ 1, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ArgumentError(f"`{name}={value!r}` must be a positive int; got {value!r}")
    return value


def non_negative_int(name: str, value: object) -> int:
    """Return ``value`` if it is an int ≥ 0, else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ArgumentError(f"`{name}={value!r}` must be an int ≥ 0; got {value!r}")
    return value


def positive_number(name: str, value: object, *, allow_none: bool = False) -> float | None:
    """Return ``value`` as a float if it is a number > 0 (or ``None`` when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        allowed = "a number > 0" + (" or None" if allow_none else "")
        raise ArgumentError(f"`{name}={value!r}` must be {allowed}; got {value!r}")
    return float(value)


def one_of(name: str, value: T, allowed: Collection[T]) -> T:
    """Return ``value`` if it is one of ``allowed``, else raise listing the choices."""
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ArgumentError(f"`{name}={value!r}` is not allowed; choose one of {choices}")
    return value
