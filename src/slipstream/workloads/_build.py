"""From a checked :class:`Config` to a model, pipelines and a trainer, and a training run.

``resolve`` fills what a config leaves to defaults and refuses combinations that cannot work,
before anything is built; ``build`` makes the parts; ``train`` runs ``slipstream train``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import ipaddress
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slipstream._core.config import Config, ConfigError, dumps, load
from slipstream._core.errors import MissingExtraError
from slipstream._core.extras import require
from slipstream.live import Live
from slipstream.train import Checkpoint, EarlyStopping, History, Timeout, Trainer
from slipstream.train._checkpoint import claim
from slipstream.train._metrics import Metric, accuracy, mae
from slipstream.tune import TuneResult, tune
from slipstream.tune._measure import channels_last
from slipstream.tune._report import plot_png, write_records
from slipstream.workloads import WORKLOADS
from slipstream.workloads._base import Data, Goal, Workload

KERAS_MODELS = ("sequence-lstm",)  # the built-in models that have a Keras 3 version


CONFIGS = Path(__file__).parent / "configs"


def load_config(where: str, overrides: Iterable[str] = ()) -> Config:
    """The config at path ``where``, or the built-in workload ``where``'s, with ``overrides``."""
    path = Path(where)
    if not path.exists() and where in WORKLOADS:
        path = CONFIGS / f"{where}.toml"
    elif not path.exists():
        raise ConfigError(
            f"{where}: no such config file, and not a built-in workload ({', '.join(WORKLOADS)})"
        )
    return load(path, list(overrides))


def resolve(config: Config, *, cuda: bool | None = None) -> Config:
    """``config`` with its defaults filled in; a ConfigError for what cannot work together."""
    m, d, t, live = config.model, config.data, config.train, config.live
    if not m.name:
        raise ConfigError(
            f"[model] name is missing: set it to a built-in workload ({', '.join(WORKLOADS)}) "
            "or to package.module:factory"
        )
    _known("model.name", m.name)
    data_name = d.name or m.name
    _known("data.name", data_name)
    if data_name not in WORKLOADS and t.loss == "auto":
        raise ConfigError(
            f"train.loss = 'auto' takes the loss of the data's workload; with your own data "
            f"({data_name}) set train.loss to 'cross_entropy' or 'mse'"
        )
    if m.backend == "keras":
        if m.name in WORKLOADS and m.name not in KERAS_MODELS:
            raise ConfigError(
                f"model.backend = 'keras': {m.name} is a PyTorch model; the built-in Keras "
                f"models are {', '.join(KERAS_MODELS)} (or give package.module:factory)"
            )
        if t.channels_last:
            raise ConfigError("train.channels_last = true is for PyTorch models, not Keras ones")
        # slipstream trains Keras models on the torch backend: the default, unless the user
        # chose one before (then the trainer says why it cannot train on it)
        os.environ.setdefault("KERAS_BACKEND", "torch")
        require("keras", feature="model.backend = 'keras'")
    _check_train(config, torch.cuda.is_available() if cuda is None else cuda)
    if live.host not in ("127.0.0.1", "localhost", "::1") and not live.token:
        _check_host(live.host)
    epochs = 1 if t.epochs is None and t.steps is None else t.epochs
    return dataclasses.replace(
        config,
        run=config.run or f"runs/{m.name.replace(':', '-')}",
        data=dataclasses.replace(d, name=data_name),
        train=dataclasses.replace(t, epochs=epochs),
    )


def _known(key: str, name: str) -> None:
    if name not in WORKLOADS and ":" not in name:
        raise ConfigError(
            f"{key} = {name!r} is neither a built-in workload ({', '.join(WORKLOADS)}) nor "
            "package.module:factory"
        )


