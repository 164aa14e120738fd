"""`free-server clients rotate` and `clients revoke [--keep-submissions]`, run as real commands.

Also what `free-server status` shows of replaced keys and withdrawn submissions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from free_client.keygen import generate_keys
from free_common.security.keys import key_id, load_public_key
from free_server.home import ServerHome, create_home

BIN = Path(sys.executable).parent


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(BIN / "free-server"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def _ok(*args: str | Path) -> str:
    result = _run(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _accepted_submission(home: ServerHome, owner_key_id: str, payload: bytes) -> int:
    with home.open_store() as store, store.blob_writer(1024) as writer:
        writer.write(payload)
        row = store.record_submission(
            writer.finish(),
            client_key_id=owner_key_id,
            manifest=b"m",
            signature=b"s",
            nonce=payload,
            task_metadata={"num_classes": 3},
        ).row
        store.set_verdict(row.id, accepted=True)
    return row.id


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[ServerHome, Path]:
    """A home with alice (key folders old and new), bob, carol (revoked) and erin enrolled."""
    root = tmp_path_factory.mktemp("clients")
    home = create_home(root / "home")
    for folder in ("alice-old", "alice-new", "bob", "carol", "erin", "spare"):
        generate_keys(root / folder)
    enrolled = (("alice", "alice-old"), ("bob", "bob"), ("carol", "carol"), ("erin", "erin"))
    for name, folder in enrolled:
        _ok(
            "clients", "add", name, root / folder / "client.pub",
            "--node-pub", root / folder / "node.pub", "--home", home.root,
        )  # fmt: skip
    _ok("clients", "revoke", "carol", "--home", home.root)
    return home, root


def test_rotate_then_revoke_withdraws_the_owners_models(world: tuple[ServerHome, Path]) -> None:
    home, root = world
    old_id = key_id(load_public_key(root / "alice-old" / "client.pub"))
    new_id = key_id(load_public_key(root / "alice-new" / "client.pub"))
    bob_id = key_id(load_public_key(root / "bob" / "client.pub"))
    submission = _accepted_submission(home, old_id, b"alice model")
    _accepted_submission(home, bob_id, b"bob model")

    rotated = _ok(
        "clients", "rotate", "alice", root / "alice-new" / "client.pub",
        "--node-pub", root / "alice-new" / "node.pub", "--home", home.root,
    )  # fmt: skip
    assert rotated.strip() == (
        f"rotated client alice to key id {new_id}; the previous key is refused from now on;"
        " node key replaced"
    )
    listed = json.loads(_ok("clients", "list", "--json", "--home", home.root))
    rows = [(c["key_id"], c["state"], c["node_public_key"]) for c in listed if c["name"] == "alice"]
    assert rows == [
        (old_id, "replaced", (root / "alice-old" / "node.pub").read_text().strip()),
        (new_id, "active", (root / "alice-new" / "node.pub").read_text().strip()),
    ]
    assert "replaced" in _ok("clients", "list", "--home", home.root)

    revoked = _ok("clients", "revoke", "alice", "--home", home.root)
    assert revoked.strip() == (
        f"revoked client alice (key id {new_id}); 1 submission(s) withdrawn from later rounds"
    )
    report = json.loads(_ok("status", "--json", "--home", home.root))
    subs = report["submissions"]
    assert (subs["accepted"], subs["withdrawn"]) == (1, 1)
    withdrawn = [s for s in subs["recent"] if s["withdrawn_at"] is not None]
    assert [(s["id"], s["client"], s["state"]) for s in withdrawn] == [
        (submission, "alice", "accepted")
    ]
    states = sorted(c["state"] for c in report["clients"])
    assert states == ["active", "active", "replaced", "revoked", "revoked"]
    table = _ok("status", "--home", home.root)
    assert "2 active, 2 revoked, 1 replaced keys" in table and "1 withdrawn" in table
    assert "accepted, withdrawn" in table

    erin_id = key_id(load_public_key(root / "erin" / "client.pub"))
    _accepted_submission(home, erin_id, b"erin model")
    kept = _ok("clients", "revoke", "erin", "--keep-submissions", "--home", home.root)
    assert kept.strip().endswith("its submissions stay in the pool (--keep-submissions)")
    with home.open_store() as store:
        pool = [row.client_key_id for row in store.accepted_submissions()]
    assert pool == [bob_id, erin_id]


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("nobody", "{root}/spare/client.pub"), 2, "no client named 'nobody'"),
        (("carol", "{root}/spare/client.pub"), 4, "a revoked owner gets no new key"),
        (("carol", "{root}/carol/client.pub"), 4, "a revoked owner gets no new key"),
        (("bob", "{root}/bob/client.pub"), 2, "already the current key of 'bob'"),
        (("bob", "{root}/carol/client.pub"), 2, "already registered (as 'carol')"),
        (("bob", "{root}/spare/node.pub"), 4, "not a PEM Ed25519 public key"),
        (("bob", "{root}/spare/client.pub", "--node-pub", "{root}/spare/client.pub"), 4, "OpenSSH"),
    ],
)
def test_rotate_bad_input_is_one_line_and_changes_nothing(
    world: tuple[ServerHome, Path], args: tuple[str, ...], code: int, words: str
) -> None:
    home, root = world
    with home.open_store() as store:
        before = store.list_clients()
    result = _run("clients", "rotate", *[a.format(root=root) for a in args], "--home", home.root)
    assert result.returncode == code
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert words in line
    with home.open_store() as store:
        assert store.list_clients() == before
