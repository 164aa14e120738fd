"""A pool of stored teachers: converted only when drawn, a bounded number at once."""

from __future__ import annotations

from pathlib import Path

import engine_tiny as tiny
import torch

from free_common.engine import EngineTeacher, StoredTeacher, run_round
from free_common.engine.teachers import TeacherPool

CPU = torch.device("cpu")


def _stored(count: int, loads: list[str]) -> list[StoredTeacher]:
    def loader(teacher: EngineTeacher) -> torch.nn.Module:
        loads.append(teacher.teacher_id)
        return tiny.teacher(int(teacher.teacher_id.split("-")[1])).module

    return [
        StoredTeacher(t.teacher_id, t.task, lambda t=t: loader(t))  # type: ignore[misc]
        for t in tiny.teachers(count)
    ]


def test_stored_teachers_load_when_drawn_and_at_most_cache_size_stay() -> None:
    loads: list[str] = []
    pool = TeacherPool(_stored(40, loads), ways=5, min_teachers=2, device=CPU, cache_size=3)
    assert loads == [] and len(pool) == 40
    rng = torch.Generator().manual_seed(0)
    for _ in range(10):
        pool.draw(2, rng)
    assert len(pool._loaded) <= 3
    assert 0 < len(loads) <= 20  # each draw loads at most once; nothing else is touched
    first = pool.full(5)
    again = pool.full(5)
    assert first is again  # a cached teacher is reused, not converted again


def test_a_round_over_stored_teachers_is_the_round_over_loaded_ones(tmp_path: Path) -> None:
    loads: list[str] = []
    stored = run_round(_stored(6, loads), tiny.config(), tmp_path / "stored", device="cpu")
    loaded = run_round(tiny.teachers(6), tiny.config(), tmp_path / "loaded", device="cpu")
    assert stored.teacher_ids == loaded.teacher_ids
    assert stored.initialization.data == loaded.initialization.data
    assert 0 < len(set(loads)) <= 6
