"""The gRPC server process part: exchange servicer, health checking, auth, TLS, caps.

TLS is the default, from the home's certificate and key; with
``network.mutual_tls`` owners must also present a client certificate signed by
the home's CA; plaintext only when asked for (``--insecure``). Message sizes are
capped on purpose (`free_common.wire.GRPC_MESSAGE_OPTIONS`), and so are the
number of calls held at once and the number of uploads stored at once. Health
checking (``grpc.health.v1``) reports the exchange as serving while it is, and
as not serving once shutdown begins.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

# Public as grpc_health.v1.health.aio, imported there only conditionally (mypy misses it).
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from free_common.errors import ConfigError
from free_common.wire import GRPC_MESSAGE_OPTIONS
from free_server.auth import CallAuthInterceptor
from free_server.exchange import ExchangeService
from free_server.home import ServerHome
from free_server.servicer import add_to_server, full_service_name

__all__ = [
    "MAX_CONCURRENT_CALLS",
    "UPLOAD_THREADS",
    "ExchangeServer",
    "Listen",
    "server_credentials",
]

log = logging.getLogger("free_server.grpc")

MAX_CONCURRENT_CALLS = 2048
"""A hard cap on calls in progress or waiting; more are refused with RESOURCE_EXHAUSTED.

A waiting upload holds at most its 64 KiB stream window in the server, so the
cap bounds that memory (128 MiB at the very worst) whatever the owners do.
"""

UPLOAD_THREADS = 16
"""Uploads being stored at once; the others wait for a thread, their bytes on the owner's side."""

_CALL_THREADS = 4


@dataclass(frozen=True)
class Listen:
    """Where and how the exchange listens.

    Attributes
    ----------
    host
        Address to bind.
    port
        TCP port; 0 lets the system pick a free one (see `ExchangeServer.port`).
    insecure
        Plaintext instead of TLS (tests and local experiments only).
    mutual_tls
        Require a client certificate signed by the home's CA.
    """

    host: str
    port: int
    insecure: bool = False
    mutual_tls: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is not a TCP port (0-65535, 0 picks a free one)")
        if self.insecure and self.mutual_tls:
            raise ConfigError("mutual TLS needs TLS: drop --insecure or set network.mutual_tls off")

    @property
    def security(self) -> str:
        """How connections are protected, in words."""
        if self.insecure:
            return "PLAINTEXT (--insecure)"
        return "mutual TLS" if self.mutual_tls else "TLS"


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def server_credentials(home: ServerHome, mutual_tls: bool) -> grpc.ServerCredentials:
    """TLS credentials from the home's certificate (and its CA for client certificates)."""
    key = _read(home.tls_key, "TLS key")
    chain = _read(home.tls_cert, "TLS certificate")
    if not mutual_tls:
        return grpc.ssl_server_credentials([(key, chain)])
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=_read(home.ca_cert, "CA certificate"),
        require_client_auth=True,
    )


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ExchangeServer:
    """The exchange gRPC server, as a component of the running server.

    It is grpc's asyncio server on an event loop thread of its own: a call costs
    no thread while it waits, so calls queue instead of being refused. The
    blocking work of a call (store, files, static checks) runs on bounded
    thread pools (`free_server.servicer`).

    Parameters
    ----------
    service
        What the calls do.
    home
        The server home (TLS material).
    listen
        Address, port and transport security.
    time_window_s
        Allowed clock distance of a call's signed timestamp.
    max_concurrent_calls
        Calls in progress or waiting at once; gRPC refuses more with
        ``RESOURCE_EXHAUSTED``. A waiting call holds at most one stream window.
    upload_threads
        Uploads stored at once; further uploads wait in arrival order.
    """

    name = "exchange service"

    def __init__(
        self,
        service: ExchangeService,
        home: ServerHome,
        listen: Listen,
        time_window_s: float,
        *,
        max_concurrent_calls: int = MAX_CONCURRENT_CALLS,
        upload_threads: int = UPLOAD_THREADS,
    ) -> None:
        self._service = service
        self._max_calls = max_concurrent_calls
        self._upload_threads = upload_threads
        self._home = home
        self.listen = listen
        self._window_s = time_window_s
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._pools: list[ThreadPoolExecutor] = []
        self._health = health_aio.HealthServicer()
        self.port = listen.port

    @property
    def address(self) -> str:
        """``host:port`` it listens on (the real port once started)."""
        return _host_port(self.listen.host, self.port)

    def start(self) -> None:
        """Bind the port and start serving.

        Raises
        ------
        ConfigError
            The port cannot be bound, or the TLS material cannot be read.
        """
        uploads = ThreadPoolExecutor(self._upload_threads, thread_name_prefix="exchange-upload")
        calls = ThreadPoolExecutor(_CALL_THREADS, thread_name_prefix="exchange-call")
        self._pools = [uploads, calls]
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._loop_thread = threading.Thread(
            target=loop.run_forever, name="exchange-loop", daemon=True
        )
        self._loop_thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._serve(uploads, calls), loop).result()
        except BaseException:
            self._close_loop()
            raise

    async def _serve(self, uploads: ThreadPoolExecutor, calls: ThreadPoolExecutor) -> None:
        server = grpc.aio.server(
            interceptors=[CallAuthInterceptor(self._service.store, self._window_s, calls)],
            # No SO_REUSEPORT: a second server on a taken port must fail, not share it.
            # No BDP probing: it grows each stream's receive window far past 64 KiB, and
            # then the uploads of calls waiting for an upload thread pile up in memory.
            options=[*GRPC_MESSAGE_OPTIONS, ("grpc.so_reuseport", 0), ("grpc.http2.bdp_probe", 0)],
            maximum_concurrent_rpcs=self._max_calls,
        )
        add_to_server(self._service, server, uploads, calls)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        target = _host_port(self.listen.host, self.listen.port)
        try:
            if self.listen.insecure:
                port = server.add_insecure_port(target)
            else:
                creds = server_credentials(self._home, self.listen.mutual_tls)
                port = server.add_secure_port(target, creds)
        except RuntimeError as exc:
            port = 0
            log.debug("binding %s failed: %s", target, exc)
        if port == 0:
            await server.stop(None)
            raise ConfigError(
                f"cannot listen on {target}: the port is in use or the address is not this"
                " machine's; choose another --port"
            )
        self.port = port
        await server.start()
        self._server = server
        for name in ("", full_service_name()):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def _shutdown(self, grace_s: float) -> None:
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None

    def stop(self, grace_s: float) -> None:
        """Refuse new calls, give calls in flight `grace_s` seconds, then cancel them."""
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(grace_s), self._loop).result()
        self._close_loop()

    def _close_loop(self) -> None:
        # The pools end before the loop: a thread still reading a cancelled call's
        # stream needs the loop to learn that the call is gone.
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)
        self._pools = []
        loop, thread = self._loop, self._loop_thread
        self._loop = self._loop_thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
