"""A simulated federation end to end: real intake, the server's round on Flower's simulation engine.

Six virtual owners with tiny teachers and data folders of their own; the drop
schedule (seed 30, rate 0.5) cuts one owner off while uploading and makes one
fail during the push, so both ways of dropping out are exercised.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from flower_harness import TEACHER_TASK, TINY_PRESET, owner_data
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from onnx_builders import tiny_model

from free_common.bench.simulate import OwnerFate, SimulatedRuns, draw_fates
from free_common.errors import ConfigError, FlowerError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from simulate import SimConfig, simulate  # benchmarks/ is no package: found by path

OWNERS, DROP_RATE, SEED = 6, 0.5, 30


def test_fates_are_seeded_and_follow_the_rate() -> None:
    assert draw_fates(50, 0.2, 1) == draw_fates(50, 0.2, 1)
    assert draw_fates(20, 0.0, 1) == [OwnerFate.LIVE] * 20
    dropped = sum(f is not OwnerFate.LIVE for f in draw_fates(4000, 0.1, 2))
    assert 300 < dropped < 500
    with pytest.raises(ConfigError):
        draw_fates(5, 1.0, 0)


def test_simulated_runs_refuse_settings_the_round_app_lacks() -> None:
    runs = SimulatedRuns(ServerApp(), ClientApp(), [])
    with pytest.raises(FlowerError, match="no run setting 'rounds'"):
        runs.start({"rounds": 3})
    with pytest.raises(FlowerError, match="no simulated run 1"):
        runs.state(1)


@pytest.mark.slow
def test_a_simulated_federation_runs_every_stage_and_survives_dropouts(tmp_path: Path) -> None:
    fates = draw_fates(OWNERS, DROP_RATE, SEED)
    live = fates.count(OwnerFate.LIVE)
    cut = fates.count(OwnerFate.DROPS_UPLOADING)
    at_push = fates.count(OwnerFate.DROPS_AT_PUSH)
    assert live >= 3 and cut >= 1 and at_push >= 1  # the schedule the test relies on

    teachers = []
    for seed in range(OWNERS):
        path = tmp_path / "zoo" / f"teacher-{seed}.onnx"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(tiny_model(seed, classes=5, task=TEACHER_TASK).SerializeToString())
        teachers.append(path)
    config = SimConfig(
        owners=OWNERS,
        work=tmp_path / "work",
        teachers=teachers,
        owner_data=lambda index, out: owner_data(out, classes=5, per_class=6, seed=index),
        preset=dict(TINY_PRESET),
        drop_rate=DROP_RATE,
        seed=SEED,
        reply_timeout_s=120.0,
    )
    before = dict(os.environ)
    result = simulate(config)
    # Flower's Ray backend rewrites PYTHONPATH; later child processes must not inherit it.
    assert dict(os.environ) == before

    intake = result["intake"]
    assert intake["errors"] == []
    assert intake["accepted"] == live + at_push
    assert intake["cut_off"] == cut
    # A cut-off upload leaves nothing in the store; every other model was judged.
    assert intake["store_counts"] == {
        "received": 0,
        "accepted": live + at_push,
        "refused": 0,
        "held": 0,
        "withdrawn": 0,
    }
    rounds = result["round"]
    assert rounds["state"] == "finished" and rounds["error"] is None
    assert rounds["release"] == 1
    assert rounds["push"] == {"ok": live, "errors": at_push, "missing": 0}
    owners = sorted((tmp_path / "work" / "owners").iterdir())
    stored = [o.name for o in owners if (o / "releases" / "1" / "manifest.json").exists()]
    assert stored == [o.name for o, f in zip(owners, fates, strict=True) if f is OwnerFate.LIVE]
    assert rounds["owners_with_release"] == live
    assert rounds["evaluations"] == live
    assert result["release_accuracy"]["owners"] == live
    assert 0.0 <= result["release_accuracy"]["mean"] <= 1.0
    assert set(result["stages_s"]) == {"setup", "intake", "round", "push", "evaluation"}
    assert all(seconds >= 0 for seconds in result["stages_s"].values())
    assert result["server_peak_rss_mb"] > 0
