"""The web dashboard: one page of live plots, fed by server-sent events read off runs' JSONL files.

The dashboard only reads the files a run writes, so it can replay a finished run, follow a live
one, compare several, and die without the run noticing. ``Live(dashboard=True)`` starts it as a
child process (:class:`DashboardProcess`); ``slipstream dashboard RUN…`` runs it in the
foreground (:func:`serve_dashboard`).
"""

from __future__ import annotations

import asyncio
import os
import select
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from pathlib import Path

from slipstream._core.errors import ArgumentError, LifecycleError
from slipstream._core.extras import require
from slipstream.live._http import App, Guard, allowed_hosts, bind, check_bind, url_of

POLL_S = 0.1  # how often a follower looks for new lines once it has read everything
_CHUNK = 1 << 20


class Follower:
    """Complete lines of every ``events*.jsonl`` in some run directories, read from the start
    and then as they grow (``tail -f`` over a set of files). Used by one event stream."""

    def __init__(self, runs: Sequence[Path]) -> None:
        self.runs = list(runs)
        self.offsets: dict[Path, int] = {}
        self.partial: dict[Path, bytes] = {}

    def read(self) -> list[bytes]:
        lines: list[bytes] = []
        for run in self.runs:
            for path in sorted(run.glob("events*.jsonl")):
                lines.extend(self._read(path))
        return lines

    def _read(self, path: Path) -> list[bytes]:
        offset = self.offsets.get(path, 0)
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read(_CHUNK)
        except FileNotFoundError:
            return []
        self.offsets[path] = offset + len(chunk)
        data = self.partial.pop(path, b"") + chunk
        *lines, rest = data.split(b"\n")
        if rest:
            self.partial[path] = rest  # a line still being written
        return [line for line in lines if line.strip()]


def app(runs: Sequence[Path], *, hosts: frozenset[str] | None, token: str | None) -> App:
    """The dashboard's ASGI app for ``runs`` behind the host and token guard."""
    require("starlette", feature="the dashboard")
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    page = resources.files("slipstream.live").joinpath("dashboard.html").read_text()

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def run_list(request: Request) -> Response:
        return JSONResponse({"runs": [str(r) for r in runs]})

    async def events(request: Request) -> Response:
        return StreamingResponse(
            _stream(Follower(runs), request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    routes = [Route("/", index), Route("/runs", run_list), Route("/events", events)]
    return Guard(Starlette(routes=routes), hosts, token)


async def _stream(follower: Follower, request: object) -> AsyncIterator[bytes]:
    quiet_since = time.monotonic()
    while True:
        lines = follower.read()
        if lines:
            yield b"".join(b"data: " + line + b"\n\n" for line in lines)
            quiet_since = time.monotonic()
            continue
        if await request.is_disconnected():  # type: ignore[attr-defined]
            return
        if time.monotonic() - quiet_since > 15:
            yield b": still here\n\n"  # keeps proxies from closing an idle stream
            quiet_since = time.monotonic()
        await asyncio.sleep(POLL_S)  # a file tail: wait for the run to write more


def _check_runs(runs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    paths = [Path(r) for r in runs]
    if not paths:
        raise ArgumentError("the dashboard needs at least one run directory")
    for p in paths:
        if p.exists() and not p.is_dir():
            raise ArgumentError(f"run {str(p)!r} is a file; pass the run's directory")
    return paths


def serve_dashboard(
    runs: Sequence[str | os.PathLike[str]],
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    token: str | None = None,
) -> None:
    """Serve the dashboard for ``runs`` until interrupted (prints the URL when it listens)."""
    uvicorn = require("uvicorn", feature="the dashboard")
    paths = _check_runs(runs)
    check_bind(host, token, "the dashboard")
    sock = bind(host, port)
    port = sock.getsockname()[1]
    url = url_of(sock) + "/" + (f"?token={token}" if token else "")
    print(f"dashboard: {url}", flush=True)
    config = uvicorn.Config(
        app(paths, hosts=allowed_hosts(host, port), token=token),
        log_level="warning",
        lifespan="off",
    )
    uvicorn.Server(config).run(sockets=[sock])


class DashboardProcess:
    """The dashboard in a child process (what ``Live(dashboard=True)`` starts): its URL is read
    from the child's first line of output; ``close()`` stops it."""

    def __init__(
        self,
        runs: Sequence[Path],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        check_bind(host, token, "the dashboard")
        cmd = [
            sys.executable,
            "-m",
            "slipstream.cli",
            "dashboard",
            *map(str, runs),
            "--host",
            host,
            "--port",
            str(port),
        ]
        if token:
            cmd += ["--token", token]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.url = self._first_line(timeout).removeprefix("dashboard: ").strip()

    def _first_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)  # waits for its URL
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("dashboard: "):
            self.close()
            raise LifecycleError(
                f"the dashboard did not start within {timeout:g} s "
                f"(exit code {self.proc.poll()}); run `slipstream dashboard RUN` to see why"
            )
        return line

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
