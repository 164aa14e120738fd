"""Distances between two sets of images: pixels, a feature space, and SSIM.

Every function takes ``a`` (A, C, S, S) and ``b`` (B, C, S, S) images in [0, 1] and
returns an (A, B) matrix of distances, smaller meaning closer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["feature_distances", "pixel_distances", "ssim_distances"]

_SSIM_WINDOW = 7
_SSIM_SIGMA = 1.5
_C1, _C2 = 0.01**2, 0.03**2
"""SSIM's stabilizers for a dynamic range of 1 (Wang et al., IEEE TIP 2004)."""


def pixel_distances(a: Tensor, b: Tensor) -> Tensor:
    """Root-mean-square pixel difference of every pair."""
    flat_a, flat_b = a.flatten(1).double(), b.flatten(1).double()
    squared = torch.cdist(flat_a, flat_b).pow(2) / flat_a.shape[1]
    return squared.clamp_min(0).sqrt().float()


def feature_distances(a: Tensor, b: Tensor) -> Tensor:
    """Cosine distance (1 - cosine similarity) of every pair of (A, D) and (B, D) features."""
    return 1.0 - F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T


def _window(channels: int, device: torch.device) -> Tensor:
    steps = torch.arange(_SSIM_WINDOW, dtype=torch.float32, device=device) - _SSIM_WINDOW // 2
    gauss = torch.exp(-(steps**2) / (2 * _SSIM_SIGMA**2))
    gauss = gauss / gauss.sum()
    return (gauss[:, None] * gauss[None, :]).expand(channels, 1, _SSIM_WINDOW, _SSIM_WINDOW)


def ssim_distances(a: Tensor, b: Tensor, chunk: int = 4096) -> Tensor:
    """1 - SSIM (Gaussian 7x7 window) of every pair, computed `chunk` pairs at a time."""
    channels = a.shape[1]
    window = _window(channels, a.device)
    pairs_a = torch.arange(len(a)).repeat_interleave(len(b))
    pairs_b = torch.arange(len(b)).repeat(len(a))
    out = torch.empty(len(a) * len(b))
    for start in range(0, len(pairs_a), chunk):
        x = a[pairs_a[start : start + chunk]].float()
        y = b[pairs_b[start : start + chunk]].float()

        def blur(t: Tensor) -> Tensor:
            return F.conv2d(t, window, groups=channels)

        mx, my = blur(x), blur(y)
        vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        ssim = ((2 * mx * my + _C1) * (2 * cov + _C2)) / ((mx**2 + my**2 + _C1) * (vx + vy + _C2))
        out[start : start + chunk] = ssim.flatten(1).mean(1)
    return (1.0 - out).view(len(a), len(b))
