"""``ss.serve`` / ``slipstream serve RUN``: predictions from the newest published weights.

The server rebuilds the model from the run's ``live.json`` (or takes one), and before each
prediction swaps in the newest version from the run's shared-memory store (same machine) or its
``weights/`` files (anywhere else). Predictions run one at a time on one inference thread, so a
swap always falls between two requests; requests waiting for it are counted and beyond
``max_concurrency`` answered 429.

Endpoints: ``POST /predict`` (JSON ``{"inputs": [...]}``, or a safetensors body with an
``inputs`` tensor for speed), ``GET /health``, ``GET /version``, ``POST /pin`` (``{"version":
n}``), ``POST /unpin``, ``POST /rollback``. Every bad request gets a 4xx and a message saying what
was wrong; none gets a 5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from slipstream._core.errors import ArgumentError, LifecycleError, SlipstreamError
from slipstream._core.extras import require
from slipstream.live._http import (
    Guard,
    Receive,
    Scope,
    Send,
    Served,
    allowed_hosts,
    bind,
    check_bind,
    respond_bytes,
)
from slipstream.live._http import respond as respond_json
from slipstream.live._live import RUN_FILE, WEIGHTS_DIR
from slipstream.live._weights import Snapshot, WeightFiles, WeightStore, slots_from

SAFETENSORS = "application/x-safetensors"


class BadRequest(SlipstreamError):
    """A request the server refuses; ``status`` is its 4xx code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def load_model(spec: str) -> torch.nn.Module:
    """Build a model from ``"package.module:factory"`` (a class or a function, no arguments)."""
    module_name, _, attr = spec.partition(":")
    hint = "pass model='package.module:factory' (a function that builds it) to ss.Live or --model"
    if module_name == "__main__" or not attr:
        raise ArgumentError(
            f"the run recorded the model as {spec!r}, which cannot be imported; {hint}"
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        model = obj()
    except (ImportError, AttributeError, TypeError) as e:
        raise ArgumentError(f"cannot build the model {spec!r}: {e}; {hint}") from e
    if not isinstance(model, torch.nn.Module):
        raise ArgumentError(f"{spec!r} built a {type(model).__name__}, not a torch.nn.Module")
    return model


class Weights:
    """Where the server gets versions: the run's store when it is alive, else its files. A
    restarted run (a resume, a new fit) makes a new store: ``live.json`` is looked at again
    when it changes (at most twice a second) and the new store attached."""

    def __init__(self, run: Path, info: Mapping[str, Any]) -> None:
        self.run_file = run / RUN_FILE
        self.files = WeightFiles(run / WEIGHTS_DIR)
        self.store: WeightStore | None = None
        self.fresh = False
        self._attach(info)
        self._mtime = self._stamp()
        self._files_checked = self._run_checked = 0.0

    def _stamp(self) -> float:
        try:
            return self.run_file.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _attach(self, info: Mapping[str, Any]) -> None:
        described = info.get("store")
        if described is None or (self.store is not None and self.store.name == described["name"]):
            return
        with contextlib.suppress(LifecycleError):  # its run has ended: files serve
            store = WeightStore.attach(described["name"], slots_from(described["layout"]))
            self.close()
            self.store = store
            self.fresh = True  # a new run's versions count from its own start

    @property
    def source(self) -> str:
        return "shared memory" if self.store is not None else "files"

    def newer(self, than: int) -> Snapshot | None:
        """The newest version if it is newer than ``than``."""
        now = time.monotonic()
        if now - self._run_checked > 0.5 and self._stamp() != self._mtime:
            self._run_checked, self._mtime = now, self._stamp()
            with contextlib.suppress(json.JSONDecodeError, OSError):
                self._attach(json.loads(self.run_file.read_text()))
        if self.store is not None and (self.store.version > than or self.fresh):
            snap = self.store.read()
            self.fresh = self.fresh and snap is None
            return snap
        if self.store is not None and self.store.version >= 0:
            return None
        if now - self._files_checked < 0.2:  # files: look at the directory 5 times a second
            return None
        self._files_checked = now
        versions = self.files.versions()
        return self.files.read(versions[-1]) if versions and versions[-1] > than else None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


class Predictor:
    """The model, its weights' version, pinning and rollback. Touched only by the inference
    thread (and by the constructor)."""

    def __init__(self, run: Path, model: torch.nn.Module | str | None, pin: int | None) -> None:
        info_path = run / RUN_FILE
        if not info_path.is_file():
            raise ArgumentError(
                f"no {RUN_FILE} in {str(run)!r}: serve a run trained with "
                "live=ss.Live(dir, publish_every_steps=...)"
            )
        self.info = json.loads(info_path.read_text())
        spec = model if model is not None else self.info.get("model")
        self.model = load_model(spec) if isinstance(spec, str) else spec
        if not isinstance(self.model, torch.nn.Module):
            raise ArgumentError("`model` must be a torch.nn.Module or 'package.module:factory'")
        self.model.eval()
        self.inputs = self.info.get("inputs")
        self.weights = Weights(run, self.info)
        self.current: Snapshot | None = None
        self.previous: Snapshot | None = None
        self.pinned = False
        if pin is not None:
            self.pin(pin)
        else:
            self.refresh()

    @property
    def version(self) -> int:
        """The served version (-1 before the first)."""
        return -1 if self.current is None else self.current.version

    def refresh(self) -> None:
        """Swap in the newest version, unless pinned (between two predictions)."""
        if not self.pinned and (snap := self.weights.newer(self.version)) is not None:
            self._load(snap)

    def _load(self, snap: Snapshot) -> None:
        try:
            self.model.load_state_dict(snap.tensors)
        except RuntimeError as e:
            raise ArgumentError(
                f"version {snap.version}'s weights do not fit the model "
                f"{type(self.model).__name__}: {str(e).strip()[:300]}; pass the run's model "
                "(model=... / --model package.module:factory)"
            ) from e
        if self.current is not None and self.current.version != snap.version:
            self.previous = self.current
        self.current = snap

    def pin(self, version: int) -> None:
        snap = self.weights.files.read(version)  # raises naming the versions on disk
        assert snap is not None
        self._load(snap)
        self.pinned = True

    def rollback(self) -> None:
        if self.previous is None:
            raise BadRequest(409, "there is no previous version to roll back to")
        self._load(self.previous)
        self.pinned = True

    def status(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "age_s": None if self.current is None else time.time() - self.current.published,
            "pinned": self.pinned,
            "previous": None if self.previous is None else self.previous.version,
            "source": self.weights.source,
        }

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.refresh()
        if self.version < 0:
            raise BadRequest(503, "no weights published yet; retry when the run has published")
        out: torch.Tensor = self.model(x)
        return out


def check_inputs(x: torch.Tensor, spec: Mapping[str, Any] | None, max_batch: int) -> torch.Tensor:
    """``x`` as a batch the model takes, or :class:`BadRequest` saying what is wrong."""
    if spec is None or "shape" not in spec:
        if x.ndim == 0:
            raise BadRequest(422, "`inputs` must be an array, not a single number")
        return x
    shape, dtype = list(spec["shape"]), getattr(torch, spec["dtype"])
    if list(x.shape) == shape:
        x = x.unsqueeze(0)  # one sample
    if list(x.shape[1:]) != shape:
        raise BadRequest(
            422,
            f"`inputs` has shape {list(x.shape)}; this model takes {shape} per sample, "
            f"or a batch [n, {', '.join(map(str, shape))}]",
        )
    if x.shape[0] == 0 or x.shape[0] > max_batch:
        raise BadRequest(422, f"a batch holds 1 to {max_batch} samples; got {x.shape[0]}")
    fractions = x.dtype.is_floating_point and not dtype.is_floating_point
    if fractions and not bool((x == x.round()).all()):
        raise BadRequest(422, f"this model takes {spec['dtype']} inputs; got fractions")
    if x.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
        raise BadRequest(422, "`inputs` holds NaN or infinity")
    return x.to(dtype)


def parse_json(body: bytes) -> torch.Tensor:
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(400, f'the body is not JSON ({e}); send {{"inputs": [...]}}') from e
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise BadRequest(422, 'send a JSON object with an `inputs` array: {"inputs": [...]}')
    try:
        x = torch.tensor(doc["inputs"])
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise BadRequest(
            422, f"`inputs` must be a rectangular array of numbers: {str(e)[:200]}"
        ) from e
    if x.dtype == torch.bool:
        raise BadRequest(422, "`inputs` must hold numbers, not booleans")
    return x


def parse_safetensors(body: bytes) -> torch.Tensor:
    try:
        tensors = load_safetensors(body)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as e:
        raise BadRequest(400, f"the body is not a safetensors file: {str(e)[:200]}") from e
    if "inputs" not in tensors:
        raise BadRequest(
            422, f"the safetensors body needs a tensor named 'inputs'; got {sorted(tensors)}"
        )
    x = tensors["inputs"]
    if x.dtype == torch.bool or x.is_complex():
        raise BadRequest(422, f"`inputs` must be a real number tensor; got {x.dtype}")
    return x


class App:
    """The prediction server's ASGI app (a plain one: it reads bodies chunk by chunk, so an
    oversized body is refused before it is read)."""

    def __init__(
        self, predictor: Predictor, *, max_body_bytes: int, max_concurrency: int, max_batch: int
    ) -> None:
        self.p = predictor
        self.max_body, self.max_concurrency, self.max_batch = (
            max_body_bytes,
            max_concurrency,
            max_batch,
        )
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="slipstream-predict")
        self.in_flight = 0
        self.routes: dict[tuple[str, str], Callable[[bytes, str], Any]] = {
            ("POST", "/predict"): self.predict,
            ("GET", "/health"): lambda body, ct: {"ok": True, "version": self.p.version},
            ("GET", "/version"): lambda body, ct: self.p.status(),
            ("POST", "/pin"): self.pin,
            ("POST", "/unpin"): self.unpin,
            ("POST", "/rollback"): self.rollback,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.in_flight += 1
        try:
            await self._handle(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            route = self._route(scope)
            if self.in_flight > self.max_concurrency:
                raise BadRequest(429, f"over {self.max_concurrency} requests at once; retry later")
            headers = dict(scope["headers"])
            body = await self._body(headers, receive)
            ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip()
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(
                self.pool, route, body, ctype
            )  # the one model thread
        except BadRequest as e:
            return await respond_json(send, e.status, {"error": str(e)})
        except SlipstreamError as e:
            return await respond_json(send, 404, {"error": str(e)})
        if isinstance(result, bytes):
            return await respond_bytes(send, 200, result, SAFETENSORS)
        await respond_json(send, 200, result)

    def _route(self, scope: Scope) -> Callable[[bytes, str], Any]:
        key = (scope["method"], scope["path"])
        if key in self.routes:
            return self.routes[key]
        paths = sorted({p for _, p in self.routes})
        if any(p == scope["path"] for _, p in self.routes):
            raise BadRequest(405, f"{scope['method']} is not allowed on {scope['path']}")
        raise BadRequest(404, f"no {scope['path']!r} here; endpoints: {paths}")

    async def _body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            raise BadRequest(
                413,
                f"bodies are limited to {self.max_body} bytes; got {declared.decode('latin-1')}",
            )
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise BadRequest(400, "the client went away")
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise BadRequest(413, f"bodies are limited to {self.max_body} bytes")
            chunks.append(chunk)
            if not msg.get("more_body"):
                return b"".join(chunks)

    # -- routes (on the inference thread) ------------------------------------------------------

    def predict(self, body: bytes, ctype: str) -> Any:
        binary = ctype == SAFETENSORS
        x = parse_safetensors(body) if binary else parse_json(body)
        x = check_inputs(x, self.p.inputs, self.max_batch)
        try:
            y = self.p.predict(x)
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            if self.p.inputs is not None:
                raise  # the inputs matched the run's spec: this is the server's fault
            raise BadRequest(
                422, f"the model rejected inputs of shape {list(x.shape)}: {str(e)[:200]}"
            ) from e
        if binary:
            return save_safetensors({"outputs": y.contiguous()}, {"version": str(self.p.version)})
        return {"outputs": _jsonable(y.tolist()), "version": self.p.version}

    def pin(self, body: bytes, ctype: str) -> Any:
        try:
            version = json.loads(body)["version"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise BadRequest(422, 'send {"version": <n>} to pin a version') from e
        if not isinstance(version, int) or isinstance(version, bool):
            raise BadRequest(422, f"`version` must be an integer; got {version!r}")
        self.p.pin(version)
        return self.p.status()

    def unpin(self, body: bytes, ctype: str) -> Any:
        self.p.pinned = False
        self.p.refresh()
        return self.p.status()

    def rollback(self, body: bytes, ctype: str) -> Any:
        self.p.rollback()
        return self.p.status()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.p.weights.close()


def _jsonable(value: Any) -> Any:
    """Outputs as JSON: non-finite numbers become null (JSON has no NaN)."""
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


async def _respond_bytes(send: Send, data: bytes) -> None:
    headers = [
        (b"content-type", SAFETENSORS.encode()),
        (b"content-length", str(len(data)).encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class Server:
    """A running prediction server: ``url``, ``close()``; a context manager."""

    def __init__(self, app: App, served: Served) -> None:
        self.app, self.served, self.url = app, served, served.url

    def close(self) -> None:
        self.served.close()
        self.app.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    run: str | os.PathLike[str],
    *,
    model: torch.nn.Module | str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    pin: int | None = None,
    max_body_bytes: int = 16 << 20,
    max_concurrency: int = 64,
    max_batch: int = 4096,
) -> Server:
    """Serve predictions of ``run``'s newest weights on ``host:port`` (0: a free port), on a
    thread of this process; returns the running :class:`Server`.

    >>> with ss.serve("runs/digits", port=0) as server:
    ...     requests.post(server.url + "/predict", json={"inputs": x.tolist()})
    """
    require("uvicorn", feature="ss.serve")
    check_bind(host, token, "the prediction server")
    predictor = Predictor(Path(run), model, pin)
    app = App(
        predictor,
        max_body_bytes=max_body_bytes,
        max_concurrency=max_concurrency,
        max_batch=max_batch,
    )
    sock = bind(host, port)
    guard = Guard(app, allowed_hosts(host, sock.getsockname()[1]), token)
    return Server(app, Served(guard, sock, name="slipstream-serve"))
