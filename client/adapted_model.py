"""Fine-tune a release on every class of the owner's data and export it as ONNX.

`fit_all_classes` adapts the meta-learned network to one task made of all the
given classes (labels in folder order), the way evaluation adapts it to an
episode: plain gradient steps of cross-entropy with batch norm on batch
statistics. An exported model runs one image at a time in eval mode, where
batch norm reads its running statistics; those still hold whatever the
meta-learner last saw, so they are recomputed from the owner's images (a
cumulative average over one pass) before export.

`export_strategy` does the same with a protocol of `free_common.meta.adaptation`:
its strategy, steps and lr chosen by k-fold on those images, then fitted to all of
them.

`export_adapted` writes the model with the task metadata `free-client inspect`
and `submit` read: grey or RGB, the learner's square size, pixels in [0, 1]
(mean 0, std 1) and the class folders' names.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from free_common.data.episodes import to_tensor
from free_common.data.imageset import ImageSet
from free_common.engine import LearnerSpec
from free_common.engine.result import learner_task
from free_common.meta.adaptation import (
    Protocol,
    SelectionConfig,
    as_module,
    fit,
    protocol_strategies,
    select,
)
from free_common.meta.functional import batch_stat_mode
from free_common.models.export import to_onnx
from free_common.types import TaskMetadata

__all__ = ["export_adapted", "export_strategy", "fit_all_classes", "task_of"]

_CHUNK = 256
"""Images per forward pass; gradients of a step are summed over the chunks."""

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _chunks(x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + _CHUNK], y[i : i + _CHUNK]) for i in range(0, len(x), _CHUNK)]


def _calibrate_batch_norms(model: nn.Module, x: Tensor) -> None:
    """Set every batch norm's running statistics to those of `x` (one cumulative pass)."""
    norms = [m for m in model.modules() if isinstance(m, _BATCH_NORMS)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None: a cumulative average over every batch of the pass
    with torch.no_grad(), batch_stat_mode(model):
        for start in range(0, len(x), _CHUNK):
            model(x[start : start + _CHUNK])
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def fit_all_classes(model: nn.Module, data: ImageSet, *, steps: int, lr: float) -> float:
    """Fine-tune `model` in place on every image of `data`; return its eval-mode accuracy.

    Parameters
    ----------
    model
        The release's network (or a random one); its head must have one output
        per class of `data`.
    data
        The owner's images, labels ``0 .. classes-1``.
    steps, lr
        Plain gradient steps over all the images, and their size.

    Returns
    -------
    float
        Accuracy of the fine-tuned model, in eval mode, on the images it was
        tuned on: a check that the export will behave, not a test score.
    """
    x = to_tensor(data.images)
    y = torch.from_numpy(data.labels)
    batches = _chunks(x, y)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with batch_stat_mode(model):
        for _ in range(steps):
            optimizer.zero_grad()
            for inputs, labels in batches:
                loss = F.cross_entropy(model(inputs), labels, reduction="sum") / len(x)
                torch.autograd.backward(loss)
            optimizer.step()
    return _calibrated_accuracy(model, x, batches)


def _calibrated_accuracy(
    model: nn.Module, x: Tensor, batches: list[tuple[Tensor, Tensor]]
) -> float:
    """Set batch norm's running statistics from `x`; return the eval-mode accuracy on it."""
    _calibrate_batch_norms(model, x)
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(inputs).argmax(1) == labels).sum()) for inputs, labels in batches)
    return correct / len(x)


def export_strategy(
    model: nn.Module, data: ImageSet, protocol: Protocol, *, seed: int
) -> tuple[nn.Module, tuple[str, dict[str, float]], float]:
    """Adapt `model` to every image of `data` with `protocol` (not ``paper``).

    The strategy, steps and lr are chosen by k-fold on the images (one image per class
    held out per fold, as on a support set), then fitted to all of them, in one batch.

    Returns
    -------
    tuple
        The adapted network (a new module, one output per class of `data`, batch norm
        calibrated, eval mode); the chosen setting's label and every setting's held-out
        accuracy; its eval-mode accuracy on the images.
    """
    x = to_tensor(data.images)  # (S, C, H, W)
    y = torch.from_numpy(data.labels)  # (S,)
    strategies = protocol_strategies(protocol)
    selection = select(model, x, y, data.num_classes, SelectionConfig(seed=seed), strategies)
    candidate = selection.best(strategies)
    adapted = as_module(model, fit(model, x, y, data.num_classes, candidate, seed))
    accuracy = _calibrated_accuracy(adapted, x, _chunks(x, y))
    scores = {c.label: score for c, score in selection.scores.items()}
    return adapted, (candidate.label, scores), accuracy


def task_of(spec: LearnerSpec, class_names: tuple[str, ...]) -> TaskMetadata:
    """Return the task metadata of a fine-tuned meta-learner: its input, the owner's classes."""
    return dataclasses.replace(learner_task(spec), class_names=class_names)


def export_adapted(model: nn.Module, spec: LearnerSpec, class_names: tuple[str, ...]) -> bytes:
    """Return the ONNX file of a fine-tuned model, with its task metadata."""
    return to_onnx(model, task_of(spec, class_names))
