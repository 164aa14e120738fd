"""Meta rounds on Flower's simulation engine: the round app's two apps, virtual owners on Ray.

`SimulatedRuns` stands where `free_server.flower_runs.FlowerRuns` stands in a
deployment: the server's round scheduler starts a meta round's Flower run through
it (`free_server.scheduler.RoundRuns`), and it runs that run on Flower's
simulation engine (`flwr.simulation.run_simulation`, Ray backend) with the
ServerApp and ClientApp it is given: the objects ``flwr-serverapp`` and
``flwr-clientapp`` load in a deployment (`free_common.flower_app.SERVERAPP_REF`,
`CLIENTAPP_REF`). Owners are virtual SuperNodes: Ray actors that run the
ClientApp for one node's message at a time.

What the simulation gives the apps that a deployment's processes would:

- the run settings: the SuperLink puts the scheduler's run-config overrides in
  the ServerApp's `Context`; here `SimulatedRuns.start` does;
- each owner's node config: `free-client join` writes it to the TOML file its
  SuperNode reads; Flower's simulation gives virtual node ``i`` only its
  ``partition-id``, so node ``i`` is given joined owner ``i``'s config here;
- the wait for owners to come online: the engine registers its virtual nodes
  while the ServerApp already runs, so the ServerApp starts once all are there.

What it does not share with a deployment is the transport of the control plane:
no SuperLink or SuperNode processes, no HTTP, TLS or node authentication, no
heartbeats; messages go through Flower's in-memory link state (`OWN_TRANSPORT`).

Owners come and go at random (`draw_fates`): each owner independently drops
with probability ``drop_rate``, half of those while uploading its model (the
stream is cut after half the bytes) and half during the push of the release
(its node answers with an error, as a SuperNode that died does).
"""

from __future__ import annotations

import enum
import importlib.util
import logging
import os
import random
import sys
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import PARTITION_ID_KEY
from flwr.serverapp import Grid, ServerApp

from free_common.errors import ConfigError, FlowerError
from free_common.flower_app import RUN_CONFIG_DEFAULTS

__all__ = [
    "OWN_TRANSPORT",
    "OwnerDropped",
    "OwnerFate",
    "SimulatedRunState",
    "SimulatedRuns",
    "draw_fates",
    "environment_restored",
    "ray_backend_config",
]

log = logging.getLogger("free_common.bench.simulate")

OWN_TRANSPORT = (
    "Flower's control plane: the simulation runs no SuperLink, SuperNode, Fleet front or"
    " ClientApp processes; the push and the owners' replies travel through Flower's"
    " in-memory link state and Ray, without HTTP, TLS, SuperNode authentication,"
    " heartbeats or the app-bundle pin of `free-client join`. Each owner's node config"
    " is given to its virtual node by the simulation instead of by its own SuperNode."
)
"""What a simulated run does not share with a deployment (the results file names it)."""


class OwnerFate(enum.Enum):
    """What happens to one virtual owner during a simulated round."""

    LIVE = "live"
    """Submits, is online for the push, replies."""
    DROPS_UPLOADING = "drops-uploading"
    """Its upload is cut off half way; it never joins."""
    DROPS_AT_PUSH = "drops-at-push"
    """Submits and joins, then its node fails while handling the push."""


def draw_fates(owners: int, drop_rate: float, seed: int) -> list[OwnerFate]:
    """Draw each owner's fate: drop with probability `drop_rate`, at one of two moments.

    Raises
    ------
    ConfigError
        `owners` is below 1 or `drop_rate` outside [0, 1).
    """
    if owners < 1:
        raise ConfigError(f"--owners {owners} must be at least 1")
    if not 0.0 <= drop_rate < 1.0:
        raise ConfigError(f"--drop-rate {drop_rate} must be at least 0 and below 1")
    rng = random.Random(seed)  # noqa: S311 (a simulated failure schedule, not a secret)
    fates = []
    for _ in range(owners):
        if rng.random() >= drop_rate:
            fates.append(OwnerFate.LIVE)
        else:
            fates.append(rng.choice([OwnerFate.DROPS_UPLOADING, OwnerFate.DROPS_AT_PUSH]))
    return fates


