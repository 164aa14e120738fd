"""The append-only audit log: one signed, chained entry per event, and `audit verify` catching
a changed field, a removed entry, two entries swapped and a forged signature."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from flower_harness import add_accepted_teachers, add_owner, flower_home
from typer.testing import CliRunner

from free_common.errors import AuditLogBroken
from free_common.security.keys import generate_signing_key, load_public_key
from free_server.audit import entry_hash
from free_server.cli import app
from free_server.home import ServerHome
from free_server.store import DB_NAME

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path) -> ServerHome:
    """A home where an owner enrolled, submitted two models that were accepted, and a round ran."""
    home = flower_home(tmp_path / "home")
    owner = add_owner(home, tmp_path, "alice")
    add_accepted_teachers(home, owner, [1, 2])
    with home.open_store() as store:
        requested = store.request_round("tiny")
        store.start_round(requested.id)
        store.finish_round(requested.id, error="stopped by the test")
        store.revoke_client("alice")
    return home


def _kinds(home: ServerHome) -> list[str]:
    with home.open_store() as store:
        return [e.kind for e in store.audit_log().entries]


def _verify(home: ServerHome) -> tuple[bool, int | None, str]:
    with home.open_store() as store:
        check = store.verify_audit(load_public_key(home.signing_pub))
    return check.ok, check.bad_seq, check.reason


def _raw(home: ServerHome) -> sqlite3.Connection:
    """The store file opened directly, its append-only triggers dropped: an attacker's view."""
    conn = sqlite3.connect(home.store_dir / DB_NAME, isolation_level=None)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("DROP TRIGGER audit_no_delete")
    return conn


def test_every_event_appends_one_signed_entry_in_order(home: ServerHome) -> None:
    assert _kinds(home) == [
        "client.enrolled",
        "submission.received",
        "submission.verdict",
        "submission.received",
        "submission.verdict",
        "round.requested",
        "round.started",
        "round.failed",
        "client.revoked",
    ]
    assert _verify(home) == (True, None, "")
    with home.open_store() as store:
        verdict = store.audit_log().entries[2]
    assert verdict.body == {"id": 1, "verdict": "accepted", "reason": None, "screening": None}


def test_the_store_refuses_to_rewrite_the_log(home: ServerHome) -> None:
    conn = sqlite3.connect(home.store_dir / DB_NAME)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE audit SET kind = 'x' WHERE seq = 1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit WHERE seq = 1")


def test_a_changed_field_is_found(home: ServerHome) -> None:
    body = json.dumps({"id": 1, "reason": None, "verdict": "refused"}, separators=(",", ":"))
    _raw(home).execute("UPDATE audit SET body = ? WHERE seq = 3", (body,))
    assert _verify(home)[:2] == (False, 3)
    assert "changed" in _verify(home)[2]


def test_a_removed_entry_is_found(home: ServerHome) -> None:
    _raw(home).execute("DELETE FROM audit WHERE seq = 4")
    ok, seq, reason = _verify(home)
    assert (ok, seq) == (False, 5) and "entry 4 is missing" in reason


def test_two_swapped_entries_are_found(home: ServerHome) -> None:
    conn = _raw(home)
    conn.execute("UPDATE audit SET seq = -4 WHERE seq = 4")
    conn.execute("UPDATE audit SET seq = 4 WHERE seq = 5")
    conn.execute("UPDATE audit SET seq = 5 WHERE seq = -4")
    ok, seq, reason = _verify(home)
    assert (ok, seq) == (False, 4) and "link" in reason


def test_a_forged_signature_is_found(home: ServerHome) -> None:
    # The forger rewrites an entry consistently (hash recomputed) and signs it with its own key;
    # the next entry's link then breaks too, but the forged one is caught first.
    conn = _raw(home)
    seq, at, kind, prev = conn.execute(
        "SELECT seq, at, kind, prev FROM audit WHERE seq = 2"
    ).fetchone()
    body = json.dumps({"client_key_id": "evil", "id": 1, "sha256": "0" * 64, "size": 1},
                      separators=(",", ":"), sort_keys=True)  # fmt: skip
    digest = entry_hash(seq, at, kind, body, prev)
    signature = generate_signing_key().sign(bytes.fromhex(digest))
    conn.execute("UPDATE audit SET body = ?, hash = ?, signature = ? WHERE seq = 2",
                 (body, digest, signature))  # fmt: skip
    ok, bad, reason = _verify(home)
    assert (ok, bad) == (False, 2) and "signature is not the server's" in reason


def test_audit_commands_show_and_verify(home: ServerHome) -> None:
    shown = runner.invoke(app, ["audit", "show", "--home", str(home.root), "--json"])
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.output)
    assert report["count"] == 9 and report["head"] == report["entries"][-1]["hash"]
    since = runner.invoke(app, ["audit", "show", "--home", str(home.root), "--since", "7"])
    assert since.exit_code == 0 and "round.failed" in since.output
    assert "client.enrolled" not in since.output
    good = runner.invoke(app, ["audit", "verify", "--home", str(home.root)])
    assert good.exit_code == 0 and "9 entries" in good.output
    _raw(home).execute("DELETE FROM audit WHERE seq = 2")
    bad = runner.invoke(app, ["audit", "verify", "--home", str(home.root)])
    assert isinstance(bad.exception, AuditLogBroken)
    assert "entry 3 fails: entry 2 is missing" in str(bad.exception)