def _check_train(config: Config, cuda: bool) -> None:
    t = config.train
    if t.strategy == "single" and (t.workers or 1) > 1:
        raise ConfigError(
            f"train.workers = {t.workers} with train.strategy = 'single': one process; choose "
            "'ddp', 'hogwild' or 'localsgd' for more"
        )
    if t.sync_every is not None and t.strategy != "localsgd":
        raise ConfigError(
            f"train.sync_every = {t.sync_every} is for strategy 'localsgd'; got {t.strategy!r}"
        )
    on_gpu = (t.device or ("cuda" if cuda else "cpu")).startswith("cuda")
    if t.precision == "fp16" and not on_gpu:
        raise ConfigError(
            "train.precision = 'fp16' needs a CUDA device (its gradient scaler); use 'bf16' on CPU"
        )
    if t.device is not None and t.device.startswith("cuda") and not cuda:
        raise ConfigError(f"train.device = {t.device!r}, but this machine has no CUDA device")


def _check_host(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError(
            f"live.host = {host!r} serves the dashboard beyond this machine: set live.token "
            "too (every request must then carry it)"
        )


def _factory(name: str) -> Callable[..., Any]:
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{name!r}: cannot import {attr} from {module} ({e})") from e
    if not callable(fn):
        raise ConfigError(f"{name!r} is not callable")
    return fn  # type: ignore[no-any-return]


@dataclass
class Parts:
    """What a config builds: the model, its pipelines, and the task's scoring."""

    config: Config
    model: Any
    data: Data
    loss: Callable[[Any, Any], torch.Tensor] | None  # None: a compiled Keras model's own
    metrics: dict[str, Metric] | None
    goal: Goal | None

    def close(self) -> None:
        """Stop the pipelines' threads and processes and close their files."""
        self.data.train.close()
        self.data.val.close()

    def trainer(self, live: Live | None = None, *, callbacks: bool = True) -> Trainer:
        t = self.config.train
        return Trainer(
            self.model,
            optimizer=optimizer_factory(self.config),  # for Keras models too: [train] says
            loss=self.loss,
            metrics=self.metrics,
            strategy=t.strategy,
            workers=t.workers,
            precision=t.precision,
            compile=t.compile,
            callbacks=run_callbacks(self.config) if callbacks else (),
            device=t.device,
            threads=t.threads,
            deterministic=t.deterministic,
            live=live,
        )


def build(config: Config) -> Parts:
    """The model (seeded by ``train.seed``), the pipelines and the scoring of ``config``."""
    m, d, t = config.model, config.data, config.train
    task: Workload | None = WORKLOADS.get(d.name or "")
    data = task.data(d) if task else _factory(d.name or "")(d)
    if not isinstance(data, Data):
        raise ConfigError(
            f"data.name = {d.name!r} returned {type(data).__name__}; a data factory returns "
            "slipstream.workloads.Data(train, val)"
        )
    torch.manual_seed(t.seed)
    workload = WORKLOADS.get(m.name)
    model = workload.model(m) if workload else _factory(m.name)(**m.args)
    if t.channels_last:
        model = channels_last(model)
    keras = m.backend == "keras"
    loss, metrics = _scoring(config, task, keras)
    return Parts(config, model, data, loss, metrics, task.goal if task else None)


def _scoring(
    config: Config, task: Workload | None, keras: bool
) -> tuple[Callable[[Any, Any], torch.Tensor] | None, dict[str, Metric] | None]:
    if keras:
        return None, None  # the compiled model's loss, metrics and optimizer
    name = config.train.loss
    if name == "auto" and task is not None:  # resolve() saw to it that there is one
        return task.loss, dict(task.metrics)
    if name == "mse":
        return torch.nn.functional.mse_loss, {"mae": mae}
    return torch.nn.functional.cross_entropy, {"acc": accuracy}


def make_optimizer(
    name: str, lr: float, weight_decay: float, momentum: float, params: Iterable[Any]
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=weight_decay)


def optimizer_factory(config: Config) -> Callable[[Iterable[Any]], torch.optim.Optimizer]:
    """A picklable factory of the parameters (spawned ranks build their own optimizer)."""
    t = config.train
    return functools.partial(make_optimizer, t.optimizer, t.lr, t.weight_decay, t.momentum)


def run_callbacks(config: Config) -> list[Any]:
    t = config.train
    callbacks: list[Any] = []
    if t.patience is not None:
        callbacks.append(EarlyStopping("val_loss", patience=t.patience))
    if t.minutes is not None:
        callbacks.append(Timeout(minutes=t.minutes))
    if t.checkpoint_every is not None:
        callbacks.append(
            Checkpoint(checkpoints_of(config), every_steps=t.checkpoint_every, keep=t.keep)
        )
    return callbacks


def checkpoints_of(config: Config) -> Path:
    return Path(config.run) / "checkpoints"


def live_of(config: Config) -> Live:
    c = config.live
    return Live(
        config.run,
        console=c.console,
        jsonl=c.jsonl,
        tensorboard=c.tensorboard,
        dashboard=c.dashboard,
        host=c.host,
        port=c.port,
        token=c.token,
        publish_every_steps=c.publish_every_steps,
        publish_every_seconds=c.publish_every_seconds,
        record_every=c.record_every,
    )


@dataclass
class Outcome:
    """What ``slipstream train`` reports: the history, the final figures, the goal."""

    config: Config
    history: History
    seconds: float
    goal: Goal | None

    @property
    def final(self) -> dict[str, float]:
        return dict(self.history.epochs[-1]) if self.history.epochs else {}

    @property
    def goal_met(self) -> bool | None:
        if self.goal is None or self.goal.metric not in self.final:
            return None
        return self.goal.met(float(self.final[self.goal.metric]))


def train(config: Config, *, resume: bool = False, say: Callable[[str], None] = print) -> Outcome:
    """``slipstream train``: resolve, save the resolved config in the run directory, train.

    ``resume`` continues from the run directory's latest checkpoint, when there is one; without
    it a run directory holding checkpoints is refused before anything in it changes."""
    config = resolve(config)
    run = Path(config.run)
    if not resume:
        claim(checkpoints_of(config), None)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.toml").write_text(dumps(config))
    parts = build(config)
    trainer = parts.trainer(live_of(config))
    say(
        f"training {config.model.name} on {config.data.name}: strategy {config.train.strategy}, "
        f"{trainer.strategy.workers} process(es), run directory {run}"
    )
    t0 = time.perf_counter()
    try:
        history = trainer.fit(
            parts.data.train,
            val=parts.data.val,
            epochs=config.train.epochs,
            steps=config.train.steps,
            resume=checkpoints_of(config) if resume else None,
        )
    finally:
        parts.close()
    return Outcome(config, history, time.perf_counter() - t0, parts.goal)


def tuned_config(config: Config, result: TuneResult) -> Config:
    """``config`` with the advisor's chosen changes applied (the rest left as written)."""
    train: dict[str, Any] = {}
    data: dict[str, Any] = {}
    for key, value in result.changes().items():
        if key == "strategy":
            train["strategy"], workers = value
            train["workers"] = None if value[0] == "single" else workers
        elif key in ("threads", "precision", "compile", "channels_last"):
            train[key] = value
        elif key in ("batch", "map_workers", "map_mode", "prefetch"):
            data[key] = value
    return config.replace("train", **train).replace("data", **data)


@dataclass
class Tuned:
    """What ``slipstream tune`` produced."""

    result: TuneResult
    config: Config
    path: Path
    plot: Path | None
    records: Path


def tune_config(
    config: Config,
    out: Path,
    budget: str | float,
    *,
    cache: bool = True,
    say: Callable[[str], None] = print,
) -> Tuned:
    """``slipstream tune``: measure ``config``'s model and data, write the tuned config."""
    config = resolve(config)
    parts = build(config)
    subject = dataclasses.replace(config, run="", live=type(config.live)())
    try:
        result = tune(
            parts.trainer(callbacks=False), parts.data.train, budget, cache=cache,
            key=dumps(subject), say=say,
        )  # fmt: skip
    finally:
        parts.close()
    tuned = tuned_config(config, result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(tuned))
    try:
        plot: Path | None = plot_png(result, out.with_suffix(".png"))
    except MissingExtraError:
        plot = None
    records = write_records(result, Path(config.run) / "tune")
    return Tuned(result, tuned, out, plot, records)
