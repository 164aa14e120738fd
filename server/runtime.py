"""The running server: its parts, started in order and stopped in reverse.

`free-server start` builds a `ServerRuntime` and serves until SIGTERM or SIGINT.
Each part is a `Component` (start, stop with a grace period): the intake
workers and the exchange service, and with ``--console-port`` the operator's
read-only console (`free_server.console`), started last. The Flower SuperLink
supervisor with its TLS front (on ``flower_port``) and the round scheduler (``min_models``) join the
list in `ServerRuntime._components`; they receive the same opened store and
settings, and are stopped before the exchange service so a running round can
checkpoint while uploads still finish.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import signal
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import TYPE_CHECKING, Protocol

from free_common.errors import ConfigError, HomeError
from free_common.models.onnx_static import IntakeLimits
from free_common.security.keys import key_id, load_private_key
from free_common.wire import MAX_CHUNK_BYTES
from free_server.exchange import ExchangeService
from free_server.grpc_server import ExchangeServer, Listen
from free_server.home import ServerHome
from free_server.intake_workers import IntakePool
from free_server.static_checks import StaticCheckPool
from free_server.store import Store
from free_server.submission import SubmissionPolicy

if TYPE_CHECKING:
    from free_server.console.app import ConsoleServer
    from free_server.flower_plane import FlowerPlane

__all__ = ["LOCK_NAME", "Component", "ServerRuntime", "StartOptions", "intake_limits"]

log = logging.getLogger("free_server")

LOCK_NAME = "server.lock"
"""File in the home a running server holds an exclusive lock on."""


class Component(Protocol):
    """A long-running part of the server."""

    name: str

    def start(self) -> None:
        """Start; raise a `FreeError` when it cannot."""

    def stop(self, grace_s: float) -> None:
        """Stop, giving work in flight up to `grace_s` seconds."""


@dataclass(frozen=True)
class StartOptions:
    """What `free-server start` was asked for on top of the home's config.

    Attributes
    ----------
    port
        Exchange port; None keeps ``network.exchange_port``, 0 picks a free one.
    flower_port
        Port of the Flower TLS front; None keeps ``network.flower_port``.
    min_models
        Newly accepted models that start a round; None keeps ``rounds.min_models``.
    insecure
        Serve the exchange in plaintext.
    grace_s
        How long uploads in flight may take to finish on shutdown.
    flower
        Run the Flower plane (SuperLink, owners' TLS front, round scheduler);
        exchange-only servers in tests turn it off.
    console_port
        Serve the operator's console on this port (0 picks a free one); None: no console.
    workers
        Processes each meta round's engine runs on, started by torch's launcher.
    """

    port: int | None = None
    flower_port: int | None = None
    min_models: int | None = None
    insecure: bool = False
    grace_s: float = 10.0
    flower: bool = True
    console_port: int | None = None
    workers: int = 1

    def __post_init__(self) -> None:
        for name in ("port", "flower_port", "console_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ConfigError(f"--{name.replace('_', '-')} {value} is not a TCP port")
        if self.min_models is not None and self.min_models < 1:
            raise ConfigError(f"--min-models {self.min_models} must be at least 1")
        if self.workers < 1:
            raise ConfigError(f"--workers {self.workers} must be at least 1")


def intake_limits(home: ServerHome) -> IntakeLimits:
    """Intake caps from the home's config: upload cap, worker memory and time."""
    config = home.config
    return IntakeLimits(
        max_bytes=config.limits.max_upload_bytes,
        memory_bytes=config.intake.memory_mb * 1024 * 1024,
        timeout_s=float(config.intake.timeout_s),
    )


class ServerRuntime:
    """Everything `free-server start` runs, over one home.

    Parameters
    ----------
    home
        The server home.
    options
        Command-line choices that override the config.
    """

    def __init__(self, home: ServerHome, options: StartOptions) -> None:
        rounds = home.config.rounds
        if options.min_models is not None:
            rounds = dataclasses.replace(rounds, min_models=options.min_models)
        self.home = dataclasses.replace(
            home, config=dataclasses.replace(home.config, rounds=rounds)
        )
        self.options = options
        self.flower_port = (
            options.flower_port
            if options.flower_port is not None
            else home.config.network.flower_port
        )
        self.server_key = load_private_key(self.home.signing_key)
        self.store: Store | None = None
        self.exchange: ExchangeServer | None = None
        self.intake: IntakePool | None = None
        self.flower: FlowerPlane | None = None
        self.console: ConsoleServer | None = None
        self._started: list[Component] = []
        self._lock_fd: int | None = None

    @property
    def server_key_id(self) -> str:
        """Key id of the server's signing key (what owners pin)."""
        return key_id(self.server_key.public_key())

    def _components(self, store: Store) -> list[Component]:
        config = self.home.config
        network = config.network
        limits = intake_limits(self.home)
        screen = None
        if config.intake.screening:
            # Here, not at the top: the engine (and torch) load only when screening is on.
            from free_server.rounds import ENGINE_DIR, engine_config
            from free_server.screener import Screener

            engine = engine_config(config.rounds.preset, self.home)
            engine_dir = self.home.root / ENGINE_DIR
            screen = Screener(engine, engine_dir, config.screening, limits)
        self.intake = IntakePool(store, limits, config.intake.workers, screen=screen)
        static_checks = StaticCheckPool(limits)
        policy = SubmissionPolicy(
            max_upload_bytes=config.limits.max_upload_bytes,
            time_window_ms=config.limits.time_window_s * 1000,
            intake_limits=limits,
        )
        service = ExchangeService(
            store,
            self.server_key,
            policy,
            chunk_bytes=min(config.limits.chunk_bytes, MAX_CHUNK_BYTES),
            on_received=self.intake.enqueue,
            static_check=static_checks.check,
        )
        listen = Listen(
            host=network.listen,
            port=network.exchange_port if self.options.port is None else self.options.port,
            insecure=self.options.insecure,
            mutual_tls=network.mutual_tls and not self.options.insecure,
        )
        self.exchange = ExchangeServer(service, self.home, listen, config.limits.time_window_s)
        parts: list[Component] = [self.intake, static_checks, self.exchange]
        if self.options.flower:
            # Loaded only when used: it pulls in flwr. Started after the exchange, so it
            # stops first and a running round checkpoints while uploads still finish.
            from free_server.flower_plane import flower_components

            self.flower = flower_components(
                self.home,
                store,
                flower_port=self.flower_port,
                min_models=config.rounds.min_models,
                workers=self.options.workers,
            )
            parts += self.flower.components()
        if self.options.console_port is not None:
            # Loaded only when asked for; last, so it stops first and watches to the end.
            from free_server.console.app import ConsoleServer

            nodes = None if self.flower is None else self.flower.front.nodes
            self.console = ConsoleServer(self.home, self.options.console_port, nodes)
            parts.append(self.console)
        return parts

    def _lock_home(self) -> None:
        # One server per home: a second one would judge the same submissions and run
        # the same rounds. The lock dies with the process, so a crash never leaves it.
        path = self.home.root / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HomeError(
                f"another free-server already runs on {self.home.root}: stop it first"
            ) from None
        self._lock_fd = fd

    def start(self) -> None:
        """Lock the home, open the store, start every component; on failure, undo it all."""
        self._lock_home()
        try:
            self.store = self.home.open_store()
            # A nonce only guards manifests inside the time window: older ones are
            # refused on their timestamp, so their nonces need not be kept.
            window = timedelta(seconds=self.home.config.limits.time_window_s)
            pruned = self.store.prune_nonces(before=datetime.now(UTC) - 2 * window)
            if pruned:
                log.info("forgot %d nonces older than twice the time window", pruned)
            for component in self._components(self.store):
                component.start()
                self._started.append(component)
                log.info("%s started", component.name)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the components in reverse order, then close the store."""
        while self._started:
            component = self._started.pop()
            component.stop(self.options.grace_s)
            log.info("%s stopped", component.name)
        if self.store is not None:
            self.store.close()
            self.store = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def serve_until_signalled(self) -> int:
        """Block until SIGTERM or SIGINT, then stop cleanly; return the signal number."""
        received: list[int] = []
        done = threading.Event()

        def handle(signum: int, _frame: FrameType | None) -> None:
            received.append(signum)
            done.set()

        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            # A timed wait lets the main thread run the signal handler promptly.
            while not done.wait(0.5):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("received %s: stopping", signal.Signals(received[0]).name)
        self.stop()
        return received[0]
