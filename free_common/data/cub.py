"""CUB-200-2011 from a local folder, in the layout of its official archive.

Expected layout (``ROOT`` may also be the ``CUB_200_2011`` folder itself)::

    ROOT/CUB_200_2011/images/<id>.<name>/*.jpg
    ROOT/CUB_200_2011/images.txt               "<image id> <path under images/>"
    ROOT/CUB_200_2011/classes.txt              "<class id> <id>.<name>"
    ROOT/CUB_200_2011/image_class_labels.txt   "<image id> <class id>"

Split: the common class split by class id order (Hilliard et al., 2018; Chen et al.,
2019): of the C classes sorted by id, the first C/2 are meta-train, the next C/4
meta-val and the rest meta-test, which for the 200 CUB classes is 100/50/50.
Images are resized to ``image_size`` (84 by default).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from free_common.data.image_files import read_rgb_images
from free_common.data.imageset import ImageSet, canonical_split
from free_common.errors import DatasetLayoutError

__all__ = ["CUB_LAYOUT", "cub_class_split", "load_cub"]

CUB_LAYOUT = (
    "ROOT/CUB_200_2011/{images/<id>.<class>/*.jpg, images.txt, classes.txt, image_class_labels.txt}"
)
_FILES = ("images.txt", "classes.txt", "image_class_labels.txt")


def _base(root: Path) -> Path:
    for base in (root / "CUB_200_2011", root):
        if (base / "images").is_dir() and all((base / f).is_file() for f in _FILES):
            return base
    base = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    missing = [f for f in ("images", *_FILES) if not (base / f).exists()]
    raise DatasetLayoutError(
        f"CUB folder {base} lacks {', '.join(missing)} (expected {CUB_LAYOUT})"
    )


def _table(path: Path) -> dict[int, str]:
    table: dict[int, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        key, _, value = line.strip().partition(" ")
        if not key.isdigit() or not value:
            raise DatasetLayoutError(f"{path} line {number}: expected '<id> <value>'")
        table[int(key)] = value.strip()
    return table


def cub_class_split(class_ids: list[int], split: str) -> list[int]:
    """Return the class ids of `split` under the id-order half/quarter/quarter split."""
    ordered = sorted(class_ids)
    n_train, n_val = len(ordered) // 2, len(ordered) // 4
    bounds = {
        "meta-train": (0, n_train),
        "meta-val": (n_train, n_train + n_val),
        "meta-test": (n_train + n_val, len(ordered)),
    }
    start, stop = bounds[canonical_split(split)]
    return ordered[start:stop]


def load_cub(root: str | Path, split: str, image_size: int = 84) -> ImageSet:
    """Load one CUB split as RGB images of ``image_size``.

    Raises
    ------
    DatasetLayoutError
        When the folder does not have the expected layout or an image is missing.
    """
    split = canonical_split(split)
    base = _base(Path(root))
    images = _table(base / "images.txt")
    classes = _table(base / "classes.txt")
    image_class = {k: int(v) for k, v in _table(base / "image_class_labels.txt").items()}
    wanted = cub_class_split(list(classes), split)
    if not wanted:
        raise DatasetLayoutError(f"CUB folder {base} has too few classes for {split}")
    label_of = {class_id: i for i, class_id in enumerate(wanted)}
    chosen = sorted(i for i, c in image_class.items() if c in label_of)
    unknown = next((i for i in chosen if i not in images), None)
    if unknown is not None:
        raise DatasetLayoutError(f"image id {unknown} is in image_class_labels.txt, not images.txt")
    paths = [base / "images" / images[i] for i in chosen]
    missing = next((p for p in paths if not p.is_file()), None)
    if missing is not None:
        raise DatasetLayoutError(f"images.txt names {missing}, which does not exist")
    return ImageSet(
        images=read_rgb_images(paths, image_size),
        labels=np.asarray([label_of[image_class[i]] for i in chosen], dtype=np.int64),
        class_names=tuple(classes[c] for c in wanted),
        split=f"CUB {split}",
    )
