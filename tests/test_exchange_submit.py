"""Uploads through the real exchange server (TLS on loopback): receipts, verdicts, refusals.

One server serves the whole module. Each bad input is sent to it and must give
its own gRPC status with a line that says what to fix, leave nothing stored,
and leave the server serving: an honest owner's upload succeeds right after.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from exchange_harness import (
    TASK,
    Owner,
    address,
    client,
    enroll,
    good_model,
    infinite_logits_model,
    make_owner,
    new_home,
    padded_model,
    serving,
    stored,
    unsupported_op_model,
    wait_until,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from free_client.stub import Connection, ExchangeClient
from free_client.uploader import RetryPolicy, check_receipt, sign_manifest, upload, wait_for_verdict
from free_common.errors import (
    ConfigError,
    HomeError,
    ServerRefused,
    ServerUnavailable,
    SignatureError,
    TlsError,
)
from free_common.security.call_auth import now_ms
from free_common.security.keys import generate_signing_key, load_public_key
from free_common.security.signing import sign
from free_common.types import Signed, SubmissionManifest, VerdictState
from free_server.config import LimitSettings
from free_server.home import ServerHome
from free_server.runtime import ServerRuntime, StartOptions
from free_server.store import DB_NAME

MAX_UPLOAD = 4096


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerRuntime, Path]]:
    root = tmp_path_factory.mktemp("exchange")
    limits = LimitSettings(max_upload_bytes=MAX_UPLOAD, chunk_bytes=1024)
    home = new_home(root / "home", limits=limits)
    with serving(home) as runtime:
        yield runtime, root


@pytest.fixture(scope="module")
def server(world: tuple[ServerRuntime, Path]) -> ServerRuntime:
    return world[0]


@pytest.fixture(scope="module")
def home(server: ServerRuntime) -> ServerHome:
    return server.home


@pytest.fixture(scope="module")
def honest(world: tuple[ServerRuntime, Path]) -> Owner:
    runtime, root = world
    return enroll(runtime.home, make_owner(root, "honest"))


_OWNERS = itertools.count()


@pytest.fixture
def owner(world: tuple[ServerRuntime, Path]) -> Owner:
    """A fresh enrolled owner per test, so revoking or replaying cannot leak between tests."""
    runtime, root = world
    return enroll(runtime.home, make_owner(root, f"owner{next(_OWNERS)}"))


def _refused(call: object, code: grpc.StatusCode, text: str) -> ServerRefused:
    with pytest.raises(ServerRefused) as caught:
        call()  # type: ignore[operator]
    assert caught.value.status == code.name, caught.value.message
    assert text in caught.value.message
    assert "\n" not in caught.value.message
    return caught.value


def _still_serving(server: ServerRuntime, honest: Owner) -> None:
    """The next honest upload gets a verified receipt (the original one after the first)."""
    with client(server, honest) as c:
        signed = upload(
            c, honest.key, good_model(), TASK, server_pub=load_public_key(server.home.signing_pub)
        )
    assert signed.record.client_id == honest.key_id


def _submit(
    server: ServerRuntime, owner: Owner, signed: Signed[SubmissionManifest], data: bytes
) -> Callable[[], object]:
    """A call that streams `data` under `signed` in 300-byte chunks."""

    def call() -> object:
        chunks = [data[i : i + 300] for i in range(0, len(data), 300)]
        with client(server, owner) as c:
            return c.submit(signed, chunks, timeout_s=30)

    return call


def test_upload_gets_a_signed_receipt_then_an_accepted_verdict(
    server: ServerRuntime, owner: Owner
) -> None:
    data = good_model(seed=10)
    before = stored(server.home)
    server_pub = load_public_key(server.home.signing_pub)
    with client(server, owner) as c:
        signed = upload(c, owner.key, data, TASK, server_pub=server_pub, chunk_bytes=256)
        receipt = signed.record
        assert receipt.payload_sha256 == hashlib.sha256(data).hexdigest()
        assert receipt.payload_size == len(data)
        assert receipt.server_key_id == server.server_key_id
        verdict = wait_for_verdict(c, receipt.submission_id, timeout_s=30, poll_s=0.1)
        assert verdict.state is VerdictState.ACCEPTED
        assert verdict.decided_at_ms is not None
        # A retry of the same bytes (new manifest, new nonce) gets the very same receipt.
        again = upload(c, owner.key, data, TASK, server_pub=server_pub)
        assert again == signed
        status = c.status()
    after = stored(server.home)
    assert after.submissions == before.submissions + 1
    assert after.temp_files == 0
    assert status.server_key_id == server.server_key_id
    assert status.submissions_accepted >= 1


def test_verdicts_are_private_to_their_owner(
    server: ServerRuntime, owner: Owner, honest: Owner
) -> None:
    with client(server, honest) as c:
        mine = upload(c, honest.key, good_model(), TASK).record.submission_id
    with client(server, owner) as c:
        _refused(lambda: c.verdict(mine), grpc.StatusCode.NOT_FOUND, "no submission")
        _refused(lambda: c.verdict("999999"), grpc.StatusCode.NOT_FOUND, "no submission")


def test_unknown_key_is_refused_before_any_byte_is_stored(
    server: ServerRuntime, home: ServerHome, honest: Owner, tmp_path: Path
) -> None:
    stranger = make_owner(tmp_path, "stranger")  # never enrolled
    before = stored(home)
    with client(server, stranger) as c:
        _refused(
            lambda: upload(c, stranger.key, good_model(), TASK),
            grpc.StatusCode.UNAUTHENTICATED,
            "not on this server's allow-list",
        )
    assert stored(home) == before
    _still_serving(server, honest)


def test_revoked_key_is_refused(server: ServerRuntime, owner: Owner, honest: Owner) -> None:
    with server.home.open_store() as store:
        store.revoke_client(owner.name)
    before = stored(server.home)
    with client(server, owner) as c:
        _refused(
            lambda: upload(c, owner.key, good_model(seed=11), TASK),
            grpc.StatusCode.PERMISSION_DENIED,
            "was revoked",
        )
        _refused(c.status, grpc.StatusCode.PERMISSION_DENIED, "was revoked")
    assert stored(server.home) == before
    _still_serving(server, honest)


def test_bad_manifest_signature_is_refused(
    server: ServerRuntime, owner: Owner, honest: Owner
) -> None:
    data = good_model(seed=12)
    signed = sign_manifest(owner.key, data, TASK)
    forged = Signed(signed.record, bytes([signed.signature[0] ^ 1]) + signed.signature[1:])
    before = stored(server.home)
    _refused(
        _submit(server, owner, forged, data), grpc.StatusCode.UNAUTHENTICATED, "does not verify"
    )
    # A manifest signed by another key, in this owner's name, is refused the same way.
    other = sign_manifest(generate_signing_key(), data, TASK)
    moved = dataclasses.replace(other.record, client_id=owner.key_id)
    _refused(
        _submit(server, owner, Signed(moved, other.signature), data),
        grpc.StatusCode.UNAUTHENTICATED,
        "does not verify",
    )
    assert stored(server.home) == before
    _still_serving(server, honest)


def test_stale_manifest_is_refused(server: ServerRuntime, owner: Owner, honest: Owner) -> None:
    data = good_model(seed=13)
    an_hour_ago = now_ms() - 3_600_000
    signed = sign_manifest(owner.key, data, TASK, created_at_ms=an_hour_ago)
    before = stored(server.home)
    _refused(_submit(server, owner, signed, data), grpc.StatusCode.UNAUTHENTICATED, "s ago")
    assert stored(server.home) == before
    _still_serving(server, honest)


def test_replayed_nonce_with_other_bytes_is_refused(
    server: ServerRuntime, owner: Owner, honest: Owner
) -> None:
    first, second = good_model(seed=14), good_model(seed=15)
    nonce = secrets.token_bytes(16)

    def manifest_for(data: bytes) -> Signed[SubmissionManifest]:
        record = SubmissionManifest(
            client_id=owner.key_id,
            payload_sha256=hashlib.sha256(data).hexdigest(),
            payload_size=len(data),
            task=TASK,
            created_at_ms=now_ms(),
            nonce=nonce,
        )
        return sign(owner.key, record)

    _submit(server, owner, manifest_for(first), first)()
    before = stored(server.home)
    _refused(
        _submit(server, owner, manifest_for(second), second),
        grpc.StatusCode.ALREADY_EXISTS,
        "nonce was already used",
    )
    assert stored(server.home) == before
    _still_serving(server, honest)


@pytest.mark.parametrize("lie", ["size", "sha256"])
def test_payload_that_differs_from_the_manifest_is_refused(
    server: ServerRuntime, owner: Owner, honest: Owner, lie: str
) -> None:
    data = good_model(seed=16)
    signed = sign_manifest(owner.key, data, TASK)
    if lie == "size":
        # The manifest announces more bytes than arrive: the stream was cut short.
        record = dataclasses.replace(signed.record, payload_size=len(data) + 100)
        expected = "stream was cut"
    else:
        record = dataclasses.replace(signed.record, payload_sha256="0" * 64)
        expected = "sha256"
    before = stored(server.home)
    _refused(
        _submit(server, owner, sign(owner.key, record), data),
        grpc.StatusCode.INVALID_ARGUMENT,
        expected,
    )
    assert stored(server.home) == before
    _still_serving(server, honest)


def test_stream_cut_halfway_by_the_client_leaves_nothing(
    server: ServerRuntime, owner: Owner, honest: Owner
) -> None:
    data = good_model(seed=17)
    signed = sign_manifest(owner.key, data, TASK)
    before = stored(server.home)

    def half_then_gone() -> Iterator[bytes]:
        yield data[:200]
        yield data[200:400]
        raise ConnectionResetError("the owner's network went away")

    with client(server, owner) as c, pytest.raises(ConnectionResetError):
        c.submit(signed, half_then_gone(), timeout_s=30)
    assert wait_until(lambda: stored(server.home).temp_files == 0)
    assert stored(server.home) == before
    _still_serving(server, honest)


def test_model_refused_by_static_checks_gets_no_receipt(
    server: ServerRuntime, owner: Owner, honest: Owner
) -> None:
    before = stored(server.home)
    with client(server, owner) as c:
        _refused(
            lambda: upload(c, owner.key, unsupported_op_model(), TASK),
            grpc.StatusCode.INVALID_ARGUMENT,
            "TopK",
        )
        _refused(
            lambda: upload(c, owner.key, b"not a model at all" * 20, TASK),
            grpc.StatusCode.INVALID_ARGUMENT,
            "ONNX",
        )
    assert stored(server.home) == before
    _still_serving(server, honest)


def test_model_refused_by_full_intake_gets_a_refused_verdict(
    server: ServerRuntime, owner: Owner, honest: Owner
) -> None:
    with client(server, owner) as c:
        receipt = upload(c, owner.key, infinite_logits_model(), TASK).record
        verdict = wait_for_verdict(c, receipt.submission_id, timeout_s=30, poll_s=0.1)
    assert verdict.state is VerdictState.REFUSED
    assert "NaN or Inf" in verdict.reason
    with server.home.open_store() as store:
        row = store.submission(int(receipt.submission_id))
    assert row.state == "refused"
    assert row.reason is not None and "NaN or Inf" in row.reason
    _still_serving(server, honest)


def test_oversize_upload_is_refused_before_streaming(
    server: ServerRuntime, owner: Owner, honest: Owner
) -> None:
    big = padded_model(2 * MAX_UPLOAD)
    before = stored(server.home)
    with client(server, owner) as c:
        _refused(
            lambda: upload(c, owner.key, big, TASK),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"at most {MAX_UPLOAD:,}",
        )
    # A manifest that understates the size is caught while streaming.
    signed = sign_manifest(owner.key, big, TASK)
    small = dataclasses.replace(signed.record, payload_size=MAX_UPLOAD)
    _refused(
        _submit(server, owner, sign(owner.key, small), big),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"more than the {MAX_UPLOAD} bytes",
    )
    assert stored(server.home) == before
    _still_serving(server, honest)


def test_receipt_that_does_not_check_out_is_refused_by_the_client(
    server: ServerRuntime, honest: Owner
) -> None:
    with client(server, honest) as c, pytest.raises(SignatureError, match="trusted key"):
        upload(c, honest.key, good_model(), TASK, server_pub=generate_signing_key().public_key())
    data = good_model()
    signed = sign_manifest(honest.key, data, TASK)
    with client(server, honest) as c:
        receipt = c.submit(signed, [data], timeout_s=30)
    check_receipt(receipt, signed.record, load_public_key(server.home.signing_pub))
    other = dataclasses.replace(signed.record, payload_size=len(data) + 1)
    with pytest.raises(SignatureError, match="other bytes"):
        check_receipt(receipt, other, None)


def test_wrong_ca_is_a_tls_error(server: ServerRuntime, honest: Owner, tmp_path: Path) -> None:
    other_home = new_home(tmp_path / "other")
    with client(server, honest, ca=other_home.ca_cert) as c, pytest.raises(TlsError, match="--ca"):
        c.status()
    _still_serving(server, honest)


def test_unreachable_server_is_retried_then_reported(honest: Owner, tmp_path: Path) -> None:
    home = new_home(tmp_path / "gone")
    waits: list[float] = []
    notices: list[str] = []
    connection = Connection("localhost:1", ca=home.ca_cert)
    with (
        ExchangeClient(connection, honest.key) as c,
        pytest.raises(ServerUnavailable, match="reach"),
    ):
        upload(
            c,
            honest.key,
            good_model(),
            TASK,
            retry=RetryPolicy(attempts=3, base_delay_s=0.01),
            sleep=waits.append,
            notify=notices.append,
        )
    assert len(waits) == 2
    assert all(0 <= w <= 0.02 for w in waits)
    assert "retrying" in notices[0]


def test_upload_retries_until_the_server_is_up(tmp_path: Path) -> None:
    home = new_home(tmp_path / "late")
    alice = enroll(home, make_owner(tmp_path, "alice"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    runtime = ServerRuntime(home, StartOptions(port=port, grace_s=1.0))
    notices: list[str] = []

    def start_then_wait(delay_s: float) -> None:
        if runtime.exchange is None:
            runtime.start()  # the server comes up during the first backoff
        time.sleep(delay_s)

    try:
        with ExchangeClient(Connection(f"localhost:{port}", ca=home.ca_cert), alice.key) as c:
            signed = upload(
                c,
                alice.key,
                good_model(),
                TASK,
                retry=RetryPolicy(attempts=6, base_delay_s=0.3, max_delay_s=1.0),
                sleep=start_then_wait,
                notify=notices.append,
                server_pub=load_public_key(home.signing_pub),
            )
    finally:
        runtime.stop()
    assert signed.record.client_id == alice.key_id
    assert notices and "cannot reach" in notices[0]


def test_one_server_per_home_and_per_port(server: ServerRuntime, tmp_path: Path) -> None:
    with pytest.raises(HomeError, match="already runs"):
        ServerRuntime(server.home, StartOptions(port=0)).start()
    assert server.exchange is not None
    elsewhere = ServerRuntime(new_home(tmp_path / "b"), StartOptions(port=server.exchange.port))
    with pytest.raises(ConfigError, match="cannot listen"):
        elsewhere.start()
    assert elsewhere.store is None  # everything it started was stopped again
    with client(server, make_owner(tmp_path, "x")) as c, pytest.raises(ServerRefused):
        c.status()  # the first server still answers (and refuses a stranger)


def test_health_check_reports_serving(server: ServerRuntime) -> None:
    credentials = grpc.ssl_channel_credentials(server.home.ca_cert.read_bytes())
    with grpc.secure_channel(address(server), credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service="free.v1.Exchange"), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_calls_without_credentials_are_refused(server: ServerRuntime) -> None:
    from free_common.proto import exchange_pb2, exchange_pb2_grpc

    credentials = grpc.ssl_channel_credentials(server.home.ca_cert.read_bytes())
    with grpc.secure_channel(address(server), credentials) as channel:
        stub = exchange_pb2_grpc.ExchangeStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetStatus(exchange_pb2.GetStatusRequest(), timeout=5)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "free-client-id" in caught.value.details()


def test_mutual_tls_requires_a_client_certificate(tmp_path: Path) -> None:
    from free_server.pki import issue_client_certificate, load_ca

    home = new_home(tmp_path / "mtls", mutual_tls=True)
    alice = enroll(home, make_owner(tmp_path, "alice"))
    ca = load_ca(home.ca_cert, home.ca_key)
    issue_client_certificate(ca, "alice").write(tmp_path / "alice.pem", tmp_path / "alice-tls.key")
    with serving(home) as runtime:
        with client(runtime, alice) as c, pytest.raises(TlsError):
            c.status()
        with client(
            runtime, alice, tls_cert=tmp_path / "alice.pem", tls_key=tmp_path / "alice-tls.key"
        ) as c:
            assert c.status().server_key_id == runtime.server_key_id


def test_plaintext_only_when_asked(tmp_path: Path) -> None:
    home = new_home(tmp_path / "plain")
    alice = enroll(home, make_owner(tmp_path, "alice"))
    with serving(home, insecure=True) as runtime:
        connection = Connection(address(runtime), insecure=True)
        with ExchangeClient(connection, alice.key) as c:
            assert c.status().server_key_id == runtime.server_key_id
        with client(runtime, alice) as c, pytest.raises((TlsError, ServerUnavailable)):
            c.status()
    with pytest.raises(ConfigError, match="--ca"):
        Connection("localhost:9091")


def test_a_start_forgets_nonces_older_than_twice_the_time_window(tmp_path: Path) -> None:
    home = new_home(tmp_path / "home")
    alice = enroll(home, make_owner(tmp_path, "alice"))
    with serving(home) as runtime, client(runtime, alice) as c:
        upload(c, alice.key, good_model(seed=30), TASK)
        upload(c, alice.key, good_model(seed=31), TASK)
    window_s = home.config.limits.time_window_s
    now = datetime.now(UTC)
    ages = (timedelta(seconds=2 * window_s + 60), timedelta(seconds=2 * window_s - 60))
    with sqlite3.connect(home.store_dir / DB_NAME) as db:
        # Age one nonce past twice the window, the other to just inside it.
        rowids = [r[0] for r in db.execute("SELECT rowid FROM nonces ORDER BY rowid")]
        for rowid, age in zip(rowids, ages, strict=True):
            seen = (now - age).isoformat(timespec="microseconds")
            db.execute("UPDATE nonces SET seen_at = ? WHERE rowid = ?", (seen, rowid))
    with serving(home):
        pass
    with sqlite3.connect(home.store_dir / DB_NAME) as db:
        assert db.execute("SELECT COUNT(*) FROM nonces").fetchone()[0] == 1
