"""One meta round end to end: accepted teachers in, a meta-learned initialization out.

Each step draws `teachers_per_step` teachers from the pool (with replacement), then

- FIVE (``recovery="five"``): the meta-generator adapts to each in k steps and takes
  its meta-step; during warm-up that is all. After warm-up the current meta-learner
  is FIVE's student (the adversarial term), every recovered batch goes to the memory
  bank, and BELL updates the meta-learner: distillation on this step's batches
  (iGA, or summed gradients without it), then MAML replay from the memory;
- scratch (``recovery="scratch"``, the baseline): every teacher was inverted once
  from a fresh generator before the first step, all of it in memory; each step runs
  the same BELL update on the drawn teachers' fixed images. Warm-up steps are
  skipped, so both take the same number of meta-learner updates at the same step
  numbers.

Meta-val episodes, when given, are scored every `validate_every` steps and the best
state is the initialization (never the test split; without episodes the last state
is). The state is checkpointed every `checkpoint_every` steps; calling again with the
same teachers and config after a kill resumes there and ends exactly where an
uninterrupted run would. A finished round's state carries into the next call (a new
round, warm start) unless ``fresh=True``: training goes on from its last state, and
step 0 scores its release; a warm-started round draws only the teachers no earlier
round learned from, if it has any (`EngineConfig.continual`). CPU and CUDA take the
same path: every random draw comes from one CPU generator, or from a teacher's own
generator seeded by it (so a teacher's draws do not depend on the teachers before it).

Several processes (`free_common.engine.distributed`, torch's launcher) run one round
together: each adapts and reads its share of a step's teachers (`free_common.engine.shard`)
and gets every other's results, so all hold the same memory bank and run BELL on the
same inputs; rank 0 writes the checkpoints. They compute what one process computes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from free_common.engine.checkpoint import clear_checkpoint, read_checkpoint, write_checkpoint
from free_common.engine.config import EngineConfig, config_matches, config_to_dict
from free_common.engine.distributed import Workers, current
from free_common.engine.events import (
    CheckpointSaved,
    EngineEvent,
    Evaluated,
    Phase,
    ProgressFn,
    RoundFinished,
    RoundStarted,
    ScratchRecovered,
    StepFinished,
)
from free_common.engine.result import (
    EvalPoint,
    RecoveryRecord,
    RoundResult,
    make_initialization,
)
from free_common.engine.shard import gather_in_order, sum_in_order, teacher_rngs
from free_common.engine.state import (
    TrainingState,
    carry_state,
    new_state,
    restore_state,
    state_record,
)
from free_common.engine.teachers import EngineTeacher, StoredTeacher, TeacherPool, TeacherView
from free_common.errors import CheckpointError, ConfigError, NonFiniteLoss
from free_common.inversion.five import Recovery, StudentFn
from free_common.inversion.scratch import scratch_invert
from free_common.inversion.teacher import distillation_targets, teacher_labels
from free_common.memory.episode import Episode
from free_common.meta.bell import bell_update, set_outer_lr
from free_common.meta.episodes import EpisodeLike
from free_common.meta.evaluate import EvalResult, evaluate
from free_common.meta.functional import as_student
from free_common.meta.iga import KdBatch
from free_common.meta.norms import NormPin, rescale_weights, scale_free_weights, weight_norms
from free_common.meta.selection import VALIDATION_SPLIT

__all__ = ["carried_state", "finished_round", "resolve_device", "run_round"]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda"`` or a torch device.

    Raises
    ------
    ConfigError
        CUDA asked for where torch sees none, or an unknown name.
    """
    if isinstance(device, torch.device):
        chosen = device
    elif device == "auto":
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            chosen = torch.device(device)
        except RuntimeError:
            raise ConfigError(f"unknown device {device!r:.40}; use auto, cpu or cuda") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA was asked for but torch sees no GPU here; use auto or cpu")
    if chosen.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {chosen} is not supported; use auto, cpu or cuda")
    return chosen


