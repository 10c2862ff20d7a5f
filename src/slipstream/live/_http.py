"""What the dashboard and the prediction server share: the bind rule, the request guard, and
running a uvicorn server on a socket bound before it starts (so its URL is known and connections
wait in the backlog instead of being refused: nothing has to poll for readiness).

The bind rule: loopback by default; any other address needs a token, and then every request
without it is refused (401). Whatever the address, a request whose ``Host`` header is not one of
the server's own names is refused (403): a page on another site that rebinds its DNS name to
127.0.0.1 cannot read the server.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from slipstream._core.errors import ArgumentError, LifecycleError
from slipstream._core.extras import require

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, what: str) -> None:
    """Refuse to expose ``what`` beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise ArgumentError(
            f"{what} on host={host!r} would answer anyone who can reach this machine; pass a "
            "token (token=... / --token ...) that every request must carry, or bind 127.0.0.1"
        )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this (Linux): without it, a response's head and body go out
    # as two segments and the second waits for the client's delayed ACK (40 ms a request).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ArgumentError(f"cannot listen on {host}:{port}: {e}; choose another port") from e
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def allowed_hosts(host: str, port: int, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The ``Host`` headers a server on ``host:port`` accepts (``None``: any, for a wildcard
    bind, which the token guards)."""
    if host in ("0.0.0.0", "::", ""):
        return None
    names = {host, f"[{host}]" if ":" in host else host}
    if is_loopback(host):
        names |= {"localhost", "127.0.0.1", "[::1]"}
    return frozenset({*(f"{n}:{port}" for n in names), *extra})


async def respond(send: Send, status: int, body: dict[str, Any]) -> None:
    """A JSON answer."""
    await respond_bytes(send, status, json.dumps(body).encode(), "application/json")


async def respond_bytes(send: Send, status: int, data: bytes, content_type: str) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(data)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class Guard:
    """ASGI middleware: the ``Host`` check and the token (``Authorization: Bearer <token>``, or
    ``?token=<token>`` for a browser's first page load)."""

    def __init__(self, app: App, hosts: frozenset[str] | None, token: str | None) -> None:
        self.app, self.hosts, self.token = app, hosts, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if self.hosts is not None and host not in self.hosts:
            return await respond(
                send,
                403,
                {
                    "error": f"Host header {host!r} is not this server's; use one of "
                    f"{sorted(self.hosts)}",
                },
            )
        if self.token and not self._authorized(scope, headers):
            return await respond(
                send,
                401,
                {
                    "error": "this server needs its token: send 'Authorization: Bearer <token>' "
                    "or add ?token=<token> to the URL",
                },
            )
        return await self.app(scope, receive, send)

    def _authorized(self, scope: Scope, headers: dict[bytes, bytes]) -> bool:
        assert self.token is not None
        given = headers.get(b"authorization", b"").decode("latin-1").removeprefix("Bearer ")
        if not given:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given = (query.get("token") or [""])[0]
        return hmac.compare_digest(given.encode(), self.token.encode())


class Served:
    """A uvicorn server running ``app`` on a thread of this process, on ``sock`` (bound by
    :func:`bind`). ``url`` is known at once; ``close()`` stops it and joins the thread."""

    def __init__(self, app: App, sock: socket.socket, *, name: str) -> None:
        uvicorn = require("uvicorn", feature=name)
        self.sock = sock
        self.url = url_of(sock)
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name=name, daemon=True
        )
        self.thread.start()

    def close(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True  # uvicorn checks it on its next tick (every 0.1 s)
        self.thread.join(timeout)
        self.sock.close()
        if self.thread.is_alive():
            raise LifecycleError(f"the server at {self.url} did not stop within {timeout:g} s")
