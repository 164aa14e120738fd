"""Protobuf messages of the exchange protocol to and from plain records.

The one `free_common` module that imports generated code. Pure functions named
``x_to_proto`` / ``x_from_proto`` convert each record of `free_common.types`;
``*_from_proto`` treats every message as untrusted and raises `WireError` with
one line naming the message and field when it is missing a field, holds an
unknown or unspecified enum value, is too big, or breaks a record's rules (the
record-level caps, such as `types.MAX_NUM_CLASSES`, live with the records).
The helpers at the end frame the two streams: a signed manifest or release
first, then non-empty chunks of at most `MAX_CHUNK_BYTES`.

Signatures are not checked here: they cover canonical bytes built from the
decoded record (`free_common.security`), never the protobuf bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Final, TypeVar

from free_common.errors import RecordError, WireError
from free_common.proto import exchange_pb2 as pb
from free_common.types import (
    MAX_VERSION,
    ChannelOrder,
    Receipt,
    ReceiptStatus,
    ReleaseManifest,
    ServerStatus,
    Signed,
    SubmissionManifest,
    TaskMetadata,
    Verdict,
    VerdictState,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "GRPC_MESSAGE_OPTIONS",
    "MAX_CHUNK_BYTES",
    "MAX_MANIFEST_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_SIGNATURE_BYTES",
    "read_release_stream",
    "read_submit_stream",
    "receipt_from_proto",
    "receipt_to_proto",
    "release_manifest_from_proto",
    "release_manifest_to_proto",
    "release_request_from_proto",
    "release_request_to_proto",
    "release_responses",
    "server_status_from_proto",
    "server_status_to_proto",
    "signed_manifest_from_proto",
    "signed_manifest_to_proto",
    "signed_receipt_from_proto",
    "signed_receipt_to_proto",
    "signed_release_from_proto",
    "signed_release_to_proto",
    "submission_manifest_from_proto",
    "submission_manifest_to_proto",
    "submit_requests",
    "task_metadata_from_proto",
    "task_metadata_to_proto",
    "verdict_from_proto",
    "verdict_request_from_proto",
    "verdict_request_to_proto",
    "verdict_to_proto",
]

MAX_CHUNK_BYTES: Final = 1024 * 1024
"""Largest payload chunk a peer may send in one stream message."""
DEFAULT_CHUNK_BYTES: Final = 256 * 1024
"""Chunk size senders use: small enough for steady progress, big enough to be cheap."""
MAX_MANIFEST_BYTES: Final = 1024 * 1024
"""Largest serialized signed manifest or release (a manifest at every record cap fits)."""
MAX_SIGNATURE_BYTES: Final = 512
"""Signature field cap; `security.verify` then requires exactly 64 bytes (Ed25519)."""
MAX_MESSAGE_BYTES: Final = max(MAX_CHUNK_BYTES, MAX_MANIFEST_BYTES) + 64 * 1024
"""gRPC message size cap for both directions (the largest message plus framing)."""
GRPC_MESSAGE_OPTIONS: Final = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)
"""Channel and server options that set the message caps on purpose."""

_E = TypeVar("_E")

_CHANNEL_ORDERS: Final[dict[ChannelOrder, pb.ChannelOrder.ValueType]] = {
    ChannelOrder.GRAY: pb.CHANNEL_ORDER_GRAY,
    ChannelOrder.RGB: pb.CHANNEL_ORDER_RGB,
    ChannelOrder.BGR: pb.CHANNEL_ORDER_BGR,
}
_RECEIPT_STATUSES: Final[dict[ReceiptStatus, pb.ReceiptStatus.ValueType]] = {
    ReceiptStatus.RECEIVED: pb.RECEIPT_STATUS_RECEIVED,
}
_VERDICT_STATES: Final[dict[VerdictState, pb.VerdictState.ValueType]] = {
    VerdictState.PENDING: pb.VERDICT_STATE_PENDING,
    VerdictState.ACCEPTED: pb.VERDICT_STATE_ACCEPTED,
    VerdictState.REFUSED: pb.VERDICT_STATE_REFUSED,
}


@contextmanager
def _decoding(message: str) -> Iterator[None]:
    """Turn a record's own complaint into a `WireError` that names the message."""
    try:
        yield
    except RecordError as err:
        raise WireError(f"{message}: {err}") from None


