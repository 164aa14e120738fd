"""Property-based fuzzing of message decoding (`free_common.wire`), both directions.

Whatever a peer sends, decoding ends in a record or a `WireError`, never another
exception: raw bytes (protobuf's own `DecodeError` is the other possible end, and
the gRPC layer answers it before `wire` runs), byte mutations of valid messages,
and messages whose every field holds an arbitrary value of its protobuf type. The
client-side decoders (receipts, verdicts, releases, status) are fuzzed too: a
hostile server or a man in the middle sends those. Valid records drawn from the
strategies of `test_wire` decode to themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError, Message
from hypothesis import given, settings
from hypothesis import strategies as st
from test_wire import manifests, receipts, releases, tasks, verdicts

from free_common import wire
from free_common.errors import WireError
from free_common.proto import exchange_pb2 as pb
from free_common.types import Signed

FUZZ = settings(max_examples=150, deadline=None)

# Text protobuf accepts (no lone surrogates), of any script.
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)
uint32 = st.integers(0, 2**32 - 1)
uint64 = st.integers(0, 2**64 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
doubles = st.floats(allow_nan=True, allow_infinity=True)
enum_values = st.integers(-(2**31), 2**31 - 1)

any_task = st.builds(
    pb.TaskMetadata,
    num_classes=uint32,
    input_shape=st.lists(uint32, max_size=5),
    channel_order=enum_values,
    mean=st.lists(doubles, max_size=5),
    std=st.lists(doubles, max_size=5),
    class_names=st.lists(text, max_size=6),
)
any_manifest = st.builds(
    pb.SubmissionManifest,
    client_id=text,
    payload_sha256=text,
    payload_size=uint64,
    format=text,
    task=st.one_of(st.none(), any_task),
    created_at_ms=int64,
    nonce=st.binary(max_size=80),
)
signatures = st.binary(max_size=600)
any_signed_manifest = st.builds(
    pb.SignedManifest, manifest=st.one_of(st.none(), any_manifest), signature=signatures
)
any_receipt = st.builds(
    pb.Receipt,
    submission_id=text,
    client_id=text,
    payload_sha256=text,
    payload_size=uint64,
    received_at_ms=int64,
    status=enum_values,
    server_key_id=text,
)
any_release = st.builds(
    pb.ReleaseManifest,
    version=uint32,
    architecture=text,
    config_json=text,
    payload_sha256=text,
    payload_size=uint64,
    source_submission_ids=st.lists(text, max_size=5),
    metrics_json=text,
    created_at_ms=int64,
    server_key_id=text,
)
any_verdict = st.builds(
    pb.Verdict,
    submission_id=text,
    state=enum_values,
    reason=text,
    decided_at_ms=st.one_of(st.none(), int64),
)
any_status = st.builds(
    pb.ServerStatus,
    server_version=text,
    server_key_id=text,
    submissions_pending=uint64,
    submissions_accepted=uint64,
    submissions_refused=uint64,
    releases=uint64,
    latest_release=st.one_of(st.none(), uint32),
)

# Each decoder with the message type it reads.
DECODERS: list[tuple[type[Message], Callable[[Any], object]]] = [
    (pb.SignedManifest, wire.signed_manifest_from_proto),
    (pb.TaskMetadata, wire.task_metadata_from_proto),
    (pb.GetVerdictRequest, wire.verdict_request_from_proto),
    (pb.FetchReleaseRequest, wire.release_request_from_proto),
    (pb.SignedReceipt, wire.signed_receipt_from_proto),
    (pb.SignedRelease, wire.signed_release_from_proto),
    (pb.Verdict, wire.verdict_from_proto),
    (pb.ServerStatus, wire.server_status_from_proto),
]


def _decode(decoder: Callable[[Any], object], message: Message) -> object | None:
    """The record, or None for a `WireError`; any other exception fails the test."""
    try:
        return decoder(message)
    except WireError as error:
        assert error.message and "\n" not in error.message
        return None


@FUZZ
@given(st.sampled_from(DECODERS), st.binary(max_size=512))
def test_raw_bytes_decode_to_a_record_or_a_wire_error(
    decoder: tuple[type[Message], Callable[[Any], object]], data: bytes
) -> None:
    kind, decode = decoder
    message = kind()
    try:
        message.ParseFromString(data)
    except DecodeError:
        return
    _decode(decode, message)


@st.composite
def mutated_valid_messages(draw: st.DrawFn) -> tuple[bytes, Signed[Any]]:
    """A valid signed manifest's bytes with a few bytes changed, inserted or removed."""
    signed = Signed(draw(manifests), draw(st.binary(min_size=64, max_size=64)))
    data = bytearray(wire.signed_manifest_to_proto(signed).SerializeToString())
    for kind, where, value in draw(
        st.lists(
            st.tuples(
                st.sampled_from("sid"), st.integers(0, 10**6), st.binary(min_size=1, max_size=3)
            ),
            max_size=4,
        )
    ):
        at = where % max(1, len(data))
        if kind == "s" and data:
            data[at] = value[0]
        elif kind == "i":
            data[at:at] = value
        elif data:
            del data[at : at + len(value)]
    return bytes(data), signed


