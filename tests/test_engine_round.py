"""The engine's one call: a round runs, reports progress, returns safetensors plus a manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import engine_tiny as tiny
import pytest
import torch
from safetensors.torch import load as load_tensors

from free_common.engine import (
    CheckpointSaved,
    EngineEvent,
    Evaluated,
    RoundFinished,
    RoundResult,
    RoundStarted,
    ScratchRecovered,
    StepFinished,
    preset,
    read_initialization,
    run_round,
)
from free_common.engine.checkpoint import read_checkpoint as read_engine_checkpoint
from free_common.engine.teachers import TeacherPool
from free_common.errors import ConfigError, TooFewTeachers
from free_common.models.checkpoint import read_checkpoint

CPU = torch.device("cpu")


def _run(workdir: Path, **kwargs: object) -> tuple[RoundResult, list[EngineEvent]]:
    events: list[EngineEvent] = []
    options = {
        "validation": tiny.validation_episodes(),
        "device": "cpu",
        "on_event": events.append,
    }
    options.update(kwargs)
    teachers = options.pop("teachers", tiny.teachers())
    config = options.pop("config", tiny.config())
    result = run_round(teachers, config, workdir, **options)  # type: ignore[arg-type]
    return result, events


def test_round_reports_each_step_evaluation_and_checkpoint(tmp_path: Path) -> None:
    result, events = _run(tmp_path)
    assert isinstance(events[0], RoundStarted) and not events[0].resumed
    assert isinstance(events[-1], RoundFinished)
    steps = [e for e in events if isinstance(e, StepFinished)]
    assert [e.step for e in steps] == [1, 2, 3, 4, 5, 6]
    assert [e.phase for e in steps] == ["warmup"] * 2 + ["meta"] * 4
    assert all(e.distill_loss is None for e in steps[:2])
    assert all(e.distill_loss is not None and e.distill_loss >= 0 for e in steps[2:])
    assert any(e.replay_tasks > 0 for e in steps[2:])
    assert all(0 <= e.teacher_accuracy <= 1 and e.recovery_seconds > 0 for e in steps)
    evals = [e for e in events if isinstance(e, Evaluated)]
    # Step 0, the initialization itself, is scored (and a candidate) like any later state.
    assert [e.step for e in evals] == [0, 4, 6] and {e.split for e in evals} == {"meta-val"}
    assert [e.step for e in events if isinstance(e, CheckpointSaved)] == [1, 2, 3, 4, 5, 6]
    best = max(evals, key=lambda e: (e.mean, -e.step))
    assert result.selected_step == best.step


def test_initialization_is_safetensors_with_a_manifest(tmp_path: Path) -> None:
    result, _ = _run(tmp_path / "work")
    init = result.initialization
    manifest = init.manifest
    assert manifest["sha256"] == hashlib.sha256(init.data).hexdigest()
    assert manifest["architecture"] == {
        "arch": "mlp",
        "width": 16,
        "ways": 5,
        "channels": 1,
        "image_size": 16,
    }
    assert manifest["teacher_ids"] == ["teacher-0", "teacher-1", "teacher-2"]
    assert manifest["selection"] == "meta-val" and manifest["method"] == "free"
    assert manifest["config"]["steps"] == 6
    assert 0 <= manifest["metrics"]["meta_val"]["mean"] <= 1
    json.dumps(manifest, allow_nan=False)
    weights, record = init.write(tmp_path / "release")
    # The owner's checkpoint reader takes it: arch, width and the [0, 1] input contract.
    checkpoint = read_checkpoint(weights)
    assert (checkpoint.arch, checkpoint.width) == ("mlp", 16)
    assert checkpoint.task is not None and checkpoint.task.input_shape == (1, 16, 16)
    again = read_initialization(weights, record)
    assert again.sha256 == init.sha256
    model = again.build_model()
    state = load_tensors(init.data)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_without_validation_the_last_state_is_returned(tmp_path: Path) -> None:
    result, events = _run(tmp_path, validation=None)
    assert not [e for e in events if isinstance(e, Evaluated)]
    assert result.initialization.manifest["selection"] == "last"
    final = result.learner.state_dict()
    saved = result.initialization.state_dict()
    assert all(torch.equal(final[k], v) for k, v in saved.items())


def test_too_few_teachers_stops_with_a_clear_message(tmp_path: Path) -> None:
    small = [tiny.teacher(0), tiny.teacher(1, classes=3)]
    with pytest.raises(TooFewTeachers, match=r"at least 2 usable accepted teachers, got 1 of 2"):
        _run(tmp_path, teachers=small)
    with pytest.raises(TooFewTeachers, match="3 classes"):
        _run(tmp_path, teachers=small)


def test_teachers_with_fewer_classes_are_skipped_with_the_reason(tmp_path: Path) -> None:
    pool = [*tiny.teachers(2), tiny.teacher(5, classes=3)]
    result, events = _run(tmp_path, teachers=pool)
    manifest = result.initialization.manifest
    assert manifest["teacher_ids"] == ["teacher-0", "teacher-1"]
    [skipped] = manifest["skipped_teachers"]
    assert skipped["teacher_id"] == "teacher-5" and "needs at least 5" in skipped["reason"]
    assert isinstance(events[0], RoundStarted) and len(events[0].skipped) == 1


def test_a_teacher_with_more_classes_is_seen_through_ways_of_them() -> None:
    names = tuple(f"class-{i}" for i in range(8))
    pool = TeacherPool([tiny.teacher(3, classes=8, names=names)], 5, 1, CPU)
    view = pool.view(0, torch.Generator().manual_seed(0))
    assert len(view.classes) == 5 and len(set(view.classes)) == 5
    assert view.teacher.num_classes == 5
    assert view.teacher.task.class_names == tuple(names[c] for c in view.classes)
    images = torch.rand(4, 1, tiny.SIDE, tiny.SIDE)
    full = pool.full(0)(images)
    assert torch.equal(view.teacher(images), full[:, list(view.classes)])
    labels = torch.tensor([0, 4])
    assert view.original_labels(labels).tolist() == [view.classes[0], view.classes[4]]


def test_wide_teachers_feed_memory_under_their_own_classes(tmp_path: Path) -> None:
    names = tuple(f"glyph-{i}" for i in range(8))
    pool = [tiny.teacher(0), tiny.teacher(1, classes=8, names=names)]
    # Four draws a step: the wide teacher is all but sure to be drawn after warm-up.
    config = tiny.config(teachers_per_step=4)
    result, _ = _run(tmp_path, teachers=pool, validation=None, config=config)
    assert result.initialization.manifest["teacher_ids"] == ["teacher-0", "teacher-1"]
    saved = read_engine_checkpoint(tmp_path)
    assert saved is not None
    entries = saved[1]["memory"]
    named = [e for e in entries if e["key"].startswith("name:")]
    # Each named pseudo-class holds images of the wide teacher's class of that name.
    assert named and all(
        e["sources"] == [["teacher-1", int(e["key"].removeprefix("name:glyph-"))]] for e in named
    )
    assert {e["key"] for e in entries} - {e["key"] for e in named} <= {
        f"teacher-0:{i}" for i in range(5)
    }


def test_scratch_recovers_every_teacher_once_then_trains_as_long(tmp_path: Path) -> None:
    result, events = _run(tmp_path, config=tiny.config(recovery="scratch"))
    scratch = [e for e in events if isinstance(e, ScratchRecovered)]
    assert [e.teacher_id for e in scratch] == ["teacher-0", "teacher-1", "teacher-2"]
    steps = [e for e in events if isinstance(e, StepFinished)]
    # Warm-up belongs to the meta-generator; the baseline takes the same meta steps.
    assert [e.step for e in steps] == [3, 4, 5, 6] and {e.phase for e in steps} == {"meta"}
    assert all(e.generator_loss is None and e.recovery_seconds == 0 for e in steps)
    kinds = {r.kind for r in result.recoveries}
    assert kinds == {"scratch"} and len(result.scratch) == 3
    assert result.initialization.manifest["method"] == "scratch"


def test_iga_and_summed_gradients_learn_different_initializations(tmp_path: Path) -> None:
    with_iga, _ = _run(tmp_path / "a", validation=None)
    without, _ = _run(tmp_path / "b", validation=None, config=tiny.config().with_iga(False))
    assert without.initialization.manifest["method"] == "free-no-iga"
    assert with_iga.initialization.sha256 != without.initialization.sha256


def test_presets_hold_the_papers_settings_and_smaller_ones() -> None:
    paper = preset("paper")
    assert (paper.generator.latent_dim, paper.generator.width) == (256, 64)
    assert (paper.five.adapt_steps, paper.five.images_per_class, paper.five.adv_weight) == (
        5,
        20,
        1.0,
    )
    assert (paper.steps, paper.warmup_steps, paper.teachers_per_step) == (999, 19, 4)
    assert (paper.bell.replay.episode_batch, paper.bell.replay.patience) == (10, 10)
    assert paper.bell.maml.inner_steps == 5 and not paper.bell.maml.first_order
    assert paper.memory.capacity_per_class == 400 and paper.scratch.steps == 200
    assert (paper.validation.episodes, paper.validate_every) == (600, 20)
    for name in ("cpu", "smoke"):
        small = preset(name)
        assert small.steps < paper.steps and small.scratch.steps == 200
        assert small.five.adapt_steps == 5
    grey = paper.for_input(1, 28)
    assert (grey.learner.channels, grey.generator.channels, grey.generator.image_size) == (1, 1, 28)
    with pytest.raises(ConfigError, match="choose one of"):
        preset("huge")


def test_cuda_is_refused_where_there_is_none(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no GPU"):
        _run(tmp_path, device="cuda")


@pytest.mark.gpu
def test_a_slice_of_the_paper_preset_runs_on_cuda(tmp_path: Path) -> None:
    import dataclasses

    # The paper's settings, cut to 4 steps; the adapters resize its 32 px images for the
    # 16 px teachers.
    config = dataclasses.replace(
        preset("paper").for_input(1, 32), steps=4, warmup_steps=1, checkpoint_every=2
    )
    teachers = [tiny.teacher(seed) for seed in range(4)]
    result = run_round(teachers, config, tmp_path, device="cuda")
    assert result.initialization.manifest["device"].startswith("cuda")
    assert all(torch.isfinite(v).all() for v in result.initialization.state_dict().values())
