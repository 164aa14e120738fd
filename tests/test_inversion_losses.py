"""The inversion losses: the adversarial term's sign and mask, and the augmentation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from free_common.inversion.augment import augment
from free_common.inversion.config import AugmentConfig, KlForm
from free_common.inversion.losses import adversarial_loss, inversion_loss


def _disagreement(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p_s || p_t)."""
    return (F.softmax(student, 1) * (F.log_softmax(student, 1) - F.log_softmax(teacher, 1))).sum(1)


def _soft_agreement(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-sample sum_c p_s p_t, what the official probability form lowers."""
    return (F.softmax(student, 1) * F.softmax(teacher, 1)).sum(1)


@pytest.mark.parametrize(
    ("form", "measure", "direction"),
    [("log", _disagreement, 1.0), ("prob", _soft_agreement, -1.0)],
)
def test_descending_the_adversarial_term_raises_disagreement(
    form: KlForm, measure: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], direction: float
) -> None:
    rng = torch.Generator().manual_seed(1)
    student = torch.randn(32, 5, generator=rng)
    # Teachers that mostly agree with the student: the mask is on for most samples.
    teacher = (student + 0.3 * torch.randn(32, 5, generator=rng)).requires_grad_()
    agree = student.argmax(1) == teacher.argmax(1)
    assert agree.sum() >= 16
    before = measure(teacher.detach(), student)
    adversarial_loss(teacher, student, form).backward()
    assert teacher.grad is not None
    after = measure(teacher.detach() - 0.05 * teacher.grad, student)
    # log: KL(p_s || p_t) rises; prob: the soft agreement falls. Both push apart.
    assert (direction * (after - before))[agree].min() > 0


@pytest.mark.parametrize("form", ["log", "prob"])
def test_adversarial_term_ignores_samples_the_student_gets_wrong(form: KlForm) -> None:
    student = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]], requires_grad=True)
    adversarial_loss(teacher, student, form).backward()
    assert teacher.grad is not None
    assert teacher.grad[0].abs().sum() > 0  # agreement: pushed
    assert teacher.grad[1].abs().sum() == 0  # disagreement already: left alone
    assert student.grad is None  # the student is a constant


def test_log_form_is_minus_the_masked_mean_kl() -> None:
    rng = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(8, 4, generator=rng), torch.randn(8, 4, generator=rng)
    mask = (student.argmax(1) == teacher.argmax(1)).float()
    expected = -(_disagreement(teacher, student) * mask).mean()
    assert torch.allclose(adversarial_loss(teacher, student, "log"), expected)


def test_inversion_loss_without_student_is_weighted_cross_entropy() -> None:
    logits, targets = torch.randn(10, 5), torch.arange(5).repeat(2)
    loss = inversion_loss(logits, targets, 2.0, 1.0, None, "log")
    assert torch.allclose(loss, 2.0 * F.cross_entropy(logits, targets))


def test_augment_shifts_the_whole_batch_alike_and_is_seeded() -> None:
    images = torch.rand(3, 1, 6, 6)
    config = AugmentConfig(crop_padding=2, flip=False)
    out = augment(images, config, torch.Generator().manual_seed(4))
    again = augment(images, config, torch.Generator().manual_seed(4))
    assert torch.equal(out, again) and out.shape == images.shape
    padded = F.pad(images, (2, 2, 2, 2))
    offsets = [
        (top, left)
        for top in range(5)
        for left in range(5)
        if torch.equal(padded[..., top : top + 6, left : left + 6], out)
    ]
    assert offsets  # one crop window of the padded batch, shared by every image


def test_augment_flips_left_right() -> None:
    images = torch.rand(2, 3, 4, 4)
    config = AugmentConfig(crop_padding=0, flip=True)
    seen = {
        torch.equal(augment(images, config, torch.Generator().manual_seed(s)), images.flip(-1))
        for s in range(20)
    }
    assert seen == {True, False}
