"""A strict reader for IDX files (the MNIST format), plain or gzip-compressed.

Layout: two zero bytes, a type byte, a dimension count ``d``, then ``d`` big-endian
uint32 sizes, then exactly ``prod(sizes)`` values, big-endian. Anything else (bad
magic, a truncated or over-long payload, a broken gzip stream, unexpected rank or
type) raises `IdxFormatError` with one line that says which file and what to do.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt

from free_common.errors import IdxFormatError

__all__ = ["IDX_TYPES", "read_idx"]

IDX_TYPES: dict[int, np.dtype[np.generic]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_MAX_RANK = 8


def _raw_bytes(path: Path, hint: str) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise IdxFormatError(f"cannot read {path}: {exc.strerror or exc}{hint}") from exc
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise IdxFormatError(f"{path} is a damaged gzip file ({exc}){hint}") from exc


def read_idx(
    path: str | Path,
    *,
    ndim: int | None = None,
    dtype: np.dtype[np.generic] | type[np.generic] | None = None,
    hint: str = "",
) -> npt.NDArray[np.generic]:
    """Read one IDX file (``.gz`` or plain) into an array in native byte order.

    Parameters
    ----------
    path
        The file.
    ndim, dtype
        When given, the file must have this rank and element type.
    hint
        Appended to error messages: what the user should run (``"; run: ..."``).

    Raises
    ------
    IdxFormatError
        When the file is unreadable, corrupt, truncated or not of the expected kind.
    """
    path = Path(path)
    data = _raw_bytes(path, hint)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IdxFormatError(f"{path} is not an IDX file (bad magic number){hint}")
    kind, rank = data[2], data[3]
    if kind not in IDX_TYPES:
        raise IdxFormatError(f"{path} has an unknown IDX element type 0x{kind:02x}{hint}")
    if not 1 <= rank <= _MAX_RANK:
        raise IdxFormatError(f"{path} declares {rank} dimensions (expected 1..{_MAX_RANK}){hint}")
    header = 4 + 4 * rank
    if len(data) < header:
        raise IdxFormatError(f"{path} is truncated inside its header{hint}")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=rank, offset=4))
    element = IDX_TYPES[kind]
    expected = int(np.prod(shape, dtype=np.int64)) * element.itemsize
    actual = len(data) - header
    if actual != expected:
        state = "truncated" if actual < expected else "longer than its header says"
        raise IdxFormatError(
            f"{path} is {state}: shape {shape} needs {expected} payload bytes, found {actual}{hint}"
        )
    if ndim is not None and rank != ndim:
        raise IdxFormatError(f"{path} has {rank} dimensions, expected {ndim}{hint}")
    if dtype is not None and element.newbyteorder("=") != np.dtype(dtype).newbyteorder("="):
        raise IdxFormatError(
            f"{path} holds {element.name} values, expected {np.dtype(dtype)}{hint}"
        )
    array = np.frombuffer(data, dtype=element, offset=header).reshape(shape)
    return array.astype(element.newbyteorder("="), copy=True)
