"""Engine checkpoints on disk: tensors as safetensors, everything else as JSON; never pickle.

A checkpoint is two files in the round's folder:

- ``state-<token>.safetensors``: every tensor (weights, optimizer moments, the random
  generator's state, the memory bank's images);
- ``checkpoint.json``: the rest (step, history, configuration, the shape of nested
  state such as optimizer state dicts) plus the sha256 of the tensor file.

The tensor file gets a new name each time and is written and synced first; renaming
``checkpoint.json`` into place is the commit. A crash at any moment leaves either the
old checkpoint or the new one whole, never a mix; older tensor files are removed only
after the commit.

Nested state (``optimizer.state_dict()``, model state dicts) is stored with `pack`:
tensors go to the tensor file under a dotted name, and the JSON keeps the structure,
with dictionary keys typed (optimizer state is keyed by int).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from free_common.durable import fsync_dir, write_synced
from free_common.errors import CheckpointError

__all__ = [
    "CHECKPOINT_FILE",
    "clear_checkpoint",
    "pack",
    "read_checkpoint",
    "unpack",
    "write_checkpoint",
]

CHECKPOINT_FILE = "checkpoint.json"
_FORMAT = "free-engine-checkpoint"
_VERSION = 1
_TENSOR_PREFIX = "state-"
_TENSOR_SUFFIX = ".safetensors"


def pack(value: Any, name: str, tensors: dict[str, Tensor]) -> Any:
    """JSON-able skeleton of `value`; its tensors are put in `tensors` under dotted names.

    Parameters
    ----------
    value
        Tensors, dicts (str or int keys), lists, tuples (stored as lists), numbers,
        text, booleans and None, nested.
    name
        Dotted name of `value`; nested tensors get ``name.key...``.
    tensors
        Receives the tensors, detached, contiguous and on the CPU.
    """
    if isinstance(value, Tensor):
        if name in tensors:
            raise CheckpointError(f"two checkpoint tensors are both named {name!r}")
        tensors[name] = value.detach().to("cpu").contiguous()
        return {"$t": name}
    if isinstance(value, Mapping):
        items = []
        for key, item in value.items():
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise CheckpointError(f"cannot store a state key of type {type(key).__name__}")
            items.append([key, pack(item, f"{name}.{key}", tensors)])
        return {"$d": items}
    if isinstance(value, list | tuple):
        return [pack(item, f"{name}.{i}", tensors) for i, item in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise CheckpointError(f"cannot store a {type(value).__name__} in a checkpoint ({name})")


def unpack(skeleton: Any, tensors: Mapping[str, Tensor]) -> Any:
    """Rebuild what `pack` stored (lists where tuples were)."""
    if isinstance(skeleton, dict):
        if "$t" in skeleton:
            key = skeleton["$t"]
            if key not in tensors:
                raise CheckpointError(f"the checkpoint lacks tensor {key!r:.80}")
            return tensors[key]
        return {key: unpack(item, tensors) for key, item in skeleton["$d"]}
    if isinstance(skeleton, list):
        return [unpack(item, tensors) for item in skeleton]
    return skeleton


def write_checkpoint(directory: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Write a checkpoint atomically and remove the tensor files it replaces.

    Parameters
    ----------
    directory
        The round's folder (created if missing).
    tensors
        Name -> CPU tensor (see `pack`).
    meta
        JSON-able record; ``format``, ``version``, ``tensor_file`` and ``sha256`` are
        added.

    Returns
    -------
    Path
        The new tensor file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    data = save_tensors(_unshared(tensors))
    name = f"{_TENSOR_PREFIX}{secrets.token_hex(8)}{_TENSOR_SUFFIX}"
    write_synced(directory / name, data)
    record = {
        **meta,
        "format": _FORMAT,
        "version": _VERSION,
        "tensor_file": name,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    text = json.dumps(record, indent=1, allow_nan=False).encode()
    write_synced(directory / CHECKPOINT_FILE, text)
    fsync_dir(directory)
    for old in directory.glob(f"{_TENSOR_PREFIX}*{_TENSOR_SUFFIX}"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return directory / name


def read_checkpoint(directory: Path) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """Read the checkpoint in `directory`; None when there is none.

    Raises
    ------
    CheckpointError
        The record or its tensor file is unreadable, or the file's sha256 differs.
    """
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        return None
    fix = f"delete {directory} (or start the round with fresh=True) to start over"
    try:
        meta = json.loads(path.read_text())
        if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
            raise ValueError("not an engine checkpoint of this version")
        name = str(meta["tensor_file"])
        if "/" in name or not name.startswith(_TENSOR_PREFIX):
            raise ValueError(f"bad tensor file name {name!r:.60}")
        data = (directory / name).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot read the checkpoint in {directory} ({err}); {fix}") from None
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"the checkpoint tensors in {directory} are damaged; {fix}")
    try:
        tensors = load_tensors(data)
    except (SafetensorError, ValueError) as err:
        raise CheckpointError(f"cannot read the checkpoint tensors ({err}); {fix}") from None
    return tensors, meta


def clear_checkpoint(directory: Path) -> None:
    """Remove the checkpoint files of `directory` (and nothing else)."""
    (directory / CHECKPOINT_FILE).unlink(missing_ok=True)
    for old in directory.glob(f"{_TENSOR_PREFIX}*{_TENSOR_SUFFIX}"):
        old.unlink(missing_ok=True)


def _unshared(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses tensors that share memory; copy the second and later ones.
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if storage in seen and tensor.numel() else tensor
        seen.add(storage)
    return out
