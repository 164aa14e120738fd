"""Thresholds and sizes of the screening tests (`free_common.screening.screen`)."""

from __future__ import annotations

from dataclasses import dataclass

from free_common.errors import ConfigError

__all__ = ["ScreeningConfig"]


@dataclass(frozen=True)
class ScreeningConfig:
    """What screening measures and where it draws the line.

    A recovery agreement below its threshold refuses the model; any other figure past
    its threshold holds it for the operator (those tests read images recovered from
    other models, on which an honest model can fall short), and a figure within
    `hold_band` of its threshold holds it too. A test that cannot be measured (no
    pool model shares a class name, no memory yet) passes, its figure reported as null.
    The defaults were chosen on teachers trained on meta-train classes only
    (`benchmarks/results/poison/`).

    Attributes
    ----------
    images_per_class
        Images recovered per class, 5 steps from the current meta-generator as in a round.
    fresh_generator_steps
        Adaptation steps of the second, longer try when the 5 steps fall short of
        `min_recovery_agreement` (and of the only try before any round has meta-learned
        the generator): an honest model the generator has not met the like of may need
        more; one that answers the same whatever it sees fails any number of steps.
    min_recovery_agreement
        The model's own agreement with the targets on its recovered images: a model that
        answers (nearly) the same whatever it sees cannot be inverted.
    min_pool_agreement
        On the memory's images of a class name the model declares too, the share it
        gives that class: labels that do not mean what the pool means by them.
    min_structure
        Normalized mutual information between the memory's pseudo-classes and the
        model's answers on their images: a model whose answers follow no visual
        structure of the federation's data (random weights, another domain).
    max_trigger_gap
        A patch covering `trigger_budget` of the image is searched for each class to send
        the other classes' images to it; the largest share sent minus the median share
        above this holds the model: a class far easier to reach than the others is a
        backdoor's target.
    trigger_budget
        Share of the image's pixels that patch keeps.
    trigger_steps
        Optimization steps of the patch search.
    hold_band
        Width above each threshold where the model is held, not accepted.
    """

    images_per_class: int = 8
    fresh_generator_steps: int = 60
    min_recovery_agreement: float = 0.5
    min_pool_agreement: float = 0.5
    min_structure: float = 0.1
    max_trigger_gap: float = 0.6
    trigger_budget: float = 0.03
    trigger_steps: int = 40
    hold_band: float = 0.05

    def __post_init__(self) -> None:
        if self.images_per_class < 2 or min(self.trigger_steps, self.fresh_generator_steps) < 1:
            raise ConfigError(
                "screening needs images_per_class >= 2, trigger_steps and"
                " fresh_generator_steps >= 1"
            )
        if self.hold_band < 0:
            raise ConfigError("screening hold_band must be at least 0")
