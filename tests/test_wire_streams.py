"""Stream framing of Submit and FetchRelease, alone and over a real in-process gRPC server."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from free_common import wire
from free_common.errors import WireError
from free_common.proto import exchange_pb2 as pb
from free_common.proto import exchange_pb2_grpc as pb_grpc
from free_common.security import generate_signing_key, key_id, sign, verify
from free_common.types import (
    ChannelOrder,
    Receipt,
    ReleaseManifest,
    Signed,
    SubmissionManifest,
    TaskMetadata,
)

SERVER_KEY = generate_signing_key()
SERVER_ID = key_id(SERVER_KEY.public_key())
CLIENT_KEY = generate_signing_key()
CLIENT_ID = key_id(CLIENT_KEY.public_key())
PAYLOAD = bytes(range(256)) * 40  # 10240 bytes
BLOB = b"safetensors" * 300


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def _signed_manifest(payload: bytes = PAYLOAD) -> Signed[SubmissionManifest]:
    task = TaskMetadata(5, (3, 32, 32), ChannelOrder.RGB, (0.5,) * 3, (0.25,) * 3)
    manifest = SubmissionManifest(
        client_id=CLIENT_ID,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        payload_size=len(payload),
        task=task,
        created_at_ms=1_700_000_000_000,
        nonce=bytes(range(16)),
    )
    return sign(CLIENT_KEY, manifest)


def _signed_release() -> Signed[ReleaseManifest]:
    release = ReleaseManifest(
        version=3,
        architecture="conv4",
        config_json='{"preset": "tiny"}',
        payload_sha256=hashlib.sha256(BLOB).hexdigest(),
        payload_size=len(BLOB),
        source_submission_ids=("s1", "s2"),
        metrics_json='{"acc": 0.5}',
        created_at_ms=1_700_000_000_001,
        server_key_id=SERVER_ID,
    )
    return sign(SERVER_KEY, release)


def test_submit_stream_round_trips() -> None:
    signed = _signed_manifest()
    messages = list(wire.submit_requests(signed, _chunks(PAYLOAD, 1000)))
    assert messages[0].WhichOneof("kind") == "manifest"
    got, chunks = wire.read_submit_stream(iter(messages))
    assert got == signed
    assert b"".join(chunks) == PAYLOAD


def test_release_stream_round_trips() -> None:
    signed = _signed_release()
    got, chunks = wire.read_release_stream(wire.release_responses(signed, _chunks(BLOB, 700)))
    assert got == signed
    assert b"".join(chunks) == BLOB


def _manifest_message() -> pb.SubmitRequest:
    return pb.SubmitRequest(manifest=wire.signed_manifest_to_proto(_signed_manifest()))


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([], "Submit stream is empty: send the signed manifest first"),
        ([pb.SubmitRequest(chunk=b"x")], "Submit stream must start with the signed manifest"),
        ([pb.SubmitRequest()], "Submit stream must start with the signed manifest"),
    ],
)
def test_submit_stream_must_start_with_manifest(
    messages: list[pb.SubmitRequest], expected: str
) -> None:
    with pytest.raises(WireError, match=f"^{expected}$"):
        wire.read_submit_stream(messages)


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        ([pb.SubmitRequest(chunk=b"ab"), _manifest_message()], "a second manifest arrived"),
        ([pb.SubmitRequest(chunk=b"")], "a chunk is empty"),
        ([pb.SubmitRequest()], "a second manifest arrived"),
        (
            [pb.SubmitRequest(chunk=b"x" * (wire.MAX_CHUNK_BYTES + 1))],
            "a chunk is 1048577 bytes; at most 1048576",
        ),
        ([pb.SubmitRequest(chunk=PAYLOAD), pb.SubmitRequest(chunk=b"!")], "more than the 10240"),
    ],
)
def test_submit_stream_refuses_bad_chunks(tail: list[pb.SubmitRequest], expected: str) -> None:
    _, chunks = wire.read_submit_stream([_manifest_message(), *tail])
    with pytest.raises(WireError, match=r"^Submit stream") as info:
        list(chunks)
    assert expected in str(info.value)


def test_release_stream_must_start_with_release() -> None:
    with pytest.raises(WireError, match="FetchRelease stream is empty"):
        wire.read_release_stream([])
    with pytest.raises(WireError, match="must start with the signed release"):
        wire.read_release_stream([pb.FetchReleaseResponse(chunk=b"x")])


def test_senders_refuse_bad_chunks() -> None:
    with pytest.raises(WireError, match="a chunk is empty"):
        list(wire.submit_requests(_signed_manifest(), [b"ok", b""]))
    with pytest.raises(WireError, match="a chunk is 1048577 bytes"):
        list(wire.release_responses(_signed_release(), [b"x" * (wire.MAX_CHUNK_BYTES + 1)]))


class _Exchange(pb_grpc.ExchangeServicer):
    """Just enough of a servicer to carry both streams over real gRPC."""

    def Submit(
        self, request_iterator: Iterator[pb.SubmitRequest], context: grpc.ServicerContext
    ) -> pb.SignedReceipt:
        signed, chunks = wire.read_submit_stream(request_iterator)
        manifest = verify(CLIENT_KEY.public_key(), signed)
        digest = hashlib.sha256()
        size = 0
        for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
        receipt = Receipt("sub-1", manifest.client_id, digest.hexdigest(), size, 5, SERVER_ID)
        return wire.signed_receipt_to_proto(sign(SERVER_KEY, receipt))

    def FetchRelease(
        self, request: pb.FetchReleaseRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.FetchReleaseResponse]:
        assert wire.release_request_from_proto(request) is None
        yield from wire.release_responses(_signed_release(), _chunks(BLOB, 1000))


@pytest.fixture(scope="module")
def stub() -> Iterator[pb_grpc.ExchangeStub]:
    server = grpc.server(futures.ThreadPoolExecutor(2), options=wire.GRPC_MESSAGE_OPTIONS)
    pb_grpc.add_ExchangeServicer_to_server(_Exchange(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.GRPC_MESSAGE_OPTIONS)
    try:
        yield pb_grpc.ExchangeStub(channel)
    finally:
        channel.close()
        server.stop(0)


def test_submit_and_fetch_over_grpc(stub: pb_grpc.ExchangeStub) -> None:
    payload = PAYLOAD * 200  # 2 MB: several full-size chunks
    signed = _signed_manifest(payload)
    requests = wire.submit_requests(signed, _chunks(payload, wire.MAX_CHUNK_BYTES))
    receipt = verify(
        SERVER_KEY.public_key(), wire.signed_receipt_from_proto(stub.Submit(requests, timeout=10))
    )
    assert receipt.payload_sha256 == signed.record.payload_sha256
    assert receipt.payload_size == len(payload)

    responses = stub.FetchRelease(wire.release_request_to_proto(), timeout=10)
    release, chunks = wire.read_release_stream(responses)
    assert verify(SERVER_KEY.public_key(), release).version == 3
    assert b"".join(chunks) == BLOB
