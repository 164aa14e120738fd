"""Typed settings of inversion, with the official FREE code's values as defaults.

Every default is the value of WalkerWorldPeace/FREE (`main.py`, `scripts/mr.sh`,
`synthesis/task_recovery.py`) unless its comment says otherwise; smaller presets
are the engine's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from free_common.errors import ConfigError

__all__ = ["AugmentConfig", "FiveConfig", "GeneratorConfig", "KlForm", "ScratchConfig"]

KlForm = Literal["log", "prob"]
"""How KL terms read their inputs.

``"log"``: a true KL divergence on log-probabilities. ``"prob"``: the official code's
``F.kl_div(softmax(a), softmax(b))``, which passes probabilities where log-probabilities
belong; kept so both can be compared side by side.
"""


@dataclass(frozen=True)
class GeneratorConfig:
    """Shape of the (meta-)generator: the CMI / Fast-Datafree design of `tools.Generator`."""

    latent_dim: int = 256  # nz: length of one latent code z ~ N(0, I)
    width: int = 64  # ngf: channels of the last hidden block (the first has 2 * width)
    image_size: int = 32  # S: side of the square output; divisible by 4
    channels: int = 3  # channels of the output image (the meta-learner's input)

    def __post_init__(self) -> None:
        if self.image_size < 4 or self.image_size % 4:
            raise ConfigError(f"image_size must be a positive multiple of 4, got {self.image_size}")
        if min(self.latent_dim, self.width, self.channels) < 1:
            raise ConfigError("latent_dim, width and channels must be positive")


@dataclass(frozen=True)
class AugmentConfig:
    """The augmentation in front of teacher and student (`get_transform_no_toTensor`)."""

    crop_padding: int = 4  # RandomCrop(S, padding=4): zero padding, then an S x S crop
    flip: bool = True  # RandomHorizontalFlip with probability 1/2


@dataclass(frozen=True)
class FiveConfig:
    """FIVE: one meta-generator adapted to each teacher in a few steps."""

    adapt_steps: int = 5  # k = generate_iterations: inner Adam steps per teacher
    generator_lr: float = 1e-3  # Glr: inner lr of the generator copy, and the meta-update lr
    latent_lr: float = 1e-3  # inner lr of the latent codes z
    betas: tuple[float, float] = (0.5, 0.999)  # Adam betas, inner and outer
    images_per_class: int = 20  # num_qur_kd: images per teacher class (100 for 5 classes)
    ce_weight: float = 1.0  # oh: weight of the cross-entropy to the target labels
    adv_weight: float = 1.0  # adv: weight of the adversarial term (only with a student)
    # bn: weight of the teacher's batch-norm statistics prior (`inversion.bn_prior`);
    # the official code defines it at 0 and never applies it.
    bn_weight: float = 0.0
    # DeepInversion's image priors on the generator's output (before augmentation), to
    # steer recovered images away from high-frequency textures; the official FREE code
    # has neither, so both default to 0 (`inversion.losses.total_variation`, `l2_prior`).
    tv_weight: float = 0.0  # weight of the (L2, mean-squared) total variation
    l2_weight: float = 0.0  # weight of the mean squared pixel value (pulls towards black)
    # With bn_weight on, a teacher whose exporter folded its batch norms (torch.onnx's
    # default) has no statistics to match: it gets total variation at this weight in
    # the batch-norm prior's place (`benchmarks/diagnostics/folded_bn.py` measures it).
    tv_weight_without_bn: float = 1.0
    kl_form: KlForm = "log"  # the official code uses "prob"
    augment: AugmentConfig = AugmentConfig()
    # The official code builds a fresh Adam for the meta-update on every call, so the
    # meta-step is Adam's first step (about lr * sign(g)); True keeps its moments instead.
    persistent_meta_optimizer: bool = False

    def __post_init__(self) -> None:
        if self.adapt_steps < 1 or self.images_per_class < 1:
            raise ConfigError("adapt_steps and images_per_class must be at least 1")
        _check_prior_weights(self.tv_weight, self.l2_weight)
        _check_prior_weights(self.tv_weight_without_bn, 0.0)


@dataclass(frozen=True)
class ScratchConfig:
    """Scratch inversion, the BiDf-MKD recipe: a fresh generator per teacher."""

    steps: int = 200  # iterations from a re-initialized generator and fresh z
    generator_lr: float = 1e-3
    latent_lr: float = 1e-3
    betas: tuple[float, float] = (0.5, 0.999)
    images_per_class: int = 20
    augment: AugmentConfig = AugmentConfig()
    # The image priors of FiveConfig, for a like-for-like baseline; BiDf-MKD has neither.
    tv_weight: float = 0.0
    l2_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.images_per_class < 1:
            raise ConfigError("steps and images_per_class must be at least 1")
        _check_prior_weights(self.tv_weight, self.l2_weight)


def _check_prior_weights(tv_weight: float, l2_weight: float) -> None:
    # `not w >= 0` also refuses NaN.
    if not (tv_weight >= 0 and l2_weight >= 0):
        raise ConfigError(f"tv_weight and l2_weight must be >= 0, got {tv_weight}, {l2_weight}")
