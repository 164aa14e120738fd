"""An owner's own weights as a safetensors file, with what is needed to rebuild the model.

safetensors, not pickles: a safetensors file is a JSON header and raw bytes, so
reading one never runs code (`reference/onnx.md`, section 5). The header's
metadata holds the backbone name and width (``arch``, ``width``) and the task
metadata under the same ``free.*`` keys the ONNX export writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from free_common.errors import ConfigError
from free_common.models.metadata import metadata_from_props, metadata_to_props
from free_common.types import TaskMetadata

__all__ = ["Checkpoint", "read_checkpoint", "save_checkpoint"]


@dataclass(frozen=True)
class Checkpoint:
    """Weights read from a safetensors file, and what its header says about them.

    Attributes
    ----------
    state
        The state dict.
    arch, width
        Backbone name and width, when the header names them.
    task
        Task metadata, when the header holds it.
    """

    state: dict[str, torch.Tensor]
    arch: str | None
    width: int | None
    task: TaskMetadata | None


def save_checkpoint(
    path: Path, model: nn.Module, *, arch: str, width: int, task: TaskMetadata
) -> None:
    """Write `model`'s state dict to `path` (safetensors) with its arch, width and task."""
    metadata = {"arch": arch, "width": str(width), **metadata_to_props(task)}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)


def read_checkpoint(path: Path) -> Checkpoint:
    """Read a safetensors checkpoint; no pickle is ever loaded.

    Raises
    ------
    ConfigError
        The file is not safetensors (e.g. a ``torch.save`` pickle) or its header is malformed.
    """
    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            metadata: dict[str, str] = handle.metadata() or {}
    except (SafetensorError, ValueError) as exc:
        raise ConfigError(
            f"{path} is not a safetensors file ({exc}); save your weights with "
            "safetensors.torch.save_file(model.state_dict(), PATH)"
        ) from None
    width = metadata.get("width")
    if width is not None and not width.isdigit():
        raise ConfigError(f"{path}: header metadata width={width!r:.20} is not a number")
    return Checkpoint(
        state=state,
        arch=metadata.get("arch"),
        width=None if width is None else int(width),
        task=metadata_from_props(metadata),
    )
