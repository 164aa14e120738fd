"""Losses that steer the generator: cross-entropy to the targets and the adversarial term."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from free_common.inversion.config import KlForm

__all__ = ["adversarial_loss", "inversion_loss"]


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
