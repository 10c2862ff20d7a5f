"""Records from every process reach one collector; sinks never block a step; the trainer's
records, the run file and the sinks slipstream ships."""

from __future__ import annotations

import io
import itertools
import logging
import multiprocessing as mp
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import slipstream as ss
from slipstream.live._collector import Collector
from slipstream.live._sinks import ConsoleSink, read_jsonl
from tests.live.helpers import records, train_digits, wait_for


class ListSink:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.closed = False

    def write(self, records: Any) -> None:
        self.records.extend(records)

    def close(self) -> None:
        self.closed = True


class StuckSink(ListSink):
    """A sink that stops answering until released (a dashboard on a dead network)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, records: Any) -> None:
        self.release.wait(30)
        super().write(records)


class BrokenSink(ListSink):
    def write(self, records: Any) -> None:
        raise OSError("disk on fire")


def _child_emits(collector: Collector, rank: int) -> None:
    for i in range(50):
        collector.emit({"kind": "train", "step": i, "rank": rank, "loss": 1.0 / (i + 1)})
    os._exit(0)


def test_records_from_forked_processes_reach_the_collector() -> None:
    sink = ListSink()
    collector = Collector("r", [sink])
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_child_emits, args=(collector, r)) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    collector.emit({"kind": "status", "event": "end"})
    collector.close()
    assert sink.closed
    by_rank = {r: [x["step"] for x in sink.records if x.get("rank") == r] for r in range(3)}
    assert all(steps == list(range(50)) for steps in by_rank.values())  # none lost, in order
    assert sink.records[-1]["kind"] == "status"
    assert all(r["run"] == "r" and r["time"] > 0 for r in sink.records)


def test_a_stuck_sink_drops_its_records_and_never_blocks_emit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stuck, healthy = StuckSink(), ListSink()
    collector = Collector("r", [stuck, healthy], capacity=10)
    caplog.set_level(logging.WARNING, "slipstream.live")
    slowest = 0.0
    for i in range(2000):
        start = time.perf_counter()
        collector.emit({"kind": "train", "step": i})
        slowest = max(slowest, time.perf_counter() - start)
        if i % 10 == 9:  # the healthy sink keeps up with bursts of its capacity
            wait_for("the healthy sink", lambda n=i + 1: len(healthy.records) == n)
    stuck.release.set()
    collector.close()
    assert [r["step"] for r in healthy.records] == list(range(2000))
    assert 0 < len(stuck.records) < 2000  # it lost records, the others did not
    warnings = [r for r in caplog.records if "StuckSink is falling behind" in r.message]
    assert len(warnings) == 1  # says so once
    assert slowest < 1.0  # a wait on the stuck sink would be its 30 s release


def test_a_failing_sink_is_reported_once_and_the_others_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "slipstream.live")
    broken, healthy = BrokenSink(), ListSink()
    collector = Collector("r", [broken, healthy])
    for i in range(100):
        collector.emit({"kind": "train", "step": i})
    collector.close()
    assert len(healthy.records) == 100
    failures = [r for r in caplog.records if "BrokenSink failed" in r.message]
    assert len(failures) == 1 and "disk on fire" in failures[0].message


def test_an_oversized_record_is_dropped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "slipstream.live")
    sink = ListSink()
    collector = Collector("r", [sink])
    collector.emit({"kind": "train", "blob": "x" * 10_000})
    collector.emit({"kind": "train", "step": 1})
    collector.close()
    assert [r.get("step") for r in sink.records] == [1]
    assert collector.dropped == 1
    assert any("over the" in r.message for r in caplog.records)


def test_a_trained_run_records_steps_epochs_inputs_and_weights(tmp_path: Path) -> None:
    history = train_digits(tmp_path, epochs=2, record_every=5, publish_every_steps=20)
    train = records(tmp_path, "train")
    assert len(train) == history.steps // 5
    assert [r["step"] for r in train] == list(range(5, history.steps + 1, 5))
    for r in train:
        assert {"loss", "acc", "samples_per_s", "stall"} <= set(r)
        assert r["samples_per_s"] > 0 and 0 <= r["stall"] <= 1
    # the window means add up to the epoch's mean loss (the same batches, weighted equally)
    first_epoch = [r["loss"] for r in train if r["step"] <= history.epochs[0]["step"]]
    assert abs(sum(first_epoch) / len(first_epoch) - history.epochs[0]["loss"]) < 0.05
    epochs = records(tmp_path, "epoch")
    assert [e["val_acc"] for e in epochs] == history["val_acc"]
    versions = [r["version"] for r in records(tmp_path, "weights")]
    assert versions == [*range(20, history.steps + 1, 20), history.steps]  # and the final one
    status = records(tmp_path, "status")
    assert [s["event"] for s in status] == ["start", "end"] and status[1]["reason"] == "epochs"
    info = __import__("json").loads((tmp_path / "live.json").read_text())
    assert info["model"] == "tests.live.helpers:DigitsNet"
    assert info["inputs"] == {"shape": [1, 8, 8], "dtype": "float32"}
    on_disk = sorted(p.name for p in (tmp_path / "weights").iterdir())
    assert on_disk[-1] == f"v{history.steps:012d}.safetensors" and len(on_disk) <= 5


def test_a_window_spanning_epochs_counts_all_its_samples(tmp_path: Path) -> None:
    from tests.train.helpers import pipes, trainer

    train, _ = pipes(batch=32, n=320)  # 10 steps an epoch, a record every 25
    live = ss.Live(tmp_path, console=False, record_every=25)
    trainer(live=live).fit(train, epochs=10)
    windows = records(tmp_path, "train")
    assert len(windows) == 4
    for a, b in itertools.pairwise(windows):
        expected = 25 * 32 / (b["time"] - a["time"])
        assert 0.7 < b["samples_per_s"] / expected < 1.3, (b["samples_per_s"], expected)


def test_hogwild_workers_and_ddp_ranks_each_report(tmp_path: Path) -> None:
    from tests.train.helpers import pipes, trainer

    for strategy, key in (("hogwild", "worker"), ("ddp", "rank")):
        run = tmp_path / strategy
        live = ss.Live(run, console=False, record_every=5, publish_every_steps=25)
        t = trainer(strategy=strategy, workers=2, live=live)
        train, _ = pipes()
        history = t.fit(train, epochs=1)
        train_records = records(run, "train")
        assert {r[key] for r in train_records} == {0, 1}, strategy
        assert records(run, "weights")[-1]["version"] == history.steps
        if strategy == "hogwild":  # the other worker's updates between a read and a write
            stale = [r["staleness"] for r in train_records]
            assert all(s >= 0 for s in stale) and max(s for s in stale) > 0


def slow_identity(sample: Any) -> Any:
    """A map that takes its time (a worker process is busy most of the window)."""
    time.sleep(0.0005)
    return sample


def test_pipeline_stages_and_worker_processes_report_their_figures(tmp_path: Path) -> None:
    from tests.train.helpers import digits, trainer

    x, y = digits()
    train = (
        ss.from_arrays((x[:1024], y[:1024]))
        .shuffle(seed=0)
        .map(slow_identity, mode="process", workers=2)
        .batch(32)
        .prefetch(2)
    )
    t = trainer(live=ss.Live(tmp_path, console=False, record_every=4))
    history = t.fit(train, epochs=2)
    pipeline = records(tmp_path, "pipeline")
    stages = [r for r in pipeline if "process" not in r]
    names = {r["stage"] for r in stages}
    assert any(n.startswith("map") for n in names) and len(names) >= 3, names
    # one record per stage with each train record, at the same steps
    train_steps = [r["step"] for r in records(tmp_path, "train")]
    assert sorted({r["step"] for r in stages}) == train_steps
    assert all(r["items_per_s"] >= 0 and 0 <= r["busy"] <= 1 for r in stages)
    # the map's worker processes, in their own words: the training waits on them
    procs = [r for r in pipeline if "process" in r]
    assert {r["process"] for r in procs} == {0, 1}
    pids = {r["pid"] for r in procs}
    assert os.getpid() not in pids and len(pids) >= 2  # new processes each epoch: more
    assert all(r["rss_mb"] > 10 for r in procs)  # a process that imported torch
    assert statistics.median(r["busy"] for r in procs) > 0.3
    # the pipeline's own account agrees: each batch was mapped (and collated, the map and batch
    # run as one task) by one of those processes
    (mapped,) = [s for s in train.stats().stages if s.processes]
    assert sum(p.items for p in mapped.processes) == mapped.items == history.steps


def test_tensorboard_event_files_hold_the_figures(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = train_digits(tmp_path, epochs=1, tensorboard=True, record_every=5)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/acc", "epoch/val_acc", "train/stall"} <= set(tags)
    assert "pipeline/read(arrays)/items_per_s" in tags
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(5, history.steps + 1, 5))
    assert acc.Scalars("epoch/val_acc")[0].value == pytest.approx(history["val_acc"][0])


def test_the_console_shows_progress_loss_and_stall() -> None:
    from rich.console import Console

    out = io.StringIO()
    sink = ConsoleSink(100, console=Console(file=out, force_terminal=True, width=160))
    sink.write(
        [
            {
                "kind": "train",
                "step": 40,
                "loss": 0.25,
                "acc": 0.9,
                "samples_per_s": 1234.0,
                "stall": 0.031,
            }
        ]
    )
    sink.write([{"kind": "epoch", "step": 50, "val_acc": 0.95}])
    sink.close()
    text = out.getvalue()
    for piece in (
        "40/100",
        "loss 0.25",
        "acc 0.9",
        "samples/s 1,234",
        "stall 3.1%",
        "val_acc 0.95",
    ):
        assert piece in text


def test_records_in_jsonl_survive_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "tr')
    assert read_jsonl(path) == [{"kind": "train", "step": 1}]


def test_live_rejects_bad_arguments() -> None:
    with pytest.raises(ss.ArgumentError, match="publish_every_steps"):
        ss.Live(publish_every_steps=0)
    with pytest.raises(ss.ArgumentError, match=r"`live` must be an ss\.Live"):
        ss.Trainer(
            torch.nn.Linear(2, 2),
            optimizer=lambda p: torch.optim.SGD(p, 0.1),
            loss=torch.nn.functional.mse_loss,
            live=object(),
        )  # type: ignore[arg-type]
