"""The recovered images a checkpoint holds, per teacher, and image grids of them.

The engine keeps no pictures of its own: the recovered images live in the memory bank,
which every checkpoint stores (`free_common.engine.state`: one tensor per pseudo-class,
keyed ``<teacher id>:<class index>`` or ``name:<declared class name>``). `read_recovered`
takes the first few images of each pseudo-class straight from the checkpoint's tensor
file, without loading the rest of it, so the TensorBoard logger and the console can
draw them while a round runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from free_common.engine.checkpoint import CHECKPOINT_FILE

__all__ = ["RecoveredImages", "image_grid", "read_recovered"]


@dataclass(frozen=True)
class RecoveredImages:
    """Sample images of the memory bank at one checkpoint.

    Attributes
    ----------
    round, step
        The engine round and step the checkpoint was taken at.
    by_teacher
        Teacher id -> its pseudo-classes, each (class key, images (n, C, H, W) in [0, 1]).
    """

    round: int
    step: int
    by_teacher: dict[str, list[tuple[str, Tensor]]]


def read_recovered(directory: Path, per_class: int = 8) -> RecoveredImages | None:
    """Return the first `per_class` images of every pseudo-class in `directory`'s checkpoint.

    Returns None when there is no checkpoint, or when it was replaced while being read
    (a running round checkpointed meanwhile: ask again).
    """
    try:
        record = json.loads((directory / CHECKPOINT_FILE).read_text())
        name = str(record["tensor_file"])
        if "/" in name:
            return None
        by_teacher: dict[str, list[tuple[str, Tensor]]] = {}
        with safe_open(str(directory / name), framework="pt") as tensors:
            for entry in record.get("memory", []):
                images = tensors.get_slice(entry["tensor"])[:per_class].to(torch.float32)
                teacher = str(entry["sources"][0][0])
                by_teacher.setdefault(teacher, []).append((str(entry["key"]), images))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None
    return RecoveredImages(int(record["round"]), int(record["step"]), by_teacher)


def image_grid(rows: list[Tensor], pad: int = 2) -> Tensor:
    """One RGB image (3, H, W) in [0, 1]: each row's images side by side, rows stacked.

    Grey images are repeated to three channels; short rows are left white at the end.
    """
    if not rows:
        return torch.ones(3, 1, 1)
    channels, height, width = rows[0].shape[1:]
    columns = max(len(row) for row in rows)
    grid = torch.ones(3, pad + len(rows) * (height + pad), pad + columns * (width + pad))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            tile = image.clamp(0, 1).expand(3, height, width) if channels == 1 else image[:3]
            grid[:, top : top + height, left : left + width] = tile
    return grid
