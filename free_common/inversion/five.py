"""FIVE: Faster Inversion via a meta-generator (FREE, section a.2 of the brief).

One meta-generator G(z; phi) is meta-learned across teachers. For each teacher of a
step, a copy phi_i adapts in k = 5 Adam steps (with fresh latent codes z_i, also
adapted) to make images the teacher classifies as the target labels; the images of
the last forward pass are that teacher's recovered batch. The meta-update is
first-order, as in the official code: the gradient of the k-th loss at phi_i^(k-1)
(the parameters that drew the kept images) is summed over the step's teachers and
applied to phi with Adam.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from free_common.inversion.augment import augment
from free_common.inversion.bn_prior import BatchNormPrior
from free_common.inversion.config import FiveConfig
from free_common.inversion.generator import Generator
from free_common.inversion.losses import image_prior_loss, inversion_loss
from free_common.inversion.teacher import AdaptedTeacher, teacher_accuracy
from free_common.inversion.timing import wall_clock

__all__ = ["MetaGenerator", "Recovery", "StopRule", "StudentFn", "target_labels"]

StudentFn = Callable[[Tensor], Tensor]
"""The current meta-learner as a function: (B, C_s, S, S) images in [0, 1] -> (B, K) logits."""

StopRule = Callable[[int, Tensor, Tensor], bool]
"""Asked after each forward pass of an adaptation but its last, with the step (from 1), that
pass's images (N, C_s, S, S), detached, and their target labels (N,): True stops the
adaptation there and keeps those images."""


@dataclass(frozen=True)
class Recovery:
    """What one inversion recovered from one teacher.

    Attributes
    ----------
    teacher_id
        The teacher it came from.
    images
        (N, C_s, S, S) in [0, 1], detached: the images of the last forward pass.
    labels
        (N,) the teacher class each image was generated for (0 .. K-1).
    losses
        Generator loss at each step (for FIVE the last one belongs to the kept images;
        for scratch inversion the lowest one does).
    seconds
        Wall time of the inversion itself (copy and steps; not the meta-update, not
        the accuracy read below).
    teacher_accuracy
        Share of `images` the teacher classifies as their label.
    """

    teacher_id: str
    images: Tensor
    labels: Tensor
    losses: tuple[float, ...]
    seconds: float
    teacher_accuracy: float


class MetaGenerator:
    """A generator meta-learned to adapt to any teacher in a few steps.

    Parameters
    ----------
    generator
        The meta-generator phi; it stays in training mode (batch statistics).
    config
        FIVE settings.
    """

    def __init__(self, generator: Generator, config: FiveConfig) -> None:
        self.generator = generator.train()
        self.config = config
        # None: a fresh Adam per meta-step, as the official code does (see FiveConfig).
        self._meta_optimizer = self._adam() if config.persistent_meta_optimizer else None

    def adapt(
        self,
        teacher: AdaptedTeacher,
        rng: torch.Generator,
        student: StudentFn | None = None,
        *,
        stop: StopRule | None = None,
    ) -> tuple[Recovery, list[Tensor]]:
        """Adapt a copy of the meta-generator to one teacher; phi itself is not touched.

        Parameters
        ----------
        teacher
            The adapted teacher, on the generator's device.
        rng
            CPU generator for the latent codes and the augmentation.
        student
            The current meta-learner, or None during warm-up (no adversarial term).
        stop
            Stop before `adapt_steps` when this says so: screening only needs to know
            that a model can be inverted, not its best images.

        Returns
        -------
        tuple
            The recovery, and the first-order meta-gradient: the gradient of the last
            step's loss for each parameter of phi, in `generator.parameters()` order.
        """
        cfg = self.config
        device = next(self.generator.parameters()).device
        labels = target_labels(teacher.num_classes, cfg.images_per_class, device)  # (N,)
        latent = torch.randn(labels.numel(), self.generator.config.latent_dim, generator=rng)
        with wall_clock(device) as watch:
            z = latent.to(device).requires_grad_()  # (N, nz), adapted but never meta-learned
            fast = copy.deepcopy(self.generator)
            groups: list[dict[str, Any]] = [
                {"params": fast.parameters()},
                {"params": [z], "lr": cfg.latent_lr},
            ]
            optimizer = torch.optim.Adam(
                groups,
                lr=cfg.generator_lr,
                betas=cfg.betas,
            )
            losses: list[float] = []
            for step in range(1, cfg.adapt_steps + 1):
                images = fast(z)  # (N, C_s, S, S)
                loss = self._loss(teacher, images, labels, rng, student)
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                losses.append(float(loss.detach()))
                if (
                    stop is not None
                    and step < cfg.adapt_steps
                    and stop(step, images.detach(), labels)
                ):
                    break  # these images are the ones kept; the step below would move past them
                optimizer.step()
            # Gradients of the last loss at phi_i^(k-1); the step above does not touch .grad.
            grads = [_grad_or_zero(p) for p in fast.parameters()]
        kept = images.detach()
        accuracy = teacher_accuracy(teacher, kept, labels)
        recovery = Recovery(
            teacher.teacher_id, kept, labels, tuple(losses), watch.seconds, accuracy
        )
        return recovery, grads

    def step(
        self,
        teachers: Sequence[AdaptedTeacher],
        rng: torch.Generator,
        student: StudentFn | None = None,
    ) -> list[Recovery]:
        """Adapt to each teacher in turn, then take one first-order meta-step on phi.

        Returns
        -------
        list of Recovery
            One per teacher, in the order given.
        """
        recoveries: list[Recovery] = []
        total: list[Tensor] | None = None
        for teacher in teachers:
            recovery, grads = self.adapt(teacher, rng, student)
            recoveries.append(recovery)
            total = grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]
        if total is not None:
            self.meta_step(total)
        return recoveries

    def meta_step(self, total: Sequence[Tensor]) -> None:
        """One Adam step on phi along `total`, the summed meta-gradients of `adapt`."""
        optimizer = self._meta_optimizer or self._adam()
        optimizer.zero_grad(set_to_none=True)
        for param, grad in zip(self.generator.parameters(), total, strict=True):
            param.grad = grad
        optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        """Return a copy of the generator weights, and of the meta-optimizer's moments if kept."""
        state: dict[str, Any] = {"generator": self.generator.state_dict()}
        if self._meta_optimizer is not None:
            state["meta_optimizer"] = self._meta_optimizer.state_dict()
        # Both hold live tensors that later steps change in place.
        return copy.deepcopy(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        self.generator.load_state_dict(state["generator"])
        if self._meta_optimizer is not None and "meta_optimizer" in state:
            self._meta_optimizer.load_state_dict(state["meta_optimizer"])

    def _loss(
        self,
        teacher: AdaptedTeacher,
        images: Tensor,
        labels: Tensor,
        rng: torch.Generator,
        student: StudentFn | None,
    ) -> Tensor:
        cfg = self.config
        seen = augment(images, cfg.augment, rng)  # (N, C_s, S, S)
        prior = BatchNormPrior(teacher if cfg.bn_weight else nn.Identity())
        with prior:
            teacher_logits = teacher(seen)  # (N, K)
        student_logits = None
        if student is not None and cfg.adv_weight:
            with torch.no_grad():
                student_logits = student(seen)  # (N, K)
        loss = inversion_loss(
            teacher_logits, labels, cfg.ce_weight, cfg.adv_weight, student_logits, cfg.kl_form
        )
        if cfg.bn_weight and prior.has_norms:
            loss = loss + cfg.bn_weight * prior.loss().to(loss.device)
        elif cfg.bn_weight and cfg.tv_weight_without_bn:
            loss = loss + image_prior_loss(images, cfg.tv_weight_without_bn, 0.0)
        if cfg.tv_weight or cfg.l2_weight:
            # On the images as drawn, not as augmented: the crop's zero border is no edge.
            loss = loss + image_prior_loss(images, cfg.tv_weight, cfg.l2_weight)
        return loss

    def _adam(self) -> torch.optim.Adam:
        return torch.optim.Adam(
            self.generator.parameters(), lr=self.config.generator_lr, betas=self.config.betas
        )


def target_labels(num_classes: int, per_class: int, device: torch.device) -> Tensor:
    """Labels 0..K-1 repeated `per_class` times, as the official targets: (K * per_class,)."""
    return torch.arange(num_classes, device=device).repeat(per_class)


def _grad_or_zero(param: Tensor) -> Tensor:
    return torch.zeros_like(param) if param.grad is None else param.grad.detach().clone()
