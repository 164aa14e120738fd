"""CIFAR-FS from a local folder, in its common image-folder layout.

Expected layout (``ROOT/data`` may also be ``ROOT`` itself)::

    ROOT/data/train/<class>/*.png    64 classes
    ROOT/data/val/<class>/*.png      16 classes
    ROOT/data/test/<class>/*.png     20 classes

The other common distribution, ``CIFAR_FS_{train,val,test}.pickle``, is not read:
unpickling a downloaded file can run arbitrary code. Convert it to the folder
layout first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from free_common.data.image_files import read_rgb_images
from free_common.data.imageset import ImageSet, canonical_split
from free_common.errors import DatasetLayoutError

__all__ = ["CIFAR_FS_LAYOUT", "load_cifar_fs"]

CIFAR_FS_LAYOUT = "ROOT/data/{train,val,test}/<class>/*.png"
_FOLDER = {"meta-train": "train", "meta-val": "val", "meta-test": "test"}
_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


def _split_dir(root: Path, folder: str) -> Path:
    for base in (root / "data", root):
        if (base / folder).is_dir():
            return base / folder
    if any(root.glob("*.pickle")) or any(root.glob("data/*.pickle")):
        raise DatasetLayoutError(
            f"{root} holds CIFAR-FS pickle files, which are not read (unpickling can run "
            f"code); convert them to the folder layout {CIFAR_FS_LAYOUT}"
        )
    raise DatasetLayoutError(
        f"CIFAR-FS folder {root} has no data/{folder}/ (expected {CIFAR_FS_LAYOUT})"
    )


def load_cifar_fs(root: str | Path, split: str, image_size: int = 32) -> ImageSet:
    """Load one CIFAR-FS split as RGB images of ``image_size`` (32 is the native size).

    Raises
    ------
    DatasetLayoutError
        When the folder does not have the expected layout.
    """
    split = canonical_split(split)
    folder = _split_dir(Path(root), _FOLDER[split])
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DatasetLayoutError(
            f"CIFAR-FS folder {folder} has no class folders (expected {CIFAR_FS_LAYOUT})"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(classes):
        files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in _SUFFIXES)
        if not files:
            raise DatasetLayoutError(
                f"CIFAR-FS class folder {class_dir} has no .png images (expected {CIFAR_FS_LAYOUT})"
            )
        paths.extend(files)
        labels.extend([label] * len(files))
    return ImageSet(
        images=read_rgb_images(paths, image_size),
        labels=np.asarray(labels, dtype=np.int64),
        class_names=tuple(p.name for p in classes),
        split=f"cifar-fs {split}",
    )
