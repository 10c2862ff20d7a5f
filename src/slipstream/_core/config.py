"""Run configs: TOML files whose sections map one to one onto typed component configs.

A config has a top-level ``run`` (the run directory) and four sections, ``[data]``, ``[model]``,
``[train]`` and ``[live]``, each a frozen dataclass below. :func:`load` reads a file, applies
``--set section.key=value`` overrides and checks every key and value before any work starts:
an unknown key, a wrong type or a value out of range is a :class:`ConfigError` that names the
key, the value and what is allowed. Combinations that cannot work (``workers=2`` with
``strategy="single"``) are checked by :func:`check_combinations`.

:func:`dumps` writes a config back as TOML (for the resolved config saved in a run directory
and the advisor's tuned config); the schema is flat scalars plus one ``args`` table per section,
so the writer is a few lines rather than a dependency.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from slipstream._core.errors import ArgumentError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(ArgumentError):
    """A config file or override has a key or value that is not allowed."""


def _min(low: float, *, above: bool = False) -> dict[str, Any]:
    return {"min": low, "above": above}


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: where samples come from and how the pipeline feeds them."""

    name: str | None = None  # a built-in workload or "package.module:factory"; default: the model's
    root: str = "data"  # where the workload writes its dataset (and finds it next time)
    size: int | None = field(default=None, metadata=_min(1))  # samples; None: the workload's
    format: str | None = None  # how the workload stores it on disk, when it offers a choice
    batch: int = field(default=64, metadata=_min(1))
    seed: int = 0  # shuffle and augmentation
    map_workers: int = field(default=2, metadata=_min(1))
    map_mode: Literal["thread", "process"] = "thread"
    prefetch: int = field(default=4, metadata=_min(0))
    args: dict[str, Any] = field(default_factory=dict)  # more arguments for the data factory


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: a built-in workload's model or ``package.module:factory`` (with ``args``)."""

    name: str = ""
    backend: Literal["torch", "keras"] = "torch"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """``[train]``: the loop, its strategy and accelerations."""

    epochs: int | None = field(default=None, metadata=_min(1))  # default 1 when steps is unset
    steps: int | None = field(default=None, metadata=_min(1))  # with epochs: whichever first
    strategy: Literal["single", "ddp", "hogwild", "localsgd"] = "single"
    workers: int | None = field(default=None, metadata=_min(1))
    threads: int | None = field(default=None, metadata=_min(1))  # per process; None: cores/workers
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    channels_last: bool = False
    loss: Literal["auto", "cross_entropy", "mse"] = "auto"  # auto: the workload's
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = field(default=1e-3, metadata=_min(0, above=True))
    weight_decay: float = field(default=0.0, metadata=_min(0))
    momentum: float = field(default=0.9, metadata=_min(0))
    sync_every: int | None = field(default=None, metadata=_min(1))  # localsgd only
    seed: int = 0  # model initialisation
    device: str | None = None  # None: cuda when there is one
    deterministic: bool = False
    checkpoint_every: int | None = field(default=None, metadata=_min(1))  # steps
    keep: int = field(default=3, metadata=_min(1))
    patience: int | None = field(default=None, metadata=_min(1))  # epochs without val_loss gain
    minutes: float | None = field(default=None, metadata=_min(0, above=True))  # wall-clock budget


@dataclass(frozen=True)
class LiveConfig:
    """``[live]``: figures while training runs, and weights published for serving."""

    console: bool | None = None  # None: when stderr is a terminal
    jsonl: bool = True
    tensorboard: bool = False
    dashboard: bool = False
    host: str = "127.0.0.1"
    port: int = field(default=0, metadata=_min(0))
    token: str | None = None
    record_every: int = field(default=10, metadata=_min(1))
    publish_every_steps: int | None = field(default=None, metadata=_min(1))
    publish_every_seconds: float | None = field(default=None, metadata=_min(0, above=True))


@dataclass(frozen=True)
class Config:
    """A whole run: ``run`` (its directory) and the four sections."""

    run: str = ""  # default: runs/<model name>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    live: LiveConfig = field(default_factory=LiveConfig)

    def replace(self, section: str, **changes: Any) -> Config:
        """A copy with ``changes`` made to ``section`` (checked like a file's values)."""
        table = dataclasses.asdict(getattr(self, section)) | changes
        return dataclasses.replace(self, **{section: _section(section, table)})


