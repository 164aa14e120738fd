"""Reading image files of the standard few-shot folders into one uint8 array."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, UnidentifiedImageError

from free_common.errors import DatasetLayoutError

__all__ = ["read_rgb_images"]


def read_rgb_images(paths: Sequence[Path], size: int) -> npt.NDArray[np.uint8]:
    """Read images as RGB, resized to ``size x size`` (aspect not kept), ``(N, size, size, 3)``.

    Raises
    ------
    DatasetLayoutError
        When a file cannot be read as an image.
    """
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for row, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                # JPEG decodes at a reduced scale when that is enough: much faster.
                image.draft("RGB", (size, size))
                rgb = image.convert("RGB")
                if rgb.size != (size, size):
                    rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
                out[row] = np.asarray(rgb, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DatasetLayoutError(f"cannot read image {path}: {exc}") from exc
    return out
