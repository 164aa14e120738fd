"""A release on the owner's disk: ``meta.safetensors`` and ``manifest.json``, verified first.

`save_release` checks the server's signature on the manifest before any byte is
written, streams the weights into a temporary file in the target folder while
hashing them, compares size and sha256 with the signed manifest, and only then
renames the weights and the manifest into place (weights first, so a present
``manifest.json`` always describes weights already in place). A damaged or
forged release leaves the folder as it was.

``manifest.json`` holds::

    {"format": "free-fed-release/1",
     "manifest": {...the signed release manifest's fields...},
     "signature": "<hex Ed25519 signature by the server key>"}

`load_release` reads a folder back and checks the signature and the weights again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from free_common.durable import fsync_dir
from free_common.errors import CanonicalFormError, ConfigError, PayloadMismatch
from free_common.security.canonical import (
    DOMAIN_TAGS,
    RELEASE_FORMAT,
    record_from_canonical,
    release_document,
)
from free_common.security.signing import verify
from free_common.types import ReleaseManifest, Signed

__all__ = [
    "MANIFEST_NAME",
    "RELEASE_FORMAT",
    "WEIGHTS_NAME",
    "load_release",
    "save_release",
]

WEIGHTS_NAME = "meta.safetensors"
MANIFEST_NAME = "manifest.json"


def _temp_file(folder: Path, name: str) -> tuple[int, Path]:
    fd, path = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    return fd, Path(path)


def save_release(
    signed: Signed[ReleaseManifest],
    chunks: Iterable[bytes],
    out_dir: Path,
    server_pub: Ed25519PublicKey,
) -> ReleaseManifest:
    """Verify a downloaded release and write it into `out_dir`.

    Parameters
    ----------
    signed
        The release manifest and the server's signature, as received.
    chunks
        The weights, as received (read only after the signature verified).
    out_dir
        Target folder (created if missing).
    server_pub
        The pinned server key.

    Returns
    -------
    ReleaseManifest
        The verified manifest.

    Raises
    ------
    SignatureError
        The manifest is not signed by `server_pub`.
    PayloadMismatch
        The weights differ in size or sha256 from the signed manifest.
    """
    release = verify(server_pub, signed)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot make --out {out_dir}: {exc.strerror or exc}") from None
    fd, weights_tmp = _temp_file(out_dir, WEIGHTS_NAME)
    manifest_tmp: Path | None = None
    try:
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        if (size, digest.hexdigest()) != (release.payload_size, release.payload_sha256):
            raise PayloadMismatch(
                f"release {release.version}: the downloaded weights ({size:,} bytes, sha256"
                f" {digest.hexdigest()[:16]}...) differ from the signed manifest; nothing was"
                " written: fetch again, and tell the aggregator if it persists"
            )
        fd, manifest_tmp = _temp_file(out_dir, MANIFEST_NAME)
        with os.fdopen(fd, "wb") as handle:
            handle.write(release_document(signed))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(weights_tmp, out_dir / WEIGHTS_NAME)
        os.replace(manifest_tmp, out_dir / MANIFEST_NAME)
        fsync_dir(out_dir)
    finally:
        for leftover in (weights_tmp, manifest_tmp):
            if leftover is not None:
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
    return release


def _document(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path.parent} holds no release: run `free-client fetch` first"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a release manifest: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != RELEASE_FORMAT:
        raise ConfigError(f"{path} is not a {RELEASE_FORMAT} manifest")
    return document


def load_release(folder: Path, server_pub: Ed25519PublicKey | None) -> tuple[ReleaseManifest, Path]:
    """Read a release folder back, checking the signature and the weights' sha256.

    With `server_pub` None only the weights are checked against the manifest
    (the folder was verified when it was written; the caller says the
    signature was not checked again).

    Returns
    -------
    tuple
        The verified manifest and the path of its weights.

    Raises
    ------
    ConfigError
        The folder holds no release manifest, or one that cannot be read.
    CanonicalFormError
        The manifest fields are not a valid release manifest.
    SignatureError
        The manifest is not signed by `server_pub`.
    PayloadMismatch
        The weights differ from the signed manifest.
    """
    document = _document(folder / MANIFEST_NAME)
    fields = json.dumps(
        document.get("manifest"), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    try:
        signature = bytes.fromhex(str(document.get("signature", "")))
    except ValueError:
        raise CanonicalFormError(f"{folder / MANIFEST_NAME}: signature is not hex") from None
    canonical = DOMAIN_TAGS[ReleaseManifest] + fields.encode("ascii")
    release = record_from_canonical(canonical, ReleaseManifest)
    if server_pub is not None:
        release = verify(server_pub, Signed(release, signature))
    weights = folder / WEIGHTS_NAME
    digest = hashlib.sha256()
    size = 0
    try:
        with weights.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
                size += len(block)
    except FileNotFoundError:
        raise ConfigError(f"{folder} has a manifest but no {WEIGHTS_NAME}: fetch again") from None
    if (size, digest.hexdigest()) != (release.payload_size, release.payload_sha256):
        raise PayloadMismatch(
            f"{weights} differs from its signed manifest (changed or damaged): fetch again"
        )
    return release, weights
