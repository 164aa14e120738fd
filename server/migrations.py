"""The store's SQL schema as an ordered list of migrations.

The schema is versioned from the first release: `schema_version` holds one row
per applied migration. Opening a store applies the migrations it lacks, in one
write transaction, and refuses a store whose version is newer than this code
knows, since an older free-server would misread or damage it. Never edit a
released migration; append a new one.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

from free_common.errors import StoreError, StoreVersionError

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "current_version", "migrate"]

_V1 = (
    """
    CREATE TABLE clients (
        id              INTEGER PRIMARY KEY,
        name            TEXT NOT NULL UNIQUE,
        key_id          TEXT NOT NULL UNIQUE,
        public_key_pem  TEXT NOT NULL,
        node_public_key TEXT UNIQUE,  -- Flower binds a node id to its key: never shared
        added_at        TEXT NOT NULL,
        revoked_at      TEXT
    )
    """,
    """
    CREATE TABLE submissions (
        id            INTEGER PRIMARY KEY,
        client_key_id TEXT NOT NULL REFERENCES clients (key_id),
        sha256        TEXT NOT NULL,
        size          INTEGER NOT NULL,
        manifest      BLOB NOT NULL,
        signature     BLOB NOT NULL,
        nonce         BLOB NOT NULL,
        task_metadata TEXT NOT NULL,
        received_at   TEXT NOT NULL,
        state         TEXT NOT NULL CHECK (state IN ('received', 'accepted', 'refused')),
        reason        TEXT,
        verdict_at    TEXT,
        -- Order of verdicts, so a round can say exactly which ones it has seen.
        verdict_seq   INTEGER UNIQUE,
        UNIQUE (client_key_id, sha256)
    )
    """,
    "CREATE INDEX submissions_by_state ON submissions (state, id)",
    """
    CREATE TABLE nonces (
        client_key_id TEXT NOT NULL,
        nonce         BLOB NOT NULL,
        seen_at       TEXT NOT NULL,
        PRIMARY KEY (client_key_id, nonce)
    )
    """,
    """
    CREATE TABLE rounds (
        id                INTEGER PRIMARY KEY,
        requested_at      TEXT NOT NULL,
        started_at        TEXT,
        finished_at       TEXT,
        state             TEXT NOT NULL
                          CHECK (state IN ('requested', 'running', 'finished', 'failed')),
        preset            TEXT,
        error             TEXT,
        -- The highest submissions.verdict_seq when the round started.
        verdict_watermark INTEGER
    )
    """,
    """
    CREATE TABLE releases (
        version    INTEGER PRIMARY KEY,
        round_id   INTEGER REFERENCES rounds (id),
        sha256     TEXT NOT NULL,
        size       INTEGER NOT NULL,
        manifest   BLOB NOT NULL,
        signature  BLOB NOT NULL,
        created_at TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE evaluations (
        id         INTEGER PRIMARY KEY,
        round_id   INTEGER NOT NULL REFERENCES rounds (id),
        node_id    TEXT NOT NULL,
        metrics    TEXT NOT NULL,
        created_at TEXT NOT NULL
    )
    """,
)

# Version 2: key rotation and withdrawn submissions. A rotated owner gets a new row for
# its new key (submissions name the exact key that signed them, as a foreign key of
# clients.key_id), so the rows of one owner share its name: only the current row's name
# and node key stay unique. SQLite cannot drop a UNIQUE constraint, so the table is
# rebuilt as its documentation says (`migrate` runs with foreign keys off and checks
# them before the commit).
_V2 = (
    """
    CREATE TABLE clients_v2 (
        id              INTEGER PRIMARY KEY,
        name            TEXT NOT NULL,
        key_id          TEXT NOT NULL UNIQUE,
        public_key_pem  TEXT NOT NULL,
        node_public_key TEXT,
        added_at        TEXT NOT NULL,
        revoked_at      TEXT,
        -- When `clients rotate` replaced this key by the owner's next row.
        replaced_at     TEXT
    )
    """,
    "INSERT INTO clients_v2 (id, name, key_id, public_key_pem, node_public_key, added_at,"
    " revoked_at) SELECT id, name, key_id, public_key_pem, node_public_key, added_at,"
    " revoked_at FROM clients",
    "DROP TABLE clients",
    "ALTER TABLE clients_v2 RENAME TO clients",
    "CREATE UNIQUE INDEX clients_current_name ON clients (name) WHERE replaced_at IS NULL",
    # A rotation that keeps the node key carries it to the new row; Flower still needs
    # one owner per node key.
    "CREATE UNIQUE INDEX clients_current_node_key ON clients (node_public_key)"
    " WHERE replaced_at IS NULL",
    # Set by `clients revoke` (unless --keep-submissions): the row keeps its verdict and
    # its verdict_seq, and no later round reads it.
    "ALTER TABLE submissions ADD COLUMN withdrawn_at TEXT",
)

# Version 3: the append-only audit log (`free_server.audit`). The triggers refuse UPDATE
# and DELETE, so no code path can rewrite it; editing the file itself is what
# `free-server audit verify` catches.
_V3 = (
    """
    CREATE TABLE audit (
        seq       INTEGER PRIMARY KEY,
        at        TEXT NOT NULL,
        kind      TEXT NOT NULL,
        body      TEXT NOT NULL,
        prev      TEXT NOT NULL,
        hash      TEXT NOT NULL UNIQUE,
        signature BLOB NOT NULL
    )
    """,
    "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit"
    " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
    "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit"
    " BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
)

# Version 4: screening (`free_common.screening`). A held submission keeps its state
# ('received' when screening held it, 'accepted' when the operator did) and stays out of
# every round and of intake until the operator releases or refuses it.
_V4 = (
    "ALTER TABLE submissions ADD COLUMN held_at TEXT",
    "ALTER TABLE submissions ADD COLUMN hold_reason TEXT",
    # The screening figures as JSON; null for a submission that was not screened.
    "ALTER TABLE submissions ADD COLUMN screening TEXT",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2, _V3, _V4)
"""Migration ``i`` (0-based) takes the schema from version ``i`` to ``i + 1``."""

SCHEMA_VERSION = len(MIGRATIONS)


def current_version(conn: sqlite3.Connection) -> int:
    """Return the schema version of an open database (0 for an empty one)."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if exists is None:
        return 0
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def migrate(conn: sqlite3.Connection, where: str) -> int:
    """Bring the schema up to `SCHEMA_VERSION` inside the caller's write transaction.

    Parameters
    ----------
    conn
        A connection inside ``BEGIN IMMEDIATE``, so two processes opening a new
        store at once do not both migrate it, with foreign keys off (a migration
        may rebuild a table that others reference; they are checked at the end).
    where
        The store's path, for the error message.

    Returns
    -------
    int
        The schema version the store had before.
    """
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
    )
    found = current_version(conn)
    if found > SCHEMA_VERSION:
        raise StoreVersionError(
            f"the store at {where} has schema version {found}, but this free-server knows "
            f"only up to {SCHEMA_VERSION}: upgrade free-server to open it"
        )
    now = datetime.now(UTC).isoformat()
    for version in range(found + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[version - 1]:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, now)
        )
    broken = conn.execute("PRAGMA foreign_key_check").fetchall()
    if broken:
        raise StoreError(
            f"migrating the store at {where} would leave {len(broken)} row(s) naming a missing"
            " record; nothing was changed: restore the store from a backup"
        )
    return found
