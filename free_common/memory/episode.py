"""One few-shot task as tensors: what the memory bank hands to MAML replay."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["Episode"]


@dataclass(frozen=True)
class Episode:
    """An N-way K-shot Q-query task.

    Attributes
    ----------
    support_x
        (N*K, C, H, W) images in [0, 1].
    support_y
        (N*K,) labels in 0..N-1.
    query_x
        (N*Q, C, H, W) images in [0, 1].
    query_y
        (N*Q,) labels in 0..N-1.
    classes
        The pseudo-class behind each label, label 0 first.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    classes: tuple[str, ...]
