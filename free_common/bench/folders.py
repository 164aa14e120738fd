"""Write a few classes of a split as an owner's class folders: ``OUT/<class>/<i>.png``.

Simulated data owners need data of their own in the layout ``free-client join
--data`` and ``free-client finetune --data`` read. Drawing it from meta-test
gives them new tasks: classes that no teacher of the zoo (meta-train) was
trained on. Folder names are the class names made safe for any file system
(``U+0416 Ж`` becomes ``U+0416``); images are written as PNG, as stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from free_common.data.imageset import ImageSet
from free_common.errors import ConfigError, SplitError

__all__ = ["FolderExport", "export_class_folders", "folder_name"]

_UNSAFE = re.compile(r"[^A-Za-z0-9+._-]+")


@dataclass(frozen=True)
class FolderExport:
    """What was written.

    Attributes
    ----------
    folders
        Folder name of each written class, in order.
    classes
        The source class name behind each folder.
    images
        Images written in all.
    """

    folders: tuple[str, ...]
    classes: tuple[str, ...]
    images: int


def folder_name(class_name: str, index: int) -> str:
    """Return a file-system-safe folder name for a class (its index when nothing is left)."""
    slug = _UNSAFE.sub("-", class_name).strip("-.")
    return slug or f"class-{index:04d}"


def export_class_folders(
    data: ImageSet, out: Path, *, classes: int, per_class: int, seed: int
) -> FolderExport:
    """Write `classes` random classes of `data`, `per_class` random images each, to `out`.

    Parameters
    ----------
    data
        The split to draw from.
    out
        A folder that does not exist yet or is empty.
    classes, per_class
        How many classes, and images of each (only classes with that many qualify).
    seed
        Seeds the draw of classes and images.

    Raises
    ------
    ConfigError
        `out` is a file or a folder with something in it.
    SplitError
        Fewer than `classes` classes have `per_class` images.
    """
    if classes < 1 or per_class < 1:
        raise ConfigError("--classes and --per-class must be at least 1")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} is not an empty folder: give a new one")
    counts = data.class_counts()
    eligible = np.flatnonzero(counts >= per_class)
    if eligible.size < classes:
        raise SplitError(
            f"only {eligible.size} classes of {data.split or 'the split'} have {per_class} images"
            f" or more: ask for fewer --classes or a smaller --per-class"
        )
    rng = np.random.default_rng(seed)
    picked = rng.choice(eligible, size=classes, replace=False)
    folders: list[str] = []
    for label in picked:
        name = folder_name(data.class_names[label], int(label))
        if name in folders:  # two names that differ only in unsafe characters
            name = f"{name}-{int(label)}"
        members = rng.choice(np.flatnonzero(data.labels == label), size=per_class, replace=False)
        target = out / name
        target.mkdir(parents=True)
        for number, index in enumerate(members):
            Image.fromarray(data.images[index]).save(target / f"{number:03d}.png")
        folders.append(name)
    return FolderExport(
        folders=tuple(folders),
        classes=tuple(data.class_names[label] for label in picked),
        images=classes * per_class,
    )
