"""Under many concurrent uploads the exchange queues calls instead of refusing them.

A real TLS server (grpc's asyncio server) with few upload threads, real owners'
channels: more uploads than threads all get their receipt on the first try,
each stored once with the sha256 that was hashed while it streamed; an upload
waiting for a thread is not read (its bytes stay with the owner: no temporary
file); an upload that stops sending gives its thread back.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from exchange_harness import TASK, Owner, enroll, good_model, make_owner, new_home, wait_until

from free_client.stub import Connection, ExchangeClient
from free_client.uploader import check_receipt, sign_manifest
from free_common.errors import (
    ConfigError,
    FreeError,
    HandshakeDropped,
    ServerRefused,
    ServerUnavailable,
)
from free_common.models.onnx_static import IntakeLimits
from free_common.security.keys import load_private_key, load_public_key
from free_common.types import Receipt, Signed
from free_server import servicer
from free_server.exchange import ExchangeService
from free_server.grpc_server import ExchangeServer, Listen
from free_server.home import ServerHome
from free_server.store import Store
from free_server.submission import SubmissionPolicy

UPLOADS = 80  # past the 64 calls the exchange used to refuse beyond


@dataclass(frozen=True)
class World:
    home: ServerHome
    owner: Owner
    store: Store
    server: ExchangeServer


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    """A server that stores one upload at a time (calls beyond it wait their turn)."""
    home = new_home(tmp_path / "home")
    owner = enroll(home, make_owner(tmp_path, "olive"))
    with home.open_store() as store:
        policy = SubmissionPolicy(1 << 20, 300_000, IntakeLimits())
        service = ExchangeService(
            store, load_private_key(home.signing_key), policy, chunk_bytes=1024
        )
        server = ExchangeServer(service, home, Listen("127.0.0.1", 0), 300, upload_threads=1)
        server.start()
        try:
            yield World(home, owner, store, server)
        finally:
            server.stop(1)


def _client(world: World) -> ExchangeClient:
    connection = Connection(f"localhost:{world.server.port}", ca=world.home.ca_cert)
    return ExchangeClient(connection, world.owner.key, timeout_s=60.0)


def _submit(world: World, data: bytes, chunks: Iterator[bytes] | None = None) -> Signed[Receipt]:
    """One upload on its own channel; any refusal of the call fails the test.

    Only a connection lost before the call exists is tried again (a TLS handshake
    dropped, or one that did not finish before the channel's connect timeout): a burst
    of 80 connections on a loaded machine can lose one (the uploader retries both
    too), and it is not the call limit this file is about; a refused call
    (`ServerBusy`, RESOURCE_EXHAUSTED) is never retried.
    """
    signed = sign_manifest(world.owner.key, data, TASK)
    for attempt in range(5):
        pieces = chunks or iter([data[i : i + 512] for i in range(0, len(data), 512)])
        try:
            with _client(world) as client:
                receipt = client.submit(signed, pieces, timeout_s=60)
            break
        except (HandshakeDropped, ServerUnavailable):
            if attempt == 4:
                raise
            time.sleep(0.2 * 2**attempt)  # the burst thins out, as with the uploader's backoff
    check_receipt(receipt, signed.record, load_public_key(world.home.signing_pub))
    return receipt


def test_more_uploads_than_threads_all_get_receipts_without_refusals(world: World) -> None:
    models = [good_model(seed=100 + i) for i in range(UPLOADS)]
    with ThreadPoolExecutor(UPLOADS) as pool:
        # Any ServerRefused (RESOURCE_EXHAUSTED "Concurrent RPC limit") would raise here.
        receipts = list(pool.map(lambda data: _submit(world, data), models))
    assert len({r.record.submission_id for r in receipts}) == UPLOADS
    for data, receipt in zip(models, receipts, strict=True):
        row = world.store.submission(int(receipt.record.submission_id))
        # Hashed while it streamed; the stored file's own hash agrees.
        blob = world.store.blob_path(row.sha256).read_bytes()
        assert row.sha256 == hashlib.sha256(data).hexdigest() == hashlib.sha256(blob).hexdigest()
    assert sum(world.store.summary(recent=0).submission_counts.values()) == UPLOADS
    # A retry of stored bytes is acknowledged once: the original receipt, no new row.
    again = _submit(world, models[0])
    assert again.record == receipts[0].record
    assert sum(world.store.summary(recent=0).submission_counts.values()) == UPLOADS


def _held(data: bytes, release: threading.Event) -> Iterator[bytes]:
    yield data[:100]
    release.wait(30)
    yield data[100:]


def test_an_upload_waiting_for_a_thread_is_not_read_until_one_is_free(world: World) -> None:
    release = threading.Event()
    first, second = good_model(seed=201), good_model(seed=202)
    temp = world.store.blobs.tmp_dir
    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(_submit, world, first, _held(first, release))
        assert wait_until(lambda: len(list(temp.iterdir())) == 1, 10)  # the one thread streams it
        waiting = pool.submit(_submit, world, second)
        # Queued, not refused and not streamed: no second temporary file while it waits.
        assert not wait_until(lambda: waiting.done() or len(list(temp.iterdir())) > 1, 1.5)
        release.set()
        receipts = [held.result(30), waiting.result(30)]
    assert [r.record.payload_sha256 for r in receipts] == [
        hashlib.sha256(first).hexdigest(),
        hashlib.sha256(second).hexdigest(),
    ]
    assert list(temp.iterdir()) == []


def test_an_upload_that_stops_sending_gives_its_thread_back(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(servicer, "READ_IDLE_S", 0.5)
    never = threading.Event()
    stalled = good_model(seed=301)
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(_submit, world, stalled, _held(stalled, never))
        with pytest.raises(ServerRefused) as refused:
            held.result(30)
        never.set()
    assert refused.value.status == "ABORTED"
    assert "sent nothing for 0.5 s" in refused.value.message
    # Nothing of it stays, and the one upload thread serves the next owner.
    assert wait_until(lambda: list(world.store.blobs.tmp_dir.iterdir()) == [], 5)
    assert sum(world.store.summary(recent=0).submission_counts.values()) == 0
    receipt = _submit(world, good_model(seed=302))
    assert receipt.record.payload_size > 0


def test_stopping_with_an_upload_in_flight_and_one_waiting_ends_both_promptly(
    world: World,
) -> None:
    release = threading.Event()
    first, second = good_model(seed=401), good_model(seed=402)
    temp = world.store.blobs.tmp_dir
    with ThreadPoolExecutor(2) as pool:
        held = pool.submit(_submit, world, first, _held(first, release))
        assert wait_until(lambda: len(list(temp.iterdir())) == 1, 10)
        waiting = pool.submit(_submit, world, second)
        time.sleep(0.3)  # the second call is queued for the one upload thread
        began = time.monotonic()
        world.server.stop(1)
        # Grace, then the calls are cancelled: the thread reading the held stream
        # learns it at once, instead of waiting out READ_IDLE_S.
        assert time.monotonic() - began < 10
        release.set()
        for outcome in (held, waiting):
            with pytest.raises(FreeError):
                outcome.result(30)
    assert list(temp.iterdir()) == []
    assert sum(world.store.summary(recent=0).submission_counts.values()) == 0


def test_a_second_server_on_a_taken_port_fails_with_one_line_and_leaves_no_thread(
    world: World,
) -> None:
    policy = SubmissionPolicy(1 << 20, 300_000, IntakeLimits())
    service = ExchangeService(
        world.store, load_private_key(world.home.signing_key), policy, chunk_bytes=1024
    )
    second = ExchangeServer(service, world.home, Listen("127.0.0.1", world.server.port), 300)
    threads = threading.active_count()
    with pytest.raises(ConfigError, match="choose another --port"):
        second.start()
    assert wait_until(lambda: threading.active_count() <= threads, 5)
    # The first server still serves.
    assert _submit(world, good_model(seed=501)).record.payload_size > 0
