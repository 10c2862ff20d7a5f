"""Configs: every key and value checked before any work, with messages that say how to fix."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from slipstream._core.config import Config, ConfigError, dumps, load, parse
from slipstream.workloads import WORKLOADS
from slipstream.workloads._build import CONFIGS, load_config, resolve

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("runn = 'x'", r"c.toml: unknown key 'runn' \(did you mean 'run'\?\)"),
        ("[train]\nepoch = 3", r"'train.epoch' \(did you mean 'epochs'\?\); \[train\] takes"),
        ("[train]\nepochs = '3'", r"train.epochs = '3' must be an integer or unset .*; got str"),
        ("[train]\nepochs = 2.5", r"train.epochs = 2.5 must be an integer"),
        ("[train]\ncompile = 1", r"train.compile = 1 must be true or false; got int"),
        (
            "[train]\nstrategy = 'async'",
            r"train.strategy = 'async' is not allowed; "
            r"choose one of 'single', 'ddp', 'hogwild', 'localsgd'",
        ),
        ("[data]\nbatch = 0", r"data.batch = 0 must be ≥ 1"),
        ("[train]\nlr = 0", r"train.lr = 0 must be > 0"),
        ("[train]\nlr = nan", r"train.lr = nan must be a number"),
        ("data = 3", r"'data' must be a \[data\] section; got 3"),
        ("[model]\nargs = 3", r"model.args = 3 must be a table"),
        ("[train\nepochs = 3", r"is not valid TOML"),
    ],
)  # fmt: skip
def test_a_bad_key_or_value_is_named_with_what_is_allowed(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, text))


def test_overrides_are_read_as_toml_and_checked_like_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[model]\nname = 'digits-cnn'\n[train]\nepochs = 3")
    c = load(path, ["train.epochs=5", "train.lr=1e-2", "model.args={width = 8}", "run=out/x"])
    assert (c.train.epochs, c.train.lr, c.model.args, c.run) == (5, 0.01, {"width": 8}, "out/x")
    assert load(path, ["train.strategy=hogwild"]).train.strategy == "hogwild"  # a bare word
    with pytest.raises(ConfigError, match="must be an integer"):
        load(path, ["train.epochs=many"])
    with pytest.raises(ConfigError, match=r"write section\.key=value"):
        load(path, ["train.epochs"])
    with pytest.raises(ConfigError, match=r"unknown key 'train\.epocs'"):
        load(path, ["train.epocs=3"])
    with pytest.raises(ConfigError, match="no config file"):
        load(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": {}}, r"\[model\] name is missing: set it to a built-in workload"),
        ({"model": {"name": "resnet"}}, r"'resnet' is neither a built-in workload .* nor package"),
        ({"train": {"workers": 2}}, r"train.workers = 2 with train.strategy = 'single'"),
        (
            {
                "model": {"name": "sequence-lstm", "backend": "keras"},
                "train": {"channels_last": True},
            },
            "channels_last = true is for PyTorch models",
        ),
        ({"train": {"precision": "fp16"}}, "'fp16' needs a CUDA device"),
        ({"train": {"device": "cuda:0"}}, "this machine has no CUDA device"),
        ({"train": {"sync_every": 4}}, "is for strategy 'localsgd'"),
        ({"live": {"host": "0.0.0.0"}}, "set live.token too"),
        ({"model": {"name": "digits-cnn", "backend": "keras"}}, "digits-cnn is a PyTorch model"),
        ({"model": {"name": "pkg.mod:net"}, "data": {"name": "pkg.mod:data"}}, "set train.loss"),
    ],
)  # fmt: skip
def test_combinations_that_cannot_work_are_refused_before_any_work(
    changes: dict[str, dict[str, object]], message: str
) -> None:
    table: dict[str, object] = {"model": {"name": "digits-cnn"}} | changes
    with pytest.raises(ConfigError, match=message):
        resolve(parse(table), cuda=False)


def test_defaults_are_filled_in() -> None:
    c = resolve(parse({"model": {"name": "mlp-784"}}), cuda=False)
    assert (c.run, c.data.name, c.train.epochs) == ("runs/mlp-784", "mlp-784", 1)
    assert (
        resolve(parse({"model": {"name": "mlp-784"}, "train": {"steps": 9}})).train.epochs is None
    )
    assert (
        resolve(parse({"model": {"name": "x.y:z"}, "data": {"name": "mlp-784"}})).run
        == "runs/x.y-z"
    )


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_every_workload_has_a_config_that_resolves_and_round_trips(name: str) -> None:
    config = resolve(load_config(name), cuda=False)
    assert config.model.name == name and (CONFIGS / f"{name}.toml").exists()
    assert parse(tomllib.loads(dumps(config))) == config


def test_dumps_writes_strings_tables_and_floats_back_exactly() -> None:
    config = Config(run='runs/"quoted" é')
    config = config.replace("model", name="a.b:c", args={"width": 8, "names": ["x", "y"]})
    config = config.replace("train", lr=1e-7, minutes=0.5)
    assert parse(tomllib.loads(dumps(config))) == config
    with pytest.raises(ConfigError, match=r"train\.lr"):
        config.replace("train", lr=-1.0)
    assert dataclasses.asdict(config)["model"]["args"]["names"] == ["x", "y"]


def test_an_unknown_config_name_says_what_exists() -> None:
    with pytest.raises(ConfigError, match="not a built-in workload"):
        load_config("digits")
