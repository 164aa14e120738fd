"""One meta round on the aggregator: accepted teachers from the store into the FREE engine.

`run_meta_round` is the only call the ServerApp makes into the engine. It

1. reads every accepted submission from the store, ordered by its model's sha256
   (`pool_order`), and converts each stored ONNX model to a frozen torch teacher
   (static checks again, no worker: intake already judged these bytes);
2. resolves the round's preset (`engine_config`);
3. runs `free_common.engine.run_round` in ``HOME/engine``, where the engine
   keeps its checkpoints and the state a finished round carries into the next
   one (warm start). An unfinished round of other teachers or settings (a round
   interrupted before more models were accepted) cannot be resumed; it is
   started over, and the release manifest says so (``"fresh": true``).

Presets are the engine's (``smoke``, ``cpu``, ``paper``) or the operator's own:
``HOME/presets/NAME.json`` holds ``{"base": "<engine preset>", ...}`` plus any
settings to change, nested as `free_common.engine.config_to_dict` prints them,
for example ``{"base": "cpu", "steps": 400, "learner": {"image_size": 28,
"channels": 1}, "generator": {"image_size": 28, "channels": 1}}``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from free_common.engine import (
    PRESETS,
    EngineConfig,
    Initialization,
    ProgressFn,
    StoredTeacher,
    config_to_dict,
    preset,
    run_round,
)
from free_common.errors import (
    CheckpointError,
    ConfigError,
    EngineError,
    FreeError,
    TooFewTeachers,
)
from free_common.models.intake import load_teacher
from free_common.models.metadata import task_from_dict
from free_common.models.onnx_static import IntakeLimits
from free_server.home import ServerHome
from free_server.records import SubmissionRow
from free_server.store import Store

__all__ = [
    "MetaRoundOutput",
    "accepted_teachers",
    "engine_config",
    "known_presets",
    "pool_order",
    "run_meta_round",
]

log = logging.getLogger("free_server.rounds")

PRESETS_DIR = "presets"
ENGINE_DIR = "engine"


@dataclass(frozen=True)
class MetaRoundOutput:
    """What a meta round produced, ready to be published.

    Attributes
    ----------
    initialization
        The meta-learned weights (safetensors bytes) and the engine's manifest.
    config
        The engine configuration the round ran with.
    preset
        Name of the preset it was resolved from.
    source_ids
        Submission ids of the teachers the round learned from.
    fresh
        True when an unfinished round could not be resumed and was started over.
    """

    initialization: Initialization
    config: EngineConfig
    preset: str
    source_ids: tuple[str, ...]
    fresh: bool


def known_presets(home: ServerHome) -> list[str]:
    """Return the engine presets, then the home's own (``HOME/presets/*.json``)."""
    own = sorted(p.stem for p in (home.root / PRESETS_DIR).glob("*.json"))
    return list(PRESETS) + [name for name in own if name not in PRESETS]


def engine_config(name: str, home: ServerHome) -> EngineConfig:
    """Resolve a preset name: the home's ``presets/NAME.json`` first, then the engine's.

    Raises
    ------
    ConfigError
        No preset by that name, or a preset file that is not a valid configuration.
    """
    path = home.root / PRESETS_DIR / f"{name}.json"
    if path.is_file():
        return _preset_file(path, name)
    if name in PRESETS:
        return preset(name)
    raise ConfigError(
        f"unknown preset {name!r}: use one of {', '.join(known_presets(home))}"
        f" (or write {home.root / PRESETS_DIR}/{name}.json)"
    )


def _preset_file(path: Path, name: str) -> EngineConfig:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"preset file {path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("base"), str):
        raise ConfigError(f'preset file {path} must be a JSON object with "base": "<preset>"')
    base_name = data.pop("base")
    if base_name not in PRESETS:
        raise ConfigError(f"{path}: base {base_name!r} is not one of {', '.join(PRESETS)}")
    merged = _merge(config_to_dict(preset(base_name)), data, str(path))
    merged["preset"] = name
    try:
        built: EngineConfig = _build(EngineConfig, merged, str(path))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return built


