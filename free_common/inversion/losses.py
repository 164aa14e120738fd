"""Losses that steer the generator: cross-entropy, the adversarial term, image priors.

The image priors are DeepInversion's total variation and L2 image norm, both off by
default (`FiveConfig.tv_weight`, `FiveConfig.l2_weight`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from free_common.inversion.config import KlForm

__all__ = ["adversarial_loss", "image_prior_loss", "inversion_loss", "l2_prior", "total_variation"]


def adversarial_loss(teacher_logits: Tensor, student_logits: Tensor, form: KlForm) -> Tensor:
    """Masked adversarial term of FREE / BiDf-MKD; minimizing it raises disagreement.

    On the samples where student and teacher predict the same class, the term is
    minus the divergence of the teacher from the student, so a descent step moves the
    images (through the teacher only: the student is detached) to where the student
    no longer agrees with the teacher: the "boundary" samples a learner gains most from.

    Parameters
    ----------
    teacher_logits
        (B, K) teacher logits; gradients flow through these.
    student_logits
        (B, K) logits of the current meta-learner; treated as constants.
    form
        ``"log"``: ``-mean_j m_j KL(p_s,j || p_t,j)``. ``"prob"``: the official code's
        ``-mean_j m_j sum_c p_s,jc (log p_s,jc - p_t,jc)`` (``F.kl_div`` fed probabilities).

    Returns
    -------
    Tensor
        Scalar, <= 0 in the ``"log"`` form.
    """
    student_logits = student_logits.detach()
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).to(teacher_logits.dtype)  # (B,)
    if form == "log":
        divergence = F.kl_div(
            F.log_softmax(teacher_logits, dim=1),
            F.log_softmax(student_logits, dim=1),
            reduction="none",
            log_target=True,
        )
    else:
        divergence = F.kl_div(
            F.softmax(teacher_logits, dim=1), F.softmax(student_logits, dim=1), reduction="none"
        )
    return -(divergence.sum(dim=1) * agree).mean()


def inversion_loss(
    teacher_logits: Tensor,
    targets: Tensor,
    ce_weight: float,
    adv_weight: float,
    student_logits: Tensor | None,
    form: KlForm,
) -> Tensor:
    """Compute the generator's objective ``oh * CE(teacher, targets) + adv * L_adv`` (FREE a.2).

    Parameters
    ----------
    teacher_logits
        (B, K) teacher logits on the augmented generated images.
    targets
        (B,) the class each image is generated for.
    ce_weight, adv_weight
        Weights ``oh`` and ``adv``.
    student_logits
        (B, K) meta-learner logits on the same images, or None before warm-up ends
        (then the adversarial term is off).
    form
        KL form of the adversarial term.
    """
    loss = ce_weight * F.cross_entropy(teacher_logits, targets)
    if student_logits is not None and adv_weight:
        loss = loss + adv_weight * adversarial_loss(teacher_logits, student_logits, form)
    return loss


def total_variation(images: Tensor) -> Tensor:
    """Mean squared difference of neighbouring pixels: DeepInversion's L2 total variation.

    ``mean((x[..., i, j+1] - x[..., i, j])^2) + mean((x[..., i+1, j] - x[..., i, j])^2)``,
    horizontal plus vertical neighbours, each averaged over batch, channels and positions,
    so the value does not grow with the batch or the image side. (DeepInversion sums the
    L2 norms of four difference maps, diagonals included; the mean-squared form keeps
    the weight comparable across image sizes.) A constant image scores 0, a 0/1
    checkerboard 2, the most any image in [0, 1] can.

    Parameters
    ----------
    images
        (B, C, H, W) generator output, before augmentation (the crop's zero border
        would otherwise count as an edge).

    Returns
    -------
    Tensor
        Scalar, >= 0.
    """
    across = images[..., :, 1:] - images[..., :, :-1]  # (B, C, H, W - 1)
    down = images[..., 1:, :] - images[..., :-1, :]  # (B, C, H - 1, W)
    return across.square().mean() + down.square().mean()


def l2_prior(images: Tensor) -> Tensor:
    """Mean squared pixel value: an L2 image norm prior, pulling pixels towards 0.

    DeepInversion penalizes the per-image L2 norm of the normalized input; here the
    input is the generator's [0, 1] output, where 0 is black, so the prior favours dark
    images with few lit pixels (the glyphs of the benchmark are thin strokes on black).

    Parameters
    ----------
    images
        (B, C, H, W) generator output, before augmentation.

    Returns
    -------
    Tensor
        Scalar, ``mean(x^2)`` over every element.
    """
    return images.square().mean()


def image_prior_loss(images: Tensor, tv_weight: float, l2_weight: float) -> Tensor:
    """Return ``tv_weight * total_variation + l2_weight * l2_prior`` of (B, C, H, W) images.

    A weight of 0 skips its term, so with both at 0 the result is a zero scalar and
    adding it changes nothing (not even the autograd graph).
    """
    loss = images.new_zeros(())
    if tv_weight:
        loss = loss + tv_weight * total_variation(images)
    if l2_weight:
        loss = loss + l2_weight * l2_prior(images)
    return loss
