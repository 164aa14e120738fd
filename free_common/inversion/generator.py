"""The image generator of FREE (the CMI / Fast-Datafree design of the official `tools.Generator`).

z (B, nz) -> Linear -> (B, 2w, S/4, S/4) -> BN, x2 -> conv, BN, LReLU, x2 -> conv, BN, LReLU
-> conv -> sigmoid -> (B, C, S, S) in [0, 1]. Its batch norms always run on batch
statistics (it is only ever used in training mode, as in the official code).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from free_common.inversion.config import GeneratorConfig

__all__ = ["Generator", "build_generator", "reset_generator"]


class Generator(nn.Module):
    """Map latent codes to images in [0, 1].

    Parameters
    ----------
    config
        Latent size, width, output side and channels.
    """

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        w, side = config.width, config.image_size // 4
        self.init_side = side
        self.l1 = nn.Linear(config.latent_dim, 2 * w * side * side)
        self.blocks = nn.Sequential(
            nn.BatchNorm2d(2 * w),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * w, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.LeakyReLU(0.2),
            nn.Conv2d(w, config.channels, 3, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: Tensor) -> Tensor:
        """Generate one image per latent code: (B, nz) -> (B, C, S, S)."""
        out = self.l1(z)  # (B, 2w * S/4 * S/4)
        out = out.view(z.shape[0], -1, self.init_side, self.init_side)  # (B, 2w, S/4, S/4)
        images: Tensor = self.blocks(out)  # (B, C, S, S)
        return images


def build_generator(config: GeneratorConfig, seed: int, device: torch.device) -> Generator:
    """Build a generator with PyTorch's default initialization, drawn from `seed`.

    The global random state is left as it was, so building a generator does not
    shift the draws of anything else.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = Generator(config)
    # Channels-last: on CPU, mkldnn then convolves without reordering every activation, a
    # quarter of an adaptation step (benchmarks/results/memory-format.md). Torch's stub of
    # Module.to leaves out the memory_format it takes.
    generator.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    return generator.train()


def reset_generator(generator: Generator, rng: torch.Generator) -> None:
    """Re-initialize in place as BiDf-MKD's `reset_model` does before each scratch inversion.

    Linear and conv weights ~ N(0, 0.02), batch-norm scales ~ N(1, 0.02), biases 0.
    Draws come from `rng` (a CPU generator), so the result does not depend on the device.
    """
    with torch.no_grad():
        for module in generator.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                module.weight.copy_(_normal(module.weight, 0.0, 0.02, rng))
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(_normal(module.weight, 1.0, 0.02, rng))
                module.bias.zero_()
                module.reset_running_stats()


def _normal(like: Tensor, mean: float, std: float, rng: torch.Generator) -> Tensor:
    draw = torch.randn(like.shape, generator=rng, dtype=like.dtype) * std + mean
    return draw.to(like.device)
