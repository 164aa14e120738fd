"""`free-bench data export-folders`: a split's classes as an owner's class folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from free_client.local_tasks import load_class_folders
from free_common.bench.folders import export_class_folders, folder_name
from free_common.data.imageset import ImageSet
from free_common.errors import ConfigError, SplitError

NAMES = ("U+0416 Ж", "U+0416 ж", "T-shirt/top", "Ωμέγα", "U+10D0 ა")


def _split(per_class: tuple[int, ...] = (6, 6, 6, 6, 3)) -> ImageSet:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(per_class)), per_class).astype(np.int64)
    images = rng.integers(0, 256, (len(labels), 8, 8), dtype=np.uint8)
    return ImageSet(images, labels, NAMES, split="meta-test")


def test_folder_names_are_safe_and_never_empty() -> None:
    assert folder_name("U+0416 Ж", 3) == "U+0416"
    assert folder_name("T-shirt/top", 0) == "T-shirt-top"
    assert folder_name("Ωμέγα", 7) == "class-0007"
    assert folder_name("../..", 1) == "class-0001"


def test_writes_the_layout_finetune_reads_with_the_images_as_stored(tmp_path: Path) -> None:
    data = _split()
    out = tmp_path / "owner"
    written = export_class_folders(data, out, classes=4, per_class=5, seed=1)
    assert written.images == 20
    assert sorted(p.name for p in out.iterdir()) == sorted(written.folders)
    assert len(set(written.folders)) == 4  # "U+0416 Ж" and "U+0416 ж" do not collide
    assert "U+10D0 ა" not in written.classes  # only 3 images: not eligible
    back = load_class_folders(out, channels=1, image_size=8)
    assert back.class_counts().tolist() == [5, 5, 5, 5]
    for folder, source in zip(written.folders, written.classes, strict=True):
        label = NAMES.index(source)
        first = np.asarray(Image.open(out / folder / "000.png"))
        assert any(np.array_equal(first, img) for img in data.images[data.labels == label])


def test_the_seed_decides_the_draw(tmp_path: Path) -> None:
    data = _split()
    one = export_class_folders(data, tmp_path / "a", classes=2, per_class=2, seed=4)
    same = export_class_folders(data, tmp_path / "b", classes=2, per_class=2, seed=4)
    assert one == same
    for folder in one.folders:
        for image in ("000.png", "001.png"):
            assert (tmp_path / "a" / folder / image).read_bytes() == (
                tmp_path / "b" / folder / image
            ).read_bytes()


def test_refuses_a_folder_with_something_in_it(tmp_path: Path) -> None:
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an empty folder"):
        export_class_folders(_split(), tmp_path / "owner", classes=1, per_class=1, seed=0)


def test_refuses_more_classes_than_have_enough_images(tmp_path: Path) -> None:
    with pytest.raises(SplitError, match="only 4 classes of meta-test have 6 images"):
        export_class_folders(_split(), tmp_path / "owner", classes=5, per_class=6, seed=0)
    assert not (tmp_path / "owner").exists()
