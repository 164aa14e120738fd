"""CIFAR-FS, miniImageNet and CUB loaders on tiny fixtures made in their usual layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from free_common.data.cifar_fs import load_cifar_fs
from free_common.data.cub import cub_class_split, load_cub
from free_common.data.mini_imagenet import load_mini_imagenet
from free_common.data.sources import detect_kind, load_split
from free_common.errors import DatasetLayoutError


def _image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _colour(i: int) -> tuple[int, int, int]:
    return (10 + 20 * i, 200 - 15 * i, 5 * i)


@pytest.fixture
def cifar_fs(tmp_path: Path) -> Path:
    classes = {"train": ["apple", "bed", "cup"], "val": ["dog", "eel"], "test": ["fox", "gun"]}
    i = 0
    for split, names in classes.items():
        for name in names:
            for k in range(2):
                _image(tmp_path / "data" / split / name / f"{k}.png", _colour(i), (32, 32))
            i += 1
    return tmp_path


def test_cifar_fs_folders(cifar_fs: Path) -> None:
    train = load_cifar_fs(cifar_fs, "meta-train")
    assert train.class_names == ("apple", "bed", "cup")
    assert train.images.shape == (6, 32, 32, 3) and train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert tuple(train.images[2, 0, 0]) == _colour(1)
    test = load_split(cifar_fs, "test")
    assert test.class_names == ("fox", "gun") and test.split == "cifar-fs meta-test"
    assert load_cifar_fs(cifar_fs, "val", image_size=16).images.shape == (4, 16, 16, 3)


def test_cifar_fs_wrong_layouts(tmp_path: Path) -> None:
    (tmp_path / "CIFAR_FS_train.pickle").write_bytes(b"\x80\x04.")
    with pytest.raises(DatasetLayoutError, match="pickle files, which are not read"):
        load_cifar_fs(tmp_path, "meta-train")
    (tmp_path / "CIFAR_FS_train.pickle").unlink()
    (tmp_path / "data" / "train").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="no class folders"):
        load_cifar_fs(tmp_path, "meta-train")
    with pytest.raises(DatasetLayoutError, match=r"no data/test/ \(expected ROOT/data/"):
        load_cifar_fs(tmp_path, "meta-test")


@pytest.fixture
def mini(tmp_path: Path) -> Path:
    rows = {"train": ["n01", "n02"], "val": ["n03"], "test": ["n04", "n05"]}
    i = 0
    for split, wnids in rows.items():
        lines = ["filename,label"]
        for wnid in wnids:
            for k in range(3):
                name = f"{wnid}0000000{k}.jpg"
                _image(tmp_path / "images" / name, _colour(i), (20, 30))
                lines.append(f"{name},{wnid}")
            i += 1
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_mini_imagenet_csv_layout(mini: Path) -> None:
    train = load_mini_imagenet(mini, "meta-train", image_size=12)
    assert train.class_names == ("n01", "n02") and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.images.shape == (6, 12, 12, 3)
    assert np.abs(train.images[3].astype(int) - _colour(1)).max() <= 3  # JPEG
    assert load_split(mini, "meta-test").images.shape == (6, 84, 84, 3)


def test_mini_imagenet_wrong_layouts(mini: Path) -> None:
    (mini / "val.csv").write_text("file,class\nx.jpg,n03\n")
    with pytest.raises(DatasetLayoutError, match="header 'filename,label'"):
        load_mini_imagenet(mini, "val")
    (mini / "val.csv").write_text("filename,label\nmissing.jpg,n03\n")
    with pytest.raises(DatasetLayoutError, match=r"names missing\.jpg, which is not in"):
        load_mini_imagenet(mini, "val")
    (mini / "test.csv").unlink()
    with pytest.raises(DatasetLayoutError, match=r"no test.csv \(expected ROOT/images"):
        load_mini_imagenet(mini, "test")


@pytest.fixture
def cub(tmp_path: Path) -> Path:
    base = tmp_path / "CUB_200_2011"
    images, labels, classes = [], [], []
    image_id = 1
    for class_id in range(1, 9):
        folder = f"{class_id:03d}.Bird_{class_id}"
        classes.append(f"{class_id} {folder}")
        for k in range(2):
            relative = f"{folder}/Bird_{class_id}_{k}.jpg"
            _image(base / "images" / relative, _colour(class_id), (30, 20))
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {class_id}")
            image_id += 1
    for name, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("classes.txt", classes),
    ):
        (base / name).write_text("\n".join(lines) + "\n")
    return tmp_path


def test_cub_class_split_by_id_order(cub: Path) -> None:
    assert cub_class_split(list(range(1, 201)), "train") == list(range(1, 101))
    assert cub_class_split(list(range(1, 201)), "val") == list(range(101, 151))
    assert cub_class_split(list(range(1, 201)), "test") == list(range(151, 201))
    train = load_cub(cub, "meta-train", image_size=10)
    assert train.class_names == tuple(f"{i:03d}.Bird_{i}" for i in range(1, 5))
    assert train.images.shape == (8, 10, 10, 3) and train.labels.tolist() == [
        0,
        0,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    test = load_split(cub / "CUB_200_2011", "test")
    assert test.class_names == ("007.Bird_7", "008.Bird_8")


def test_cub_wrong_layouts(cub: Path) -> None:
    (cub / "CUB_200_2011" / "images.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"lacks images.txt \(expected ROOT/CUB_200_2011"):
        load_cub(cub, "train")


def test_detection_names_the_expected_layouts(tmp_path: Path, mini: Path) -> None:
    assert detect_kind(mini) == "mini-imagenet"
    assert detect_kind("fashion-mnist") == "fashion-mnist"
    (tmp_path / "stray").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"matches no known data layout.*CIFAR-FS"):
        load_split(tmp_path / "stray", "train")
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        load_split(tmp_path / "absent", "train")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "data" / "train" / "x").mkdir(parents=True)
    (tmp_path / "data" / "train" / "x" / "0.png").write_bytes(b"not an image")
    with pytest.raises(DatasetLayoutError, match="cannot read image"):
        load_split(tmp_path, "train", kind="cifar-fs")
