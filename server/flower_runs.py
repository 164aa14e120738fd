"""Start and watch Flower runs of the round app on the loopback SuperLink.

A meta round is a Flower run: the aggregator submits the round app's bundle
(`free_common.flower_app.app_bundle`, the same bytes owners pin) through the
Control API on 127.0.0.1, with the round's settings as run-config overrides.
This is what ``flwr run <app> <connection> --run-config ...`` does, minus the
``flwr`` CLI's config files: the SuperLink then starts ``flwr-serverapp``, which
loads `free_server.server_app` from the installed package (the bundle holds no
code), and the ServerApp reaches every online SuperNode through the Runtime API.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import httpx
from flwr.common.constant import Status, SubStatus
from flwr.common.serde import fab_to_proto, user_config_to_proto
from flwr.proto.control_pb2 import (
    ListRunsRequest,
    StartRunRequest,
    StopRunRequest,
)
from flwr.supercore.fab import Fab

from free_common.errors import FlowerError
from free_common.flower_app import RUN_CONFIG_DEFAULTS, app_bundle
from free_server.superlink import SuperLinkSupervisor

__all__ = ["FlowerRuns", "RunState"]


@dataclass(frozen=True)
class RunState:
    """Where a Flower run is.

    Attributes
    ----------
    status
        ``pending``, ``starting``, ``running`` or ``finished``.
    sub_status
        For a finished run: ``completed``, ``failed`` or ``stopped``.
    details
        Flower's words about a failure (e.g. the ServerApp's exception).
    """

    status: str
    sub_status: str = ""
    details: str = ""

    @property
    def finished(self) -> bool:
        """Whether the run has ended, one way or another."""
        return bool(self.status == Status.FINISHED)

    @property
    def completed(self) -> bool:
        """Whether the run ended without error."""
        return self.finished and bool(self.sub_status == SubStatus.COMPLETED)

    def describe(self) -> str:
        """``status:sub_status (details)``, for messages."""
        text = f"{self.status}:{self.sub_status}" if self.sub_status else self.status
        return f"{text} ({self.details})" if self.details else text


class FlowerRuns:
    """Submits and watches runs of the round app.

    Parameters
    ----------
    superlink
        The supervised loopback SuperLink.
    """

    def __init__(self, superlink: SuperLinkSupervisor) -> None:
        self.superlink = superlink
        self._fab = app_bundle()
        self._fab_hash = hashlib.sha256(self._fab).hexdigest()

    @property
    def bundle_sha256(self) -> str:
        """sha256 of the bundle every run ships (what owners pin)."""
        return self._fab_hash

    def ready(self) -> bool:
        """Whether runs can be started now."""
        return self.superlink.ready()

    def start(self, settings: Mapping[str, str | int | float]) -> int:
        """Start a run of the round app with these run settings; return its run id.

        Raises
        ------
        FlowerError
            A setting is not one of the app's, or the SuperLink refused or is down.
        """
        unknown = sorted(set(settings) - set(RUN_CONFIG_DEFAULTS))
        if unknown:
            raise FlowerError(f"the round app has no run setting {unknown[0]!r}")
        request = StartRunRequest(
            fab=fab_to_proto(Fab(self._fab_hash, self._fab, {})),
            override_config=user_config_to_proto(dict(settings)),
            federation="",
        )
        try:
            with self.superlink.control() as control:
                response = control.StartRun(request)
        except httpx.HTTPError as exc:
            raise FlowerError(f"the Flower SuperLink did not start the run: {exc}") from None
        if not response.HasField("run_id"):
            raise FlowerError("the Flower SuperLink did not start the round's run (no run id)")
        return int(response.run_id)

    def state(self, run_id: int) -> RunState:
        """Return where run `run_id` is.

        Raises
        ------
        FlowerError
            The SuperLink cannot be asked, or does not know the run.
        """
        try:
            with self.superlink.control() as control:
                response = control.ListRuns(ListRunsRequest(run_id=run_id))
        except httpx.HTTPError as exc:
            raise FlowerError(f"cannot ask the SuperLink about run {run_id}: {exc}") from None
        if run_id not in response.run_dict:
            raise FlowerError(f"the Flower SuperLink does not know run {run_id}")
        status = response.run_dict[run_id].status
        return RunState(status.status, status.sub_status, status.details)

    def stop(self, run_id: int) -> None:
        """Ask the SuperLink to stop a run (its ServerApp gets SIGTERM); errors are ignored."""
        try:
            with self.superlink.control() as control:
                control.StopRun(StopRunRequest(run_id=run_id))
        except httpx.HTTPError:
            pass  # a run that already ended, or a SuperLink that is going away anyway
