"""Hostile bytes on the wire, sent to the real exchange server (TLS on loopback).

Every message is built by code here: malformed and truncated protobuf on each of
the four methods, fields of the wrong wire type, absurd lengths (a declared size of
a terabyte, a million classes, a class list or a manifest past its cap, a chunk or
a message past the gRPC cap), streams in the wrong order, and forged or oversized
call credentials. They go through a plain gRPC channel with identity serializers,
signed by an enrolled owner (a hostile data owner), so they reach the server's
decoder and checks rather than being stopped by a client stub.

For each: the exact gRPC status and a line naming the problem; nothing stored
(rows, blobs, temporary files); no canary in the server's working directory, its
home or elsewhere opened or read (inotify), no file outside ``store/`` added or
changed; and the next honest owner's upload gets a receipt that verifies.

Bytes that do not decode as the method's request message are refused by the
servicer, which decodes requests itself (`free_server.servicer`), with
``INVALID_ARGUMENT`` and the message type they should have been.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import grpc
import pytest
from exchange_harness import TASK, Owner, enroll, good_model, make_owner, new_home, serving
from hostile_harness import (
    Sandbox,
    honest_upload,
    length_delimited,
    raw_call,
    raw_channel,
    store_view,
    varint,
    wait_for_no_temp_files,
    working_directory,
)

from free_client.uploader import sign_manifest
from free_common import wire
from free_common.proto import exchange_pb2 as pb
from free_common.security.call_auth import (
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign_call,
)
from free_common.security.signing import sign
from free_server.config import LimitSettings
from free_server.runtime import ServerRuntime

MAX_UPLOAD = 256 * 1024


def _undecodable(message: str) -> tuple[str, str]:
    """The refusal of bytes that do not decode as the method's request message."""
    return ("INVALID_ARGUMENT", f"the request does not decode as free.v1.{message}")


SUBMIT_UNDECODABLE = _undecodable("SubmitRequest")


@dataclass(frozen=True)
class World:
    runtime: ServerRuntime
    sandbox: Sandbox
    mallory: Owner
    honest: Owner
    channel: grpc.Channel
    open_channel: grpc.Channel


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("hostile-wire")
    home = new_home(
        root / "home", limits=LimitSettings(max_upload_bytes=MAX_UPLOAD, chunk_bytes=64 * 1024)
    )
    sandbox = Sandbox.create(root, home)
    mallory = enroll(home, make_owner(root / "keys", "mallory"))
    honest = enroll(home, make_owner(root / "keys", "honest"))
    with working_directory(sandbox.cwd), serving(home) as runtime:
        channel, open_channel = raw_channel(runtime), raw_channel(runtime, send_cap=False)
        try:
            yield World(runtime, sandbox, mallory, honest, channel, open_channel)
        finally:
            channel.close()
            open_channel.close()


# --- protobuf by hand -----------------------------------------------------------------------


def _submit_head(signed_manifest: bytes) -> bytes:
    """A SubmitRequest whose ``manifest`` is the given serialized SignedManifest."""
    return length_delimited(1, signed_manifest)


def _chunk(data: bytes) -> bytes:
    return pb.SubmitRequest(chunk=data).SerializeToString()


DATA = good_model(seed=40)


def _signed_proto(owner: Owner, data: bytes = DATA) -> pb.SignedManifest:
    return wire.signed_manifest_to_proto(sign_manifest(owner.key, data, TASK))


def _head(owner: Owner, change: Callable[[pb.SignedManifest], None] | None = None) -> bytes:
    signed = _signed_proto(owner)
    if change is not None:
        change(signed)
    return _submit_head(signed.SerializeToString())


def _signed_record(owner: Owner, **changes: object) -> bytes:
    """A head whose manifest record is changed *before* signing (a valid signature)."""
    record = replace(sign_manifest(owner.key, DATA, TASK).record, **changes)  # type: ignore[arg-type]
    proto = wire.signed_manifest_to_proto(sign(owner.key, record))
    return _submit_head(proto.SerializeToString())


def _wrong_type_payload_size(owner: Owner) -> bytes:
    """``payload_size`` (a uint64) sent as a length-delimited field: decoded as unknown."""
    signed = _signed_proto(owner)
    signed.manifest.payload_size = 0
    manifest = signed.manifest.SerializeToString() + length_delimited(3, b"\xff" * 8)
    return _submit_head(length_delimited(1, manifest) + length_delimited(2, signed.signature))


