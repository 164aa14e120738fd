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
        Adaptation steps in all, the round's 5 included, when those 5 fall short of
        `min_recovery_agreement` plus `hold_band` (and before any round has
        meta-learned the generator): the adaptation goes on from where the 5 left it.
        An honest model the generator has not met the like of may need more; one that
        answers the same whatever it sees fails any number of steps.
    good_enough_recovery
        Past the round's 5 steps, the adaptation stops early once the model gives this
        share of its recovered images their target (never below `min_recovery_agreement`
        plus `hold_band`): images good enough for the tests that read them, at a
        fraction of the steps.
    plateau_steps
        Past the round's 5 steps, the adaptation also stops once the model's agreement
        has not risen past its best for this many steps (checked every 5), while it
        passes `min_recovery_agreement` plus `hold_band` or (past a meta-learned start)
        while the model gives every recovered image the same answer: honest models of
        other architectures level off
        within 25 to 40 steps and some then drift down, and some models with random
        weights answer one class to everything (`benchmarks/results/poison-rebuilt/`).
        At `fresh_generator_steps` or more it never stops on a plateau.
    min_recovery_agreement
        The model's own agreement with the targets on its recovered images: a model that
        answers (nearly) the same whatever it sees cannot be inverted.
    min_pool_agreement
        On the memory's images of a class name the model declares too, the share it
        gives that class: labels that do not mean what the pool means by them.
    min_pool_names
        Class names the model must share with the pool before `min_pool_agreement` is
        tested: on a single name, honest models of other architectures scored 0 to 0.5
        (the images of one class recovered from one other model are weak evidence), while a
        model that relabels classes has to share several.
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
    trigger_images
        At most this many recovered images of the other classes each class's patch is
        searched on (the search's cost grows with classes x images x steps).
    hold_band
        Width above each threshold where the model is held, not accepted.
    """

    images_per_class: int = 8
    fresh_generator_steps: int = 60
    good_enough_recovery: float = 0.9
    plateau_steps: int = 10
    min_recovery_agreement: float = 0.5
    min_pool_agreement: float = 0.5
    min_pool_names: int = 2
    min_structure: float = 0.1
    max_trigger_gap: float = 0.6
    trigger_budget: float = 0.03
    trigger_steps: int = 20
    trigger_images: int = 8
    hold_band: float = 0.05

    def __post_init__(self) -> None:
        if (
            self.images_per_class < 2
            or min(
                self.trigger_steps,
                self.trigger_images,
                self.fresh_generator_steps,
                self.plateau_steps,
                self.min_pool_names,
            )
            < 1
        ):
            raise ConfigError(
                "screening needs images_per_class >= 2; trigger_steps, trigger_images,"
                " fresh_generator_steps, plateau_steps and min_pool_names >= 1"
            )
        if self.hold_band < 0:
            raise ConfigError("screening hold_band must be at least 0")
