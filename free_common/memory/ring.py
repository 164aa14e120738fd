"""A bounded first-in-first-out store of same-shaped images, in memory or in one .npy file.

A ring holds up to `capacity` images; adding past that overwrites the oldest. On disk
the ring is a preallocated ``.npy`` array opened as a memory map (numpy's own format:
a short text header and raw values, never pickle), so a bank larger than RAM works.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

__all__ = ["Ring"]


class Ring:
    """FIFO ring over a (capacity, C, H, W) array.

    Parameters
    ----------
    array
        Backing store: an ndarray, or a memory-mapped .npy file.
    size
        Number of valid images already in it.
    head
        Slot the next image goes to.
    """

    def __init__(self, array: NDArray[np.floating], size: int = 0, head: int = 0) -> None:
        self.array = array
        self.size = size
        self.head = head

    @classmethod
    def in_memory(cls, capacity: int, shape: tuple[int, int, int], dtype: str) -> Ring:
        """Make an empty ring held in RAM."""
        return cls(np.zeros((capacity, *shape), dtype=dtype))

    @classmethod
    def create_file(
        cls, path: Path, capacity: int, shape: tuple[int, int, int], dtype: str
    ) -> Ring:
        """Make an empty ring backed by a new .npy file at `path`."""
        array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(capacity, *shape))
        return cls(array)

    @classmethod
    def open_file(cls, path: Path, size: int, head: int) -> Ring:
        """Reopen a ring file written by `create_file`."""
        array = np.load(path, mmap_mode="r+", allow_pickle=False)
        return cls(array, size, head)

    @property
    def capacity(self) -> int:
        """Most images the ring holds."""
        return int(self.array.shape[0])

    def append(self, images: NDArray[np.floating]) -> None:
        """Add (n, C, H, W) images, dropping the oldest beyond capacity."""
        kept = images[-self.capacity :]  # more than capacity at once: only the newest fit
        slots = (self.head + np.arange(len(kept))) % self.capacity
        self.array[slots] = kept
        self.head = int((self.head + len(kept)) % self.capacity)
        self.size = min(self.size + len(kept), self.capacity)
        if isinstance(self.array, np.memmap):
            self.array.flush()

    def take(self, positions: NDArray[np.int64]) -> NDArray[np.floating]:
        """Images at FIFO positions (0 = oldest kept): (len(positions), C, H, W)."""
        slots = (self.head - self.size + positions) % self.capacity
        return np.asarray(self.array[slots])

    def ordered(self) -> NDArray[np.floating]:
        """Every kept image, oldest first: (size, C, H, W)."""
        return self.take(np.arange(self.size))
