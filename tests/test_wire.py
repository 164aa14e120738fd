"""free_common.wire: every record round-trips through protobuf; bad messages give WireError."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from free_common import wire
from free_common.errors import RecordError, WireError
from free_common.proto import exchange_pb2 as pb
from free_common.security import canonical_bytes, record_from_canonical
from free_common.types import (
    MAX_CLASS_NAME_CHARS,
    MAX_NONCE_BYTES,
    MAX_NUM_CLASSES,
    MIN_NONCE_BYTES,
    ChannelOrder,
    Receipt,
    ReleaseManifest,
    ServerStatus,
    Signed,
    SubmissionManifest,
    TaskMetadata,
    Verdict,
    VerdictState,
)

KEY_A = "0123456789abcdef0123456789abcdef"
SHA = "a" * 64

# --- strategies ---------------------------------------------------------------------------

hex_ids = st.text("0123456789abcdef", min_size=32, max_size=32)
sha256s = st.text("0123456789abcdef", min_size=64, max_size=64)
ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
times = st.integers(0, 253_402_300_799_999)
sizes = st.integers(1, 2**31)
names = st.text(
    st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=MAX_CLASS_NAME_CHARS
)
finite = st.floats(allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=1e-12, max_value=1e12, allow_nan=False)
json_objects = st.dictionaries(
    st.text(max_size=8),
    st.integers(-(2**60), 2**60) | finite | st.text(max_size=8) | st.booleans() | st.none(),
    max_size=5,
).map(lambda d: json.dumps(d, sort_keys=True))


@st.composite
def tasks(draw: st.DrawFn) -> TaskMetadata:
    order = draw(st.sampled_from(ChannelOrder))
    channels = order.channels
    num_classes = draw(st.integers(2, 12))
    class_names = draw(
        st.one_of(st.just(()), st.lists(names, min_size=num_classes, max_size=num_classes))
    )
    return TaskMetadata(
        num_classes=num_classes,
        input_shape=(channels, draw(st.integers(1, 4096)), draw(st.integers(1, 4096))),
        channel_order=order,
        mean=tuple(draw(st.lists(finite, min_size=channels, max_size=channels))),
        std=tuple(draw(st.lists(positive, min_size=channels, max_size=channels))),
        class_names=tuple(class_names),
    )


manifests = st.builds(
    SubmissionManifest,
    client_id=hex_ids,
    payload_sha256=sha256s,
    payload_size=sizes,
    task=tasks(),
    created_at_ms=times,
    nonce=st.binary(min_size=MIN_NONCE_BYTES, max_size=MAX_NONCE_BYTES),
)
receipts = st.builds(
    Receipt,
    submission_id=ids,
    client_id=hex_ids,
    payload_sha256=sha256s,
    payload_size=sizes,
    received_at_ms=times,
    server_key_id=hex_ids,
)
releases = st.builds(
    ReleaseManifest,
    version=st.integers(1, 2**32 - 1),
    architecture=ids,
    config_json=json_objects,
    payload_sha256=sha256s,
    payload_size=sizes,
    source_submission_ids=st.lists(ids, max_size=6, unique=True).map(tuple),
    metrics_json=json_objects,
    created_at_ms=times,
    server_key_id=hex_ids,
)
verdicts = st.one_of(
    st.builds(Verdict, submission_id=ids, state=st.just(VerdictState.PENDING)),
    st.builds(
        Verdict, submission_id=ids, state=st.just(VerdictState.ACCEPTED), decided_at_ms=times
    ),
    st.builds(
        Verdict,
        submission_id=ids,
        state=st.just(VerdictState.REFUSED),
        reason=names,
        decided_at_ms=times,
    ),
)
counts = st.integers(0, 2**63 - 1)
statuses = st.one_of(
    st.builds(
        ServerStatus,
        server_version=names,
        server_key_id=hex_ids,
        submissions_pending=counts,
        submissions_accepted=counts,
        submissions_refused=counts,
        releases=st.just(0),
    ),
    st.builds(
        ServerStatus,
        server_version=names,
        server_key_id=hex_ids,
        submissions_pending=counts,
        submissions_accepted=counts,
        submissions_refused=counts,
        releases=st.integers(1, 2**63 - 1),
        latest_release=st.integers(1, 2**32 - 1),
    ),
)
signatures = st.binary(min_size=1, max_size=wire.MAX_SIGNATURE_BYTES)

# --- round trips --------------------------------------------------------------------------

Conv = tuple[Callable[[Any], Any], Callable[[Any], Any], type]
CONVERTERS: dict[str, Conv] = {
    "task": (wire.task_metadata_to_proto, wire.task_metadata_from_proto, pb.TaskMetadata),
    "manifest": (
        wire.submission_manifest_to_proto,
        wire.submission_manifest_from_proto,
        pb.SubmissionManifest,
    ),
    "receipt": (wire.receipt_to_proto, wire.receipt_from_proto, pb.Receipt),
    "verdict": (wire.verdict_to_proto, wire.verdict_from_proto, pb.Verdict),
    "release": (
        wire.release_manifest_to_proto,
        wire.release_manifest_from_proto,
        pb.ReleaseManifest,
    ),
    "status": (wire.server_status_to_proto, wire.server_status_from_proto, pb.ServerStatus),
}


def _round_trip(kind: str, record: object) -> object:
    to_proto, from_proto, message_type = CONVERTERS[kind]
    parsed = message_type()
    # Through real wire bytes, not just the in-memory message.
    parsed.ParseFromString(to_proto(record).SerializeToString())
    return from_proto(parsed)


@settings(max_examples=60, deadline=None)
@given(
    st.one_of(
        tasks().map(lambda r: ("task", r)),
        manifests.map(lambda r: ("manifest", r)),
        receipts.map(lambda r: ("receipt", r)),
        verdicts.map(lambda r: ("verdict", r)),
        releases.map(lambda r: ("release", r)),
        statuses.map(lambda r: ("status", r)),
    )
)
def test_every_record_round_trips(case: tuple[str, object]) -> None:
    kind, record = case
    assert _round_trip(kind, record) == record


@settings(max_examples=40, deadline=None)
@given(manifests, signatures)
def test_signed_manifest_round_trips_and_keeps_canonical_bytes(
    manifest: SubmissionManifest, signature: bytes
) -> None:
    signed = Signed(manifest, signature)
    parsed = pb.SignedManifest()
    parsed.ParseFromString(wire.signed_manifest_to_proto(signed).SerializeToString())
    back = wire.signed_manifest_from_proto(parsed)
    assert back == signed
    # What the receiver rebuilds is byte for byte what the sender signed.
    assert canonical_bytes(back.record) == canonical_bytes(manifest)
    assert record_from_canonical(canonical_bytes(manifest), SubmissionManifest) == manifest


@settings(max_examples=30, deadline=None)
@given(receipts, releases, signatures)
def test_signed_receipt_and_release_round_trip(
    receipt: Receipt, release: ReleaseManifest, signature: bytes
) -> None:
    signed_receipt = Signed(receipt, signature)
    assert wire.signed_receipt_from_proto(wire.signed_receipt_to_proto(signed_receipt)) == (
        signed_receipt
    )
    signed_release = Signed(release, signature)
    assert wire.signed_release_from_proto(wire.signed_release_to_proto(signed_release)) == (
        signed_release
    )
    assert record_from_canonical(canonical_bytes(receipt), Receipt) == receipt
    assert record_from_canonical(canonical_bytes(release), ReleaseManifest) == release


def test_requests_round_trip() -> None:
    assert wire.verdict_request_from_proto(wire.verdict_request_to_proto("sub-1")) == "sub-1"
    assert wire.release_request_from_proto(wire.release_request_to_proto()) is None
    assert wire.release_request_from_proto(wire.release_request_to_proto(7)) == 7


# --- invalid messages ---------------------------------------------------------------------


def _task_proto(**changes: Any) -> pb.TaskMetadata:
    fields: dict[str, Any] = {
        "num_classes": 3,
        "input_shape": [1, 28, 28],
        "channel_order": pb.CHANNEL_ORDER_GRAY,
        "mean": [0.5],
        "std": [0.25],
    }
    fields.update(changes)
    return pb.TaskMetadata(**fields)


def _manifest_proto(**changes: Any) -> pb.SubmissionManifest:
    fields: dict[str, Any] = {
        "client_id": KEY_A,
        "payload_sha256": SHA,
        "payload_size": 10,
        "format": "onnx",
        "task": _task_proto(),
        "created_at_ms": 1,
        "nonce": bytes(16),
    }
    fields.update(changes)
    return pb.SubmissionManifest(**fields)


def test_valid_base_messages_decode() -> None:
    # The invalid cases below each change one field of these.
    assert wire.submission_manifest_from_proto(_manifest_proto()).task.num_classes == 3


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        (_task_proto(channel_order=pb.CHANNEL_ORDER_UNSPECIFIED), "channel_order is missing"),
        (_task_proto(channel_order=7), "channel_order has unknown value 7"),
        (_task_proto(input_shape=[1, 28]), "input_shape must be [channels, height, width]"),
        (_task_proto(input_shape=[3, 28, 28]), "input_shape channels must be in [1, 1]"),
        (_task_proto(input_shape=[1, 0, 28]), "input_shape height must be in"),
        (_task_proto(input_shape=[1, 28, 5000]), "input_shape width must be in"),
        (_task_proto(num_classes=0), "num_classes must be in [2, 1000], got 0"),
        (_task_proto(num_classes=MAX_NUM_CLASSES + 1), "num_classes must be in"),
        (_task_proto(mean=[0.5, 0.5]), "mean must have one value per channel (1), got 2"),
        (_task_proto(std=[0.0]), "std must be positive"),
        (_task_proto(mean=[float("nan")]), "mean must be finite"),
        (_task_proto(std=[float("inf")]), "std must be finite"),
        (_task_proto(class_names=["a", "b"]), "class_names must be empty or have 3 names"),
        (_task_proto(class_names=["a", "b", ""]), "class_names[2] is empty"),
        (_task_proto(class_names=["a", "b", "c\nd"]), "class_names[2] contains control"),
        (
            _task_proto(class_names=["a", "b", "x" * (MAX_CLASS_NAME_CHARS + 1)]),
            "class_names[2] has 65 characters; at most 64",
        ),
    ],
)
def test_bad_task_metadata_is_refused(task: pb.TaskMetadata, expected: str) -> None:
    with pytest.raises(WireError, match=r"^TaskMetadata: ") as info:
        wire.task_metadata_from_proto(task)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("manifest", "expected"),
    [
        (_manifest_proto(client_id=""), "client_id is missing"),
        (_manifest_proto(client_id="A" * 32), "client_id must be 32 lower-case hex"),
        (_manifest_proto(payload_sha256="ab"), "payload_sha256 must be 64 lower-case hex"),
        (_manifest_proto(payload_size=0), "payload_size must be in [1, 2147483648]"),
        (_manifest_proto(payload_size=2**40), "payload_size must be in"),
        (_manifest_proto(format="pickle"), "format must be one of onnx, got 'pickle'"),
        (_manifest_proto(format=""), "format must be one of onnx"),
        (_manifest_proto(created_at_ms=-1), "created_at_ms must be in"),
        (_manifest_proto(nonce=b""), "nonce is missing"),
        (_manifest_proto(nonce=bytes(15)), "nonce must be 16-64 bytes long, got 15"),
        (_manifest_proto(nonce=bytes(65)), "nonce must be 16-64 bytes long, got 65"),
    ],
)
def test_bad_manifest_is_refused(manifest: pb.SubmissionManifest, expected: str) -> None:
    with pytest.raises(WireError, match=r"^SubmissionManifest: ") as info:
        wire.submission_manifest_from_proto(manifest)
    assert expected in str(info.value)


def test_manifest_without_task_is_refused() -> None:
    manifest = _manifest_proto()
    manifest.ClearField("task")
    with pytest.raises(WireError, match=r"^SubmissionManifest: task is missing$"):
        wire.submission_manifest_from_proto(manifest)


def test_signed_manifest_envelope_is_checked() -> None:
    with pytest.raises(WireError, match="manifest is missing"):
        wire.signed_manifest_from_proto(pb.SignedManifest(signature=b"x" * 64))
    with pytest.raises(WireError, match="signature is missing"):
        wire.signed_manifest_from_proto(pb.SignedManifest(manifest=_manifest_proto()))
    too_long = pb.SignedManifest(
        manifest=_manifest_proto(), signature=b"x" * (wire.MAX_SIGNATURE_BYTES + 1)
    )
    with pytest.raises(WireError, match="signature is 513 bytes; at most 512"):
        wire.signed_manifest_from_proto(too_long)


def test_oversized_manifest_is_refused_before_decoding() -> None:
    huge = _manifest_proto(task=_task_proto(class_names=["n" * 1000] * 1100))
    signed = pb.SignedManifest(manifest=huge, signature=b"x" * 64)
    with pytest.raises(WireError, match=r"^SignedManifest is \d+ bytes; at most 1048576"):
        wire.signed_manifest_from_proto(signed)


def _receipt_proto(**changes: Any) -> pb.Receipt:
    fields: dict[str, Any] = {
        "submission_id": "s1",
        "client_id": KEY_A,
        "payload_sha256": SHA,
        "payload_size": 5,
        "received_at_ms": 2,
        "status": pb.RECEIPT_STATUS_RECEIVED,
        "server_key_id": KEY_A,
    }
    fields.update(changes)
    return pb.Receipt(**fields)


@pytest.mark.parametrize(
    ("receipt", "expected"),
    [
        (_receipt_proto(status=pb.RECEIPT_STATUS_UNSPECIFIED), "Receipt: status is missing"),
        (_receipt_proto(status=9), "Receipt: status has unknown value 9"),
        (_receipt_proto(submission_id=""), "Receipt: submission_id is missing"),
        (_receipt_proto(submission_id="../etc"), "Receipt: submission_id must be 1-64"),
        (_receipt_proto(submission_id="x" * 65), "Receipt: submission_id must be 1-64"),
        (_receipt_proto(server_key_id=""), "Receipt: server_key_id is missing"),
    ],
)
def test_bad_receipt_is_refused(receipt: pb.Receipt, expected: str) -> None:
    with pytest.raises(WireError) as info:
        wire.receipt_from_proto(receipt)
    assert str(info.value).startswith(expected)


def test_signed_receipt_envelope_is_checked() -> None:
    with pytest.raises(WireError, match="SignedReceipt: receipt is missing"):
        wire.signed_receipt_from_proto(pb.SignedReceipt(signature=b"s"))
    with pytest.raises(WireError, match="SignedReceipt: signature is missing"):
        wire.signed_receipt_from_proto(pb.SignedReceipt(receipt=_receipt_proto()))


@pytest.mark.parametrize(
    ("verdict", "expected"),
    [
        (pb.Verdict(submission_id="s"), "state is missing"),
        (pb.Verdict(submission_id="s", state=4), "state has unknown value 4"),
        (pb.Verdict(state=pb.VERDICT_STATE_PENDING), "submission_id is missing"),
        (
            pb.Verdict(submission_id="s", state=pb.VERDICT_STATE_REFUSED, decided_at_ms=1),
            "reason is empty",
        ),
        (
            pb.Verdict(submission_id="s", state=pb.VERDICT_STATE_ACCEPTED, reason="no"),
            "reason must be empty when the verdict is accepted",
        ),
        (
            pb.Verdict(submission_id="s", state=pb.VERDICT_STATE_PENDING, decided_at_ms=3),
            "decided_at_ms must be absent while the verdict is pending",
        ),
        (
            pb.Verdict(submission_id="s", state=pb.VERDICT_STATE_ACCEPTED),
            "decided_at_ms is missing for a accepted verdict",
        ),
    ],
)
def test_bad_verdict_is_refused(verdict: pb.Verdict, expected: str) -> None:
    with pytest.raises(WireError, match=r"^Verdict: ") as info:
        wire.verdict_from_proto(verdict)
    assert expected in str(info.value)


def _release_proto(**changes: Any) -> pb.ReleaseManifest:
    fields: dict[str, Any] = {
        "version": 1,
        "architecture": "conv4",
        "config_json": "{}",
        "payload_sha256": SHA,
        "payload_size": 9,
        "source_submission_ids": ["s1", "s2"],
        "metrics_json": '{"acc": 0.5}',
        "created_at_ms": 3,
        "server_key_id": KEY_A,
    }
    fields.update(changes)
    return pb.ReleaseManifest(**fields)


@pytest.mark.parametrize(
    ("release", "expected"),
    [
        (_release_proto(version=0), "version must be in [1, 4294967295], got 0"),
        (_release_proto(architecture=""), "architecture is missing"),
        (_release_proto(config_json=""), "config_json is empty"),
        (_release_proto(config_json="[1]"), "config_json must be a JSON object, got list"),
        (_release_proto(config_json="{"), "config_json is not valid JSON"),
        (_release_proto(metrics_json='{"a": NaN}'), "metrics_json is not valid JSON"),
        (_release_proto(metrics_json="[" * 60000), "metrics_json is nested too deeply"),
        (_release_proto(source_submission_ids=["s1", "s1"]), "lists a submission more than"),
        (_release_proto(source_submission_ids=["ok", "a/b"]), "source_submission_ids[1] must"),
    ],
)
def test_bad_release_is_refused(release: pb.ReleaseManifest, expected: str) -> None:
    with pytest.raises(WireError, match=r"^ReleaseManifest: ") as info:
        wire.release_manifest_from_proto(release)
    assert expected in str(info.value)


def test_signed_release_envelope_is_checked() -> None:
    with pytest.raises(WireError, match="SignedRelease: manifest is missing"):
        wire.signed_release_from_proto(pb.SignedRelease(signature=b"s"))
    with pytest.raises(WireError, match="SignedRelease: signature is missing"):
        wire.signed_release_from_proto(pb.SignedRelease(manifest=_release_proto()))
    huge = _release_proto(config_json=json.dumps({"k": "v" * (2 * 1024 * 1024)}))
    with pytest.raises(WireError, match=r"^SignedRelease is"):
        wire.signed_release_from_proto(pb.SignedRelease(manifest=huge, signature=b"s"))


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (pb.ServerStatus(server_key_id=KEY_A), "server_version is empty"),
        (pb.ServerStatus(server_version="1", server_key_id="xyz"), "server_key_id must be 32"),
        (
            pb.ServerStatus(server_version="1", server_key_id=KEY_A, releases=2),
            "latest_release is missing although 2 exist",
        ),
        (
            pb.ServerStatus(server_version="1", server_key_id=KEY_A, latest_release=1),
            "latest_release is set although no release exists",
        ),
    ],
)
def test_bad_status_is_refused(status: pb.ServerStatus, expected: str) -> None:
    with pytest.raises(WireError, match=r"^ServerStatus: ") as info:
        wire.server_status_from_proto(status)
    assert expected in str(info.value)


def test_bad_requests_are_refused() -> None:
    with pytest.raises(WireError, match="GetVerdictRequest: submission_id is missing"):
        wire.verdict_request_from_proto(pb.GetVerdictRequest())
    with pytest.raises(WireError, match="GetVerdictRequest: submission_id must be"):
        wire.verdict_request_from_proto(pb.GetVerdictRequest(submission_id="../x"))
    with pytest.raises(WireError, match="release version must be in"):
        wire.release_request_to_proto(0)


def test_records_refuse_wrong_python_types() -> None:
    # Builders on either side get the same one-line errors as the wire does.
    task = TaskMetadata(3, (1, 28, 28), ChannelOrder.GRAY, (0,), (1,))
    assert task.mean == (0.0,) and task.std == (1.0,)
    assert TaskMetadata(3, (1, 28, 28), ChannelOrder.GRAY, (-0.0,), (1,)).mean == (0.0,)
    for bad in (
        lambda: dataclasses.replace(task, num_classes=True),
        lambda: dataclasses.replace(task, mean=(True,)),
        lambda: dataclasses.replace(task, channel_order="gray"),
        lambda: dataclasses.replace(task, class_names="abc"),
    ):
        with pytest.raises(RecordError, match=r"^(num_classes|mean|channel_order|class_names) "):
            bad()
