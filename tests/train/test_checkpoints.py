"""Checkpoints: exact resume, atomic writes under SIGKILL, no unpickling, pruning."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import slipstream as ss
from tests.train.helpers import cnn, pipes, same_weights, trainer


def test_resuming_mid_epoch_gives_the_same_weights_and_history(tmp_path: Path) -> None:
    straight = trainer()
    expected = straight.fit(pipes()[0], epochs=3)

    first = trainer(callbacks=[ss.Checkpoint(tmp_path, every_steps=7)])
    assert first.fit(pipes()[0], epochs=3, steps=100).stopped_by == "steps"
    again = trainer(cnn(seed=5), callbacks=[ss.Checkpoint(tmp_path, every_steps=7)])
    history = again.fit(pipes()[0], epochs=3, resume=tmp_path)
    assert same_weights(again.model, straight.model)
    assert history.epochs == expected.epochs


def test_resuming_from_an_epoch_boundary(tmp_path: Path) -> None:
    straight = trainer()
    straight.fit(pipes()[0], val=pipes()[1], epochs=2)
    trainer(callbacks=[ss.Checkpoint(tmp_path)]).fit(pipes()[0], val=pipes()[1], epochs=1)
    again = trainer(cnn(seed=3), callbacks=[ss.Checkpoint(tmp_path)])
    again.fit(pipes()[0], val=pipes()[1], epochs=2, resume=tmp_path)
    assert same_weights(again.model, straight.model)


def test_an_empty_run_directory_starts_fresh(tmp_path: Path) -> None:
    history = trainer().fit(pipes(n=64)[0], resume=tmp_path)
    assert history.steps == 2


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_run_that_would_mix_its_checkpoints_with_another_is_refused(tmp_path: Path) -> None:
    trainer(callbacks=[ss.Checkpoint(tmp_path, every_steps=2)]).fit(pipes(n=128)[0])
    before = files(tmp_path)
    again = trainer(callbacks=[ss.Checkpoint(tmp_path, every_steps=2)])
    with pytest.raises(
        ss.CheckpointError, match=r"up to step-0+4 and this run starts afresh.*resume="
    ):
        again.fit(pipes(n=128)[0])
    with pytest.raises(ss.CheckpointError, match=r"resumed from .*step-0+2', not from .*latest"):
        again.fit(pipes(n=128)[0], resume=tmp_path / "step-000000002")
    assert files(tmp_path) == before  # nothing of the first run lost or changed


def test_a_checkpoint_latest_never_named_is_redone_on_resume(tmp_path: Path) -> None:
    straight = trainer()
    straight.fit(pipes(n=128)[0])
    trainer(callbacks=[ss.Checkpoint(tmp_path, every_steps=2)]).fit(pipes(n=128)[0], steps=2)
    # a save that crashed between renaming its directory into place and replacing ``latest``
    # (here with other weights): the resumed run must not take it for its own
    other = trainer(cnn(seed=9), callbacks=[ss.Checkpoint(tmp_path / "other", every_steps=4)])
    other.fit(pipes(n=128)[0])
    (tmp_path / "other" / "step-000000004").rename(tmp_path / "step-000000004")
    again = trainer(cnn(seed=3), callbacks=[ss.Checkpoint(tmp_path, every_steps=2)])
    assert again.fit(pipes(n=128)[0], resume=tmp_path).steps == 4
    assert same_weights(again.model, straight.model)
    assert same_weights(ss.load_weights(tmp_path, cnn(seed=3)), straight.model)


def test_keep_prunes_and_best_is_kept(tmp_path: Path) -> None:
    cb = ss.Checkpoint(tmp_path, every_steps=5, keep=2, monitor="val_acc")
    trainer(callbacks=[cb]).fit(pipes(n=320)[0], val=pipes()[1], epochs=3)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-"))
    best = (tmp_path / "best").read_text().strip()
    latest = (tmp_path / "latest").read_text().strip()
    assert latest == names[-1] and best in names and len(names) <= 3
    meta = json.loads((tmp_path / latest / "trainer.json").read_text())
    assert meta["config"]["strategy"] == "single" and meta["step"] == 30


def test_a_pickle_payload_is_refused(tmp_path: Path) -> None:
    trainer(callbacks=[ss.Checkpoint(tmp_path)]).fit(pipes(n=64)[0])
    target = tmp_path / (tmp_path / "latest").read_text().strip() / "state.pt"
    torch.save({"payload": Evil()}, target)
    with pytest.raises(ss.CheckpointError, match=r"pickled Python object.*refuses"):
        trainer(callbacks=[ss.Checkpoint(tmp_path)]).fit(pipes(n=64)[0], resume=tmp_path)


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this would run on load",))


def test_load_weights_checks_the_architecture(tmp_path: Path) -> None:
    t = trainer(callbacks=[ss.Checkpoint(tmp_path)])
    t.fit(pipes(n=64)[0])
    assert same_weights(ss.load_weights(tmp_path, cnn(seed=9)), t.model)
    with pytest.raises(ss.CheckpointError, match=r"do not fit this model.*missing"):
        ss.load_weights(tmp_path, torch.nn.Linear(3, 3))
    with pytest.raises(ss.CheckpointError, match="neither a checkpoint"):
        ss.load_weights(tmp_path / "nowhere", cnn())


RUN = r"""
import json, os, signal, sys
import torch
import slipstream as ss
from tests.train.helpers import cnn, pipes

