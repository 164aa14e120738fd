"""Supervise the Flower SuperLink: one ``flower-superlink`` process on loopback only.

The open-source SuperLink serves its Fleet, Control and Runtime APIs on one
port, and the Control API has no authentication: whoever reaches it can run
code on the SuperLink and on every SuperNode. So it listens on 127.0.0.1 only;
owners reach its Fleet routes through `free_server.fleet_front`.

The process runs with

- TLS from the home (``tls.pem``/``tls.key``, ``ca.pem``) on every API;
- ``--enable-supernode-auth``: only SuperNodes whose EC public key was
  registered may connect. `free_server.node_sync` registers the node keys of
  the allow-list (active clients with a node key) and unregisters every other
  key, at start and every few seconds, so ``clients add`` and ``clients
  revoke`` take effect while the server runs;
- its state (registrations, runs) in SQLite at ``HOME/flower/superlink.db``, so
  a restart keeps the registered nodes, and SuperNodes reconnect by themselves;
- no run-time dependency installation, no telemetry, no update check
  (`free_common.flower_app.flower_environment`), Flower's files under
  ``HOME/flower/flwr-home`` and its output in ``HOME/flower/superlink.log``
  (each round's ServerApp logs to ``HOME/flower/rounds/round-<id>.log``).

Stopping it also stops the ``flower-superexec`` and ``flwr-serverapp``
processes it started (Flower puts them in sessions of their own, so they are
found through ``/proc``). If it exits on its own, the supervisor starts it
again after a delay that grows while it keeps dying young.

Flower fixes a SuperNode's heartbeat interval at 30 s (the SuperLink accepts
10 s to 30 min but no flag sets it), so a vanished node is seen as offline
after about 60 s; rounds do not wait on that, they use their own reply
timeout (`free_server.server_app`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from flwr.supercore.control import ControlHttpClient

from free_common.errors import ConfigError, FlowerError, StoreError
from free_common.flower_app import flower_environment
from free_server.home import ServerHome
from free_server.node_sync import SyncReport, sync_node_keys
from free_server.store import Store

__all__ = [
    "LOOPBACK",
    "SuperLinkPaths",
    "SuperLinkSettings",
    "SuperLinkSupervisor",
    "check_port_free",
]

log = logging.getLogger("free_server.superlink")

LOOPBACK = "127.0.0.1"
_STABLE_S = 60.0
"""A SuperLink that ran this long before dying is restarted after the shortest delay."""


@dataclass(frozen=True)
class SuperLinkPaths:
    """Where the SuperLink keeps its files inside the server home."""

    folder: Path

    @classmethod
    def of(cls, home: ServerHome) -> SuperLinkPaths:
        """Return the paths under ``HOME/flower``."""
        return cls(home.root / "flower")

    @property
    def database(self) -> Path:
        """The SuperLink's SQLite state (registered nodes, runs)."""
        return self.folder / "superlink.db"

    @property
    def flwr_home(self) -> Path:
        """``FLWR_HOME`` of the SuperLink and the ServerApp processes it starts."""
        return self.folder / "flwr-home"

    @property
    def log_file(self) -> Path:
        """The SuperLink's output."""
        return self.folder / "superlink.log"

    def round_log(self, round_id: int) -> Path:
        """Return the log file of meta round `round_id` (written by its ServerApp)."""
        return self.folder / "rounds" / f"round-{round_id}.log"


@dataclass(frozen=True)
class SuperLinkSettings:
    """How the SuperLink is run and watched.

    Attributes
    ----------
    port
        Its port on 127.0.0.1 (``network.superlink_port``).
    start_timeout_s
        How long it may take to answer its health check.
    sync_interval_s
        Seconds between two syncs of the node keys with the allow-list.
    restart_delay_s, max_restart_delay_s
        Delay before restarting a SuperLink that exited on its own; it doubles
        with each restart while the SuperLink keeps dying within a minute, up to
        the maximum.
    """

    port: int
    start_timeout_s: float = 60.0
    sync_interval_s: float = 5.0
    restart_delay_s: float = 2.0
    max_restart_delay_s: float = 60.0

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"network.superlink_port = {self.port} is not a TCP port")
        if min(self.start_timeout_s, self.sync_interval_s, self.restart_delay_s) <= 0:
            raise ConfigError("SuperLink timeouts and intervals must be positive")


