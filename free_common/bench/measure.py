"""Measurements of a benchmark run: recovery speed and fidelity, and few-shot accuracy.

Recovery is timed in this process on the same teachers and the same batch for both
methods: FIVE adapts the warmed-up meta-generator of the finished FREE round to each
teacher in its k steps (with the adversarial term against the final meta-learner, as
during training, and with cross-entropy alone), and scratch inversion's times are the
scratch round's own, 200 steps from a fresh generator per teacher.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from free_common.data.episodes import EpisodeSampler
from free_common.data.imageset import ImageSet
from free_common.engine import EngineConfig, EngineTeacher, RoundResult
from free_common.engine.teachers import TeacherPool
from free_common.inversion.five import MetaGenerator, Recovery
from free_common.meta.config import EvalConfig
from free_common.meta.episodes import EpisodeLike
from free_common.meta.evaluate import (
    EvalResult,
    confidence_interval,
    evaluate,
    finetune_accuracy,
)
from free_common.meta.functional import as_student

__all__ = [
    "TEST_QUERIES",
    "EpisodeSet",
    "RecoveryReport",
    "TeacherRecovery",
    "episode_accuracies",
    "evaluate_models",
    "measure_recovery",
    "meta_test_episodes",
    "meta_val_episodes",
    "paired_difference",
]

TEST_QUERIES = 15
"""Queries per class of a meta-test episode (the paper's protocol)."""


@dataclass(frozen=True)
class _Episode:
    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor


class EpisodeSet(Sequence[EpisodeLike]):
    """The first `count` episodes of a sampler, drawn on demand, optionally reshaped.

    Episode ``i`` depends only on the sampler's seed and ``i``, so every method and
    every evaluation during training sees the same tasks, without holding them all.

    Parameters
    ----------
    sampler
        Draws episode ``i`` of one split.
    count
        How many episodes the set has.
    channels, side
        Images are resized (bilinear) and grey is repeated to colour to fit the
        meta-learner's input, e.g. 28 px Fashion-MNIST for a 32 px learner.
    """

    def __init__(self, sampler: EpisodeSampler, count: int, channels: int, side: int) -> None:
        self.sampler, self.size = sampler, count
        self.channels, self.side = channels, side

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> EpisodeLike:  # type: ignore[override]
        if not 0 <= index < self.size:
            raise IndexError(index)
        episode = self.sampler.episode(index)
        return _Episode(
            self._fit(episode.support_x),
            episode.support_y,
            self._fit(episode.query_x),
            episode.query_y,
        )

    def _fit(self, images: Tensor) -> Tensor:
        if images.shape[-1] != self.side or images.shape[-2] != self.side:
            images = F.interpolate(
                images, size=(self.side, self.side), mode="bilinear", antialias=True
            )
        if images.shape[1] != self.channels:
            images = images.expand(-1, self.channels, -1, -1)
        return images.clamp(0.0, 1.0)


def meta_val_episodes(split: ImageSet, config: EngineConfig) -> EpisodeSet:
    """Return the meta-val episodes a benchmark round selects on (config shape and seed)."""
    spec, val = config.learner, config.validation
    sampler = EpisodeSampler(split, spec.ways, val.shots, val.queries, config.seed)
    return EpisodeSet(sampler, val.episodes, spec.channels, spec.image_size)


def meta_test_episodes(split: ImageSet, config: EngineConfig, shots: int, count: int) -> EpisodeSet:
    """`count` meta-test episodes of `shots` shots, the same for every method of a benchmark."""
    spec = config.learner
    sampler = EpisodeSampler(split, spec.ways, shots, TEST_QUERIES, config.seed + 1000 + shots)
    return EpisodeSet(sampler, count, spec.channels, spec.image_size)


def episode_accuracies(
    model: nn.Module, episodes: Sequence[EpisodeLike], config: EngineConfig, shots: int
) -> list[float]:
    """Query accuracy of `model` on each episode under the paper's test adaptation.

    Kept per episode so that two models scored on the same episodes can be compared
    pair by pair (`paired_difference`), a far tighter interval than two means.
    """
    base = dataclasses.replace(
        config.validation, shots=shots, queries=TEST_QUERIES, episodes=len(episodes)
    )
    return [finetune_accuracy(model, episode, base) for episode in episodes]


def paired_difference(first: Sequence[float], second: Sequence[float]) -> dict[str, float]:
    """Mean and 95% half-width of the episode-by-episode difference ``first - second``."""
    mean, ci95 = confidence_interval([a - b for a, b in zip(first, second, strict=True)])
    return {"mean": mean, "ci95": ci95}


@dataclass(frozen=True)
class TeacherRecovery:
    """One teacher recovered three ways, for the numbers and the pictures.

    Attributes
    ----------
    teacher_id, classes
        The teacher and its classes shown (its own indices).
    five_adv, five_ce
        FIVE's first recovery with the adversarial term on, and with cross-entropy alone.
    five_adv_seconds, five_ce_seconds
        Median wall time over the repeated FIVE recoveries (a few seconds long, they
        are timed several times so that one hiccup of a shared machine does not decide).
    scratch
        The scratch round's recovery of the teacher (200 steps: long enough to
        average such hiccups out); None when the scratch round was not run.
    """

    teacher_id: str
    classes: tuple[int, ...]
    five_adv: Recovery
    five_ce: Recovery
    five_adv_seconds: float
    five_ce_seconds: float
    scratch: Recovery | None


@dataclass(frozen=True)
class RecoveryReport:
    """Recovery speed and fidelity over the same teachers."""

    teachers: tuple[TeacherRecovery, ...]
    in_run_accuracy: float
    in_run_seconds: float

    def summary(self) -> dict[str, Any]:
        """Return the ``recovery`` block of results.json."""
        adv = [t.five_adv for t in self.teachers]
        ce = [t.five_ce for t in self.teachers]
        scratch = [t.scratch for t in self.teachers if t.scratch is not None]
        free_seconds = _mean([t.five_adv_seconds for t in self.teachers])
        scratch_seconds = _mean([r.seconds for r in scratch]) if scratch else None
        return {
            "free_seconds_per_teacher": free_seconds,
            "scratch_seconds_per_teacher": scratch_seconds,
            "speedup": None if scratch_seconds is None else scratch_seconds / free_seconds,
            "free_teacher_accuracy": _mean([r.teacher_accuracy for r in ce]),
            "free_teacher_accuracy_adv": _mean([r.teacher_accuracy for r in adv]),
            "scratch_teacher_accuracy": (
                _mean([r.teacher_accuracy for r in scratch]) if scratch else None
            ),
            "free_seconds_per_teacher_ce": _mean([t.five_ce_seconds for t in self.teachers]),
            "free_teacher_accuracy_in_run": self.in_run_accuracy,
            "free_seconds_per_teacher_in_run": self.in_run_seconds,
            "teachers": len(self.teachers),
            "images_per_teacher": int(adv[0].labels.numel()) if adv else 0,
            "free_steps": len(adv[0].losses) if adv else 0,
            "scratch_steps": len(scratch[0].losses) if scratch else 0,
        }


def measure_recovery(
    teachers: Sequence[EngineTeacher],
    free: RoundResult,
    scratch: RoundResult | None,
    config: EngineConfig,
    device: torch.device,
    repeats: int = 3,
) -> RecoveryReport:
    """Time and score FIVE's k-step recovery on every teacher the scratch round recovered.

    Parameters
    ----------
    teachers
        The benchmark's teachers (those the rounds used are measured).
    free
        The finished FREE round: its meta-generator is warmed up, its meta-learner is
        the adversarial term's student.
    scratch
        The finished scratch round: its recoveries give scratch times and accuracies
        (None: FIVE alone is measured, on the FREE round's teachers).
    config
        The FREE round's config (FIVE settings).
    device
        Where to run.
    repeats
        FIVE recoveries per teacher and objective; their median time is reported.
    """
    measured_ids = set(free.teacher_ids) if scratch is None else set(scratch.scratch)
    pool = TeacherPool(
        [t for t in teachers if t.teacher_id in measured_ids], config.learner.ways, 1, device
    )
    rng = torch.Generator().manual_seed(config.seed + 2)
    generator = free.meta_generator.generator
    # The same batch for both: FIVE is timed at scratch inversion's images per class.
    five = dataclasses.replace(config.five, images_per_class=config.scratch.images_per_class)
    with_adv = MetaGenerator(generator, five)
    ce_only = MetaGenerator(generator, dataclasses.replace(five, adv_weight=0.0))
    student = as_student(free.learner)
    # One untimed adaptation first: the first call pays one-off allocation costs.
    with_adv.adapt(pool.view(0, rng).teacher, rng, student)
    measured = []
    for index in range(len(pool)):
        view = pool.view(index, rng)
        adv = [with_adv.adapt(view.teacher, rng, student)[0] for _ in range(repeats)]
        ce = [ce_only.adapt(view.teacher, rng, None)[0] for _ in range(repeats)]
        measured.append(
            TeacherRecovery(
                view.teacher_id,
                view.classes,
                adv[0],
                ce[0],
                statistics.median(r.seconds for r in adv),
                statistics.median(r.seconds for r in ce),
                None if scratch is None else scratch.scratch[view.teacher_id],
            )
        )
    in_run = [r for r in free.recoveries if r.kind == "five"]
    return RecoveryReport(
        tuple(measured),
        _mean([r.teacher_accuracy for r in in_run]),
        _mean([r.seconds for r in in_run]),
    )


def evaluate_models(
    models: dict[str, nn.Module],
    episodes: Callable[[int], Sequence[EpisodeLike]],
    base: EvalConfig,
    shots: Sequence[int],
    split: str,
    device: torch.device,
    on_done: Callable[[str, int, EvalResult], None] | None = None,
) -> list[dict[str, Any]]:
    """Score every model on the same episodes for each shot count.

    Parameters
    ----------
    models
        Method name -> initialization.
    episodes
        Shot count -> the episodes to score (the same for every model).
    base
        Ways, queries, episode count, fine-tuning steps and lr.
    shots
        Shot counts to score, e.g. (1, 5).
    split
        Name recorded with each result.
    device
        Where to fine-tune.
    on_done
        Called with (method, shots, result) after each evaluation.

    Returns
    -------
    list of dict
        One ``{"method", "ways", "shots", "episodes", "split", "mean", "ci95"}`` per pair.
    """
    rows = []
    for shot in shots:
        config = dataclasses.replace(base, shots=shot)
        tasks = episodes(shot)
        for method, model in models.items():
            result = evaluate(model.to(device), tasks, config, split)
            if on_done is not None:
                on_done(method, shot, result)
            rows.append(
                {
                    "method": method,
                    "ways": config.ways,
                    "shots": shot,
                    "episodes": result.episodes,
                    "split": split,
                    "mean": result.mean,
                    "ci95": result.ci95,
                }
            )
    return rows


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan
