"""live_serve: predictions per second and latency of the digits CNN's server while the model
trains and publishes, against the same server with training stopped.

A client process keeps ``clients`` keep-alive connections busy for a while and reports every
request's latency; phases alternate idle / training. Training runs in a child process (one
thread, publishing every 50 steps), so the server swaps weights in while it answers.
"""

from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

import slipstream as ss
from _common import emit, log, parser

HERE = Path(__file__).resolve().parent


def digits_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(32 * 64, 10),
    )  # fmt: skip


def train(run: str, seconds: float) -> None:
    """The child: train the CNN on digits for ``seconds``, publishing every 50 steps."""
    d = load_digits()
    x, y = (d.data / 16).astype(np.float32).reshape(-1, 1, 8, 8), d.target.astype(np.int64)
    trainer = ss.Trainer(
        digits_cnn(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        loss=torch.nn.functional.cross_entropy, threads=1,
        callbacks=[ss.Timeout(seconds=seconds)],
        live=ss.Live(run, console=False, publish_every_steps=50, model="live_serve:digits_cnn"),
    )  # fmt: skip
    trainer.fit(ss.from_arrays((x, y)).shuffle(seed=0).batch(32), epochs=10_000)


def load(url: str, seconds: float, clients: int) -> None:
    """The client process: print every request's latency (ms) and the versions seen, as JSON."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sample = (load_digits().data[:1] / 16).reshape(1, 1, 8, 8).tolist()
    body = json.dumps({"inputs": sample}).encode()
    latencies: list[float] = []
    versions: set[int] = set()
    end = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        while time.monotonic() < end:
            t0 = time.perf_counter()
            conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
            answer = json.loads(conn.getresponse().read())
            latencies.append(1000 * (time.perf_counter() - t0))
            versions.add(answer["version"])
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"latencies": latencies, "versions": sorted(versions)}))


def phase(url: str, seconds: float, clients: int) -> dict[str, float]:
    code = f"from live_serve import load; load({url!r}, {seconds}, {clients})"
    out = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                         check=True)  # fmt: skip
    got = json.loads(out.stdout)
    ms = got["latencies"]
    return {
        "predictions_per_s": len(ms) / seconds,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "versions_seen": len(got["versions"]),
    }


def main() -> None:
    args = parser(__doc__).parse_args()
    seconds, rounds, clients = (4.0, 1, 4) if args.quick else (15.0, 3, 4)
    results: dict[str, list[dict[str, float]]] = {"idle": [], "training": []}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        first = f"from live_serve import train; train({str(run)!r}, 2)"  # a run to serve
        subprocess.run([sys.executable, "-c", first], cwd=HERE, check=True)
        sys.path.insert(0, str(HERE))
        with ss.serve(run, port=0) as server:
            for r in range(rounds):
                results["idle"].append(phase(server.url, seconds, clients))
                code = f"from live_serve import train; train({str(run)!r}, {seconds + 30})"
                trainer = subprocess.Popen([sys.executable, "-c", code], cwd=HERE)
                try:
                    time.sleep(3.0)  # let the trainer get going before measuring
                    results["training"].append(phase(server.url, seconds, clients))
                finally:
                    trainer.terminate()  # SIGTERM: the run stops cleanly after its step
                    trainer.wait()
                log(f"round {r}: idle {results['idle'][-1]} training {results['training'][-1]}")
    med = {k: {f: statistics.median(p[f] for p in v) for f in v[0]} for k, v in results.items()}
    emit(
        "live_serve",
        {"idle": med["idle"], "training": med["training"], "rounds": results},
        {"throughput_training_over_idle": med["training"]["predictions_per_s"]
         / med["idle"]["predictions_per_s"],
         "p99_training_over_idle": med["training"]["p99_ms"] / med["idle"]["p99_ms"]},
        {"clients": clients, "seconds": seconds, "rounds": rounds, "publish_every_steps": 50,
         "train_threads": 1},
    )  # fmt: skip


if __name__ == "__main__":
    main()