def check_port_free(host: str, port: int, what: str) -> None:
    """Raise `ConfigError` when `port` on `host` is already taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"{what} cannot listen on {host}:{port} ({exc.strerror or exc}): another"
                " program (or another free-server) uses it; stop it or choose another port"
            ) from None


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


class SuperLinkSupervisor:
    """Runs, watches and stops the SuperLink of one server home.

    Parameters
    ----------
    home
        The server home (TLS material, where the state goes).
    store
        The store whose allow-list decides which node keys are registered.
    settings
        Port, timeouts and intervals.
    """

    name = "flower-superlink"

    def __init__(self, home: ServerHome, store: Store, settings: SuperLinkSettings) -> None:
        self.home = home
        self.store = store
        self.settings = settings
        self.paths = SuperLinkPaths.of(home)
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._watcher: threading.Thread | None = None
        self._spawned_at = 0.0
        self._delay = settings.restart_delay_s
        self.restarts = 0
        self.last_sync: SyncReport | None = None

    # -- addresses and clients ----------------------------------------------------------

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``: where the SuperLink listens (every API)."""
        return f"{LOOPBACK}:{self.settings.port}"

    @property
    def url(self) -> str:
        """Base URL of the SuperLink."""
        return f"https://{self.address}"

    def ssl_context(self) -> ssl.SSLContext:
        """Return a client TLS context that trusts the home's CA only."""
        return ssl.create_default_context(cafile=str(self.home.ca_cert))

    @contextmanager
    def control(self) -> Iterator[ControlHttpClient]:
        """Open a Flower Control API client for the loopback SuperLink (closed on exit)."""
        client = ControlHttpClient.from_server_address(
            server_address=self.address,
            insecure=False,
            root_certificates=self.home.ca_cert.read_bytes(),
            interceptors=[],
        )
        try:
            yield client
        finally:
            client.close()

    def ready(self) -> bool:
        """Whether the SuperLink is running and answered its health check."""
        return self._ready.is_set()

    @property
    def pid(self) -> int | None:
        """Process id of the running SuperLink, if any."""
        process = self._process
        return None if process is None or process.poll() is not None else process.pid

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the SuperLink, wait for it to answer, register the allowed node keys.

        Raises
        ------
        ConfigError
            The port is taken, or Flower's commands are not installed.
        FlowerError
            The SuperLink did not come up.
        """
        self.paths.folder.mkdir(mode=0o700, exist_ok=True)
        self.paths.flwr_home.mkdir(mode=0o700, exist_ok=True)
        check_port_free(LOOPBACK, self.settings.port, "the Flower SuperLink")
        self._stopping.clear()
        self._spawn()
        try:
            self._wait_ready()
            self.sync_nodes()
        except BaseException:
            self._terminate(grace_s=5.0)
            raise
        self._watcher = threading.Thread(target=self._watch, name="superlink-watch", daemon=True)
        self._watcher.start()
        log.info("Flower SuperLink listening on %s (log %s)", self.address, self.paths.log_file)

    def stop(self, grace_s: float) -> None:
        """Stop the SuperLink and everything it started; SIGKILL after `grace_s` seconds."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join(timeout=grace_s + 10.0)
            self._watcher = None
        self._terminate(grace_s)

    def sync_nodes(self) -> SyncReport:
        """Make the SuperLink's registered node keys those of the allow-list, now."""
        with self.control() as control:
            report = sync_node_keys(control, self.store.list_clients())
        # A key Flower keeps refusing would otherwise be logged every few seconds.
        if report.changed and report != self.last_sync:
            log.info("node keys: %s", report.describe())
        self.last_sync = report
        return report

    # -- internals ----------------------------------------------------------------------

    def _command(self) -> list[str]:
        env_path = flower_environment(self.paths.flwr_home)["PATH"]
        binary = shutil.which("flower-superlink", path=env_path)
        if binary is None:
            raise ConfigError(
                "the flower-superlink command is not installed: install flwr 1.41"
                " (pip install 'flwr>=1.41,<1.42')"
            )
        return [
            # Ends with the server even when the server is SIGKILLed (see die_with_parent).
            sys.executable,
            "-m",
            "free_server.die_with_parent",
            str(os.getpid()),
            binary,
            "--host",
            LOOPBACK,
            "--port",
            str(self.settings.port),
            "--ssl-ca-certfile",
            str(self.home.ca_cert),
            "--ssl-certfile",
            str(self.home.tls_cert),
            "--ssl-keyfile",
            str(self.home.tls_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--isolation",
            "subprocess",
            "--database",
            str(self.paths.database),
        ]

    def _spawn(self) -> None:
        command = self._command()
        with self.paths.log_file.open("ab") as output:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=flower_environment(self.paths.flwr_home),
                cwd=self.paths.folder,
                # Its own group: one signal reaches the SuperExec and ServerApp children too.
                start_new_session=True,
            )
        with self._lock:
            self._process = process
        self._spawned_at = time.monotonic()
        self._ready.clear()

    def _wait_ready(self) -> None:
        process = self._process
        assert process is not None
        deadline = time.monotonic() + self.settings.start_timeout_s
        with httpx.Client(verify=self.ssl_context(), timeout=2.0) as http:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise FlowerError(
                        f"the Flower SuperLink exited at start (code {process.returncode}):"
                        f" {_tail(self.paths.log_file) or 'no output'}"
                        f" (full log: {self.paths.log_file})"
                    )
                try:
                    if http.get(f"{self.url}/health").status_code == 200:
                        self._ready.set()
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise FlowerError(
            f"the Flower SuperLink did not answer within {self.settings.start_timeout_s:g} s;"
            f" see {self.paths.log_file}"
        )

    def _watch(self) -> None:
        next_sync = time.monotonic() + self.settings.sync_interval_s
        while not self._stopping.wait(0.5):
            process = self._process
            if process is None or process.poll() is not None:
                self._recover(process)
                continue
            if time.monotonic() >= next_sync:
                next_sync = time.monotonic() + self.settings.sync_interval_s
                self._guarded(self.sync_nodes, "syncing node keys")

    def _recover(self, dead: subprocess.Popen[bytes] | None) -> None:
        """Start the SuperLink again after a delay that grows while it keeps dying young."""
        self._ready.clear()
        if dead is not None:
            _signal_group(dead, signal.SIGKILL)  # what is left of its SuperExec and ServerApp
        if time.monotonic() - self._spawned_at >= _STABLE_S:
            self._delay = self.settings.restart_delay_s
        code = "?" if dead is None else dead.returncode
        log.warning(
            "the Flower SuperLink is down (exit code %s): restarting in %.0f s; last output: %s",
            code,
            self._delay,
            _tail(self.paths.log_file),
        )
        if self._stopping.wait(self._delay):
            return
        self._delay = min(self._delay * 2, self.settings.max_restart_delay_s)
        try:
            self._spawn()
            self._wait_ready()
            self.sync_nodes()
        except (FlowerError, ConfigError, StoreError, httpx.HTTPError) as exc:
            log.error("restarting the Flower SuperLink failed: %s", exc)
            self._terminate(grace_s=5.0)
            return
        self.restarts += 1
        log.info("Flower SuperLink restarted (restart %d)", self.restarts)

    def _guarded(self, action: Callable[[], object], what: str) -> None:
        try:
            action()
        except (httpx.HTTPError, FlowerError, StoreError) as exc:
            log.warning("%s failed (will retry): %s", what, exc)

    def _terminate(self, grace_s: float) -> None:
        with self._lock:
            process, self._process = self._process, None
        self._ready.clear()
        if process is None or process.poll() is not None:
            return
        # Flower starts its SuperExec in a session of its own, which starts each
        # ServerApp: signal the whole family, not only the SuperLink's group.
        family = _descendants(process.pid)
        _signal_group(process, signal.SIGTERM)
        _signal_all(family, signal.SIGTERM)
        try:
            process.wait(timeout=max(grace_s, 0.1))
        except subprocess.TimeoutExpired:
            log.warning("the Flower SuperLink did not stop within %.0f s: killing it", grace_s)
            _signal_group(process, signal.SIGKILL)
            process.wait()
        deadline = time.monotonic() + min(max(grace_s, 0.1), 5.0)
        while _signal_all(family, 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_group(process, signal.SIGKILL)
        _signal_all(family, signal.SIGKILL)


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> bool:
    """Signal the process group of `process`; False when no process of it is left."""
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal_all(pids: list[int], signum: int) -> bool:
    """Signal each process; False when none of them is left."""
    alive = False
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            continue
        alive = True
    return alive


def _descendants(pid: int) -> list[int]:
    """Return the process ids below `pid`, read from ``/proc`` (empty where there is none)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (command) state ppid ...": the command may hold spaces and parentheses.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
