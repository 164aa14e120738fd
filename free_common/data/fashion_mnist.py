"""Fashion-MNIST from Debian's ``dataset-fashion-mnist``: a second, photographic domain.

Ten classes of 28x28 grey clothing photos (60,000 train and 10,000 test images), read
from ``/usr/share/datasets/fashion-mnist/*-ubyte.gz`` by the strict IDX reader. Too
few classes to meta-train on; good for 5-way cross-domain evaluation. Splits:
``train``, ``test`` (the two files) and ``all`` (both).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from free_common.data.idx import read_idx
from free_common.data.imageset import ImageSet
from free_common.errors import DatasetLayoutError, IdxFormatError

__all__ = ["CLASS_NAMES", "DEFAULT_ROOT", "FASHION_SPLITS", "load_fashion_mnist"]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_SPLITS = ("train", "test", "all")
_PREFIX = {"train": "train", "test": "t10k"}
_REINSTALL = "; run: apt-get install --reinstall dataset-fashion-mnist"
_INSTALL = "; run: apt-get install -y dataset-fashion-mnist (or `make install`)"


def _file(root: Path, prefix: str, kind: str) -> Path:
    name = f"{prefix}-{kind}-ubyte"
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    raise DatasetLayoutError(f"Fashion-MNIST file {root / name}.gz not found{_INSTALL}")


def _load_part(root: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = _PREFIX[part]
    hint = _REINSTALL if root == DEFAULT_ROOT else ""
    images = read_idx(_file(root, prefix, "images-idx3"), ndim=3, dtype=np.uint8, hint=hint)
    labels = read_idx(_file(root, prefix, "labels-idx1"), ndim=1, dtype=np.uint8, hint=hint)
    if images.shape[0] != labels.shape[0]:
        raise IdxFormatError(
            f"Fashion-MNIST {part}: {images.shape[0]} images but {labels.shape[0]} labels{hint}"
        )
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise IdxFormatError(f"Fashion-MNIST {part}: label {int(labels.max())} out of 0..9{hint}")
    return images, labels.astype(np.int64)


def load_fashion_mnist(split: str = "test", root: str | Path = DEFAULT_ROOT) -> ImageSet:
    """Load a Fashion-MNIST split (``train``, ``test`` or ``all``) as 28x28 grey images.

    Raises
    ------
    DatasetLayoutError
        When a file is missing (the package is not installed).
    IdxFormatError
        When a file is corrupt or truncated.
    """
    if split not in FASHION_SPLITS:
        raise DatasetLayoutError(
            f"Fashion-MNIST has no split {split!r}; use one of: {', '.join(FASHION_SPLITS)}"
        )
    parts = ("train", "test") if split == "all" else (split,)
    loaded = [_load_part(Path(root), part) for part in parts]
    return ImageSet(
        images=np.concatenate([images for images, _ in loaded]),
        labels=np.concatenate([labels for _, labels in loaded]),
        class_names=CLASS_NAMES,
        split=f"fashion-mnist {split}",
    )
