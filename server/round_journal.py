"""A round's engine events on disk, for the console: ``HOME/rounds/round-<id>/events.jsonl``.

The round runs in the ServerApp's process (`free_server.server_app`), the console in
`free-server start`'s: the store says only that a round is running, so the round also
appends each engine event as one JSON line here (`RoundJournal`, an event callback).
`read_journal` turns the lines back into what the rounds page shows: the live step
and stage, the meta-val curve, recovery time and teacher accuracy per step.

Lines are appended and flushed one at a time; a reader that meets a half-written last
line skips it. The journal carries no images and no owners' data: ids, counts, losses,
accuracies and times.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from free_common.engine import EngineEvent

__all__ = [
    "JOURNAL_NAME",
    "ROUNDS_DIR",
    "RoundJournal",
    "RoundProgress",
    "read_journal",
    "round_dir",
]

log = logging.getLogger("free_server.round_journal")

ROUNDS_DIR = "rounds"
JOURNAL_NAME = "events.jsonl"


def round_dir(home_root: Path, round_id: int) -> Path:
    """Return the folder of one store round's files: its journal and TensorBoard events."""
    return home_root / ROUNDS_DIR / f"round-{round_id}"


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class RoundJournal:
    """An engine event callback that appends each event to a round's journal.

    Parameters
    ----------
    path
        The journal file; its folder is made, and an earlier journal (a round
        resumed after a restart) is appended to.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: TextIO | None = path.open("a", encoding="utf-8")

    def __call__(self, event: EngineEvent) -> None:
        """Append `event` as one line ``{"kind": <class name>, <its fields>}``."""
        if self._file is None:
            return
        fields = {key: _finite(value) for key, value in dataclasses.asdict(event).items()}
        self._file.write(json.dumps({"kind": type(event).__name__, **fields}) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file; later events are dropped."""
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class RoundProgress:
    """What a round's journal says, for the rounds page.

    Attributes
    ----------
    step, steps
        Steps done and planned (the newest engine round in the journal).
    stage
        ``warmup``, ``meta`` (the phase of the last step), ``scratch`` (scratch
        recovery before the steps), ``starting`` or ``finished``.
    teachers, device
        From the round's start.
    curve
        Meta-val accuracy: (step, mean, ci95), in step order.
    recovery_seconds, teacher_accuracy
        Per step, (step, value).
    seconds
        Engine time of the finished round (None while running).
    selected_step
        The step the initialization was taken from (None while running).
    checkpoint_step
        The step of the round's newest checkpoint (None before its first): a round
        that checkpointed is the one whose memory bank the engine folder holds.
    """

    step: int = 0
    steps: int = 0
    stage: str = "starting"
    teachers: int = 0
    device: str = ""
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    recovery_seconds: list[tuple[int, float]] = field(default_factory=list)
    teacher_accuracy: list[tuple[int, float]] = field(default_factory=list)
    seconds: float | None = None
    selected_step: int | None = None
    checkpoint_step: int | None = None

    def apply(self, record: dict[str, Any]) -> None:
        """Fold one journal line (an event as `RoundJournal` wrote it) into the summary."""
        kind = record.get("kind")
        if kind == "RoundStarted":
            self.steps, self.step, self.stage = record["steps"], record["start_step"], "starting"
            self.teachers, self.device = record["teachers"], record["device"]
        elif kind == "ScratchRecovered":
            self.stage = "scratch"
        elif kind == "StepFinished":
            step = record["step"]
            self.step, self.steps, self.stage = step, record["steps"], record["phase"]
            self.recovery_seconds.append((step, record["recovery_seconds"]))
            self.teacher_accuracy.append((step, record["teacher_accuracy"]))
        elif kind == "Evaluated":
            self.curve.append((record["step"], record["mean"], record["ci95"]))
        elif kind == "CheckpointSaved":
            self.checkpoint_step = record["step"]
        elif kind == "RoundFinished":
            self.stage, self.seconds = "finished", record["seconds"]
            self.selected_step = record["selected_step"]


def read_journal(path: Path) -> RoundProgress | None:
    """Summarise a round's journal; None when the round wrote none."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the round journal %s: %s", path, exc)
        return None
    progress = RoundProgress()
    for line in text.splitlines():
        try:
            progress.apply(json.loads(line))
        except (ValueError, KeyError, TypeError):
            continue  # a half-written last line, or a line of a newer format
    return progress
