"""BELL: one meta-learner update on a step's recovered tasks (FREE, section a.4).

First the distillation step on the teachers of this step (iGA, or the summed-gradient
step of FREE without iGA), then MAML replay from the memory bank; both step the same
main optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from free_common.meta.config import BellConfig
from free_common.meta.episodes import EpisodeLike
from free_common.meta.iga import DistillStats, KdBatch, iga_step, summed_gradient_step
from free_common.meta.norms import scale_free_weights
from free_common.meta.replay import ReplayStats, replay

__all__ = ["BellStats", "bell_update", "outer_optimizer", "set_outer_lr"]


@dataclass(frozen=True)
class BellStats:
    """What one BELL update did: the distillation step, then replay (None when skipped)."""

    distill: DistillStats
    replay: ReplayStats | None


def outer_optimizer(model: nn.Module, config: BellConfig) -> torch.optim.Adam:
    """Make the main optimizer of the meta-learner: Adam at `outer_lr`, shared by both steps.

    With ``config.relative_lr`` the scale-free weights get a group of their own, whose
    rate `set_outer_lr` ties to the learner's initial scale.
    """
    if not config.relative_lr:
        return torch.optim.Adam(model.parameters(), lr=config.outer_lr)
    names = set(scale_free_weights(model))
    groups: list[dict[str, Any]] = [
        {"params": [p for n, p in model.named_parameters() if n in names], "scale_free": True},
        {"params": [p for n, p in model.named_parameters() if n not in names]},
    ]
    return torch.optim.Adam(groups, lr=config.outer_lr)


def set_outer_lr(optimizer: torch.optim.Optimizer, config: BellConfig, init_scale: float) -> None:
    """Set every group to `outer_lr`, the scale-free group (if any) to `outer_lr * init_scale`.

    The group's ``lr_scale`` is what iGA's inner steps multiply their rate by.
    """
    for group in optimizer.param_groups:
        scale = init_scale if group.get("scale_free") else 1.0
        group["lr"], group["lr_scale"] = config.outer_lr * scale, scale


def bell_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[KdBatch],
    sample_task: Callable[[], EpisodeLike] | None,
    config: BellConfig,
) -> BellStats:
    """Distil the step's teachers into `model`, then replay tasks from memory.

    Parameters
    ----------
    model
        The meta-learner.
    optimizer
        Its main optimizer (`outer_optimizer`).
    batches
        One distillation batch per teacher of the step, in the order they were drawn.
    sample_task
        Draws a task from the memory bank; None skips replay (e.g. memory not ready).
    config
        iGA or not, its settings, MAML and replay settings (``replay_enabled=False``
        skips replay: distillation alone).
    """
    if config.use_iga:
        distill = iga_step(model, optimizer, batches, config.iga)
    else:
        distill = summed_gradient_step(model, optimizer, batches, config.iga.kl_form)
    replayed = None
    if sample_task is not None and config.replay_enabled:
        replayed = replay(model, optimizer, sample_task, config.maml, config.replay)
    return BellStats(distill, replayed)