def _merge(base: dict[str, Any], changes: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if key not in base:
            raise ConfigError(f"{where}: unknown setting {key!r}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {key} must be an object")
            out[key] = _merge(base[key], value, f"{where}: {key}")
        else:
            out[key] = value
    return out


def _build(cls: type[Any], values: Mapping[str, Any], where: str) -> Any:
    """Rebuild a (nested) frozen config dataclass from its `config_to_dict` form."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name not in values:
            continue
        kind, value = hints[field.name], values[field.name]
        if dataclasses.is_dataclass(kind) and isinstance(kind, type):
            kwargs[field.name] = _build(kind, value, f"{where}: {field.name}")
        elif _is_tuple(kind) and isinstance(value, list):
            kwargs[field.name] = tuple(value)
        else:
            kwargs[field.name] = value
    return cls(**kwargs)


def _is_tuple(kind: Any) -> bool:
    origin = typing.get_origin(kind)
    if origin is tuple:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_tuple(arg) for arg in typing.get_args(kind))
    return False


def pool_order(rows: list[SubmissionRow]) -> list[SubmissionRow]:
    """Order accepted submissions by their models' bytes (sha256), then owner and id.

    The engine draws teachers by position in the pool. Owners submit concurrently, so
    submission ids and verdict order change from run to run; ordered by content, the
    same models give the same round, bit for bit, for a fixed seed and thread count.
    """
    return sorted(rows, key=lambda row: (row.sha256, row.client_key_id, row.id))


def accepted_teachers(home: ServerHome, store: Store) -> list[StoredTeacher]:
    """Every accepted submission as an engine teacher, in `pool_order`, converted when drawn.

    Nothing is read here beyond the store's rows: a round over a pool of thousands loads
    only the teachers its steps draw (`free_common.engine.teachers.TeacherPool`).
    """
    limits = IntakeLimits(max_bytes=home.config.limits.max_upload_bytes)
    return [
        StoredTeacher(
            str(row.id),
            task_from_dict(row.task_metadata),
            functools.partial(_load_stored, store.blobs.path_of(row.sha256), row, limits),
        )
        for row in pool_order(store.accepted_submissions())
    ]


def _load_stored(path: Path, row: SubmissionRow, limits: IntakeLimits) -> nn.Module:
    """Convert an accepted submission's model (its static checks repeated, as at intake).

    Raises
    ------
    EngineError
        The stored model no longer converts (intake's rules changed since it was
        accepted): the round stops with the submission named, rather than running
        on a different pool than it recorded.
    """
    try:
        teacher = load_teacher(
            path.read_bytes(),
            task=task_from_dict(row.task_metadata),
            limits=limits,
            already_accepted=True,
        )
    except (FreeError, OSError) as exc:
        raise EngineError(
            f"accepted submission {row.id} no longer loads ({exc}); restore its blob, or "
            "withdraw it by revoking its owner (`free-server clients revoke NAME`), then start "
            "the round again"
        ) from None
    return teacher.module


def run_meta_round(
    home: ServerHome,
    store: Store,
    preset_name: str,
    *,
    device: str = "auto",
    on_event: ProgressFn | None = None,
) -> MetaRoundOutput:
    """Run one meta round over the accepted teachers and return what it learned.

    Raises
    ------
    ConfigError
        Unknown preset.
    TooFewTeachers
        Fewer usable accepted teachers than the preset's minimum.
    EngineError
        The engine stopped (non-finite loss, damaged checkpoint).
    """
    config = engine_config(preset_name, home)
    teachers = accepted_teachers(home, store)
    if len(teachers) < config.min_teachers:
        raise TooFewTeachers(
            f"a {preset_name} round needs at least {config.min_teachers} accepted models;"
            f" {len(teachers)} are usable: wait for more owners to submit"
        )
    workdir = home.root / ENGINE_DIR
    fresh = False
    try:
        result = run_round(teachers, config, workdir, device=device, on_event=on_event)
    except CheckpointError as exc:
        log.warning("cannot resume the unfinished round (%s): starting over", exc)
        fresh = True
        result = run_round(teachers, config, workdir, device=device, on_event=on_event, fresh=True)
    return MetaRoundOutput(
        initialization=result.initialization,
        config=config,
        preset=preset_name,
        source_ids=tuple(result.teacher_ids),
        fresh=fresh,
    )
