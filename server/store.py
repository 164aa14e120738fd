"""The aggregator's durable store: SQLite rows plus content-addressed blob files.

Rows live in ``store.db`` (SQLite in WAL mode, ``synchronous=FULL``, so a
committed row survives a power cut); payloads live in ``blobs/`` (see
`free_server.blobs`). A row that names a blob is committed only after the blob
is fsynced and renamed into place, inside the same write transaction, so every
row's blob exists and a crash leaves at worst an unreferenced blob that
`Store.recover` removes.

Several processes share one store: the server, and the CLI commands that
administer it while it runs (``clients add``, ``run``). Writes take SQLite's
write lock at once (``BEGIN IMMEDIATE``) and wait up to a busy timeout for it;
readers never block writers in WAL mode. Within one process a lock serialises
the threads of the gRPC server on the single connection.
"""

# ruff: noqa: S608 -- queries are built only from this module's column constants;
# every value goes through a ? placeholder.

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from free_common.errors import (
    DuplicateRecord,
    FreeError,
    RecordNotFound,
    ReplayError,
    RevokedClient,
    StateConflict,
    StoreError,
    StoreFull,
    UnknownClient,
)
from free_server.audit import AuditCheck, AuditEntry, AuditLog, append_entry, verify
from free_server.audit import head as audit_head
from free_server.audit import read_rows as audit_rows
from free_server.blobs import DISK_FULL_MESSAGE, BlobStore, BlobWriter, StagedBlob
from free_server.migrations import SCHEMA_VERSION, current_version, migrate
from free_server.records import (
    ClientRow,
    EvaluationRow,
    RecoveryReport,
    ReleaseRow,
    Revocation,
    RoundRow,
    RoundState,
    StoreSummary,
    SubmissionCount,
    SubmissionResult,
    SubmissionRow,
    SubmissionState,
)

__all__ = ["DB_NAME", "Store"]

log = logging.getLogger("free_server.store")

