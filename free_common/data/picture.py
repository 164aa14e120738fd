"""A labelled picture of an episode: one row per class, support then query images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from free_common.data.episodes import Episode

__all__ = ["episode_picture"]

_GAP = 4
_LABEL_WIDTH = 150
_HEADER = 22
_SUPPORT_FRAME = (70, 140, 230)
_QUERY_FRAME = (230, 150, 50)


def _tile(image: torch.Tensor, scale: int) -> Image.Image:
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    tile = Image.fromarray(np.ascontiguousarray(array), "RGB")
    return tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)


def episode_picture(episode: Episode, scale: int = 3) -> Image.Image:
    """Draw an episode: a row per class (support framed blue, queries orange), labelled.

    Labels show the class name's ASCII part (``U+0416`` for glyph classes), since the
    built-in font has no other scripts.
    """
    shots = len(episode.support_y) // episode.ways
    queries = len(episode.query_y) // episode.ways
    height, width = (int(d) * scale for d in episode.support_x.shape[2:])
    cell_w, cell_h = width + 2 * _GAP, height + 2 * _GAP
    canvas = Image.new(
        "RGB",
        (_LABEL_WIDTH + (shots + queries) * cell_w + _GAP, _HEADER + episode.ways * cell_h),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)
    draw.text((_LABEL_WIDTH + _GAP, 4), "support", fill=_SUPPORT_FRAME, font=font)
    draw.text((_LABEL_WIDTH + shots * cell_w + _GAP, 4), "query", fill=_QUERY_FRAME, font=font)
    for row in range(episode.ways):
        top = _HEADER + row * cell_h
        name = episode.class_names[row].encode("ascii", "ignore").decode().strip()
        draw.text((_GAP, top + cell_h // 2 - 8), f"{row}: {name}"[:22], fill=(0, 0, 0), font=font)
        images = [episode.support_x[row * shots + k] for k in range(shots)]
        images += [episode.query_x[row * queries + k] for k in range(queries)]
        for column, image in enumerate(images):
            left = _LABEL_WIDTH + column * cell_w
            frame = _SUPPORT_FRAME if column < shots else _QUERY_FRAME
            draw.rectangle((left, top, left + cell_w - 1, top + cell_h - 1), outline=frame, width=2)
            canvas.paste(_tile(image, scale), (left + _GAP, top + _GAP))
    return canvas
