"""The dashboard in a real headless Chromium: it loads, plots gain points while a run trains,
finished runs replay, runs compare; killing it leaves training alone."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import slipstream as ss
from slipstream.live._dashboard import DashboardProcess
from tests.live.helpers import records, request, train_digits

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [  # a root user, no GPU, and a closed network: no sandbox, nothing fetched at start
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail("Chromium is missing: `make test` installs Debian's chromium package")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def _points(page: Any, figure: str) -> int:
    return int(page.get_attribute(f'[data-figure="{figure}"]', "data-points") or 0)


def test_plots_gain_points_while_a_run_trains(tmp_path: Path, browser: Any) -> None:
    code = (
        "import sys; from pathlib import Path; from tests.live.helpers import train_digits; "
        "train_digits(Path(sys.argv[1]), epochs=12, record_every=2)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT)
    dash = DashboardProcess([tmp_path])
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(dash.url)
        page.wait_for_selector('[data-figure="loss"]', timeout=60_000)
        first = _points(page, "loss")
        page.wait_for_function(
            "n => +document.querySelector('[data-figure=loss]').dataset.points > n + 5",
            arg=first,
            timeout=60_000,
        )
        assert proc.poll() is None, "the run ended before the plot grew: nothing shown live"
        assert page.inner_text("#status") == "live"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-live.png"), full_page=True)
        assert proc.wait(120) == 0
        for figure in ("acc", "samples_per_s", "stall", "val_acc", "pipeline busy"):
            page.wait_for_selector(f'[data-figure="{figure}"]', timeout=30_000)
        stages = page.inner_text('[data-figure="pipeline items_per_s"] .legend')
        assert stages.startswith("read(arrays)"), stages  # one stage: a vectorised gather
    finally:
        proc.kill()
        proc.wait()
        dash.close()


def test_a_finished_run_replays_and_runs_compare(tmp_path: Path, browser: Any) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    train_digits(a, epochs=1, record_every=5)
    train_digits(b, epochs=1, record_every=5, publish_every_steps=None)
    dash = DashboardProcess([a, b])
    try:
        page = browser.new_page()
        page.goto(dash.url)
        expected = sum("loss" in r for run in (a, b) for r in records(run))  # train and epoch
        page.wait_for_selector('[data-figure="loss"]', timeout=30_000)
        page.wait_for_function(
            "n => +document.querySelector('[data-figure=loss]').dataset.points === n",
            arg=expected,
            timeout=30_000,
        )
        legend = page.inner_text('[data-figure="loss"] .legend')
        assert "a · main" in legend and "b · main" in legend
        page.screenshot(path=str(ARTIFACTS / "dashboard-compare.png"), full_page=True)
    finally:
        dash.close()


def test_the_advisors_trials_are_plotted(tmp_path: Path, browser: Any) -> None:
    from slipstream.tune import Trial
    from slipstream.tune._advisor import Probes, TuneResult
    from slipstream.tune._report import write_records

    start = {"threads": 2, "strategy": ("single", 1)}
    trials = [Trial(start, 1000.0), Trial({**start, "threads": 1}, 1500.0)]
    result = TuneResult(Probes(9e4, 1e3, 1e3, 1, "compute"), trials, trials[1], "converged", 9, 60)
    directory = write_records(result, tmp_path / "run" / "tune").parent
    dash = DashboardProcess([directory])
    try:
        page = browser.new_page()
        page.goto(dash.url)
        page.wait_for_function(
            "() => +(document.querySelector('[data-figure=\"trial samples_per_s\"]')"
            "?.dataset.points) === 2",
            timeout=30_000,
        )
        assert "advisor trials 1500" in page.inner_text(
            '[data-figure="trial samples_per_s"] .legend'
        )
    finally:
        dash.close()


def test_the_dashboard_guards_host_and_token(tmp_path: Path) -> None:
    train_digits(tmp_path, epochs=1)
    dash = DashboardProcess([tmp_path])
    try:
        assert request(dash.url.rstrip("/"), "/runs")[0] == 200
        assert request(dash.url.rstrip("/"), "/runs", headers={"Host": "rebound.example"})[0] == 403
    finally:
        dash.close()
    with pytest.raises(ss.ArgumentError, match="token"):
        DashboardProcess([tmp_path], host="0.0.0.0")
    dash = DashboardProcess([tmp_path], host="0.0.0.0", token="t0k")
    try:
        port = dash.url.split(":")[2].split("/")[0]
        assert "?token=t0k" in dash.url
        assert request(f"http://127.0.0.1:{port}", "/runs")[0] == 401
        assert request(f"http://127.0.0.1:{port}", "/runs?token=t0k")[0] == 200
    finally:
        dash.close()


class _KillDashboard(ss.Callback):
    def __init__(self, live: ss.Live) -> None:
        self.live = live
        self.killed_at = -1

    def on_step_end(self, fit: Any) -> None:
        if fit.step == 20 and self.live.dashboard is not None:
            os.kill(self.live.dashboard.pid, signal.SIGKILL)
            self.killed_at = fit.step


def test_killing_the_dashboard_leaves_training_unaffected(tmp_path: Path) -> None:
    import torch

    from tests.live.helpers import DigitsNet
    from tests.train.helpers import pipes

    live = ss.Live(tmp_path, dashboard=True, console=False, record_every=5)
    killer = _KillDashboard(live)
    trainer = ss.Trainer(
        DigitsNet(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
        loss=torch.nn.functional.cross_entropy,
        callbacks=[killer],
        live=live,
    )
    try:
        train, _ = pipes()
        history = trainer.fit(train, epochs=2)
    finally:
        live.close()
    assert killer.killed_at == 20
    assert history.stopped_by == "epochs" and history.steps == 2 * 47
    assert records(tmp_path, "train")[-1]["step"] == 90  # records went on after the kill