DB_NAME = "store.db"

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _ts(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("store timestamps must be timezone-aware")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _dt(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _req_dt(value: str) -> datetime:
    return datetime.fromisoformat(value)


_CLIENT_COLS = "name, key_id, public_key_pem, node_public_key, added_at, revoked_at, replaced_at"
_SUBMISSION_COLS = (
    "id, client_key_id, sha256, size, manifest, signature, nonce, task_metadata,"
    " received_at, state, reason, verdict_at, withdrawn_at, held_at, hold_reason, screening"
)
# Withdrawal is a mark beside the verdict, not a verdict: the row keeps its state and
# its verdict_seq, so the rounds' watermarks still count every other model exactly once,
# and status can say what a withdrawn model's verdict was.
_NOT_WITHDRAWN = "withdrawn_at IS NULL"
_IN_POOL = f"{_NOT_WITHDRAWN} AND held_at IS NULL"
_ROUND_COLS = "id, requested_at, started_at, finished_at, state, preset, error"
_RELEASE_COLS = "version, round_id, sha256, size, manifest, signature, created_at"
_EVALUATION_COLS = "round_id, node_id, metrics, created_at"


def _client(row: sqlite3.Row) -> ClientRow:
    return ClientRow(
        name=row["name"],
        key_id=row["key_id"],
        public_key_pem=row["public_key_pem"],
        node_public_key=row["node_public_key"],
        added_at=_req_dt(row["added_at"]),
        revoked_at=_dt(row["revoked_at"]),
        replaced_at=_dt(row["replaced_at"]),
    )


def _submission(row: sqlite3.Row) -> SubmissionRow:
    return SubmissionRow(
        id=row["id"],
        client_key_id=row["client_key_id"],
        sha256=row["sha256"],
        size=row["size"],
        manifest=bytes(row["manifest"]),
        signature=bytes(row["signature"]),
        nonce=bytes(row["nonce"]),
        task_metadata_json=row["task_metadata"],
        received_at=_req_dt(row["received_at"]),
        state=cast(SubmissionState, row["state"]),
        reason=row["reason"],
        verdict_at=_dt(row["verdict_at"]),
        withdrawn_at=_dt(row["withdrawn_at"]),
        held_at=_dt(row["held_at"]),
        hold_reason=row["hold_reason"],
        screening_json=row["screening"],
    )


def _json_or_none(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _round(row: sqlite3.Row) -> RoundRow:
    return RoundRow(
        id=row["id"],
        requested_at=_req_dt(row["requested_at"]),
        started_at=_dt(row["started_at"]),
        finished_at=_dt(row["finished_at"]),
        state=cast(RoundState, row["state"]),
        preset=row["preset"],
        error=row["error"],
    )


def _release(row: sqlite3.Row) -> ReleaseRow:
    return ReleaseRow(
        version=row["version"],
        round_id=row["round_id"],
        sha256=row["sha256"],
        size=row["size"],
        manifest=bytes(row["manifest"]),
        signature=bytes(row["signature"]),
        created_at=_req_dt(row["created_at"]),
    )


def _evaluation(row: sqlite3.Row) -> EvaluationRow:
    return EvaluationRow(
        round_id=row["round_id"],
        node_id=row["node_id"],
        metrics={str(k): float(v) for k, v in json.loads(row["metrics"]).items()},
        created_at=_req_dt(row["created_at"]),
    )


@dataclass
class _PendingReceipt:
    """One `Store.record_submission` call waiting for its group commit."""

    staged: StagedBlob
    client_key_id: str
    manifest: bytes
    signature: bytes
    nonce: bytes
    metadata_json: str
    # Set by the call that commits the group: the result, or why this call failed.
    outcome: SubmissionResult | BaseException | None = None


class Store:
    """Typed access to one server store folder (``<home>/store``).

    Parameters
    ----------
    root
        The store folder: ``store.db`` and the blob folders live in it.
    create
        Make the folder and a new database when missing; otherwise a missing
        store is a `StoreError`.
    busy_timeout_s
        How long a write waits for another process's write lock.
    clock
        Source of timezone-aware "now" (tests pass a fixed one).
    read_only
        Open the database read-only (SQLite's ``mode=ro``, and ``query_only``): every
        write method then fails with `StoreError`. The console opens stores this way;
        a store that needs migrating is refused, since that would be a write.
    """

    def __init__(
        self,
        root: Path,
        *,
        create: bool = False,
        busy_timeout_s: float = 10.0,
        clock: Clock = _utc_now,
        audit_key: Ed25519PrivateKey | None = None,
        read_only: bool = False,
    ) -> None:
        self.root = root
        self.read_only = read_only
        self._audit_key = audit_key
        self.db_path = root / DB_NAME
        self._clock = clock
        self._lock = threading.RLock()
        # Group commit of receipts (`record_submission`): calls queue here, and
        # whichever holds the leader lock commits all that are waiting.
        self._receipts: list[_PendingReceipt] = []
        self._receipts_mutex = threading.Lock()
        self._receipt_leader = threading.Lock()
        if not self.db_path.is_file():
            if not create or read_only:
                raise StoreError(
                    f"no store at {root}: point --home at a folder made by `free-server init`"
                )
            root.mkdir(parents=True, exist_ok=True)
        target = f"{self.db_path.absolute().as_uri()}?mode=ro" if read_only else str(self.db_path)
        try:
            self._conn = sqlite3.connect(
                target,
                uri=read_only,
                timeout=busy_timeout_s,
                isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE / COMMIT
                check_same_thread=False,  # guarded by self._lock
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the store database {self.db_path}: {exc}") from exc
        self._conn.row_factory = sqlite3.Row
        try:
            self._configure()
            with self._read() as conn:
                found = current_version(conn)
            if found != SCHEMA_VERSION and read_only:
                raise StoreError(
                    f"the store {self.db_path} has schema {found}, this free-server reads"
                    f" {SCHEMA_VERSION}: start the server once to migrate it"
                )
            if found != SCHEMA_VERSION:
                # Only a store that needs migrating (or refusing) takes the write lock,
                # so opening never waits for a busy server. Foreign keys are off while
                # migrating (SQLite ignores the pragma inside a transaction): a migration
                # may rebuild a referenced table; `migrate` checks them before committing.
                self._conn.execute("PRAGMA foreign_keys = OFF")
                with self._write() as conn:
                    migrate(conn, str(root))
                self._conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            self._conn.close()
            raise
        self.blobs = BlobStore(root)

    def _configure(self) -> None:
        with self._sql_errors():
            if self.read_only:
                # A reader takes the writers' WAL mode as it is, and refuses writes even
                # where the file's permissions would allow them.
                self._conn.execute("PRAGMA query_only = ON")
                return
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"the store database {self.db_path} cannot use WAL mode")
            # FULL: a commit (and so every receipt) survives a power cut, not only a crash.
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.execute("PRAGMA foreign_keys = ON")

    # -- plumbing -----------------------------------------------------------------

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _sql_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            # SQLite rolls the transaction back itself when the disk is full, so nothing
            # half-written stays; the owner may retry once the operator freed space.
            if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_FULL:
                log.warning("the disk under %s is full (%s): free space there", self.db_path, exc)
                raise StoreFull(DISK_FULL_MESSAGE) from exc
            raise StoreError(
                f"the store {self.db_path} is busy or unreadable ({exc}): retry, and check"
                " that the disk is not full"
            ) from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding the database's write lock from its start."""
        if self.read_only:
            raise StoreError(
                f"the store {self.db_path} is open read-only here (the console): change it"
                " with the free-server commands"
            )
        with self._lock, self._sql_errors():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                # A full disk may already have rolled it back; keep that error, not ROLLBACK's.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: all its queries see the same snapshot."""
        with self._lock, self._sql_errors():
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    def _now(self) -> str:
        return _ts(self._clock())

    def _audit(self, conn: sqlite3.Connection, kind: str, **body: Any) -> None:
        """Append an audit entry in the open write transaction `conn` (`free_server.audit`)."""
        append_entry(conn, kind, body, self._now(), self._audit_key)

    # -- audit log ----------------------------------------------------------------

    def audit_log(self, since: int = 0) -> AuditLog:
        """Return the entries after sequence number `since` and the head, in one snapshot."""
        with self._read() as conn:
            entries = [AuditEntry.from_row(row) for row in audit_rows(conn, since)]
            return AuditLog(entries, audit_head(conn)[1])

    def verify_audit(self, public_key: Ed25519PublicKey) -> AuditCheck:
        """Check the whole audit log's chain and signatures against the server key."""
        with self._read() as conn:
            return verify(audit_rows(conn), public_key)

    @property
    def schema_version(self) -> int:
        """Schema version of the open database."""
        with self._read() as conn:
            return current_version(conn)

    # -- blobs --------------------------------------------------------------------

    def blob_writer(self, max_bytes: int) -> BlobWriter:
        """Start streaming a payload of at most `max_bytes` into a temporary file."""
        return self.blobs.writer(max_bytes)

    def blob_path(self, sha256: str) -> Path:
        """Return the path of a stored blob; `RecordNotFound` when it is not in place."""
        path = self.blobs.path_of(sha256)
        if not path.is_file():
            raise RecordNotFound(f"no stored blob with sha256 {sha256}")
        return path

    def recover(self) -> RecoveryReport:
        """Remove what a crash can leave: abandoned temp files and unreferenced blobs.

        Safe while other processes use the store: live uploads hold a lock on
        their temp file, and blobs are placed only while holding the write
        lock that this method takes too.
        """
        temp = self.blobs.remove_abandoned_temp_files()
        with self._write() as conn:
            referenced = {
                row[0]
                for row in conn.execute(
                    "SELECT sha256 FROM submissions UNION SELECT sha256 FROM releases"
                )
            }
            orphans = sorted(self.blobs.all_hashes() - referenced)
            for sha256 in orphans:
                self.blobs.remove(sha256)
        return RecoveryReport(temp_files=len(temp), orphan_blobs=orphans)

    # -- clients (the allow-list) -------------------------------------------------

    def add_client(
        self,
        name: str,
        *,
        key_id: str,
        public_key_pem: str,
        node_public_key: str | None = None,
    ) -> ClientRow:
        """Put a data owner on the allow-list.

        Raises
        ------
        DuplicateRecord
            The name, the key or the node key is already registered (revoked
            and replaced ones included: a key never comes back, and names stay
            unambiguous in logs).
        """
        with self._write() as conn:
            self._check_unused(conn, "name", name, "name")
            self._check_unused(conn, "key_id", key_id, "key")
            if node_public_key is not None:
                self._check_unused(conn, "node_public_key", node_public_key, "node key")
            conn.execute(
                f"INSERT INTO clients ({_CLIENT_COLS}) VALUES (?, ?, ?, ?, ?, NULL, NULL)",
                (name, key_id, public_key_pem, node_public_key, self._now()),
            )
            self._audit(conn, "client.enrolled", name=name, key_id=key_id, node_key=node_public_key)
            return self._current_client(conn, name)

    def rotate_client(
        self,
        name: str,
        *,
        key_id: str,
        public_key_pem: str,
        node_public_key: str | None = None,
    ) -> ClientRow:
        """Give an owner a new key: it keeps its name and its submissions.

        The current key is marked replaced and refused from now on; the new key
        gets a row of its own under the same name (submissions keep naming the
        key that signed them). The node key is replaced when `node_public_key`
        is given, carried over otherwise.

        Raises
        ------
        RecordNotFound
            No owner has this name.
        RevokedClient
            The owner was revoked: a revoked owner gets no new key.
        DuplicateRecord
            The new key (or node key) is the current one, or was ever registered.
        """
        with self._write() as conn:
            current = self._current_client(conn, name)
            if current.revoked_at is not None:
                raise RevokedClient(
                    f"client {name!r} was revoked: a revoked owner gets no new key; enroll"
                    " the owner again under a new name with `free-server clients add`"
                )
            if key_id == current.key_id:
                raise DuplicateRecord(
                    f"this key is already the current key of {name!r}: give the client.pub"
                    " of the owner's new key (`free-client keygen` into a new folder)"
                )
            self._check_unused(conn, "key_id", key_id, "key")
            if node_public_key is None or node_public_key == current.node_public_key:
                node_public_key = current.node_public_key
            else:
                self._check_unused(conn, "node_public_key", node_public_key, "node key")
            now = self._now()
            conn.execute(
                "UPDATE clients SET replaced_at = ? WHERE key_id = ?", (now, current.key_id)
            )
            conn.execute(
                f"INSERT INTO clients ({_CLIENT_COLS}) VALUES (?, ?, ?, ?, ?, NULL, NULL)",
                (name, key_id, public_key_pem, node_public_key, now),
            )
            self._audit(
                conn,
                "client.rotated",
                name=name,
                old_key_id=current.key_id,
                key_id=key_id,
                node_key=node_public_key,
            )
            return self._current_client(conn, name)

    def revoke_client(self, name: str, *, withdraw: bool = True) -> Revocation:
        """Revoke an owner: its key is refused from now on; revoking twice is a no-op.

        With `withdraw` (the default, for a stolen key), the owner's received
        and accepted submissions, under any of its keys, are withdrawn in the
        same transaction: no round started afterwards reads them, and intake
        skips those not judged yet. Without it they stay in the pool (a key
        lost, not stolen); revoking again with `withdraw` withdraws them later.
        """
        with self._write() as conn:
            now = self._now()
            current = self._current_client(conn, name)
            conn.execute(
                "UPDATE clients SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (now, current.key_id),
            )
            withdrawn = 0
            if withdraw:
                withdrawn = conn.execute(
                    f"UPDATE submissions SET withdrawn_at = ? WHERE {_NOT_WITHDRAWN}"
                    " AND state IN ('received', 'accepted')"
                    " AND client_key_id IN (SELECT key_id FROM clients WHERE name = ?)",
                    (now, name),
                ).rowcount
            self._audit(
                conn, "client.revoked", name=name, key_id=current.key_id, withdrawn=withdrawn
            )
            return Revocation(self._current_client(conn, name), withdrawn)

    def list_clients(self) -> list[ClientRow]:
        """Return every client key, in the order they were added."""
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_CLIENT_COLS} FROM clients ORDER BY id").fetchall()
        return [_client(row) for row in rows]

    def client_by_key_id(self, key_id: str) -> ClientRow | None:
        """Return the client row of this key fingerprint, whatever its state; None if unknown."""
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_CLIENT_COLS} FROM clients WHERE key_id = ?", (key_id,)
            ).fetchone()
        return None if row is None else _client(row)

    def active_client(self, key_id: str) -> ClientRow:
        """Return the allowed client with this key, or raise `UnknownClient`/`RevokedClient`."""
        client = self.client_by_key_id(key_id)
        return self._check_active(client, key_id)

    @staticmethod
    def _check_active(client: ClientRow | None, key_id: str) -> ClientRow:
        if client is None:
            raise UnknownClient(
                f"key {key_id} is not on this server's allow-list: ask the aggregator to run"
                " `free-server clients add` with your client.pub"
            )
        if client.replaced_at is not None:
            raise RevokedClient(
                f"key {key_id} of client {client.name!r} was replaced by a newer key: use the"
                " client.key the aggregator enrolled with `free-server clients rotate`"
            )
        if client.revoked_at is not None:
            raise RevokedClient(
                f"key {key_id} (client {client.name!r}) was revoked by the aggregator"
            )
        return client

    @staticmethod
    def _check_unused(conn: sqlite3.Connection, column: str, value: str, what: str) -> None:
        hit = conn.execute(f"SELECT name FROM clients WHERE {column} = ?", (value,)).fetchone()
        if hit is not None:
            raise DuplicateRecord(
                f"a client with this {what} is already registered (as {hit[0]!r}):"
                " use another name, or a new key"
            )

    @staticmethod
    def _current_client(conn: sqlite3.Connection, name: str) -> ClientRow:
        row = conn.execute(
            f"SELECT {_CLIENT_COLS} FROM clients WHERE name = ? AND replaced_at IS NULL",
            (name,),
        ).fetchone()
        if row is None:
            raise RecordNotFound(f"no client named {name!r}: `free-server clients list` shows them")
        return _client(row)

    # -- submissions --------------------------------------------------------------

    def record_submission(
        self,
        staged: StagedBlob,
        *,
        client_key_id: str,
        manifest: bytes,
        signature: bytes,
        nonce: bytes,
        task_metadata: Mapping[str, Any],
    ) -> SubmissionResult:
        """Store a checked submission durably, or answer a retry with the original row.

        The order is DESIGN.md section 3's: if this client already stored these
        exact bytes, the original row is returned whatever the nonce (an
        idempotent retry; the staged copy is dropped). Otherwise the nonce must
        be new for this client; then the blob is placed (rename, directory
        fsync) and the row and nonce are committed, all under one write lock.

        Calls that arrive while another call's transaction commits wait and are
        then committed together, in arrival order, in one transaction (a group
        commit: one WAL fsync and one fsync per blob folder for the lot). Each
        call still returns only once its own row is durable, and a call refused
        for its own reasons (a replayed nonce, a revoked key) leaves the others
        of its group untouched.

        Raises
        ------
        UnknownClient, RevokedClient
            The key is not (or no longer) on the allow-list.
        ReplayError
            The nonce was already used by this client for other bytes.
        """
        pending = _PendingReceipt(
            staged,
            client_key_id,
            manifest,
            signature,
            nonce,
            json.dumps(dict(task_metadata), sort_keys=True, separators=(",", ":")),
        )
        with self._receipts_mutex:
            self._receipts.append(pending)
        with self._receipt_leader:
            if pending.outcome is None:
                self._commit_receipts()
        outcome = pending.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None  # the leader that took it gave every call an outcome
        return outcome

    def _commit_receipts(self) -> None:
        """Commit every waiting receipt in one transaction; give each call its outcome."""
        with self._receipts_mutex:
            group, self._receipts = self._receipts, []
        done: list[tuple[_PendingReceipt, SubmissionResult]] = []
        failure: Exception = StoreError(
            "the server stopped while storing this upload: send it again"
        )
        try:
            with self._write() as conn:
                folders: set[Path] = set()
                for pending in group:
                    conn.execute("SAVEPOINT receipt")
                    try:
                        result = self._insert_submission(conn, pending, folders)
                    except FreeError as exc:  # this call's own refusal: the others go on
                        conn.execute("ROLLBACK TO receipt")
                        pending.outcome = exc
                    else:
                        done.append((pending, result))
                    conn.execute("RELEASE receipt")
                # The renames of the whole group become durable before any row does.
                self.blobs.sync_folders(folders)
            for pending, result in done:
                pending.outcome = result
        # The group's transaction failed, so each of its calls did: each raises it.
        except Exception as exc:  # noqa: BLE001
            failure = exc
        finally:
            for pending in group:
                if pending.outcome is None:
                    pending.outcome = failure

    def _insert_submission(
        self, conn: sqlite3.Connection, pending: _PendingReceipt, folders: set[Path]
    ) -> SubmissionResult:
        """Check and write one receipt in the open transaction; note the folder to sync."""
        key_id, staged = pending.client_key_id, pending.staged
        client_row = conn.execute(
            f"SELECT {_CLIENT_COLS} FROM clients WHERE key_id = ?", (key_id,)
        ).fetchone()
        self._check_active(None if client_row is None else _client(client_row), key_id)
        original = conn.execute(
            f"SELECT {_SUBMISSION_COLS} FROM submissions WHERE client_key_id = ? AND sha256 = ?",
            (key_id, staged.sha256),
        ).fetchone()
        if original is not None:
            return SubmissionResult(_submission(original), duplicate=True)
        used = conn.execute(
            "SELECT 1 FROM nonces WHERE client_key_id = ? AND nonce = ?", (key_id, pending.nonce)
        ).fetchone()
        if used is not None:
            raise ReplayError(
                "this manifest's nonce was already used for other bytes: sign a new"
                " manifest (submit does this for every new model)"
            )
        now = self._now()
        folders.add(self.blobs.place(staged, sync=False).parent)
        conn.execute(
            "INSERT INTO nonces (client_key_id, nonce, seen_at) VALUES (?, ?, ?)",
            (key_id, pending.nonce, now),
        )
        cursor = conn.execute(
            "INSERT INTO submissions (client_key_id, sha256, size, manifest, signature,"
            " nonce, task_metadata, received_at, state)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'received')",
            (
                key_id,
                staged.sha256,
                staged.size,
                pending.manifest,
                pending.signature,
                pending.nonce,
                pending.metadata_json,
                now,
            ),
        )
        row_id = cast(int, cursor.lastrowid)
        self._audit(
            conn,
            "submission.received",
            id=row_id,
            client_key_id=key_id,
            sha256=staged.sha256,
            size=staged.size,
        )
        return SubmissionResult(self._submission_by_id(conn, row_id), duplicate=False)

    def submission(self, submission_id: int) -> SubmissionRow:
        """Return one submission by id; `RecordNotFound` if there is none."""
        with self._read() as conn:
            return self._submission_by_id(conn, submission_id)

    @staticmethod
    def _submission_by_id(conn: sqlite3.Connection, submission_id: int) -> SubmissionRow:
        row = conn.execute(
            f"SELECT {_SUBMISSION_COLS} FROM submissions WHERE id = ?", (submission_id,)
        ).fetchone()
        if row is None:
            raise RecordNotFound(f"no submission with id {submission_id}")
        return _submission(row)

    def set_verdict(
        self,
        submission_id: int,
        *,
        accepted: bool,
        reason: str | None = None,
        screening: dict[str, Any] | None = None,
    ) -> SubmissionRow:
        """Record the intake verdict of a received submission (and its screening report).

        A verdict is final: a submission already accepted or refused keeps its
        first verdict (an intake worker restarted mid-job may judge it twice),
        and the stored row is returned unchanged. A submission withdrawn while
        a worker held it still gets its verdict, and stays out of every round.
        """
        if not accepted and not reason:
            raise ValueError("a refusal needs a reason for the owner")
        with self._write() as conn:
            current = self._submission_by_id(conn, submission_id)
            if current.state != "received" or current.held_at is not None:
                return current
            state = "accepted" if accepted else "refused"
            self._judge(conn, submission_id, state, reason, screening)
            return self._submission_by_id(conn, submission_id)

    def hold(
        self, submission_id: int, reason: str, screening: dict[str, Any] | None = None
    ) -> SubmissionRow:
        """Hold a received or accepted submission for the operator: no round reads it.

        Screening holds a received one (with its report); the operator may hold an
        accepted one. Raises `StateConflict` for a refused, withdrawn or held one.
        """
        with self._write() as conn:
            current = self._submission_by_id(conn, submission_id)
            if current.state == "refused" or current.withdrawn_at or current.held_at:
                raise StateConflict(
                    f"submission {submission_id} is {current.status}"
                    f"{' and withdrawn' if current.withdrawn_at else ''}: only a received or"
                    " accepted one can be held"
                )
            conn.execute(
                "UPDATE submissions SET held_at = ?, hold_reason = ?,"
                " screening = COALESCE(?, screening) WHERE id = ?",
                (self._now(), reason, _json_or_none(screening), submission_id),
            )
            self._audit(conn, "submission.held", id=submission_id, reason=reason,
                        screening=screening)  # fmt: skip
            return self._submission_by_id(conn, submission_id)

    def release_held(self, submission_id: int) -> SubmissionRow:
        """Release a held submission (the operator's decision): it is accepted (again).

        One held by screening gets its verdict now, so the next round counts it as
        new. Raises `StateConflict` for one that is not held.
        """
        with self._write() as conn:
            current = self._held(conn, submission_id)
            conn.execute(
                "UPDATE submissions SET held_at = NULL, hold_reason = NULL WHERE id = ?",
                (submission_id,),
            )
            self._audit(conn, "submission.released", id=submission_id)
            if current.state == "received":
                self._judge(conn, submission_id, "accepted", None, None)
            return self._submission_by_id(conn, submission_id)

    def refuse_held(self, submission_id: int, reason: str) -> SubmissionRow:
        """Refuse a held submission (the operator's decision) with the reason its owner sees."""
        if not reason:
            raise ValueError("a refusal needs a reason for the owner")
        with self._write() as conn:
            self._held(conn, submission_id)
            conn.execute(
                "UPDATE submissions SET held_at = NULL, hold_reason = NULL WHERE id = ?",
                (submission_id,),
            )
            self._judge(conn, submission_id, "refused", reason, None)
            return self._submission_by_id(conn, submission_id)

    def _held(self, conn: sqlite3.Connection, submission_id: int) -> SubmissionRow:
        current = self._submission_by_id(conn, submission_id)
        if current.held_at is None:
            raise StateConflict(f"submission {submission_id} is {current.status}, not held")
        return current

    def _judge(
        self,
        conn: sqlite3.Connection,
        submission_id: int,
        state: str,
        reason: str | None,
        screening: dict[str, Any] | None,
    ) -> None:
        """Write a verdict with the next verdict sequence number, and its audit entry."""
        (last_seq,) = conn.execute(
            "SELECT COALESCE(MAX(verdict_seq), 0) FROM submissions"
        ).fetchone()
        conn.execute(
            "UPDATE submissions SET state = ?, reason = ?, verdict_at = ?, verdict_seq = ?,"
            " screening = COALESCE(?, screening) WHERE id = ?",
            (state, reason, self._now(), last_seq + 1, _json_or_none(screening), submission_id),
        )
        self._audit(conn, "submission.verdict", id=submission_id, verdict=state, reason=reason,
                    screening=screening)  # fmt: skip

    def pending_intake(self) -> list[SubmissionRow]:
        """Return submissions received but not yet judged (nor withdrawn), oldest first."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_SUBMISSION_COLS} FROM submissions"
                f" WHERE state = 'received' AND {_IN_POOL} ORDER BY id"
            ).fetchall()
        return [_submission(row) for row in rows]

    def accepted_submissions(self, since_round: int | None = None) -> list[SubmissionRow]:
        """Return accepted submissions in verdict order; with `since_round`, only newer ones.

        "Newer" means judged after that round started, so a model accepted while
        a round was gathering its inputs is counted by the next round, never lost
        and never counted twice. Withdrawn submissions are left out.
        """
        with self._read() as conn:
            watermark = 0
            if since_round is not None:
                row = conn.execute(
                    "SELECT verdict_watermark FROM rounds WHERE id = ?", (since_round,)
                ).fetchone()
                if row is None:
                    raise RecordNotFound(f"no round with id {since_round}")
                watermark = row[0] or 0
            rows = conn.execute(
                f"SELECT {_SUBMISSION_COLS} FROM submissions"
                f" WHERE state = 'accepted' AND {_IN_POOL} AND verdict_seq > ?"
                " ORDER BY verdict_seq",
                (watermark,),
            ).fetchall()
        return [_submission(row) for row in rows]

    def prune_nonces(self, before: datetime) -> int:
        """Forget nonces first seen before `before`; returns how many.

        Only safe for nonces older than the manifest time window: a manifest
        that old is refused on its timestamp before its nonce is looked at.
        """
        with self._write() as conn:
            cursor = conn.execute("DELETE FROM nonces WHERE seen_at < ?", (_ts(before),))
            return cursor.rowcount

    # -- rounds -------------------------------------------------------------------

    def request_round(self, preset: str | None = None) -> RoundRow:
        """Queue a meta round request (from `free-server run` or the scheduler)."""
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO rounds (requested_at, state, preset) VALUES (?, 'requested', ?)",
                (self._now(), preset),
            )
            round_id = cast(int, cursor.lastrowid)
            self._audit(conn, "round.requested", id=round_id, preset=preset)
            return self._round_by_id(conn, round_id)

    def next_round_request(self) -> RoundRow | None:
        """Return the oldest round still waiting to start, if any."""
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_ROUND_COLS} FROM rounds WHERE state = 'requested' ORDER BY id LIMIT 1"
            ).fetchone()
        return None if row is None else _round(row)

    def start_round(self, round_id: int) -> RoundRow:
        """Mark a requested round running, and fix which verdicts it has seen."""
        with self._write() as conn:
            current = self._round_by_id(conn, round_id)
            if current.state != "requested":
                raise StoreError(f"round {round_id} is {current.state}, not requested")
            conn.execute(
                "UPDATE rounds SET state = 'running', started_at = ?, verdict_watermark ="
                " (SELECT COALESCE(MAX(verdict_seq), 0) FROM submissions) WHERE id = ?",
                (self._now(), round_id),
            )
            self._audit(conn, "round.started", id=round_id, preset=current.preset)
            return self._round_by_id(conn, round_id)

    def finish_round(self, round_id: int, error: str | None = None) -> RoundRow:
        """End a running round: finished, or failed with `error`."""
        with self._write() as conn:
            current = self._round_by_id(conn, round_id)
            if current.state != "running":
                raise StoreError(f"round {round_id} is {current.state}, not running")
            conn.execute(
                "UPDATE rounds SET state = ?, finished_at = ?, error = ? WHERE id = ?",
                ("failed" if error else "finished", self._now(), error, round_id),
            )
            kind = "round.failed" if error else "round.finished"
            self._audit(conn, kind, id=round_id, error=error)
            return self._round_by_id(conn, round_id)

    def round(self, round_id: int) -> RoundRow:
        """Return one round by id; `RecordNotFound` if there is none."""
        with self._read() as conn:
            return self._round_by_id(conn, round_id)

    def latest_started_round(self) -> RoundRow | None:
        """Return the round that started last (running, finished or failed), if any."""
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_ROUND_COLS} FROM rounds WHERE started_at IS NOT NULL"
                " ORDER BY id DESC LIMIT 1"
            ).fetchone()
        return None if row is None else _round(row)

    def rounds(self, state: RoundState | None = None) -> list[RoundRow]:
        """Return every round (or those in `state`), oldest first."""
        query = f"SELECT {_ROUND_COLS} FROM rounds"
        params: tuple[str, ...] = ()
        if state is not None:
            query += " WHERE state = ?"
            params = (state,)
        with self._read() as conn:
            rows = conn.execute(query + " ORDER BY id", params).fetchall()
        return [_round(row) for row in rows]

    @staticmethod
    def _round_by_id(conn: sqlite3.Connection, round_id: int) -> RoundRow:
        row = conn.execute(f"SELECT {_ROUND_COLS} FROM rounds WHERE id = ?", (round_id,)).fetchone()
        if row is None:
            raise RecordNotFound(f"no round with id {round_id}")
        return _round(row)

    # -- releases -----------------------------------------------------------------

    def next_release_version(self) -> int:
        """Return the version number the next release gets (1 for the first)."""
        with self._read() as conn:
            (last,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM releases").fetchone()
        return int(last) + 1

    def record_release(
        self,
        staged: StagedBlob,
        *,
        version: int,
        manifest: bytes,
        signature: bytes,
        round_id: int | None = None,
    ) -> ReleaseRow:
        """Place a release's weights blob and commit its signed manifest.

        Raises
        ------
        DuplicateRecord
            A release with this version exists (versions are signed, never reused).
        """
        with self._write() as conn:
            taken = conn.execute("SELECT 1 FROM releases WHERE version = ?", (version,))
            if taken.fetchone() is not None:
                raise DuplicateRecord(f"release version {version} already exists")
            self.blobs.place(staged)
            conn.execute(
                f"INSERT INTO releases ({_RELEASE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    version,
                    round_id,
                    staged.sha256,
                    staged.size,
                    manifest,
                    signature,
                    self._now(),
                ),
            )
            self._audit(
                conn,
                "release.published",
                version=version,
                round_id=round_id,
                sha256=staged.sha256,
                size=staged.size,
                manifest_sha256=hashlib.sha256(manifest).hexdigest(),
            )
            return self._release_by_version(conn, version)

    def latest_release(self) -> ReleaseRow | None:
        """Return the newest release, if any was published."""
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {_RELEASE_COLS} FROM releases ORDER BY version DESC LIMIT 1"
            ).fetchone()
        return None if row is None else _release(row)

    def release(self, version: int) -> ReleaseRow:
        """Return one release by version; `RecordNotFound` if there is none."""
        with self._read() as conn:
            return self._release_by_version(conn, version)

    @staticmethod
    def _release_by_version(conn: sqlite3.Connection, version: int) -> ReleaseRow:
        row = conn.execute(
            f"SELECT {_RELEASE_COLS} FROM releases WHERE version = ?", (version,)
        ).fetchone()
        if row is None:
            raise RecordNotFound(f"no release with version {version}")
        return _release(row)

    # -- federated evaluation -----------------------------------------------------

    def record_evaluation(
        self, round_id: int, node_id: str, metrics: Mapping[str, float]
    ) -> EvaluationRow:
        """Record one node's evaluation reply (e.g. fine-tuning accuracy) for a round."""
        metrics_json = json.dumps(
            {str(k): float(v) for k, v in metrics.items()}, sort_keys=True, allow_nan=False
        )
        with self._write() as conn:
            self._round_by_id(conn, round_id)
            now = self._now()
            conn.execute(
                f"INSERT INTO evaluations ({_EVALUATION_COLS}) VALUES (?, ?, ?, ?)",
                (round_id, node_id, metrics_json, now),
            )
        return EvaluationRow(round_id, node_id, json.loads(metrics_json), _req_dt(now))

    def evaluations(self, round_id: int | None = None) -> list[EvaluationRow]:
        """Return evaluation replies, all or of one round, in arrival order."""
        query = f"SELECT {_EVALUATION_COLS} FROM evaluations"
        params: tuple[int, ...] = ()
        if round_id is not None:
            query += " WHERE round_id = ?"
            params = (round_id,)
        with self._read() as conn:
            rows = conn.execute(query + " ORDER BY id", params).fetchall()
        return [_evaluation(row) for row in rows]

    # -- status -------------------------------------------------------------------

    def summary(self, recent: int = 50) -> StoreSummary:
        """Return everything status shows, from one snapshot; lists keep the `recent` newest."""
        with self._read() as conn:
            counts: dict[SubmissionCount, int] = {
                "received": 0,
                "accepted": 0,
                "refused": 0,
                "held": 0,
                "withdrawn": 0,
            }
            for state, count in conn.execute(
                "SELECT CASE WHEN withdrawn_at IS NOT NULL THEN 'withdrawn'"
                " WHEN held_at IS NOT NULL THEN 'held' ELSE state END AS s,"
                " COUNT(*) FROM submissions GROUP BY s"
            ):
                counts[cast(SubmissionCount, state)] = int(count)

            def newest(cols: str, table: str, key: str) -> list[sqlite3.Row]:
                return conn.execute(
                    f"SELECT {cols} FROM (SELECT * FROM {table} ORDER BY {key} DESC LIMIT ?)"
                    f" ORDER BY {key}",
                    (recent,),
                ).fetchall()

            return StoreSummary(
                schema_version=current_version(conn),
                clients=[
                    _client(r)
                    for r in conn.execute(f"SELECT {_CLIENT_COLS} FROM clients ORDER BY id")
                ],
                submission_counts=counts,
                submissions=[_submission(r) for r in newest(_SUBMISSION_COLS, "submissions", "id")],
                rounds=[_round(r) for r in newest(_ROUND_COLS, "rounds", "id")],
                releases=[_release(r) for r in newest(_RELEASE_COLS, "releases", "version")],
                evaluations=[_evaluation(r) for r in newest(_EVALUATION_COLS, "evaluations", "id")],
            )
