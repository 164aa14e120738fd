"""The console's ASGI app and the server component that serves it over TLS.

`console_app` puts every route behind the token check (`free_server.console.auth`):
a request without a valid token gets ``401`` whatever its path, so not even a
``404`` tells what exists. FastAPI's own ``/docs`` and ``/openapi.json`` are off.
`ConsoleServer` serves the app with the home's TLS certificate on
``console.listen`` (loopback by default) and opens the store read-only.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from free_common.errors import ConfigError
from free_server.asgi_thread import AsgiThread, TlsListen
from free_server.console.auth import token_allowed
from free_server.console.metrics import registry
from free_server.console.pages import router
from free_server.console.views import ConsoleData
from free_server.fleet_front import NodesSeen
from free_server.home import ServerHome
from free_server.store import Store

__all__ = ["ConsoleServer", "console_app"]

log = logging.getLogger("free_server.console")

_CHALLENGE = 'Basic realm="FREE-Fed console", charset="UTF-8"'


def console_app(data: ConsoleData) -> FastAPI:
    """Build the console: its pages and ``/metrics``, all behind the token."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.data = data
    metrics = registry(data)
    root = data.home.root

    @app.middleware("http")
    async def require_token(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if not token_allowed(root, request.headers.get("authorization")):
            return PlainTextResponse(
                "a console token is needed: `free-server console token` makes one;"
                " send it as 'Authorization: Bearer TOKEN' (or as the password)\n",
                status_code=401,
                headers={"www-authenticate": _CHALLENGE},
            )
        response = await call_next(request)
        response.headers["cache-control"] = "no-store"
        return response

    @app.get("/metrics")
    def scrape() -> Response:
        """Prometheus text format (`free_server.console.metrics`)."""
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)
    return app


class ConsoleServer:
    """The console as a component of the running server.

    Parameters
    ----------
    home
        The server home (TLS material, token file, store).
    port
        TCP port (``--console-port``; 0 picks a free one).
    nodes
        The Flower front's SuperNodes, for the connected-SuperNodes metric (None: no
        Flower plane in this server).
    """

    name = "console"

    def __init__(self, home: ServerHome, port: int, nodes: NodesSeen | None = None) -> None:
        self.home = home
        self._nodes = nodes
        listen = TlsListen(
            home.config.console.listen, port, home.tls_cert, home.tls_key, "--console-port"
        )
        self._store: Store | None = None
        self._listen = listen
        self._serving: AsgiThread | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the real one once started, when 0 was asked)."""
        return self._listen.port if self._serving is None else self._serving.port

    @property
    def address(self) -> str:
        """``HOST:PORT`` it listens on (the real port once started)."""
        if self._serving is None:
            host, port = self._listen.host, self._listen.port
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self._serving.address

    @property
    def url(self) -> str:
        """The overview page's address."""
        return f"https://{self.address}/"

    def start(self) -> None:
        """Open the store read-only and serve; returns once connections are accepted.

        Raises
        ------
        ConfigError
            The port is taken, or the address is invalid.
        """
        self._store = Store(self.home.store_dir, read_only=True)
        app = console_app(ConsoleData(self.home, self._store, self._nodes))
        self._serving = AsgiThread("console", app, self._listen)
        try:
            self._serving.start(ConfigError)
        except BaseException:
            self._store.close()
            raise
        log.info("console on %s (read-only)", self.url)

    def stop(self, grace_s: float) -> None:
        """Stop serving and close the store."""
        if self._serving is not None:
            self._serving.stop(grace_s)
        if self._store is not None:
            self._store.close()
            self._store = None
