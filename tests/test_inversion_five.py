"""FIVE: the meta-generator adapts to a teacher in k steps and meta-learns across teachers."""

from __future__ import annotations

import copy

import torch
from torch import nn

from free_common.inversion.config import AugmentConfig, FiveConfig, GeneratorConfig
from free_common.inversion.five import MetaGenerator
from free_common.inversion.generator import build_generator
from free_common.inversion.teacher import AdaptedTeacher, teacher_accuracy
from free_common.types import ChannelOrder, TaskMetadata

CPU = torch.device("cpu")
SIDE = 8
GENERATOR = GeneratorConfig(latent_dim=16, width=8, image_size=SIDE, channels=3)
NO_AUGMENT = AugmentConfig(crop_padding=0, flip=False)


def _teacher(seed: int, classes: int = 5) -> AdaptedTeacher:
    """A template-matching linear classifier: a tiny teacher with informative gradients."""
    rng = torch.Generator().manual_seed(seed)
    dim = 3 * SIDE * SIDE
    linear = nn.Linear(dim, classes)
    with torch.no_grad():
        linear.weight.copy_((torch.rand(classes, dim, generator=rng) * 2 - 1) * 4 / dim**0.5)
        linear.bias.zero_()
    task = TaskMetadata(classes, (3, SIDE, SIDE), ChannelOrder.RGB, (0.5,) * 3, (0.5,) * 3)
    return AdaptedTeacher(nn.Sequential(nn.Flatten(), linear), task, f"teacher-{seed}")


def _meta_generator(config: FiveConfig, seed: int = 0) -> MetaGenerator:
    return MetaGenerator(build_generator(GENERATOR, seed, CPU), config)


def test_recovery_has_per_class_images_and_labels() -> None:
    meta = _meta_generator(FiveConfig(images_per_class=3))
    recovery, grads = meta.adapt(_teacher(0, classes=4), torch.Generator().manual_seed(0))
    assert recovery.images.shape == (12, 3, SIDE, SIDE)
    assert recovery.labels.tolist() == [0, 1, 2, 3] * 3
    assert len(recovery.losses) == 5 and recovery.seconds > 0
    assert 0.0 <= recovery.teacher_accuracy <= 1.0
    assert not recovery.images.requires_grad
    assert [g.shape for g in grads] == [p.shape for p in meta.generator.parameters()]


def test_adaptation_lowers_the_teachers_loss_below_no_adaptation() -> None:
    # Without augmentation, losses[0] is the unadapted generator's cross-entropy.
    meta = _meta_generator(FiveConfig(images_per_class=4, augment=NO_AUGMENT))
    for seed in range(3):
        recovery, _ = meta.adapt(_teacher(seed), torch.Generator().manual_seed(seed))
        assert recovery.losses[-1] < recovery.losses[0] - 0.2


def test_an_adaptation_told_where_to_stop_stops_there_and_keeps_those_images() -> None:
    config = FiveConfig(images_per_class=4, adapt_steps=60, augment=NO_AUGMENT)
    teacher = _teacher(0)
    full, _ = _meta_generator(config).adapt(teacher, torch.Generator().manual_seed(0))
    assert len(full.losses) == 60 and full.teacher_accuracy == 1.0
    asked: list[int] = []

    def passing(step: int, images: torch.Tensor, labels: torch.Tensor) -> bool:
        asked.append(step)
        return step % 5 == 0 and teacher_accuracy(teacher, images, labels) >= 0.5

    early, _ = _meta_generator(config).adapt(
        teacher, torch.Generator().manual_seed(0), stop=passing
    )
    # It stops at the first step the rule passes, and reports that step's images.
    assert asked == list(range(1, len(early.losses) + 1))
    assert len(early.losses) % 5 == 0 and len(early.losses) < 60
    assert early.teacher_accuracy >= 0.5
    never, _ = _meta_generator(config).adapt(
        teacher, torch.Generator().manual_seed(0), stop=lambda *_: False
    )
    assert never.losses == full.losses


