"""DeepInversion's image priors: exact values on tiny images, gradients, and the wiring."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from free_common.errors import ConfigError
from free_common.inversion.config import AugmentConfig, FiveConfig, GeneratorConfig, ScratchConfig
from free_common.inversion.five import MetaGenerator
from free_common.inversion.generator import build_generator
from free_common.inversion.losses import image_prior_loss, l2_prior, total_variation
from free_common.inversion.scratch import scratch_invert
from free_common.inversion.teacher import AdaptedTeacher
from free_common.types import ChannelOrder, TaskMetadata

CPU = torch.device("cpu")
SIDE = 8
GENERATOR = GeneratorConfig(latent_dim=16, width=8, image_size=SIDE, channels=1)
NO_AUGMENT = AugmentConfig(crop_padding=0, flip=False)


def _checkerboard(side: int) -> torch.Tensor:
    """(1, 1, side, side) of 0 and 1, no two neighbours alike."""
    index = torch.arange(side)
    return ((index[:, None] + index[None, :]) % 2).float().view(1, 1, side, side)


def _teacher() -> AdaptedTeacher:
    rng = torch.Generator().manual_seed(0)
    linear = nn.Linear(SIDE * SIDE, 5)
    with torch.no_grad():
        linear.weight.copy_((torch.rand(5, SIDE * SIDE, generator=rng) * 2 - 1) * 0.5)
        linear.bias.zero_()
    task = TaskMetadata(5, (1, SIDE, SIDE), ChannelOrder.GRAY, (0.5,), (0.5,))
    return AdaptedTeacher(nn.Sequential(nn.Flatten(), linear), task, "teacher")


def test_total_variation_of_known_images() -> None:
    assert float(total_variation(torch.full((2, 3, 5, 5), 0.7))) == 0.0
    # Every neighbour differs by 1, across and down: 1 + 1.
    assert float(total_variation(_checkerboard(6))) == 2.0
    # Alternating rows: nothing changes across, everything down.
    rows = (torch.arange(4) % 2).float().view(1, 1, 4, 1).expand(2, 1, 4, 7)
    assert float(total_variation(rows)) == 1.0
    # A ramp of 0.1 per column: 0.01 across, 0 down, whatever the batch and the size.
    ramp = 0.1 * torch.arange(6.0).expand(3, 2, 5, 6)
    assert float(total_variation(ramp)) == pytest.approx(0.01, rel=1e-5)
    # One lit pixel in the middle of a 3 x 3 black image: 2 of 6 differences each way.
    dot = torch.zeros(1, 1, 3, 3)
    dot[..., 1, 1] = 1.0
    assert float(total_variation(dot)) == pytest.approx(2 / 6 + 2 / 6)


def test_l2_prior_is_the_mean_squared_pixel() -> None:
    assert float(l2_prior(torch.zeros(2, 3, 4, 4))) == 0.0
    assert float(l2_prior(torch.full((2, 3, 4, 4), 0.5))) == 0.25
    assert float(l2_prior(_checkerboard(4))) == 0.5


def test_descending_the_priors_smooths_and_darkens() -> None:
    images = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    for prior in (total_variation, l2_prior):
        x = images.clone().requires_grad_()
        before = prior(x)
        before.backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert float(prior(x.detach() - 0.5 * x.grad)) < float(before.detach())
    # A constant image is a minimum of the total variation: no gradient at all.
    flat = torch.full((1, 1, 4, 4), 0.3, requires_grad=True)
    total_variation(flat).backward()
    assert flat.grad is not None and float(flat.grad.abs().max()) == 0.0


def test_image_prior_loss_weighs_each_term_and_is_zero_when_off() -> None:
    images = torch.rand(3, 1, 5, 5, requires_grad=True)
    off = image_prior_loss(images, 0.0, 0.0)
    assert float(off) == 0.0 and not off.requires_grad
    both = image_prior_loss(images, 2.0, 3.0)
    expected = 2.0 * total_variation(images) + 3.0 * l2_prior(images)
    assert torch.allclose(both, expected)
    assert both.requires_grad


@pytest.mark.parametrize("field", ["tv_weight", "l2_weight"])
@pytest.mark.parametrize("config", [FiveConfig(), ScratchConfig()])
def test_prior_weights_must_be_non_negative(field: str, config: FiveConfig | ScratchConfig) -> None:
    assert getattr(config, field) == 0.0  # off unless asked for
    for bad in (-0.1, math.nan):
        with pytest.raises(ConfigError, match=field):
            dataclasses.replace(config, **{field: bad})


def _five_losses(config: FiveConfig) -> tuple[tuple[float, ...], torch.Tensor]:
    meta = MetaGenerator(build_generator(GENERATOR, 0, CPU), config)
    recovery, _ = meta.adapt(_teacher(), torch.Generator().manual_seed(3))
    return recovery.losses, recovery.images


def test_five_adds_the_weighted_priors_of_the_drawn_images() -> None:
    base = FiveConfig(images_per_class=4, augment=NO_AUGMENT)
    plain, _ = _five_losses(base)
    assert _five_losses(dataclasses.replace(base, tv_weight=0.0, l2_weight=0.0))[0] == plain
    # The first step's images are the meta-generator's own, the same in both runs.
    rng = torch.Generator().manual_seed(3)
    latent = torch.randn(20, GENERATOR.latent_dim, generator=rng)
    with torch.no_grad():
        first = build_generator(GENERATOR, 0, CPU)(latent)
    weighted, _ = _five_losses(dataclasses.replace(base, tv_weight=5.0, l2_weight=2.0))
    prior = 5.0 * total_variation(first) + 2.0 * l2_prior(first)
    assert weighted[0] - plain[0] == pytest.approx(float(prior), rel=1e-4)


def test_five_with_priors_recovers_smoother_darker_images() -> None:
    base = FiveConfig(images_per_class=4, augment=NO_AUGMENT, generator_lr=1e-2)
    _, plain = _five_losses(base)
    _, smooth = _five_losses(dataclasses.replace(base, tv_weight=50.0))
    _, dark = _five_losses(dataclasses.replace(base, l2_weight=50.0))
    assert float(total_variation(smooth)) < float(total_variation(plain))
    assert float(l2_prior(dark)) < float(l2_prior(plain))


def test_scratch_inversion_applies_the_priors() -> None:
    base = ScratchConfig(steps=10, images_per_class=2, augment=NO_AUGMENT)

    def run(config: ScratchConfig) -> tuple[tuple[float, ...], torch.Tensor]:
        recovery = scratch_invert(
            _teacher(), GENERATOR, config, torch.Generator().manual_seed(1), CPU
        )
        return recovery.losses, recovery.images

    plain_losses, plain = run(base)
    assert run(dataclasses.replace(base, tv_weight=0.0, l2_weight=0.0))[0] == plain_losses
    dark_losses, dark = run(dataclasses.replace(base, l2_weight=50.0))
    assert dark_losses[0] > plain_losses[0]  # the prior is part of the objective
    assert float(l2_prior(dark)) < float(l2_prior(plain))


def test_a_teacher_without_batch_norm_gets_total_variation_in_the_bn_priors_place() -> None:
    # The linear teacher has no batch norm: what an exporter that folds it leaves.
    base = FiveConfig(images_per_class=4, augment=NO_AUGMENT)
    plain, _ = _five_losses(base)
    rng = torch.Generator().manual_seed(3)
    latent = torch.randn(20, GENERATOR.latent_dim, generator=rng)
    with torch.no_grad():
        first = build_generator(GENERATOR, 0, CPU)(latent)
    fallback, _ = _five_losses(dataclasses.replace(base, bn_weight=0.5, tv_weight_without_bn=3.0))
    assert fallback[0] - plain[0] == pytest.approx(float(3.0 * total_variation(first)), rel=1e-4)
    # Without the batch-norm prior there is nothing to replace; at 0 nothing takes its place.
    assert _five_losses(dataclasses.replace(base, tv_weight_without_bn=3.0))[0] == plain
    off = dataclasses.replace(base, bn_weight=0.5, tv_weight_without_bn=0.0)
    assert _five_losses(off)[0] == plain


def test_a_teacher_with_batch_norm_keeps_its_prior_and_gets_no_total_variation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5))
    model(torch.rand(2, 1, SIDE, SIDE))  # materialize the lazy layer
    task = TaskMetadata(5, (1, SIDE, SIDE), ChannelOrder.GRAY, (0.5,), (0.5,))
    teacher = AdaptedTeacher(model, task, "with-bn")

    def losses(config: FiveConfig) -> tuple[float, ...]:
        meta = MetaGenerator(build_generator(GENERATOR, 0, CPU), config)
        return meta.adapt(teacher, torch.Generator().manual_seed(3))[0].losses

    base = FiveConfig(images_per_class=4, augment=NO_AUGMENT, bn_weight=0.5)
    assert losses(dataclasses.replace(base, tv_weight_without_bn=3.0)) == losses(
        dataclasses.replace(base, tv_weight_without_bn=0.0)
    )
    assert losses(base) != losses(dataclasses.replace(base, bn_weight=0.0))
