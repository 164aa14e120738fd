"""Rows of the server store, as frozen dataclasses.

These are the store's view of its tables; the signed wire records (manifests,
receipts, releases) are in `free_common.types` and travel as the canonical
bytes kept in `manifest` columns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from free_common.types import DpGuarantee

__all__ = [
    "ClientRow",
    "ClientState",
    "EvaluationRow",
    "RecoveryReport",
    "ReleaseRow",
    "Revocation",
    "RoundRow",
    "RoundState",
    "StoreSummary",
    "SubmissionCount",
    "SubmissionResult",
    "SubmissionRow",
    "SubmissionState",
]

SubmissionState = Literal["received", "accepted", "refused"]
SubmissionCount = Literal["received", "accepted", "refused", "held", "withdrawn"]
"""What status counts: withdrawn submissions apart, whatever their verdict."""
ClientState = Literal["active", "revoked", "replaced"]
RoundState = Literal["requested", "running", "finished", "failed"]


@dataclass(frozen=True)
class ClientRow:
    """One key of a data owner on the allow-list.

    An owner has one row per key it was given (`Store.rotate_client` adds one), all
    under its name; only the newest, whose `replaced_at` is None, can be active.
    """

    name: str
    key_id: str
    public_key_pem: str
    node_public_key: str | None
    added_at: datetime
    revoked_at: datetime | None
    replaced_at: datetime | None

    @property
    def active(self) -> bool:
        """Whether this key may be used (the owner is not revoked, the key not replaced)."""
        return self.revoked_at is None and self.replaced_at is None

    @property
    def state(self) -> ClientState:
        """``active``, ``revoked`` (the owner), or ``replaced`` (this key, by a newer one)."""
        if self.replaced_at is not None:
            return "replaced"
        return "active" if self.revoked_at is None else "revoked"


@dataclass(frozen=True)
class SubmissionRow:
    """One stored model submission and its intake state."""

    id: int
    client_key_id: str
    sha256: str
    size: int
    manifest: bytes
    signature: bytes
    nonce: bytes
    task_metadata_json: str
    received_at: datetime
    state: SubmissionState
    reason: str | None
    verdict_at: datetime | None
    withdrawn_at: datetime | None
    """Set when its owner was revoked: no round started later reads it."""
    held_at: datetime | None = None
    """Set while screening or the operator holds it: out of intake and of every round."""
    hold_reason: str | None = None
    screening_json: str | None = None
    """The screening report (`free_common.screening.ScreeningReport.to_dict`) as JSON."""

    @property
    def task_metadata(self) -> dict[str, Any]:
        """The task metadata, parsed from its stored JSON."""
        parsed: dict[str, Any] = json.loads(self.task_metadata_json)
        return parsed

    @property
    def dp(self) -> DpGuarantee | None:
        """The DP guarantee the model declares (its ``free.dp_*`` metadata), or None."""
        declared = self.task_metadata.get("dp")
        if not isinstance(declared, dict):
            return None
        return DpGuarantee(float(declared["epsilon"]), float(declared["delta"]))

    @property
    def screening(self) -> dict[str, Any] | None:
        """The screening report, or None for a submission that was not screened."""
        if self.screening_json is None:
            return None
        parsed: dict[str, Any] = json.loads(self.screening_json)
        return parsed

    @property
    def status(self) -> str:
        """``held`` while held, else the intake state."""
        return "held" if self.held_at is not None else self.state


@dataclass(frozen=True)
class SubmissionResult:
    """What `Store.record_submission` did.

    Attributes
    ----------
    row
        The stored submission; for a retry, the original one.
    duplicate
        True when these exact bytes were already stored for this client, so
        the original receipt is answered again and nothing new was written.
    """

    row: SubmissionRow
    duplicate: bool


@dataclass(frozen=True)
class Revocation:
    """What `Store.revoke_client` did.

    Attributes
    ----------
    client
        The owner's current row, now revoked.
    withdrawn
        How many of its received or accepted submissions were withdrawn now.
    """

    client: ClientRow
    withdrawn: int


@dataclass(frozen=True)
class RoundRow:
    """One meta round, from request to its end."""

    id: int
    requested_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    state: RoundState
    preset: str | None
    error: str | None


@dataclass(frozen=True)
class ReleaseRow:
    """One published, server-signed release."""

    version: int
    round_id: int | None
    sha256: str
    size: int
    manifest: bytes
    signature: bytes
    created_at: datetime


@dataclass(frozen=True)
class EvaluationRow:
    """One node's federated evaluation reply for a round."""

    round_id: int
    node_id: str
    metrics: dict[str, float]
    created_at: datetime


@dataclass(frozen=True)
class StoreSummary:
    """Everything `free-server status` shows, read in one consistent snapshot."""

    schema_version: int
    clients: list[ClientRow]
    submission_counts: dict[SubmissionCount, int]
    submissions: list[SubmissionRow]
    rounds: list[RoundRow]
    releases: list[ReleaseRow]
    evaluations: list[EvaluationRow]


@dataclass(frozen=True)
class RecoveryReport:
    """What `Store.recover` cleaned after a crash."""

    temp_files: int = 0
    orphan_blobs: list[str] = field(default_factory=list)
