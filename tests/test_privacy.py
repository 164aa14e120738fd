"""Privacy: membership-test scores, the leakage audit, the loss attack, DP-SGD teachers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from image_sets import easy_image_set

from free_common.bench.zoo import ZooConfig, train_zoo, training_split
from free_common.data.imageset import ImageSet
from free_common.errors import ConfigError, DataError, MetadataError
from free_common.models.metadata import DP_KEYS, dp_from_props, read_dp
from free_common.privacy.audit import AuditConfig, OwnerImages, audit_images
from free_common.privacy.dp import DpConfig
from free_common.privacy.membership import release_scores
from free_common.privacy.metrics import advantage, mean_ci95, roc_auc, tpr_at_fpr
from free_common.types import DpGuarantee


def test_auc_of_known_cases() -> None:
    assert roc_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert roc_auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert roc_auc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    # Members 2 and 4 against non-members 1 and 3: 3 of the 4 pairs ordered right.
    assert roc_auc(np.array([2.0, 4.0]), np.array([1.0, 3.0])) == 0.75


def test_tpr_at_low_fpr() -> None:
    nonmembers = np.arange(100, dtype=float)  # one false positive in 100 is allowed
    # The threshold lets the top non-member (99) through and stops at 98.
    assert tpr_at_fpr(np.array([97.5, 98.5, 99.5, 200.0]), nonmembers) == 0.75
    # Fewer than 100 non-members: no false positive is allowed.
    assert tpr_at_fpr(np.array([5.0, 9.5, 10.5]), np.arange(10, dtype=float)) == pytest.approx(
        2 / 3
    )
    assert tpr_at_fpr(np.array([1.0]), np.array([2.0])) == 0.0


def test_advantage_intervals_hold_the_estimate() -> None:
    rng = np.random.default_rng(0)
    found = advantage(rng.normal(1, 1, 200), rng.normal(0, 1, 200), resamples=100)
    assert 0.7 < found.auc < 0.83
    assert found.auc_ci[0] <= found.auc <= found.auc_ci[1]
    assert (found.members, found.nonmembers) == (200, 200)
    mean, half = mean_ci95([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and half > 0


def _owner(seed: int = 0, per_class: int = 12, classes: int = 3) -> OwnerImages:
    rng = torch.Generator().manual_seed(seed)
    images = torch.rand(2 * per_class * classes, 1, 16, 16, generator=rng)
    labels = torch.arange(classes).repeat_interleave(per_class).repeat(2)
    half = per_class * classes
    return OwnerImages(images[:half], labels[:half], images[half:], labels[half:])


def test_audit_flags_recovered_images_that_copy_training_images() -> None:
    owner = _owner()
    # A model that memorises: what the server recovers is its training images, slightly noisy.
    copied = (owner.members + 0.01 * torch.randn_like(owner.members)).clamp(0, 1)
    found = audit_images(copied, owner.member_labels, owner, AuditConfig(resamples=20))
    for name in ("pixel", "ssim"):
        assert found.metrics[name].advantage.auc > 0.99
        assert found.metrics[name].advantage.tpr_at_1fpr > 0.9
        assert found.metrics[name].nearest_member < found.metrics[name].nearest_nonmember
    # The picture pairs each recovered image with the training image it copies.
    assert torch.allclose(found.recovered, found.nearest, atol=0.05)


def test_audit_of_unrelated_images_gives_no_advantage() -> None:
    owner = _owner(per_class=30)
    unrelated = torch.rand(30, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(3).repeat_interleave(10)
    features = lambda x: x.flatten(1)  # noqa: E731 - a feature space: the pixels themselves
    found = audit_images(unrelated, labels, owner, AuditConfig(resamples=20), features)
    assert set(found.metrics) == {"pixel", "feature", "ssim"}
    for metric in found.metrics.values():
        assert 0.3 < metric.advantage.auc < 0.7


def test_release_attack_cannot_tell_members_through_features_that_ignore_them() -> None:
    owner = _owner(per_class=40)
    members, nonmembers = release_scores(lambda x: x.flatten(1)[:, :32], owner)
    assert len(members) == len(owner.members) and len(nonmembers) == len(owner.nonmembers)
    assert 0.35 < roc_auc(members, nonmembers) < 0.65


def test_owner_images_need_members_and_nonmembers() -> None:
    owner = _owner()
    with pytest.raises(DataError):
        OwnerImages(owner.members, owner.member_labels, owner.members[:0], owner.member_labels[:0])


def _easy_set(classes: int = 6, per_class: int = 12, side: int = 16) -> ImageSet:
    return easy_image_set(classes, per_class, side)


def test_dp_zoo_spends_the_target_epsilon_and_declares_it(tmp_path: Path) -> None:
    data = _easy_set()
    config = ZooConfig(models=1, ways=3, epochs=2, dp=DpConfig(epsilon=4.0, delta=1e-4))
    (record,) = train_zoo(data, tmp_path, config)
    assert record.arch == "conv4gn"
    assert record.dp_epsilon is not None and 3.5 < record.dp_epsilon <= 4.0 + 1e-6
    assert record.dp_delta == 1e-4
    model = onnx.load_from_string((tmp_path / f"{record.name}.onnx").read_bytes())
    declared = read_dp(model)
    assert declared is not None and declared.epsilon == pytest.approx(record.dp_epsilon, abs=1e-3)
    assert not {n.op_type for n in model.graph.node} & {
        "BatchNormalization",
        "InstanceNormalization",
    }
    stored = json.loads((tmp_path / f"{record.name}.json").read_text())
    train, held = training_split(data, stored)
    assert len(train) == record.train_images and len(held) == record.heldout_images
    assert not set(train.tolist()) & set(held.tolist())


def test_training_split_replays_a_zoo_that_did_not_record_it(tmp_path: Path) -> None:
    data = _easy_set()
    (record,) = train_zoo(data, tmp_path, ZooConfig(models=1, ways=3, epochs=1, seed=3))
    stored = json.loads((tmp_path / f"{record.name}.json").read_text())
    old = {k: v for k, v in stored.items() if k not in ("train_indices", "heldout_indices")}
    train, held = training_split(data, old)
    assert train.tolist() == stored["train_indices"]
    assert held.tolist() == stored["heldout_indices"]
    with pytest.raises(DataError, match="cannot replay"):
        training_split(data, {**old, "classes": [0, 1, 2]})


def test_dp_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="--dp-epsilon"):
        DpConfig(epsilon=0.0)
    with pytest.raises(ConfigError, match="--dp-delta"):
        DpConfig(epsilon=1.0, delta=1.0)
    with pytest.raises(ConfigError, match="Conv4"):
        ZooConfig(models=1, arch="resnet", dp=DpConfig(epsilon=1.0))


def test_dp_metadata_goes_together_and_is_checked() -> None:
    assert dp_from_props({}) is None
    assert dp_from_props({DP_KEYS[0]: "8.0", DP_KEYS[1]: "1e-05"}) == DpGuarantee(8.0, 1e-5)
    with pytest.raises(MetadataError, match="together"):
        dp_from_props({DP_KEYS[0]: "8.0"})
    with pytest.raises(MetadataError, match="numbers"):
        dp_from_props({DP_KEYS[0]: "lots", DP_KEYS[1]: "1e-5"})
    with pytest.raises(MetadataError, match="dp_delta"):
        dp_from_props({DP_KEYS[0]: "8", DP_KEYS[1]: "2"})


def test_free_bench_privacy_end_to_end(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from free_common.bench.cli import app
    from free_common.data.glyphs_store import MANIFEST, split_file, write_json, write_split_arrays

    glyphs = tmp_path / "glyphs"
    glyphs.mkdir()
    for offset, split in enumerate(("meta-train", "meta-val", "meta-test")):
        data = _easy_set(classes=6, per_class=20, side=32)
        write_split_arrays(
            split_file(glyphs, split),
            {
                "images": data.images,
                "labels": data.labels,
                "faces": np.zeros(len(data), np.int32),
                "codepoints": np.arange(0x41, 0x47, dtype=np.int64) + 16 * offset,
            },
        )
    write_json(
        glyphs / MANIFEST, {"splits": {s: {} for s in ("meta-train", "meta-val", "meta-test")}}
    )
    zoo = tmp_path / "zoo"
    train_zoo(_easy_set(classes=6, per_class=20, side=32), zoo, ZooConfig(models=2, epochs=1))
    out = tmp_path / "out"
    args = ["privacy", "--data", str(glyphs), "--zoo", str(zoo), "--out", str(out),
            "--teachers", "2", "--preset", "smoke", "--round-steps", "2",
            "--images-per-class", "3", "--test-episodes", "2"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())
    assert [t["teacher"] for t in report["teachers"]] == ["teacher-000-conv4", "teacher-001-conv4"]
    assert set(report["summary"]["audit"]) == {"pixel", "feature", "ssim"}
    assert set(report["summary"]["attacks"]) == {"teacher", "release", "last-step", "random-init"}
    assert {row["method"] for row in report["accuracy"]} == {"release", "last-step", "random-init"}
    assert report["figures"] and all((out / f).is_file() for f in report["figures"])
    assert "## Leakage audit" in (out / "results.md").read_text()
