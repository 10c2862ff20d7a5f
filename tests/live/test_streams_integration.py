"""Training on an unbounded stream: prequential figures, live weights that follow a drifting
concept, a clean stop on SIGINT/SIGTERM with a final checkpoint, and flat memory."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

import slipstream as ss
from tests.live.helpers import predict, records, wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _stream_child(run: Path, ignore_sigint: bool = False, **kw: Any) -> subprocess.Popen[str]:
    args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    code = (
        "import sys; from pathlib import Path; from tests.live.helpers import train_stream; "
        f"train_stream(Path(sys.argv[1]), {args})"
    )
    # SIGINT as `nohup … &` leaves it (ignored), or as a terminal's shell does: a test runner
    # started in the background without job control would pass on an ignored SIGINT
    sigint = "signal.SIG_IGN" if ignore_sigint else "signal.default_int_handler"
    code = f"import signal; signal.signal(signal.SIGINT, {sigint}); {code}"
    return subprocess.Popen(
        [sys.executable, "-c", code, str(run)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def _trained_steps(run: Path) -> int:
    path = run / "events.jsonl"
    text = path.read_text() if path.exists() else ""
    lines = [json.loads(x) for x in text.splitlines()[:-1]]  # the last may be mid-write
    return max((r["step"] for r in lines if r["kind"] == "train"), default=0)


def test_the_served_model_follows_a_drifting_stream(tmp_path: Path) -> None:
    switch = 600  # steps of 64 samples before the label rule flips
    proc = _stream_child(
        tmp_path, steps=1500, switch_at=64 * switch, publish_every_steps=10, record_every=5
    )
    rng = np.random.default_rng(1)
    probe = rng.standard_normal((512, 2)).astype(np.float32)
    old_rule, new_rule = (probe[:, 0] > 0), (probe[:, 0] < 0)
    served: list[tuple[int, float, float, bool]] = []  # version, old/new rule accuracy, live
    try:
        wait_for("a published version", lambda: _trained_steps(tmp_path) >= 20)
        with ss.serve(tmp_path, port=0) as server:
            while True:
                running = proc.poll() is None
                status, body = predict(server.url, probe.tolist())
                assert status == 200
                predicted = np.argmax(body["outputs"], axis=1).astype(bool)
                old, new = (float((predicted == rule).mean()) for rule in (old_rule, new_rule))
                served.append((body["version"], old, new, running))
                if not running:
                    break
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    before = [old for v, old, _, _ in served if 100 <= v < switch]
    after_live = [new for v, _, new, live in served if v > switch + 200 and live]
    assert before and min(before) > 0.9  # the served model learned the first rule
    assert after_live and min(after_live) > 0.9, "the served model did not follow the drift"
    # the prequential curve: each batch scored before it is learned from
    acc = {r["step"]: r["acc"] for r in records(tmp_path, "train")}
    assert np.mean([a for s, a in acc.items() if switch - 200 < s <= switch]) > 0.95
    assert min(a for s, a in acc.items() if switch < s <= switch + 20) < 0.5  # the drift
    assert np.mean([a for s, a in acc.items() if s > switch + 500]) > 0.95  # recovered


@pytest.mark.parametrize(
    ("sig", "strategy", "ignore_sigint"),
    [
        (signal.SIGTERM, "single", False),
        (signal.SIGINT, "single", False),
        (signal.SIGINT, "ddp", False),
        (signal.SIGTERM, "single", True),  # started by `nohup … &`, SIGINT ignored
        (signal.SIGTERM, "ddp", True),
    ],
)
def test_a_signal_stops_an_endless_stream_with_a_final_checkpoint(
    tmp_path: Path, sig: signal.Signals, strategy: str, ignore_sigint: bool
) -> None:
    # under ddp the signal goes to the process that spawned the ranks: it passes it on
    proc = _stream_child(
        tmp_path, ignore_sigint, steps=None, publish_every_steps=50, strategy=strategy
    )
    try:
        wait_for("training to get going", lambda: _trained_steps(tmp_path) >= 200)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert f"stopped_by=signal {sig.name}" in out
    steps = int(out.split("steps=")[1])
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{steps:09d}"  # the final state, saved as the run stopped
    saved = json.loads((tmp_path / "checkpoints" / latest / "trainer.json").read_text())
    assert saved["step"] == steps
    end = records(tmp_path, "status")[-1]
    assert end["reason"] == f"signal {sig.name}"
    assert records(tmp_path, "weights")[-1]["version"] == steps


class _Memory(ss.Callback):
    def __init__(self) -> None:
        self.rss: dict[int, int] = {}

    def on_step_end(self, fit: Any) -> None:
        if fit.step in (1000, 6000):
            self.rss[fit.step] = psutil.Process().memory_info().rss


def test_memory_stays_flat_on_a_long_stream(tmp_path: Path) -> None:
    import torch

    from tests.live.helpers import Linear2, drift_stream

    memory = _Memory()
    trainer = ss.Trainer(
        Linear2(),
        optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
        loss=torch.nn.functional.cross_entropy,
        metrics={"acc": ss.metrics.accuracy},
        callbacks=[memory],
        live=ss.Live(tmp_path, console=False, publish_every_steps=50, record_every=10),
    )
    history = trainer.fit(ss.from_iterable(drift_stream(10**12)).batch(64), steps=6000)
    assert history.steps == 6000
    growth = memory.rss[6000] - memory.rss[1000]
    assert growth < 16 << 20, f"RSS grew {growth / 2**20:.1f} MiB over 5000 steps"
