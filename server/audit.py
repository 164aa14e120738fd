"""The store's append-only audit log: a hash chain of signed entries, one per event.

Every change the operator or an owner makes (enrolment, key rotation, revocation, a
submission, its verdict, a round's request, start and end, a published release) appends
one entry in the same SQLite transaction as the change itself, so a kill at any moment
leaves either both or neither. An entry holds its sequence number, time, kind and a JSON
body, the sha256 of the entry before it, its own sha256 over all of that, and an Ed25519
signature of that hash by the server key.

`verify` walks the chain: a changed field breaks its hash, a removed or reordered entry
breaks the sequence or the link to its predecessor, and a forged entry fails its
signature. Triggers refuse UPDATE and DELETE on the table, so the server cannot rewrite
it by accident; someone editing the file directly is caught by `verify`. Removing the
newest entries leaves a valid shorter chain: compare the count with a copy kept elsewhere
(`free-server audit show --json` prints the head hash) to catch that.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "GENESIS",
    "AuditCheck",
    "AuditEntry",
    "AuditLog",
    "append_entry",
    "entry_hash",
    "head",
    "read_rows",
    "verify",
]

GENESIS = "0" * 64
"""The `prev` of the first entry."""

_COLS = "seq, at, kind, body, prev, hash, signature"


@dataclass(frozen=True)
class AuditEntry:
    """One entry of the log.

    Attributes
    ----------
    seq
        Position in the log, from 1, without gaps.
    at
        ISO 8601 UTC time of the event.
    kind
        What happened, e.g. ``"client.enrolled"``, ``"submission.verdict"``.
    body
        The event's details (ids, key ids, hashes, reasons), as JSON.
    prev
        `hash` of the entry before (`GENESIS` for the first).
    hash
        sha256 (hex) of the canonical form of the fields above.
    signature
        Ed25519 signature of `hash` by the server key; empty when the store had no key.
    """

    seq: int
    at: str
    kind: str
    body: dict[str, Any]
    prev: str
    hash: str
    signature: bytes

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> AuditEntry:
        """Build from a row of the ``audit`` table (a body that is not JSON stays as text)."""
        try:
            body = json.loads(row["body"])
        except (TypeError, ValueError):
            body = {"unreadable": str(row["body"])}
        return cls(
            seq=int(row["seq"]),
            at=str(row["at"]),
            kind=str(row["kind"]),
            body=body if isinstance(body, dict) else {"value": body},
            prev=str(row["prev"]),
            hash=str(row["hash"]),
            signature=bytes(row["signature"] or b""),
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (the signature as hex)."""
        return {
            "seq": self.seq,
            "at": self.at,
            "kind": self.kind,
            "body": self.body,
            "prev": self.prev,
            "hash": self.hash,
            "signature": self.signature.hex(),
        }


def _body_text(body: Mapping[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def entry_hash(seq: int, at: str, kind: str, body_text: str, prev: str) -> str:
    """Hash an entry's fields: the sha256 (hex) its signature signs."""
    canonical = json.dumps(
        [seq, at, kind, body_text, prev], separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def head(conn: sqlite3.Connection) -> tuple[int, str]:
    """Return the last entry's sequence number and hash; ``(0, GENESIS)`` for an empty log."""
    last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    return (0, GENESIS) if last is None else (int(last["seq"]), str(last["hash"]))


def read_rows(conn: sqlite3.Connection, since: int = 0) -> list[sqlite3.Row]:
    """Return the rows of the entries after sequence number `since`, oldest first."""
    query = f"SELECT {_COLS} FROM audit WHERE seq > ? ORDER BY seq"  # noqa: S608 (constant)
    return conn.execute(query, (since,)).fetchall()


def append_entry(
    conn: sqlite3.Connection,
    kind: str,
    body: Mapping[str, Any],
    at: str,
    key: Ed25519PrivateKey | None,
) -> None:
    """Append one entry inside the caller's open write transaction."""
    last, prev = head(conn)
    seq = last + 1
    text = _body_text(body)
    digest = entry_hash(seq, at, kind, text, prev)
    signature = b"" if key is None else key.sign(bytes.fromhex(digest))
    conn.execute(
        f"INSERT INTO audit ({_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608 (constant)
        (seq, at, kind, text, prev, digest, signature),
    )


@dataclass(frozen=True)
class AuditLog:
    """Entries of the log (oldest first) and the hash of its last entry, from one snapshot."""

    entries: list[AuditEntry]
    head: str


@dataclass(frozen=True)
class AuditCheck:
    """What `verify` found.

    Attributes
    ----------
    entries
        Entries read.
    head
        Hash of the last entry (`GENESIS` for an empty log).
    bad_seq
        Sequence number of the first entry that fails, or None when all hold.
    reason
        Why it fails (empty when all hold).
    """

    entries: int
    head: str
    bad_seq: int | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        """True when every entry holds."""
        return self.bad_seq is None


def verify(rows: Iterable[sqlite3.Row], public_key: Ed25519PublicKey) -> AuditCheck:
    """Check the chain of `rows` (in ``seq`` order) against the server's public key."""
    prev, expected, count = GENESIS, 1, 0
    for row in rows:
        count += 1
        seq = int(row["seq"])
        if seq != expected:
            return AuditCheck(count, prev, seq, f"entry {expected} is missing (found {seq})")
        if row["prev"] != prev:
            return AuditCheck(
                count,
                prev,
                seq,
                "its link to the entry before does not match (removed or reordered)",
            )
        digest = entry_hash(seq, str(row["at"]), str(row["kind"]), str(row["body"]), prev)
        if digest != row["hash"]:
            return AuditCheck(count, prev, seq, "its content does not match its hash (changed)")
        signature = bytes(row["signature"] or b"")
        try:
            public_key.verify(signature, bytes.fromhex(digest))
        except (InvalidSignature, ValueError):
            why = "it is not signed" if not signature else "its signature is not the server's"
            return AuditCheck(count, prev, seq, why)
        prev, expected = digest, expected + 1
    return AuditCheck(count, prev)
