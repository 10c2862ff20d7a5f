"""``slipstream demo``: the whole product on one workload, in a few minutes.

Writes a sharded JPEG dataset (the ``images-cnn`` workload), tunes it, trains the chosen
configuration with the dashboard following it live and weights published as it learns, serves
predictions from the live model while it trains, and ends with a report.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slipstream._core.config import Config, dumps
from slipstream._core.errors import SlipstreamError
from slipstream.live import serve
from slipstream.train import History
from slipstream.tune import TuneResult
from slipstream.workloads import Goal
from slipstream.workloads._build import build, live_of, load_config, resolve, tune_config
from slipstream.workloads._images import decode_center

WORKLOAD = "images-cnn"


@dataclass
class Served:
    """What the demo's client saw of the prediction server while training ran."""

    url: str = ""
    answers: int = 0
    correct: int = 0
    versions: set[int] = field(default_factory=set)
    error: str = ""


def _client(run: Path, samples: list[tuple[np.ndarray, int]], done: threading.Event) -> Served:
    """Once weights are published, serve them and ask for predictions until training ends."""
    served = Served()
    weights = run / "weights"
    while not done.is_set() and not any(weights.glob("v*.safetensors")):
        done.wait(0.2)  # the first version comes with the first publish
    if done.is_set():
        served.error = "training ended before the first weights were published"
        return served
    with serve(run, port=0) as server:
        served.url = server.url
        i = 0
        while not done.is_set() or served.answers == 0:
            batch = samples[i % len(samples) : i % len(samples) + 16]
            i += 16
            body = json.dumps({"inputs": [x.tolist() for x, _ in batch]}).encode()
            req = urllib.request.Request(
                server.url + "/predict", body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=30) as resp:
                answer = json.loads(resp.read())
            predicted = np.argmax(np.asarray(answer["outputs"]), axis=-1)
            served.correct += int(sum(p == y for p, (_, y) in zip(predicted, batch, strict=True)))
            served.answers += len(batch)
            served.versions.add(int(answer["version"]))
            done.wait(0.25)
    return served


def _validation(config: Config, n: int) -> list[tuple[np.ndarray, int]]:
    import pyarrow.parquet as pq

    table = pq.read_table(Path(config.data.root) / WORKLOAD / "test.parquet").slice(0, n)
    return [decode_center(row) for row in table.to_pylist()]


def _figures(run: Path) -> tuple[float, float]:
    """Training samples/s (summed over processes, medians of their windows) and input stall."""
    from slipstream.tune._measure import rate_of

    records = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    return rate_of(records)


def run(
    quick: bool = False, directory: Path | None = None, say: Callable[[str], None] = print
) -> None:
    """Run the demonstration in ``directory`` (default ``./slipstream-demo``); ``quick``
    shrinks it to well under two minutes."""
    root = (directory or Path("slipstream-demo")).resolve()
    # quick: 2,000 images; three epochs, so that even two Hogwild workers take enough steps
    # to learn and to fill record windows of 5 steps
    images, epochs, budget = (2_000, 3, 20) if quick else (20_000, 2, 60)
    overrides = [
        f"run={root / 'runs' / WORKLOAD}",
        f"data.root={root / 'data'}",
        f"data.size={images}",
        f"train.epochs={epochs}",
        "live.publish_every_steps=10",
        "live.record_every=5",
    ]
    config = resolve(load_config(WORKLOAD, overrides))
    # a new run: a previous demo's events and weights would mix with this one's (the dataset,
    # under data/, is kept and reused)
    shutil.rmtree(config.run, ignore_errors=True)
    _dataset(config, say)

    say(f"2. tuning for {budget} s: what is fastest for this model and data on this machine")
    tuned = tune_config(config, root / f"{WORKLOAD}.tuned.toml", budget, say=lambda _: None)
    say("   " + tuned.result.table().replace("\n", "\n   "))
    say(f"   wrote {tuned.path}")

    config = tuned.config.replace("live", dashboard=True, console=False)
    say(
        f"3. training the chosen configuration ({config.train.strategy}); the dashboard URL "
        "follows, weights are published every 10 steps and served as they come"
    )
    trained = _train_serving(config)
    _report(config, tuned.result, trained, say)
    if trained.served.error:
        raise SlipstreamError(f"the demo's prediction client failed: {trained.served.error}")


def _dataset(config: Config, say: Callable[[str], None]) -> None:
    t0 = time.perf_counter()
    build(config).close()  # writes the dataset the first time
    where = Path(config.data.root) / WORKLOAD
    shards = sorted(where.glob("train-*"))
    mib = sum(p.stat().st_size for p in shards) / 2**20
    say(
        f"1. dataset: {config.data.size:,} JPEG images in {len(shards)} Parquet shards "
        f"({mib:.1f} MiB) under {where}, ready in {time.perf_counter() - t0:.1f} s"
    )


@dataclass
class Trained:
    history: History
    seconds: float
    served: Served
    goal: Goal | None


def _train_serving(config: Config) -> Trained:
    """Train ``config`` with its live feed while a client thread serves and queries it."""
    run_dir = Path(config.run)
    parts = build(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dumps(config))
    done = threading.Event()
    samples = _validation(config, 64)
    client: list[Served] = []
    thread = threading.Thread(
        target=lambda: client.append(_client(run_dir, samples, done)), name="slipstream-demo"
    )
    thread.start()
    live = live_of(config)
    try:
        t0 = time.perf_counter()
        history = parts.trainer(live).fit(
            parts.data.train, val=parts.data.val, epochs=config.train.epochs
        )
        seconds = time.perf_counter() - t0
    finally:
        done.set()
        thread.join(60)
        parts.close()
        live.close()
    served = client[0] if client else Served(error="the client did not finish")
    return Trained(history, seconds, served, parts.goal)


def _report(
    config: Config, tuned: TuneResult, trained: Trained, say: Callable[[str], None]
) -> None:
    run_dir = Path(config.run)
    rate, stall = _figures(run_dir)
    history, served = trained.history, trained.served
    say("4. report")
    say(
        f"   accuracy: {history.epochs[-1]['val_acc']:.3f} on held-out images (goal "
        f"{trained.goal}), after {history.steps} steps in {trained.seconds:.1f} s"
    )
    if rate > 0:
        say(f"   throughput: {rate:,.0f} samples/s; input stall {100 * stall:.1f}% of step time")
    else:
        say("   throughput: not measured (the run ended before a record window filled)")
    say(
        f"   speed-up over the starting configuration: {tuned.speedup:.2f}× "
        f"({tuned.label(tuned.best)})"
    )
    if served.error:
        say(f"   serving: {served.error}")
    else:
        say(
            f"   served while training: {served.answers} predictions from {served.url}, "
            f"weights versions {sorted(served.versions)[:3]}…{max(served.versions)} swapped in "
            f"live, {100 * served.correct / served.answers:.0f}% correct"
        )
    say(
        f"   files: {run_dir} (config.toml, events.jsonl, weights/, tune/); dataset "
        f"{Path(config.data.root) / WORKLOAD}; replay the run: slipstream dashboard {run_dir}"
    )
    say(f"   serve the final model: slipstream serve {run_dir}")
