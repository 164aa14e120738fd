"""What `free-client submit` retries and what it does not, against a real server on loopback.

Retried with backoff: gRPC's own concurrent-call limit (``RESOURCE_EXHAUSTED``
"Concurrent RPC limit exceeded!") and a TLS handshake the server drops before it
finishes (an overloaded server), which ends as a `TlsError` if it never passes.
Final at once: the server's own ``RESOURCE_EXHAUSTED`` refusals (an upload over its
cap) and a certificate that does not verify (wrong ``--ca``). The server's full disk
(`StoreFull`) is `test_faults_exchange.py`.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from exchange_harness import (
    TASK,
    Owner,
    enroll,
    good_model,
    make_owner,
    new_home,
    padded_model,
    wait_until,
)

from free_client.stub import Connection, ExchangeClient
from free_client.uploader import RetryPolicy, sign_manifest, upload
from free_common.errors import (
    HandshakeDropped,
    ServerBusy,
    ServerRefused,
    TlsError,
)
from free_common.models.onnx_static import IntakeLimits
from free_common.security.keys import load_private_key, load_public_key
from free_common.types import Receipt, Signed
from free_server.exchange import ExchangeService
from free_server.grpc_server import ExchangeServer, Listen
from free_server.home import ServerHome
from free_server.store import Store
from free_server.submission import SubmissionPolicy

MAX_UPLOAD = 20_000


@dataclass(frozen=True)
class World:
    home: ServerHome
    alice: Owner
    server: ExchangeServer
    temp_dir: Path


def _exchange(home: ServerHome, store: Store, listen: Listen, **options: int) -> ExchangeServer:
    """An exchange server on `home` taking uploads up to `MAX_UPLOAD` bytes."""
    policy = SubmissionPolicy(MAX_UPLOAD, 300_000, IntakeLimits())
    service = ExchangeService(store, load_private_key(home.signing_key), policy, chunk_bytes=1024)
    return ExchangeServer(service, home, listen, time_window_s=300, **options)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """An exchange server that serves one call at a time and takes uploads up to 20 kB."""
    root = tmp_path_factory.mktemp("retries")
    home = new_home(root / "home")
    alice = enroll(home, make_owner(root, "alice"))
    with home.open_store() as store:
        server = _exchange(home, store, Listen("127.0.0.1", 0), max_concurrent_calls=1)
        server.start()
        try:
            yield World(home, alice, server, store.blobs.tmp_dir)
        finally:
            server.stop(1)


def _connect(world: World, port: int | None = None, ca: Path | None = None) -> ExchangeClient:
    where = f"localhost:{port or world.server.port}"
    return ExchangeClient(Connection(where, ca=ca or world.home.ca_cert), world.alice.key)


def _upload(
    client: ExchangeClient,
    world: World,
    data: bytes,
    retry: RetryPolicy,
    sleep: Callable[[float], None],
    notices: list[str],
) -> Signed[Receipt]:
    return upload(
        client,
        world.alice.key,
        data,
        TASK,
        server_pub=load_public_key(world.home.signing_pub),
        retry=retry,
        sleep=sleep,
        notify=notices.append,
        rng=random.Random(0),
    )


def test_a_submit_beyond_the_call_limit_is_retried_until_a_slot_frees(world: World) -> None:
    release = threading.Event()
    first = good_model(seed=31)

    def held() -> Iterator[bytes]:
        yield first[:100]
        release.wait(30)
        yield first[100:]

    holder = _connect(world)
    signed = sign_manifest(world.alice.key, first, TASK)
    with ThreadPoolExecutor(1) as pool:
        busy: Future[Signed[Receipt]] = pool.submit(holder.submit, signed, held(), timeout_s=30)
        # The server is streaming the held upload to a temporary file: its one slot is taken.
        assert wait_until(lambda: list(world.temp_dir.iterdir()), 10)
        waits: list[float] = []

        def free_the_slot(wait: float) -> None:
            waits.append(wait)
            release.set()
            busy.result(timeout=30)
            time.sleep(0.05)  # grpcio frees the slot just after the reply is sent

        notices: list[str] = []
        with _connect(world) as client:
            receipt = _upload(
                client,
                world,
                good_model(seed=32),
                RetryPolicy(attempts=5, base_delay_s=0.01),
                free_the_slot,
                notices,
            )
        assert busy.result(timeout=30).record.payload_sha256 == signed.record.payload_sha256
    holder.close()
    assert receipt.record.client_id == world.alice.key_id
    assert waits and len(notices) == len(waits)
    assert "as many calls as it allows" in notices[0] and "retrying" in notices[0]


def test_the_servers_own_resource_exhausted_is_final(world: World) -> None:
    waits: list[float] = []
    with _connect(world) as client, pytest.raises(ServerRefused) as refused:
        _upload(client, world, padded_model(MAX_UPLOAD), RetryPolicy(), waits.append, [])
    assert refused.value.status == "RESOURCE_EXHAUSTED"
    assert not isinstance(refused.value, ServerBusy)
    assert f"{MAX_UPLOAD:,}" in refused.value.message
    assert waits == []


def test_a_wrong_ca_fails_at_once_without_retries(world: World, tmp_path: Path) -> None:
    other = new_home(tmp_path / "other")
    waits: list[float] = []
    with _connect(world, ca=other.ca_cert) as client, pytest.raises(TlsError) as failed:
        _upload(client, world, good_model(seed=33), RetryPolicy(), waits.append, [])
    assert not isinstance(failed.value, HandshakeDropped)
    assert "--ca" in failed.value.message and "\n" not in failed.value.message
    assert waits == []
    assert failed.value.exit_code == TlsError.exit_code == 4


class DroppingProxy:
    """A loopback TCP proxy that closes its first `drop` connections at once, then forwards.

    A closed connection is what an owner sees when an overloaded server drops the TLS
    handshake ("Handshake read failed (Socket closed)"). With `delay_s`, the server's
    first answer on each forwarded connection is held back that long: a server slow to
    finish handshakes, as under a burst of new connections.
    """

    def __init__(self, target_port: int, drop: int, delay_s: float = 0.0) -> None:
        self._target = target_port
        self._left = drop
        self._delay_s = delay_s
        self.dropped = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                incoming, _ = self._listener.accept()
            except OSError:
                return  # closed
            if self._left != 0:
                self._left -= 1
                self.dropped += 1
                incoming.close()
                continue
            outgoing = socket.create_connection(("127.0.0.1", self._target))
            self._open += [incoming, outgoing]
            for source, sink, delay_s in (
                (incoming, outgoing, 0.0),
                (outgoing, incoming, self._delay_s),
            ):
                threading.Thread(
                    target=self._pipe, args=(source, sink, delay_s), daemon=True
                ).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, delay_s: float) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                time.sleep(delay_s)
                delay_s = 0.0
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()
        for sock in self._open:
            sock.close()


def test_a_dropped_handshake_is_retried_then_the_upload_goes_through(world: World) -> None:
    proxy = DroppingProxy(world.server.port, drop=2)
    waits: list[float] = []

    def sleep(wait: float) -> None:
        # Longer than the channel's own reconnect backoff (at most 0.4 s after two
        # failures), so that every retry opens a new connection.
        waits.append(wait)
        time.sleep(0.6)

    notices: list[str] = []
    try:
        with _connect(world, proxy.port) as client:
            receipt = _upload(
                client, world, good_model(seed=34), RetryPolicy(attempts=5), sleep, notices
            )
    finally:
        proxy.close()
    assert receipt.record.client_id == world.alice.key_id
    # grpcio may open a second connection within one attempt: at least one retry.
    assert proxy.dropped == 2 and 1 <= len(waits) <= 2
    assert all("closed the TLS handshake" in line for line in notices)


def test_a_handshake_the_server_is_slow_to_answer_is_waited_for(world: World) -> None:
    # Under a burst of new connections a loaded server takes a second or more to answer
    # a handshake. gRPC gives a connection attempt `grpc.min_reconnect_backoff_ms` at
    # least; at 200 ms the channel abandoned such handshakes ("handshaker shutdown") and
    # 1,000 owners retried hundreds of them (docs/performance.md).
    proxy = DroppingProxy(world.server.port, drop=0, delay_s=1.5)
    waits: list[float] = []
    try:
        with _connect(world, proxy.port) as client:
            receipt = _upload(
                client, world, good_model(seed=36), RetryPolicy(attempts=1), waits.append, []
            )
    finally:
        proxy.close()
    assert receipt.record.client_id == world.alice.key_id
    assert waits == []


def _grpc_threads() -> set[threading.Thread]:
    # grpc's Python layer starts its threads through a wrapper named `_run`.
    return {t for t in threading.enumerate() if t.name.endswith("(_run)")}


def test_a_connected_client_keeps_no_thread_polling_its_channel(world: World) -> None:
    # The client watches its channel until it is READY, to tell a refused handshake from
    # an outage. grpc watches with a thread that wakes five times a second: 1,000 owners'
    # channels in one load generator spent more CPU on those wake-ups than on uploading.
    before = _grpc_threads()
    with _connect(world) as client:
        assert _grpc_threads() - before, "a fresh client watches its channel"
        client.status()
        assert wait_until(lambda: not _grpc_threads() - before, timeout_s=3)


def test_a_handshake_dropped_every_time_ends_as_a_tls_error(world: World) -> None:
    proxy = DroppingProxy(world.server.port, drop=-1)
    waits: list[float] = []
    try:
        with _connect(world, proxy.port) as client, pytest.raises(TlsError) as failed:
            _upload(client, world, good_model(seed=35), RetryPolicy(attempts=3), waits.append, [])
    finally:
        proxy.close()
    assert isinstance(failed.value, HandshakeDropped)
    assert len(waits) == 2 and proxy.dropped >= 1
    assert "mutual TLS" in failed.value.message and "overloaded" in failed.value.message
    assert failed.value.exit_code == 4


def test_a_server_that_wants_a_client_certificate_ends_as_a_tls_error(tmp_path: Path) -> None:
    home = new_home(tmp_path / "mtls", mutual_tls=True)
    alice = enroll(home, make_owner(tmp_path, "alice"))
    with home.open_store() as store:
        server = _exchange(home, store, Listen("127.0.0.1", 0, mutual_tls=True))
        server.start()
        waits: list[float] = []
        try:
            world = World(home, alice, server, store.blobs.tmp_dir)
            with _connect(world) as client, pytest.raises(HandshakeDropped) as failed:
                _upload(client, world, good_model(seed=36), RetryPolicy(2), waits.append, [])
        finally:
            server.stop(1)
    assert len(waits) == 1
    assert "--tls-cert" in failed.value.message and failed.value.exit_code == 4
