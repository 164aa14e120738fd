"""Receive one upload: the cheap checks, the durable write, the signed receipt.

The order is DESIGN.md section 3's. Before a byte is written: the key is on
the allow-list, the manifest's signature verifies with it, its time is inside
the window, and the announced size is under the cap. While streaming: the cap
again (a peer may lie about the size). After: size and sha256 equal the
manifest's, and the static ONNX checks pass on the staged bytes. Only then does
the store decide between an idempotent retry (the original receipt) and a new
submission (its nonce must be new), place the blob and commit the row; the
receipt, signed by the server key, is built from that committed row, so a retry
gets the very same receipt. Any refusal leaves nothing behind: the staged file
is removed when the writer closes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from free_common.errors import PayloadMismatch, PayloadTooLarge, SignatureError
from free_common.models.metadata import task_to_dict
from free_common.models.onnx_static import IntakeLimits, check_static
from free_common.security.call_auth import check_time_window
from free_common.security.canonical import canonical_bytes
from free_common.security.keys import key_id, public_key_from_pem
from free_common.security.signing import sign, verify
from free_common.types import Receipt, Signed, SubmissionManifest, TaskMetadata
from free_server.blobs import StagedBlob
from free_server.records import SubmissionResult, SubmissionRow
from free_server.static_checks import StaticOutcome
from free_server.store import Store

__all__ = [
    "StaticCheck",
    "SubmissionPolicy",
    "Upload",
    "receipt_for",
    "receive_submission",
    "unix_ms",
]

StaticCheck = Callable[[Path, TaskMetadata | None], StaticOutcome]
"""Runs the static ONNX checks on a staged file, raising the `IntakeError` that refuses it.

The server's is `free_server.static_checks.StaticCheckPool.check` (worker processes);
without one, `receive_submission` checks in this process.
"""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def unix_ms(moment: datetime) -> int:
    """Exact Unix milliseconds of a timezone-aware time."""
    return (moment - _EPOCH) // timedelta(milliseconds=1)


@dataclass(frozen=True)
class SubmissionPolicy:
    """What the server accepts at receipt time.

    Attributes
    ----------
    max_upload_bytes
        Largest payload; a bigger announced size is refused before streaming.
    time_window_ms
        How far a manifest's creation time may be from the server's clock.
    intake_limits
        Caps of the static ONNX checks (its ``max_bytes`` should not be below
        ``max_upload_bytes``).
    """

    max_upload_bytes: int
    time_window_ms: int
    intake_limits: IntakeLimits


@dataclass(frozen=True)
class Upload:
    """What `receive_submission` did: the signed receipt and the store's answer."""

    receipt: Signed[Receipt]
    result: SubmissionResult


def receipt_for(row: SubmissionRow, server_key: Ed25519PrivateKey) -> Signed[Receipt]:
    """Sign the receipt of a stored submission (deterministic: same row, same receipt)."""
    receipt = Receipt(
        submission_id=str(row.id),
        client_id=row.client_key_id,
        payload_sha256=row.sha256,
        payload_size=row.size,
        received_at_ms=unix_ms(row.received_at),
        server_key_id=key_id(server_key.public_key()),
    )
    return sign(server_key, receipt)


def _check_manifest(
    store: Store,
    signed: Signed[SubmissionManifest],
    policy: SubmissionPolicy,
    caller: str | None,
    now: int,
) -> SubmissionManifest:
    manifest = signed.record
    client = store.active_client(manifest.client_id)
    if caller is not None and caller != manifest.client_id:
        raise SignatureError(
            f"the manifest is signed for client {manifest.client_id}, but the call is made by"
            f" {caller}: sign the manifest with the same client.key"
        )
    public_key = public_key_from_pem(client.public_key_pem.encode("ascii"), "allow-list entry")
    verify(public_key, signed)
    check_time_window("manifest", manifest.created_at_ms, now, policy.time_window_ms)
    if manifest.payload_size > policy.max_upload_bytes:
        raise PayloadTooLarge(
            f"the model is {manifest.payload_size:,} bytes; this server accepts at most"
            f" {policy.max_upload_bytes:,}: export a smaller model"
        )
    return manifest


def _check_payload(staged: StagedBlob, manifest: SubmissionManifest) -> None:
    if staged.size != manifest.payload_size:
        raise PayloadMismatch(
            f"the upload ended after {staged.size:,} of the {manifest.payload_size:,} bytes the"
            " manifest announces: the stream was cut; submit again"
        )
    if staged.sha256 != manifest.payload_sha256:
        raise PayloadMismatch(
            f"the uploaded bytes have sha256 {staged.sha256}, but the manifest announces"
            f" {manifest.payload_sha256}: the file changed while uploading; submit again"
        )


def receive_submission(
    store: Store,
    server_key: Ed25519PrivateKey,
    signed: Signed[SubmissionManifest],
    chunks: Iterable[bytes],
    policy: SubmissionPolicy,
    *,
    caller: str | None,
    now: int,
    static_check: StaticCheck | None = None,
) -> Upload:
    """Check, store and acknowledge one upload.

    Parameters
    ----------
    store
        The server's store.
    server_key
        The server's Ed25519 key, which signs the receipt.
    signed
        The signed manifest (decoded, not yet trusted).
    chunks
        The payload, in order (read lazily: nothing is streamed before the
        manifest is checked).
    policy
        Caps and time window.
    caller
        Key id the call was authenticated with; it must be the manifest's.
    now
        The server's time, Unix milliseconds.
    static_check
        Where the static checks run; None runs them here, holding the model in memory.

    Returns
    -------
    Upload
        The signed receipt; for a retry of stored bytes, the original one.

    Raises
    ------
    UnknownClient, RevokedClient, SignatureError, StaleRequest
        The manifest cannot be trusted.
    PayloadTooLarge, PayloadMismatch, WireError
        The bytes are not what the manifest announced, or too many.
    IntakeError
        The static ONNX checks refuse the model.
    ReplayError
        A used nonce with other bytes.
    """
    manifest = _check_manifest(store, signed, policy, caller, now)
    with store.blob_writer(policy.max_upload_bytes) as writer:
        for chunk in chunks:
            writer.write(chunk)
        staged = writer.finish()
        _check_payload(staged, manifest)
        if static_check is None:
            report = check_static(
                staged.path.read_bytes(), task=manifest.task, limits=policy.intake_limits
            )
            outcome = StaticOutcome(report.warnings, report.dp)
        else:
            outcome = static_check(staged.path, manifest.task)
        metadata = task_to_dict(manifest.task)
        if outcome.dp is not None:
            # The model's declared DP guarantee is kept beside its task (status, releases).
            metadata["dp"] = {"epsilon": outcome.dp.epsilon, "delta": outcome.dp.delta}
        result = store.record_submission(
            staged,
            client_key_id=manifest.client_id,
            manifest=canonical_bytes(manifest),
            signature=signed.signature,
            nonce=manifest.nonce,
            task_metadata=metadata,
        )
    return Upload(receipt_for(result.row, server_key), result)