def _enum_from_proto(message: str, field: str, value: int, mapping: Mapping[_E, int]) -> _E:
    for plain, number in mapping.items():
        if number == value:
            return plain
    problem = "is missing" if value == 0 else f"has unknown value {value}"
    raise WireError(f"{message}: {field} {problem}")


def _check_size(message: str, size: int, cap: int) -> None:
    if size > cap:
        raise WireError(f"{message} is {size} bytes; at most {cap} are allowed")


def _check_signature(message: str, signature: bytes) -> bytes:
    if not signature:
        raise WireError(f"{message}: signature is missing")
    _check_size(f"{message} signature", len(signature), MAX_SIGNATURE_BYTES)
    return signature


# --- task metadata and submission manifest ---------------------------------------------


def task_metadata_to_proto(task: TaskMetadata) -> pb.TaskMetadata:
    """Convert task metadata to its message."""
    return pb.TaskMetadata(
        num_classes=task.num_classes,
        input_shape=task.input_shape,
        channel_order=_CHANNEL_ORDERS[task.channel_order],
        mean=task.mean,
        std=task.std,
        class_names=task.class_names,
    )


def task_metadata_from_proto(proto: pb.TaskMetadata) -> TaskMetadata:
    """Convert a task metadata message to a record.

    Raises
    ------
    WireError
        Missing or invalid fields, an unknown channel order, or too many values.
    """
    where = "TaskMetadata"
    order = _enum_from_proto(where, "channel_order", proto.channel_order, _CHANNEL_ORDERS)
    if len(proto.input_shape) != 3:
        raise WireError(
            f"{where}: input_shape must be [channels, height, width], "
            f"got {len(proto.input_shape)} values"
        )
    channels, height, width = proto.input_shape
    with _decoding(where):
        return TaskMetadata(
            num_classes=proto.num_classes,
            input_shape=(channels, height, width),
            channel_order=order,
            mean=tuple(proto.mean),
            std=tuple(proto.std),
            class_names=tuple(proto.class_names),
        )


def submission_manifest_to_proto(manifest: SubmissionManifest) -> pb.SubmissionManifest:
    """Convert a submission manifest to its message."""
    return pb.SubmissionManifest(
        client_id=manifest.client_id,
        payload_sha256=manifest.payload_sha256,
        payload_size=manifest.payload_size,
        format=manifest.format,
        task=task_metadata_to_proto(manifest.task),
        created_at_ms=manifest.created_at_ms,
        nonce=manifest.nonce,
    )


def submission_manifest_from_proto(proto: pb.SubmissionManifest) -> SubmissionManifest:
    """Convert a submission manifest message to a record.

    Raises
    ------
    WireError
        A missing task, or any invalid field.
    """
    where = "SubmissionManifest"
    if not proto.HasField("task"):
        raise WireError(f"{where}: task is missing")
    task = task_metadata_from_proto(proto.task)
    with _decoding(where):
        return SubmissionManifest(
            client_id=proto.client_id,
            payload_sha256=proto.payload_sha256,
            payload_size=proto.payload_size,
            task=task,
            created_at_ms=proto.created_at_ms,
            nonce=proto.nonce,
            format=proto.format,
        )


def signed_manifest_to_proto(signed: Signed[SubmissionManifest]) -> pb.SignedManifest:
    """Convert a signed submission manifest to its message."""
    return pb.SignedManifest(
        manifest=submission_manifest_to_proto(signed.record), signature=signed.signature
    )


