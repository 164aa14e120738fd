"""Differentiable augmentation of generated images: zero-padded random crop and flip.

The official code applies torchvision's RandomCrop / RandomHorizontalFlip to a whole
batch tensor, which draws ONE offset and ONE coin per call for every image in it; this
module does the same. Draws come from a CPU `torch.Generator`, so a seed gives the same
augmentation on CUDA and CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from free_common.inversion.config import AugmentConfig

__all__ = ["augment"]


def augment(images: Tensor, config: AugmentConfig, rng: torch.Generator) -> Tensor:
    """Crop and flip a batch, keeping gradients to `images`.

    Parameters
    ----------
    images
        (B, C, H, W) images in [0, 1].
    config
        Padding of the crop (0 disables it) and whether to flip.
    rng
        CPU generator the offsets and the coin are drawn from.

    Returns
    -------
    Tensor
        (B, C, H, W): the same batch, shifted by up to `crop_padding` pixels (the
        uncovered border is 0) and mirrored left-right with probability 1/2.
    """
    out = images
    pad = config.crop_padding
    if pad > 0:
        height, width = images.shape[-2:]
        top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=rng))
        padded = F.pad(images, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p)
        out = padded[..., top : top + height, left : left + width]
    if config.flip and bool(torch.rand((), generator=rng) < 0.5):
        out = out.flip(-1)
    return out
