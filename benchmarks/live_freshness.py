"""live_freshness: from a version's publish to the server answering with it, for a 10 MB model.

A child process trains a 10 MB MLP and publishes every few steps; in this process a client asks
the prediction server for predictions back to back and notes when each version first answers.
Freshness = that moment minus the version's publish time (both read off this machine's clock).
Two ways for the weights to travel: the shared-memory store (same machine), and, as the peer,
the safetensors files a reader on another machine follows (what reload-the-checkpoint glue
does). Printed beside: the time of one plain 10 MB memory copy, the floor. Target: p99 ≤ 50 ms.
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

import slipstream as ss
from _common import emit, log, parser

HERE = Path(__file__).resolve().parent


def big_mlp() -> torch.nn.Module:
    """2.6 M float32 parameters: 10.5 MB."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(256, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1024), torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    )  # fmt: skip


def train(run: str, seconds: float, every: int) -> None:
    """The child: train on random data for ``seconds``, publishing every ``every`` steps."""
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4096, 256), dtype=np.float32)
    y = rng.integers(0, 10, 4096)
    trainer = ss.Trainer(
        big_mlp(), optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
        loss=torch.nn.functional.cross_entropy, threads=1,
        callbacks=[ss.Timeout(seconds=seconds)],
        live=ss.Live(run, console=False, publish_every_steps=every, model="live_freshness:big_mlp",
                     keep_versions=3),
    )  # fmt: skip
    trainer.fit(ss.from_arrays((x, y)).shuffle(seed=0).batch(32), epochs=1000)


def follow(url: str, trainer_pid: int) -> None:
    """The client (a process of its own, as clients are): predict back to back while the
    trainer runs; print the first time each version answered, as JSON."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = json.dumps({"inputs": [[0.0] * 256]})
    first: dict[int, float] = {}
    while psutil.pid_exists(trainer_pid) and psutil.Process(trainer_pid).status() != "zombie":
        conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
        version = json.loads(conn.getresponse().read())["version"]
        first.setdefault(version, time.time())
    conn.close()
    print(json.dumps(first))


def published(run: Path) -> dict[int, float]:
    """Each version's publish time, from the run's record."""
    out = {}
    for line in (run / "events.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "weights":
            out[r["version"]] = r["time"]
    return out


def measure(run: Path, seconds: float, every: int, files_only: bool) -> list[float]:
    cmd = [
        sys.executable,
        "-c",
        f"from live_freshness import train; train({str(run)!r}, {seconds}, {every})",
    ]
    child = subprocess.Popen(cmd, cwd=HERE)
    try:
        deadline = time.monotonic() + 120
        while not (run / "weights").is_dir() or not any((run / "weights").iterdir()):
            if time.monotonic() > deadline or child.poll() is not None:
                raise RuntimeError("the training child published nothing")
            time.sleep(0.05)  # waiting for the child's first version
        info = json.loads((run / "live.json").read_text())
        if files_only:  # a reader on another machine: no shared memory to attach to
            info.pop("store")
            (run / "live.json").write_text(json.dumps(info))
        with ss.serve(run, model=big_mlp(), port=0) as server:
            code = f"from live_freshness import follow; follow({server.url!r}, {child.pid})"
            client = subprocess.run(
                [sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True
            )
        first = {int(v): t for v, t in json.loads(client.stdout).items()}
    finally:
        child.kill()
        child.wait()
    times = published(run)
    return [1000 * (first[v] - times[v]) for v in sorted(first) if v in times and v != min(first)]


def memcpy_ms(nbytes: int) -> float:
    """One copy of ``nbytes`` into new memory (as a reader's snapshot is)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    runs = []
    for _ in range(50):
        t0 = time.perf_counter()
        src.clone()
        runs.append(time.perf_counter() - t0)
    return 1000 * statistics.median(runs)


def summary(ms: list[float]) -> dict[str, Any]:
    q = np.percentile(ms, [50, 99]) if ms else [float("nan")] * 2
    return {
        "versions": len(ms),
        "p50_ms": float(q[0]),
        "p99_ms": float(q[1]),
        "max_ms": max(ms, default=0),
    }


def main() -> None:
    args = parser(__doc__).parse_args()
    seconds = 8.0 if args.quick else 30.0
    every = 5
    nbytes = sum(p.numel() * 4 for p in big_mlp().parameters())
    with tempfile.TemporaryDirectory() as tmp:
        shm = summary(measure(Path(tmp) / "shm", seconds, every, files_only=False))
        log(f"shared memory: {shm}")
        files = summary(measure(Path(tmp) / "files", seconds, every, files_only=True))
        log(f"files: {files}")
    emit(
        "live_freshness",
        {"model_mb": nbytes / 1e6, "memcpy_ms": memcpy_ms(nbytes), "shared_memory": shm,
         "files": files},
        {"p99_ms": shm["p99_ms"], "files_p99_over_shm_p99": files["p99_ms"] / shm["p99_ms"]},
        {"publish_every_steps": every, "train_seconds": seconds, "train_threads": 1},
    )  # fmt: skip


if __name__ == "__main__":
    main()
