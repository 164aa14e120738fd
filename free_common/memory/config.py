"""Typed settings of the memory bank, with the official FREE code's bound as default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from free_common.errors import ConfigError

__all__ = ["MemoryConfig", "StoredDtype"]

StoredDtype = Literal["float16", "float32"]


@dataclass(frozen=True)
class MemoryConfig:
    """How many images each pseudo-class keeps, how they are stored, how classes are named."""

    # The official ImagePool2 keeps max_batch_per_class = 20 batches of 20 images: 400.
    capacity_per_class: int = 400
    # float16 keeps ~3 significant digits of a [0, 1] pixel: finer than the official PNGs.
    dtype: StoredDtype = "float16"
    # When owners declare class names, equal names are one pseudo-class across teachers.
    merge_by_class_name: bool = True
    # Pseudo-classes kept at most; the oldest is dropped for a new one. The official code
    # never drops one, but it sees a few dozen teachers: over a pool of thousands the bank
    # (and every checkpoint, which holds it) would grow with the pool.
    max_classes: int = 256

    def __post_init__(self) -> None:
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"dtype must be float16 or float32, got {self.dtype!r:.20}")
        if self.capacity_per_class < 1:
            raise ConfigError(
                f"capacity_per_class must be at least 1, got {self.capacity_per_class}"
            )
        if self.max_classes < 1:
            raise ConfigError(f"max_classes must be at least 1, got {self.max_classes}")
