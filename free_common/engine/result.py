"""What a round returns: the initialization (safetensors bytes plus a manifest) and its record.

The initialization is the meta-learner's state dict as safetensors: a JSON header and
raw tensors, so reading it never runs code. Its header carries ``arch``, ``width`` and
the task metadata under the same ``free.*`` keys as an owner's checkpoint
(`free_common.models.checkpoint`), so `read_checkpoint` reads it as well. The manifest
is the release record of DESIGN.md section 3: architecture, configuration, sha256, the
teachers it was learned from, metrics.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from free_common.durable import write_synced
from free_common.engine.config import LearnerSpec
from free_common.engine.events import SkippedTeacher
from free_common.errors import CheckpointError
from free_common.inversion.five import MetaGenerator, Recovery
from free_common.models.backbones import BACKBONES, Backbone, build_backbone
from free_common.models.metadata import metadata_to_props
from free_common.types import ChannelOrder, TaskMetadata

__all__ = [
    "INIT_FORMAT",
    "EvalPoint",
    "Initialization",
    "RecoveryRecord",
    "RoundResult",
    "build_learner",
    "learner_task",
    "make_initialization",
    "read_initialization",
]

INIT_FORMAT = "free-initialization"
_INIT_VERSION = 1


def learner_task(spec: LearnerSpec) -> TaskMetadata:
    """Return the meta-learner's input contract: [0, 1] images, no normalization, `ways` classes."""
    order = ChannelOrder.GRAY if spec.channels == 1 else ChannelOrder.RGB
    return TaskMetadata(
        num_classes=spec.ways,
        input_shape=(spec.channels, spec.image_size, spec.image_size),
        channel_order=order,
        mean=(0.0,) * spec.channels,
        std=(1.0,) * spec.channels,
    )


def build_learner(spec: LearnerSpec) -> Backbone:
    """Build a freshly initialized meta-learner of `spec` (draws from the global torch state)."""
    return build_backbone(spec.arch, spec.ways, spec.channels, spec.image_size, width=spec.width)


@dataclass(frozen=True)
class Initialization:
    """A meta-learned initialization: safetensors bytes and the manifest that describes them.

    Attributes
    ----------
    data
        The safetensors file.
    manifest
        JSON-able release record; ``manifest["sha256"]`` is the sha256 of `data`.
    """

    data: bytes
    manifest: dict[str, Any]

    @property
    def sha256(self) -> str:
        """Hex sha256 of `data`."""
        return hashlib.sha256(self.data).hexdigest()

    def state_dict(self) -> dict[str, Tensor]:
        """Return the weights as CPU tensors."""
        state: dict[str, Tensor] = load_tensors(self.data)
        return state

    def build_model(self) -> Backbone:
        """Build the meta-learner with these weights loaded (CPU)."""
        spec = LearnerSpec(**self.manifest["architecture"])
        model = build_learner(spec)
        model.load_state_dict(self.state_dict())
        return model

    def write(self, directory: Path, stem: str = "init") -> tuple[Path, Path]:
        """Write ``<stem>.safetensors`` and ``<stem>.json`` into `directory`, each atomically.

        Returns
        -------
        tuple of Path
            The weights file and the manifest file.
        """
        directory.mkdir(parents=True, exist_ok=True)
        weights, manifest = directory / f"{stem}.safetensors", directory / f"{stem}.json"
        write_synced(weights, self.data)
        write_synced(manifest, json.dumps(self.manifest, indent=1, allow_nan=False).encode())
        return weights, manifest


def make_initialization(
    state: dict[str, Tensor], spec: LearnerSpec, manifest: dict[str, Any]
) -> Initialization:
    """Serialize `state` and complete `manifest` with format, architecture, sha256 and size."""
    header = {
        "arch": spec.arch,
        "width": str(_width(spec)),
        **metadata_to_props(learner_task(spec)),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    data = _with_sorted_metadata(save_tensors(tensors, metadata=header))
    record = {
        "format": INIT_FORMAT,
        "version": _INIT_VERSION,
        "architecture": {
            "arch": spec.arch,
            "width": _width(spec),
            "ways": spec.ways,
            "channels": spec.channels,
            "image_size": spec.image_size,
        },
        "input": "images in [0, 1], no normalization; batch norm on batch statistics",
        **manifest,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }
    return Initialization(data, record)


def read_initialization(weights: Path, manifest: Path) -> Initialization:
    """Read an initialization written by `Initialization.write`, checking its sha256.

    Raises
    ------
    CheckpointError
        Unreadable files, another format, or weights that do not match the manifest.
    """
    try:
        data = weights.read_bytes()
        record = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read the initialization ({err})") from None
    if not isinstance(record, dict) or record.get("format") != INIT_FORMAT:
        raise CheckpointError(f"{manifest} is not an initialization manifest")
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise CheckpointError(f"{weights} does not match the sha256 in {manifest}")
    return Initialization(data, record)


def _with_sorted_metadata(data: bytes) -> bytes:
    """Rewrite a safetensors header with its metadata keys sorted.

    safetensors writes ``__metadata__`` in hash-map order, which changes from process to
    process; sorted, the same weights always give the same bytes and the same sha256.
    Tensor offsets count from the end of the header, so the data part stays as it is.
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    metadata = header.pop("__metadata__", {})
    ordered = {"__metadata__": dict(sorted(metadata.items())), **header}
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8 bytes
    return len(text).to_bytes(8, "little") + text + data[8 + size :]


def _width(spec: LearnerSpec) -> int:
    return spec.width if spec.width is not None else BACKBONES[spec.arch].default_width


@dataclass(frozen=True)
class EvalPoint:
    """One meta-val evaluation during a round."""

    step: int
    mean: float
    ci95: float
    episodes: int


@dataclass(frozen=True)
class RecoveryRecord:
    """One teacher recovered during a round: by FIVE at `step`, or by scratch inversion."""

    step: int
    teacher_id: str
    kind: Literal["five", "scratch"]
    seconds: float
    teacher_accuracy: float


@dataclass(frozen=True)
class RoundResult:
    """Everything a finished round hands back.

    Attributes
    ----------
    round
        Round number in this work folder (1 for a fresh start).
    initialization
        The selected meta-learner: safetensors bytes and manifest.
    curve
        Meta-val evaluations, in step order (empty without validation episodes).
    recoveries
        Every recovery after warm-up (FIVE) or before training (scratch).
    skipped
        Teachers the round could not use, with reasons.
    teacher_ids
        The teachers it used.
    selected_step
        Step whose state the initialization is.
    seconds
        Wall time of the round, summed over resumptions.
    learner
        The meta-learner after the last step (carried into the next round).
    meta_generator
        The meta-generator after the last step.
    scratch
        Scratch recoveries by teacher id (empty for FIVE rounds).
    init_scale
        Scale the fresh meta-learner's scale-free weights started at (chosen on meta-val).
    """

    round: int
    initialization: Initialization
    curve: tuple[EvalPoint, ...]
    recoveries: tuple[RecoveryRecord, ...]
    skipped: tuple[SkippedTeacher, ...]
    teacher_ids: tuple[str, ...]
    selected_step: int
    seconds: float
    learner: Backbone
    meta_generator: MetaGenerator
    scratch: dict[str, Recovery] = field(default_factory=dict)
    init_scale: float = 1.0