def test_adapt_leaves_the_meta_generator_unchanged() -> None:
    meta = _meta_generator(FiveConfig(images_per_class=2))
    before = copy.deepcopy(meta.generator.state_dict())
    meta.adapt(_teacher(0), torch.Generator().manual_seed(0))
    assert all(torch.equal(before[k], v) for k, v in meta.generator.state_dict().items())


def test_meta_step_follows_the_summed_last_step_gradients() -> None:
    config = FiveConfig(images_per_class=2)
    teachers = [_teacher(0), _teacher(1)]
    probe = _meta_generator(config)
    rng = torch.Generator().manual_seed(3)
    summed = [a + b for a, b in zip(*(probe.adapt(t, rng)[1] for t in teachers), strict=True)]
    meta = _meta_generator(config)
    before = [p.detach().clone() for p in meta.generator.parameters()]
    meta.step(teachers, torch.Generator().manual_seed(3))
    for old, new, grad in zip(before, meta.generator.parameters(), summed, strict=True):
        moved = new.detach() - old
        # A fresh Adam's first step is -lr * g / (|g| + eps): about -lr * sign(g).
        big = grad.abs() > 1e-6
        assert torch.equal(torch.sign(moved[big]), -torch.sign(grad[big]))
        assert torch.allclose(moved[big].abs(), torch.full_like(moved[big], 1e-3), rtol=0.02)


def test_meta_learning_makes_adaptation_better() -> None:
    config = FiveConfig(images_per_class=4, augment=NO_AUGMENT)
    teachers = [_teacher(seed) for seed in range(3)]

    def adapted_loss(meta: MetaGenerator) -> float:
        rng = torch.Generator().manual_seed(99)  # the same latent draws for both
        return sum(meta.adapt(t, rng)[0].losses[-1] for t in teachers) / len(teachers)

    untrained = _meta_generator(config)
    start = adapted_loss(untrained)
    trained = _meta_generator(config)
    rng = torch.Generator().manual_seed(0)
    for _ in range(25):
        trained.step(teachers, rng)
    assert adapted_loss(trained) < start - 0.1


def test_student_term_changes_the_objective_only_when_weighted() -> None:
    teacher = _teacher(0)
    student_net = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, 5))

    def student(images: torch.Tensor) -> torch.Tensor:
        return student_net(images)

    def losses(adv: float, with_student: bool) -> tuple[float, ...]:
        meta = _meta_generator(FiveConfig(images_per_class=2, adv_weight=adv))
        rng = torch.Generator().manual_seed(5)
        return meta.adapt(teacher, rng, student if with_student else None)[0].losses

    assert losses(0.0, True) == losses(1.0, False)
    assert losses(1.0, True) != losses(1.0, False)


def test_steps_are_deterministic_given_seeds() -> None:
    def run() -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        meta = _meta_generator(FiveConfig(images_per_class=2), seed=7)
        rng = torch.Generator().manual_seed(11)
        recoveries = meta.step([_teacher(0), _teacher(1)], rng)
        recoveries += meta.step([_teacher(2)], rng)
        return [r.images for r in recoveries], meta.generator.state_dict()

    (images_a, state_a), (images_b, state_b) = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(images_a, images_b, strict=True))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_persistent_meta_optimizer_survives_a_state_round_trip() -> None:
    config = FiveConfig(images_per_class=2, persistent_meta_optimizer=True)
    meta = _meta_generator(config)
    meta.step([_teacher(0)], torch.Generator().manual_seed(0))
    state = meta.state_dict()
    assert "meta_optimizer" in state
    restored = _meta_generator(config, seed=1)
    restored.load_state_dict(state)
    a = meta.step([_teacher(1)], torch.Generator().manual_seed(1))
    b = restored.step([_teacher(1)], torch.Generator().manual_seed(1))
    assert torch.equal(a[0].images, b[0].images)
    for p, q in zip(meta.generator.parameters(), restored.generator.parameters(), strict=True):
        assert torch.equal(p, q)
