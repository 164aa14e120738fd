"""Scratch inversion (the BiDf-MKD recipe): a fresh generator per teacher, lowest loss kept."""

from __future__ import annotations

import torch
from torch import nn

from free_common.inversion.config import AugmentConfig, GeneratorConfig, ScratchConfig
from free_common.inversion.scratch import scratch_invert
from free_common.inversion.teacher import AdaptedTeacher, teacher_accuracy
from free_common.types import ChannelOrder, TaskMetadata

CPU = torch.device("cpu")
GENERATOR = GeneratorConfig(latent_dim=16, width=8, image_size=8, channels=1)
# A 4-pixel shift of an 8-pixel image defeats a template-matching teacher.
NO_AUGMENT = AugmentConfig(crop_padding=0, flip=False)


def _teacher() -> AdaptedTeacher:
    rng = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 5)
    with torch.no_grad():
        linear.weight.copy_((torch.rand(5, 64, generator=rng) * 2 - 1) * 0.5)
        linear.bias.zero_()
    task = TaskMetadata(5, (1, 8, 8), ChannelOrder.GRAY, (0.5,), (0.5,))
    return AdaptedTeacher(nn.Sequential(nn.Flatten(), linear), task, "teacher")


def test_scratch_inversion_recovers_what_the_teacher_recognizes() -> None:
    teacher = _teacher()
    config = ScratchConfig(steps=30, images_per_class=4, augment=NO_AUGMENT)
    recovery = scratch_invert(teacher, GENERATOR, config, torch.Generator().manual_seed(0), CPU)
    assert recovery.images.shape == (20, 1, 8, 8)
    assert len(recovery.losses) == 30
    assert recovery.teacher_accuracy >= 0.9  # chance is 0.2
    assert recovery.teacher_accuracy == teacher_accuracy(teacher, recovery.images, recovery.labels)


def test_scratch_inversion_keeps_the_lowest_loss_batch_and_is_seeded() -> None:
    config = ScratchConfig(steps=12, images_per_class=2)

    def run() -> torch.Tensor:
        rng = torch.Generator().manual_seed(1)
        return scratch_invert(_teacher(), GENERATOR, config, rng, CPU).images

    assert torch.equal(run(), run())
    # Re-run the same draws step by step: the kept batch is the argmin step's batch.
    recovery = scratch_invert(_teacher(), GENERATOR, config, torch.Generator().manual_seed(1), CPU)
    best = min(range(config.steps), key=lambda i: recovery.losses[i])
    short = ScratchConfig(steps=best + 1, images_per_class=2)
    prefix = scratch_invert(_teacher(), GENERATOR, short, torch.Generator().manual_seed(1), CPU)
    assert torch.equal(prefix.images, recovery.images)
