"""`load_split`: one entry point for every data source, by folder layout or name.

Sources (``kind`` names them; without it the folder's layout decides):

``glyphs``         a folder built by ``free-bench data build`` (has ``manifest.json``)
``fashion-mnist``  the string ``fashion-mnist`` (Debian's copy) or a folder of its
                   ``*-ubyte.gz`` files; splits ``train``, ``test``, ``all``
                   (``meta-train``/``meta-test`` mean ``train``/``test``)
``cifar-fs``       ``ROOT/data/{train,val,test}/<class>/*.png``
``mini-imagenet``  ``ROOT/images/*.jpg`` + ``ROOT/{train,val,test}.csv``
``cub``            ``ROOT/CUB_200_2011/...`` (images, images.txt, classes.txt, ...)
"""

from __future__ import annotations

from pathlib import Path

from free_common.data.cifar_fs import CIFAR_FS_LAYOUT, load_cifar_fs
from free_common.data.cub import CUB_LAYOUT, load_cub
from free_common.data.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist
from free_common.data.glyphs_store import MANIFEST, load_glyph_split
from free_common.data.imageset import ImageSet
from free_common.data.mini_imagenet import MINI_IMAGENET_LAYOUT, load_mini_imagenet
from free_common.errors import DatasetLayoutError

__all__ = ["KINDS", "detect_kind", "load_split"]

KINDS = ("glyphs", "fashion-mnist", "cifar-fs", "mini-imagenet", "cub")
_FASHION_SPLITS = {"meta-train": "train", "meta-test": "test"}


def detect_kind(source: str | Path) -> str:
    """Return the kind of data source a name or folder is (see the module docstring).

    Raises
    ------
    DatasetLayoutError
        When the folder matches no known layout.
    """
    if str(source) == "fashion-mnist":
        return "fashion-mnist"
    root = Path(source)
    if not root.is_dir():
        raise DatasetLayoutError(f"data folder {root} does not exist")
    if (root / MANIFEST).is_file():
        return "glyphs"
    if any(root.glob("*-ubyte.gz")) or any(root.glob("*-ubyte")):
        return "fashion-mnist"
    if (root / "CUB_200_2011").is_dir() or (root / "images.txt").is_file():
        return "cub"
    if any((root / name).is_file() for name in ("train.csv", "val.csv", "test.csv")):
        return "mini-imagenet"
    if any((base / "train").is_dir() for base in (root, root / "data")) or any(
        root.glob("**/*.pickle")
    ):
        return "cifar-fs"
    raise DatasetLayoutError(
        f"{root} matches no known data layout; expected a glyph set ({MANIFEST}), "
        f"CIFAR-FS ({CIFAR_FS_LAYOUT}), miniImageNet ({MINI_IMAGENET_LAYOUT}) "
        f"or CUB ({CUB_LAYOUT})"
    )


def load_split(
    source: str | Path, split: str, *, kind: str | None = None, image_size: int | None = None
) -> ImageSet:
    """Load one split of a data source as an `ImageSet`.

    Parameters
    ----------
    source
        A folder, or ``"fashion-mnist"`` for Debian's copy.
    split
        ``meta-train``, ``meta-val`` or ``meta-test`` (``train``/``val``/``test`` too);
        Fashion-MNIST has ``train``, ``test`` and ``all``.
    kind
        One of `KINDS`; detected from the folder when None.
    image_size
        Side of the square images for photo folders (default: 32 for CIFAR-FS,
        84 for miniImageNet and CUB); glyphs and Fashion-MNIST keep their size.

    Raises
    ------
    DatasetLayoutError
        When the source is missing or not in the expected layout.
    SplitError
        When the split name is unknown.
    """
    kind = kind or detect_kind(source)
    if kind == "glyphs":
        return load_glyph_split(source, split)
    if kind == "fashion-mnist":
        root = DEFAULT_ROOT if str(source) == "fashion-mnist" else Path(source)
        return load_fashion_mnist(_FASHION_SPLITS.get(split, split), root)
    if kind == "cifar-fs":
        return load_cifar_fs(source, split, image_size or 32)
    if kind == "mini-imagenet":
        return load_mini_imagenet(source, split, image_size or 84)
    if kind == "cub":
        return load_cub(source, split, image_size or 84)
    raise DatasetLayoutError(f"unknown data source kind {kind!r}; use one of: {', '.join(KINDS)}")