def signed_manifest_from_proto(proto: pb.SignedManifest) -> Signed[SubmissionManifest]:
    """Convert a signed manifest message to a record; the signature is not checked here.

    Raises
    ------
    WireError
        Too big, missing manifest or signature, or an invalid manifest.
    """
    where = "SignedManifest"
    _check_size(where, proto.ByteSize(), MAX_MANIFEST_BYTES)
    if not proto.HasField("manifest"):
        raise WireError(f"{where}: manifest is missing")
    signature = _check_signature(where, proto.signature)
    return Signed(submission_manifest_from_proto(proto.manifest), signature)


# --- receipt -------------------------------------------------------------------------------


def receipt_to_proto(receipt: Receipt) -> pb.Receipt:
    """Convert a receipt to its message."""
    return pb.Receipt(
        submission_id=receipt.submission_id,
        client_id=receipt.client_id,
        payload_sha256=receipt.payload_sha256,
        payload_size=receipt.payload_size,
        received_at_ms=receipt.received_at_ms,
        status=_RECEIPT_STATUSES[receipt.status],
        server_key_id=receipt.server_key_id,
    )


def receipt_from_proto(proto: pb.Receipt) -> Receipt:
    """Convert a receipt message to a record.

    Raises
    ------
    WireError
        An unknown status or any invalid field.
    """
    where = "Receipt"
    status = _enum_from_proto(where, "status", proto.status, _RECEIPT_STATUSES)
    with _decoding(where):
        return Receipt(
            submission_id=proto.submission_id,
            client_id=proto.client_id,
            payload_sha256=proto.payload_sha256,
            payload_size=proto.payload_size,
            received_at_ms=proto.received_at_ms,
            server_key_id=proto.server_key_id,
            status=status,
        )


def signed_receipt_to_proto(signed: Signed[Receipt]) -> pb.SignedReceipt:
    """Convert a signed receipt to its message."""
    return pb.SignedReceipt(receipt=receipt_to_proto(signed.record), signature=signed.signature)


def signed_receipt_from_proto(proto: pb.SignedReceipt) -> Signed[Receipt]:
    """Convert a signed receipt message to a record; the signature is not checked here.

    Raises
    ------
    WireError
        Missing receipt or signature, or an invalid receipt.
    """
    where = "SignedReceipt"
    if not proto.HasField("receipt"):
        raise WireError(f"{where}: receipt is missing")
    signature = _check_signature(where, proto.signature)
    return Signed(receipt_from_proto(proto.receipt), signature)


# --- verdict ------------------------------------------------------------------------------


def verdict_request_to_proto(submission_id: str) -> pb.GetVerdictRequest:
    """Build the request for one submission's verdict."""
    return pb.GetVerdictRequest(submission_id=submission_id)


def verdict_request_from_proto(proto: pb.GetVerdictRequest) -> str:
    """Return the submission id a verdict request asks about.

    Raises
    ------
    WireError
        A missing or malformed submission id.
    """
    submission_id = proto.submission_id
    # A pending verdict is the cheapest record that validates an id on its own.
    with _decoding("GetVerdictRequest"):
        Verdict(submission_id, VerdictState.PENDING)
    return submission_id


def verdict_to_proto(verdict: Verdict) -> pb.Verdict:
    """Convert a verdict to its message."""
    proto = pb.Verdict(
        submission_id=verdict.submission_id,
        state=_VERDICT_STATES[verdict.state],
        reason=verdict.reason,
    )
    if verdict.decided_at_ms is not None:
        proto.decided_at_ms = verdict.decided_at_ms
    return proto


def verdict_from_proto(proto: pb.Verdict) -> Verdict:
    """Convert a verdict message to a record.

    Raises
    ------
    WireError
        An unknown state, or fields that do not fit the state.
    """
    where = "Verdict"
    state = _enum_from_proto(where, "state", proto.state, _VERDICT_STATES)
    with _decoding(where):
        return Verdict(
            submission_id=proto.submission_id,
            state=state,
            reason=proto.reason,
            decided_at_ms=proto.decided_at_ms if proto.HasField("decided_at_ms") else None,
        )


