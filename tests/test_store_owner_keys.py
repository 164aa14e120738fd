"""Owner keys in the store: revocation withdraws models from later rounds; rotation.

Also the schema migration that made room for both (version 1 to 2).
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from free_common.errors import DuplicateRecord, RecordNotFound, RevokedClient
from free_common.security.node_keys import generate_node_key, node_public_key_line
from free_server.migrations import MIGRATIONS, SCHEMA_VERSION
from free_server.node_sync import allowed_node_keys, node_key_pem
from free_server.records import SubmissionRow
from free_server.store import DB_NAME, Store

KEY_A, KEY_B, KEY_C, KEY_D = ("a" * 32, "b" * 32, "c" * 32, "d" * 32)
TASK = {"num_classes": 5, "input_shape": [1, 28, 28]}


def _node_line() -> str:
    return node_public_key_line(generate_node_key()).decode("ascii")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "store", create=True)
    opened.add_client("alice", key_id=KEY_A, public_key_pem="PEM-A")
    opened.add_client("bob", key_id=KEY_B, public_key_pem="PEM-B")
    yield opened
    opened.close()


def _submit(store: Store, payload: bytes, key: str) -> SubmissionRow:
    with store.blob_writer(max_bytes=1 << 20) as writer:
        writer.write(payload)
        return store.record_submission(
            writer.finish(),
            client_key_id=key,
            manifest=b"m",
            signature=b"s",
            nonce=payload.ljust(16, b"."),
            task_metadata=TASK,
        ).row


def _accepted(store: Store, payload: bytes, key: str) -> int:
    row_id = _submit(store, payload, key).id
    store.set_verdict(row_id, accepted=True)
    return row_id


def _ids(rows: list[SubmissionRow]) -> list[int]:
    return [row.id for row in rows]


# -- revocation withdraws -------------------------------------------------------------------


def test_revocation_withdraws_the_owners_models_and_counts_the_others_once(store: Store) -> None:
    a_accepted = _accepted(store, b"a1", KEY_A)
    a_received = _submit(store, b"a2", KEY_A).id
    a_refused = _submit(store, b"a3", KEY_A).id
    store.set_verdict(a_refused, accepted=False, reason="two outputs")
    b1 = _accepted(store, b"b1", KEY_B)
    first = store.start_round(store.request_round().id)
    b2 = _accepted(store, b"b2", KEY_B)

    done = store.revoke_client("alice")

    assert done.withdrawn == 2 and done.client.state == "revoked"
    assert _ids(store.accepted_submissions()) == [b1, b2]
    assert _ids(store.accepted_submissions(since_round=first.id)) == [b2]
    assert store.pending_intake() == []  # intake skips what is withdrawn
    assert store.submission(a_refused).withdrawn_at is None  # never in a round anyway
    # A worker that held the withdrawn model still records its verdict: it stays out.
    late = store.set_verdict(a_received, accepted=True)
    assert late.state == "accepted" and late.withdrawn_at is not None
    assert _ids(store.accepted_submissions(since_round=first.id)) == [b2]
    second = store.start_round(store.request_round().id)
    assert store.accepted_submissions(since_round=second.id) == []
    b3 = _accepted(store, b"b3", KEY_B)
    assert _ids(store.accepted_submissions(since_round=second.id)) == [b3]
    assert store.summary().submission_counts == {
        "received": 0,
        "accepted": 3,
        "refused": 1,
        "held": 0,
        "withdrawn": 2,
    }
    withdrawn = store.submission(a_accepted)
    assert withdrawn.state == "accepted" and withdrawn.withdrawn_at == done.client.revoked_at

    again = store.revoke_client("alice")
    assert again.withdrawn == 0 and again.client.revoked_at == done.client.revoked_at


def test_keep_submissions_leaves_the_models_until_a_later_revoke_withdraws_them(
    store: Store,
) -> None:
    kept = _accepted(store, b"a1", KEY_A)
    assert store.revoke_client("alice", withdraw=False).withdrawn == 0
    assert _ids(store.accepted_submissions()) == [kept]
    with pytest.raises(RevokedClient):
        store.active_client(KEY_A)
    assert store.revoke_client("alice").withdrawn == 1
    assert store.accepted_submissions() == []


# -- rotation -------------------------------------------------------------------------------


def test_rotation_keeps_name_and_submissions_and_refuses_the_old_key(store: Store) -> None:
    old = _accepted(store, b"a1", KEY_A)
    rotated = store.rotate_client("alice", key_id=KEY_C, public_key_pem="PEM-C")
    assert (rotated.name, rotated.key_id, rotated.state) == ("alice", KEY_C, "active")
    states = [(c.name, c.key_id, c.state) for c in store.list_clients()]
    assert states == [
        ("alice", KEY_A, "replaced"),
        ("bob", KEY_B, "active"),
        ("alice", KEY_C, "active"),
    ]
    with pytest.raises(RevokedClient, match="replaced by a newer key") as caught:
        store.active_client(KEY_A)
    assert caught.value.grpc_status == "PERMISSION_DENIED"
    with pytest.raises(RevokedClient, match="replaced"):
        _submit(store, b"a2", KEY_A)
    new = _accepted(store, b"c1", KEY_C)
    assert _ids(store.accepted_submissions()) == [old, new]
    # Revoking the owner withdraws what it sent under both keys.
    assert store.revoke_client("alice").withdrawn == 2
    assert store.accepted_submissions() == []


@pytest.mark.parametrize(
    ("name", "key", "error", "words"),
    [
        ("nobody", KEY_C, RecordNotFound, "no client named"),
        ("alice", KEY_A, DuplicateRecord, "already the current key"),
        ("alice", KEY_B, DuplicateRecord, "already registered (as 'bob')"),
    ],
)
def test_rotation_refuses_unknown_owners_and_used_keys(
    store: Store, name: str, key: str, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=re.escape(words)):
        store.rotate_client(name, key_id=key, public_key_pem="PEM")
    assert [c.state for c in store.list_clients()] == ["active", "active"]


def test_rotated_out_keys_and_names_never_come_back(store: Store) -> None:
    store.rotate_client("alice", key_id=KEY_C, public_key_pem="PEM-C")
    with pytest.raises(DuplicateRecord, match="as 'alice'"):
        store.add_client("carol", key_id=KEY_A, public_key_pem="PEM-A")
    with pytest.raises(DuplicateRecord, match="name"):
        store.add_client("alice", key_id=KEY_D, public_key_pem="PEM-D")
    with pytest.raises(DuplicateRecord):
        store.rotate_client("alice", key_id=KEY_A, public_key_pem="PEM-A")
    store.revoke_client("alice")
    with pytest.raises(RevokedClient, match="revoked owner gets no new key"):
        store.rotate_client("alice", key_id=KEY_D, public_key_pem="PEM-D")


def test_rotation_replaces_or_carries_the_node_key_node_sync_reads(tmp_path: Path) -> None:
    first, second = _node_line(), _node_line()
    with Store(tmp_path / "store", create=True) as store:
        store.add_client("bob", key_id=KEY_B, public_key_pem="PEM-B", node_public_key=first)
        carried = store.rotate_client("bob", key_id=KEY_C, public_key_pem="PEM-C")
        assert carried.node_public_key == first
        assert allowed_node_keys(store.list_clients()) == {node_key_pem(first): "bob"}
        with pytest.raises(DuplicateRecord, match="node key"):
            store.add_client("dave", key_id=KEY_D, public_key_pem="PEM", node_public_key=first)

        store.rotate_client("bob", key_id=KEY_D, public_key_pem="PEM-D", node_public_key=second)
        assert allowed_node_keys(store.list_clients()) == {node_key_pem(second): "bob"}
        with pytest.raises(DuplicateRecord, match="node key"):
            store.rotate_client(
                "bob", key_id="e" * 32, public_key_pem="PEM-E", node_public_key=first
            )


# -- migration ------------------------------------------------------------------------------


def test_a_version_1_store_migrates_with_its_rows_and_foreign_keys(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    with sqlite3.connect(root / DB_NAME) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT)")
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (1, 'then')")
        conn.execute(
            "INSERT INTO clients (name, key_id, public_key_pem, node_public_key, added_at,"
            " revoked_at) VALUES ('alice', ?, 'PEM-A', NULL, '2030-01-01T00:00:00+00:00', NULL)",
            (KEY_A,),
        )
        conn.execute(
            "INSERT INTO submissions (client_key_id, sha256, size, manifest, signature, nonce,"
            " task_metadata, received_at, state, verdict_at, verdict_seq) VALUES (?, 'f00', 3,"
            " x'00', x'00', x'01', '{}', '2030-01-01T00:00:00+00:00', 'accepted',"
            " '2030-01-01T00:00:01+00:00', 1)",
            (KEY_A,),
        )
    conn.close()

    with Store(root) as store:
        assert store.schema_version == SCHEMA_VERSION == 4
        (alice,) = store.list_clients()
        assert (alice.name, alice.key_id, alice.state) == ("alice", KEY_A, "active")
        (row,) = store.accepted_submissions()
        assert row.client_key_id == KEY_A and row.withdrawn_at is None
        store.rotate_client("alice", key_id=KEY_C, public_key_pem="PEM-C")
        assert store.revoke_client("alice").withdrawn == 1

    with sqlite3.connect(root / DB_NAME) as conn:
        conn.execute("PRAGMA foreign_keys = ON")
        (reference,) = conn.execute("PRAGMA foreign_key_list(submissions)").fetchall()
        assert (reference[2], reference[3], reference[4]) == ("clients", "client_key_id", "key_id")
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            conn.execute(
                "INSERT INTO submissions (client_key_id, sha256, size, manifest, signature,"
                " nonce, task_metadata, received_at, state) VALUES"
                " ('unknown', 'f01', 1, x'', x'', x'02', '{}', 'now', 'received')"
            )
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            conn.execute(  # two current rows for one name
                "INSERT INTO clients (name, key_id, public_key_pem, added_at)"
                " VALUES ('alice', ?, 'PEM', 'now')",
                (KEY_D,),
            )
    conn.close()
