"""The aggregator's schema: one versioned list of migrations for both engines.

Each `Migration` is applied once, in order, inside one transaction, and recorded in
`schema_migrations`. Statements are written in the SQL both SQLite and PostgreSQL speak
(TEXT, BIGINT, `CREATE … IF NOT EXISTS`); a migration that needs engine-specific SQL gives
`sqlite=` and `postgres=` instead. To add a table (to both engines at once) append a
Migration with the next version; never edit one that has shipped.

Several aggregator processes may start together on one database: PostgreSQL serialises them
on an advisory lock, SQLite on `BEGIN IMMEDIATE`; the loser finds the work done.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol


class StorageUnavailable(Exception):
    """The database failed (disk full, read-only, connection lost): transient, answered 503."""


class SchemaTooNew(Exception):
    """The database was migrated by a newer aggregator than this one."""


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...] = ()
    sqlite: tuple[str, ...] | None = None
    postgres: tuple[str, ...] | None = None

    def for_dialect(self, dialect: str) -> tuple[str, ...]:
        specific = self.sqlite if dialect == "sqlite" else self.postgres
        return specific if specific is not None else self.statements


MIGRATIONS: tuple[Migration, ...] = (
    # The tables of the first release (created then without a version table: IF NOT EXISTS
    # adopts such a database).
    Migration(1, "receipts and challenges", (
        """CREATE TABLE IF NOT EXISTS receipts (
            digest TEXT PRIMARY KEY,
            did TEXT NOT NULL,
            nonce TEXT NOT NULL,
            pubkey TEXT NOT NULL,
            run_id TEXT NOT NULL,
            attempt BIGINT NOT NULL,
            ops BIGINT NOT NULL,
            started_ms BIGINT NOT NULL,
            challenge TEXT,
            accepted_ms BIGINT NOT NULL,
            receipt TEXT NOT NULL,
            UNIQUE (did, nonce))""",
        "CREATE INDEX IF NOT EXISTS receipts_run ON receipts (run_id)",
        """CREATE TABLE IF NOT EXISTS challenges (
            challenge TEXT PRIMARY KEY,
            did TEXT NOT NULL,
            issued_ms BIGINT NOT NULL,
            expires_ms BIGINT NOT NULL)""",
    )),
    Migration(2, "step-free challenge intervals, challenge expiry, the fleet view", (
        # The time from a challenge's issue to a receipt's acceptance, measured on a clock
        # that does not step (spec §9): the rate floor's denominator.
        "ALTER TABLE receipts ADD COLUMN challenge_elapsed_ms BIGINT",
        "ALTER TABLE challenges ADD COLUMN issuer TEXT",
        "ALTER TABLE challenges ADD COLUMN issued_mono_ns BIGINT",
        "CREATE INDEX IF NOT EXISTS challenges_expiry ON challenges (expires_ms)",
        "CREATE INDEX IF NOT EXISTS challenges_did ON challenges (did, expires_ms)",
        "CREATE INDEX IF NOT EXISTS receipts_did ON receipts (did)",
        "CREATE INDEX IF NOT EXISTS receipts_challenge ON receipts (challenge)",
        """CREATE TABLE IF NOT EXISTS rejections (
            did TEXT NOT NULL,
            reason TEXT NOT NULL,
            count BIGINT NOT NULL,
            last_ms BIGINT NOT NULL,
            PRIMARY KEY (did, reason))""",
    )),
    Migration(3, "tops-receipt/2: run challenges, runs and their keys, commitments with drawn leaves", (
        """CREATE TABLE IF NOT EXISTS v2_run_challenges (
            challenge TEXT PRIMARY KEY,
            did TEXT NOT NULL,
            pubkey TEXT NOT NULL,
            issued_ms BIGINT NOT NULL,
            expires_ms BIGINT NOT NULL,
            clock_epoch TEXT NOT NULL,
            issued_clock_ms BIGINT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS v2_runs (
            run_id TEXT PRIMARY KEY,
            pubkey TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS v2_commitments (
            digest TEXT PRIMARY KEY,
            pubkey TEXT NOT NULL,
            did TEXT NOT NULL,
            nonce TEXT NOT NULL,
            run_id TEXT NOT NULL,
            attempt BIGINT NOT NULL,
            ops BIGINT NOT NULL,
            challenge TEXT NOT NULL,
            s BIGINT NOT NULL,
            leaves TEXT NOT NULL,
            committed_ms BIGINT NOT NULL,
            expires_ms BIGINT NOT NULL,
            state TEXT NOT NULL,
            error TEXT,
            detail TEXT,
            verdict_ms BIGINT,
            clock_epoch TEXT,
            accepted_clock_ms BIGINT,
            commitment TEXT NOT NULL,
            UNIQUE (pubkey, did, nonce))""",
        "CREATE INDEX IF NOT EXISTS v2_commitments_run ON v2_commitments (run_id)",
        "CREATE INDEX IF NOT EXISTS v2_commitments_key ON v2_commitments (pubkey)",
    )),
    # A v1 receipt is kept as its signed claim (the body and `sig`, without the openings);
    # a byte-identical resend is recognised by the SHA-256 of the body it was accepted from.
    # Rows stored before keep the whole receipt and no hash: a resend is compared to that.
    Migration(4, "v1 receipts: the SHA-256 of the body as sent", (
        "ALTER TABLE receipts ADD COLUMN sent_sha256 TEXT",
    )),
)

LATEST = MIGRATIONS[-1].version
_LOCK_KEY = 0x70_6A_6F_62  # any constant: the advisory lock all replicas take to migrate


class Connection(Protocol):
    def execute(self, sql: str, args: Any = ...) -> Any: ...


def migrate(conn: Connection, dialect: str, begin: str) -> int:
    """Bring the schema to LATEST; returns the version found before. `conn` is in
    autocommit mode; `begin` starts a write transaction ("BEGIN IMMEDIATE" or "BEGIN")."""
    conn.execute(begin)
    try:
        if dialect == "postgres":  # before any DDL: concurrent CREATE … IF NOT EXISTS can collide in PostgreSQL
            conn.execute(f"SELECT pg_advisory_xact_lock({_LOCK_KEY})")
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY,"
                     " description TEXT NOT NULL, applied_ms BIGINT NOT NULL)")
        applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations").fetchall()}
        found = max(applied, default=0)
        if found > LATEST:
            raise SchemaTooNew(f"the database schema is version {found}, newer than this aggregator's {LATEST};"
                               " run the newer aggregator or another database")
        for migration in MIGRATIONS:
            if migration.version in applied:
                continue
            for statement in migration.for_dialect(dialect):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version, description, applied_ms) VALUES (?, ?, ?)",
                         (migration.version, migration.description, int(time.time() * 1000)))
        conn.execute("COMMIT")
    except BaseException:
        rollback_quietly(conn)
        raise
    return found


def rollback_quietly(conn: Any) -> None:
    """Roll back if a transaction is still open. SQLite ends a transaction itself on some
    errors (SQLITE_FULL at COMMIT): a ROLLBACK then would raise `no transaction is active`
    and hide the real failure."""
    in_transaction = getattr(conn, "in_transaction", True)
    if not in_transaction:
        return
    try:
        conn.execute("ROLLBACK")
    except Exception:  # the original error is what matters; it is re-raised by the caller
        pass