def _class_names(count: int, length: int) -> Callable[[pb.SignedManifest], None]:
    def change(signed: pb.SignedManifest) -> None:
        signed.manifest.task.class_names.extend(f"{i:0{length}d}" for i in range(count))

    return change


def _set(path: str, value: object) -> Callable[[pb.SignedManifest], None]:
    def change(signed: pb.SignedManifest) -> None:
        *parents, name = path.split(".")
        target = signed
        for parent in parents:
            target = getattr(target, parent)
        if isinstance(value, list):
            del getattr(target, name)[:]
            getattr(target, name).extend(value)
        else:
            setattr(target, name, value)

    return change


Case = tuple[str, Callable[[Owner], bytes | list[bytes]], tuple[str, str]]

SUBMIT_CASES: list[Case] = [
    ("garbage", lambda o: [b"\xff\xfe\xfd\xfc" * 8], SUBMIT_UNDECODABLE),
    ("truncated-manifest", lambda o: [_head(o)[:150]], SUBMIT_UNDECODABLE),
    ("deep-unknown-groups", lambda o: [b"\x7b" * 200 + b"\x7c" * 200], SUBMIT_UNDECODABLE),
    ("empty-stream", lambda o: [], ("INVALID_ARGUMENT", "Submit stream is empty")),
    (
        "chunk-first",
        lambda o: [_chunk(DATA)],
        ("INVALID_ARGUMENT", "must start with the signed manifest"),
    ),
    (
        "manifest-as-varint",
        lambda o: [b"\x08\x05"],
        ("INVALID_ARGUMENT", "must start with the signed manifest"),
    ),
    (
        "manifest-without-body",
        lambda o: [_submit_head(b"")],
        ("INVALID_ARGUMENT", "SignedManifest: manifest is missing"),
    ),
    (
        "no-task",
        lambda o: [_head(o, lambda s: s.manifest.ClearField("task"))],
        ("INVALID_ARGUMENT", "task is missing"),
    ),
    (
        "no-signature",
        lambda o: [_head(o, _set("signature", b""))],
        ("INVALID_ARGUMENT", "signature is missing"),
    ),
    (
        "oversized-signature",
        lambda o: [_head(o, _set("signature", b"s" * 600))],
        ("INVALID_ARGUMENT", "signature is 600 bytes; at most 512"),
    ),
    (
        "payload-size-of-wrong-wire-type",
        lambda o: [_wrong_type_payload_size(o)],
        ("INVALID_ARGUMENT", "payload_size must be in [1, 2147483648], got 0"),
    ),
    (
        "terabyte-declared-size",
        lambda o: [_head(o, _set("manifest.payload_size", 2**40))],
        ("INVALID_ARGUMENT", "payload_size must be in [1, 2147483648]"),
    ),
    (
        "declared-size-over-the-server-cap",
        lambda o: [_signed_record(o, payload_size=2**31)],
        ("RESOURCE_EXHAUSTED", f"this server accepts at most {MAX_UPLOAD:,}"),
    ),
    (
        "two-billion-classes",
        lambda o: [_head(o, _set("manifest.task.num_classes", 2**31))],
        ("INVALID_ARGUMENT", "num_classes must be in [2, 1000]"),
    ),
    (
        "fifty-thousand-class-names",
        lambda o: [_head(o, _class_names(50_000, 8))],
        ("INVALID_ARGUMENT", "class_names must be empty or have 3 names, got 50000"),
    ),
    (
        "manifest-over-its-cap",
        lambda o: [_head(o, _class_names(3, 360_000))],
        ("INVALID_ARGUMENT", f"at most {wire.MAX_MANIFEST_BYTES} are allowed"),
    ),
    (
        "image-side-of-a-billion",
        lambda o: [_head(o, _set("manifest.task.input_shape", [1, 10**9, 10**9]))],
        ("INVALID_ARGUMENT", "input_shape height must be in [1, 4096]"),
    ),
    (
        "hundred-thousand-means",
        lambda o: [_head(o, _set("manifest.task.mean", [0.5] * 100_000))],
        ("INVALID_ARGUMENT", "mean must have one value per channel (1), got 100000"),
    ),
    (
        "unknown-channel-order",
        lambda o: [_head(o, _set("manifest.task.channel_order", 77))],
        ("INVALID_ARGUMENT", "channel_order has unknown value 77"),
    ),
    (
        "path-as-client-id",
        lambda o: [_head(o, _set("manifest.client_id", "../../etc/passwd"))],
        ("INVALID_ARGUMENT", "client_id"),
    ),
    (
        "manifest-signed-by-nobody",
        lambda o: [_head(o, _set("signature", b"\0" * 64))],
        ("UNAUTHENTICATED", "does not verify"),
    ),
    (
        "garbage-after-the-manifest",
        lambda o: [_head(o), _chunk(DATA[:300]), b"\xff\xff\xff"],
        SUBMIT_UNDECODABLE,
    ),
    (
        "empty-chunk",
        lambda o: [_head(o), _chunk(DATA[:300]), b"\x12\x00"],
        ("INVALID_ARGUMENT", "a chunk is empty"),
    ),
    (
        "oversized-chunk",
        lambda o: [_head(o), _chunk(b"\0" * (wire.MAX_CHUNK_BYTES + 1))],
        ("INVALID_ARGUMENT", f"a chunk is {wire.MAX_CHUNK_BYTES + 1} bytes"),
    ),
    (
        "second-manifest",
        lambda o: [_head(o), _chunk(DATA[:300]), _head(o)],
        ("INVALID_ARGUMENT", "a second manifest arrived"),
    ),
    (
        "more-bytes-than-declared",
        lambda o: [_head(o), _chunk(DATA), _chunk(b"extra")],
        ("INVALID_ARGUMENT", f"more than the {len(DATA)} bytes"),
    ),
    (
        "stream-cut-short",
        lambda o: [_head(o), _chunk(DATA[:300])],
        ("INVALID_ARGUMENT", "the stream was cut"),
    ),
    (
        "other-bytes-than-signed",
        lambda o: [_head(o), _chunk(bytes(len(DATA)))],
        ("INVALID_ARGUMENT", "but the manifest announces"),
    ),
]


