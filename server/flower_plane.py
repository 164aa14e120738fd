"""The Flower control plane of `free-server start`, as three server components.

`flower_components` returns, in start order:

1. `SuperLinkSupervisor`: the SuperLink on 127.0.0.1 (``network.superlink_port``)
   with TLS, SuperNode authentication and the allow-list's node keys;
2. `FleetFront`: the owner-facing TLS front on ``network.listen`` and the flower
   port, forwarding Flower's Fleet routes only;
3. `RoundScheduler`: starts a meta round when ``min_models`` new models were
   accepted or ``free-server run`` asked for one, as a Flower run of the round
   app (`free_server.server_app`).

The server stops them in reverse order: the scheduler first (a running round
is stopped and requested again), then the front, then the SuperLink.
"""

from __future__ import annotations

from dataclasses import dataclass

from free_server.fleet_front import FleetFront, FrontSettings
from free_server.flower_runs import FlowerRuns
from free_server.home import ServerHome
from free_server.scheduler import RoundScheduler, SchedulerSettings
from free_server.store import Store
from free_server.superlink import SuperLinkSettings, SuperLinkSupervisor

__all__ = ["FlowerPlane", "flower_components"]


@dataclass(frozen=True)
class FlowerPlane:
    """The three components, for callers that need to reach one (tests, status lines)."""

    superlink: SuperLinkSupervisor
    front: FleetFront
    scheduler: RoundScheduler

    def components(self) -> list[SuperLinkSupervisor | FleetFront | RoundScheduler]:
        """In start order."""
        return [self.superlink, self.front, self.scheduler]


def flower_components(
    home: ServerHome,
    store: Store,
    *,
    flower_port: int,
    min_models: int,
    preset: str | None = None,
    reply_timeout_s: float = 600.0,
    poll_s: float = 2.0,
    superlink: SuperLinkSettings | None = None,
    workers: int = 1,
) -> FlowerPlane:
    """Build the Flower plane of a server home.

    Parameters
    ----------
    home, store
        The server home and its opened store.
    flower_port
        The owner-facing front's port (0 picks a free one).
    min_models
        Newly accepted models that start a round.
    preset
        Engine preset of scheduled rounds; default ``rounds.preset`` of the home.
    reply_timeout_s
        How long a round waits for owners' replies after its push.
    poll_s
        Seconds between the scheduler's looks at the store.
    superlink
        SuperLink settings; default the home's ``network.superlink_port``.
    workers
        Processes each round's engine runs on.
    """
    network = home.config.network
    supervisor = SuperLinkSupervisor(
        home, store, superlink or SuperLinkSettings(port=network.superlink_port)
    )
    front = FleetFront(
        FrontSettings(
            host=network.listen,
            port=flower_port,
            upstream_port=supervisor.settings.port,
            cert=home.tls_cert,
            key=home.tls_key,
            ca=home.ca_cert,
        )
    )
    scheduler = RoundScheduler(
        home,
        store,
        FlowerRuns(supervisor),
        SchedulerSettings(
            min_models=min_models,
            preset=preset or home.config.rounds.preset,
            reply_timeout_s=reply_timeout_s,
            poll_s=poll_s,
            workers=workers,
        ),
    )
    return FlowerPlane(supervisor, front, scheduler)
