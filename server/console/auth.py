"""Console tokens: made by `free-server console token`, kept hashed in the home.

``HOME/console-tokens`` (0600) holds one line per token: the sha256 of the token and the
time it was made. The token itself is printed once and never stored; a token is 32
random bytes, so a plain sha256 is enough to keep the file from being a key (nothing
to brute-force). The file is read again on every request, so a new or withdrawn
token takes effect at once, while the server runs.

A request proves it holds a token with ``Authorization: Bearer <token>`` (Prometheus,
curl) or HTTP Basic with the token as the password and any user name (what a browser
asks for after the ``401``'s ``WWW-Authenticate``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

from free_common.durable import write_synced

__all__ = ["TOKENS_NAME", "add_token", "token_allowed", "tokens_path", "withdraw_tokens"]

TOKENS_NAME = "console-tokens"


def tokens_path(home_root: Path) -> Path:
    """Return the token file of a server home."""
    return home_root / TOKENS_NAME


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _digests(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return []
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def add_token(home_root: Path, *, replace: bool = False) -> str:
    """Make a new console token, store its hash, and return it (shown once).

    With `replace`, the tokens made before stop working.
    """
    token = secrets.token_urlsafe(32)
    path = tokens_path(home_root)
    lines = [] if replace else [f"{d}\n" for d in _digests(path)]
    lines.append(f"{_digest(token)} {datetime.now(UTC).isoformat(timespec='seconds')}\n")
    write_synced(path, "".join(lines).encode("ascii"))
    os.chmod(path, 0o600)
    return token


def withdraw_tokens(home_root: Path) -> int:
    """Remove every console token; return how many there were."""
    path = tokens_path(home_root)
    count = len(_digests(path))
    path.unlink(missing_ok=True)
    return count


def _presented(authorization: str) -> str | None:
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, colon, password = decoded.partition(":")
        return password if colon and password else None
    return None


def token_allowed(home_root: Path, authorization: str | None) -> bool:
    """Whether an ``Authorization`` header carries a token of this home."""
    token = _presented(authorization or "")
    if token is None:
        return False
    digest = _digest(token)
    # Compare with every stored hash, in constant time each, and without stopping early.
    matches = [hmac.compare_digest(digest, stored) for stored in _digests(tokens_path(home_root))]
    return any(matches)
