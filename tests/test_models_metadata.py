"""Task metadata in ONNX metadata_props, and the backbone registry."""

from __future__ import annotations

import pytest
import torch
from onnx_builders import tiny_model

from free_common.errors import ConfigError, MetadataError
from free_common.models.backbones import BACKBONES, build_backbone
from free_common.models.metadata import (
    metadata_from_props,
    metadata_to_props,
    read_metadata,
    task_from_dict,
    task_to_dict,
    write_metadata,
)
from free_common.types import ChannelOrder, TaskMetadata

TASK = TaskMetadata(
    num_classes=3,
    input_shape=(3, 32, 32),
    channel_order=ChannelOrder.BGR,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    class_names=("chat", "猫", "Ω-sign"),
)


def test_props_round_trip_with_class_names() -> None:
    props = metadata_to_props(TASK)
    assert props["free.num_classes"] == "3"
    assert props["free.channel_order"] == "bgr"
    assert "猫" in props["free.class_names"]
    assert metadata_from_props(props) == TASK


def test_props_round_trip_without_class_names() -> None:
    task = TaskMetadata(5, (1, 28, 28), ChannelOrder.GRAY, (0.5,), (0.5,))
    props = metadata_to_props(task)
    assert "free.class_names" not in props
    assert metadata_from_props(props) == task


def test_dict_round_trip() -> None:
    assert task_from_dict(task_to_dict(TASK)) == TASK


def test_model_without_our_keys_has_no_metadata() -> None:
    assert metadata_from_props({"author": "someone"}) is None


def test_write_replaces_ours_and_keeps_other_keys() -> None:
    model = tiny_model()
    model.metadata_props.add(key="author", value="owner")
    write_metadata(model, TASK)
    keys = [p.key for p in model.metadata_props]
    assert keys.count("free.num_classes") == 1
    assert "author" in keys
    assert read_metadata(model) == TASK


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"input_shape": [3, 32]}, "input_shape must be"),
        ({"channel_order": "gray"}, "channels"),
        ({"mean": [0.5]}, "one value per channel"),
        ({"std": [0.2, 0.0, 0.2]}, "positive"),
        ({"class_names": ["a", "b"]}, "class_names"),
        ({"channel_order": "hsv"}, "channel_order must be one of"),
    ],
)
def test_inconsistent_metadata_is_refused(change: dict[str, object], message: str) -> None:
    data = {**task_to_dict(TASK), **change}
    with pytest.raises(MetadataError, match=message):
        task_from_dict(data)


def test_missing_field_is_named() -> None:
    data = task_to_dict(TASK)
    del data["std"]
    with pytest.raises(MetadataError, match="lacks 'std'"):
        task_from_dict(data)


@pytest.mark.parametrize(
    ("arch", "channels", "size", "features"),
    [
        ("conv4", 1, 28, 32),  # 28 -> 14 -> 7 -> 3 -> 1
        ("conv4", 3, 32, 128),  # 2 x 2 x 32, as in the FREE code
        ("conv4", 3, 84, 800),  # 5 x 5 x 32
        ("resnet10", 3, 32, 128),
        ("resnet18", 1, 28, 128),
        ("mlp", 1, 28, 256),
    ],
)
def test_backbone_shapes(arch: str, channels: int, size: int, features: int) -> None:
    model = build_backbone(arch, 5, channels, size)
    assert model.feature_dim == features
    assert model.features(torch.zeros(2, channels, size, size)).shape == (2, features)
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 5)
    assert BACKBONES[arch].stem_key in model.state_dict()


def test_backbone_width_is_configurable() -> None:
    assert build_backbone("conv4", 5, 1, 28, width=64).feature_dim == 64
    assert build_backbone("resnet10", 5, 1, 28, width=8).feature_dim == 64


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("vgg", 5, 1, 28), "unknown architecture"),
        (("conv4", 5, 1, 8), "at least 16x16"),
        (("mlp", 0, 1, 28), "must be positive"),
    ],
)
def test_backbone_errors(args: tuple[str, int, int, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_backbone(*args)
