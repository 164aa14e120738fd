"""Tiny glyph-like image sets for tests that train zoo teachers."""

from __future__ import annotations

import numpy as np

from free_common.data.imageset import ImageSet


def easy_image_set(classes: int, per_class: int = 12, side: int = 16) -> ImageSet:
    """Each class is a fixed random pattern plus noise: learnable in a few epochs."""
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 256, (classes, side, side))
    images = patterns.repeat(per_class, axis=0) + rng.normal(
        0, 40, (classes * per_class, side, side)
    )
    labels = np.arange(classes, dtype=np.int64).repeat(per_class)
    names = tuple(f"U+{0x41 + c:04X}" for c in range(classes))
    return ImageSet(np.clip(images, 0, 255).astype(np.uint8), labels, names, "meta-train")
