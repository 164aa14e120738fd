"""Reading and writing small key files with the right permissions."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from free_common.errors import ConfigError, KeyFormatError

MAX_KEY_FILE_BYTES = 64 * 1024
"""Any key file FREE-Fed writes is under 1 KiB; bigger files are something else."""


def write_key_file(path: Path, data: bytes, *, private: bool, overwrite: bool) -> None:
    """Write ``data`` to ``path`` atomically: mode 0600 when private, 0644 otherwise.

    Raises
    ------
    ConfigError
        When the file exists and ``overwrite`` is false, or it cannot be written.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists: move it away or choose another path")
    try:
        # Private keys usually live in their own folder; keep it owner-only.
        path.parent.mkdir(mode=0o700 if private else 0o755, parents=True, exist_ok=True)
        # mkstemp creates the file as 0600, so a private key is never readable by
        # others, not even between the write and the rename.
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp_name, 0o600 if private else 0o644)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    except OSError as err:
        raise ConfigError(f"cannot write {path}: {err.strerror or err}") from None


def read_key_file(path: Path, what: str) -> bytes:
    """Read a key file, turning every filesystem problem into one `KeyFormatError` line.

    Parameters
    ----------
    path
        The file to read.
    what
        What the file should hold, for the message (e.g. ``"Ed25519 private key"``).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_KEY_FILE_BYTES:
            raise KeyFormatError(
                f"{path} is {size} bytes: too big to be a key file ({what} expected)"
            )
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFormatError(
            f"{what} file {path} does not exist: check the path, or generate the key first"
        ) from None
    except OSError as err:
        raise KeyFormatError(f"cannot read {what} file {path}: {err.strerror or err}") from None
