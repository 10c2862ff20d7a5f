"""Each CLI subcommand end to end, in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def slipstream(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "slipstream.cli", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_demo_quick_tunes_trains_live_serves_and_reports(tmp_path: Path) -> None:
    env = {**os.environ, "SLIPSTREAM_CACHE": str(tmp_path / "cache")}
    run = tmp_path / "runs" / "images-cnn"
    (run / "weights").mkdir(parents=True)  # a previous demo's run, left in the same directory
    (run / "weights" / "v9999.safetensors").write_bytes(b"the last demo's weights")
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "slipstream.cli", "demo", "--quick", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - t0 < 120  # the smoke mode's promise
    text = out.stdout
    assert "Parquet shards" in text and "bottleneck:" in text and "← chosen" in text
    assert "slipstream dashboard: http://127.0.0.1:" in out.stderr  # the live URL, printed
    accuracy = float(re.search(r"accuracy: ([0-9.]+)", text)[1])  # type: ignore[index]
    assert accuracy > 0.5, text  # one short epoch of three classes: well above chance
    assert re.search(r"throughput: [0-9,]+ samples/s; input stall [0-9.]+%", text), text
    assert re.search(r"speed-up over the starting configuration: [0-9.]+×", text), text
    served = re.search(r"served while training: (\d+) predictions", text)
    assert served and int(served[1]) > 0, text
    assert (run / "config.toml").exists() and list((run / "weights").glob("v*.safetensors"))
    assert not (run / "weights" / "v9999.safetensors").exists()  # this run's weights alone
    assert (tmp_path / "images-cnn.tuned.toml").exists()


def test_bench_lists_and_rejects_unknown_names() -> None:
    listed = slipstream("bench", "--list")
    assert listed.returncode == 0
    names = listed.stdout.split()
    assert {
        "pipeline_arrays",
        "pipeline_decode",
        "pipeline_memory",
        "pipeline_remote",
        "pipeline_resume",
        "pipeline_stall",
    } <= set(names)
    bad = slipstream("bench", "no_such_bench")
    assert bad.returncode == 1 and "unknown benchmark(s) ['no_such_bench']" in bad.stderr


def test_usage_errors_exit_2() -> None:
    assert slipstream().returncode == 2
    assert slipstream("demo", "--nope").returncode == 2
    assert "Example: slipstream demo --quick" in slipstream("demo", "--help").stdout


@pytest.mark.parametrize("command", ["train", "demo", "bench", "serve", "dashboard"])
def test_every_subcommand_has_help_with_an_example(command: str) -> None:
    out = slipstream(command, "--help")
    assert out.returncode == 0 and "Example" in out.stdout, out.stdout


@pytest.mark.integration
def test_train_a_workload_saves_the_resolved_config_and_its_record(tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = slipstream(
        "train", "digits-cnn", "--run", str(run), "--set", "train.epochs=2",
        "--set", "live.console=false", "--set", "data.batch=128", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "goal val_acc ≥ 0.97:" in out.stdout and f"run directory: {run}" in out.stdout
    saved = (run / "config.toml").read_text()
    assert "epochs = 2" in saved and "batch = 128" in saved and 'name = "digits-cnn"' in saved
    epochs = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1, 2]
    # the saved config trains again as it is
    again = slipstream(
        "train", str(run / "config.toml"), "--run", str(tmp_path / "b"), cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr


def test_train_refuses_a_run_directory_with_checkpoints_unless_resumed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = ["--run", str(run), "--set", "live.console=false", "--set", "train.checkpoint_every=5"]
    first = slipstream("train", "digits-cnn", *common, "--set", "train.epochs=1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    config = (run / "config.toml").read_text()
    again = slipstream("train", "digits-cnn", *common, "--set", "train.epochs=2", cwd=tmp_path)
    assert again.returncode == 1 and "starts afresh" in again.stderr, again.stderr
    assert "slipstream train --resume" in again.stderr
    assert (run / "config.toml").read_text() == config  # refused before anything changed
    resumed = slipstream(
        "train", "digits-cnn", *common, "--set", "train.epochs=2", "--resume", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in events if r["kind"] == "epoch"] == [1, 2]  # epoch 1 not redone


def test_train_exits_3_when_required_goal_is_missed(tmp_path: Path) -> None:
    out = slipstream(
        "train", "digits-cnn", "--run", str(tmp_path / "r"), "--set", "train.epochs=1",
        "--set", "train.lr=1e-5",
        "--set", "live.console=false", "--require-goal", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 3, out.stderr
    assert "goal val_acc ≥ 0.97: NOT reached" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["digits"], "not a built-in workload"),
        (["digits-cnn", "--set", "train.epocs=3"], "did you mean 'epochs'"),
        (["digits-cnn", "--set", "train.workers=2"], "train.strategy = 'single'"),
        (["digits-cnn", "--set", "data.batch=-1"], "data.batch = -1 must be ≥ 1"),
    ],
)
def test_train_config_errors_exit_2_before_any_work(
    tmp_path: Path, args: list[str], message: str
) -> None:
    out = slipstream("train", *args, "--run", str(tmp_path / "r"), cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "script", sorted(p.name for p in (ROOT / "benchmarks").glob("pipeline_*.py"))
)
def test_every_benchmark_script_imports_and_documents_itself(script: str) -> None:
    out = subprocess.run(
        [sys.executable, script, "--help"],
        cwd=ROOT / "benchmarks",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "--quick" in out.stdout and "Target" in out.stdout


def test_bench_runs_a_benchmark_that_prints_the_agreed_json_line() -> None:
    out = slipstream("bench", "pipeline_arrays", "--quick")
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"bench", "figures", "ratio", "machine"} <= set(line)
    assert line["bench"] == "pipeline_arrays"
