"""Few-shot evaluation of a meta-learned initialization, as FREE and its peers measure it.

For each episode the whole network is fine-tuned from the initialization with plain
gradient steps (10 at lr 0.01) on the support cross-entropy, then scored on the
queries. Batch norm runs on batch statistics throughout, queries included
(transductive, as the paper does). The result is the mean accuracy and its 95%
interval, 1.96 * std / sqrt(n), with the population std (numpy's default, as the
official `compute_confidence_interval`).

Pass meta-validation episodes to choose between models (`selection`), and meta-test
episodes only to report the chosen one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from free_common.errors import EngineError
from free_common.meta.config import EvalConfig
from free_common.meta.episodes import EpisodeLike, as_inputs
from free_common.meta.functional import batch_stat_mode, call, detached_params
from free_common.meta.maml import adapt

__all__ = ["EvalResult", "confidence_interval", "evaluate", "finetune_accuracy"]


@dataclass(frozen=True)
class EvalResult:
    """Accuracy of a model over the episodes of one split.

    Attributes
    ----------
    split
        Which classes the episodes came from, e.g. ``"meta-val"`` or ``"meta-test"``.
    mean
        Mean query accuracy, a fraction in [0, 1].
    ci95
        Half-width of the 95% interval: 1.96 * std / sqrt(episodes).
    episodes
        Number of episodes scored.
    """

    split: str
    mean: float
    ci95: float
    episodes: int


def confidence_interval(accuracies: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% half-width, 1.96 * std / sqrt(n), std with denominator n."""
    n = len(accuracies)
    if n == 0:
        raise EngineError("no episodes were scored; check the evaluation split has tasks")
    mean = math.fsum(accuracies) / n
    variance = math.fsum((a - mean) ** 2 for a in accuracies) / n
    return mean, 1.96 * math.sqrt(variance) / math.sqrt(n)


def finetune_accuracy(model: nn.Module, episode: EpisodeLike, config: EvalConfig) -> float:
    """Fine-tune a copy of `model` on the support set, return its query accuracy.

    The model itself (parameters and batch-norm buffers) is left unchanged.
    """
    param = next(model.parameters())
    support = as_inputs(episode.support_x, param.device, param.dtype)
    query = as_inputs(episode.query_x, param.device, param.dtype)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    with batch_stat_mode(model):
        params = detached_params(model)
        support_y = episode.support_y.to(param.device)
        for _ in range(config.steps):
            # One step at a time, detached: first-order, and no graph grows across steps.
            params = adapt(model, params, support, support_y, 1, config.lr, False, buffers)
            params = {name: p.detach().requires_grad_() for name, p in params.items()}
        with torch.no_grad():
            logits = call(model, params, query, buffers)  # (N*Q, N)
    return float((logits.argmax(1) == episode.query_y.to(param.device)).float().mean())


def evaluate(
    model: nn.Module, episodes: Iterable[EpisodeLike], config: EvalConfig, split: str
) -> EvalResult:
    """Score `model` on up to `config.episodes` episodes of one split.

    Parameters
    ----------
    model
        The initialization to evaluate, on the device to evaluate on.
    episodes
        Tasks to score, e.g. the data package's episode sampler over one split.
    config
        Episode shape (checked), episode count, fine-tuning steps and learning rate.
    split
        Name of the split the episodes come from (recorded in the result).

    Raises
    ------
    EngineError
        No episodes, or an episode of another shape than `config` describes.
    """
    accuracies = []
    for episode in itertools.islice(episodes, config.episodes):
        _check_shape(episode, config)
        accuracies.append(finetune_accuracy(model, episode, config))
    mean, ci95 = confidence_interval(accuracies)
    return EvalResult(split, mean, ci95, len(accuracies))


def _check_shape(episode: EpisodeLike, config: EvalConfig) -> None:
    support, query = len(episode.support_y), len(episode.query_y)
    if (support, query) != (config.ways * config.shots, config.ways * config.queries):
        raise EngineError(
            f"an episode has {support} support and {query} query images, but the evaluation "
            f"is {config.ways}-way {config.shots}-shot with {config.queries} queries: build "
            "the episode sampler from the same settings"
        )
