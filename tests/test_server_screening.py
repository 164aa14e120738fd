"""Screening inside the server's intake, and the operator's hold, release and refuse."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import engine_tiny as tiny
import numpy as np
from exchange_harness import enroll, error_lines, good_model, make_owner, new_home, run_cli
from onnx import numpy_helper
from onnx_builders import TINY_TASK, copy, tiny_model

from free_client.uploader import sign_manifest
from free_common.engine import run_round
from free_common.models.onnx_static import IntakeLimits
from free_common.screening import ScreeningConfig
from free_common.security.call_auth import now_ms
from free_common.security.keys import load_private_key
from free_server.home import ServerHome
from free_server.intake_workers import IntakePool
from free_server.rounds import ENGINE_DIR, engine_config
from free_server.runtime import intake_limits
from free_server.screener import Screener
from free_server.store import Store
from free_server.submission import SubmissionPolicy, receive_submission


def _constant_model() -> bytes:
    """The tiny model with its head answering class 0 whatever it is shown."""
    model = copy(tiny_model(seed=3))
    for tensor in model.graph.initializer:
        value = numpy_helper.to_array(tensor)
        if tensor.name == "fc.w":
            value = np.zeros_like(value)
        elif tensor.name == "fc.b":
            value = np.array([8.0, 0.0, 0.0], dtype=np.float32)
        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    return bytes(model.SerializeToString())


def _receive(home: ServerHome, store: Store, owner_key: object, data: bytes) -> int:
    signed = sign_manifest(owner_key, data, TINY_TASK)  # type: ignore[arg-type]
    policy = SubmissionPolicy(
        max_upload_bytes=home.config.limits.max_upload_bytes,
        time_window_ms=300_000,
        intake_limits=intake_limits(home),
    )
    upload = receive_submission(
        store,
        load_private_key(home.signing_key),
        signed,
        [data],
        policy,
        caller=signed.record.client_id,
        now=now_ms(),
    )
    return upload.result.row.id


def _judge_all(home: ServerHome, config: ScreeningConfig, models: list[bytes]) -> list[int]:
    """Receive `models` from one owner and run the server's intake with screening on them."""
    owner = enroll(home, make_owner(home.root.parent, "alice"))
    limits = intake_limits(home)
    screener = Screener(engine_config("smoke", home), home.root / ENGINE_DIR, config, limits)
    with home.open_store() as store:
        ids = [_receive(home, store, owner.key, data) for data in models]
        pool = IntakePool(store, limits, 1, screen=screener)
        pool.start()
        try:
            assert pool.wait_idle(120)
        finally:
            pool.stop(5)
    return ids


def test_a_model_that_answers_one_class_is_refused_by_screening(tmp_path: Path) -> None:
    home = new_home(tmp_path / "home")
    (constant,) = _judge_all(home, ScreeningConfig(images_per_class=4), [_constant_model()])
    with home.open_store() as store:
        row = store.submission(constant)
        entries = store.audit_log().entries
    assert row.state == "refused" and row.held_at is None
    assert row.reason is not None and row.reason.startswith("screening: recovery_agreement 0.333")
    assert row.screening is not None and row.screening["verdict"] == "refused"
    verdict = next(e for e in entries if e.kind == "submission.verdict")
    assert verdict.body["screening"]["figures"] == row.screening["figures"]


def test_held_models_wait_for_the_operators_decision(tmp_path: Path) -> None:
    home = new_home(tmp_path / "home")
    # Every model is held: no recovery is too poor and every trigger gap is too large.
    holds_all = dataclasses.replace(
        ScreeningConfig(images_per_class=4), min_recovery_agreement=0.0, max_trigger_gap=-1.0
    )
    first, second = _judge_all(home, holds_all, [good_model(1), good_model(2)])
    with home.open_store() as store:
        held = store.submission(first)
        assert held.status == "held" and held.state == "received"
        assert held.hold_reason is not None and "trigger_gap" in held.hold_reason
        assert store.pending_intake() == [] and store.accepted_submissions() == []
        assert store.summary().submission_counts["held"] == 2
    where = ["--home", str(home.root)]
    released = run_cli("free-server", "submissions", "release", *where, str(first))
    assert released.returncode == 0, released.stderr
    assert f"submission {first} released; it is now accepted" in released.stdout
    refused = run_cli("free-server", "submissions", "refuse", *where, str(second), "--reason", "x")
    assert refused.returncode == 0, refused.stderr
    again = run_cli("free-server", "submissions", "release", *where, str(second))
    assert again.returncode == 2
    assert error_lines(again.stderr) == [f"error: submission {second} is refused, not held"]
    hold = run_cli("free-server", "submissions", "hold", *where, str(first))
    assert hold.returncode == 0, hold.stderr
    with home.open_store() as store:
        assert store.submission(second).reason == "x"
        assert store.submission(first).status == "held"
        assert store.accepted_submissions() == []
        kinds = [e.kind for e in store.audit_log().entries]
    assert kinds.count("submission.held") == 3 and kinds.count("submission.released") == 1


def test_screening_reads_the_state_the_last_finished_round_carried(tmp_path: Path) -> None:
    config = tiny.config()
    engine_dir = tmp_path / "engine"
    limits = IntakeLimits()
    screener = Screener(config, engine_dir, ScreeningConfig(images_per_class=4), limits)
    model = tmp_path / "teacher.onnx"
    task = dataclasses.replace(TINY_TASK, num_classes=5)
    model.write_bytes(tiny_model(seed=4, classes=5, task=task).SerializeToString())
    before = screener(model, task, "before")
    assert before.figures["structure"] is None  # no round yet: no memory to read
    run_round(tiny.teachers(2), config, engine_dir, device="cpu")
    after = screener(model, task, "after")
    assert after.figures["structure"] is not None