run, log, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])

class Record(ss.Trainer):
    def train_step(self, batch):
        with open(log, "a") as f:
            f.write(json.dumps([self.updates, batch[1].tolist()]) + "\n")
        return super().train_step(batch)

class Kill(ss.Callback):
    def on_fit_start(self, fit):
        fit.trainer.updates = fit.step

    def on_step_end(self, fit):
        fit.trainer.updates = fit.step
        if fit.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

t = Record(cnn(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
           loss=torch.nn.functional.cross_entropy, deterministic=True,
           callbacks=[Kill(), ss.Checkpoint(run, every_steps=4)])
t.updates = 0
t.fit(pipes()[0], epochs=2, resume=run)
ss.load_weights(run, cnn())
torch.save(t.model.state_dict(), os.path.join(run, "final.pt"))
"""


def _run(tmp_path: Path, run: Path, log: Path, kill_at: int) -> int:
    script = tmp_path / "run.py"
    script.write_text(RUN)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    proc = subprocess.run(
        [sys.executable, str(script), str(run), str(log), str(kill_at)], env=env, timeout=240
    )
    return proc.returncode


def _steps(log: Path) -> dict[int, list[int]]:
    seen: dict[int, list[int]] = {}
    for line in log.read_text().splitlines():
        step, labels = json.loads(line)
        seen[step] = labels  # a replayed step overwrites what the killed run logged
    return seen


@pytest.mark.integration
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path: Path) -> None:
    kill_at = random.Random().randint(5, 90)
    assert _run(tmp_path, tmp_path / "a", tmp_path / "a.log", -1) == 0
    assert _run(tmp_path, tmp_path / "b", tmp_path / "b.log", kill_at) == -signal.SIGKILL
    assert _run(tmp_path, tmp_path / "b", tmp_path / "b.log", -1) == 0
    a = torch.load(tmp_path / "a" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a), f"weights differ after a kill at {kill_at}"
    assert _steps(tmp_path / "a.log") == _steps(tmp_path / "b.log")


WRITER = r"""
import sys
import slipstream as ss
from tests.train.helpers import pipes, trainer
every_step = ss.Checkpoint(sys.argv[1], every_steps=1, keep=2)
trainer(callbacks=[every_step]).fit(pipes(batch=4)[0], epochs=50)
"""


@pytest.mark.integration
def test_sigkill_during_checkpoint_writes_leaves_latest_complete(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    run = tmp_path / "run"
    rng = random.Random()
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(run)], env=env)
        deadline = time.monotonic() + 60
        while not (run / "latest").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # waiting for the child's first checkpoint to appear on disk
        time.sleep(rng.uniform(0.0, 0.5))  # land the kill at a random moment of the writing
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        model = ss.load_weights(run, cnn(seed=1))  # raises unless latest is complete
        assert model is not None
    t = trainer(callbacks=[ss.Checkpoint(run, every_steps=1, keep=2)])
    t.fit(pipes(batch=4)[0], epochs=50, steps=t_steps(run) + 1, resume=run)
    assert not list(run.glob(".*tmp-*")), "a resumed run removes what a killed writer left"


def t_steps(run: Path) -> int:
    return int(json.loads((ss.train._checkpoint.resolve(run) / "trainer.json").read_text())["step"])
