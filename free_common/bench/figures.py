"""Pictures of a benchmark run, drawn with Pillow alone.

- `recovery_sheet`: one teacher's recovered images per class (FIVE with cross-entropy
  alone, FIVE with the adversarial term, scratch inversion) beside real images of the
  same classes;
- `line_chart`: accuracy over training steps, one line per method.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

__all__ = ["line_chart", "recovery_sheet"]

_BACKGROUND = (255, 255, 255)
_INK = (30, 30, 30)
_GRID = (225, 225, 225)
_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))
_FONT = ImageFont.load_default()


def _ascii(text: str) -> str:
    # The default font draws ASCII only; other scripts would come out as boxes.
    return "".join(ch for ch in text if 32 <= ord(ch) < 127).strip()


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    span = high - low
    if span <= 0:
        return [low]
    raw = span / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _tile(image: Tensor, scale: int) -> Image.Image:
    """(C, H, W) in [0, 1] -> an RGB tile `scale` times larger."""
    array = (image.detach().to("cpu").float().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    if array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    tile = Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), "RGB")
    return tile.resize((tile.width * scale, tile.height * scale), Image.Resampling.NEAREST)


def recovery_sheet(
    title: str,
    class_names: Sequence[str],
    groups: Mapping[str, Sequence[Tensor]],
    *,
    scale: int = 2,
) -> Image.Image:
    """Draw one teacher's classes as rows and image groups as column blocks.

    Parameters
    ----------
    title
        Line at the top (the teacher's name).
    class_names
        One label per row.
    groups
        Block title -> one (n, C, H, W) tensor per class (n may differ; 0 leaves the
        cells empty), e.g. {"FIVE (CE)": ..., "scratch": ..., "real": ...}.
    scale
        Pixel zoom of every image.
    """
    per_group = {name: max((len(row) for row in rows), default=0) for name, rows in groups.items()}
    sample = next((row[0] for rows in groups.values() for row in rows if len(row)), None)
    side = (sample.shape[-1] if sample is not None else 32) * scale
    gap, label_w, head_h = 4, 110, 34
    block_w = {name: count * (side + 2) for name, count in per_group.items()}
    width = label_w + sum(w + 3 * gap for w in block_w.values()) + gap
    height = head_h + len(class_names) * (side + 2) + gap
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 2), _ascii(title), fill=_INK, font=_FONT)
    x = label_w
    for name, rows in groups.items():
        draw.text((x, 18), _ascii(name), fill=_INK, font=_FONT)
        for r, row in enumerate(rows[: len(class_names)]):
            y = head_h + r * (side + 2)
            for c, image in enumerate(row):
                sheet.paste(_tile(image, scale), (x + c * (side + 2), y))
        x += block_w[name] + 3 * gap
    for r, name in enumerate(class_names):
        draw.text(
            (gap, head_h + r * (side + 2) + side // 2 - 6), _ascii(name), fill=_INK, font=_FONT
        )
    return sheet


def line_chart(
    title: str,
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    x_label: str = "step",
    y_label: str = "accuracy",
    size: tuple[int, int] = (720, 420),
    bounds: tuple[float, float] | None = (0.0, 1.0),
) -> Image.Image:
    """Draw (x, y) series as coloured lines with markers, axes, grid and a legend.

    Parameters
    ----------
    title
        Line at the top.
    series
        Name -> points in x order; empty series are listed in the legend only.
    x_label, y_label
        Axis titles.
    size
        Width and height in pixels.
    bounds
        Limits the y axis never passes (accuracies stay in [0, 1]); None for none.
    """
    width, height = size
    left, right, top, bottom = 64, 20, 36, 48
    chart = Image.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(chart)
    points = [p for line in series.values() for p in line]
    xs = [p[0] for p in points] or [0.0, 1.0]
    ys = [p[1] for p in points] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    pad = max((max(ys) - min(ys)) * 0.1, 0.02)
    y0, y1 = min(ys) - pad, max(ys) + pad
    if bounds is not None:
        y0, y1 = max(y0, bounds[0]), min(y1, bounds[1])

    def at(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x0) / (x1 - x0) * (width - left - right)
        py = height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
        return px, py

    for y in _ticks(y0, y1):
        _, py = at(x0, y)
        draw.line([(left, py), (width - right, py)], fill=_GRID)
        draw.text((6, py - 6), f"{y:.2f}", fill=_INK, font=_FONT)
    for x in _ticks(x0, x1):
        px, _ = at(x, y0)
        draw.line([(px, top), (px, height - bottom)], fill=_GRID)
        draw.text((px - 10, height - bottom + 6), f"{x:g}", fill=_INK, font=_FONT)
    draw.rectangle([left, top, width - right, height - bottom], outline=_INK)
    draw.text((left, 10), _ascii(title), fill=_INK, font=_FONT)
    draw.text(((width - len(x_label) * 6) // 2, height - 20), x_label, fill=_INK, font=_FONT)
    draw.text((6, top - 18), y_label, fill=_INK, font=_FONT)
    for index, (name, line) in enumerate(series.items()):
        colour = _COLOURS[index % len(_COLOURS)]
        pixels = [at(x, y) for x, y in line]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        ly = top + 8 + index * 16
        draw.line(
            [(width - right - 150, ly + 6), (width - right - 128, ly + 6)], fill=colour, width=3
        )
        draw.text((width - right - 122, ly), _ascii(name), fill=_INK, font=_FONT)
    return chart
