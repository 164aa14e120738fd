"""What meta-learning and evaluation read from a few-shot task, whoever made it.

Any object with these four tensors will do: the memory bank's `Episode`, the data
package's episode sampler, or a test's hand-made task.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

__all__ = ["EpisodeLike", "as_inputs"]


class EpisodeLike(Protocol):
    """An N-way K-shot Q-query task: support (N*K) and query (N*Q) images and labels."""

    @property
    def support_x(self) -> Tensor:
        """(N*K, C, H, W) images: float in [0, 1], or uint8 in [0, 255]."""
        ...

    @property
    def support_y(self) -> Tensor:
        """(N*K,) labels in 0..N-1."""
        ...

    @property
    def query_x(self) -> Tensor:
        """(N*Q, C, H, W) images, as `support_x`."""
        ...

    @property
    def query_y(self) -> Tensor:
        """(N*Q,) labels in 0..N-1."""
        ...


def as_inputs(images: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Images as the meta-learner reads them: floats in [0, 1] on `device`."""
    if images.dtype == torch.uint8:
        return images.to(device=device, dtype=dtype) / 255.0
    return images.to(device=device, dtype=dtype)
