"""The round's teacher pool: which accepted teachers it can use, and views of `ways` classes.

The meta-learner learns `ways`-way tasks and distils each teacher through a head of
`ways` outputs, so a teacher must offer at least `ways` classes:

- exactly `ways`: used as it is;
- more: each time it is drawn, `ways` of its classes are drawn too, and the teacher is
  seen through those logits only (a softmax restricted to a subset of classes is the
  teacher's distribution conditioned on that subset, so distilling it stays sound);
  its images go to the memory under their original class index;
- fewer: skipped, with the reason recorded in the round's manifest.

A pool may hold thousands of teachers while a step draws a few, so a teacher may come
as a `StoredTeacher`, converted only when drawn; the pool keeps the most recently drawn
of those (`cache_size`), so its memory does not grow with the pool.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from free_common.engine.events import SkippedTeacher
from free_common.errors import ConfigError, TooFewTeachers
from free_common.inversion.teacher import AdaptedTeacher
from free_common.types import TaskMetadata

__all__ = ["EngineTeacher", "StoredTeacher", "TeacherPool", "TeacherView"]


@dataclass(frozen=True)
class EngineTeacher:
    """An accepted teacher, as the engine takes it.

    Attributes
    ----------
    teacher_id
        Stable name (a submission id); pseudo-classes and the manifest use it.
    module
        Frozen classifier: normalized ``[N, *task.input_shape]`` images to logits. It
        is moved to the round's device.
    task
        What the teacher expects and predicts (intake's `TaskMetadata`).
    """

    teacher_id: str
    module: nn.Module
    task: TaskMetadata


@dataclass(frozen=True)
class StoredTeacher:
    """An accepted teacher that is converted only when a step draws it.

    Attributes
    ----------
    teacher_id, task
        As for `EngineTeacher`.
    load
        Returns the frozen classifier (as `EngineTeacher.module`); called again after
        the pool evicted it. Must give the same module every time.
    """

    teacher_id: str
    task: TaskMetadata
    load: Callable[[], nn.Module]


@dataclass(frozen=True)
class TeacherView:
    """A teacher as one step sees it: `ways` outputs, and where they come from.

    Attributes
    ----------
    teacher
        The adapted teacher with one logit per viewed class.
    classes
        The teacher's own class index behind each viewed output.
    class_names
        Every declared class name of the teacher (empty when none), by its own index.
    """

    teacher: AdaptedTeacher
    classes: tuple[int, ...]
    class_names: tuple[str, ...]

    @property
    def teacher_id(self) -> str:
        """The teacher's name."""
        return self.teacher.teacher_id

    def original_labels(self, labels: Tensor) -> Tensor:
        """Map view labels (0..ways-1) to the teacher's own class indices."""
        mapping = torch.tensor(self.classes, device=labels.device)
        return mapping[labels]


class _SelectLogits(nn.Module):
    """Keep the logits of some classes, in a given order: (B, K) -> (B, len(classes))."""

    index: Tensor

    def __init__(self, classes: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("index", torch.tensor(list(classes)), persistent=False)

    def forward(self, logits: Tensor) -> Tensor:
        """(B, K) -> (B, len(classes))."""
        return logits.index_select(1, self.index)


class TeacherPool:
    """The usable teachers of a round, and random views of them.

    Parameters
    ----------
    teachers
        The accepted teachers, in a stable order (draws index into it).
    ways
        Classes per view: the meta-learner's ways.
    min_teachers
        Fewest usable teachers a round may run with.
    device
        Where the teachers run.
    cache_size
        Stored teachers kept converted at once (the most recently used).

    Raises
    ------
    ConfigError
        Two teachers share one id.
    TooFewTeachers
        Fewer than `min_teachers` teachers are usable.
    """

    def __init__(
        self,
        teachers: Sequence[EngineTeacher | StoredTeacher],
        ways: int,
        min_teachers: int,
        device: torch.device,
        cache_size: int = 32,
    ) -> None:
        ids = [t.teacher_id for t in teachers]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ConfigError(f"teacher id {dup!r:.80} appears twice; give every teacher its own")
        self.ways = ways
        self.device = device
        self.cache_size = cache_size
        self.skipped: list[SkippedTeacher] = []
        self._usable: list[EngineTeacher | StoredTeacher] = []
        self._resident: dict[int, AdaptedTeacher] = {}  # EngineTeachers: in memory already
        self._loaded: OrderedDict[int, AdaptedTeacher] = OrderedDict()  # StoredTeachers, LRU
        for teacher in teachers:
            classes = teacher.task.num_classes
            if classes < ways:
                self.skipped.append(
                    SkippedTeacher(
                        teacher.teacher_id,
                        f"it has {classes} classes; the meta-learner learns {ways}-way tasks, "
                        f"so a teacher needs at least {ways}",
                    )
                )
                continue
            self._usable.append(teacher)
        if len(self._usable) < min_teachers:
            why = "; ".join(f"{s.teacher_id}: {s.reason}" for s in self.skipped[:3])
            raise TooFewTeachers(
                f"a meta round needs at least {min_teachers} usable accepted teachers, got "
                f"{len(self._usable)} of {len(teachers)}"
                + (f" ({len(self.skipped)} skipped; {why})" if self.skipped else "")
                + ": accept more submissions before starting a round, or lower min_teachers"
            )

    @property
    def teacher_ids(self) -> list[str]:
        """Ids of the usable teachers, in pool order."""
        return [t.teacher_id for t in self._usable]

    def __len__(self) -> int:
        return len(self._usable)

    def full(self, index: int) -> AdaptedTeacher:
        """Return the usable teacher at `index` with all its classes (converting it if stored)."""
        if index in self._resident:
            return self._resident[index]
        if index in self._loaded:
            self._loaded.move_to_end(index)
            return self._loaded[index]
        teacher = self._usable[index]
        if isinstance(teacher, EngineTeacher):
            resident = AdaptedTeacher(teacher.module, teacher.task, teacher.teacher_id)
            self._resident[index] = resident.to(self.device)
            return self._resident[index]
        loaded = AdaptedTeacher(teacher.load(), teacher.task, teacher.teacher_id)
        self._loaded[index] = loaded.to(self.device)
        while len(self._loaded) > self.cache_size:
            self._loaded.popitem(last=False)
        return self._loaded[index]

    def indices(self, teacher_ids: Sequence[str]) -> list[int]:
        """Return the pool indices of the usable teachers among `teacher_ids`, in pool order."""
        wanted = set(teacher_ids)
        return [i for i, t in enumerate(self._usable) if t.teacher_id in wanted]

    def draw(
        self, count: int, rng: torch.Generator, among: Sequence[int] | None = None
    ) -> list[TeacherView]:
        """Draw `count` teachers uniformly with replacement, each with `ways` of its classes.

        `among` restricts the draw to those pool indices (all of the pool when None).
        """
        choices = list(range(len(self._usable))) if among is None else list(among)
        picks = torch.randint(0, len(choices), (count,), generator=rng).tolist()
        return [self.view(choices[pick], rng) for pick in picks]

    def view(self, index: int, rng: torch.Generator) -> TeacherView:
        """View the teacher at `index`: all classes if it has `ways`, else a random subset."""
        teacher = self.full(index)
        task = teacher.task
        if task.num_classes == self.ways:
            return TeacherView(teacher, tuple(range(self.ways)), task.class_names)
        chosen = sorted(torch.randperm(task.num_classes, generator=rng)[: self.ways].tolist())
        names = tuple(task.class_names[c] for c in chosen) if task.class_names else ()
        narrowed = dataclasses.replace(task, num_classes=self.ways, class_names=names)
        model = nn.Sequential(teacher.model, _SelectLogits(chosen))
        device = teacher.mean.device
        view = AdaptedTeacher(model, narrowed, teacher.teacher_id).to(device)
        return TeacherView(view, tuple(chosen), task.class_names)
