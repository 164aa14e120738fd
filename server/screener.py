"""Screening of accepted models against what the server's last round left (issue 13).

Intake's worker process proves a model safe to run; `Screener` then asks whether it is
worth running: it converts the model here (its bytes were just accepted by intake, as a
round converts them), and measures it with `free_common.screening` against the
meta-generator and memory bank the last finished round carried (``HOME/engine``). Before
any round, or when the carried state does not fit the configured preset, a fresh
generator of that preset is used and the memory tests are not measured; while a round
runs (its checkpoint replaces the finished one's), the state read last is kept.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from free_common.engine import carried_state
from free_common.engine.checkpoint import CHECKPOINT_FILE
from free_common.engine.config import EngineConfig
from free_common.errors import CheckpointError
from free_common.inversion.five import MetaGenerator
from free_common.inversion.generator import build_generator
from free_common.inversion.teacher import AdaptedTeacher
from free_common.models.intake import load_teacher
from free_common.models.onnx_static import IntakeLimits
from free_common.screening import ScreeningConfig
from free_common.screening.screen import (
    ScreeningContext,
    ScreeningReport,
    screen_teacher,
)
from free_common.types import TaskMetadata

__all__ = ["Screener"]

log = logging.getLogger("free_server.screening")


class Screener:
    """Screen one accepted model file; thread-safe, the context reloaded after each round.

    Parameters
    ----------
    engine
        The round's preset, resolved (`free_server.rounds.engine_config`).
    engine_dir
        Where rounds keep their checkpoints (``HOME/engine``).
    config
        Screening thresholds (``[screening]`` of the server config).
    limits
        The intake caps the static checks repeat under.
    """

    def __init__(
        self, engine: EngineConfig, engine_dir: Path, config: ScreeningConfig, limits: IntakeLimits
    ) -> None:
        self._engine = engine
        self._engine_dir = engine_dir
        self._config = config
        self._limits = limits
        self._lock = threading.Lock()
        self._seen: float | None = None
        self._context: ScreeningContext | None = None

    def __call__(self, path: Path, task: TaskMetadata, name: str) -> ScreeningReport:
        """Screen the model at `path` (its `task` as intake read it); `name` labels it."""
        teacher = load_teacher(path.read_bytes(), task=task, limits=self._limits,
                               already_accepted=True)  # fmt: skip
        adapted = AdaptedTeacher(teacher.module, teacher.task, name)
        with self._lock:
            # One model at a time: the context's generator and memory are shared.
            return screen_teacher(adapted, self._current(), self._config)

    def _current(self) -> ScreeningContext:
        marker = self._engine_dir / CHECKPOINT_FILE
        stamp = marker.stat().st_mtime if marker.is_file() else None
        if self._context is None or stamp != self._seen:
            # A round in progress overwrites the finished one's checkpoint: until it
            # finishes, screening keeps the state it last read.
            self._context = self._carried() or self._context or self._fresh()
            self._seen = stamp
        return self._context

    def _carried(self) -> ScreeningContext | None:
        try:
            state = carried_state(self._engine, self._engine_dir, "cpu")
        except CheckpointError as exc:
            log.info("screening with a fresh generator (the last round's state: %s)", exc)
            return None
        return None if state is None else ScreeningContext(state.meta_generator, state.memory)

    def _fresh(self) -> ScreeningContext:
        cpu = torch.device("cpu")
        generator = build_generator(self._engine.generator, self._engine.seed + 1, cpu)
        return ScreeningContext(MetaGenerator(generator, self._engine.five), meta_learned=False)
