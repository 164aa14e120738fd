"""A declared DP guarantee, from `free-client export` to status and release; `free-client audit`."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from exchange_harness import (
    Owner,
    client,
    enroll,
    error_lines,
    make_owner,
    new_home,
    run_cli,
    serving,
)
from onnx_builders import TINY_TASK, tiny_model
from PIL import Image

from free_client.uploader import upload, wait_for_verdict
from free_common.engine import Initialization, preset
from free_common.models.backbones import build_backbone
from free_common.models.checkpoint import save_checkpoint
from free_common.models.metadata import DP_KEYS, read_dp
from free_common.security.canonical import record_from_canonical
from free_common.security.keys import load_private_key
from free_common.types import ChannelOrder, DpGuarantee, ReleaseManifest, TaskMetadata, VerdictState
from free_server.commands.status import summary_to_json
from free_server.release import dp_summary, publish_release
from free_server.rounds import MetaRoundOutput

TASK = TaskMetadata(3, (1, 16, 16), ChannelOrder.GRAY, (0.5,), (0.25,), ("a", "b", "c"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dp") / "teacher.safetensors"
    save_checkpoint(path, build_backbone("conv4gn", 3, 1, 16).eval(), arch="conv4gn",
                    width=32, task=TASK)  # fmt: skip
    return path


def test_export_writes_the_declared_dp_guarantee(checkpoint: Path) -> None:
    out = checkpoint.with_name("dp.onnx")
    done = run_cli("free-client", "export", str(checkpoint), "--out", str(out),
                   "--dp-epsilon", "8", "--dp-delta", "1e-5")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "intake check: accept" in done.stdout
    assert read_dp(onnx.load(str(out))) == DpGuarantee(8.0, 1e-5)


def test_export_wants_both_dp_flags_in_one_line(checkpoint: Path) -> None:
    out = checkpoint.with_name("half.onnx")
    done = run_cli("free-client", "export", str(checkpoint), "--out", str(out),
                   "--dp-epsilon", "8")  # fmt: skip
    assert done.returncode != 0
    assert len(error_lines(done.stderr)) == 1 and "--dp-delta" in done.stderr
    assert not out.exists()


def _dp_model(epsilon: float) -> bytes:
    model = tiny_model(seed=int(epsilon))
    model.metadata_props.add(key=DP_KEYS[0], value=repr(epsilon))
    model.metadata_props.add(key=DP_KEYS[1], value="1e-05")
    return bytes(model.SerializeToString())


def test_server_keeps_the_declared_guarantee_in_status_and_release(tmp_path: Path) -> None:
    home = new_home(tmp_path / "home")
    owner: Owner = enroll(home, make_owner(tmp_path, "alice"))
    with serving(home) as runtime, client(runtime, owner) as c:
        ids = []
        for model in (
            _dp_model(1.0),
            _dp_model(8.0),
            bytes(tiny_model(seed=3).SerializeToString()),
        ):
            receipt = upload(c, owner.key, model, TINY_TASK).record
            assert wait_for_verdict(c, receipt.submission_id, timeout_s=30).state is (
                VerdictState.ACCEPTED
            )
            ids.append(receipt.submission_id)
    with home.open_store() as store:
        report = summary_to_json(store.summary())
        declared = {s["id"]: s["dp"] for s in report["submissions"]["recent"]}
        assert [declared[int(i)] for i in ids] == [
            {"epsilon": 1.0, "delta": 1e-5},
            {"epsilon": 8.0, "delta": 1e-5},
            None,
        ]
        output = MetaRoundOutput(
            Initialization(b"weights", {"architecture": {"arch": "conv4"}, "metrics": {}}),
            preset("smoke"),
            "smoke",
            tuple(str(i) for i in ids),
            fresh=False,
        )
        round_row = store.request_round("smoke")
        store.start_round(round_row.id)
        key = load_private_key(home.signing_key)
        row, _ = publish_release(store, output, key, round_id=round_row.id)
    metrics = json.loads(record_from_canonical(row.manifest, ReleaseManifest).metrics_json)
    assert metrics["dp"] == {"teachers": 3, "teachers_with_dp": 2, "epsilon_min": 1.0,
                             "epsilon_max": 8.0, "delta_max": 1e-5}  # fmt: skip
    done = run_cli("free-server", "status", "--home", str(home.root))
    assert done.returncode == 0, done.stderr
    assert "1-8 (2/3)" in done.stdout


def test_release_dp_summary_without_dp_teachers() -> None:
    assert dp_summary([None, None]) == {"teachers": 2, "teachers_with_dp": 0,
                                        "epsilon_min": None, "epsilon_max": None,
                                        "delta_max": None}  # fmt: skip


def test_client_audit_bad_input_is_one_line(tmp_path: Path) -> None:
    missing = run_cli("free-client", "audit", str(tmp_path / "none.onnx"), "--data", str(tmp_path))
    assert missing.returncode != 0
    assert len(error_lines(missing.stderr)) == 1 and "cannot read" in missing.stderr
    model = tmp_path / "m.onnx"
    model.write_bytes(bytes(tiny_model().SerializeToString()))
    no_split = run_cli("free-client", "audit", str(model), "--data", str(tmp_path))
    assert no_split.returncode != 0
    lines = error_lines(no_split.stderr)
    assert len(lines) == 1 and "train/" in lines[0]


def test_client_audit_reports_on_an_owner_folder(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(bytes(tiny_model().SerializeToString()))
    for part, count in (("train", 4), ("heldout", 2)):
        for name in ("0", "1", "2"):
            folder = tmp_path / "data" / part / name
            folder.mkdir(parents=True)
            for k in range(count):
                Image.new("L", (8, 8), color=40 * k + int(name)).save(folder / f"{k}.png")
    done = run_cli("free-client", "audit", str(model), "--data", str(tmp_path / "data"),
                   "--steps", "2", "--images-per-class", "2", "--json",
                   "--out", str(tmp_path / "out"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["members"], report["nonmembers"]) == (12, 6)
    assert set(report["audit"]) == {"pixel", "ssim"}
    assert 0.0 <= report["attacks"]["model"]["auc"] <= 1.0
    assert (tmp_path / "out" / "nearest.png").is_file()
