"""The demo's story end to end, with real processes on free loopback ports.

`free_common.bench.demo.run_demo`, made small (three owners, two of them joined,
a four-step round), runs every public command as a subprocess: glyph set,
teacher zoo, server init, keygen, enrolment, `free-server start` with its Flower
SuperLink, `free-client join` SuperNodes, signed submissions, the meta round
and its push, fetch, finetune with export, inspect. The tests then check every
signature along the way from the files and the JSON the commands left, and
that the owner's finetune refuses a release that was changed on disk.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from free_common.bench.demo import DemoConfig, run_demo
from free_common.security.keys import key_id, load_public_key
from free_common.security.release_dir import MANIFEST_NAME, WEIGHTS_NAME, load_release

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TINY_ROUND = {
    "base": "smoke",
    "steps": 4,
    "warmup_steps": 1,
    "teachers_per_step": 2,
    "min_teachers": 2,
    "checkpoint_every": 2,
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoConfig, dict[str, Any]]:
    # The same folder the data tests build into: built once per session.
    data = tmp_path_factory.getbasetemp() / "glyphs-small"
    config = DemoConfig(
        out=tmp_path_factory.mktemp("demo"),
        data=data,
        owners=3,
        joined=2,
        zoo_epochs=3,
        preset=TINY_ROUND,
        owner_episodes=3,
        eval_classes=8,
        eval_episodes=3,
        eval_shots=(1,),
        round_timeout_s=240.0,
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the commands share a small machine
    return config, run_demo(config)


def _server_key_id(config: DemoConfig) -> str:
    return key_id(load_public_key(config.out / "home" / "server.pub"))


def test_every_model_was_received_with_a_verified_receipt_and_accepted(
    demo: tuple[DemoConfig, dict[str, Any]],
) -> None:
    config, summary = demo
    owners = summary["owners"]
    assert [o["name"] for o in owners] == ["owner-1", "owner-2", "owner-3"]
    for owner in owners:
        assert owner["receipt_verified"] is True
        assert owner["receipt_server_key_id"] == _server_key_id(config)
        assert owner["verdict"] == "accepted"
    ids = {str(o["submission_id"]) for o in owners}
    assert set(summary["release"]["source_submission_ids"]) == ids


def test_the_round_published_one_release_that_fetch_verified(
    demo: tuple[DemoConfig, dict[str, Any]],
) -> None:
    config, summary = demo
    assert summary["round"]["state"] == "finished"
    assert summary["round"]["preset"] == "demo"
    fetched = summary["fetch"]["manifest"]
    assert fetched["server_key_id"] == _server_key_id(config)
    folder = config.out / "owners" / summary["fetch"]["owner"] / "release"
    release, weights = load_release(folder, load_public_key(config.out / "home" / "server.pub"))
    assert release.version == summary["release"]["version"] == fetched["version"]
    assert release.payload_sha256 == summary["release"]["sha256"] == fetched["payload_sha256"]
    assert weights == folder / WEIGHTS_NAME
    assert json.loads(release.config_json)["architecture"]["image_size"] == 32


def test_joined_owners_stored_the_pushed_release_verified_and_scored_it(
    demo: tuple[DemoConfig, dict[str, Any]],
) -> None:
    config, summary = demo
    server_pub = load_public_key(config.out / "home" / "server.pub")
    version = summary["release"]["version"]
    for name in ("owner-1", "owner-2"):
        folder = config.out / "owners" / name / "releases" / str(version)
        release, _ = load_release(folder, server_pub)  # signature and sha256 again
        assert release.payload_sha256 == summary["release"]["sha256"]
        assert release.server_key_id == _server_key_id(config)
    assert not (config.out / "owners" / "owner-3" / "releases").exists()
    replies = {
        e["node_id"]: e["metrics"]
        for e in summary["status"]["evaluations"]
        if e["round_id"] == summary["round"]["id"]
    }
    assert set(replies) == {"owner-1", "owner-2"}
    for metrics in replies.values():
        assert metrics["stored"] == 1.0
        assert metrics["version"] == version
        assert 0.0 <= metrics["accuracy"] <= 1.0
        assert metrics["episodes"] == 3


def test_the_fetching_owner_finetuned_and_exported_a_model_intake_accepts(
    demo: tuple[DemoConfig, dict[str, Any]],
) -> None:
    _, summary = demo
    tuned = summary["finetune"]
    assert tuned["release"]["signature_verified"] is True
    assert tuned["initialization"] == "release"
    assert tuned["score"]["episodes"] == 3
    exported = tuned["export"]
    assert Path(exported["path"]).is_file()
    assert len(exported["classes"]) == 5
    inspected = summary["inspect"]
    assert inspected["verdict"] == "accept"
    assert inspected["task"]["class_names"] == exported["classes"]


def test_the_summary_compares_the_release_with_random_initialization(
    demo: tuple[DemoConfig, dict[str, Any]],
) -> None:
    config, summary = demo
    [task] = summary["meta_test"]["tasks"]
    assert (task["ways"], task["shots"], task["episodes"]) == (5, 1, 3)
    for model in ("release", "random_init"):
        assert 0.0 <= task[model]["accuracy"] <= 1.0
    on_disk = json.loads((config.out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["seconds"] == summary["phases"]["total"]


def test_every_process_was_stopped(demo: tuple[DemoConfig, dict[str, Any]]) -> None:
    config, summary = demo
    # A running free-server holds an exclusive lock on its home.
    fd = os.open(config.out / "home" / "server.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    for port in summary["ports"].values():
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), 2).close()


def _finetune(
    config: DemoConfig, release: Path, *, pinned: bool
) -> subprocess.CompletedProcess[str]:
    command = [
        str(BIN / "free-client"),
        "finetune",
        str(release),
        "--data",
        str(config.out / "owners" / "owner-3" / "data"),
        "--episodes",
        "1",
    ]
    if pinned:
        command += ["--server-pub", str(config.out / "home" / "server.pub")]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)


@pytest.mark.parametrize("pinned", [True, False])
def test_finetune_refuses_changed_weights_in_one_line(
    demo: tuple[DemoConfig, dict[str, Any]], tmp_path: Path, pinned: bool
) -> None:
    config, _ = demo
    copy = tmp_path / "release"
    shutil.copytree(config.out / "owners" / "owner-3" / "release", copy)
    weights = bytearray((copy / WEIGHTS_NAME).read_bytes())
    weights[-5] ^= 0x01
    (copy / WEIGHTS_NAME).write_bytes(bytes(weights))
    result = _finetune(config, copy, pinned=pinned)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "differs from its signed manifest" in lines[0]
    assert result.stdout == ""


def test_finetune_refuses_a_changed_manifest_in_one_line(
    demo: tuple[DemoConfig, dict[str, Any]], tmp_path: Path
) -> None:
    config, _ = demo
    copy = tmp_path / "release"
    shutil.copytree(config.out / "owners" / "owner-3" / "release", copy)
    document = json.loads((copy / MANIFEST_NAME).read_text())
    document["manifest"]["source_submission_ids"] = ["1"]
    (copy / MANIFEST_NAME).write_text(json.dumps(document))
    result = _finetune(config, copy, pinned=True)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "signature does not verify" in lines[0]
