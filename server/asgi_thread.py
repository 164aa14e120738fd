"""An ASGI app served over TLS by uvicorn in a thread of the server process.

The Flower TLS front and the operator's console both run this way: the socket is
bound here first (so a taken port is one clear line, and port 0 gives the real
port at once), uvicorn serves it with the home's certificate, and stopping asks
uvicorn to finish the requests in flight before the thread ends.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from free_common.errors import ConfigError, FreeError

__all__ = ["AsgiThread", "TlsListen", "bind"]


@dataclass(frozen=True)
class TlsListen:
    """Where an ASGI server listens and the TLS material it presents.

    Attributes
    ----------
    host, port
        Address to bind (port 0 picks a free one).
    cert, key
        The server certificate and its key (the home's).
    port_option
        The command-line option that sets the port, named in the error line.
    """

    host: str
    port: int
    cert: Path
    key: Path
    port_option: str


def bind(what: str, listen: TlsListen) -> socket.socket:
    """Bind and listen on `listen`'s address; `ConfigError` in one line when it cannot."""
    host, port = listen.host, listen.port
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host!r}: {exc.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"the {what} cannot listen on {host}:{port} ({exc.strerror or exc}):"
            f" another program uses it; stop it or pass another {listen.port_option}"
        ) from None
    sock.listen(128)
    return sock


class AsgiThread:
    """One ASGI app on one TLS socket, served by uvicorn in a daemon thread.

    Parameters
    ----------
    what
        The server's name in log and error lines ("Flower TLS front").
    app
        The ASGI application.
    listen
        Address and TLS material.
    on_close
        Awaited in the serving thread's event loop once uvicorn has stopped.
    """

    def __init__(
        self,
        what: str,
        app: Any,
        listen: TlsListen,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.what = what
        self.listen = listen
        self._app = app
        self._on_close = on_close
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.port = listen.port

    @property
    def address(self) -> str:
        """``HOST:PORT`` it listens on (the real port when 0 was asked)."""
        host = self.listen.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self, error: type[FreeError]) -> None:
        """Bind the port and serve; returns once connections are accepted.

        Raises
        ------
        ConfigError
            The port is taken or the address is invalid.
        FreeError
            Of class `error`: uvicorn did not start.
        """
        self._socket = bind(self.what, self.listen)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            ssl_certfile=str(self.listen.cert),
            ssl_keyfile=str(self.listen.key),
            lifespan="off",
            ws="none",
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._serve, name=self.what, daemon=True)
        self._thread.start()
        for _ in range(200):
            if self._server.started or not self._thread.is_alive():
                break
            threading.Event().wait(0.05)
        if not self._server.started:
            self.stop(1.0)
            raise error(f"the {self.what} on {self.address} did not start")

    def _serve(self) -> None:
        server, sock = self._server, self._socket
        assert server is not None and sock is not None

        async def serve() -> None:
            try:
                await server.serve(sockets=[sock])
            finally:
                if self._on_close is not None:
                    await self._on_close()

        asyncio.run(serve())

    def stop(self, grace_s: float) -> None:
        """Stop accepting, let requests in flight end for up to `grace_s` seconds."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=grace_s + 5.0)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout=5.0)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None
