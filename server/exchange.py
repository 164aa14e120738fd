"""What the exchange service does, in plain records: the servicer only converts and translates.

`ExchangeService` answers the four calls of ``proto/.../exchange.proto`` from
the store: `submit` (see `free_server.submission`), `verdict` (only the
submitting owner may read a verdict, with any of its keys since rotation; others
get "not found", so ids reveal nothing), `release` (checks the stored release
before serving it, and the blob while streaming it) and `status`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from free_common import __version__
from free_common.errors import CanonicalFormError, DamagedRecord, RecordNotFound
from free_common.security.call_auth import now_ms
from free_common.security.canonical import record_from_canonical
from free_common.security.keys import key_id
from free_common.security.signing import signature_is_valid
from free_common.types import (
    MAX_REASON_CHARS,
    Receipt,
    ReleaseManifest,
    ServerStatus,
    Signed,
    SubmissionManifest,
    Verdict,
    VerdictState,
)
from free_server.records import ReleaseRow, SubmissionRow
from free_server.store import Store
from free_server.submission import StaticCheck, SubmissionPolicy, receive_submission, unix_ms

__all__ = ["ExchangeService", "ReleaseDownload", "one_line_reason"]

log = logging.getLogger("free_server.exchange")

_STATES: dict[str, VerdictState] = {
    "received": VerdictState.PENDING,
    "accepted": VerdictState.ACCEPTED,
    "refused": VerdictState.REFUSED,
}


def one_line_reason(text: str) -> str:
    """Fit a refusal reason to a verdict: one line, at most `MAX_REASON_CHARS` characters."""
    line = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    if len(line) > MAX_REASON_CHARS:
        line = line[: MAX_REASON_CHARS - 3] + "..."
    return line or "refused by intake"


def _verdict(row: SubmissionRow) -> Verdict:
    state = _STATES[row.state]
    if state is VerdictState.PENDING or row.verdict_at is None:
        return Verdict(str(row.id), VerdictState.PENDING)
    reason = one_line_reason(row.reason or "") if state is VerdictState.REFUSED else ""
    return Verdict(str(row.id), state, reason, unix_ms(row.verdict_at))


@dataclass(frozen=True)
class ReleaseDownload:
    """A release to serve: its signed manifest and its weights, in chunks."""

    signed: Signed[ReleaseManifest]
    chunks: Iterator[bytes]


class ExchangeService:
    """The exchange service's behaviour, free of gRPC.

    Parameters
    ----------
    store
        The server's store.
    server_key
        Signs receipts; its public half checks stored releases before serving.
    policy
        Caps and time window for uploads.
    chunk_bytes
        Size of release download chunks.
    on_received
        Called with the id of every newly stored submission (wakes intake).
    static_check
        Where the static checks before a receipt run (see `receive_submission`).
    clock
        Unix milliseconds now.
    """

    def __init__(
        self,
        store: Store,
        server_key: Ed25519PrivateKey,
        policy: SubmissionPolicy,
        *,
        chunk_bytes: int,
        on_received: Callable[[int], None] = lambda _id: None,
        static_check: StaticCheck | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.store = store
        self._key = server_key
        self.key_id = key_id(server_key.public_key())
        self._policy = policy
        self._chunk_bytes = chunk_bytes
        self._on_received = on_received
        self._static_check = static_check
        self._clock = clock

    def submit(
        self, signed: Signed[SubmissionManifest], chunks: Iterable[bytes], caller: str
    ) -> Signed[Receipt]:
        """Check and store an upload; return its signed receipt (see `receive_submission`)."""
        upload = receive_submission(
            self.store,
            self._key,
            signed,
            chunks,
            self._policy,
            caller=caller,
            now=self._clock(),
            static_check=self._static_check,
        )
        row = upload.result.row
        if upload.result.duplicate:
            log.info("submission %s from %s: retry, original receipt", row.id, caller)
        else:
            log.info("submission %s from %s stored (%d bytes)", row.id, caller, row.size)
            self._on_received(row.id)
        return upload.receipt

    def verdict(self, submission_id: str, caller: str) -> Verdict:
        """Return the verdict on one of the caller's owner's submissions.

        The owner, not the exact key, is compared: after `clients rotate` the new
        key reads the verdicts of submissions signed with the old one. Names
        identify owners (a name is never given to another owner).

        Raises
        ------
        RecordNotFound
            No such submission, or it is another owner's.
        """
        missing = RecordNotFound(
            f"no submission {submission_id} of yours on this server: use the id of your receipt"
        )
        if not submission_id.isdigit() or len(submission_id) > 18:
            raise missing
        try:
            row = self.store.submission(int(submission_id))
        except RecordNotFound:
            raise missing from None
        if row.client_key_id != caller:
            submitter = self.store.client_by_key_id(row.client_key_id)
            asker = self.store.client_by_key_id(caller)
            if submitter is None or asker is None or submitter.name != asker.name:
                raise missing
        return _verdict(row)

    def release(self, version: int | None) -> ReleaseDownload:
        """Return a release (the latest when `version` is None), checked, ready to stream.

        Raises
        ------
        RecordNotFound
            No such release, or none published yet.
        DamagedRecord
            The stored manifest or weights no longer match the server's signature.
        """
        if version is None:
            row = self.store.latest_release()
            if row is None:
                raise RecordNotFound(
                    "no release has been published yet: wait for the first meta round"
                )
        else:
            row = self.store.release(version)
        signed = self._checked_release(row)
        path = self.store.blob_path(row.sha256)
        return ReleaseDownload(signed, self._blob_chunks(path, signed.record))

    def _checked_release(self, row: ReleaseRow) -> Signed[ReleaseManifest]:
        damaged = DamagedRecord(
            f"release {row.version} is damaged on the server (it no longer matches its"
            " signature); the aggregator must restore it from a backup"
        )
        try:
            record = record_from_canonical(row.manifest, ReleaseManifest)
        except CanonicalFormError:
            raise damaged from None
        signed = Signed(record, row.signature)
        if not signature_is_valid(self._key.public_key(), signed):
            raise damaged
        if (record.payload_sha256, record.payload_size) != (row.sha256, row.size):
            raise damaged
        return signed

    def _blob_chunks(self, path: Path, release: ReleaseManifest) -> Iterator[bytes]:
        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as blob:
            while chunk := blob.read(self._chunk_bytes):
                digest.update(chunk)
                size += len(chunk)
                yield chunk
        # A blob altered on disk is caught here, before the client sees a clean end.
        if (digest.hexdigest(), size) != (release.payload_sha256, release.payload_size):
            raise DamagedRecord(
                f"the weights of release {release.version} are damaged on the server (sha256"
                " differs from the signed manifest); the aggregator must restore them"
            )

    def status(self) -> ServerStatus:
        """Return the server's version, key id and counters."""
        summary = self.store.summary(recent=0)
        latest = self.store.latest_release()
        counts = summary.submission_counts
        return ServerStatus(
            server_version=__version__,
            server_key_id=self.key_id,
            submissions_pending=counts["received"],
            submissions_accepted=counts["accepted"],
            submissions_refused=counts["refused"],
            # Versions are handed out 1, 2, ... by next_release_version.
            releases=0 if latest is None else latest.version,
            latest_release=None if latest is None else latest.version,
        )
