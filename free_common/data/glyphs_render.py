"""Render one character of one font face as a small white-on-black image.

The recipe (it worked for the official FREE code on CPU): draw the glyph large
(`RenderSpec.font_px`), crop to the ink's bounding box, scale it so that its longer
side is `RenderSpec.fit_px` (aspect kept), and centre it on a black
`RenderSpec.canvas_px` square. White on black, so zero padding in a random crop
matches the background.

A render is refused (``None``) when it is empty, when it has fewer than
`RenderSpec.min_ink_px` pixels at or above `RenderSpec.ink_threshold`, or when the
cropped ink is byte-identical to the face's drawing of a codepoint it does not have
(its ``.notdef`` box, "tofu"): some fonts list characters they only draw as tofu.

Layout is Pillow's basic layout (no shaping), so a character is drawn in its
isolated form and the result does not depend on whether libraqm is installed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from free_common.errors import FontUnreadable

__all__ = ["FaceRenderer", "RenderSpec", "binarise", "notdef_probe"]

# Codepoints no font should draw: an unassigned Greek-block slot, a private-use slot
# and a noncharacter. The first one a face does not list gives its tofu.
_PROBES = (0x0378, 0xE000, 0x10FFFD, 0xFFFF)
_FONT_CACHE = 128


@dataclass(frozen=True)
class RenderSpec:
    """How glyphs are drawn; part of the build configuration and the manifest."""

    canvas_px: int = 32
    fit_px: int = 26
    font_px: int = 64
    ink_threshold: int = 128
    """Grey level at or above which a pixel counts as ink (binarised images)."""
    min_ink_px: int = 8


def binarise(images: npt.NDArray[np.uint8], threshold: int) -> npt.NDArray[np.bool_]:
    """Return ink masks of (…, H, W) uint8 images: True where grey >= `threshold`."""
    return images >= threshold


def notdef_probe(covers: Callable[[int], bool]) -> int:
    """Return the first probe codepoint a face does not list (`covers` asks its map)."""
    return next((cp for cp in _PROBES if not covers(cp)), _PROBES[-1])


class FaceRenderer:
    """Draws characters of many faces, keeping recently used faces open.

    One instance lives in each worker process; faces are opened lazily.
    """

    def __init__(self, spec: RenderSpec) -> None:
        self.spec = spec
        self._fonts: OrderedDict[tuple[str, int], ImageFont.FreeTypeFont] = OrderedDict()
        self._tofu: dict[tuple[str, int], bytes | None] = {}

    def _font(self, path: str, index: int) -> ImageFont.FreeTypeFont:
        key = (path, index)
        font = self._fonts.get(key)
        if font is not None:
            self._fonts.move_to_end(key)
            return font
        try:
            font = ImageFont.truetype(
                path, self.spec.font_px, index=index, layout_engine=ImageFont.Layout.BASIC
            )
        except (OSError, ValueError) as exc:
            raise FontUnreadable(f"cannot open font {path} (face {index}): {exc}") from exc
        self._fonts[key] = font
        if len(self._fonts) > _FONT_CACHE:
            self._fonts.popitem(last=False)
        return font

    def _ink(self, font: ImageFont.FreeTypeFont, char: str) -> Image.Image | None:
        """Draw `char` and crop it to its ink; None when nothing is drawn."""
        try:
            x0, y0, x1, y1 = font.getbbox(char)
        except (OSError, ValueError):
            return None
        width, height = int(x1 - x0) + 2, int(y1 - y0) + 2
        if width <= 2 or height <= 2:
            return None
        page = Image.new("L", (width, height))
        ImageDraw.Draw(page).text((1 - x0, 1 - y0), char, font=font, fill=255)
        box = page.getbbox()
        return None if box is None else page.crop(box)

    def _tofu_bytes(self, path: str, index: int, probe: int) -> bytes | None:
        key = (path, index)
        if key not in self._tofu:
            ink = self._ink(self._font(path, index), chr(probe))
            self._tofu[key] = None if ink is None else _fingerprint(ink)
        return self._tofu[key]

    def render(
        self, path: str, index: int, codepoint: int, probe: int
    ) -> npt.NDArray[np.uint8] | None:
        """Return the (canvas, canvas) uint8 render of one character, or None if refused.

        Parameters
        ----------
        path, index
            The font file and face index.
        codepoint
            The character to draw.
        probe
            A codepoint the face does not have; its drawing is the face's tofu.

        Raises
        ------
        FontUnreadable
            When the face cannot be opened.
        """
        spec = self.spec
        font = self._font(path, index)
        ink = self._ink(font, chr(codepoint))
        if ink is None:
            return None
        tofu = self._tofu_bytes(path, index, probe)
        if tofu is not None and _same_ink(ink, tofu):
            return None
        width, height = ink.size
        scale = spec.fit_px / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        glyph = ink.resize(size, Image.Resampling.LANCZOS)
        canvas = Image.new("L", (spec.canvas_px, spec.canvas_px))
        canvas.paste(glyph, ((spec.canvas_px - size[0]) // 2, (spec.canvas_px - size[1]) // 2))
        image = np.asarray(canvas, dtype=np.uint8)
        if int(binarise(image, spec.ink_threshold).sum()) < spec.min_ink_px:
            return None
        return image


def _same_ink(ink: Image.Image, fingerprint: bytes) -> bool:
    # Sizes first: serialising every render only to compare it would cost a tenth of
    # the build.
    width, height = ink.size
    header = width.to_bytes(4, "little") + height.to_bytes(4, "little")
    return fingerprint.startswith(header) and fingerprint == _fingerprint(ink)


def _fingerprint(ink: Image.Image) -> bytes:
    width, height = ink.size
    return width.to_bytes(4, "little") + height.to_bytes(4, "little") + ink.tobytes()
