"""The FREE engine (layer 4): one meta round end to end, checkpointed and resumable.

- `config`: `EngineConfig` and the presets ``smoke``, ``cpu``, ``paper``;
- `teachers`: the teacher pool, class views for teachers with more classes than ways;
- `events`: typed progress events for the caller's callback;
- `checkpoint`, `state`: the training state on disk (safetensors + JSON, atomic);
- `round`: `run_round`, the one call (`finished_round` reads a finished one back);
- `result`: the initialization (safetensors bytes + manifest) and the round's record.
"""

from free_common.engine.config import (
    PRESETS,
    EngineConfig,
    LearnerSpec,
    PresetName,
    config_to_dict,
    preset,
)
from free_common.engine.events import (
    CheckpointSaved,
    EngineEvent,
    Evaluated,
    ProgressFn,
    RoundFinished,
    RoundStarted,
    ScratchRecovered,
    SkippedTeacher,
    StepFinished,
)
from free_common.engine.result import (
    EvalPoint,
    Initialization,
    RecoveryRecord,
    RoundResult,
    build_learner,
    read_initialization,
)
from free_common.engine.round import carried_state, finished_round, resolve_device, run_round
from free_common.engine.teachers import EngineTeacher, StoredTeacher

__all__ = [
    "PRESETS",
    "CheckpointSaved",
    "EngineConfig",
    "EngineEvent",
    "EngineTeacher",
    "EvalPoint",
    "Evaluated",
    "Initialization",
    "LearnerSpec",
    "PresetName",
    "ProgressFn",
    "RecoveryRecord",
    "RoundFinished",
    "RoundResult",
    "RoundStarted",
    "ScratchRecovered",
    "SkippedTeacher",
    "StepFinished",
    "StoredTeacher",
    "build_learner",
    "carried_state",
    "config_to_dict",
    "finished_round",
    "preset",
    "read_initialization",
    "resolve_device",
    "run_round",
]
