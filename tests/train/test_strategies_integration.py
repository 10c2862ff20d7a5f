"""DDP, Hogwild and local SGD with real processes: parity, crashes, resume, two "machines"."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import slipstream as ss
from slipstream.train import _checkpoint as ckpt
from tests.train.helpers import SeedPerRank, cnn, digits, pipes, same_weights, trainer

pytestmark = pytest.mark.integration


def test_ddp_on_two_ranks_equals_single_with_twice_the_batch() -> None:
    single = trainer(optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    single.fit(pipes(batch=64, n=1024)[0], epochs=2)
    ddp = trainer(optimizer=lambda p: torch.optim.SGD(p, lr=0.1), strategy="ddp", workers=2)
    history = ddp.fit(pipes(batch=32, n=1024)[0], epochs=2)
    assert history.config["strategy"] == "ddp" and history.config["workers"] == 2
    assert history.steps == 32
    for a, b in zip(single.model.parameters(), ddp.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ddp_metrics_are_reduced_over_ranks() -> None:
    train, test = pipes()
    history = trainer(strategy="ddp", workers=2).fit(train, val=test, epochs=2)
    single = trainer().evaluate(pipes()[1])  # the untrained model, for scale
    assert history["val_acc"][-1] > 0.85 > single["acc"]


class Failing(ss.Callback):
    def on_step_end(self, fit: Any) -> None:
        if fit.step == 3 and torch.distributed.get_rank() == 1:
            raise RuntimeError("rank one broke on purpose")


def test_ddp_ranks_save_on_time_together_with_each_ranks_rng(tmp_path: Path) -> None:
    """Saving gathers every rank's RNG state, so every rank must save at the same step: a
    rule on time reads the clock the ranks agreed on (each rank's own would differ)."""

    class Jitter(ss.Callback):  # rank 1 reaches each step's rules a little later, by chance
        def on_step_end(self, fit: Any) -> None:
            if fit.strategy.rank == 1:
                time.sleep(random.uniform(0.0, 0.03))

    on_time = ss.Checkpoint(tmp_path, every_seconds=0.05, keep=1000)
    callbacks = [SeedPerRank(), Jitter(), on_time]
    t = trainer(cnn(dropout=0.2), strategy=ss.DDP(workers=2, timeout=20), callbacks=callbacks)
    history = t.fit(pipes()[0], epochs=3)
    saved = sorted(tmp_path.glob("step-*"))
    assert len(saved) >= 3 and saved[0].name != ckpt.step_name(history.steps), saved
    rngs = ckpt.read(saved[0]).state["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])


def test_a_ddp_rank_that_raises_stops_every_rank_with_its_name() -> None:
    start = time.monotonic()
    with pytest.raises(ss.TrainingError, match=r"ddp rank 1 failed: RuntimeError: rank one broke"):
        trainer(strategy="ddp", workers=2, callbacks=[Failing()]).fit(pipes()[0], epochs=3)
    assert time.monotonic() - start < 60


class Killing(ss.Callback):
    def on_step_end(self, fit: Any) -> None:
        if fit.step == 3 and torch.distributed.get_rank() == 0:
            os.kill(os.getpid(), 9)


def test_a_killed_ddp_rank_stops_every_rank_with_its_name() -> None:
    start = time.monotonic()
    with pytest.raises(ss.TrainingError, match=r"ddp rank 0 .* was killed by SIGKILL"):
        trainer(strategy="ddp", workers=2, callbacks=[Killing()]).fit(pipes()[0], epochs=3)
    assert time.monotonic() - start < 60


class ParentThreads(ss.Callback):
    def __init__(self) -> None:
        self.seen: set[int] = set()

    def on_epoch_end(self, fit: Any, logs: dict[str, float]) -> None:
        self.seen.add(torch.get_num_threads())


def test_hogwild_trains_digits() -> None:
    train, test = pipes()
    parent = ParentThreads()
    t = trainer(strategy="hogwild", workers=2, callbacks=[parent])
    before = torch.get_num_threads()
    history = t.fit(train, val=test, epochs=5)
    assert history["val_acc"][-1] > 0.85
    cores = len(os.sched_getaffinity(0))
    assert history.config["threads"] == max(1, cores // 2)
    # the parent evaluates on the cores the workers leave, and has its threads back after
    assert parent.seen == {max(1, cores - 2 * history.config["threads"])}
    assert torch.get_num_threads() == before
    assert t.evaluate(test)["acc"] == pytest.approx(history["val_acc"][-1])  # shared weights


def _same(sample: Any) -> Any:
    return sample


def _blocks() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("ss_")}


def test_hogwild_workers_run_process_maps_and_stop_the_workers_they_kept() -> None:
    """A Hogwild worker may start process workers for its shard (multiprocessing refuses
    children to daemonic processes); the shard keeps them from epoch to epoch, and the worker,
    which ends with os._exit (no finalizer runs), closes them itself first."""
    x, y = digits()
    pipe = ss.from_arrays((x[:512], y[:512])).map(_same, mode="process", workers=1).batch(32)
    before = _blocks()
    history = trainer(strategy="hogwild", workers=2).fit(pipe, epochs=2)
    assert history.steps == 2 * 512 // 32
    assert _blocks() == before  # every arena of the workers' pools was released


class Crash(ss.Trainer):
    def train_step(self, batch: Any) -> dict[str, torch.Tensor]:
        if torch.get_num_threads() and os.getpid() != PARENT and batch[1][0] == 7:
            raise ValueError("a worker met a seven")
        return super().train_step(batch)


PARENT = os.getpid()


def test_a_hogwild_worker_error_stops_the_run_with_its_name() -> None:
    t = Crash(
        cnn(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        loss=F.cross_entropy,
        strategy="hogwild",
        workers=2,
    )
    with pytest.raises(ss.TrainingError, match=r"hogwild worker \d failed: ValueError: a worker"):
        t.fit(pipes()[0], epochs=2)


class Recording(ss.Trainer):
    log: Path

    def train_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        with open(self.log, "a") as f:
            f.write(json.dumps(batch["i"].tolist()) + "\n")
        return super().train_step(batch)


def _indexed(n: int = 800) -> ss.Pipeline:
    x, y = digits()
    data = {"x": x[:n], "y": y[:n], "i": np.arange(n)}
    return ss.from_arrays(data).shuffle(seed=1).batch(16)


def test_hogwild_resume_repeats_and_skips_no_sample(tmp_path: Path) -> None:
    def make() -> Recording:
        t = Recording(
            cnn(),
            optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
            loss=F.cross_entropy,
            strategy=ss.Hogwild(workers=2, sync_every=5),
            callbacks=[ss.Checkpoint(tmp_path / "run", every_steps=10)],
        )
        t.log = tmp_path / "seen.jsonl"
        return t

    first = make().fit(_indexed(), epochs=1, steps=22)
    assert first.stopped_by == "steps" and first.steps >= 22
    second = make().fit(_indexed(), epochs=1, resume=tmp_path / "run")
    assert second.steps == 50
    seen = [
        i for line in (tmp_path / "seen.jsonl").read_text().splitlines() for i in json.loads(line)
    ]
    assert sorted(seen) == list(range(800))


def test_localsgd_averages_every_k_steps_and_ends_in_agreement() -> None:
    train, test = pipes()
    strategy = ss.LocalSGD(workers=2, sync_every=4)
    t = trainer(strategy=strategy)
    history = t.fit(train, val=test, epochs=3)
    assert history["val_acc"][-1] > 0.85
    assert history.config["strategy"] == "localsgd"


def test_localsgd_with_an_outer_step_resumes_from_an_epoch_exactly(tmp_path: Path) -> None:
    def make(*callbacks: ss.Callback) -> ss.Trainer:
        strategy = ss.LocalSGD(workers=2, sync_every=4, outer_lr=0.7)
        return trainer(
            cnn(dropout=0.3),
            strategy=strategy,
            optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),  # moments differ by rank
            callbacks=[SeedPerRank(), *callbacks],  # so do dropout masks
            deterministic=True,
        )

    straight = make()
    straight.fit(pipes(n=512)[0], epochs=2)
    make(ss.Checkpoint(tmp_path)).fit(pipes(n=512)[0], epochs=1)
    resumed = make(ss.Checkpoint(tmp_path))
    resumed.fit(pipes(n=512)[0], epochs=2, resume=tmp_path)
    # with the weights came the outer step's global point and momentum, and each rank's own
    # optimizer moments and generators
    assert same_weights(resumed.model, straight.model)


def test_localsgd_with_unequal_shards_saves_within_and_after_epochs(tmp_path: Path) -> None:
    # 257 samples in batches of 32: rank 0 gets 5 batches an epoch and rank 1 gets 4. Rank 1,
    # out of data, waits for the next sync point while rank 0 takes a fifth step: step counts
    # part, and a save at a step count cannot be a collective
    t = trainer(
        strategy=ss.LocalSGD(workers=2, sync_every=3),
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3),
        callbacks=[ss.Checkpoint(tmp_path, every_steps=3, every_epochs=1, keep=100)],
    )
    history = t.fit(pipes(n=257)[0], epochs=2)
    assert history.steps == 10
    saved = {int(d.name.split("-")[1]): ckpt.read(d).state for d in tmp_path.glob("step-*")}
    assert sorted(saved) == [3, 5, 6, 9, 10]
    for step in (3, 6, 9):  # within an epoch: rank 0's state alone
        assert "ranks" not in saved[step]["strategy"] and len(saved[step]["rng"]) == 1
    for step in (5, 10):  # at an epoch's end: every rank's, each rank's own
        ranks = saved[step]["strategy"]["ranks"]
        assert len(saved[step]["rng"]) == 2
        assert [r["optimizer"]["state"][0]["step"] for r in ranks] == [step, step * 4 // 5]


LOCALSGD = r"""
import os
import slipstream as ss
from tests.train.helpers import cnn, pipes, trainer

class FirstWeights(ss.Callback):
    def on_fit_start(self, fit):
        first = float(sum(p.detach().double().sum() for p in fit.trainer.model.parameters()))
        os.write(1, f"FIRST {first!r}\n".encode())

t = trainer(cnn(seed=int(os.environ["RANK"])), callbacks=[FirstWeights()],
            strategy=ss.LocalSGD(sync_every=4, outer_lr=0.7))
t.fit(pipes(n=256)[0], epochs=1)
"""


def test_localsgd_ranks_built_differently_start_from_rank_0s_weights(tmp_path: Path) -> None:
    script = tmp_path / "localsgd.py"
    script.write_text(LOCALSGD)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node=2", str(script)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    first = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("FIRST")]
    expected = sum(p.detach().double().sum() for p in cnn(seed=0).parameters())
    assert first == [repr(float(expected))] * 2, first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NODE = r"""
import sys, torch
import slipstream as ss
from tests.train.helpers import pipes, trainer
t = trainer(strategy="ddp", callbacks=[ss.Checkpoint(sys.argv[1])])
history = t.fit(pipes()[0], val=pipes()[1], epochs=2)
print("RESULT", history.config["workers"], history["val_acc"][-1], flush=True)
"""


def test_two_machines_on_loopback_train_together(tmp_path: Path) -> None:
    script = tmp_path / "node.py"
    script.write_text(NODE)
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=t",
        str(script),
        str(tmp_path / "run"),
    ]
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [n.communicate(timeout=240)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs
    results = [line.split() for out in outs for line in out.splitlines() if "RESULT" in line]
    assert len(results) == 2 and all(r[1] == "2" for r in results)
    assert float(results[0][2]) == float(results[1][2]) > 0.85
    assert ss.load_weights(tmp_path / "run", cnn()) is not None


ELASTIC = r"""
import glob, os, sys
import slipstream as ss
from tests.train.helpers import SeedPerRank, cnn, pipes, trainer

class FailOnce(ss.Callback):
    def __init__(self):
        self.trained = 0  # updates this attempt made

    def on_step_end(self, fit):
        self.trained += 1
        first = os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"
        if sys.argv[2] == "fail" and first and os.environ["RANK"] == "1" and fit.step == 7:
            raise RuntimeError("rank one broke on purpose")

count = FailOnce()
t = trainer(cnn(dropout=0.2), strategy="ddp", deterministic=True,
            callbacks=[SeedPerRank(), ss.Checkpoint(sys.argv[1], every_steps=4), count])
history = t.fit(pipes(n=640)[0], epochs=2, resume=sys.argv[1])
rank, attempt = os.environ["RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"]
threads = [open(task).read() for task in glob.glob("/proc/self/task/*/comm")]
gloo = sum("gloo" in name for name in threads)  # left running, one can abort the exit
line = f"RESULT {rank} {attempt} {history.steps} {count.trained} {gloo}\n"
os.write(1, line.encode())  # one write
"""


def test_torchrun_restarts_a_failed_job_from_its_latest_checkpoint(tmp_path: Path) -> None:
    script = tmp_path / "elastic.py"
    script.write_text(ELASTIC)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))

    def torchrun(run: str, fail: str) -> list[list[str]]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", "--max-restarts=1", "--monitor-interval=0.5",
               str(script), str(tmp_path / run), fail]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
        return [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("RESULT")]

    restarted = torchrun("restarted", "fail")
    # both ranks ran a second attempt, which trained only the updates after checkpoint 4
    assert sorted(restarted) == [["0", "1", "20", "16", "0"], ["1", "1", "20", "16", "0"]]
    whole = sorted(torchrun("whole", "-"))
    assert whole == [["0", "0", "20", "20", "0"], ["1", "0", "20", "20", "0"]], whole
    # ranks draw different dropout masks: each resumes its own generator
    restarted_model = ss.load_weights(tmp_path / "restarted", cnn(dropout=0.2))
    assert same_weights(restarted_model, ss.load_weights(tmp_path / "whole", cnn(dropout=0.2)))


def test_forked_workers_read_parquet_the_parent_had_open(tmp_path: Path) -> None:
    """Hogwild workers fork with the parent's open Parquet files: sharing their offsets
    would interleave reads (pyarrow: "Corrupt snappy compressed data"); each opens its own."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x, y = digits()
    images = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64)
    pq.write_table(pa.table({"x": images, "y": y}), tmp_path / "d.parquet", row_group_size=32)
    pipe = ss.from_parquet(str(tmp_path / "d.parquet")).shuffle(seed=0).batch(16)
    next(iter(pipe))  # the parent opens the file before the workers fork
    flat = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    history = trainer(flat, strategy="hogwild", workers=2).fit(pipe, epochs=3)
    shards = (len(y) + 1) // 2, len(y) // 2  # each worker its half, in batches of 16
    assert history.steps == 3 * sum(-(-n // 16) for n in shards)
