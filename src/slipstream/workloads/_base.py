"""What a built-in workload is: a model factory, a data factory, how to score it, its goal."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slipstream._core.config import DataConfig, ModelConfig
from slipstream._core.extras import require
from slipstream.data import Pipeline
from slipstream.train._metrics import Metric


@dataclass(frozen=True)
class Goal:
    """The quality a workload is stated to reach: ``metric`` (a figure of the last epoch, such
    as ``val_acc``) at least (or, with ``higher=False``, at most) ``target``."""

    metric: str
    target: float
    higher: bool = True

    def met(self, value: float) -> bool:
        return value >= self.target if self.higher else value <= self.target

    def __str__(self) -> str:
        return f"{self.metric} {'≥' if self.higher else '≤'} {self.target:g}"


@dataclass(frozen=True)
class Data:
    """A workload's pipelines: training (shuffled, per ``[data]``) and validation."""

    train: Pipeline
    val: Pipeline


@dataclass(frozen=True)
class Workload:
    """A built-in task. ``model`` builds its model from ``[model]``; ``data`` writes its dataset
    under ``[data] root`` the first time (and when its size or format changes) and returns the
    pipelines; ``loss`` and ``metrics`` score a batch; ``goal`` is the stated quality."""

    name: str
    summary: str
    model: Callable[[ModelConfig], Any]
    data: Callable[[DataConfig], Data]
    loss: Callable[[Any, Any], torch.Tensor]
    metrics: Mapping[str, Metric]
    goal: Goal


def dataset_dir(config: DataConfig, name: str, recipe: Mapping[str, Any]) -> tuple[Path, bool]:
    """The directory for workload ``name``'s dataset, and whether it must be (re)written.

    ``recipe`` describes what is in it (sizes, format, seed); a directory holding another
    recipe is emptied, so changing ``size`` never mixes two datasets.
    """
    root = Path(config.root) / name
    stamp = root / "dataset.json"
    wanted = json.dumps(dict(recipe), sort_keys=True)
    if stamp.exists() and stamp.read_text() == wanted:
        return root, False
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    return root, True


def finish_dataset(root: Path, recipe: Mapping[str, Any]) -> None:
    """Mark ``root`` complete (written last: an interrupted write is redone next time)."""
    (root / "dataset.json").write_text(json.dumps(dict(recipe), sort_keys=True))


def write_parquet(path: Path, columns: Mapping[str, Any], row_group: int) -> None:
    """A Parquet file of ``columns`` (arrays, lists, pyarrow arrays), ``row_group`` rows a group."""
    pa = require("pyarrow", feature="the built-in workloads")
    pq = require("pyarrow.parquet", feature="the built-in workloads")
    pq.write_table(pa.table(dict(columns)), path, row_group_size=row_group)


def generated_shards(
    config: DataConfig,
    name: str,
    n: int,
    per: int,
    test: int,
    write: Callable[[Path, int, int], None],
) -> Path:
    """Workload ``name``'s generated dataset under ``[data] root``, written the first time:
    ``n`` training samples in ``train-NNN.parquet`` shards of ``per`` and ``test`` samples in
    ``test.parquet``; ``write(path, count, seed)`` writes one file (seed 0 is the test set's)."""
    recipe = {"size": n, "version": 1}
    root, fresh = dataset_dir(config, name, recipe)
    if fresh:
        for s, start in enumerate(range(0, n, per)):
            write(root / f"train-{s:03d}.parquet", min(per, n - start), 1 + s)
        write(root / "test.parquet", test, 0)
        finish_dataset(root, recipe)
    return root


def feed(
    pipe: Pipeline,
    config: DataConfig,
    fn: Callable[[Any], Any] | None = None,
    **batch: Any,
) -> Pipeline:
    """``pipe`` shuffled, mapped by ``fn``, batched and prefetched as ``[data]`` says."""
    out = pipe.shuffle(seed=config.seed)
    if fn is not None:
        out = out.map(fn, workers=config.map_workers, mode=config.map_mode)
    out = out.batch(config.batch, **batch)
    return out.prefetch(config.prefetch) if config.prefetch else out
