"""The leakage audit of one teacher: how close its recovered images come to its training data.

The images a round recovers from a teacher (the current meta-generator adapted to it,
as `free_common.screening.screen` and a round do) are compared with the owner's own
images of the same classes: those the teacher trained on (members) and those it never
trained on (non-members). For each of three distances (`free_common.privacy.images`:
RMS pixel difference, cosine distance of a feature space such as the release's
penultimate layer, and 1 - SSIM) it reports

- the mean distance of a recovered image to its nearest member and to its nearest
  non-member of its class (members drawn down to as many as the non-members, so
  the two nearest-neighbour figures are taken over sets of one size);
- the advantage of the membership test the recovered images give: an image scores
  minus its distance to the nearest recovered image of its class, and a member
  should score higher only if the recovered images copy training images rather than
  the class (`free_common.privacy.metrics`: AUC, TPR at 1 % FPR).

An AUC near 0.5 says the recovered images are as close to unseen images of the class
as to the training ones: they reveal the class, not who was in the data.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from free_common.errors import ConfigError, DataError
from free_common.inversion.five import MetaGenerator
from free_common.inversion.teacher import AdaptedTeacher
from free_common.privacy.images import feature_distances, pixel_distances, ssim_distances
from free_common.privacy.metrics import Advantage, advantage

__all__ = [
    "METRICS",
    "AuditConfig",
    "MetricAudit",
    "OwnerImages",
    "TeacherAudit",
    "audit_images",
    "audit_teacher",
    "fit_images",
]

METRICS = ("pixel", "feature", "ssim")

FeatureFn = Callable[[Tensor], Tensor]
"""(B, C, S, S) images in [0, 1] -> (B, D) features, all images of one call together."""


@dataclass(frozen=True)
class AuditConfig:
    """What the audit recovers and how it reports.

    Attributes
    ----------
    images_per_class
        Images recovered per class of the teacher.
    adapt_steps
        Steps the meta-generator adapts to the teacher; None keeps its own (a round's
        5). A fresh, never meta-learned generator needs more (screening gives it 60).
    pairs
        Recovered images kept, each with its nearest training image, for pictures.
    resamples
        Bootstrap resamples of each interval.
    seed
        Seeds the latent codes, the member draw and the bootstrap.
    """

    images_per_class: int = 10
    adapt_steps: int | None = None
    pairs: int = 8
    resamples: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images_per_class < 1 or self.pairs < 0 or self.resamples < 1:
            raise ConfigError("the audit needs images_per_class >= 1, pairs >= 0, resamples >= 1")
        if self.adapt_steps is not None and self.adapt_steps < 1:
            raise ConfigError(f"--adapt-steps must be at least 1, got {self.adapt_steps}")


@dataclass(frozen=True)
class OwnerImages:
    """An owner's images of a teacher's classes, in [0, 1], labels in the teacher's order."""

    members: Tensor
    member_labels: Tensor
    nonmembers: Tensor
    nonmember_labels: Tensor

    def __post_init__(self) -> None:
        if not len(self.members) or not len(self.nonmembers):
            raise DataError(
                "the audit needs images the model trained on and images of the same classes "
                "it never saw (at least one of each)"
            )


@dataclass(frozen=True)
class MetricAudit:
    """One distance's figures for one teacher."""

    nearest_member: float
    nearest_nonmember: float
    advantage: Advantage
    member_scores: tuple[float, ...]
    nonmember_scores: tuple[float, ...]


@dataclass(frozen=True)
class TeacherAudit:
    """The audit of one teacher.

    Attributes
    ----------
    recovery_agreement
        Share of the recovered images the teacher gives their target class.
    metrics
        ``pixel``, ``feature`` (when a feature space was given) and ``ssim``.
    recovered, nearest
        Up to `AuditConfig.pairs` recovered images and, for each, the member nearest
        to it in pixels: the picture of what leaks.
    seconds
        Recovery and measurement time.
    """

    teacher_id: str
    recovery_agreement: float
    metrics: dict[str, MetricAudit]
    recovered: Tensor
    nearest: Tensor
    seconds: float

    def summary(self) -> dict[str, dict[str, Any]]:
        """Return, per distance, the mean nearest distances and the advantage (JSON-able)."""
        return {
            name: {
                "nearest_member": m.nearest_member,
                "nearest_nonmember": m.nearest_nonmember,
                **dataclasses.asdict(m.advantage),
            }
            for name, m in self.metrics.items()
        }


