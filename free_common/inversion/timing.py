"""Wall-clock timing of inversion that waits for queued CUDA work, so GPU times are true."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["Stopwatch", "wall_clock"]


@dataclass
class Stopwatch:
    """Seconds a `wall_clock` block took; 0.0 until the block ends."""

    seconds: float = 0.0


@contextmanager
def wall_clock(device: torch.device) -> Iterator[Stopwatch]:
    """Time the block: ``with wall_clock(device) as watch: ...`` then ``watch.seconds``."""
    watch = Stopwatch()
    _sync(device)
    start = time.perf_counter()
    yield watch
    _sync(device)
    watch.seconds = time.perf_counter() - start


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without a sync the clock stops before they finish.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
