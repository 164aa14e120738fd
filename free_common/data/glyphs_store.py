"""On-disk form of a glyph set: one ``.npz`` per split plus ``manifest.json``.

Each ``DIR/<split>.npz`` holds plain arrays (``np.load(..., allow_pickle=False)``
reads it):

``images``      uint8 ``(N, 32, 32)``, white glyph on black
``labels``      int64 ``(N,)``, class index within the split
``faces``       int32 ``(N,)``, index into ``manifest["fonts"]``: the face drawn
``codepoints``  int64 ``(C,)``, the character of each class, ascending

The zip entries carry a fixed timestamp and fixed compression, so the same arrays
always give the same bytes. ``manifest.json`` is written last: a folder without it
is an unfinished build.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from free_common.data.glyphs_chars import class_label
from free_common.data.imageset import ImageSet, canonical_split
from free_common.durable import write_synced
from free_common.errors import DatasetLayoutError, SplitError

__all__ = [
    "MANIFEST",
    "SplitArrays",
    "file_sha256",
    "load_glyph_split",
    "read_manifest",
    "read_split_arrays",
    "split_file",
    "write_json",
    "write_split_arrays",
]

MANIFEST = "manifest.json"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_BUILD_HINT = "build it with: free-bench data build --size small --out DIR"
_ARRAYS = {
    "images": np.dtype(np.uint8),
    "labels": np.dtype(np.int64),
    "faces": np.dtype(np.int32),
    "codepoints": np.dtype(np.int64),
}

SplitArrays = dict[str, npt.NDArray[Any]]


def split_file(directory: Path, split: str) -> Path:
    """Return the path of a split's array file."""
    return directory / f"{split}.npz"


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_split_arrays(path: Path, arrays: SplitArrays) -> None:
    """Write the arrays of one split as a deterministic compressed ``.npz``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in _ARRAYS:
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME)
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = 0o644 << 16
            payload = io.BytesIO()
            np.lib.format.write_array(
                payload, np.ascontiguousarray(arrays[name]), allow_pickle=False
            )
            archive.writestr(entry, payload.getvalue(), compresslevel=6)
    write_synced(path, buffer.getvalue())


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write a JSON document with sorted keys, so equal content gives equal bytes."""
    text = json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    write_synced(path, text.encode("utf-8"))


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read ``DIR/manifest.json``.

    Raises
    ------
    DatasetLayoutError
        When the folder holds no (readable) glyph set.
    """
    path = directory / MANIFEST
    if not path.is_file():
        raise DatasetLayoutError(f"{directory} holds no glyph set (no {MANIFEST}); {_BUILD_HINT}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetLayoutError(f"{path} is unreadable ({exc}); rebuild with --force") from exc
    if not isinstance(document, dict) or not isinstance(document.get("splits"), dict):
        raise DatasetLayoutError(f"{path} is not a glyph set manifest; rebuild with --force")
    return document


def read_split_arrays(path: Path) -> SplitArrays:
    """Read and check one split's arrays.

    Raises
    ------
    DatasetLayoutError
        When the file is missing, damaged or its arrays disagree.
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in _ARRAYS}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DatasetLayoutError(
            f"{path} is missing or damaged ({exc}); rebuild with --force"
        ) from exc
    for name, dtype in _ARRAYS.items():
        if arrays[name].dtype != dtype:
            raise DatasetLayoutError(f"{path}: {name} is {arrays[name].dtype}, expected {dtype}")
    images, labels, faces, codepoints = (arrays[n] for n in _ARRAYS)
    n = images.shape[0]
    if images.ndim != 3 or labels.shape != (n,) or faces.shape != (n,) or codepoints.ndim != 1:
        raise DatasetLayoutError(f"{path}: array shapes disagree; rebuild with --force")
    if n and (labels.min() < 0 or labels.max() >= codepoints.shape[0]):
        raise DatasetLayoutError(f"{path}: labels out of range; rebuild with --force")
    return arrays


def load_glyph_split(directory: str | Path, split: str) -> ImageSet:
    """Load one split of a built glyph set; class names are ``"U+0416 Ж"``.

    Raises
    ------
    DatasetLayoutError
        When the folder holds no complete glyph set.
    SplitError
        When the split name is unknown.
    """
    directory = Path(directory)
    split = canonical_split(split)
    manifest = read_manifest(directory)
    if split not in manifest["splits"]:
        raise SplitError(f"{directory} has no split {split}; rebuild with --force")
    arrays = read_split_arrays(split_file(directory, split))
    return ImageSet(
        images=arrays["images"],
        labels=arrays["labels"],
        class_names=tuple(class_label(int(cp)) for cp in arrays["codepoints"]),
        split=split,
    )
