"""`free-client finetune`: verify a release, score it on the owner's tasks, export a model."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image
from safetensors.torch import save
from typer.testing import CliRunner

from free_client.adapted_model import fit_all_classes
from free_client.cli import app, main
from free_client.inspect import inspect_file
from free_client.local_tasks import load_class_folders
from free_common.engine import LearnerSpec, build_learner
from free_common.security.keys import key_id, public_key_pem
from free_common.security.release_dir import MANIFEST_NAME, WEIGHTS_NAME, save_release
from free_common.security.signing import sign
from free_common.types import ReleaseManifest

runner = CliRunner()
SPEC = {"arch": "conv4", "width": 8, "ways": 3, "channels": 1, "image_size": 16}


def _class_folders(root: Path, classes: int, per_class: int, seed: int = 0) -> Path:
    """Grey 16x16 PNGs: a fixed random pattern per class plus noise (easy to tell apart)."""
    rng = np.random.default_rng(seed)
    for index in range(classes):
        pattern = rng.uniform(0, 255, (16, 16))
        folder = root / f"class-{index}"
        folder.mkdir(parents=True)
        for item in range(per_class):
            noisy = np.clip(pattern + rng.normal(0, 25, pattern.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy, mode="L").save(folder / f"{item}.png")
    return root


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A release folder signed by a fresh server key, and that key's public file."""
    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(5)
    model = build_learner(LearnerSpec(**SPEC))
    data = save({k: v.contiguous() for k, v in model.state_dict().items()})
    key = Ed25519PrivateKey.generate()
    manifest = ReleaseManifest(
        version=3,
        architecture="conv4",
        config_json=json.dumps({"architecture": SPEC}),
        payload_sha256=hashlib.sha256(data).hexdigest(),
        payload_size=len(data),
        source_submission_ids=("1", "2"),
        metrics_json="{}",
        created_at_ms=int(time.time() * 1000),
        server_key_id=key_id(key.public_key()),
    )
    save_release(sign(key, manifest), [data], root / "release", key.public_key())
    (root / "server.pub").write_bytes(public_key_pem(key.public_key()))
    return root / "release", root / "server.pub"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _class_folders(tmp_path_factory.mktemp("owner") / "data", classes=3, per_class=8)


def _json(args: list[str]) -> dict[str, object]:
    result = runner.invoke(app, ["finetune", *args, "--json"])
    assert result.exit_code == 0, result.output
    report: dict[str, object] = json.loads(result.stdout)
    return report


def test_scores_the_release_on_seeded_local_tasks(release: tuple[Path, Path], data: Path) -> None:
    folder, server_pub = release
    args = [str(folder), "--data", str(data), "--server-pub", str(server_pub), "--shots", "1"]
    args += ["--episodes", "3", "--protocol", "paper", "--steps", "2"]
    first, again = _json(args), _json(args)
    assert first == again
    assert first["release"] == {
        "version": 3,
        "architecture": "conv4",
        "sha256": hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest(),
        "server_key_id": json.loads((folder / MANIFEST_NAME).read_text())["manifest"][
            "server_key_id"
        ],
        "signature_verified": True,
    }
    assert first["initialization"] == "release"
    assert first["data"] == {"path": str(data), "classes": 3, "images": 24}
    score = first["score"]
    assert isinstance(score, dict)
    assert (score["ways"], score["shots"], score["queries"], score["episodes"]) == (3, 1, 7, 3)
    assert 0.0 <= score["accuracy"] <= 1.0
    assert first["export"] is None


def test_random_init_is_scored_on_the_same_tasks_from_other_weights(
    release: tuple[Path, Path], data: Path
) -> None:
    folder, _ = release
    args = [str(folder), "--data", str(data), "--shots", "1", "--episodes", "4"]
    args += ["--protocol", "paper", "--steps", "1"]
    learned, random = _json(args), _json([*args, "--random-init"])
    assert random["initialization"] == "random"
    assert learned["release"]["signature_verified"] is False  # type: ignore[index]
    assert learned["score"] != random["score"]


def test_export_writes_a_model_intake_accepts_with_the_folders_as_classes(
    release: tuple[Path, Path], data: Path, tmp_path: Path
) -> None:
    folder, server_pub = release
    out = tmp_path / "adapted.onnx"
    report = _json(
        [
            *(str(folder), "--data", str(data), "--server-pub", str(server_pub)),
            *("--shots", "1", "--episodes", "1", "--protocol", "paper"),
            *("--steps", "20", "--lr", "0.1"),
            *("--export", str(out)),
        ]
    )
    exported = report["export"]
    assert isinstance(exported, dict)
    assert exported["classes"] == ["class-0", "class-1", "class-2"]
    assert exported["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert exported["fit_accuracy"] == 1.0
    verdict, details = inspect_file(out)
    assert verdict.accepted, verdict.reason
    assert details["task"]["class_names"] == exported["classes"]
    assert (details["task"]["mean"], details["task"]["std"]) == ([0.0], [1.0])


def test_fit_sets_batch_norm_statistics_for_one_image_at_a_time(data: Path) -> None:
    images = load_class_folders(data, 1, 16)
    torch.manual_seed(0)
    model = build_learner(LearnerSpec(**SPEC))
    fit = fit_all_classes(model, images, steps=20, lr=0.1)
    assert fit == 1.0
    assert not model.training
    single = torch.from_numpy(images.images[:1]).float().div(255).unsqueeze(1)
    with torch.no_grad():
        assert int(model(single).argmax()) == int(images.labels[0])


def _run(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[object, str, str]:
    """Run `free-client finetune ARGS` as its console script does (through run_app)."""
    monkeypatch.setattr(sys, "argv", ["free-client", "finetune", *args])
    with pytest.raises(SystemExit) as stopped:
        main()
    captured = capsys.readouterr()
    return stopped.value.code, captured.out, captured.err


@pytest.mark.parametrize(
    ("change", "extra", "message"),
    [
        ("weights", [], "differs from its signed manifest"),
        ("manifest", ["--server-pub", "SERVER_PUB"], "signature does not verify"),
        ("nothing", ["--ways", "5", "--protocol", "paper"], "learns 3-way tasks"),
        ("nothing", ["--steps", "5"], "--steps and --lr set the paper protocol"),
        ("nothing", ["--protocol", "best"], "--protocol 'best' is not one of"),
        ("nothing", ["--export", "out.onnx", "--data", "FOUR_CLASSES"], "exactly 3 classes"),
        ("nothing", ["--shots", "8"], "need 3 classes with at least 9 images"),
        ("missing", [], "holds no release"),
    ],
)
def test_bad_input_ends_in_one_line_and_a_nonzero_exit(
    release: tuple[Path, Path],
    data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    change: str,
    extra: list[str],
    message: str,
) -> None:
    folder, server_pub = release
    copy = tmp_path / "release"
    copy.mkdir()
    if change != "missing":
        for name in (WEIGHTS_NAME, MANIFEST_NAME):
            (copy / name).write_bytes((folder / name).read_bytes())
    if change == "weights":
        weights = bytearray((copy / WEIGHTS_NAME).read_bytes())
        weights[-3] ^= 0x10
        (copy / WEIGHTS_NAME).write_bytes(bytes(weights))
    elif change == "manifest":
        document = json.loads((copy / MANIFEST_NAME).read_text())
        document["manifest"]["version"] = 4
        (copy / MANIFEST_NAME).write_text(json.dumps(document))
    places = {
        "SERVER_PUB": str(server_pub),
        "FOUR_CLASSES": str(_class_folders(tmp_path / "four", classes=4, per_class=4)),
        "out.onnx": str(tmp_path / "out.onnx"),
    }
    args = [str(copy), "--data", str(data), "--episodes", "1"]
    code, out, err = _run(args + [places.get(e, e) for e in extra], monkeypatch, capsys)
    assert code != 0
    if change != "nothing":  # refused before a word about the release is printed
        assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0]
    assert not (tmp_path / "out.onnx").exists()


def test_random_init_is_drawn_at_the_scale_the_release_started_from() -> None:
    import dataclasses as dc

    from free_common.engine.release_model import load_learner, release_init_scale
    from free_common.meta.norms import scale_free_weights, weight_norms

    manifest = ReleaseManifest(
        version=1,
        architecture="conv4",
        config_json="{}",
        payload_sha256="0" * 64,
        payload_size=1,
        source_submission_ids=(),
        metrics_json="{}",
        created_at_ms=0,
        server_key_id="0" * 32,
    )
    assert release_init_scale(manifest) == 1.0
    scaled = dc.replace(manifest, metrics_json=json.dumps({"init_scale": 0.2}))
    assert release_init_scale(scaled) == 0.2
    assert (
        release_init_scale(dc.replace(manifest, metrics_json=json.dumps({"init_scale": "x"})))
        == 1.0
    )
    architecture = {"arch": "conv4", "ways": 5, "channels": 1, "image_size": 16}
    plain, _ = load_learner(None, architecture, seed=3)
    small, _ = load_learner(None, architecture, seed=3, init_scale=0.2)
    names = scale_free_weights(plain)
    expected = {n: 0.2 * v for n, v in weight_norms(plain, names).items()}
    assert weight_norms(small, names) == pytest.approx(expected, rel=1e-5)


def test_the_default_protocol_says_what_it_chose_and_why(
    release: tuple[Path, Path], data: Path
) -> None:
    folder, _ = release
    report = _json([str(folder), "--data", str(data), "--shots", "2", "--episodes", "2"])
    adaptation = report["adaptation"]
    assert isinstance(adaptation, dict)
    assert adaptation["protocol"] == "auto"
    assert adaptation["heldout"] == "2-fold"
    assert sum(adaptation["chosen"].values()) == 2
    scores = adaptation["selection_scores"]
    # Every strategy of the grid was scored, and what was chosen scored best on a task.
    assert {label.split()[0] for label in scores} == {
        "finetune",
        "proto-finetune",
        "linear-probe",
        "centroid",
    }
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    assert set(adaptation["chosen"]) <= set(scores)
    score = report["score"]
    assert isinstance(score, dict)
    assert (score["steps"], score["lr"]) == (None, None)  # chosen per task, not one setting


def test_the_paper_protocol_scores_what_the_paper_evaluation_scores(
    release: tuple[Path, Path], data: Path
) -> None:
    from free_common.data.episodes import EpisodeSampler
    from free_common.engine.release_model import load_learner
    from free_common.meta.config import EvalConfig
    from free_common.meta.evaluate import evaluate

    folder, _ = release
    report = _json(
        [str(folder), "--data", str(data), "--shots", "1", "--episodes", "3", "--protocol", "paper"]
    )
    score = report["score"]
    assert isinstance(score, dict)
    assert (score["steps"], score["lr"]) == (10, 0.01)
    assert report["adaptation"] == {
        "protocol": "paper",
        "heldout": "",
        "chosen": {"finetune 10 steps lr 0.01": 3},
        "selection_scores": {},
    }
    # The same seeded tasks through free-bench run's evaluation (10 steps at lr 0.01).
    model, _ = load_learner(folder / WEIGHTS_NAME, SPEC)
    images = load_class_folders(data, 1, 16)
    tasks = EpisodeSampler(images, 3, 1, 7, seed=0).episodes(3)
    reference = evaluate(model, tasks, EvalConfig(ways=3, shots=1, queries=7, episodes=3), "x")
    assert score["accuracy"] == pytest.approx(reference.mean, abs=1e-12)


def test_export_with_the_default_protocol_chooses_on_the_images_and_other_ways(
    release: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, _ = release
    four = _class_folders(tmp_path / "four", classes=4, per_class=4, seed=2)
    out = tmp_path / "adapted.onnx"
    args = [str(folder), "--data", str(four), "--ways", "4", "--shots", "1", "--episodes", "1"]
    report = _json([*args, "--export", str(out)])
    exported = report["export"]
    assert isinstance(exported, dict)
    assert exported["classes"] == ["class-0", "class-1", "class-2", "class-3"]
    assert exported["chosen"] in exported["selection_scores"]
    assert exported["fit_accuracy"] == 1.0
    verdict, details = inspect_file(out)
    assert verdict.accepted, verdict.reason
    assert details["task"]["num_classes"] == 4
