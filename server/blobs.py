"""Content-addressed blob files: streamed in, fsynced, renamed into place.

A blob lives at ``blobs/<sha256[:2]>/<sha256>``. It is first streamed into a
temporary file under ``tmp/`` (same file system, so the final rename is
atomic), fsynced, and only then renamed into place; the directory is fsynced
after the rename so the name survives a power cut. The store commits the row
that refers to a blob only after that, so a crash leaves at worst an
unreferenced blob or a temporary file, both of which `BlobStore` can clean.

Each writer holds an exclusive `flock` on its temporary file for its whole life.
The lock dies with the process, so a temporary file whose lock can be taken
belongs to a writer that is gone (killed, crashed) and is safe to delete, even
while other processes are uploading.

A full disk (``ENOSPC``, or ``EDQUOT`` for a quota) while writing, syncing or
placing a blob is a `StoreFull`: the write is undone like any refused upload,
and the path goes to the server log, not to the peer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from free_common.durable import fsync_dir
from free_common.errors import PayloadTooLarge, StoreError, StoreFull

__all__ = ["DISK_FULL_MESSAGE", "BlobStore", "BlobWriter", "StagedBlob"]

log = logging.getLogger("free_server.store")

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_TMP_SUFFIX = ".part"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

DISK_FULL_MESSAGE: Final = (
    "the server's store is out of disk space: try again later (the aggregator must free"
    " disk space in the server home)"
)
"""The line a peer gets when the store's disk is full; it names no path."""


@contextlib.contextmanager
def _full_disk_refused(where: Path) -> Iterator[None]:
    """Turn a full disk under `where` into `StoreFull`; other OS errors pass unchanged."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        log.warning("the disk under %s is full (%s): free space there", where, exc.strerror)
        raise StoreFull(DISK_FULL_MESSAGE) from exc


@dataclass(frozen=True)
class StagedBlob:
    """A fully written, fsynced temporary file waiting to be placed.

    Attributes
    ----------
    path
        The temporary file; read it for checks before the blob is placed.
    sha256
        Lower-case hex SHA-256 of the bytes written.
    size
        Number of bytes written.
    """

    path: Path
    sha256: str
    size: int


class BlobStore:
    """The blob directory of a server store.

    Parameters
    ----------
    root
        Folder that holds ``blobs/`` and ``tmp/``; both are created if missing.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        for folder in (self.blobs_dir, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def path_of(self, sha256: str) -> Path:
        """Return where the blob with this hash lives (whether or not it exists)."""
        if not _SHA256_HEX.fullmatch(sha256):
            raise StoreError(f"not a lower-case hex sha256: {sha256!r}")
        return self.blobs_dir / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        """Tell whether the blob with this hash is in place."""
        return self.path_of(sha256).is_file()

    def writer(self, max_bytes: int) -> BlobWriter:
        """Start streaming a new blob of at most `max_bytes` bytes."""
        return BlobWriter(self, max_bytes)

    def place(self, staged: StagedBlob, *, sync: bool = True) -> Path:
        """Move a staged blob to its content address and make the rename durable.

        When a blob with the same hash is already in place, it holds the same
        bytes, so the staged copy is simply dropped. With ``sync=False`` the
        caller fsyncs the returned path's folder itself, before it commits any
        row that names the blob (one fsync for several blobs of one folder).
        """
        target = self.path_of(staged.sha256)
        if target.is_file():
            staged.path.unlink(missing_ok=True)
            return target
        folder = target.parent
        with _full_disk_refused(self.root):
            if not folder.is_dir():
                folder.mkdir()
                fsync_dir(self.blobs_dir)
            os.replace(staged.path, target)
            if sync:
                fsync_dir(folder)
        return target

    def sync_folders(self, folders: Iterable[Path]) -> None:
        """Make the renames of ``place(..., sync=False)`` into these folders durable."""
        with _full_disk_refused(self.root):
            for folder in folders:
                fsync_dir(folder)

    def remove(self, sha256: str) -> None:
        """Delete a blob if present."""
        path = self.path_of(sha256)
        if path.is_file():
            path.unlink()
            fsync_dir(path.parent)

    def all_hashes(self) -> set[str]:
        """Hashes of every blob in place."""
        return {
            path.name
            for path in self.blobs_dir.glob("??/*")
            if path.is_file() and _SHA256_HEX.fullmatch(path.name)
        }

    def remove_abandoned_temp_files(self) -> list[Path]:
        """Delete temporary files whose writer is gone; return what was deleted.

        A live writer holds a lock on its file, so its upload is left alone.
        """
        removed = []
        for path in self.tmp_dir.glob(f"*{_TMP_SUFFIX}"):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # its writer finished between glob and open
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                path.unlink(missing_ok=True)
                removed.append(path)
            finally:
                os.close(fd)
        return removed


class BlobWriter:
    """Stream one blob to a locked temporary file, hashing and counting as it goes.

    Use it as a context manager: `write` chunks, then `finish` to fsync and get
    a `StagedBlob`. Leaving the block removes the temporary file unless a store
    placed it, so an aborted or refused upload leaves nothing behind.

    Parameters
    ----------
    blobs
        The blob store the temporary file is created in.
    max_bytes
        Upper bound on the total size; a chunk that would cross it raises
        `PayloadTooLarge` before anything of it is written.
    """

    def __init__(self, blobs: BlobStore, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.max_bytes = max_bytes
        self.size = 0
        self._hash = hashlib.sha256()
        self._root = blobs.root
        self.path = blobs.tmp_dir / f"{os.getpid()}-{secrets.token_hex(8)}{_TMP_SUFFIX}"
        with _full_disk_refused(self._root):
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._file = os.fdopen(fd, "wb")
        self._staged: StagedBlob | None = None

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()

    def write(self, chunk: bytes) -> None:
        """Append a chunk; raises `PayloadTooLarge` past the cap."""
        if self._staged is not None or self._file.closed:
            raise StoreError("blob writer is already finished")
        if self.size + len(chunk) > self.max_bytes:
            raise PayloadTooLarge(
                f"upload exceeds the server's cap of {self.max_bytes} bytes: send a smaller model"
            )
        with _full_disk_refused(self._root):
            self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def finish(self) -> StagedBlob:
        """Flush and fsync the bytes; return the staged blob (the lock is kept)."""
        if self._staged is None:
            with _full_disk_refused(self._root):
                self._file.flush()
                os.fsync(self._file.fileno())
            self._staged = StagedBlob(self.path, self._hash.hexdigest(), self.size)
        return self._staged

    def abort(self) -> None:
        """Close the file and delete it if it was not placed; safe to call twice."""
        # Unlink while still holding the lock, so no cleaner races for the file.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if not self._file.closed:
            # The bytes are thrown away: a flush that fails on a full disk must not hide
            # why the upload stopped (the file is closed either way).
            with contextlib.suppress(OSError):
                self._file.close()
