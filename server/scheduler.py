"""Decide when a meta round starts, start it as a Flower run, and see it end.

A thread of the server checks the store every `SchedulerSettings.poll_s`:

- a round request written by ``free-server run`` (`Store.request_round`) is
  started first, oldest first;
- otherwise, when at least ``min_models`` submissions were accepted since the
  last round started (`Store.accepted_submissions(since_round=...)`), the
  scheduler requests a round itself, with the configured preset.

Starting a round marks it running in the store (which fixes the models it
counts as seen) and submits a Flower run of the round app
(`free_server.flower_runs`; `free_common.bench.simulate` starts the same runs on
Flower's simulation engine). One round runs at a time. The ServerApp finishes
the round in the store itself; if its Flower run ends while the round is still
running (the ServerApp crashed or was stopped), the scheduler fails the round
with Flower's reason.

Shutdown and crashes: a round that is running when the server stops is
stopped, marked failed ("interrupted") and requested again with the same
preset, so the next start resumes it from the engine's last checkpoint. A
round left running by a server that died without stopping is treated the same
way at the next start.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from free_common.errors import FlowerError, StoreError
from free_server.home import ServerHome
from free_server.records import RoundRow
from free_server.store import Store

__all__ = ["RoundRuns", "RoundScheduler", "RunProgress", "SchedulerSettings"]

log = logging.getLogger("free_server.scheduler")

INTERRUPTED = "interrupted: the server stopped during this round; it was requested again"


@dataclass(frozen=True)
class SchedulerSettings:
    """When rounds start and how they run.

    Attributes
    ----------
    min_models
        Newly accepted models that start a round by themselves.
    preset
        Engine preset of the rounds the scheduler requests itself.
    reply_timeout_s
        How long a round waits for owners' replies after pushing its release.
    poll_s
        Seconds between two looks at the store and the running round.
    workers
        Processes each round's engine runs on (`free_server.round_ranks`).
    """

    min_models: int
    preset: str
    reply_timeout_s: float = 600.0
    poll_s: float = 2.0
    workers: int = 1


class RunProgress(Protocol):
    """Where a round's Flower run is, as the scheduler reads it."""

    @property
    def finished(self) -> bool:
        """Whether the run has ended, one way or another."""
        ...

    def describe(self) -> str:
        """Return a few words for the log and the round's error."""
        ...


class RoundRuns(Protocol):
    """What starts and watches the rounds' Flower runs.

    `free_server.flower_runs.FlowerRuns` does it on the loopback SuperLink;
    `free_common.bench.simulate.SimulatedRuns` on Flower's simulation engine.
    """

    def ready(self) -> bool:
        """Whether a run can be started now."""
        ...

    def start(self, settings: Mapping[str, str | int | float]) -> int:
        """Start a run of the round app with these run settings; return its id."""
        ...

    def state(self, run_id: int) -> RunProgress:
        """Return where run `run_id` is."""
        ...

    def stop(self, run_id: int) -> None:
        """Ask for the run to stop."""
        ...


@dataclass(frozen=True)
class _InFlight:
    round_id: int
    run_id: int
    preset: str


class RoundScheduler:
    """Starts rounds (one at a time) and settles their end.

    Parameters
    ----------
    home
        The server home (its path travels in the run settings).
    store
        The store with round requests and verdicts.
    runs
        Starts and watches the Flower runs (`RoundRuns`).
    settings
        Thresholds, preset, timeouts.
    """

    name = "round-scheduler"

    def __init__(
        self, home: ServerHome, store: Store, runs: RoundRuns, settings: SchedulerSettings
    ) -> None:
        self.home = home
        self.store = store
        self.runs = runs
        self.settings = settings
        self._inflight: _InFlight | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Requeue rounds a crash left running, then start watching."""
        for row in self.store.rounds("running"):
            self._requeue(row.id, row.preset)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="round-scheduler", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float) -> None:
        """Stop watching; a running round is stopped and requested again."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=grace_s + self.settings.poll_s + 5.0)
            self._thread = None
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            self.runs.stop(inflight.run_id)
            self._requeue(inflight.round_id, inflight.preset)

    def tick(self) -> None:
        """One look: settle the running round, or start the next one."""
        if self._inflight is not None:
            self._settle(self._inflight)
            return
        request = self.store.next_round_request()
        if request is None and self._enough_new_models():
            request = self.store.request_round(self.settings.preset)
            log.info(
                "%d or more new accepted models: round %d requested",
                self.settings.min_models,
                request.id,
            )
        if request is not None and self.runs.ready():
            self._launch(request)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.poll_s):
            try:
                self.tick()
            except (FlowerError, StoreError) as exc:
                log.warning("scheduler: %s (will retry)", exc)

    def _enough_new_models(self) -> bool:
        latest = self.store.latest_started_round()
        waiting = self.store.accepted_submissions(None if latest is None else latest.id)
        return len(waiting) >= self.settings.min_models

    def _launch(self, request: RoundRow) -> None:
        preset = request.preset or self.settings.preset
        self.store.start_round(request.id)
        try:
            run_id = self.runs.start(
                {
                    "home": str(self.home.root.resolve()),
                    "round-id": request.id,
                    "preset": preset,
                    "reply-timeout-s": float(self.settings.reply_timeout_s),
                    "workers": self.settings.workers,
                }
            )
        except FlowerError as exc:
            self.store.finish_round(request.id, f"could not start its Flower run: {exc.message}")
            raise
        self._inflight = _InFlight(request.id, run_id, preset)
        log.info("round %d started as Flower run %d (preset %s)", request.id, run_id, preset)

    def _settle(self, inflight: _InFlight) -> None:
        state = self.runs.state(inflight.run_id)
        if not state.finished:
            return
        self._inflight = None
        row = self.store.round(inflight.round_id)
        if row.state == "running":
            self.store.finish_round(
                inflight.round_id,
                f"its Flower run {inflight.run_id} ended ({state.describe()}) before the round"
                " finished; see HOME/flower/superlink.log",
            )
        log.info(
            "round %d: Flower run %d %s; round %s",
            inflight.round_id,
            inflight.run_id,
            state.describe(),
            self.store.round(inflight.round_id).state,
        )

    def _requeue(self, round_id: int, preset: str | None) -> None:
        try:
            self.store.finish_round(round_id, INTERRUPTED)
        except StoreError:
            return  # it ended meanwhile
        again = self.store.request_round(preset)
        log.info("round %d was interrupted; requested again as round %d", round_id, again.id)