SECTIONS = ("data", "model", "train", "live")


def load(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read the TOML config at ``path``, apply ``overrides`` (``"train.epochs=3"``), check it."""
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no config file at {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    for item in overrides:
        _override(table, item)
    return parse(table, where=str(path))


def parse(table: Mapping[str, Any], where: str = "the config") -> Config:
    """A :class:`Config` from a TOML table, every key and value checked."""
    allowed = ("run", *SECTIONS)
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key '{key}'{_suggest(key, allowed)}")
        if key in SECTIONS and not isinstance(value, Mapping):
            raise ConfigError(f"{where}: '{key}' must be a [{key}] section; got {value!r}")
    run = table.get("run", "")
    if not isinstance(run, str):
        raise ConfigError(f"{where}: 'run' must be a directory (a string); got {run!r}")
    sections = {name: _section(name, table.get(name, {}), where) for name in SECTIONS}
    return Config(run=run, **sections)


def _section(name: str, table: Mapping[str, Any], where: str = "the config") -> Any:
    cls = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "live": LiveConfig}[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(
                f"{where}: unknown key '{name}.{key}'{_suggest(key, fields)}; "
                f"[{name}] takes {', '.join(fields)}"
            )
        values[key] = _check(f"{name}.{key}", value, hints[key], fields[key].metadata, where)
    return cls(**values)


def _check(key: str, value: Any, hint: Any, meta: Mapping[str, Any], where: str) -> Any:
    """``value`` if it fits ``hint`` (and ``meta``'s bound), else a ConfigError naming all."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is type(None):
            continue
        if typing.get_origin(option) is Literal:
            if value in typing.get_args(option):
                return value
            choices = ", ".join(repr(c) for c in typing.get_args(option))
            raise ConfigError(f"{where}: {key} = {value!r} is not allowed; choose one of {choices}")
        if _fits(value, option):
            _bounded(key, value, meta, where)
            return float(value) if option is float else value
    wanted = " or ".join(_type_name(o) for o in options)
    raise ConfigError(f"{where}: {key} = {value!r} must be {wanted}; got {type(value).__name__}")


def _fits(value: Any, option: Any) -> bool:
    if option is bool:
        return isinstance(value, bool)
    if option is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if option is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok and math.isfinite(value)
    if option is str:
        return isinstance(value, str)
    return typing.get_origin(option) is dict and isinstance(value, Mapping)


def _bounded(key: str, value: Any, meta: Mapping[str, Any], where: str) -> None:
    low = meta.get("min")
    if low is None or not isinstance(value, int | float) or isinstance(value, bool):
        return
    if value < low or (meta["above"] and value == low):
        bound = f"> {low}" if meta["above"] else f"≥ {low}"
        raise ConfigError(f"{where}: {key} = {value!r} must be {bound}")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _type_name(option: Any) -> str:
    if option is type(None):
        return "unset (leave the key out)"
    if typing.get_origin(option) is dict:
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[option]


def _suggest(key: str, allowed: Any) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _override(table: dict[str, Any], item: str) -> None:
    """Apply ``section.key=value`` to ``table``; the value is read as TOML, else as a string."""
    dotted, sep, text = item.partition("=")
    parts = dotted.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(
            f"--set {item!r}: write section.key=value, e.g. --set train.epochs=3 (or run=DIR)"
        )
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: a string
    node = table
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def dumps(config: Config) -> str:
    """``config`` as TOML that :func:`load` reads back to an equal config (unset keys left out)."""
    lines = [f"run = {_value(config.run)}"]
    for name in SECTIONS:
        section = dataclasses.asdict(getattr(config, name))
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {_value(v)}" for k, v in section.items() if v is not None and k != "args"]
        if section.get("args"):
            lines.append(f"args = {_value(section['args'])}")
    return "\n".join(lines) + "\n"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else "nan"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string is a JSON string
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {v!r} ({type(v).__name__}) to a config")