@FUZZ
@given(mutated_valid_messages())
def test_mutated_manifests_decode_to_a_record_or_a_wire_error(
    case: tuple[bytes, Signed[Any]],
) -> None:
    data, _original = case
    message = pb.SignedManifest()
    try:
        message.ParseFromString(data)
    except DecodeError:
        return
    decoded = _decode(wire.signed_manifest_from_proto, message)
    if decoded is not None:
        # Whatever was accepted is a record that encodes and decodes to itself.
        assert wire.signed_manifest_from_proto(wire.signed_manifest_to_proto(decoded)) == decoded  # type: ignore[arg-type]


@FUZZ
@given(any_signed_manifest)
def test_manifests_with_arbitrary_field_values_are_decoded_or_refused(
    message: pb.SignedManifest,
) -> None:
    decoded = _decode(wire.signed_manifest_from_proto, message)
    if decoded is not None:
        assert wire.signed_manifest_from_proto(wire.signed_manifest_to_proto(decoded)) == decoded  # type: ignore[arg-type]


@FUZZ
@given(
    st.one_of(
        any_task.map(lambda m: (m, wire.task_metadata_from_proto)),
        any_receipt.map(
            lambda m: (
                pb.SignedReceipt(receipt=m, signature=b"s" * 64),
                wire.signed_receipt_from_proto,
            )
        ),
        any_release.map(
            lambda m: (
                pb.SignedRelease(manifest=m, signature=b"s" * 64),
                wire.signed_release_from_proto,
            )
        ),
        any_verdict.map(lambda m: (m, wire.verdict_from_proto)),
        any_status.map(lambda m: (m, wire.server_status_from_proto)),
    )
)
def test_server_messages_with_arbitrary_field_values_are_decoded_or_refused(
    case: tuple[Message, Callable[[Any], object]],
) -> None:
    message, decode = case
    _decode(decode, message)


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=6), st.integers(1, 200))
def test_submit_streams_of_arbitrary_messages_end_in_chunks_or_a_wire_error(
    frames: list[bytes], size: int
) -> None:
    messages = []
    for frame in frames:
        message = pb.SubmitRequest()
        try:
            message.ParseFromString(frame)
        except DecodeError:
            continue
        messages.append(message)
    try:
        signed, chunks = wire.read_submit_stream(messages)
        received = sum(len(chunk) for chunk in chunks)
    except WireError:
        return
    assert received <= signed.record.payload_size


@settings(max_examples=60, deadline=None)
@given(
    st.one_of(manifests, tasks(), receipts, releases, verdicts), st.binary(min_size=64, max_size=64)
)
def test_valid_records_from_the_same_strategies_are_accepted(record: Any, signature: bytes) -> None:
    encode, decode = {
        "SubmissionManifest": (wire.signed_manifest_to_proto, wire.signed_manifest_from_proto),
        "Receipt": (wire.signed_receipt_to_proto, wire.signed_receipt_from_proto),
        "ReleaseManifest": (wire.signed_release_to_proto, wire.signed_release_from_proto),
        "TaskMetadata": (wire.task_metadata_to_proto, wire.task_metadata_from_proto),
        "Verdict": (wire.verdict_to_proto, wire.verdict_from_proto),
    }[type(record).__name__]
    value = (
        Signed(record, signature)
        if type(record).__name__ in ("SubmissionManifest", "Receipt", "ReleaseManifest")
        else record
    )
    message = encode(value)
    again = type(message)()
    again.ParseFromString(message.SerializeToString())
    assert decode(again) == value