def run_round(
    teachers: Sequence[EngineTeacher | StoredTeacher],
    config: EngineConfig,
    workdir: Path,
    *,
    validation: Sequence[EpisodeLike] | None = None,
    device: str | torch.device = "auto",
    on_event: ProgressFn | None = None,
    fresh: bool = False,
    workers: Workers | None = None,
) -> RoundResult:
    """Run (or resume) one meta round and return the meta-learned initialization.

    Parameters
    ----------
    teachers
        The accepted teachers, in a stable order. Teachers with fewer classes than
        the learner's ways are skipped (reason recorded); those with more are seen
        through `ways` random classes at a time. A `StoredTeacher` is converted only
        when a step draws it, so a pool of thousands costs what its draws cost.
    config
        What to run (`free_common.engine.config.preset` gives the presets).
    workdir
        The engine's folder: checkpoints of the round in progress, and the state a
        finished round carries into the next call.
    validation
        Meta-val episodes for model selection (episodes of meta-val classes only;
        `config.validation` says how many are scored). None returns the last state.
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or a torch device.
    on_event
        Receives progress events; an exception it raises stops the round (resume
        by calling again).
    fresh
        Discard the folder's state and start over from the seed.
    workers
        The round's processes (`free_common.engine.distributed`); by default the
        initialized process group, else this process alone. With several, every rank
        calls `run_round` with the same arguments and folder: each step's teachers are
        shared out, rank 0 writes the checkpoints, and every rank returns the same result.
        Events reach every rank's `on_event`.

    Returns
    -------
    RoundResult

    Raises
    ------
    TooFewTeachers
        Fewer usable teachers than `config.min_teachers`.
    NonFiniteLoss
        A loss or weight turned NaN or infinite; the last good checkpoint is kept.
    CheckpointError
        The folder holds an unfinished round of other teachers or settings, or a
        damaged checkpoint.
    """
    torch_device = resolve_device(device)
    workers = workers or current()
    pool = TeacherPool(teachers, config.learner.ways, config.min_teachers, torch_device)
    if workers.is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        if fresh:
            clear_checkpoint(workdir)
    workers.barrier()  # every rank reads the folder as rank 0 left it
    state, resumed, warm = _load_or_start(config, pool, torch_device, workdir)
    runner = _Round(config, pool, torch_device, workdir, state, validation, on_event, workers)
    return runner.run(resumed=resumed, warm_start=warm)


def finished_round(
    teachers: Sequence[EngineTeacher | StoredTeacher],
    config: EngineConfig,
    workdir: Path,
    *,
    device: str | torch.device = "auto",
) -> RoundResult | None:
    """Return the result of the round `workdir` finished with these teachers and config.

    Nothing is run: the finished checkpoint is read back into the same `RoundResult` the
    round returned (the same initialization bytes). None when the folder holds no
    finished round of exactly these teachers and settings.
    """
    torch_device = resolve_device(device)
    pool = TeacherPool(teachers, config.learner.ways, config.min_teachers, torch_device)
    saved = read_checkpoint(workdir)
    if saved is None:
        return None
    tensors, record = saved
    if not record.get("finished") or not _same_round(record, config, pool):
        return None
    state = restore_state(config, torch_device, tensors, record)
    return _Round(config, pool, torch_device, workdir, state, None, None, Workers())._result()


def carried_state(
    config: EngineConfig, workdir: Path, device: str | torch.device = "auto"
) -> TrainingState | None:
    """Return the state a finished round in `workdir` carries into the next, or None.

    It holds the meta-generator, meta-learner and memory bank the next round starts
    from (what screening measures a new model against).
    """
    saved = read_checkpoint(workdir)
    if saved is None or not saved[1].get("finished"):
        return None
    return carry_state(config, resolve_device(device), *saved)


def _same_round(record: dict[str, Any], config: EngineConfig, pool: TeacherPool) -> bool:
    """Tell whether a checkpoint record is of this config and these teachers."""
    return config_matches(record.get("config", {}), config) and (
        record.get("teacher_ids") == pool.teacher_ids
    )


