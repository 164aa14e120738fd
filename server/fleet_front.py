"""The owner-facing TLS front: Flower's Fleet routes, and nothing else, on the flower port.

The SuperLink serves its Fleet (SuperNodes), Control (``flwr`` CLI: start a run,
register nodes) and Runtime (ServerApp) APIs on one loopback port, and the
Control API has no authentication. Owners' SuperNodes reach the SuperLink through
this front, which terminates TLS with the home's certificate and forwards a
request only when

- its method is ``POST``, and
- its raw path is exactly one of the twelve Fleet routes (`FLEET_PATHS`),
  with no query string: no prefix match, no decoding, so ``/v1/fleet/../control``,
  ``%2e%2e``, doubled slashes and the like are refused, and
- its body is at most `MAX_BODY_BYTES` (objects travel in 5 MiB chunks).

Everything else is answered ``403`` with one line saying why: the Control API
(``/v1/control/*``, which ``flwr run`` uses), the Runtime API, ``/docs``,
``/openapi.json``, ``/health``. Forwarded requests go to the SuperLink over TLS
(verified against the home's CA) with only ``content-type``, ``accept`` and the
``flwr-*`` headers, which carry the SuperNode's signed timestamp; the SuperLink
checks that signature itself, so an unregistered SuperNode is still refused
(``401``) behind the front.

The front is an ASGI app served by uvicorn in a thread of the server process
(`free_server.asgi_thread`).
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from free_common.errors import FlowerError
from free_server.asgi_thread import AsgiThread, TlsListen

__all__ = [
    "FLEET_PATHS",
    "MAX_BODY_BYTES",
    "FleetFront",
    "FrontSettings",
    "NodesSeen",
    "refusal",
]

log = logging.getLogger("free_server.fleet_front")

FLEET_PATHS = frozenset(
    f"/v1/fleet/{name}".encode("ascii")
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
"""The Fleet API of flwr 1.41 (``flwr/superlink/routers/fleet/router.py``), all POST."""

MAX_BODY_BYTES = 8 * 1024 * 1024
"""A request body cap above Flower's 5 MiB object chunks plus framing."""

_FORWARDED_REQUEST_HEADERS = frozenset({b"content-type", b"accept"})
_PUBLIC_KEY_HEADER = "flwr-public-key"
"""Flower's HTTP header with the public key a SuperNode signs its calls with (base64)."""
_FORWARDED_RESPONSE_HEADERS = frozenset({"content-type"})

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def refusal(method: str, raw_path: bytes, query: bytes) -> str | None:
    """Return why the front refuses a request, or None when it forwards it."""
    if raw_path.startswith(b"/v1/control/"):
        return (
            "the Flower Control API is not served to owners: runs and node registrations are"
            " made by the aggregator on its own host"
        )
    if raw_path not in FLEET_PATHS or query:
        return "only Flower's Fleet API (SuperNodes) is served on this port"
    if method != "POST":
        return f"{method} is not allowed: the Fleet API takes POST only"
    return None


@dataclass(frozen=True)
class FrontSettings:
    """Where the front listens and where it forwards to.

    Attributes
    ----------
    host, port
        The owner-facing address (``network.listen`` and the flower port; 0 picks one).
    upstream_port
        The SuperLink's port on 127.0.0.1.
    cert, key
        The front's TLS certificate and key (the home's; owners trust ``ca.pem``).
    ca
        The CA that signed the SuperLink's certificate.
    upstream_timeout_s
        How long a forwarded call may take (pull-object carries 5 MiB).
    """

    host: str
    port: int
    upstream_port: int
    cert: Path
    key: Path
    ca: Path
    upstream_timeout_s: float = 120.0


class NodesSeen:
    """SuperNodes the SuperLink answered lately, by the public key their calls are signed with.

    Connected, as the operator sees it: a SuperNode whose signed call (heartbeats every
    few seconds, polls) the SuperLink answered with 200 within the window.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def saw(self, public_key: str) -> None:
        """Record an answered call signed with `public_key`."""
        with self._lock:
            self._last[public_key] = self._clock()

    def count(self, within_s: float) -> int:
        """Return how many SuperNodes had a call answered in the last `within_s` seconds."""
        since = self._clock() - within_s
        with self._lock:
            return sum(1 for seen in self._last.values() if seen >= since)


class _FleetApp:
    """The ASGI app: refuse, or forward to the SuperLink."""

    def __init__(self, settings: FrontSettings) -> None:
        self.settings = settings
        self.upstream = f"https://127.0.0.1:{settings.upstream_port}"
        self._client: httpx.AsyncClient | None = None
        self.nodes = NodesSeen()

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            context = ssl.create_default_context(cafile=str(self.settings.ca))
            timeout = httpx.Timeout(self.settings.upstream_timeout_s, connect=10.0)
            self._client = httpx.AsyncClient(verify=context, timeout=timeout)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        method: str = scope["method"]
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "replace")
        query: bytes = scope.get("query_string", b"")
        peer = scope.get("client") or ("?", 0)
        reason = refusal(method, raw_path, query)
        if reason is not None:
            log.warning(
                "refused %s %r from %s: %s", method, raw_path.decode("latin-1"), peer[0], reason
            )
            await _reply(send, 403, reason)
            return
        try:
            body = await _read_body(scope, receive)
        except _ClientGone:
            return
        if body is None:
            await _reply(send, 413, f"request body over {MAX_BODY_BYTES} bytes")
            return
        headers = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in _FORWARDED_REQUEST_HEADERS or name.startswith(b"flwr-")
        }
        try:
            upstream = await self.client().post(
                self.upstream + raw_path.decode("ascii"), content=body, headers=headers
            )
        except httpx.HTTPError as exc:
            log.error("the SuperLink did not answer %s: %s", raw_path.decode("ascii"), exc)
            await _reply(send, 502, "the aggregator's Flower SuperLink is not reachable now")
            return
        out = [
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in upstream.headers.items()
            if name in _FORWARDED_RESPONSE_HEADERS or name.startswith("flwr-")
        ]
        if upstream.status_code == 200 and _PUBLIC_KEY_HEADER in headers:
            self.nodes.saw(headers[_PUBLIC_KEY_HEADER])
        out.append((b"content-length", str(len(upstream.content)).encode("ascii")))
        await send({"type": "http.response.start", "status": upstream.status_code, "headers": out})
        await send({"type": "http.response.body", "body": upstream.content})


class _ClientGone(Exception):
    """The SuperNode hung up before its request body arrived."""


async def _read_body(scope: Scope, receive: Receive) -> bytes | None:
    """Read the whole body, or None once it exceeds `MAX_BODY_BYTES`."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > MAX_BODY_BYTES:
            return None
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _reply(send: Send, status: int, text: str) -> None:
    body = f"{text}\n".encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode("ascii")),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class FleetFront:
    """The owner-facing front, served in a background thread.

    Parameters
    ----------
    settings
        Address, upstream and TLS material.
    """

    name = "flower-front"

    def __init__(self, settings: FrontSettings) -> None:
        self.settings = settings
        self._app = _FleetApp(settings)
        listen = TlsListen(
            settings.host, settings.port, settings.cert, settings.key, "--flower-port"
        )
        self._serving = AsgiThread("Flower TLS front", self._app, listen, self._app.close)

    @property
    def port(self) -> int:
        """The port it listens on (the real one once started, when 0 was asked)."""
        return self._serving.port

    @property
    def nodes(self) -> NodesSeen:
        """The SuperNodes whose calls it forwarded lately."""
        return self._app.nodes

    @property
    def address(self) -> str:
        """``HOST:PORT`` the front listens on (the real port when 0 was asked)."""
        return self._serving.address

    def start(self) -> None:
        """Bind the port and serve; returns once the front accepts connections.

        Raises
        ------
        ConfigError
            The port is taken or the address is invalid.
        FlowerError
            The server did not start.
        """
        # httpx logs every forwarded call (heartbeats, polls every 3 s per node) at INFO.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        self._serving.start(FlowerError)
        log.info("Flower TLS front on %s (Fleet API only)", self.address)

    def stop(self, grace_s: float) -> None:
        """Stop accepting, let calls in flight end for up to `grace_s` seconds."""
        self._serving.stop(grace_s)
