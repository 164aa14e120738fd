"""The server store's rows: allow-list, submissions (idempotency, replay), rounds, releases."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pytest

from free_common.errors import (
    DuplicateRecord,
    PayloadTooLarge,
    RecordNotFound,
    ReplayError,
    RevokedClient,
    StoreError,
    StoreVersionError,
    UnknownClient,
)
from free_server.migrations import SCHEMA_VERSION
from free_server.records import SubmissionResult
from free_server.store import DB_NAME, Store

KEY_A = "a" * 32
KEY_B = "b" * 32
TASK = {"num_classes": 5, "input_shape": [1, 28, 28]}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "store", create=True)
    opened.add_client("alice", key_id=KEY_A, public_key_pem="PEM-A")
    opened.add_client("bob", key_id=KEY_B, public_key_pem="PEM-B", node_public_key="ecdsa-x")
    yield opened
    opened.close()


def _submit(store: Store, payload: bytes, nonce: bytes, key: str = KEY_A) -> SubmissionResult:
    writer = store.blob_writer(max_bytes=1 << 20)
    with writer:
        writer.write(payload)
        staged = writer.finish()
        result = store.record_submission(
            staged,
            client_key_id=key,
            manifest=b"manifest:" + payload,
            signature=b"sig:" + nonce,
            nonce=nonce,
            task_metadata=TASK,
        )
    assert not writer.path.exists(), "the temp file must be gone after the writer closes"
    return result


def _tmp_files(store: Store) -> list[Path]:
    return list(store.blobs.tmp_dir.iterdir())


# -- allow-list -------------------------------------------------------------------------


def test_clients_are_listed_in_order_and_found_by_key(store: Store) -> None:
    assert [c.name for c in store.list_clients()] == ["alice", "bob"]
    bob = store.client_by_key_id(KEY_B)
    assert bob is not None and bob.node_public_key == "ecdsa-x" and bob.active
    assert store.client_by_key_id("c" * 32) is None


@pytest.mark.parametrize(
    ("name", "key", "node"),
    [("alice", "c" * 32, None), ("carol", KEY_A, None), ("carol", "c" * 32, "ecdsa-x")],
)
def test_duplicate_name_key_or_node_key_is_refused(
    store: Store, name: str, key: str, node: str | None
) -> None:
    with pytest.raises(DuplicateRecord):
        store.add_client(name, key_id=key, public_key_pem="PEM", node_public_key=node)
    assert len(store.list_clients()) == 2


def test_revocation_is_idempotent_and_blocks_the_key(store: Store) -> None:
    first = store.revoke_client("alice").client
    again = store.revoke_client("alice").client
    assert first.revoked_at is not None and again.revoked_at == first.revoked_at
    with pytest.raises(RevokedClient) as caught:
        store.active_client(KEY_A)
    assert caught.value.grpc_status == "PERMISSION_DENIED"
    with pytest.raises(UnknownClient) as unknown:
        store.active_client("c" * 32)
    assert unknown.value.grpc_status == "UNAUTHENTICATED"
    with pytest.raises(RecordNotFound):
        store.revoke_client("nobody")


# -- submissions ------------------------------------------------------------------------


def test_new_submission_places_blob_and_commits_row(store: Store) -> None:
    payload = b"onnx bytes " * 100
    result = _submit(store, payload, b"n" * 16)
    row = result.row
    assert not result.duplicate
    assert row.state == "received" and row.size == len(payload)
    assert row.sha256 == hashlib.sha256(payload).hexdigest()
    assert row.task_metadata == TASK and row.nonce == b"n" * 16
    blob = store.blob_path(row.sha256)
    assert blob == store.root / "blobs" / row.sha256[:2] / row.sha256
    assert blob.read_bytes() == payload
    assert store.pending_intake() == [row]
    assert _tmp_files(store) == []


def test_retry_with_same_bytes_returns_the_original_row_whatever_the_nonce(store: Store) -> None:
    original = _submit(store, b"model-1", b"1" * 16).row
    for nonce in (b"1" * 16, b"2" * 16):
        retry = _submit(store, b"model-1", nonce)
        assert retry.duplicate
        assert retry.row == original  # same id, time, nonce and manifest: the same receipt
    assert len(store.pending_intake()) == 1
    # The retry's fresh nonce was not consumed: it can still carry other bytes.
    assert not _submit(store, b"model-2", b"2" * 16).duplicate


def test_replayed_nonce_with_other_bytes_is_refused_and_nothing_is_stored(store: Store) -> None:
    first = _submit(store, b"model-1", b"1" * 16).row
    with pytest.raises(ReplayError) as caught:
        _submit(store, b"model-2", b"1" * 16)
    assert caught.value.grpc_status == "ALREADY_EXISTS"
    assert store.pending_intake() == [first]
    assert store.blobs.all_hashes() == {first.sha256}
    assert _tmp_files(store) == []


def test_nonces_are_per_client_and_same_bytes_from_two_clients_are_two_rows(store: Store) -> None:
    a = _submit(store, b"shared", b"1" * 16, KEY_A).row
    b = _submit(store, b"shared", b"1" * 16, KEY_B).row
    assert a.id != b.id and a.sha256 == b.sha256
    assert store.blobs.all_hashes() == {a.sha256}


def test_submissions_from_unknown_or_revoked_keys_store_nothing(store: Store) -> None:
    with pytest.raises(UnknownClient):
        _submit(store, b"model", b"1" * 16, "c" * 32)
    store.revoke_client("alice")
    with pytest.raises(RevokedClient):
        _submit(store, b"model", b"1" * 16, KEY_A)
    assert store.pending_intake() == [] and store.blobs.all_hashes() == set()
    assert _tmp_files(store) == []


def test_calls_that_wait_are_committed_together_and_a_refusal_spares_the_rest(
    store: Store,
) -> None:
    _submit(store, b"first", b"0" * 16)
    commits: list[str] = []
    store._conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    calls = [(b"one", b"1"), (b"replay", b"0"), (b"two", b"2"), (b"first", b"9")]
    outcomes: dict[bytes, SubmissionResult | Exception] = {}

    def call(payload: bytes, nonce: bytes) -> None:
        try:
            outcomes[payload] = _submit(store, payload, nonce * 16)
        except ReplayError as exc:
            outcomes[payload] = exc

    # Hold the commit back (as a slow transaction would) until every call waits for it.
    with store._receipt_leader:
        threads = [threading.Thread(target=call, args=args) for args in calls]
        for thread in threads:
            thread.start()
        while len(store._receipts) < len(calls):
            time.sleep(0.01)
    for thread in threads:
        thread.join(timeout=30)
    assert commits == ["COMMIT"]  # one transaction for the four calls
    assert isinstance(outcomes[b"replay"], ReplayError)  # nonce 0 was used for b"first"
    stored = [o for p, o in outcomes.items() if p in (b"one", b"two", b"first")]
    assert all(isinstance(o, SubmissionResult) for o in stored)
    assert cast(SubmissionResult, outcomes[b"first"]).duplicate  # the retry, in the group
    assert sorted(r.row.id for r in cast(list[SubmissionResult], stored)) == [1, 2, 3]
    assert {s.sha256 for s in store.pending_intake()} == {
        hashlib.sha256(p).hexdigest() for p in (b"first", b"one", b"two")
    }
    assert len(store.blobs.all_hashes()) == 3 and _tmp_files(store) == []
    audit = store.audit_log()
    assert [e.kind for e in audit.entries].count("submission.received") == 3


def test_byte_cap_refuses_before_writing_and_the_temp_file_goes(store: Store) -> None:
    with pytest.raises(PayloadTooLarge) as caught, store.blob_writer(max_bytes=10) as writer:
        writer.write(b"123456")
        writer.write(b"12345")
    assert caught.value.grpc_status == "RESOURCE_EXHAUSTED"
    assert writer.size == 6  # the chunk that crossed the cap was not written
    assert _tmp_files(store) == []


def test_writer_hashes_incrementally(store: Store) -> None:
    payload = bytes(range(256)) * 50
    with store.blob_writer(max_bytes=len(payload)) as writer:
        for start in range(0, len(payload), 1000):
            writer.write(payload[start : start + 1000])
        staged = writer.finish()
        assert staged.path.read_bytes() == payload
    assert staged.sha256 == hashlib.sha256(payload).hexdigest() and staged.size == len(payload)
    assert not staged.path.exists()  # never placed: dropped when the writer closed


def test_verdicts_are_final_and_ordered_for_rounds(store: Store) -> None:
    ids = [_submit(store, f"m{i}".encode(), f"{i}".encode() * 16).row.id for i in range(4)]
    store.set_verdict(ids[2], accepted=True)
    store.set_verdict(ids[0], accepted=False, reason="opset too new")
    first_round = store.start_round(store.request_round("small").id)
    store.set_verdict(ids[1], accepted=True)
    again = store.set_verdict(ids[0], accepted=True)  # a second verdict changes nothing
    assert again.state == "refused" and again.reason == "opset too new"
    assert [r.id for r in store.accepted_submissions()] == [ids[2], ids[1]]
    assert [r.id for r in store.accepted_submissions(since_round=first_round.id)] == [ids[1]]
    assert [r.id for r in store.pending_intake()] == [ids[3]]
    with pytest.raises(ValueError, match="reason"):
        store.set_verdict(ids[3], accepted=False)
    with pytest.raises(RecordNotFound):
        store.set_verdict(999, accepted=True)


# -- rounds, releases, evaluations ------------------------------------------------------


def test_round_lifecycle(store: Store) -> None:
    assert store.next_round_request() is None
    first = store.request_round()
    second = store.request_round("paper")
    assert store.next_round_request() == first
    running = store.start_round(first.id)
    assert running.state == "running" and running.started_at is not None
    with pytest.raises(StoreError):
        store.start_round(first.id)
    assert store.next_round_request() == second
    done = store.finish_round(first.id)
    assert done.state == "finished" and done.error is None
    store.start_round(second.id)
    failed = store.finish_round(second.id, error="out of memory")
    assert failed.state == "failed" and failed.error == "out of memory"
    assert store.latest_started_round() == failed
    assert [r.id for r in store.rounds(state="finished")] == [first.id]
    with pytest.raises(StoreError):
        store.finish_round(first.id)


def test_releases_are_versioned_and_never_reused(store: Store) -> None:
    assert store.latest_release() is None and store.next_release_version() == 1
    round_id = store.start_round(store.request_round().id).id
    with store.blob_writer(max_bytes=100) as writer:
        writer.write(b"weights-1")
        release = store.record_release(
            writer.finish(), version=1, manifest=b"m1", signature=b"s1", round_id=round_id
        )
    assert store.latest_release() == release == store.release(1)
    assert store.blob_path(release.sha256).read_bytes() == b"weights-1"
    assert store.next_release_version() == 2
    with store.blob_writer(max_bytes=100) as writer, pytest.raises(DuplicateRecord):
        writer.write(b"weights-other")
        store.record_release(writer.finish(), version=1, manifest=b"m", signature=b"s")
    with pytest.raises(RecordNotFound):
        store.release(7)


def test_evaluations_and_summary(store: Store) -> None:
    round_id = store.start_round(store.request_round().id).id
    store.record_evaluation(round_id, "3010240977760278128", {"accuracy": 0.5, "shots": 5})
    with pytest.raises(RecordNotFound):
        store.record_evaluation(99, "1", {"accuracy": 1.0})
    accepted = _submit(store, b"ok", b"1" * 16).row
    refused = _submit(store, b"bad", b"2" * 16).row
    _submit(store, b"new", b"3" * 16)
    store.set_verdict(accepted.id, accepted=True)
    store.set_verdict(refused.id, accepted=False, reason="two outputs")
    summary = store.summary(recent=2)
    assert summary.schema_version == SCHEMA_VERSION
    counts = {"received": 1, "accepted": 1, "refused": 1, "held": 0, "withdrawn": 0}
    assert summary.submission_counts == counts
    assert [s.id for s in summary.submissions] == [refused.id, refused.id + 1]
    assert [c.name for c in summary.clients] == ["alice", "bob"]
    (evaluation,) = summary.evaluations
    assert evaluation.node_id == "3010240977760278128"
    assert evaluation.metrics == {"accuracy": 0.5, "shots": 5.0}


def test_prune_nonces_forgets_only_old_ones(tmp_path: Path) -> None:
    now = [datetime(2030, 1, 1, tzinfo=UTC)]
    store = Store(tmp_path / "s", create=True, clock=lambda: now[0])
    store.add_client("alice", key_id=KEY_A, public_key_pem="PEM")
    _submit(store, b"old", b"1" * 16)
    now[0] += timedelta(hours=1)
    _submit(store, b"new", b"2" * 16)
    assert store.prune_nonces(before=now[0] - timedelta(minutes=10)) == 1
    with pytest.raises(ReplayError):
        _submit(store, b"newer", b"2" * 16)
    store.close()


# -- schema -----------------------------------------------------------------------------


def test_store_uses_wal_and_records_its_schema_version(store: Store) -> None:
    with sqlite3.connect(store.db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_version")]
    assert versions == list(range(1, SCHEMA_VERSION + 1)) and store.schema_version == SCHEMA_VERSION


def test_reopening_keeps_rows_and_does_not_migrate_again(store: Store) -> None:
    store.close()
    with Store(store.root) as again:
        assert [c.name for c in again.list_clients()] == ["alice", "bob"]
        assert again.schema_version == SCHEMA_VERSION


def test_a_newer_schema_is_refused_with_a_clear_error(store: Store) -> None:
    store.close()
    with sqlite3.connect(store.db_path) as conn:
        conn.execute("INSERT INTO schema_version VALUES (?, 'future')", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreVersionError, match=r"upgrade free-server") as caught:
        Store(store.root)
    assert f"version {SCHEMA_VERSION + 1}" in caught.value.message


def test_missing_store_is_an_error_unless_asked_to_create(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="free-server init"):
        Store(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    with Store(tmp_path / "nothing", create=True) as made:
        assert (made.root / DB_NAME).is_file()
