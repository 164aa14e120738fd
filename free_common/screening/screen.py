"""The screening tests: what a harmful model cannot fake, measured on one teacher.

Every test runs on images the server has without any owner's data: the images the
current meta-generator recovers from the model in 5 steps (as a round would), neutral
inputs (noise, flat grey, smooth blobs), and the images earlier rounds left in the
memory bank. The figures (each in [0, 1]):

``recovery_agreement``
    Share of its recovered images the model gives their target class.
``recovered_entropy``, ``neutral_entropy``
    Mean entropy of its softmax on recovered and on neutral inputs, over log K.
``neutral_spread``
    Entropy of the histogram of its answers on neutral inputs, over log K.
``pool_agreement``
    On the memory's images of class names it declares too, the share it gives that
    class (null when it shares fewer than `ScreeningConfig.min_pool_names` with the pool).
``structure``
    Mutual information between the memory's pseudo-classes and its answers on their
    images, over the entropy of its answers (null with an empty memory).
``trigger_gap``
    For each class, a patch searched to send the other classes' recovered images to it
    (a Neural Cleanse-style search, Wang et al., S&P 2019, cut to a few steps) and cut
    to a few percent of the image; the largest share it sends, minus the median share
    (null for a model the recovery test refuses).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from free_common.inversion.five import MetaGenerator, StopRule
from free_common.inversion.teacher import AdaptedTeacher
from free_common.memory.bank import MemoryBank, pseudo_class_key
from free_common.screening.config import ScreeningConfig

__all__ = ["ScreeningContext", "ScreeningReport", "judge", "neutral_images", "screen_teacher"]

Verdict = Literal["accepted", "held", "refused"]

_POOL_IMAGES_PER_CLASS = 8
_POOL_CLASSES = 64
_TRIGGER_AREA_WEIGHT = 2.0
_TRIGGER_START = -2.0
"""Mask logit everywhere at the start: each pixel 12% patch."""
_CHECK_EVERY = 5
"""Steps between the agreement checks of screening's adaptation (one teacher pass each)."""
_SAME_LOGITS = 1e-5
"""Relative spread of logits below which a model's output is taken not to depend on its input."""


@dataclass(frozen=True)
class ScreeningContext:
    """What the server holds when a model arrives.

    Attributes
    ----------
    meta_generator
        The current meta-generator (the carried one, or a fresh one before any round).
    memory
        The memory bank earlier rounds left, or None before any round.
    meta_learned
        Whether a round has meta-learned the generator (else it adapts for
        `ScreeningConfig.fresh_generator_steps`).
    """

    meta_generator: MetaGenerator
    memory: MemoryBank | None = None
    meta_learned: bool = True


