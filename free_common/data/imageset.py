"""`ImageSet`: the one in-memory form of every data source, and the split names."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from free_common.errors import SplitError

__all__ = ["SPLITS", "ImageSet", "canonical_split"]

SPLITS = ("meta-train", "meta-val", "meta-test")
"""Split names of few-shot benchmarks; classes never cross them."""

_ALIASES = {
    "train": "meta-train",
    "val": "meta-val",
    "valid": "meta-val",
    "validation": "meta-val",
    "test": "meta-test",
}


def canonical_split(name: str) -> str:
    """Return the canonical name of a meta split (``train`` -> ``meta-train``).

    Raises
    ------
    SplitError
        When `name` is not a split name.
    """
    split = _ALIASES.get(name, name)
    if split not in SPLITS:
        raise SplitError(f"unknown split {name!r}; use one of: {', '.join(SPLITS)}")
    return split


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images of one split with integer labels.

    Attributes
    ----------
    images
        ``uint8``, shape ``(N, H, W)`` (grey) or ``(N, H, W, 3)`` (RGB).
    labels
        ``int64``, shape ``(N,)``, values in ``0 .. len(class_names) - 1``.
    class_names
        One unique name per label.
    split
        Where the images come from (``meta-train``, ``test``, ...), for messages.
    """

    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]
    class_names: tuple[str, ...]
    split: str = ""

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != np.uint8 or not (
            images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)
        ):
            raise ValueError(
                f"images must be uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        if labels.dtype != np.int64 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must be int64 of shape ({images.shape[0]},), got {labels.dtype} "
                f"{labels.shape}"
            )
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class names must be unique")
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(f"labels must lie in 0..{len(self.class_names) - 1}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes (labels present or not)."""
        return len(self.class_names)

    @property
    def channels(self) -> int:
        """1 for grey images, 3 for RGB."""
        return 1 if self.images.ndim == 3 else 3

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of every image."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def class_counts(self) -> npt.NDArray[np.int64]:
        """Return the number of images of each label, shape ``(num_classes,)``."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)
