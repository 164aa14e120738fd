"""Distillation loss of BELL: the meta-learner matches a teacher on recovered images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from free_common.errors import EngineError
from free_common.meta.config import KlForm

__all__ = ["distillation_loss"]


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, form: KlForm) -> Tensor:
    """Distance of the student's predictions from the teacher's, a scalar.

    Parameters
    ----------
    student_logits
        (B, K) meta-learner logits; gradients flow through these.
    teacher_logits
        (B, K) teacher logits; treated as constants.
    form
        ``"log"``: KL(p_t || p_s) averaged over the batch. ``"prob"``: the official
        ``F.kl_div(softmax(s), softmax(t), reduction="mean")``, i.e. the mean over batch
        and classes of ``p_t (log p_t - p_s)``; its gradient raises ``sum_c p_t p_s``
        (a soft agreement, not a KL).
    """
    teacher_logits = teacher_logits.detach()
    if student_logits.shape != teacher_logits.shape:
        raise EngineError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ: the meta-learner needs one output per "
            "teacher class; sample teachers with as many classes as the meta-learner's ways"
        )
    if form == "log":
        return F.kl_div(
            F.log_softmax(student_logits, dim=1),
            F.log_softmax(teacher_logits, dim=1),
            reduction="batchmean",
            log_target=True,
        )
    # Written out: F.kl_div's reduction="mean" is deprecated and will change meaning.
    p_student, p_teacher = F.softmax(student_logits, dim=1), F.softmax(teacher_logits, dim=1)
    loss: Tensor = (torch.special.xlogy(p_teacher, p_teacher) - p_teacher * p_student).mean()
    return loss