@dataclass(frozen=True)
class ScreeningReport:
    """The figures of one model, the verdict they give, and how long it took."""

    figures: dict[str, float | None]
    verdict: Verdict
    reason: str | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (the audit log's and the status's)."""
        return dataclasses.asdict(self)


@torch.no_grad()
def neutral_images(count: int, shape: tuple[int, int, int], seed: int = 0) -> Tensor:
    """(count, C, S, S) in [0, 1]: uniform noise, flat grey levels, smooth blobs (a third each)."""
    rng = torch.Generator().manual_seed(seed)
    channels, height, width = shape
    third = max(1, count // 3)
    noise = torch.rand(third, channels, height, width, generator=rng)
    flat = torch.linspace(0, 1, third).view(third, 1, 1, 1).expand(third, channels, height, width)
    coarse = torch.rand(count - 2 * third, channels, 4, 4, generator=rng)
    blobs = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return torch.cat([noise, flat, blobs])


def screen_teacher(
    teacher: AdaptedTeacher,
    context: ScreeningContext,
    config: ScreeningConfig,
    seed: int = 0,
) -> ScreeningReport:
    """Measure one teacher and judge it (see the module docstring for each figure)."""
    started = time.perf_counter()
    rng = torch.Generator().manual_seed(seed)
    five = dataclasses.replace(
        context.meta_generator.config, images_per_class=config.images_per_class
    )
    shape = context.meta_generator.generator.config
    device = next(context.meta_generator.generator.parameters()).device
    neutral = neutral_images(48, (shape.channels, shape.image_size, shape.image_size), seed)
    neutral = neutral.to(device)  # (48, C, S, S), the generator's images' shape
    neutral_logits = _logits(teacher, neutral)  # (48, K)
    # The round's 5 steps first; the adaptation goes on past them only for a model they
    # leave near or below the recovery threshold (and always before any round has
    # meta-learned the generator).
    first = context.meta_generator.config.adapt_steps if context.meta_learned else 0
    adaptation = dataclasses.replace(five, adapt_steps=max(first, config.fresh_generator_steps))
    stop = _stop_rule(teacher, neutral_logits, config, first)
    recovery, _ = MetaGenerator(context.meta_generator.generator, adaptation).adapt(
        teacher, rng, stop=stop
    )
    recovered_logits = _logits(teacher, recovery.images)  # (N, K)
    figures: dict[str, float | None] = {
        "recovery_agreement": recovery.teacher_accuracy,
        "recovered_entropy": _mean_entropy(recovered_logits),
        "neutral_entropy": _mean_entropy(neutral_logits),
        "neutral_spread": _answer_entropy(neutral_logits.argmax(1), teacher.num_classes),
        "pool_agreement": None,
        "structure": None,
        "trigger_gap": None,
    }
    if context.memory is not None and len(context.memory):
        figures["pool_agreement"] = _pool_agreement(
            teacher, context.memory, device, config.min_pool_names
        )
        figures["structure"] = _structure(teacher, context.memory, device)
    if judge(figures, config)[0] != "refused":
        # The costliest test last, and not for a model refused already: a refusal wins
        # over the hold it could add.
        figures["trigger_gap"] = _trigger_gap(teacher, recovery.images, recovery.labels, config)
    verdict, reason = judge(figures, config)
    return ScreeningReport(figures, verdict, reason, time.perf_counter() - started)


@torch.no_grad()
def _logits(teacher: AdaptedTeacher, images: Tensor) -> Tensor:
    logits: Tensor = teacher(images)  # (N, K)
    return logits


def _ignores_input(logits: Tensor) -> bool:
    """Tell whether every row of `logits` (N, K) is the first one, up to float rounding."""
    spread = (logits - logits[:1]).abs().max()
    return bool(spread <= _SAME_LOGITS * (1.0 + logits.abs().max()))


def _stop_rule(
    teacher: AdaptedTeacher, neutral_logits: Tensor, config: ScreeningConfig, first: int
) -> StopRule:
    """When screening's adaptation stops: at step `first` (0: none) or a later check.

    At `first`, images past the recovery test and its band are enough, as a round's
    would be. Past it (an honest model of an architecture the generator has not met yet
    may need more steps), only images `good_enough_recovery` of them pass, or a plateau:
    an agreement that has not passed its best for `plateau_steps` while it passes
    (further steps seldom raise it, and an honest model's often drifts down), or, past a
    meta-learned start, while the model gives every recovered image the same answer. (A
    fresh generator's first images are alike: an honest ResNet answered them all with one
    class for 15 steps.) At the first check, a model
    whose logits do not move with its input stops: no number of steps can invert it, and
    any images give its exact agreement.
    """
    first_check = first or _CHECK_EVERY
    passing = config.min_recovery_agreement + config.hold_band
    good_enough = max(config.good_enough_recovery, passing)
    best_agreement, best_step = -1.0, 0

    def stop(step: int, images: Tensor, labels: Tensor) -> bool:
        nonlocal best_agreement, best_step
        if step < first_check or (step - first_check) % _CHECK_EVERY:
            return False
        logits = _logits(teacher, images)  # (N, K)
        agreement = float((logits.argmax(1) == labels).float().mean())
        if step == first_check and _ignores_input(torch.cat([neutral_logits, logits])):
            return True
        if agreement > best_agreement:
            best_agreement, best_step = agreement, step
        if step == first:
            return agreement >= passing
        stalled = step - best_step >= config.plateau_steps
        one_answer = first > 0 and bool((logits.argmax(1) == logits[0].argmax()).all())
        return agreement >= good_enough or (stalled and (agreement >= passing or one_answer))

    return stop


_TESTS: tuple[tuple[str, str, Verdict, str], ...] = (
    (
        "recovery_agreement",
        "min_recovery_agreement",
        "refused",
        "the model gives nearly the same answer whatever it is shown",
    ),
    # The tests below read recovered images, which are specific to the model they came
    # from: an honest model can fall short on them, so they hold for the operator.
    (
        "pool_agreement",
        "min_pool_agreement",
        "held",
        "its class names may not mean what the pool's models mean by them",
    ),
    (
        "structure",
        "min_structure",
        "held",
        "its answers follow little of the structure of the federation's images",
    ),
    (
        "trigger_gap",
        "max_trigger_gap",
        "held",
        "one class is reached by a small patch far more than the others: a possible backdoor",
    ),
)


def judge(figures: dict[str, float | None], config: ScreeningConfig) -> tuple[Verdict, str | None]:
    """Return the verdict and its reason.

    A figure on the wrong side of its threshold refuses the model (the recovery test)
    or holds it for the operator (the others); one within the hold band of it holds it.
    A refusal wins over a hold; figures that were not measured are skipped.
    """
    held: str | None = None
    for figure, setting, action, meaning in _TESTS:
        value = figures.get(figure)
        if value is None:
            continue
        threshold = float(getattr(config, setting))
        # min_* settings bound a figure from below, max_* from above.
        margin = value - threshold if setting.startswith("min_") else threshold - value
        line = f"screening: {figure} {value:.3f}, threshold {threshold:.3f} ({setting})"
        if margin < 0 and action == "refused":
            return "refused", f"{line}: {meaning}"
        if held is None and margin < 0:
            held = f"{line}: {meaning}; held for the operator"
        elif held is None and margin < config.hold_band:
            held = f"{line}: within {config.hold_band:.2f} of it, held for the operator"
    return ("held", held) if held else ("accepted", None)


def _mean_entropy(logits: Tensor) -> float:
    """Mean softmax entropy of (B, K) logits over log K."""
    logp = logits.log_softmax(1)
    entropy = -(logp.exp() * logp).sum(1).mean()
    return float(entropy / math.log(logits.shape[1]))


def _answer_entropy(answers: Tensor, classes: int) -> float:
    """Entropy of the histogram of (B,) class answers over log K."""
    share = torch.bincount(answers.cpu(), minlength=classes).float() / answers.numel()
    share = share[share > 0]
    return max(0.0, float(-(share * share.log()).sum() / math.log(classes)))


def _newest(memory: MemoryBank, key: str, device: torch.device) -> Tensor:
    """(n, C, S, S): up to `_POOL_IMAGES_PER_CLASS` newest images of pseudo-class `key`."""
    return memory.images(key)[-_POOL_IMAGES_PER_CLASS:].to(device)


def _memory_sample(memory: MemoryBank, device: torch.device) -> list[Tensor]:
    """Take the newest images of up to `_POOL_CLASSES` pseudo-classes spread over the bank."""
    keys = [pseudo.key for pseudo in memory.classes if memory.size(pseudo.key)]
    spread = keys[:: max(1, len(keys) // _POOL_CLASSES)][:_POOL_CLASSES]
    return [_newest(memory, key, device) for key in spread]


@torch.no_grad()
def _pool_agreement(
    teacher: AdaptedTeacher, memory: MemoryBank, device: torch.device, min_names: int
) -> float | None:
    held = {pseudo.key for pseudo in memory.classes}
    hits = total = names = 0
    for index, name in enumerate(teacher.task.class_names or ()):
        key = pseudo_class_key(teacher.teacher_id, index, name)
        if key in held and memory.size(key):
            images = _newest(memory, key, device)
            hits += int((teacher(images).argmax(1) == index).sum())
            total += len(images)
            names += 1
    # On one shared name, the answer measures how well another model's recovered images
    # transfer as much as what the name means (benchmarks/results/poison/).
    return hits / total if total and names >= min_names else None


@torch.no_grad()
def _structure(teacher: AdaptedTeacher, memory: MemoryBank, device: torch.device) -> float | None:
    sample = _memory_sample(memory, device)
    if len(sample) < 2:
        return None
    answers = torch.cat([teacher(images).argmax(1).cpu() for images in sample])  # (M,)
    groups = torch.cat([torch.full((len(images),), i) for i, images in enumerate(sample)])
    joint = torch.zeros(len(sample), teacher.num_classes)
    joint.index_put_((groups, answers), torch.ones(len(answers)), accumulate=True)
    joint /= joint.sum()
    p_group, p_answer = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nonzero = joint > 0
    mutual = (joint[nonzero] * (joint / (p_group * p_answer))[nonzero].log()).sum()
    answer_entropy = -(p_answer[p_answer > 0] * p_answer[p_answer > 0].log()).sum()
    return float(mutual / answer_entropy) if answer_entropy > 0 else 0.0


def _trigger_gap(
    teacher: AdaptedTeacher, images: Tensor, labels: Tensor, config: ScreeningConfig
) -> float:
    """How much more one class than the median class is reached by a small patch.

    One mask and pattern per class t, all searched at once: the images recovered for
    the other classes, stamped ``(1 - m_t) * x + m_t * p_t``, should be answered t while
    the mask's area is penalized. Each mask is then cut to its `trigger_budget` share of
    strongest pixels, and the share of images it still sends to t is that class's
    flip rate; the figure is the largest flip rate minus the median one.
    """
    classes = teacher.num_classes
    per_target = min(min(int((labels != t).sum()) for t in range(classes)), config.trigger_images)
    others = torch.stack([images[labels != t][:per_target] for t in range(classes)])
    # others: (K, M, C, S, S); one mask (K, 1, 1, S, S) and pattern (K, 1, C, S, S) per class
    _, _, channels, height, width = others.shape
    mask_logit = torch.full((classes, 1, 1, height, width), _TRIGGER_START, device=images.device)
    pattern_logit = torch.zeros((classes, 1, channels, height, width), device=images.device)
    mask_logit.requires_grad_()
    pattern_logit.requires_grad_()
    optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=0.1)
    goal = torch.arange(classes, device=images.device).repeat_interleave(per_target)  # (K*M,)
    for _ in range(config.trigger_steps):
        mask = mask_logit.sigmoid()
        stamped = (1 - mask) * others + mask * pattern_logit.sigmoid()  # (K, M, C, S, S)
        logits = teacher(stamped.flatten(0, 1))  # (K*M, K)
        area = mask.mean(dim=(1, 2, 3, 4))  # (K,)
        loss = classes * F.cross_entropy(logits, goal) + _TRIGGER_AREA_WEIGHT * area.sum()
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        optimizer.step()
    with torch.no_grad():
        keep = max(1, math.ceil(config.trigger_budget * height * width))
        flat = mask_logit.view(classes, -1)  # (K, S*S)
        cut = flat.topk(keep, dim=1).values[:, -1:]  # (K, 1)
        hard = (flat >= cut).float().view(classes, 1, 1, height, width)
        stamped = (1 - hard) * others + hard * pattern_logit.sigmoid()
        hits = teacher(stamped.flatten(0, 1)).argmax(1) == goal
        flips = hits.float().view(classes, per_target).mean(1).cpu()  # (K,)
    return float(flips.max() - flips.median())
