"""Teacher zoo: seeded class draws, best held-out checkpoint, export that intake accepts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from image_sets import easy_image_set
from typer.testing import CliRunner

from free_common.bench.zoo import TeacherRecord, ZooConfig, read_mix_spec, teacher_plan, train_zoo
from free_common.data.glyphs_store import MANIFEST, split_file, write_json, write_split_arrays
from free_common.data.imageset import ImageSet
from free_common.errors import ConfigError, SplitError
from free_common.models.backbones import build_backbone
from free_common.models.checkpoint import read_checkpoint
from free_common.models.intake import load_teacher
from free_common.models.metadata import task_from_dict
from free_common.models.onnx_static import check_static


def _easy_set(classes: int = 8, per_class: int = 12, side: int = 16) -> ImageSet:
    return easy_image_set(classes, per_class, side)


@pytest.fixture(scope="module")
def mixed_zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[TeacherRecord]]:
    out = tmp_path_factory.mktemp("zoo")
    return out, train_zoo(_easy_set(), out, ZooConfig(models=3, arch="mix", epochs=4, seed=7))


def test_zoo_writes_onnx_and_json_side_by_side(
    mixed_zoo: tuple[Path, list[TeacherRecord]],
) -> None:
    out, records = mixed_zoo
    tops = sorted(p.name for p in out.iterdir() if p.is_file())
    names = [r.name for r in records]
    assert tops == sorted([f"{n}.json" for n in names] + [f"{n}.onnx" for n in names])
    for record in records:
        stored = json.loads((out / f"{record.name}.json").read_text())
        assert stored["classes"] == list(record.classes)
        assert 0.0 <= stored["heldout_accuracy"] <= 1.0
        task = task_from_dict(stored["task"])
        report = check_static((out / f"{record.name}.onnx").read_bytes())
        assert report.task == task
        assert task.class_names == tuple(f"U+{0x41 + c:04X}" for c in record.classes)


def test_mix_mixes_architectures_and_input_sizes(
    mixed_zoo: tuple[Path, list[TeacherRecord]],
) -> None:
    _, records = mixed_zoo
    assert [r.arch for r in records] == ["conv4", "resnet10", "mlp"]
    sides = [r.task["input_shape"][1] for r in records]
    assert sides == [16, 20, 16]  # the data's 16, x1.25, x0.75 floored at 16
    assert teacher_plan(ZooConfig(models=1, arch="mix"), 2, 28) == ("mlp", 21)


def test_class_draws_are_seeded_and_overlap(
    mixed_zoo: tuple[Path, list[TeacherRecord]], tmp_path: Path
) -> None:
    _, records = mixed_zoo
    draws = [set(r.classes) for r in records]
    assert all(len(d) == 5 for d in draws)
    # 5 of 8 classes each: label spaces of teachers must overlap.
    assert draws[0] & draws[1]
    again = train_zoo(_easy_set(), tmp_path, ZooConfig(models=3, arch="mix", epochs=1, seed=7))
    assert [r.classes for r in again] == [r.classes for r in records]


def test_teacher_learns_and_its_checkpoint_is_the_exported_model(
    mixed_zoo: tuple[Path, list[TeacherRecord]],
) -> None:
    out, records = mixed_zoo
    conv4 = records[0]
    assert conv4.heldout_accuracy > 0.6  # chance is 0.2
    checkpoint = read_checkpoint(out / "checkpoints" / f"{conv4.name}.safetensors")
    assert checkpoint.arch == "conv4" and checkpoint.task is not None
    original = build_backbone("conv4", 5, 1, 16)
    original.load_state_dict(checkpoint.state)
    teacher = load_teacher((out / f"{conv4.name}.onnx").read_bytes(), already_accepted=True)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(teacher.module(x), original.eval()(x), atol=1e-5)


def test_too_few_classes_or_images_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SplitError, match="5-way"):
        train_zoo(_easy_set(classes=4), tmp_path, ZooConfig(models=1))
    with pytest.raises(SplitError, match="at least 2 per class"):
        train_zoo(_easy_set(per_class=1), tmp_path, ZooConfig(models=1, epochs=1))


@pytest.mark.parametrize("kwargs", [{"arch": "vgg"}, {"models": 0}, {"ways": 1}, {"holdout": 1.0}])
def test_bad_config_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ZooConfig(**{"models": 1, **kwargs})  # type: ignore[arg-type]


def test_zoo_command_trains_from_a_glyph_folder(tmp_path: Path) -> None:
    from free_common.bench.cli import app

    glyphs = tmp_path / "glyphs"
    glyphs.mkdir()
    data = _easy_set(side=32)
    arrays = {
        "images": data.images,
        "labels": data.labels,
        "faces": np.zeros(len(data), np.int32),
        "codepoints": np.arange(0x41, 0x41 + data.num_classes, dtype=np.int64),
    }
    write_split_arrays(split_file(glyphs, "meta-train"), arrays)
    write_json(glyphs / MANIFEST, {"splits": {"meta-train": {}}})
    out = tmp_path / "zoo"
    args = ["zoo", "--data", str(glyphs), "--models", "2", "--epochs", "2", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.onnx")) == [
        "teacher-000-conv4.onnx",
        "teacher-001-conv4.onnx",
    ]
    assert "held-out accuracy" in result.output
    stored = json.loads((out / "teacher-000-conv4.json").read_text())
    assert stored["class_names"][0].startswith("U+00")


_SPEC = """
disjoint = true
[[groups]]
arch = "conv4"
count = 2
ways = 2
[[groups]]
arch = "conv4"
width = 4
count = 1
ways = 3
image_size = 20
[[groups]]
arch = "mlp"
count = 1
ways = 2
image_size = 16
"""


def test_a_mix_spec_builds_its_groups_round_robin_on_disjoint_classes(tmp_path: Path) -> None:
    spec_path = tmp_path / "mix.toml"
    spec_path.write_text(_SPEC)
    spec = read_mix_spec(spec_path)
    assert spec.models == 4 and spec.disjoint
    records = train_zoo(
        _easy_set(classes=10), tmp_path / "zoo", ZooConfig(models=4, mix=spec, epochs=1, seed=3)
    )
    # Round-robin: the first of each group, then the rest, so any prefix is mixed.
    assert [(r.arch, r.width, len(r.classes)) for r in records] == [
        ("conv4", 32, 2),
        ("conv4", 4, 3),
        ("mlp", 256, 2),
        ("conv4", 32, 2),
    ]
    assert [r.name for r in records][1] == "teacher-001-conv4-w4"
    assert [r.task["input_shape"][1] for r in records] == [16, 20, 16, 16]
    assert [r.task["num_classes"] for r in records] == [2, 3, 2, 2]
    drawn = [c for r in records for c in r.classes]
    assert len(drawn) == len(set(drawn)) == 9  # no class shared
    teacher = load_teacher((tmp_path / "zoo" / "teacher-001-conv4-w4.onnx").read_bytes())
    assert teacher.task.num_classes == 3
    again = train_zoo(
        _easy_set(classes=10), tmp_path / "again", ZooConfig(models=4, mix=spec, epochs=1, seed=3)
    )
    assert [r.classes for r in again] == [r.classes for r in records]


def test_a_json_spec_reads_the_same(tmp_path: Path) -> None:
    path = tmp_path / "mix.json"
    path.write_text(json.dumps({"groups": [{"arch": "resnet10", "count": 2, "ways": 10}]}))
    spec = read_mix_spec(path)
    assert spec.groups[0].ways == 10 and spec.disjoint and spec.models == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("groups = []", "non-empty list 'groups'"),
        ('[[groups]]\narch = "vgg"\ncount = 1', "unknown architecture 'vgg'"),
        ('[[groups]]\narch = "conv4"\ncount = 1\ncolour = 1', "must be a table with 'arch'"),
        ('[[groups]]\narch = "conv4"\ncount = 0', "count >= 1"),
        ('[[groups]]\narch = "conv4"\ncount = 1\nimage_size = 8', "at least 16"),
        ("groups = [", "not valid toml"),
    ],
)
def test_a_bad_spec_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "mix.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_mix_spec(path)


def test_a_spec_asking_more_disjoint_classes_than_there_are_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mix.toml"
    path.write_text('[[groups]]\narch = "conv4"\ncount = 3\nways = 3')
    config = ZooConfig(models=3, mix=read_mix_spec(path), epochs=1)
    with pytest.raises(SplitError, match="need 9 disjoint classes but the split has 8"):
        train_zoo(_easy_set(), tmp_path / "zoo", config)


def test_zoo_cli_takes_a_mix_spec_and_says_what_is_missing(tmp_path: Path) -> None:
    from free_common.bench.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["zoo", "--data", str(tmp_path), "--out", str(tmp_path / "z")])
    assert done.exit_code != 0 and "--models N, or a spec with --mix SPEC" in str(done.exception)
    path = tmp_path / "mix.toml"
    path.write_text('[[groups]]\narch = "conv4"\ncount = 2')
    with pytest.raises(ConfigError, match="describes 2 teachers but 3"):
        ZooConfig(models=3, mix=read_mix_spec(path))
