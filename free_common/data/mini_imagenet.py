"""miniImageNet from a local folder, in the layout of Ravi & Larochelle (2017).

Expected layout::

    ROOT/images/*.jpg
    ROOT/train.csv  ROOT/val.csv  ROOT/test.csv     header "filename,label"

Each CSV row names an image in ``images/`` and its class (a WordNet id); the three
files hold 64, 16 and 20 disjoint classes. Images are resized to ``image_size``
(84 by default, as in the paper).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from free_common.data.image_files import read_rgb_images
from free_common.data.imageset import ImageSet, canonical_split
from free_common.errors import DatasetLayoutError

__all__ = ["MINI_IMAGENET_LAYOUT", "load_mini_imagenet"]

MINI_IMAGENET_LAYOUT = "ROOT/images/*.jpg and ROOT/{train,val,test}.csv (filename,label)"
_CSV = {"meta-train": "train.csv", "meta-val": "val.csv", "meta-test": "test.csv"}


def _rows(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["filename", "label"]:
            raise DatasetLayoutError(
                f"{path} must start with the header 'filename,label' "
                f"(expected {MINI_IMAGENET_LAYOUT})"
            )
        rows = []
        for number, row in enumerate(reader, start=2):
            if len(row) < 2 or not row[0] or not row[1]:
                raise DatasetLayoutError(f"{path} line {number}: expected 'filename,label'")
            rows.append((row[0].strip(), row[1].strip()))
    if not rows:
        raise DatasetLayoutError(f"{path} lists no images (expected {MINI_IMAGENET_LAYOUT})")
    return rows


def load_mini_imagenet(root: str | Path, split: str, image_size: int = 84) -> ImageSet:
    """Load one miniImageNet split as RGB images of ``image_size``.

    Raises
    ------
    DatasetLayoutError
        When the folder does not have the expected layout or an image is missing.
    """
    split = canonical_split(split)
    root = Path(root)
    table, images_dir = root / _CSV[split], root / "images"
    for needed in (table, images_dir):
        if not needed.exists():
            raise DatasetLayoutError(
                f"miniImageNet folder {root} has no {needed.name} (expected {MINI_IMAGENET_LAYOUT})"
            )
    rows = _rows(table)
    class_names = tuple(sorted({label for _, label in rows}))
    index = {name: i for i, name in enumerate(class_names)}
    paths = [images_dir / name for name, _ in rows]
    missing = next((p for p in paths if not p.is_file()), None)
    if missing is not None:
        raise DatasetLayoutError(
            f"{table.name} names {missing.name}, which is not in {images_dir} "
            f"(expected {MINI_IMAGENET_LAYOUT})"
        )
    return ImageSet(
        images=read_rgb_images(paths, image_size),
        labels=np.asarray([index[label] for _, label in rows], dtype=np.int64),
        class_names=class_names,
        split=f"miniImageNet {split}",
    )
