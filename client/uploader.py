"""Upload one model: sign, stream in chunks with progress, retry, verify the receipt, wait.

Retrying is safe because the server is idempotent: the same bytes from the same
owner get the original receipt back whatever the nonce, so an upload whose
reply was lost is never stored twice. Each attempt signs a fresh manifest (new
time, new nonce), so a retry late in the backoff is never refused as stale.
What is retried, with exponential backoff and full jitter, is what may pass:
`ServerUnavailable` (no connection, no answer in time), `ServerBusy` (the
server's call limit, or its full disk) and `HandshakeDropped` (a TLS handshake
the server closed, which an overloaded server does too; after the last attempt
it is reported as the `TlsError` it is). Any other refusal is final.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from free_client.stub import ExchangeClient
from free_common.console import err_console, progress
from free_common.errors import (
    ConfigError,
    HandshakeDropped,
    ServerBusy,
    ServerUnavailable,
    SignatureError,
    VerdictTimeout,
)
from free_common.security.call_auth import now_ms
from free_common.security.keys import key_id
from free_common.security.signing import sign, verify
from free_common.types import (
    MIN_NONCE_BYTES,
    Receipt,
    Signed,
    SubmissionManifest,
    TaskMetadata,
    Verdict,
    VerdictState,
)
from free_common.wire import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES

__all__ = [
    "RetryPolicy",
    "check_receipt",
    "sign_manifest",
    "upload",
    "wait_for_verdict",
]

Notify = Callable[[str], None]

_TRANSIENT = (ServerUnavailable, ServerBusy, HandshakeDropped)


def _say(message: str) -> None:
    err_console.print(message, highlight=False, soft_wrap=True)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry an unavailable or busy server.

    Attributes
    ----------
    attempts
        Tries in all (1 means no retry).
    base_delay_s, max_delay_s
        The n-th retry waits a uniform random time in
        ``[0, min(max_delay_s, base_delay_s * 2**n)]`` ("full jitter"), so many
        owners retrying after an outage do not return in step.
    """

    attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"--retries must allow at least 1 attempt, got {self.attempts}")

    def delay_s(self, retry: int, rng: random.Random) -> float:
        """Return the wait before retry number `retry` (0 for the first retry)."""
        return rng.uniform(0.0, min(self.max_delay_s, self.base_delay_s * 2**retry))


def sign_manifest(
    key: Ed25519PrivateKey, data: bytes, task: TaskMetadata, *, created_at_ms: int | None = None
) -> Signed[SubmissionManifest]:
    """Build and sign the manifest of `data`: size, sha256, task, time and a fresh nonce."""
    manifest = SubmissionManifest(
        client_id=key_id(key.public_key()),
        payload_sha256=hashlib.sha256(data).hexdigest(),
        payload_size=len(data),
        task=task,
        created_at_ms=now_ms() if created_at_ms is None else created_at_ms,
        nonce=secrets.token_bytes(MIN_NONCE_BYTES),
    )
    return sign(key, manifest)


def check_receipt(
    signed: Signed[Receipt],
    manifest: SubmissionManifest,
    server_pub: Ed25519PublicKey | None,
) -> Receipt:
    """Check that a receipt vouches for exactly this upload, signed by the pinned server key.

    Raises
    ------
    SignatureError
        The receipt names other bytes or another owner, or its signature does not
        verify with `server_pub`.
    """
    receipt = signed.record
    expected = (manifest.client_id, manifest.payload_sha256, manifest.payload_size)
    found = (receipt.client_id, receipt.payload_sha256, receipt.payload_size)
    if found != expected:
        raise SignatureError(
            "the server's receipt names other bytes or another owner than this upload:"
            " refusing it (is --server the right aggregator?)"
        )
    if server_pub is not None:
        verify(server_pub, signed)
    return receipt


def _chunks(data: bytes, chunk_bytes: int, advance: Callable[[int], None]) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(data), chunk_bytes):
        chunk = bytes(view[start : start + chunk_bytes])
        yield chunk
        advance(len(chunk))


def upload(
    client: ExchangeClient,
    key: Ed25519PrivateKey,
    data: bytes,
    task: TaskMetadata,
    *,
    label: str = "uploading",
    server_pub: Ed25519PublicKey | None = None,
    retry: RetryPolicy | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    timeout_s: float = 600.0,
    notify: Notify = _say,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> Signed[Receipt]:
    """Upload a model and return its checked, signed receipt.

    Parameters
    ----------
    client
        An open connection to the exchange.
    key
        The owner's signing key.
    data
        The model file's bytes.
    task
        Its task metadata (goes into the signed manifest).
    label
        What the progress bar says.
    server_pub
        The pinned server key; when given, the receipt's signature must verify.
    retry
        Backoff policy for an unavailable or busy server.
    chunk_bytes
        Bytes per stream message.
    timeout_s
        Deadline of one attempt.
    notify
        Where retry notices go.
    sleep, rng
        Time and randomness of the backoff (tests pass their own).

    Raises
    ------
    ServerUnavailable, ServerBusy, HandshakeDropped
        Still unavailable, busy, or dropping the handshake after the last attempt.
    FreeError
        A refusal (`ServerRefused`, `TlsError`) or a receipt that does not check out.
    """
    if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ConfigError(f"chunk size must be 1..{MAX_CHUNK_BYTES} bytes, got {chunk_bytes}")
    policy = retry or RetryPolicy()
    jitter = rng or random.Random()  # noqa: S311 (backoff jitter, not a secret)
    for attempt in range(policy.attempts):
        signed = sign_manifest(key, data, task)
        try:
            with progress(label, total=len(data)) as advance:
                reply = client.submit(
                    signed, _chunks(data, chunk_bytes, advance), timeout_s=timeout_s
                )
        except _TRANSIENT as exc:
            if attempt + 1 >= policy.attempts:
                raise
            wait = policy.delay_s(attempt, jitter)
            notify(f"{exc.message}; retrying in {wait:.1f} s ({attempt + 2}/{policy.attempts})")
            sleep(wait)
            continue
        check_receipt(reply, signed.record, server_pub)
        return reply
    raise AssertionError("unreachable: the loop returns or raises")


def wait_for_verdict(
    client: ExchangeClient,
    submission_id: str,
    *,
    timeout_s: float,
    poll_s: float = 0.5,
    max_poll_s: float = 2.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Verdict:
    """Poll the server until the submission is accepted or refused.

    A server that is briefly unavailable (restarting) or busy is waited out
    like a pending verdict; the submission is durable there.

    Raises
    ------
    VerdictTimeout
        Still pending (or unreachable) after `timeout_s` seconds.
    ServerRefused, TlsError
        The server refused to answer.
    """
    deadline = clock() + timeout_s
    interval = poll_s
    while True:
        try:
            verdict = client.verdict(submission_id)
            if verdict.state is not VerdictState.PENDING:
                return verdict
        except (ServerUnavailable, ServerBusy):
            pass
        if clock() + interval > deadline:
            raise VerdictTimeout(
                f"no verdict on submission {submission_id} after {timeout_s:g} s; it is stored:"
                " check later with `free-server status` (aggregator) or submit again to wait"
            )
        sleep(interval)
        interval = min(max_poll_s, interval * 1.5)