class OwnerDropped(RuntimeError):
    """Raised by a virtual owner's node that drops during the push (a simulated failure)."""


@contextmanager
def environment_restored() -> Iterator[None]:
    """Give this process's environment back as it was (Flower's Ray backend rewrites it).

    Flower points ``PYTHONPATH`` at this process's ``sys.path`` for Ray's workers and
    leaves it so, which would hand later child processes this one's import path.
    """
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def ray_backend_config(cpus: int) -> dict[str, Any]:
    """Backend settings: a fresh local Ray instance of `cpus` CPUs, one CPU per owner's node."""
    return {
        # address "local" starts a new instance even when another Ray runs on this host.
        "init_args": {
            "address": "local",
            "num_cpus": cpus,
            "include_dashboard": False,
            "log_to_driver": False,
        },
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    }


_RAY_START_TRIES = 2
_RAY_START_TIMEOUTS = ("Timed out waiting for file", "The current node timed out during startup")
"""Ray's words when its GCS server did not write its port file, or its raylet did not
register with the GCS, within Ray's fixed 30 s (a `RuntimeError` and a bare `Exception`)."""


@contextmanager
def ray_running(backend_config: Mapping[str, Any]) -> Iterator[None]:
    """Run Ray as Flower's Ray backend would start it, trying once more if it does not come up.

    On a busy 2-core machine Ray's GCS server or raylet now and then misses the 30 s Ray
    gives it to start (a hard-coded wait), and the whole simulated round then fails before
    any owner ran. Flower's backend starts Ray only when none runs, so starting it
    here, with the same arguments, lets a second try replace that failure. Ray is shut
    down on leaving, however the run ended (Flower does so only when its runtime ends well).
    """
    import ray

    init_args = {"include_dashboard": False, **backend_config.get("init_args", {})}
    # As Flower's backend does: Ray's workers get this driver's import path.
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    for attempt in range(1, _RAY_START_TRIES + 1):
        try:
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
            break
        except Exception as exc:  # Ray raises a bare Exception when its raylet is late
            if attempt == _RAY_START_TRIES or not any(m in str(exc) for m in _RAY_START_TIMEOUTS):
                raise
            log.warning("Ray did not start (%s); starting it once more", exc)
            ray.shutdown()
    try:
        yield
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class SimulatedRunState:
    """Where a simulated run is (what `free_server.scheduler.RunProgress` asks).

    Attributes
    ----------
    status
        ``running`` or ``finished``.
    sub_status
        For a finished run: ``completed`` or ``failed``.
    details
        Why it failed.
    """

    status: str
    sub_status: str = ""
    details: str = ""

    @property
    def finished(self) -> bool:
        """Whether the run has ended."""
        return self.status == "finished"

    @property
    def completed(self) -> bool:
        """Whether the run ended without error."""
        return self.finished and self.sub_status == "completed"

    def describe(self) -> str:
        """``status:sub_status (details)``."""
        text = f"{self.status}:{self.sub_status}" if self.sub_status else self.status
        return f"{text} ({self.details})" if self.details else text


