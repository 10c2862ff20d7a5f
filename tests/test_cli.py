"""Each CLI subcommand end to end, in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def slipstream(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "slipstream.cli", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_demo_quick_reports_throughput_stall_and_an_exact_resume(tmp_path: Path) -> None:
    out = slipstream("demo", "--quick", "--dir", str(tmp_path / "data"))
    assert out.returncode == 0, out.stderr
    assert "pipeline alone:" in out.stdout and "samples/s" in out.stdout
    assert "input stall" in out.stdout and "where the time went" in out.stdout
    assert "identical to the uninterrupted run's" in out.stdout
    assert len(list((tmp_path / "data").glob("train-*.parquet"))) == 4


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
