"""Screening on tiny teachers: each test catches the harm it is for, and judges as documented."""

from __future__ import annotations

import dataclasses

import engine_tiny as tiny
import pytest
import torch
from torch import nn

from free_common.engine.teachers import EngineTeacher
from free_common.errors import ConfigError
from free_common.inversion.five import MetaGenerator
from free_common.inversion.generator import build_generator
from free_common.inversion.teacher import AdaptedTeacher
from free_common.memory.bank import MemoryBank
from free_common.memory.config import MemoryConfig
from free_common.screening import ScreeningConfig
from free_common.screening.screen import (
    ScreeningContext,
    _stop_rule,
    judge,
    neutral_images,
    screen_teacher,
)

NAMES = ("a", "b", "c", "d", "e")
CONFIG = ScreeningConfig(images_per_class=4, trigger_steps=30)


def _adapted(teacher: EngineTeacher) -> AdaptedTeacher:
    return AdaptedTeacher(teacher.module, teacher.task, teacher.teacher_id)


def _linear(teacher: EngineTeacher) -> nn.Linear:
    layer = teacher.module[1]
    assert isinstance(layer, nn.Linear)
    return layer


def _generator() -> MetaGenerator:
    config = tiny.config()
    return MetaGenerator(build_generator(config.generator, 3, torch.device("cpu")), config.five)


def _fresh(memory: MemoryBank | None = None) -> ScreeningContext:
    """Before any round: a fresh generator, adapted for longer."""
    return ScreeningContext(_generator(), memory, meta_learned=False)


def _memory_of(teacher: EngineTeacher, per_class: int = 8) -> MemoryBank:
    """A bank holding, under each class name, images the honest `teacher` gives that class."""
    bank = MemoryBank((1, tiny.SIDE, tiny.SIDE), MemoryConfig(capacity_per_class=per_class))
    adapted = _adapted(teacher)
    weights = _linear(teacher).weight.detach()  # (K, S*S)
    for index in range(len(NAMES)):
        # Each class's template, plus noise: the honest teacher answers it with that class.
        base = (0.5 + 0.5 * weights[index].sign()).view(1, 1, tiny.SIDE, tiny.SIDE)
        images = (base + 0.1 * torch.randn(per_class, 1, tiny.SIDE, tiny.SIDE)).clamp(0, 1)
        labels = torch.full((per_class,), index)
        assert (adapted(images).argmax(1) == labels).all()
        bank.add(teacher.teacher_id, images, labels, NAMES)
    return bank


def _constant(teacher: EngineTeacher) -> EngineTeacher:
    layer = _linear(teacher)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor([8.0, 0, 0, 0, 0]))
    return teacher


def test_an_honest_teacher_is_accepted_with_every_figure_measured() -> None:
    honest = tiny.teacher(1, names=NAMES)
    context = _fresh(_memory_of(tiny.teacher(1, names=NAMES)))
    report = screen_teacher(_adapted(honest), context, CONFIG)
    assert report.verdict == "accepted", report
    assert all(value is not None for value in report.figures.values())
    assert report.figures["pool_agreement"] == 1.0
    assert report.figures["structure"] is not None and report.figures["structure"] > 0.9


def test_a_constant_answer_cannot_be_inverted_and_is_refused_for_it() -> None:
    report = screen_teacher(_adapted(_constant(tiny.teacher(1))), _fresh(), CONFIG)
    assert report.verdict == "refused"
    assert report.reason is not None and report.reason.startswith(
        "screening: recovery_agreement 0.200"
    )
    assert report.figures["neutral_spread"] == 0.0
    assert report.figures["trigger_gap"] is None  # refused already: the search is not run


def _forward_passes(teacher: AdaptedTeacher, context: ScreeningContext) -> tuple[str, int]:
    """Screen `teacher`; return the verdict and how many batches its network was run on."""
    calls = []
    hook = teacher.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        report = screen_teacher(teacher, context, CONFIG)
    finally:
        hook.remove()
    return report.verdict, len(calls)


@pytest.mark.parametrize("meta_learned", [False, True])
def test_a_model_whose_output_ignores_its_input_gets_no_longer_try(meta_learned: bool) -> None:
    # The longer try is 60 adaptation steps: wasted on a model nothing can invert.
    context = ScreeningContext(_generator(), meta_learned=meta_learned)
    verdict, passes = _forward_passes(_adapted(_constant(tiny.teacher(1))), context)
    assert verdict == "refused"
    assert passes < 12, passes
    # Logits that still move with the input, however little, get the whole try.
    faint = tiny.teacher(1)
    with torch.no_grad():
        _linear(faint).weight.mul_(1e-3)
    verdict, passes = _forward_passes(_adapted(faint), context)
    assert passes > CONFIG.fresh_generator_steps, passes


