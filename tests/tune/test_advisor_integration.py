"""``ss.tune`` and ``slipstream tune`` on real models and pipelines (short budgets)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import slipstream as ss
from tests.train.helpers import same_weights

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SLIPSTREAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def slow(sample: Any) -> Any:
    time.sleep(0.002)  # an input pipeline that waits (as on remote reads): threads help
    return sample


def data(n: int, features: int) -> ss.Pipeline:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = rng.integers(0, 10, n)
    return ss.from_arrays((x, y)).shuffle(seed=0)


def trainer(model: torch.nn.Module) -> ss.Trainer:
    return ss.Trainer(
        model,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
        loss=torch.nn.functional.cross_entropy,
    )


def test_a_slow_map_is_named_input_bound_and_more_workers_are_chosen() -> None:
    pipe = data(4000, 16).map(slow, workers=1).batch(32)
    t = trainer(torch.nn.Linear(16, 10))
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    result = ss.tune(t, pipe, budget="25s", say=lambda _: None)
    assert result.probes.bottleneck == "input", result.table()
    assert result.best.setting["map_workers"] > 1 and result.speedup > 1.5, result.table()
    assert result.seconds < 25 + 10  # the budget, and at most the trial it allowed to finish
    # trials trained copies: the user's model is as it was
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert pipe.knobs()["map_workers"] == 1


def test_a_large_model_on_fast_data_is_named_compute_bound_and_cached(cache: Path) -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(), torch.nn.Linear(1024, 10),
    )  # fmt: skip
    pipe = data(4000, 256).batch(64)
    t = trainer(model)
    result = ss.tune(t, pipe, budget="20s", say=lambda _: None)
    assert result.probes.bottleneck == "compute", result.table()
    assert result.best.rate >= result.start.rate and not result.cached, result.table()
    assert "← chosen" in result.table() and "bottleneck: compute" in result.table()
    t0 = time.perf_counter()
    again = ss.tune(t, pipe, budget="20s", say=lambda _: None)
    took = time.perf_counter() - t0
    assert again.cached and took < 2, f"cached: {again.cached}, {took:.2f} s"
    assert again.best.setting == result.best.setting, (again.table(), result.table())
    assert len(list(cache.rglob("*.json"))) == 1, list(cache.rglob("*.json"))
    other = ss.tune(t, pipe.tuned(batch=32), budget="20s", say=lambda _: None)  # another subject
    assert not other.cached


@pytest.mark.integration
def test_slipstream_tune_writes_a_config_that_train_takes(tmp_path: Path) -> None:
    env_cache = {"SLIPSTREAM_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "digits.tuned.toml"
    common = ["--set", f"run={tmp_path / 'run'}", "--set", "live.console=false"]
    cmd = [sys.executable, "-m", "slipstream.cli", "tune", "digits-cnn", "--budget", "25s"]
    done = subprocess.run(
        [*cmd, "--out", str(out), *common], capture_output=True, text=True, timeout=300,
        cwd=tmp_path, env={**__import__("os").environ, **env_cache},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "bottleneck:" in done.stdout and "← chosen" in done.stdout, done.stdout
    assert out.exists() and out.with_suffix(".png").exists()
    assert (tmp_path / "run" / "tune" / "events.jsonl").exists()
    train = [sys.executable, "-m", "slipstream.cli", "train", str(out), "--set", "train.epochs=1"]
    trained = subprocess.run(
        [*train, "--set", "live.console=false"], capture_output=True, text=True, timeout=300,
        cwd=tmp_path,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr


def test_pipeline_knobs_read_and_change() -> None:
    pipe = data(100, 4).map(slow, workers=1).batch(8).prefetch(2)
    assert pipe.knobs() == {"batch": 8, "map_workers": 1, "map_mode": "thread", "prefetch": 2}
    tuned = pipe.tuned(batch=16, map_workers=3, map_mode="process", prefetch=0)
    assert tuned.knobs() == {"batch": 16, "map_workers": 3, "map_mode": "process", "prefetch": 0}
    assert [len(b[1]) for b in tuned.tuned(map_mode="thread")][:2] == [16, 16]
    assert data(10, 4).batch(4).tuned(prefetch=3).knobs()["prefetch"] == 3
    with pytest.raises(ss.ArgumentError, match="map_mode"):
        pipe.tuned(map_mode="async")  # type: ignore[arg-type]


def test_trainer_replace_changes_only_what_it_is_given() -> None:
    t = trainer(torch.nn.Linear(2, 2))
    u = t.replace(threads=1, strategy="hogwild", workers=2)
    assert (u.threads, u.strategy.name, u.strategy.workers) == (1, "hogwild", 2)
    assert u.model is t.model and u.loss_fn is t.loss_fn and t.threads is None
    assert same_weights(u.model, t.model)
    with pytest.raises(ss.ArgumentError, match="not Trainer arguments"):
        t.replace(thread=1)
