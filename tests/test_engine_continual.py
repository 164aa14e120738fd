"""Continual rounds: a warm-started round draws its new teachers and replays the earlier ones."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import engine_tiny as tiny
import torch

from free_common.engine import EngineEvent, Evaluated, RoundResult, StepFinished, run_round
from free_common.engine.checkpoint import read_checkpoint
from free_common.engine.config import EngineConfig
from free_common.engine.teachers import EngineTeacher
from free_common.meta.evaluate import evaluate


def _run(
    workdir: Path, teachers: list[EngineTeacher], config: EngineConfig
) -> tuple[RoundResult, set[str]]:
    events: list[EngineEvent] = []
    result = run_round(teachers, config, workdir, device="cpu", on_event=events.append)
    drawn = {t for e in events if isinstance(e, StepFinished) for t in e.teacher_ids}
    return result, drawn


def _memory_teachers(workdir: Path) -> set[str]:
    saved = read_checkpoint(workdir)
    assert saved is not None
    return {str(source[0]) for entry in saved[1]["memory"] for source in entry["sources"]}


def test_a_warm_round_draws_only_its_new_teachers_and_keeps_the_old_in_memory(
    tmp_path: Path,
) -> None:
    pool = tiny.teachers(5)
    early, late = pool[:3], pool[3:]
    first, drawn_first = _run(tmp_path, early, tiny.config())
    second, drawn_second = _run(tmp_path, pool, tiny.config())
    new_ids = {t.teacher_id for t in late}
    assert second.round == 2
    assert drawn_second == new_ids  # 8 draws of 2 teachers: both new ones come up
    manifest = second.initialization.manifest
    assert manifest["new_teacher_ids"] == sorted(new_ids)
    assert manifest["seen_teacher_ids"] == sorted(t.teacher_id for t in pool)
    assert manifest["teacher_ids"] == [t.teacher_id for t in pool]
    # The earlier teachers' recovered images are still there to be replayed.
    assert _memory_teachers(tmp_path) >= set(first.teacher_ids) & drawn_first


def test_a_warm_round_without_new_teachers_draws_from_all(tmp_path: Path) -> None:
    pool = tiny.teachers(3)
    _run(tmp_path, pool, tiny.config())
    second, drawn = _run(tmp_path, pool, tiny.config())
    assert len(drawn) > 1
    assert second.initialization.manifest["new_teacher_ids"] == [t.teacher_id for t in pool]


def test_continual_off_draws_the_whole_pool(tmp_path: Path) -> None:
    pool = tiny.teachers(5)
    config = dataclasses.replace(tiny.config(), continual=False, steps=12)
    _run(tmp_path, pool[:3], config)
    _second, drawn = _run(tmp_path, pool, config)
    assert drawn - {t.teacher_id for t in pool[3:]}, "an early teacher should be drawn again"


def test_a_resumed_continual_round_still_knows_what_it_had_seen(tmp_path: Path) -> None:
    pool = tiny.teachers(5)
    _run(tmp_path, pool[:3], tiny.config())
    stopped_at = 3

    def stop(event: EngineEvent) -> None:
        if isinstance(event, StepFinished) and event.step == stopped_at:
            raise KeyboardInterrupt

    with contextlib.suppress(KeyboardInterrupt):
        run_round(pool, tiny.config(), tmp_path, device="cpu", on_event=stop)
    saved = read_checkpoint(tmp_path)
    assert saved is not None and not saved[1]["finished"]
    assert saved[1]["seen"] == sorted(t.teacher_id for t in pool[:3])
    resumed, drawn = _run(tmp_path, pool, tiny.config())
    assert drawn == {t.teacher_id for t in pool[3:]}
    reference_dir = tmp_path / "straight"
    _run(reference_dir, pool[:3], tiny.config())
    straight, _ = _run(reference_dir, pool, tiny.config())
    assert resumed.initialization.sha256 == straight.initialization.sha256


def test_a_warm_round_offers_the_release_at_step_0_and_trains_on_from_the_last_state(
    tmp_path: Path,
) -> None:
    # An outer step this large wrecks every state after the start, so round 1 hands back
    # step 0 and its last state is far from it.
    config = tiny.config(bell=dataclasses.replace(tiny.config().bell, outer_lr=3.0))
    pool = tiny.teachers(5)
    episodes = tiny.validation_episodes()
    first = run_round(pool[:3], config, tmp_path, validation=episodes, device="cpu")
    assert first.selected_step == 0
    last_of_first = evaluate(first.learner, episodes, config.validation, "meta-val").mean
    events: list[EngineEvent] = []
    second = run_round(
        pool, config, tmp_path, validation=episodes, device="cpu", on_event=events.append
    )
    scores = [e.mean for e in events if isinstance(e, Evaluated)]
    # Step 0 is the release (its round-1 score again), not the wrecked last state.
    assert scores[0] == first.curve[0].mean != last_of_first
    assert second.round == 2 and second.selected_step == 0
    released = first.initialization.build_model().state_dict()
    carried = second.initialization.build_model().state_dict()
    assert all(torch.equal(carried[k], released[k]) for k in released)