def _load_or_start(
    config: EngineConfig, pool: TeacherPool, device: torch.device, workdir: Path
) -> tuple[TrainingState, bool, bool]:
    saved = read_checkpoint(workdir)
    if saved is None:
        return new_state(config, device), False, False
    tensors, record = saved
    if record.get("finished"):
        return carry_state(config, device, tensors, record), False, True
    if not _same_round(record, config, pool):
        raise CheckpointError(
            f"{workdir} holds unfinished round {record.get('round')} of other teachers or "
            "settings: run it again with the same teachers and config to resume it, or pass "
            "fresh=True to start over"
        )
    return restore_state(config, device, tensors, record), True, False


class _Round:
    """The step loop of one round over a `TrainingState`."""

    def __init__(
        self,
        config: EngineConfig,
        pool: TeacherPool,
        device: torch.device,
        workdir: Path,
        state: TrainingState,
        validation: Sequence[EpisodeLike] | None,
        on_event: ProgressFn | None,
        workers: Workers,
    ) -> None:
        self.config = config
        self.workers = workers
        self.pool = pool
        self.device = device
        self.workdir = workdir
        self.state = state
        self.validation = validation
        self._emit: Callable[[EngineEvent], None] = on_event or (lambda _event: None)
        self._last_checkpoint: int | None = state.step if state.step else None
        self._clock = time.perf_counter()
        self._draw_among = self._continual_draws()

    def _continual_draws(self) -> list[int] | None:
        """Pool indices a continual round draws (its new teachers), or None for all."""
        if not self.config.continual or not self.state.seen:
            return None
        seen = set(self.state.seen)
        new = [t for t in self.pool.teacher_ids if t not in seen]
        return self.pool.indices(new) if new else None

    def run(self, *, resumed: bool, warm_start: bool) -> RoundResult:
        state, config = self.state, self.config
        self._emit(
            RoundStarted(
                round=state.round,
                steps=config.steps,
                start_step=state.step,
                warmup_steps=state.warmup,
                teachers=len(self.pool),
                skipped=tuple(self.pool.skipped),
                device=str(self.device),
                resumed=resumed,
                warm_start=warm_start,
            )
        )
        if not state.started:
            self._start()
        handle = NormPin(state.learner, state.pinned).attach(state.optimizer)
        try:
            if config.recovery == "scratch" and not state.scratch:
                self._recover_from_scratch()
            while state.step < config.steps:
                state.step += 1
                self._step()
                last = state.step == config.steps
                if self._validation_due(last):
                    self._validate()
                if last or state.step % config.checkpoint_every == 0:
                    self._checkpoint(finished=last)
        finally:
            handle.remove()
        return self._result()

    def _start(self) -> None:
        """Before the first step: choose a fresh learner's scale, pin norms, score step 0.

        Step 0 (the initialization itself, or the release a warm start carried in) is a
        candidate of the selection like any later state, so a round never hands back
        a model that meta-val scores below where it began.
        """
        state, config = self.state, self.config
        names = scale_free_weights(state.learner)
        scored: EvalResult | None = None
        if state.round == 1:
            scale, scored = self._choose_scale(names)
            rescale_weights(state.learner, names, scale)
            state.init_scale = scale
            set_outer_lr(state.optimizer, config.bell, scale)
        if config.bell.pin_norms and not state.pinned:
            state.pinned = weight_norms(state.learner, names)
        if self.validation is not None:
            self._validate_start(scored)
        state.carried_release = None
        state.started = True

    def _validate_start(self, scored: EvalResult | None) -> None:
        """Score step 0: a warm round's carried release, else the initialization itself.

        A warm round trains on from the last round's last state, but what it is
        offered to begin with is what that round handed back.
        """
        state = self.state
        if state.carried_release is None:
            self._validate(scored)
            return
        last = {name: t.clone() for name, t in state.learner.state_dict().items()}
        state.learner.load_state_dict(state.carried_release)
        self._validate()
        state.learner.load_state_dict(last)

    def _choose_scale(self, names: list[str]) -> tuple[float, EvalResult | None]:
        """Return the candidate scale whose rescaled initialization scores best on meta-val."""
        scales = self.config.init_scales
        if self.validation is None or len(scales) == 1:
            return scales[0], None
        best: tuple[float, EvalResult] | None = None
        for scale in scales:
            candidate = copy.deepcopy(self.state.learner)
            rescale_weights(candidate, names, scale)
            result = evaluate(candidate, self.validation, self.config.validation, VALIDATION_SPLIT)
            self.state.scale_scores[f"{scale:g}"] = result.mean
            if best is None or result.mean > best[1].mean:
                best = (scale, result)
        assert best is not None
        return best

    # -- steps ------------------------------------------------------------------------------

    def _step(self) -> None:
        state, config = self.state, self.config
        started = time.perf_counter()
        views = self.pool.draw(config.teachers_per_step, state.rng, self._draw_among)
        rngs = teacher_rngs(len(views), state.rng)
        if config.recovery == "scratch":
            batches = [self._fixed_images(view) for view in views]
            accuracy = _mean([state.scratch[v.teacher_id].teacher_accuracy for v in views])
            generator_loss, recovery_seconds = None, 0.0
        else:
            warm = state.step <= state.warmup
            student = None if warm else as_student(state.learner)
            recoveries = self._recover(views, rngs, student)
            last_losses = [r.losses[-1] for r in recoveries]
            self._check_finite("generator loss", last_losses)
            generator_loss = _mean(last_losses)
            accuracy = _mean([r.teacher_accuracy for r in recoveries])
            recovery_seconds = sum(r.seconds for r in recoveries)
            if warm:
                self._report(views, "warmup", started, generator_loss, accuracy, recovery_seconds)
                return
            self._remember(views, recoveries)
            batches = [r.images for r in recoveries]
        distill, replay_loss, tasks, alignment = self._meta_update(views, batches, rngs)
        self._report(
            views,
            "meta",
            started,
            generator_loss,
            accuracy,
            recovery_seconds,
            distill,
            replay_loss,
            tasks,
            alignment,
        )

    def _recover(
        self, views: list[TeacherView], rngs: list[torch.Generator], student: StudentFn | None
    ) -> list[Recovery]:
        """FIVE's step with the teachers shared out over the ranks; every rank gets all recoveries.

        Each rank adapts its own teachers; their meta-gradients are summed over all
        teachers in teacher order, so every rank takes the same meta-step.
        """
        meta, workers = self.state.meta_generator, self.workers
        owned: dict[int, Recovery] = {}
        grads: dict[int, list[Tensor]] = {}
        for index, (view, rng) in enumerate(zip(views, rngs, strict=True)):
            if workers.owns(index):
                owned[index], grads[index] = meta.adapt(view.teacher, rng, student)
        params = list(meta.generator.parameters())
        total = sum_in_order(workers, len(views), grads, params)
        if total is not None:
            meta.meta_step(total)
        return gather_in_order(workers, len(views), owned, self.device)

    def _report(
        self,
        views: list[TeacherView],
        phase: Phase,
        started: float,
        generator_loss: float | None,
        accuracy: float,
        recovery_seconds: float,
        distill_loss: float | None = None,
        replay_loss: float | None = None,
        replay_tasks: int = 0,
        alignment: float | None = None,
    ) -> None:
        state = self.state
        self._emit(
            StepFinished(
                state.round,
                state.step,
                self.config.steps,
                phase,
                tuple(v.teacher_id for v in views),
                generator_loss,
                accuracy,
                recovery_seconds,
                distill_loss,
                replay_loss,
                replay_tasks,
                time.perf_counter() - started,
                alignment,
            )
        )

    def _remember(self, views: list[TeacherView], recoveries: list[Recovery]) -> None:
        """Every recovered batch feeds the memory (the official code kept only the last).

        Images go in under the teacher's own reading of them, not their target class.
        """
        state = self.state
        for view, recovery in zip(views, recoveries, strict=True):
            labels = view.original_labels(teacher_labels(view.teacher, recovery.images))
            state.memory.add(view.teacher_id, recovery.images, labels, view.class_names)
            state.recoveries.append(
                RecoveryRecord(
                    state.step,
                    view.teacher_id,
                    "five",
                    recovery.seconds,
                    recovery.teacher_accuracy,
                )
            )

    def _meta_update(
        self, views: list[TeacherView], images: list[Tensor], rngs: list[torch.Generator]
    ) -> tuple[float, float | None, int, float | None]:
        """BELL on this step's teachers: mean distillation loss, replay loss, tasks, alignment.

        Each teacher's distillation pair is read on the rank that owns it and shared;
        BELL itself runs replicated on every rank: iGA's inner steps go from teacher to
        teacher in turn, so they cannot be split without changing the method.
        """
        state, config = self.state, self.config
        owned: dict[int, KdBatch] = {}
        for index, (view, batch, rng) in enumerate(zip(views, images, rngs, strict=True)):
            if self.workers.owns(index):
                inputs, logits = distillation_targets(view.teacher, batch, config.five.augment, rng)
                owned[index] = KdBatch(inputs.detach(), logits.detach())
        batches = gather_in_order(self.workers, len(views), owned, self.device)
        stats = bell_update(
            state.learner, state.optimizer, batches, self._task_sampler(), config.bell
        )
        self._check_finite("distillation loss", stats.distill.losses)
        replay_loss, tasks = None, 0
        if stats.replay is not None:
            self._check_finite("replay loss", stats.replay.losses)
            replay_loss, tasks = _mean(stats.replay.losses), stats.replay.tasks
        finite = torch.stack([p.detach().isfinite().all() for p in state.learner.parameters()])
        self._check_finite("meta-learner's weights", [0.0 if bool(finite.all()) else math.nan])
        return _mean(stats.distill.losses), replay_loss, tasks, stats.distill.alignment

    def _task_sampler(self) -> Callable[[], Episode] | None:
        """Draws tasks from memory, or None while fewer than `ways` classes can fill one."""
        memory, maml = self.state.memory, self.config.bell.maml
        need = maml.shots + maml.queries
        ready = sum(1 for c in memory.classes if memory.size(c.key) >= need)
        if ready < maml.ways:
            return None
        rng, device = self.state.rng, self.device
        return lambda: memory.sample_task(maml.ways, maml.shots, maml.queries, rng, device)

    def _fixed_images(self, view: TeacherView) -> Tensor:
        """Scratch baseline: the drawn teacher's recovered images of the viewed classes."""
        recovery = self.state.scratch[view.teacher_id]
        wanted = torch.tensor(view.classes, device=recovery.labels.device)
        return recovery.images[torch.isin(recovery.labels, wanted)]

    def _recover_from_scratch(self) -> None:
        """Invert every teacher once from a fresh generator; all of it goes to memory."""
        state, config = self.state, self.config
        for index in range(len(self.pool)):
            teacher = self.pool.full(index)
            recovery = scratch_invert(
                teacher, config.generator, config.scratch, state.rng, self.device
            )
            self._check_finite("scratch inversion loss", recovery.losses)
            state.scratch[teacher.teacher_id] = recovery
            labels = teacher_labels(teacher, recovery.images)
            state.memory.add(teacher.teacher_id, recovery.images, labels, teacher.task.class_names)
            state.recoveries.append(
                RecoveryRecord(
                    0, teacher.teacher_id, "scratch", recovery.seconds, recovery.teacher_accuracy
                )
            )
            self._emit(
                ScratchRecovered(
                    state.round,
                    index + 1,
                    len(self.pool),
                    teacher.teacher_id,
                    recovery.seconds,
                    recovery.teacher_accuracy,
                )
            )
        # Warm-up adapts a meta-generator; the baseline has none, so it starts after it.
        state.step = state.warmup
        self._checkpoint(finished=False)

    # -- evaluation, checkpoints, result ------------------------------------------------------

    def _validation_due(self, last: bool) -> bool:
        state = self.state
        if self.validation is None or state.step <= state.warmup:
            return False
        return last or (state.step - state.warmup) % self.config.validate_every == 0

    def _validate(self, scored: EvalResult | None = None) -> None:
        """Score the learner on meta-val (or take `scored`, its score already) and offer it."""
        state = self.state
        assert self.validation is not None
        result = scored or evaluate(
            state.learner, self.validation, self.config.validation, VALIDATION_SPLIT
        )
        best = state.selector.offer(result, state.learner, state.step)
        state.curve.append(EvalPoint(state.step, result.mean, result.ci95, result.episodes))
        self._emit(
            Evaluated(
                state.round,
                state.step,
                result.split,
                result.mean,
                result.ci95,
                result.episodes,
                best,
            )
        )

    def _checkpoint(self, *, finished: bool) -> None:
        state = self.state
        self._tick()
        written: str | None = None
        if self.workers.is_main:
            tensors, record = state_record(state)
            record.update(
                finished=finished,
                steps=self.config.steps,
                config=config_to_dict(self.config),
                teacher_ids=self.pool.teacher_ids,
                skipped=[dataclasses.asdict(s) for s in self.pool.skipped],
                device=str(self.device),
            )
            written = str(write_checkpoint(self.workdir, tensors, record))
        # Also the barrier: no rank goes on, or reports the checkpoint, before it is on disk.
        path = self.workers.all_gather_objects(written)[0]
        self._last_checkpoint = state.step
        self._emit(CheckpointSaved(state.round, state.step, path))

    def _tick(self) -> None:
        now = time.perf_counter()
        self.state.seconds += now - self._clock
        self._clock = now

    def _check_finite(self, what: str, values: Sequence[float]) -> None:
        bad = next((v for v in values if not math.isfinite(v)), None)
        if bad is None:
            return
        kept = (
            f"its last good checkpoint (step {self._last_checkpoint}) is kept in {self.workdir}"
            if self._last_checkpoint is not None
            else "no checkpoint had been written yet"
        )
        raise NonFiniteLoss(
            f"round {self.state.round} step {self.state.step}: the {what} is {bad}; the round "
            f"stopped and {kept}: lower the learning rates or check the teachers, then resume "
            "(same call) or start over (fresh=True)"
        )

    def _result(self) -> RoundResult:
        state, config = self.state, self.config
        selector = state.selector
        if selector.state is not None and selector.best_step is not None:
            chosen, step, selection = selector.state, selector.best_step, VALIDATION_SPLIT
        else:
            chosen, step, selection = state.learner.state_dict(), state.step, "last"
        records = state.recoveries
        best = selector.best
        metrics: dict[str, Any] = {
            "meta_val": None if best is None else dataclasses.asdict(best),
            "teacher_accuracy": _mean([r.teacher_accuracy for r in records]) if records else None,
            "recovery_seconds_per_teacher": _mean([r.seconds for r in records])
            if records
            else None,
            "recoveries": len(records),
            "round_seconds": state.seconds,
            "init_scale": state.init_scale,
            "init_scale_scores": dict(state.scale_scores),
            "pinned_norms": bool(state.pinned),
        }
        init = make_initialization(
            chosen,
            config.learner,
            {
                "round": state.round,
                "method": _method(config),
                "steps": config.steps,
                "selected_step": step,
                "selection": selection,
                "teacher_ids": self.pool.teacher_ids,
                "new_teacher_ids": self._drawn_ids(),
                "seen_teacher_ids": sorted({*state.seen, *self.pool.teacher_ids}),
                "skipped_teachers": [dataclasses.asdict(s) for s in self.pool.skipped],
                "config": config_to_dict(config),
                "seed": config.seed,
                "device": str(self.device),
                "metrics": metrics,
            },
        )
        self._emit(RoundFinished(state.round, config.steps, step, selection, state.seconds))
        return RoundResult(
            round=state.round,
            initialization=init,
            curve=tuple(state.curve),
            recoveries=tuple(state.recoveries),
            skipped=tuple(self.pool.skipped),
            teacher_ids=tuple(self.pool.teacher_ids),
            selected_step=step,
            seconds=state.seconds,
            learner=state.learner,
            meta_generator=state.meta_generator,
            scratch=dict(state.scratch),
            init_scale=state.init_scale,
        )

    def _drawn_ids(self) -> list[str]:
        """Ids of the teachers this round's steps drew from (all of the pool unless continual)."""
        ids = self.pool.teacher_ids
        return ids if self._draw_among is None else [ids[i] for i in self._draw_among]


def _method(config: EngineConfig) -> str:
    if config.recovery == "scratch":
        return "scratch"
    if not config.bell.replay_enabled:
        return "distill"
    return "free" if config.bell.use_iga else "free-no-iga"


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan
