"""Typed progress events of a meta round, handed to the caller's callback as they happen.

A callback is any ``Callable[[EngineEvent], None]``: a CLI draws a progress bar from
them, the server logs them, a benchmark keeps the meta-val curve. An exception
raised by the callback stops the round where it is, as a kill would; the next call
resumes from the last checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CheckpointSaved",
    "EngineEvent",
    "Evaluated",
    "Phase",
    "ProgressFn",
    "RoundFinished",
    "RoundStarted",
    "ScratchRecovered",
    "SkippedTeacher",
    "StepFinished",
]

Phase = Literal["warmup", "meta"]


@dataclass(frozen=True)
class SkippedTeacher:
    """A teacher the round cannot use, and why (recorded in the manifest)."""

    teacher_id: str
    reason: str


@dataclass(frozen=True)
class RoundStarted:
    """A round begins, or resumes after `start_step` steps done before."""

    round: int
    steps: int
    start_step: int
    warmup_steps: int
    teachers: int
    skipped: tuple[SkippedTeacher, ...]
    device: str
    resumed: bool
    warm_start: bool


@dataclass(frozen=True)
class ScratchRecovered:
    """Scratch recovery (the baseline) inverted one teacher from a fresh generator."""

    round: int
    index: int
    total: int
    teacher_id: str
    seconds: float
    teacher_accuracy: float


@dataclass(frozen=True)
class StepFinished:
    """One meta-iteration is done.

    Attributes
    ----------
    phase
        ``"warmup"``: the meta-generator alone was adapted; ``"meta"``: the
        meta-learner was updated too.
    teacher_ids
        The teachers drawn this step, in order.
    generator_loss
        Mean over teachers of the last adaptation step's loss (None for scratch).
    teacher_accuracy
        Mean share of recovered images the teachers classify as their target.
    recovery_seconds
        Wall time of this step's recoveries (0 when they were recovered beforehand).
    distill_loss
        Mean distillation loss over the step's teachers (None in warm-up).
    replay_loss
        Mean query loss of MAML replay (None when the memory was not ready yet).
    replay_tasks
        Tasks replayed this step.
    seconds
        Wall time of the whole step.
    alignment
        Mean cosine of the teachers' distillation gradients (`DistillStats.alignment`;
        None in warm-up or with one teacher).
    """

    round: int
    step: int
    steps: int
    phase: Phase
    teacher_ids: tuple[str, ...]
    generator_loss: float | None
    teacher_accuracy: float
    recovery_seconds: float
    distill_loss: float | None
    replay_loss: float | None
    replay_tasks: int
    seconds: float
    alignment: float | None = None


@dataclass(frozen=True)
class Evaluated:
    """The meta-learner was scored on meta-val episodes; `best` when selection kept it."""

    round: int
    step: int
    split: str
    mean: float
    ci95: float
    episodes: int
    best: bool


@dataclass(frozen=True)
class CheckpointSaved:
    """The round's state after `step` steps is on disk; a kill from here on resumes there."""

    round: int
    step: int
    path: str


@dataclass(frozen=True)
class RoundFinished:
    """The round is done; `selected_step` is the step whose state the initialization is."""

    round: int
    steps: int
    selected_step: int
    selection: str
    seconds: float


EngineEvent = (
    RoundStarted | ScratchRecovered | StepFinished | Evaluated | CheckpointSaved | RoundFinished
)
ProgressFn = Callable[[EngineEvent], None]