@pytest.mark.parametrize(
    ("build", "expected"), [c[1:] for c in SUBMIT_CASES], ids=[c[0] for c in SUBMIT_CASES]
)
def test_malformed_submit_streams_are_refused_and_leave_nothing(
    world: World, build: Callable[[Owner], list[bytes]], expected: tuple[str, str]
) -> None:
    _refused_cleanly(world, "Submit", build(world.mallory), expected, channel=world.channel)


def test_a_message_over_the_grpc_cap_is_refused_by_the_server(world: World) -> None:
    # This channel sends anything; the server's own receive cap must refuse it.
    two_mib = _chunk(b"\0" * (2 * 1024 * 1024))
    _refused_cleanly(
        world,
        "Submit",
        [_head(world.mallory), two_mib],
        ("RESOURCE_EXHAUSTED", "larger than max"),
        channel=world.open_channel,
    )


UNARY_CASES = [
    ("GetVerdict", b"\xff\xff\xff", _undecodable("GetVerdictRequest")),
    ("GetVerdict", b"\x0a\x05ab", _undecodable("GetVerdictRequest")),
    ("GetVerdict", b"\x08\x05", ("INVALID_ARGUMENT", "submission_id is missing")),
    (
        "GetVerdict",
        length_delimited(1, b"../../etc/passwd"),
        ("INVALID_ARGUMENT", "submission_id must be"),
    ),
    ("GetVerdict", length_delimited(1, b"9" * 65), ("INVALID_ARGUMENT", "submission_id must be")),
    ("GetVerdict", length_delimited(1, b"9" * 60), ("NOT_FOUND", "no submission")),
    (
        "GetVerdict",
        length_delimited(1, b"x" * 900_000),
        ("INVALID_ARGUMENT", "submission_id must be"),
    ),
    ("GetVerdict", length_delimited(1, b"123456789012345678"), ("NOT_FOUND", "no submission")),
    ("GetStatus", b"\xff\xff\xff", _undecodable("GetStatusRequest")),
    ("FetchRelease", b"\xff\xff", _undecodable("FetchReleaseRequest")),
    ("FetchRelease", length_delimited(1, b"a"), ("NOT_FOUND", "no release has been published yet")),
    (
        "FetchRelease",
        b"\x08" + varint(2**64 - 1),
        ("NOT_FOUND", "no release with version 4294967295"),
    ),
]


@pytest.mark.parametrize(
    ("method", "payload", "expected"),
    UNARY_CASES,
    ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(UNARY_CASES)],
)
def test_malformed_unary_requests_are_refused(
    world: World, method: str, payload: bytes, expected: tuple[str, str]
) -> None:
    _refused_cleanly(world, method, payload, expected, channel=world.channel)


def test_unknown_fields_are_ignored_not_trusted(world: World) -> None:
    # A status request padded with fields GetStatusRequest does not have still answers.
    payload = length_delimited(9, b"surprise") + b"\x50\x01"
    assert raw_call(world.channel, "GetStatus", payload, owner=world.mallory) == ("OK", "")