# --- release ------------------------------------------------------------------------------


def release_manifest_to_proto(release: ReleaseManifest) -> pb.ReleaseManifest:
    """Convert a release manifest to its message."""
    return pb.ReleaseManifest(
        version=release.version,
        architecture=release.architecture,
        config_json=release.config_json,
        payload_sha256=release.payload_sha256,
        payload_size=release.payload_size,
        source_submission_ids=release.source_submission_ids,
        metrics_json=release.metrics_json,
        created_at_ms=release.created_at_ms,
        server_key_id=release.server_key_id,
    )


def release_manifest_from_proto(proto: pb.ReleaseManifest) -> ReleaseManifest:
    """Convert a release manifest message to a record.

    Raises
    ------
    WireError
        Any invalid field (including JSON text that is not a JSON object).
    """
    with _decoding("ReleaseManifest"):
        return ReleaseManifest(
            version=proto.version,
            architecture=proto.architecture,
            config_json=proto.config_json,
            payload_sha256=proto.payload_sha256,
            payload_size=proto.payload_size,
            source_submission_ids=tuple(proto.source_submission_ids),
            metrics_json=proto.metrics_json,
            created_at_ms=proto.created_at_ms,
            server_key_id=proto.server_key_id,
        )


def signed_release_to_proto(signed: Signed[ReleaseManifest]) -> pb.SignedRelease:
    """Convert a signed release manifest to its message."""
    return pb.SignedRelease(
        manifest=release_manifest_to_proto(signed.record), signature=signed.signature
    )


def signed_release_from_proto(proto: pb.SignedRelease) -> Signed[ReleaseManifest]:
    """Convert a signed release message to a record; the signature is not checked here.

    Raises
    ------
    WireError
        Too big, missing manifest or signature, or an invalid manifest.
    """
    where = "SignedRelease"
    _check_size(where, proto.ByteSize(), MAX_MANIFEST_BYTES)
    if not proto.HasField("manifest"):
        raise WireError(f"{where}: manifest is missing")
    signature = _check_signature(where, proto.signature)
    return Signed(release_manifest_from_proto(proto.manifest), signature)


def release_request_to_proto(version: int | None = None) -> pb.FetchReleaseRequest:
    """Build the request for one release version, or the latest one when ``version`` is None.

    Raises
    ------
    WireError
        A version outside 1 .. `types.MAX_VERSION`.
    """
    if version is None:
        return pb.FetchReleaseRequest()
    _check_version(version)
    return pb.FetchReleaseRequest(version=version)


def release_request_from_proto(proto: pb.FetchReleaseRequest) -> int | None:
    """Return the version a release request asks for, ``None`` meaning the latest."""
    return proto.version or None


def _check_version(version: int) -> None:
    if type(version) is not int or not 1 <= version <= MAX_VERSION:
        raise WireError(f"release version must be in [1, {MAX_VERSION}], got {version!r}")


# --- status -------------------------------------------------------------------------------


def server_status_to_proto(status: ServerStatus) -> pb.ServerStatus:
    """Convert a server status to its message."""
    proto = pb.ServerStatus(
        server_version=status.server_version,
        server_key_id=status.server_key_id,
        submissions_pending=status.submissions_pending,
        submissions_accepted=status.submissions_accepted,
        submissions_refused=status.submissions_refused,
        releases=status.releases,
    )
    if status.latest_release is not None:
        proto.latest_release = status.latest_release
    return proto


def server_status_from_proto(proto: pb.ServerStatus) -> ServerStatus:
    """Convert a server status message to a record.

    Raises
    ------
    WireError
        Any invalid field, or a latest release that disagrees with the count.
    """
    with _decoding("ServerStatus"):
        return ServerStatus(
            server_version=proto.server_version,
            server_key_id=proto.server_key_id,
            submissions_pending=proto.submissions_pending,
            submissions_accepted=proto.submissions_accepted,
            submissions_refused=proto.submissions_refused,
            releases=proto.releases,
            latest_release=proto.latest_release if proto.HasField("latest_release") else None,
        )


