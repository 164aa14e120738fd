"""Faults with real processes on the exchange: the server killed mid-upload, the disk full.

The server is `free-server start --no-flower`, a subprocess (`exchange_harness.
start_server_process`); the owners are real clients over TLS. After every fault,
each acknowledged submission is present and intact: its row is there and its blob's
sha256 and size are the row's.

The third fault of the issue, a SuperNode killed during a round, is
`test_flower_plane.py::test_a_killed_supernode_does_not_fail_the_round`, not
repeated here: the node's process group gets SIGKILL right before the round is
requested, while the SuperLink may still count it online (Flower expires a node
after about 60 s without heartbeat), and the round finishes with the other owner's
reply and without the dead node's. A meta round killed with SIGKILL is
`test_faults_rounds.py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from exchange_harness import (
    TASK,
    Owner,
    ServerProcess,
    enroll,
    error_lines,
    good_model,
    make_owner,
    new_home,
    run_cli,
    start_server_process,
    wait_until,
)
from onnx import helper
from onnx_builders import init, make

from free_client.stub import Connection, ExchangeClient
from free_client.uploader import RetryPolicy, upload
from free_common.errors import ServerBusy, StoreFull
from free_common.security.keys import load_public_key
from free_common.types import Receipt, Signed, SubmissionManifest
from free_server.home import ServerHome

pytestmark = pytest.mark.slow

SHORT_RETRY = RetryPolicy(attempts=2, base_delay_s=0.01)


def wide_model(size: int) -> bytes:
    """A valid teacher of about `size` bytes: Flatten, Gemm to a wide hidden layer, Relu, Gemm."""
    hidden = max(1, size // (4 * (64 + 3 + 1)))
    rng = np.random.default_rng(size)
    weights = [
        init("w1", (rng.standard_normal((hidden, 64)) * 0.05).astype(np.float32)),
        init("b1", np.zeros(hidden, np.float32)),
        init("w2", (rng.standard_normal((3, hidden)) * 0.05).astype(np.float32)),
        init("b2", np.zeros(3, np.float32)),
    ]
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("Gemm", ["f", "w1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=1),
    ]
    return bytes(make(nodes, weights, output_shape=["batch", 3]).SerializeToString())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _connect(server: ServerProcess | int, home: ServerHome, owner: Owner) -> ExchangeClient:
    port = server if isinstance(server, int) else server.port
    return ExchangeClient(Connection(f"localhost:{port}", ca=home.ca_cert), owner.key)


def _quiet_upload(
    server: ServerProcess,
    home: ServerHome,
    owner: Owner,
    data: bytes,
    *,
    retry: RetryPolicy | None = None,
    notices: list[str] | None = None,
) -> Signed[Receipt]:
    with _connect(server, home, owner) as connection:
        return upload(
            connection,
            owner.key,
            data,
            TASK,
            server_pub=load_public_key(home.signing_pub),
            retry=retry,
            notify=(lambda _line: None) if notices is None else notices.append,
        )


def assert_acknowledged_intact(home: ServerHome, receipts: Iterable[Signed[Receipt]]) -> None:
    """Every acknowledged submission has its row, its blob and its audit entry; the log holds.

    The audit entry is written in the row's own transaction, so a kill leaves both or
    neither: every submission row has exactly one ``submission.received`` entry.
    """
    with home.open_store() as store:
        check = store.verify_audit(load_public_key(home.signing_pub))
        assert check.ok, check.reason
        entries = store.audit_log().entries
        logged = [e.body["id"] for e in entries if e.kind == "submission.received"]
        rows = [r.id for r in store.summary(recent=100_000).submissions]
        assert sorted(logged) == sorted(rows)
        for signed in receipts:
            receipt = signed.record
            row = store.submission(int(receipt.submission_id))
            assert (row.client_key_id, row.sha256, row.size) == (
                receipt.client_id,
                receipt.payload_sha256,
                receipt.payload_size,
            )
            blob = store.blob_path(row.sha256).read_bytes()
            assert (hashlib.sha256(blob).hexdigest(), len(blob)) == (row.sha256, row.size)


def _rows(home: ServerHome) -> list[tuple[int, str, str]]:
    with home.open_store() as store:
        rows = store.summary(recent=1000).submissions
        return [(r.id, r.client_key_id, r.sha256) for r in rows]


def _blobs_and_temp(home: ServerHome) -> tuple[set[str], list[str]]:
    with home.open_store() as store:
        return store.blobs.all_hashes(), sorted(p.name for p in store.blobs.tmp_dir.iterdir())


@contextlib.contextmanager
def _running(home: ServerHome, *extra: str) -> Iterator[ServerProcess]:
    server = start_server_process(home, *extra)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.stop()


class PausingClient(ExchangeClient):
    """A real client whose first upload stops after `pause_after` chunks until released."""

    def __init__(self, *args: object, pause_after: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.halfway = threading.Event()
        self.release = threading.Event()
        self._pause_after = pause_after
        self._first = True

    def submit(
        self, signed: Signed[SubmissionManifest], chunks: Iterable[bytes], *, timeout_s: float
    ) -> Signed[Receipt]:
        if self._first:
            self._first = False
            chunks = self._pausing(chunks)
        return super().submit(signed, chunks, timeout_s=timeout_s)

    def _pausing(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for index, chunk in enumerate(chunks):
            if index == self._pause_after:
                self.halfway.set()
                self.release.wait(30)
            yield chunk


def test_server_killed_mid_upload_then_the_client_retries_after_restart(tmp_path: Path) -> None:
    home = new_home(tmp_path / "home")
    alice = enroll(home, make_owner(tmp_path, "alice"))
    bob = enroll(home, make_owner(tmp_path, "bob"))
    port = _free_port()
    data = wide_model(400_000)
    server = start_server_process(home, "--port", str(port))
    try:
        before = _quiet_upload(server, home, bob, good_model(seed=21))
        client = PausingClient(
            Connection(f"localhost:{port}", ca=home.ca_cert), alice.key, pause_after=4
        )
        with ThreadPoolExecutor(1) as pool:
            pending: Future[Signed[Receipt]] = pool.submit(
                upload,
                client,
                alice.key,
                data,
                TASK,
                server_pub=load_public_key(home.signing_pub),
                retry=RetryPolicy(attempts=12, base_delay_s=0.5, max_delay_s=2.0),
                chunk_bytes=32 * 1024,
                notify=lambda _line: None,
                rng=random.Random(0),
            )
            assert client.halfway.wait(30), "the upload never started"
            # The server is writing alice's bytes to a temporary file right now.
            assert wait_until(lambda: _blobs_and_temp(home)[1], 10)
            server.process.send_signal(signal.SIGKILL)
            assert server.process.wait(30) == -signal.SIGKILL
            server.stop(signal_it=False)

            # Dead server: no row and no blob of alice's, only the abandoned temporary file.
            assert _rows(home) == [(1, bob.key_id, before.record.payload_sha256)]
            blobs, temp = _blobs_and_temp(home)
            assert blobs == {before.record.payload_sha256} and len(temp) == 1
            assert_acknowledged_intact(home, [before])

            client.release.set()
            server = start_server_process(home, "--port", str(port))
            # Restart cleans what the kill left (`Store.recover`).
            assert wait_until(lambda: not _blobs_and_temp(home)[1], 10)
            receipt = pending.result(timeout=120)  # TlsError here until the stub is fixed
        client.close()
        rows = _rows(home)
        assert [r for r in rows if r[1] == alice.key_id] == [
            (2, alice.key_id, hashlib.sha256(data).hexdigest())
        ]
        assert_acknowledged_intact(home, [before, receipt])
        # Nothing acknowledged is lost: both models get their verdict after the restart.
        assert wait_until(lambda: _states(home) == {"accepted"}, 60), _states(home)
    finally:
        if server.process.poll() is None:
            server.stop()


def _states(home: ServerHome) -> set[str]:
    with home.open_store() as store:
        return {row.state for row in store.summary(recent=1000).submissions}


def test_server_killed_mid_upload_leaves_no_half_written_row_or_blob(tmp_path: Path) -> None:
    """The store's half of the fault above, which holds whatever the client does."""
    home = new_home(tmp_path / "home")
    alice = enroll(home, make_owner(tmp_path, "alice"))
    bob = enroll(home, make_owner(tmp_path, "bob"))
    port = _free_port()
    data = wide_model(400_000)
    server = start_server_process(home, "--port", str(port))
    try:
        before = _quiet_upload(server, home, bob, good_model(seed=22))
        client = PausingClient(
            Connection(f"localhost:{port}", ca=home.ca_cert), alice.key, pause_after=4
        )
        with ThreadPoolExecutor(1) as pool:
            attempt = pool.submit(
                upload,
                client,
                alice.key,
                data,
                TASK,
                retry=RetryPolicy(attempts=1),
                chunk_bytes=32 * 1024,
                notify=lambda _line: None,
            )
            assert client.halfway.wait(30)
            assert wait_until(lambda: _blobs_and_temp(home)[1], 10)
            server.process.send_signal(signal.SIGKILL)
            server.stop(signal_it=False)
            client.release.set()
            with pytest.raises(Exception) as failed:  # any failure, but no receipt
                attempt.result(timeout=60)
        client.close()
        assert not isinstance(failed.value, AssertionError)
        assert _rows(home) == [(1, bob.key_id, before.record.payload_sha256)]
        assert _blobs_and_temp(home)[0] == {before.record.payload_sha256}
        with _running(home, "--port", str(port)) as restarted:
            assert wait_until(lambda: not _blobs_and_temp(home)[1], 10)
            # The same upload, sent again, is stored once, whole.
            receipt = _quiet_upload(restarted, home, alice, data)
            assert_acknowledged_intact(home, [before, receipt])
            assert len(_rows(home)) == 2
    finally:
        if server.process.poll() is None:
            server.stop()


