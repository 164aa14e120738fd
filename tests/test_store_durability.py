"""Crash and concurrency behaviour of the store, with real processes and real kills.

- a process killed mid-upload leaves a temp file that cleanup removes, while a
  live upload's temp file is left alone;
- a process killed after placing a blob but before committing its row leaves an
  invisible blob that `recover` removes, and no nonce is consumed;
- the CLI adds a client while another connection holds the store open (and
  while it holds the write lock for a moment).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from free_client.keygen import generate_keys
from free_common.errors import StoreError
from free_server.store import Store

KEY = "a" * 32
BIN = Path(sys.executable).parent


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "store", create=True)
    opened.add_client("alice", key_id=KEY, public_key_pem="PEM")
    yield opened
    opened.close()


def _python(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_killed_writer_leaves_a_temp_file_that_cleanup_removes(store: Store) -> None:
    uploader = _python(
        f"""
        import time
        from pathlib import Path
        from free_server.blobs import BlobStore
        writer = BlobStore(Path({str(store.root)!r})).writer(1 << 20)
        writer.write(b"half an upload")
        print(writer.path, flush=True)
        time.sleep(60)
        """
    )
    try:
        assert uploader.stdout is not None
        temp = Path(uploader.stdout.readline().strip())
        assert temp.is_file() and temp.parent == store.blobs.tmp_dir
        # A live upload in another process is left alone ...
        assert store.blobs.remove_abandoned_temp_files() == []
        assert temp.is_file()
    finally:
        uploader.send_signal(signal.SIGKILL)
        uploader.wait(timeout=30)
    # ... and once its writer is dead (no cleanup of its own ran), it is removed.
    assert temp.is_file()
    report = store.recover()
    assert report.temp_files == 1 and not temp.exists()


def test_crash_between_blob_rename_and_commit_leaves_an_invisible_blob(store: Store) -> None:
    crasher = _python(
        f"""
        import os, signal
        from pathlib import Path
        from free_server import blobs
        from free_server.store import Store

        sync_folders = blobs.BlobStore.sync_folders
        def sync_then_die(self, folders):
            sync_folders(self, folders)
            os.kill(os.getpid(), signal.SIGKILL)  # after rename + fsync, before COMMIT
        blobs.BlobStore.sync_folders = sync_then_die

        store = Store(Path({str(store.root)!r}))
        with store.blob_writer(1000) as writer:
            writer.write(b"model bytes")
            store.record_submission(writer.finish(), client_key_id={KEY!r}, manifest=b"m",
                                    signature=b"s", nonce=b"n" * 16, task_metadata={{}})
        """
    )
    _, err = crasher.communicate(timeout=60)
    assert crasher.returncode == -signal.SIGKILL, err
    (orphan,) = store.blobs.all_hashes()
    assert store.pending_intake() == []  # no row names it: invisible
    report = store.recover()
    assert report.orphan_blobs == [orphan] and store.blobs.all_hashes() == set()
    # The nonce was never committed, so the owner's retry goes through.
    with store.blob_writer(1000) as writer:
        writer.write(b"model bytes")
        result = store.record_submission(
            writer.finish(),
            client_key_id=KEY,
            manifest=b"m",
            signature=b"s",
            nonce=b"n" * 16,
            task_metadata={},
        )
    assert not result.duplicate and store.blob_path(result.row.sha256).is_file()


def test_a_failed_blob_placement_commits_nothing(store: Store) -> None:
    payload = b"x"  # sha256 starts with 2d; break that shard by putting a file there
    shard = store.blobs.blobs_dir / "2d"
    shard.write_bytes(b"not a folder")
    with store.blob_writer(100) as writer:
        writer.write(payload)
        staged = writer.finish()
        assert staged.sha256.startswith("2d")
        with pytest.raises(OSError):
            store.record_submission(
                staged,
                client_key_id=KEY,
                manifest=b"m",
                signature=b"s",
                nonce=b"n" * 16,
                task_metadata={},
            )
    assert store.pending_intake() == []
    with sqlite3.connect(store.db_path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM nonces").fetchone()[0] == 0


def test_cli_adds_a_client_while_another_process_holds_the_store(tmp_path: Path) -> None:
    home = tmp_path / "home"
    keys = tmp_path / "keys"
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200"}
    subprocess.run(
        [str(BIN / "free-server"), "init", "--home", str(home)],
        check=True,
        capture_output=True,
        env=env,
        timeout=60,
    )
    generate_keys(keys)
    with Store(home / "store") as reader:
        assert reader.list_clients() == []
        # Hold the write lock for a moment: the CLI must wait for it, not fail.
        locker = sqlite3.connect(home / "store" / "store.db", isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        adder = subprocess.Popen(
            [
                str(BIN / "free-server"),
                "clients",
                "add",
                "alice",
                str(keys / "client.pub"),
                "--home",
                str(home),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        time.sleep(1.5)  # the CLI is up and waiting for the lock by now
        assert adder.poll() is None
        locker.execute("COMMIT")
        locker.close()
        _, err = adder.communicate(timeout=60)
        assert adder.returncode == 0, err
        (client,) = reader.list_clients()  # the open connection sees the new row
        assert client.name == "alice" and client.active


def test_a_write_lock_held_too_long_is_one_clear_store_error(store: Store) -> None:
    locker = sqlite3.connect(store.db_path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    try:
        # Opening and reading need no write lock (WAL readers never wait) ...
        with Store(store.root, busy_timeout_s=0.2) as impatient:
            assert [c.name for c in impatient.list_clients()] == ["alice"]
            # ... a write waits for the busy timeout, then fails in one line.
            with pytest.raises(StoreError, match="busy"):
                impatient.request_round()
    finally:
        locker.execute("ROLLBACK")
        locker.close()
