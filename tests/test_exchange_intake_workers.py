"""Intake workers: nothing acknowledged is lost, a crashed worker is a refusal, the pool goes on."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from exchange_harness import (
    TASK,
    client,
    enroll,
    good_model,
    intake_worker_pids,
    make_owner,
    new_home,
    serving,
    wait_until,
)

from free_client.uploader import sign_manifest, upload, wait_for_verdict
from free_common.errors import VerdictTimeout
from free_common.models.intake import IntakeResult
from free_common.models.onnx_static import IntakeLimits
from free_common.security.call_auth import now_ms
from free_common.security.keys import load_private_key
from free_common.types import TaskMetadata, VerdictState
from free_server.exchange import ExchangeService
from free_server.grpc_server import ExchangeServer, Listen
from free_server.home import ServerHome
from free_server.intake_workers import MAX_ATTEMPTS, IntakePool
from free_server.runtime import intake_limits
from free_server.store import Store
from free_server.submission import SubmissionPolicy, receive_submission


def _policy(home: ServerHome) -> SubmissionPolicy:
    return SubmissionPolicy(
        max_upload_bytes=home.config.limits.max_upload_bytes,
        time_window_ms=300_000,
        intake_limits=intake_limits(home),
    )


def _receive(home: ServerHome, store: Store, owner_key: object, data: bytes) -> int:
    """Store a submission the way the servicer does, without a network in between."""
    signed = sign_manifest(owner_key, data, TASK)  # type: ignore[arg-type]
    upload = receive_submission(
        store,
        load_private_key(home.signing_key),
        signed,
        [data],
        _policy(home),
        caller=signed.record.client_id,
        now=now_ms(),
    )
    return upload.result.row.id


def test_received_submissions_are_judged_after_a_restart(tmp_path: Path) -> None:
    home = new_home(tmp_path / "home")
    alice = enroll(home, make_owner(tmp_path, "alice"))
    with home.open_store() as store:
        # Acknowledged while no intake ran (the server died right after the receipt).
        first = _receive(home, store, alice.key, good_model(seed=1))
        # A temp file of an upload whose process died, and an unreferenced blob.
        (store.blobs.tmp_dir / "1234-dead.part").write_bytes(b"half an upload")
        with store.blob_writer(1024) as writer:
            writer.write(b"a blob whose row was never committed")
            orphan = store.blobs.place(writer.finish())
    with serving(home) as runtime:
        assert runtime.intake is not None
        assert runtime.intake.wait_idle(30)
        with home.open_store() as store:
            assert store.submission(first).state == "accepted"
            assert list(store.blobs.tmp_dir.iterdir()) == []
        assert not orphan.exists()


def test_a_killed_worker_is_a_refusal_and_the_pool_goes_on(tmp_path: Path) -> None:
    home = new_home(tmp_path / "home")
    alice = enroll(home, make_owner(tmp_path, "alice"))
    with serving(home) as runtime, client(runtime, alice) as c:
        doomed = upload(c, alice.key, good_model(seed=2), TASK).record.submission_id
        found: list[int] = []
        assert wait_until(lambda: bool(found.extend(intake_worker_pids()) or found), 20)
        os.kill(found[0], signal.SIGKILL)
        verdict = wait_for_verdict(c, doomed, timeout_s=30, poll_s=0.1)
        assert verdict.state is VerdictState.REFUSED
        assert "killed" in verdict.reason
        # The same pool judges the next model.
        fine = upload(c, alice.key, good_model(seed=3), TASK).record.submission_id
        assert wait_for_verdict(c, fine, timeout_s=30, poll_s=0.1).state is VerdictState.ACCEPTED


def test_a_failing_pool_retries_then_refuses_with_a_reason(tmp_path: Path) -> None:
    home = new_home(tmp_path / "home")
    alice = enroll(home, make_owner(tmp_path, "alice"))
    calls: list[int] = []

    def broken(path: Path, task: TaskMetadata, limits: IntakeLimits) -> IntakeResult:
        calls.append(path.stat().st_size)
        raise OSError("cannot start the intake worker: too many processes")

    with home.open_store() as store:
        submission = _receive(home, store, alice.key, good_model(seed=4))
        pool = IntakePool(store, IntakeLimits(), workers=1, rescan_s=0.05, judge=broken)
        pool.start()
        try:
            assert wait_until(lambda: store.submission(submission).state != "received", 10)
        finally:
            pool.stop(2)
        row = store.submission(submission)
    assert len(calls) == MAX_ATTEMPTS
    assert row.state == "refused"
    assert row.reason is not None and "could not run intake" in row.reason


def test_waiting_for_a_verdict_times_out_while_intake_is_busy(tmp_path: Path) -> None:
    home = new_home(tmp_path / "home")
    alice = enroll(home, make_owner(tmp_path, "alice"))
    release = threading.Event()

    def slow(path: Path, task: TaskMetadata, limits: IntakeLimits) -> IntakeResult:
        release.wait(20)
        return IntakeResult(accepted=True)

    with home.open_store() as store:
        pool = IntakePool(store, IntakeLimits(), workers=1, judge=slow)
        service = ExchangeService(
            store,
            load_private_key(home.signing_key),
            _policy(home),
            chunk_bytes=1024,
            on_received=pool.enqueue,
        )
        exchange = ExchangeServer(service, home, Listen("127.0.0.1", 0), time_window_s=300)
        pool.start()
        exchange.start()
        try:
            from free_client.stub import Connection, ExchangeClient

            connection = Connection(f"localhost:{exchange.port}", ca=home.ca_cert)
            with ExchangeClient(connection, alice.key) as c:
                receipt = upload(c, alice.key, good_model(seed=5), TASK).record
                started = time.monotonic()
                with pytest.raises(VerdictTimeout, match="stored"):
                    wait_for_verdict(c, receipt.submission_id, timeout_s=0.5, poll_s=0.1)
                assert time.monotonic() - started < 5
                release.set()
                verdict = wait_for_verdict(c, receipt.submission_id, timeout_s=10, poll_s=0.05)
                assert verdict.state is VerdictState.ACCEPTED
        finally:
            release.set()
            exchange.stop(1)
            pool.stop(2)
