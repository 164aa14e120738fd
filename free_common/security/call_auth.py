"""Per-call authentication of exchange requests: who calls, when, and for which method.

Every call to the exchange service carries three metadata entries: the caller's
key id, the time of the call in Unix milliseconds, and an Ed25519 signature over
``CALL_TAG`` + canonical JSON of those two and the method name. The server checks
the key against its allow-list, the time against its window and the signature
against the registered key, the way Flower's node-auth interceptor signs a
timestamp. Binding the method keeps a signature for ``GetVerdict`` from opening
``Submit``; the time window bounds how long a captured header is worth anything.

Uploads are also signed end to end (the manifest); this layer authenticates the
reads (verdicts, releases, status) and lets the server refuse an unknown key
before a single payload byte is streamed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from free_common.errors import SignatureError, StaleRequest
from free_common.security.keys import key_id
from free_common.types import KEY_ID_HEX_CHARS

__all__ = [
    "CALL_TAG",
    "KEY_ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "CallCredentials",
    "call_bytes",
    "check_time_window",
    "now_ms",
    "read_call_metadata",
    "sign_call",
    "verify_call",
]

CALL_TAG: Final = b"free-fed/v1/call\n"
"""Domain tag of call signatures; no prefix of (or prefixed by) a record's tag."""
KEY_ID_HEADER: Final = "free-client-id"
TIMESTAMP_HEADER: Final = "free-timestamp-ms"
SIGNATURE_HEADER: Final = "free-signature-bin"
"""gRPC metadata keys are lower case; binary values need the ``-bin`` suffix."""

_SIGNATURE_BYTES = 64

Metadata = Iterable[tuple[str, str | bytes]]


def now_ms() -> int:
    """Return the current Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


def call_bytes(method: str, caller_key_id: str, timestamp_ms: int) -> bytes:
    """Return the bytes a call signature covers.

    Parameters
    ----------
    method
        Full gRPC method name, e.g. ``"/free.v1.Exchange/GetVerdict"``.
    caller_key_id
        Key id of the caller's Ed25519 key.
    timestamp_ms
        Unix milliseconds of the call.
    """
    body = json.dumps(
        {"key_id": caller_key_id, "method": method, "timestamp_ms": timestamp_ms},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return CALL_TAG + body.encode("ascii")


def sign_call(
    private_key: Ed25519PrivateKey, method: str, timestamp_ms: int | None = None
) -> tuple[tuple[str, str | bytes], ...]:
    """Return the metadata that authenticates one call to `method`.

    Parameters
    ----------
    private_key
        The caller's Ed25519 signing key (``client.key``).
    method
        Full gRPC method name.
    timestamp_ms
        Time of the call; now when omitted.
    """
    stamp = now_ms() if timestamp_ms is None else timestamp_ms
    caller = key_id(private_key.public_key())
    signature = private_key.sign(call_bytes(method, caller, stamp))
    return (
        (KEY_ID_HEADER, caller),
        (TIMESTAMP_HEADER, str(stamp)),
        (SIGNATURE_HEADER, signature),
    )


@dataclass(frozen=True)
class CallCredentials:
    """The authentication entries of one call, read but not yet trusted."""

    key_id: str
    timestamp_ms: int
    signature: bytes


def read_call_metadata(metadata: Metadata) -> CallCredentials:
    """Pick the authentication entries out of a call's metadata.

    Raises
    ------
    SignatureError
        An entry is missing, repeated, or malformed.
    """
    found: dict[str, list[str | bytes]] = {}
    for key, value in metadata:
        if key in (KEY_ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER):
            found.setdefault(key, []).append(value)
    for key in (KEY_ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER):
        if len(found.get(key, ())) != 1:
            raise SignatureError(
                f"the call lacks a single {key} entry: use free-client, which signs every call"
            )
    caller, stamp, signature = (
        found[KEY_ID_HEADER][0],
        found[TIMESTAMP_HEADER][0],
        found[SIGNATURE_HEADER][0],
    )
    if not isinstance(caller, str) or len(caller) != KEY_ID_HEX_CHARS:
        raise SignatureError(f"{KEY_ID_HEADER} is not a key id")
    if not isinstance(stamp, str) or not stamp.isdigit() or len(stamp) > 16:
        raise SignatureError(f"{TIMESTAMP_HEADER} is not Unix milliseconds")
    if not isinstance(signature, bytes) or len(signature) != _SIGNATURE_BYTES:
        raise SignatureError(f"{SIGNATURE_HEADER} is not an Ed25519 signature")
    return CallCredentials(caller, int(stamp), signature)


def check_time_window(what: str, signed_at_ms: int, now: int, window_ms: int) -> None:
    """Refuse something signed more than `window_ms` away from `now`.

    Raises
    ------
    StaleRequest
        With how far off the time is, so a wrong clock is easy to spot.
    """
    skew_ms = now - signed_at_ms
    if abs(skew_ms) <= window_ms:
        return
    direction = "ago" if skew_ms > 0 else "in the future"
    raise StaleRequest(
        f"the {what} was signed {abs(skew_ms) / 1000:.0f} s {direction}; the server accepts "
        f"{window_ms / 1000:.0f} s either way: check this machine's clock and sign again"
    )


def verify_call(
    public_key: Ed25519PublicKey,
    method: str,
    credentials: CallCredentials,
    *,
    now: int,
    window_ms: int,
) -> None:
    """Check one call's credentials against the caller's registered key.

    Parameters
    ----------
    public_key
        The key registered for ``credentials.key_id``.
    method
        Full gRPC method name the call was made to.
    credentials
        What `read_call_metadata` found.
    now, window_ms
        The server's time and its allowed distance from the call's timestamp.

    Raises
    ------
    SignatureError
        The key does not match the claimed id, or the signature does not verify.
    StaleRequest
        The signature verifies but the timestamp is outside the window.
    """
    if key_id(public_key) != credentials.key_id:
        raise SignatureError("the call names another key than the one registered for it")
    try:
        public_key.verify(
            credentials.signature, call_bytes(method, credentials.key_id, credentials.timestamp_ms)
        )
    except InvalidSignature:
        raise SignatureError(
            f"the call's signature does not verify with key {credentials.key_id}: "
            "sign with the client.key registered on the server"
        ) from None
    # After the signature: only an authentic caller learns that its clock is off.
    check_time_window("call", credentials.timestamp_ms, now, window_ms)
