"""Inversion: generator, meta-generator and the losses that recover tasks from teachers.

- `generator`: the image generator G(z; phi);
- `teacher`: a teacher behind its differentiable input adapter;
- `augment`, `losses`: what the generator is trained through and on;
- `five`: FIVE, the meta-generator adapted to each teacher in k steps;
- `scratch`: scratch inversion (fresh generator, 200 steps), the baseline.
"""

from free_common.inversion.config import (
    AugmentConfig,
    FiveConfig,
    GeneratorConfig,
    KlForm,
    ScratchConfig,
)
from free_common.inversion.five import MetaGenerator, Recovery, StudentFn
from free_common.inversion.generator import Generator, build_generator
from free_common.inversion.scratch import scratch_invert
from free_common.inversion.teacher import AdaptedTeacher, distillation_targets, teacher_accuracy

__all__ = [
    "AdaptedTeacher",
    "AugmentConfig",
    "FiveConfig",
    "Generator",
    "GeneratorConfig",
    "KlForm",
    "MetaGenerator",
    "Recovery",
    "ScratchConfig",
    "StudentFn",
    "build_generator",
    "distillation_targets",
    "scratch_invert",
    "teacher_accuracy",
]