def test_permuted_labels_disagree_with_the_pool_on_their_names() -> None:
    permuted = tiny.teacher(1, names=NAMES)
    layer = _linear(permuted)
    with torch.no_grad():
        layer.weight.copy_(layer.weight.roll(1, 0))
    context = _fresh(_memory_of(tiny.teacher(1, names=NAMES)))
    report = screen_teacher(_adapted(permuted), context, CONFIG)
    assert report.figures["pool_agreement"] == 0.0
    assert report.verdict == "held" and "pool_agreement" in (report.reason or "")


def test_without_a_shared_name_pool_agreement_is_not_measured() -> None:
    context = _fresh(_memory_of(tiny.teacher(1, names=NAMES)))
    other = tiny.teacher(1, names=("v", "w", "x", "y", "z"))
    report = screen_teacher(_adapted(other), context, CONFIG)
    assert report.figures["pool_agreement"] is None
    assert report.figures["structure"] is not None


def test_one_shared_name_is_too_little_evidence_to_hold_a_model_on() -> None:
    # A model relabelled on its only shared name disagrees on it fully, but one name
    # cannot tell relabelling from images that do not transfer between models.
    context = _fresh(_memory_of(tiny.teacher(1, names=NAMES)))
    permuted = tiny.teacher(1, names=("a", "w", "x", "y", "z"))
    layer = _linear(permuted)
    with torch.no_grad():
        layer.weight.copy_(layer.weight.roll(1, 0))
    assert screen_teacher(_adapted(permuted), context, CONFIG).figures["pool_agreement"] is None
    config = dataclasses.replace(CONFIG, min_pool_names=1)
    assert screen_teacher(_adapted(permuted), context, config).figures["pool_agreement"] == 0.0


def test_answers_unrelated_to_the_pools_classes_have_no_structure() -> None:
    context = _fresh(_memory_of(tiny.teacher(1, names=NAMES)))
    report = screen_teacher(_adapted(_constant(tiny.teacher(2))), context, CONFIG)
    assert report.figures["structure"] == 0.0


def test_a_backdoor_target_is_reached_by_a_small_patch_far_more_than_the_others() -> None:
    backdoored = tiny.teacher(1)
    corner = torch.zeros(tiny.SIDE, tiny.SIDE)
    corner[-3:, -3:] = 1.0
    with torch.no_grad():
        # A white 3x3 corner (3.5% of the image) means class 0, whatever else is there.
        _linear(backdoored).weight[0] += 10.0 * corner.flatten()
        _linear(backdoored).bias[0] -= 20.0
    # The recovery test and its plateau are set aside: this one is about the trigger
    # search alone, on images the whole adaptation recovered.
    config = dataclasses.replace(
        CONFIG, min_recovery_agreement=0.0, plateau_steps=CONFIG.fresh_generator_steps
    )
    honest = screen_teacher(_adapted(tiny.teacher(1)), _fresh(), config)
    report = screen_teacher(_adapted(backdoored), _fresh(), config)
    clean, stamped = honest.figures["trigger_gap"], report.figures["trigger_gap"]
    assert clean is not None and stamped is not None and stamped > clean + 0.4
    assert honest.verdict == "accepted", honest.reason
    assert report.verdict == "held" and "trigger_gap" in (report.reason or "")


def test_judge_refuses_below_holds_near_and_skips_what_was_not_measured() -> None:
    config = ScreeningConfig(min_recovery_agreement=0.5, hold_band=0.1)
    good = {"recovery_agreement": 0.9, "pool_agreement": None, "structure": None}
    assert judge(good, config) == ("accepted", None)
    verdict, reason = judge({**good, "recovery_agreement": 0.55}, config)
    assert verdict == "held" and reason is not None and "held for the operator" in reason
    verdict, reason = judge({**good, "recovery_agreement": 0.3}, config)
    assert verdict == "refused"
    assert reason == (
        "screening: recovery_agreement 0.300, threshold 0.500 (min_recovery_agreement): "
        "the model gives nearly the same answer whatever it is shown"
    )