def _credentials(owner: Owner, method: str, **swap: str | bytes) -> list[tuple[str, str | bytes]]:
    entries = dict(sign_call(owner.key, f"/free.v1.Exchange/{method}"))
    entries.update(swap)
    return list(entries.items())


CALL_CASES: list[tuple[str, Callable[[Owner], list[tuple[str, str | bytes]]], tuple[str, str]]] = [
    ("none", lambda o: [], ("UNAUTHENTICATED", "free-client-id")),
    (
        "signed-for-another-method",
        lambda o: _credentials(o, "GetVerdict"),
        ("UNAUTHENTICATED", "does not verify"),
    ),
    (
        "timestamp-changed",
        lambda o: _credentials(o, "Submit", **{TIMESTAMP_HEADER: "9" * 16}),
        ("UNAUTHENTICATED", "does not verify"),
    ),
    (
        "timestamp-not-a-number",
        lambda o: _credentials(o, "Submit", **{TIMESTAMP_HEADER: "-1e99"}),
        ("UNAUTHENTICATED", "is not Unix milliseconds"),
    ),
    (
        "short-signature",
        lambda o: _credentials(o, "Submit", **{SIGNATURE_HEADER: b"\1" * 63}),
        ("UNAUTHENTICATED", "is not an Ed25519 signature"),
    ),
    (
        "key-id-of-nobody",
        lambda o: _credentials(o, "Submit", **{KEY_ID_HEADER: "0" * 32}),
        ("UNAUTHENTICATED", "not on this server's allow-list"),
    ),
    (
        "twenty-kilobyte-key-id",
        lambda o: _credentials(o, "Submit", **{KEY_ID_HEADER: "a" * 20_000}),
        ("RESOURCE_EXHAUSTED", "metadata size exceeds"),
    ),
    (
        "sixty-padding-headers",
        lambda o: [*_credentials(o, "Submit"), *((f"x-pad-{i}", "y" * 500) for i in range(60))],
        ("RESOURCE_EXHAUSTED", "metadata size exceeds"),
    ),
]


@pytest.mark.parametrize(
    ("build", "expected"), [c[1:] for c in CALL_CASES], ids=[c[0] for c in CALL_CASES]
)
def test_forged_or_oversized_call_credentials_are_refused(
    world: World,
    build: Callable[[Owner], list[tuple[str, str | bytes]]],
    expected: tuple[str, str],
) -> None:
    _refused_cleanly(
        world,
        "Submit",
        [_head(world.mallory), _chunk(DATA)],
        expected,
        channel=world.channel,
        metadata=build(world.mallory),
    )


def _refused_cleanly(
    world: World,
    method: str,
    payload: bytes | list[bytes],
    expected: tuple[str, str],
    *,
    channel: grpc.Channel,
    metadata: list[tuple[str, str | bytes]] | None = None,
) -> None:
    home = world.runtime.home
    before = store_view(home)
    with world.sandbox.untouched():
        code, details = raw_call(channel, method, payload, owner=world.mallory, metadata=metadata)
        # An upload the server aborted may still be closing its temporary file.
        wait_for_no_temp_files(home)
    assert code == expected[0], (code, details)
    assert expected[1] in details, details
    assert "\n" not in details and str(home.root) not in details
    assert store_view(home) == before
    receipt = honest_upload(world.runtime, world.honest)
    assert receipt.record.client_id == world.honest.key_id


def test_the_canary_watch_sees_a_read(world: World) -> None:
    # The detector every test above relies on: a real read of a canary is seen.
    with (
        pytest.raises(AssertionError, match="canary was opened"),
        world.sandbox.untouched(),
    ):
        (world.sandbox.cwd / "weights.bin").read_bytes()
    # Reading through the hard link counts as reading the secret outside.
    assert world.sandbox.secret.read_bytes() == (world.sandbox.cwd / "weights.bin").read_bytes()


def test_a_valid_manifest_with_a_valid_stream_is_accepted(world: World) -> None:
    # The same builders, unchanged, make an upload the server acknowledges.
    code, details = raw_call(
        world.channel, "Submit", [_head(world.mallory), _chunk(DATA)], owner=world.mallory
    )
    assert (code, details) == ("OK", "")
    with world.runtime.home.open_store() as store:
        rows = [
            r
            for r in store.summary(recent=1000).submissions
            if r.client_key_id == world.mallory.key_id
        ]
    assert [r.size for r in rows] == [len(DATA)]