# --- the disk full -------------------------------------------------------------------------


@contextlib.contextmanager
def _small_disk(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where`; skips the test where mounting is not allowed."""
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full disk needs a small tmpfs: mount requires root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the full-disk test: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path, leave_bytes: int) -> Path:
    """Append to a filler file until about `leave_bytes` stay free (or the disk is full)."""
    info = os.statvfs(disk)
    remaining = info.f_bavail * info.f_frsize - leave_bytes
    filler = disk / "filler"
    zeros = bytes(1 << 16)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while remaining > 0:
            try:
                remaining -= os.write(fd, zeros[: min(remaining, len(zeros))])
            except OSError:
                break
    finally:
        os.close(fd)
    return filler


def test_disk_full_while_storing_is_a_clean_refusal(tmp_path: Path) -> None:
    with _small_disk(tmp_path / "disk", "4m") as disk:
        home = new_home(disk / "home")
        alice = enroll(home, make_owner(tmp_path / "keys", "alice"))
        with _running(home) as server:
            first = _quiet_upload(server, home, alice, good_model(seed=23))
            rows_before = _rows(home)
            big = wide_model(600_000)
            filler = _fill(disk, leave_bytes=200 * 1024)
            # First 200 KiB free for 600 KB, then not a byte free for 1 KB.
            for data, leave in ((big, None), (good_model(seed=24), 0)):
                if leave is not None:
                    _fill(disk, leave_bytes=leave)
                notices: list[str] = []
                with pytest.raises(ServerBusy) as refused:
                    _quiet_upload(server, home, alice, data, retry=SHORT_RETRY, notices=notices)
                # Retried like an outage, then one clear line; nothing leaks (no path,
                # no errno text) and nothing half-written stays.
                assert len(notices) == SHORT_RETRY.attempts - 1
                assert refused.value.status == "RESOURCE_EXHAUSTED"
                message = refused.value.message
                assert "store is out of disk space: try again later" in message
                assert "\n" not in message and str(disk) not in message
                assert _rows(home) == rows_before
                assert wait_until(lambda: not _blobs_and_temp(home)[1], 10)
                assert_acknowledged_intact(home, [first])
            assert server.process.poll() is None
            with _connect(server, home, alice) as connection:
                assert connection.status().server_key_id == server.first_line.split()[-1]
            _cli_submit_is_refused_in_one_line(server, home, alice, tmp_path)
            assert _rows(home) == rows_before
            filler.unlink()
            # Space again: the same upload is stored, without a restart.
            second = _quiet_upload(server, home, alice, big)
            assert_acknowledged_intact(home, [first, second])
            with home.open_store() as store:
                assert store.recover().orphan_blobs == []


def _cli_submit_is_refused_in_one_line(
    server: ServerProcess, home: ServerHome, owner: Owner, folder: Path
) -> None:
    """`free-client submit` on the full disk: one retry notice, then one line, exit 7."""
    model = folder / "cli-model.onnx"
    model.write_bytes(good_model(seed=25))
    done = run_cli(
        "free-client", "submit", str(model), "--server", server.address,
        "--key", str(owner.key_path), "--ca", str(home.ca_cert), "--retries", "2", "--no-wait",
    )  # fmt: skip
    assert done.returncode == ServerBusy.exit_code == 7, done.stderr
    assert "Traceback" not in done.stderr
    notice, line = error_lines(done.stderr)
    assert "retrying in" in notice and "(2/2)" in notice
    assert "store is out of disk space: try again later" in line and "RESOURCE_EXHAUSTED" in line


def test_disk_full_under_the_database_is_store_full_and_undone(tmp_path: Path) -> None:
    with _small_disk(tmp_path / "disk", "2m") as disk:
        home = new_home(disk / "home")
        with home.open_store() as store:
            store.add_client("alice", key_id="a" * 64, public_key_pem="alice's key")
            filler = _fill(disk, leave_bytes=0)
            # SQLite cannot append the commit to its write-ahead log.
            with pytest.raises(StoreFull) as full:
                store.add_client("bob", key_id="b" * 64, public_key_pem="bob's key")
            assert full.value.grpc_status == "RESOURCE_EXHAUSTED"
            assert str(disk) not in full.value.message
            filler.unlink()
            # Nothing of bob's stayed, and the same connection writes again.
            assert [c.name for c in store.list_clients()] == ["alice"]
            store.add_client("bob", key_id="b" * 64, public_key_pem="bob's key")
            assert [c.name for c in store.list_clients()] == ["alice", "bob"]
