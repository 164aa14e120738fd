"""`free-bench adapt`: every adaptation protocol on the same tasks, release and random init."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors.torch import save

from free_common.bench.adapt import TaskShape, parse_shapes
from free_common.engine import LearnerSpec, build_learner
from free_common.errors import ConfigError
from free_common.meta.adaptation import PROTOCOLS
from free_common.security.keys import key_id
from free_common.security.release_dir import save_release
from free_common.security.signing import sign
from free_common.types import ReleaseManifest

FREE_BENCH = Path(sys.executable).parent / "free-bench"
SPEC = {"arch": "conv4", "width": 8, "ways": 5, "channels": 1, "image_size": 32}


def test_shapes_are_ways_x_shots_and_bad_ones_are_refused() -> None:
    assert parse_shapes("5x1, 20x1") == (TaskShape(5, 1), TaskShape(20, 1))
    for bad in ("5", "1x1", "5x0", "ax1", ""):
        with pytest.raises(ConfigError, match="--shapes"):
            parse_shapes(bad)


def _release(folder: Path) -> Path:
    torch.manual_seed(3)
    data = save(
        {k: v.contiguous() for k, v in build_learner(LearnerSpec(**SPEC)).state_dict().items()}
    )
    key = Ed25519PrivateKey.generate()
    manifest = ReleaseManifest(
        version=1,
        architecture="conv4",
        config_json=json.dumps({"architecture": SPEC}),
        payload_sha256=hashlib.sha256(data).hexdigest(),
        payload_size=len(data),
        source_submission_ids=("1",),
        metrics_json=json.dumps({"init_scale": 0.5}),
        created_at_ms=int(time.time() * 1000),
        server_key_id=key_id(key.public_key()),
    )
    save_release(sign(key, manifest), [data], folder, key.public_key())
    return folder


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(FREE_BENCH), *map(str, args)], env=env, capture_output=True, text=True, check=False
    )


def test_a_bad_split_ends_in_one_line(tmp_path: Path) -> None:
    release = _release(tmp_path / "release")
    done = _cli("adapt", "--release", release, "--data", tmp_path, "--out", tmp_path / "o",
                "--split", "meta-train")  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: --split 'meta-train': use meta-val (to choose) or meta-test"
    ]


@pytest.mark.slow
def test_every_protocol_is_scored_on_the_same_tasks_for_both_starts(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    base = tmp_path_factory.getbasetemp()
    data, out = base / "glyphs-small", base / "adapt"
    built = _cli("data", "build", "--size", "small", "--out", data)  # reused when built
    assert built.returncode == 0, built.stderr[-2000:]
    release = _release(base / "adapt-release")
    done = _cli("adapt", "--release", release, "--data", data, "--out", out,
                "--split", "meta-val", "--shapes", "3x1,3x2", "--episodes", "2")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["command"].startswith("free-bench adapt --release")
    assert results["release"]["init_scale"] == 0.5
    assert results["environment"]["threads"] == 1
    cells = [(r["domain"], r["ways"], r["shots"]) for r in results["results"]]
    assert cells == [
        ("glyphs meta-val", 3, 1),
        ("glyphs meta-val", 3, 2),
        ("fashion-mnist train", 3, 1),
        ("fashion-mnist train", 3, 2),
    ]
    for row in results["results"]:
        for init in ("release", "random"):
            assert list(row["accuracy"][init]) == list(PROTOCOLS)
            assert sum(row["accuracy"][init]["auto"]["chosen"].values()) == 2
        assert set(row["release_minus_random"]) == {"auto", "paper"}
    markdown = (out / "results.md").read_text()
    assert "## glyphs meta-val, 3-way 1-shot" in markdown
    assert "auto − paper" in markdown