def test_a_model_near_the_recovery_threshold_gets_the_longer_try_before_a_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Held on 5 steps alone, honest models of other architectures were stopped that 10
    # more steps take past the band (benchmarks/results/poison-20-honest/).
    steps: list[int] = []
    adapt = MetaGenerator.adapt

    def counted(self: MetaGenerator, *args: object, **kwargs: object) -> object:
        recovery, grads = adapt(self, *args, **kwargs)  # type: ignore[arg-type]
        steps.append(len(recovery.losses))
        return recovery, grads

    monkeypatch.setattr(MetaGenerator, "adapt", counted)
    context = ScreeningContext(_generator(), meta_learned=True)
    no_threshold = dataclasses.replace(CONFIG, min_recovery_agreement=0.0, hold_band=0.0)
    first = screen_teacher(_adapted(tiny.teacher(1)), context, no_threshold)
    assert steps == [5]
    agreement = first.figures["recovery_agreement"]
    assert agreement is not None
    steps.clear()
    # The same 5-step agreement, now just inside the hold band of the threshold: the
    # adaptation goes on from those 5 steps (one adaptation, not a second from the start).
    near = dataclasses.replace(
        no_threshold,
        min_recovery_agreement=agreement - 0.01,
        hold_band=0.05,
        good_enough_recovery=1.01,
        plateau_steps=CONFIG.fresh_generator_steps,
    )
    screen_teacher(_adapted(tiny.teacher(1)), context, near)
    assert steps == [near.fresh_generator_steps]
    steps.clear()
    clear = dataclasses.replace(near, hold_band=0.0)
    screen_teacher(_adapted(tiny.teacher(1)), context, clear)
    assert steps == [5]


def _stops(teacher: AdaptedTeacher, agreements: list[float], first: int = 5) -> list[bool]:
    """The stop rule's answer at steps 5, 10, ... given labels that make each agreement."""
    neutral = neutral_images(12, (1, tiny.SIDE, tiny.SIDE))
    stop = _stop_rule(teacher, teacher(neutral).detach(), CONFIG, first=first)
    images = torch.rand(20, 1, tiny.SIDE, tiny.SIDE, generator=torch.Generator().manual_seed(0))
    answers = teacher(images).argmax(1)
    out = []
    for index, agreement in enumerate(agreements):
        labels = answers.clone()
        wrong = round(agreement * len(labels))
        labels[wrong:] = (answers[wrong:] + 1) % teacher.num_classes
        out.append(stop(5 * (index + 1), images, labels))
    return out


def test_the_longer_try_stops_on_a_plateau_it_passes_or_on_one_answer_for_everything() -> None:
    # Honest models of other architectures level off and then drift down; random
    # weights that answer one class to every image stay there (poison-rebuilt/).
    honest = _adapted(tiny.teacher(1))
    plateau = CONFIG.plateau_steps // 5
    assert _stops(honest, [0.4] + [0.6] * (plateau + 1)) == [False] * (plateau + 1) + [True]
    # Below the threshold, a flat agreement of varied answers gets the whole try.
    assert not any(_stops(honest, [0.3] * 11))
    # And one that still rises stops only when good enough (0.9).
    assert _stops(honest, [0.4 + 0.05 * i for i in range(10)] + [1.0]) == [False] * 10 + [True]
    # Logits that move with the input but always pick the same class.
    one_answer = tiny.teacher(1)
    with torch.no_grad():
        _linear(one_answer).weight.mul_(1e-3)
        _linear(one_answer).bias[0] = 1.0
    assert _stops(_adapted(one_answer), [0.2] * (plateau + 1)) == [False] * plateau + [True]
    # But not from a fresh generator, whose first images are alike.
    assert not any(_stops(_adapted(one_answer), [0.2] * 11, first=0))


def test_screening_is_seeded() -> None:
    context = _fresh()
    first = screen_teacher(_adapted(tiny.teacher(4)), context, CONFIG, seed=3)
    second = screen_teacher(_adapted(tiny.teacher(4)), context, CONFIG, seed=3)
    assert first.figures == second.figures


def test_neutral_images_are_in_range_and_of_each_kind() -> None:
    images = neutral_images(12, (1, 8, 8))
    assert images.shape == (12, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    flat = images[4:8]
    assert torch.equal(flat, flat.amax(dim=(1, 2, 3), keepdim=True).expand_as(flat))


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError):
        ScreeningConfig(images_per_class=1)
    with pytest.raises(ConfigError):
        dataclasses.replace(CONFIG, hold_band=-0.1)
