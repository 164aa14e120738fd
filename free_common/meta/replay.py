"""MAML replay of tasks from the memory bank, with the official code's patience rule.

Tasks come in batches of `episode_batch`; their query losses are summed into one step
of the main optimizer. Replay stops once `patience` consecutive batches fail to beat
the best mean training accuracy of this call (so it lasts at least patience + 1 steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from free_common.meta.config import MamlConfig, ReplayConfig
from free_common.meta.episodes import EpisodeLike
from free_common.meta.functional import batch_stat_mode
from free_common.meta.maml import maml_loss

__all__ = ["ReplayStats", "replay"]


@dataclass(frozen=True)
class ReplayStats:
    """What one replay call did.

    Attributes
    ----------
    tasks, steps
        Tasks replayed and outer steps taken.
    best_accuracy
        Best mean query accuracy of a batch (before its step).
    losses
        Mean query loss of each batch, in order.
    """

    tasks: int
    steps: int
    best_accuracy: float
    losses: tuple[float, ...]


def replay(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sample_task: Callable[[], EpisodeLike],
    maml: MamlConfig,
    config: ReplayConfig,
) -> ReplayStats:
    """Meta-train `model` with MAML on tasks from `sample_task` until patience runs out.

    Parameters
    ----------
    model
        The meta-learner; its parameters must be those `optimizer` steps.
    optimizer
        The main outer optimizer, shared with the distillation step.
    sample_task
        Returns a fresh task each call (e.g. ``lambda: bank.sample_task(...)``).
    maml
        Inner steps, inner lr, first or second order.
    config
        Batch size in tasks, patience, optional cap on steps.
    """
    best: float | None = None
    stale = steps = 0
    losses: list[float] = []
    with batch_stat_mode(model):
        limit = math.inf if config.max_batches is None else config.max_batches
        while stale < config.patience and steps < limit:
            optimizer.zero_grad(set_to_none=True)
            batch_loss = batch_accuracy = 0.0
            for _ in range(config.episode_batch):
                loss, accuracy = maml_loss(model, sample_task(), maml)
                # Backward per task: the gradient of the sum, without holding every graph.
                torch.autograd.backward(loss)
                batch_loss += float(loss.detach())
                batch_accuracy += accuracy
            optimizer.step()
            steps += 1
            losses.append(batch_loss / config.episode_batch)
            mean_accuracy = batch_accuracy / config.episode_batch
            if best is None or mean_accuracy > best:
                best, stale = mean_accuracy, 0
            else:
                stale += 1
    return ReplayStats(steps * config.episode_batch, steps, best or 0.0, tuple(losses))