# --- streams ------------------------------------------------------------------------------


def _check_chunk(stream: str, chunk: bytes) -> bytes:
    if not chunk:
        raise WireError(f"{stream} stream: a chunk is empty")
    _check_size(f"{stream} stream: a chunk", len(chunk), MAX_CHUNK_BYTES)
    return chunk


def submit_requests(
    signed: Signed[SubmissionManifest], chunks: Iterable[bytes]
) -> Iterator[pb.SubmitRequest]:
    """Yield the Submit stream: the signed manifest, then one message per chunk.

    Parameters
    ----------
    signed
        The signed manifest of the upload.
    chunks
        The payload in order, each chunk 1 .. `MAX_CHUNK_BYTES` bytes.

    Raises
    ------
    WireError
        An empty or oversized chunk.
    """
    yield pb.SubmitRequest(manifest=signed_manifest_to_proto(signed))
    for chunk in chunks:
        yield pb.SubmitRequest(chunk=_check_chunk("Submit", chunk))


def read_submit_stream(
    requests: Iterable[pb.SubmitRequest],
) -> tuple[Signed[SubmissionManifest], Iterator[bytes]]:
    """Split a Submit stream into its signed manifest and an iterator over payload chunks.

    The chunk iterator raises `WireError` on a second manifest, an empty or oversized
    chunk, or more bytes than the manifest's ``payload_size``; the caller checks that
    the total is not short and that the sha256 matches.

    Raises
    ------
    WireError
        An empty stream, or a stream that does not start with a valid signed manifest.
    """
    stream = iter(requests)
    first = next(stream, None)
    if first is None:
        raise WireError("Submit stream is empty: send the signed manifest first")
    if first.WhichOneof("kind") != "manifest":
        raise WireError("Submit stream must start with the signed manifest")
    signed = signed_manifest_from_proto(first.manifest)
    return signed, _chunks("Submit", stream, "manifest", signed.record.payload_size)


def release_responses(
    signed: Signed[ReleaseManifest], chunks: Iterable[bytes]
) -> Iterator[pb.FetchReleaseResponse]:
    """Yield the FetchRelease stream: the signed release, then one message per chunk.

    Raises
    ------
    WireError
        An empty or oversized chunk.
    """
    yield pb.FetchReleaseResponse(release=signed_release_to_proto(signed))
    for chunk in chunks:
        yield pb.FetchReleaseResponse(chunk=_check_chunk("FetchRelease", chunk))


def read_release_stream(
    responses: Iterable[pb.FetchReleaseResponse],
) -> tuple[Signed[ReleaseManifest], Iterator[bytes]]:
    """Split a FetchRelease stream into its signed release and an iterator over blob chunks.

    The chunk iterator raises `WireError` like `read_submit_stream`'s does.

    Raises
    ------
    WireError
        An empty stream, or a stream that does not start with a valid signed release.
    """
    stream = iter(responses)
    first = next(stream, None)
    if first is None:
        raise WireError("FetchRelease stream is empty: the server sent no release")
    if first.WhichOneof("kind") != "release":
        raise WireError("FetchRelease stream must start with the signed release")
    signed = signed_release_from_proto(first.release)
    return signed, _chunks("FetchRelease", stream, "release", signed.record.payload_size)


def _chunks(
    stream: str,
    messages: Iterator[pb.SubmitRequest] | Iterator[pb.FetchReleaseResponse],
    head: str,
    limit: int,
) -> Iterator[bytes]:
    received = 0
    for message in messages:
        if message.WhichOneof("kind") != "chunk":
            raise WireError(f"{stream} stream: a second {head} arrived; only chunks may follow")
        chunk = _check_chunk(stream, message.chunk)
        received += len(chunk)
        if received > limit:
            raise WireError(
                f"{stream} stream carries more than the {limit} bytes its {head} declares"
            )
        yield chunk
