"""`free-server status`: everything the store holds, as tables or JSON, read while serving."""

from __future__ import annotations

import json
from pathlib import Path

from exchange_harness import (
    enroll,
    error_lines,
    make_owner,
    new_home,
    publish_release,
    release_weights,
    run_cli,
)

from free_server.commands.status import summary_to_json
from free_server.home import ServerHome


def _populated(tmp_path: Path) -> ServerHome:
    home = new_home(tmp_path / "home")
    enroll(home, make_owner(tmp_path, "alice"))
    bob = enroll(home, make_owner(tmp_path, "bob"))
    with home.open_store() as store:
        for payload, accepted in ((b"model one", True), (b"model two", False)):
            with store.blob_writer(1024) as writer:
                writer.write(payload)
                staged = writer.finish()
                row = store.record_submission(
                    staged,
                    client_key_id=bob.key_id,
                    manifest=b"m",
                    signature=b"s",
                    nonce=payload,
                    task_metadata={"num_classes": 3},
                ).row
            store.set_verdict(row.id, accepted=accepted, reason=None if accepted else "too big")
        store.revoke_client("alice")
        round_row = store.request_round("small")
        store.start_round(round_row.id)
        store.finish_round(round_row.id)
        store.record_evaluation(round_row.id, "node-1", {"accuracy": 0.75})
    publish_release(home, release_weights())
    return home


def test_status_json_lists_clients_verdicts_rounds_releases_and_evaluations(
    tmp_path: Path,
) -> None:
    home = _populated(tmp_path)
    done = run_cli("free-server", "status", "--home", str(home.root), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [(c["name"], c["active"]) for c in report["clients"]] == [
        ("alice", False),
        ("bob", True),
    ]
    subs = report["submissions"]
    assert (subs["received"], subs["accepted"], subs["refused"]) == (0, 1, 1)
    assert [(s["client"], s["state"], s["reason"]) for s in subs["recent"]] == [
        ("bob", "accepted", None),
        ("bob", "refused", "too big"),
    ]
    assert [r["state"] for r in report["rounds"]] == ["finished"]
    assert report["releases"][0]["architecture"] == "conv4"
    assert report["releases"][0]["metrics"] == {"accuracy": 0.5}
    assert report["evaluations"][0]["metrics"] == {"accuracy": 0.75}
    with home.open_store() as store:
        assert summary_to_json(store.summary()) == report


def test_status_tables_and_a_missing_home(tmp_path: Path) -> None:
    home = _populated(tmp_path)
    shown = run_cli("free-server", "status", "--home", str(home.root))
    assert shown.returncode == 0, shown.stderr
    for text in ("1 active, 1 revoked", "1 accepted, 1 refused", "too big", "node-1", "conv4"):
        assert text in shown.stdout
    missing = run_cli("free-server", "status", "--home", str(tmp_path / "nowhere"))
    assert missing.returncode == 2
    assert len(error_lines(missing.stderr)) == 1
    assert "free-server init" in missing.stderr