def _wait_for_nodes(grid: Grid, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(list(grid.get_node_ids())) < count:
        if time.monotonic() >= deadline:
            raise FlowerError(
                f"only {len(list(grid.get_node_ids()))} of {count} virtual owners came online"
                f" within {timeout_s:g} s"
            )
        time.sleep(0.2)


def _server_app(
    app: ServerApp, settings: Mapping[str, str | int | float], nodes: int, wait_s: float
) -> ServerApp:
    simulated = ServerApp()

    def main(grid: Grid, context: Context) -> None:
        context.run_config = dict(settings)
        _wait_for_nodes(grid, nodes, wait_s)
        app(grid, context)

    simulated.main()(main)
    return simulated


def _client_app(
    app: ClientApp, node_configs: Sequence[Mapping[str, Any]], dropping: Collection[int]
) -> ClientApp:
    simulated = ClientApp()
    configs = [dict(config) for config in node_configs]
    gone = frozenset(dropping)

    def evaluate(message: Message, context: Context) -> Message:
        partition = int(context.node_config[PARTITION_ID_KEY])
        if partition in gone:
            raise OwnerDropped(f"virtual owner {partition} dropped out during the push")
        context.node_config = dict(configs[partition])
        reply: Message = app(message, context)
        return reply

    # The round app sends owners `evaluate` messages only (free_server.server_app).
    simulated.evaluate()(evaluate)
    return simulated


@dataclass
class SimulatedRuns:
    """Runs the round app's Flower runs on the simulation engine, one at a time.

    `start` returns when the run has ended (the round, its push and the replies),
    so the scheduler's next look settles it.

    Parameters
    ----------
    server_app, client_app
        The round app's ServerApp and ClientApp.
    node_configs
        The node config of each joined owner, in node order.
    dropping
        Indexes into `node_configs` of owners whose node fails during the push.
    backend_config
        Flower's backend settings (`ray_backend_config`).
    node_wait_s
        How long the ServerApp waits for every virtual owner to be online.
    """

    server_app: ServerApp
    client_app: ClientApp
    node_configs: Sequence[Mapping[str, Any]]
    dropping: Collection[int] = ()
    backend_config: Mapping[str, Any] = field(default_factory=lambda: ray_backend_config(2))
    node_wait_s: float = 300.0
    _states: dict[int, SimulatedRunState] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def ready(self) -> bool:
        """Whether a run can start: always, as the previous one ended inside `start`."""
        return True

    def start(self, settings: Mapping[str, str | int | float]) -> int:
        """Run the round app with these run settings to its end; return the run's id.

        Raises
        ------
        FlowerError
            A setting is not one of the round app's.
        """
        if importlib.util.find_spec("ray") is None:
            raise ConfigError(
                "Flower's simulation engine needs Ray: install the project's `simulation`"
                " extra (pip install -e '.[simulation]')"
            )
        # Imported here: it pulls in Ray.
        from flwr.simulation import run_simulation

        unknown = sorted(set(settings) - set(RUN_CONFIG_DEFAULTS))
        if unknown:
            raise FlowerError(f"the round app has no run setting {unknown[0]!r}")
        with self._lock:
            run_id = len(self._states) + 1
            self._states[run_id] = SimulatedRunState("running")
        nodes = len(self.node_configs)
        state = SimulatedRunState("finished", "completed")
        try:
            with environment_restored(), ray_running(self.backend_config):
                run_simulation(
                    server_app=_server_app(self.server_app, settings, nodes, self.node_wait_s),
                    client_app=_client_app(self.client_app, self.node_configs, self.dropping),
                    num_supernodes=nodes,
                    backend_config=dict(self.backend_config),
                )
        except Exception as exc:  # any failure of the run is its outcome
            # Flower wraps the ServerApp's exception in its own "Ending simulation" one.
            cause: BaseException = exc
            while cause.__cause__ is not None:
                cause = cause.__cause__
            log.error("simulated run %d failed", run_id, exc_info=exc)
            state = SimulatedRunState("finished", "failed", f"{type(cause).__name__}: {cause}")
        with self._lock:
            self._states[run_id] = state
        return run_id

    def state(self, run_id: int) -> SimulatedRunState:
        """Return where run `run_id` is.

        Raises
        ------
        FlowerError
            No run has that id.
        """
        with self._lock:
            found = self._states.get(run_id)
        if found is None:
            raise FlowerError(f"no simulated run {run_id}")
        return found

    def stop(self, run_id: int) -> None:
        """Nothing to stop: a simulated run has ended by the time `start` returns."""
