"""Meta-learning: meta-learner, implicit gradient alignment, MAML replay, evaluation.

- `functional`: the meta-learner called over parameter dictionaries, batch-stat mode;
- `iga`: the distillation step, with (iGA) or without implicit gradient alignment;
- `maml`, `replay`: MAML on memory tasks, with the official patience rule;
- `bell`: both of the above as one update;
- `evaluate`, `selection`: few-shot evaluation, and model selection on meta-val;
- `baselines`: random initialization and weight averaging.
"""

from free_common.meta.baselines import average_state_dicts, random_init, weight_average
from free_common.meta.bell import BellStats, bell_update, outer_optimizer
from free_common.meta.config import (
    BellConfig,
    EvalConfig,
    IgaConfig,
    MamlConfig,
    ReplayConfig,
)
from free_common.meta.episodes import EpisodeLike
from free_common.meta.evaluate import EvalResult, confidence_interval, evaluate
from free_common.meta.functional import as_student, batch_stat_mode
from free_common.meta.iga import DistillStats, KdBatch, iga_step, summed_gradient_step
from free_common.meta.replay import ReplayStats, replay
from free_common.meta.selection import VALIDATION_SPLIT, ValidationSelector

__all__ = [
    "VALIDATION_SPLIT",
    "BellConfig",
    "BellStats",
    "DistillStats",
    "EpisodeLike",
    "EvalConfig",
    "EvalResult",
    "IgaConfig",
    "KdBatch",
    "MamlConfig",
    "ReplayConfig",
    "ReplayStats",
    "ValidationSelector",
    "as_student",
    "average_state_dicts",
    "batch_stat_mode",
    "bell_update",
    "confidence_interval",
    "evaluate",
    "iga_step",
    "outer_optimizer",
    "random_init",
    "replay",
    "summed_gradient_step",
    "weight_average",
]
