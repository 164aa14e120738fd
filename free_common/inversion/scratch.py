"""Scratch inversion, the baseline FIVE is measured against (BiDf-MKD's recipe).

Each teacher is inverted once by a freshly re-initialized generator and fresh latent
codes: Adam on both (lr 1e-3, betas (0.5, 0.999)) for 200 steps of cross-entropy to
the target labels; the batch of the lowest-loss step is kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from free_common.inversion.augment import augment
from free_common.inversion.config import GeneratorConfig, ScratchConfig
from free_common.inversion.five import Recovery, target_labels
from free_common.inversion.generator import build_generator, reset_generator
from free_common.inversion.losses import image_prior_loss, inversion_loss
from free_common.inversion.teacher import AdaptedTeacher, teacher_accuracy
from free_common.inversion.timing import wall_clock

__all__ = ["scratch_invert"]


def scratch_invert(
    teacher: AdaptedTeacher,
    generator_config: GeneratorConfig,
    config: ScratchConfig,
    rng: torch.Generator,
    device: torch.device,
) -> Recovery:
    """Recover a batch of images from one teacher, starting from nothing.

    Parameters
    ----------
    teacher
        The adapted teacher, on `device`.
    generator_config
        Shape of the generator (the same as FIVE's, so the images are comparable).
    config
        Steps, learning rates, images per class, augmentation.
    rng
        CPU generator for the initialization, latent codes and augmentation.
    device
        Where to run.

    Returns
    -------
    Recovery
        The lowest-loss batch; `seconds` covers the initialization and every step.
    """
    labels = target_labels(teacher.num_classes, config.images_per_class, device)  # (N,)
    latent = torch.randn(labels.numel(), generator_config.latent_dim, generator=rng)
    with wall_clock(device) as watch:
        # The seed only fixes the default init, which the reset overwrites from rng.
        generator = build_generator(generator_config, seed=0, device=device)
        reset_generator(generator, rng)
        z = latent.to(device).requires_grad_()  # (N, nz)
        groups: list[dict[str, Any]] = [
            {"params": generator.parameters()},
            {"params": [z], "lr": config.latent_lr},
        ]
        optimizer = torch.optim.Adam(
            groups,
            lr=config.generator_lr,
            betas=config.betas,
        )
        losses: list[float] = []
        best: Tensor | None = None
        best_loss = float("inf")
        for _ in range(config.steps):
            images = generator(z)  # (N, C_s, S, S)
            logits = teacher(augment(images, config.augment, rng))  # (N, K)
            loss = inversion_loss(logits, labels, 1.0, 0.0, None, "log")
            if config.tv_weight or config.l2_weight:
                loss = loss + image_prior_loss(images, config.tv_weight, config.l2_weight)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            optimizer.step()
            losses.append(float(loss.detach()))
            if best is None or losses[-1] < best_loss:
                best, best_loss = images.detach(), losses[-1]
    assert best is not None  # ScratchConfig guarantees steps >= 1
    accuracy = teacher_accuracy(teacher, best, labels)
    return Recovery(teacher.teacher_id, best, labels, tuple(losses), watch.seconds, accuracy)
