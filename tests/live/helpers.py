"""Models, runs and HTTP helpers the live tests share."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import slipstream as ss
from tests.train.helpers import digits, pipes


class DigitsNet(torch.nn.Sequential):
    """The digits CNN as a class a server can build from the run's record (no arguments)."""

    def __init__(self) -> None:
        super().__init__(
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(8 * 64, 10),
        )


class Linear2(torch.nn.Sequential):
    """A two-feature classifier for the drift stream (no arguments)."""

    def __init__(self) -> None:
        super().__init__(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))


def train_digits(run: Path, *, epochs: int = 2, **live: Any) -> ss.History:
    """Train DigitsNet on digits with a Live feed in ``run`` (publishing every 10 steps)."""
    live.setdefault("publish_every_steps", 10)
    live.setdefault("console", False)
    torch.manual_seed(0)
    trainer = ss.Trainer(
        DigitsNet(),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        loss=torch.nn.functional.cross_entropy,
        metrics={"acc": ss.metrics.accuracy},
        live=ss.Live(run, **live),
    )
    train, test = pipes()
    return trainer.fit(train, val=test, epochs=epochs)


def records(run: Path, kind: str | None = None) -> list[dict[str, Any]]:
    lines = (run / "events.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["kind"] == kind]


def request(
    url: str,
    path: str,
    body: bytes | None = None,
    *,
    method: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """One HTTP request on a fresh connection: ``(status, JSON body)``."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method or ("GET" if body is None else "POST"), path, body, headers or {})
        resp = conn.getresponse()
        data = resp.read()
        ctype = resp.getheader("content-type", "")
        return resp.status, json.loads(data) if "json" in ctype else {"raw": data}
    finally:
        conn.close()


def predict(url: str, inputs: Any) -> tuple[int, dict[str, Any]]:
    body = json.dumps({"inputs": inputs}).encode()
    return request(url, "/predict", body, headers={"Content-Type": "application/json"})


def raw_exchange(url: str, head: bytes, body: bytes = b"") -> bytes:
    """Send ``head`` and ``body`` on a raw socket; return what the server answers."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


def wait_for(what: str, check: Any, timeout: float = 60.0) -> Any:
    """Poll ``check()`` until it returns something truthy (test harness only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def digit_samples(n: int = 16) -> np.ndarray:
    x, _ = digits()
    return x[1500 : 1500 + n]


def drift_stream(switch_at: int, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless samples of two features; the label is ``x0 > 0`` before ``switch_at`` samples,
    ``x0 < 0`` after (the rule flips: concept drift)."""
    rng = np.random.default_rng(seed)
    i = 0
    while True:
        x = rng.standard_normal(2).astype(np.float32)
        label = int(x[0] > 0) if i < switch_at else int(x[0] < 0)
        yield x, np.int64(label)
        i += 1


def train_stream(
    run: Path,
    *,
    steps: int | None = None,
    switch_at: int = 10**12,
    strategy: str = "single",
    **live: Any,
) -> ss.History:
    """Train Linear2 on the endless drift stream (until ``steps``, or a signal), with a Live
    feed and a Checkpoint in ``run``; prints how it stopped."""
    live.setdefault("console", False)
    torch.manual_seed(0)
    trainer = ss.Trainer(
        Linear2(),
        optimizer=lambda p: torch.optim.Adam(p, lr=0.01),
        loss=torch.nn.functional.cross_entropy,
        metrics={"acc": ss.metrics.accuracy},
        strategy=strategy,
        workers=None if strategy == "single" else 2,
        callbacks=[ss.Checkpoint(run / "checkpoints", every_steps=100, keep=2)],
        live=ss.Live(run, **live),
    )
    pipe = ss.from_iterable(drift_stream(switch_at)).batch(64)
    history = trainer.fit(pipe, steps=steps)
    print(f"stopped_by={history.stopped_by} steps={history.steps}", flush=True)
    return history