def fit_images(images: Tensor, channels: int, side: int) -> Tensor:
    """`images` (N, C, H, W) in [0, 1] brought to `channels` and `side` x `side`."""
    if images.shape[1] != channels:
        images = (
            images.mean(1, keepdim=True)
            if channels == 1
            else images[:, :1].expand(-1, channels, -1, -1)
        )
    if images.shape[-1] != side or images.shape[-2] != side:
        images = F.interpolate(images, size=(side, side), mode="bilinear", antialias=True)
    return images.clamp(0.0, 1.0)


def audit_teacher(
    teacher: AdaptedTeacher,
    meta_generator: MetaGenerator,
    owner: OwnerImages,
    config: AuditConfig,
    features: FeatureFn | None = None,
) -> TeacherAudit:
    """Recover a batch from `teacher` with `meta_generator` and audit it against `owner`."""
    started = time.perf_counter()
    five = dataclasses.replace(meta_generator.config, images_per_class=config.images_per_class)
    if config.adapt_steps is not None:
        five = dataclasses.replace(five, adapt_steps=config.adapt_steps)
    rng = torch.Generator().manual_seed(config.seed)
    recovery, _ = MetaGenerator(meta_generator.generator, five).adapt(teacher, rng)
    images, labels = recovery.images.cpu(), recovery.labels.cpu()
    audit = audit_images(images, labels, owner, config, features)
    return dataclasses.replace(
        audit,
        teacher_id=teacher.teacher_id,
        recovery_agreement=recovery.teacher_accuracy,
        seconds=time.perf_counter() - started,
    )


def audit_images(
    recovered: Tensor,
    labels: Tensor,
    owner: OwnerImages,
    config: AuditConfig,
    features: FeatureFn | None = None,
) -> TeacherAudit:
    """Audit given recovered images (N, C, S, S) in [0, 1] with their class `labels`."""
    _, channels, side, _ = recovered.shape
    members = fit_images(owner.members.float(), channels, side)
    nonmembers = fit_images(owner.nonmembers.float(), channels, side)
    candidates = torch.cat([members, nonmembers])
    candidate_labels = torch.cat([owner.member_labels, owner.nonmember_labels]).long()
    is_member = torch.arange(len(candidates)) < len(members)
    distances = {
        "pixel": pixel_distances(candidates, recovered),
        "ssim": ssim_distances(candidates, recovered),
    }
    if features is not None:
        embedded = features(torch.cat([recovered, candidates]))
        distances["feature"] = feature_distances(
            embedded[len(recovered) :], embedded[: len(recovered)]
        )
    # Nearest-neighbour figures over sets of one size: the members drawn down to the
    # non-members' count (more members would be nearer by number alone).
    rng = np.random.default_rng(config.seed)
    drawn = torch.from_numpy(rng.permutation(len(members))[: len(nonmembers)])
    same_class = candidate_labels[:, None] == labels.long()[None, :]  # (candidates, recovered)
    metrics = {}
    for name in METRICS:
        if name not in distances:
            continue
        d = distances[name].masked_fill(~same_class, float("inf"))
        score = -d.min(1).values  # minus the distance to the nearest recovered image of its class
        to_member = d[: len(members)][drawn].min(0).values
        to_nonmember = d[len(members) :].min(0).values
        member_scores, nonmember_scores = score[is_member].numpy(), score[~is_member].numpy()
        metrics[name] = MetricAudit(
            nearest_member=_finite_mean(to_member),
            nearest_nonmember=_finite_mean(to_nonmember),
            advantage=advantage(member_scores, nonmember_scores, config.resamples, config.seed),
            member_scores=tuple(float(v) for v in member_scores),
            nonmember_scores=tuple(float(v) for v in nonmember_scores),
        )
    pixel = distances["pixel"][: len(members)].masked_fill(
        ~same_class[: len(members)], float("inf")
    )
    nearest = pixel.min(0).indices  # (recovered,) the nearest member of each recovered image
    closest = pixel.min(0).values.argsort()[: config.pairs]
    return TeacherAudit(
        teacher_id="",
        recovery_agreement=float("nan"),
        metrics=metrics,
        recovered=recovered[closest],
        nearest=members[nearest[closest]],
        seconds=0.0,
    )


def _finite_mean(values: Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")
