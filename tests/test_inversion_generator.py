"""The generator: shapes, range, seeded construction, and the scratch reset."""

from __future__ import annotations

import pytest
import torch

from free_common.errors import ConfigError
from free_common.inversion.config import GeneratorConfig
from free_common.inversion.generator import build_generator, reset_generator

CPU = torch.device("cpu")


@pytest.mark.parametrize(("side", "channels"), [(8, 1), (16, 3), (32, 3)])
def test_generator_maps_latents_to_images_in_unit_range(side: int, channels: int) -> None:
    config = GeneratorConfig(latent_dim=16, width=8, image_size=side, channels=channels)
    generator = build_generator(config, seed=1, device=CPU)
    images = generator(torch.randn(4, 16))
    assert images.shape == (4, channels, side, side)
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_images_come_out_channels_last() -> None:
    # Teachers convert to channels-last convolutions: the two layouts meet without a reorder.
    config = GeneratorConfig(latent_dim=16, width=8, image_size=8, channels=3)
    images = build_generator(config, seed=1, device=CPU)(torch.randn(4, 16))
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert not images.is_contiguous()


def test_paper_generator_shape() -> None:
    config = GeneratorConfig()  # nz 256, ngf 64, 32 x 32 RGB
    generator = build_generator(config, seed=0, device=CPU)
    assert generator.l1.in_features == 256
    assert generator.l1.out_features == 128 * 8 * 8
    assert generator(torch.randn(2, 256)).shape == (2, 3, 32, 32)


def test_build_is_seeded_and_leaves_global_state_alone() -> None:
    config = GeneratorConfig(latent_dim=8, width=4, image_size=8)
    before = torch.random.get_rng_state()
    a = build_generator(config, seed=3, device=CPU).state_dict()
    b = build_generator(config, seed=3, device=CPU).state_dict()
    c = build_generator(config, seed=4, device=CPU).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["l1.weight"], c["l1.weight"])


def test_reset_draws_from_the_given_generator() -> None:
    config = GeneratorConfig(latent_dim=8, width=4, image_size=8)
    first = build_generator(config, seed=0, device=CPU)
    second = build_generator(config, seed=9, device=CPU)
    reset_generator(first, torch.Generator().manual_seed(5))
    reset_generator(second, torch.Generator().manual_seed(5))
    for (name, p), q in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    weight = first.l1.weight.detach()
    assert abs(float(weight.std()) - 0.02) < 0.005
    assert float(first.l1.bias.detach().abs().max()) == 0.0


def test_image_size_must_divide_by_four() -> None:
    with pytest.raises(ConfigError):
        GeneratorConfig(image_size=30)
