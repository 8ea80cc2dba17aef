"""Accepted receipts and issued challenges in SQLite (WAL, synchronous=FULL).

Each server thread has its own connection; writes are short `BEGIN IMMEDIATE`
transactions, so concurrent requests serialise on the database, never on verification.
Writers (threads, and the worker processes of `--workers`) take turns through
`transaction()`, which holds an flock on `<db>.writer-lock` around each one: a writer that
finds SQLite's write lock taken would otherwise sleep in SQLite's busy handler (1, 2, 5,
10 … ms) while the holder commits in about one, which cost two worker processes more
throughput than the second core gave. The kernel wakes a waiter on flock at once.
A receipt is counted once: `digest` is the primary key and `(did, nonce)` is unique.
The schema is `migrations.MIGRATIONS`; `store_pg.PostgresStore` runs these same queries on
PostgreSQL (the SQL here is the dialect both speak).
"""

from __future__ import annotations

import fcntl
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tops_job.aggregator.migrations import migrate, rollback_quietly

ACCEPTED, DUPLICATE, REPLAY = "accepted", "duplicate", "replay"
MAX_OPEN_CHALLENGES_PER_DID = 64  # unexpired challenges no receipt has used yet


class TooManyChallenges(Exception):
    """This did holds MAX_OPEN_CHALLENGES_PER_DID unused, unexpired challenges already."""


class Store:
    dialect = "sqlite"
    begin = "BEGIN IMMEDIATE"

    def __init__(self, path: Path | str):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        self._turn = threading.Lock()  # this process's writers, one at a time
        self._turn_fd: int | None = None  # flock: one writer across processes
        conn = self._conn()
        if self.dialect == "sqlite":
            # 16 KiB pages for a new file (no effect on an existing one): a v1 receipt is tens of
            # KB, and each page is a pwrite to the WAL and again at the checkpoint; 4 KiB pages
            # took ~80 write calls per accepted 93 KB receipt, 16 KiB ones ~30.
            conn.execute("PRAGMA page_size=16384")
            conn.execute("PRAGMA journal_mode=WAL")
        migrate(conn, self.dialect, self.begin)

    def _connect(self) -> Any:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=FULL")  # a 200 means it survives power loss
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(conn, "broken", False):
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def add_receipt(self, *, digest: str, did: str, nonce: str, pubkey: str, run_id: str, attempt: int, ops: int,
                    started_ms: int, challenge: str | None, accepted_ms: int, receipt: str,
                    challenge_elapsed_ms: int | None = None, sent_sha256: str | None = None) -> str:
        """ACCEPTED (stored now), DUPLICATE (this digest was stored before) or REPLAY
        (the (did, nonce) was stored with another digest). `receipt` is what is kept of it
        (the app's choice); `sent_sha256` identifies the body it was accepted from."""
        return self.add_receipts([dict(digest=digest, did=did, nonce=nonce, pubkey=pubkey, run_id=run_id, attempt=attempt,
                                       ops=ops, started_ms=started_ms, challenge=challenge, accepted_ms=accepted_ms,
                                       receipt=receipt, challenge_elapsed_ms=challenge_elapsed_ms,
                                       sent_sha256=sent_sha256)])[0]

    @contextmanager
    def transaction(self, conn: Any) -> Iterator[None]:
        """A write transaction on `conn`: committed when the block ends, rolled back when it
        raises; writers on this database file take turns (see the module's docstring)."""
        with self._writers_turn():
            conn.execute(self.begin)
            try:
                yield
                conn.execute("COMMIT")
            except BaseException:
                rollback_quietly(conn)
                raise

    @contextmanager
    def _writers_turn(self) -> Iterator[None]:
        if self.dialect != "sqlite" or self.path == ":memory:":
            yield
            return
        with self._turn:
            if self._turn_fd is None:
                try:
                    self._turn_fd = os.open(f"{self.path}.writer-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                except OSError:  # a read-only directory: SQLite's own lock (and busy handler) still serialises
                    self._turn_fd = -1
            if self._turn_fd < 0:
                yield
                return
            fcntl.flock(self._turn_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._turn_fd, fcntl.LOCK_UN)

    def group_write(self, write: Callable[[Any], Any]) -> Any:
        """`write(conn)`'s outcome, run in a write transaction of its own and committed.
        GroupCommitStore (the server's) runs concurrent writes in one shared transaction."""
        conn = self._conn()
        with self.transaction(conn):
            return write(conn)

    def failed_whole(self, exc: BaseException) -> bool:
        """Whether `exc` is the database failing as a whole (full, read-only, I/O error, locked),
        not one write's own fault; the group commit then answers each write of a failed batch
        with it instead of trying each alone (N more failures, each maybe slow)."""
        return isinstance(exc, sqlite3.OperationalError)

    def add_receipts(self, items: list[dict[str, Any]]) -> list[str]:
        """add_receipt for several receipts in one transaction (one commit, one fsync): the
        outcome of each, in order. A digest twice in `items` is ACCEPTED then DUPLICATE."""
        return list(self.group_write(lambda conn: self.insert_receipts(conn, items)))

    def insert_receipts(self, conn: Any, items: list[dict[str, Any]]) -> list[str]:
        """add_receipts' inserts, in the write transaction the caller holds open on `conn`."""
        outcomes = []
        for item in items:
            cursor = conn.execute(
                "INSERT INTO receipts (digest, did, nonce, pubkey, run_id, attempt, ops, started_ms, challenge,"
                " accepted_ms, receipt, challenge_elapsed_ms, sent_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (item["digest"], item["did"], item["nonce"], item["pubkey"], item["run_id"], item["attempt"], item["ops"],
                 item["started_ms"], item["challenge"], item["accepted_ms"], item["receipt"],
                 item.get("challenge_elapsed_ms"), item.get("sent_sha256")))
            if cursor.rowcount == 1:
                outcomes.append(ACCEPTED)
            elif conn.execute("SELECT 1 FROM receipts WHERE digest = ?", (item["digest"],)).fetchone():
                outcomes.append(DUPLICATE)
            else:
                outcomes.append(REPLAY)
        return outcomes

    def stored_receipt(self, digest: str) -> tuple[str, str, str | None] | None:
        """(pubkey hex, what was kept of the receipt, SHA-256 hex of the body it was accepted
        from or None for rows older than that column) of an accepted receipt, to answer a
        resend without verifying it again."""
        row = self._conn().execute("SELECT pubkey, receipt, sent_sha256 FROM receipts WHERE digest = ?",
                                   (digest,)).fetchone()
        return None if row is None else (row[0], row[1], row[2])

    def issue_challenge(self, did: str, now_ms: int, ttl_ms: int, *, issuer: str | None = None,
                        mono_ns: int | None = None) -> dict[str, Any]:
        """A fresh challenge for `did`. Raises TooManyChallenges when `did` already holds
        its share of unused, unexpired ones."""
        conn = self._conn()
        open_count = conn.execute(
            "SELECT COUNT(*) FROM challenges c WHERE c.did = ? AND c.expires_ms >= ?"
            " AND NOT EXISTS (SELECT 1 FROM receipts r WHERE r.challenge = c.challenge)", (did, now_ms)).fetchone()[0]
        if open_count >= MAX_OPEN_CHALLENGES_PER_DID:
            raise TooManyChallenges(did)
        challenge = secrets.token_hex(32)
        conn.execute("INSERT INTO challenges (challenge, did, issued_ms, expires_ms, issuer, issued_mono_ns)"
                     " VALUES (?, ?, ?, ?, ?, ?)", (challenge, did, now_ms, now_ms + ttl_ms, issuer, mono_ns))
        return {"challenge": challenge, "issued_ms": now_ms, "expires_ms": now_ms + ttl_ms}

    def purge_challenges(self, now_ms: int) -> int:
        """Delete expired challenges no receipt names (those stay: they date a rate floor)."""
        cursor = self._conn().execute(
            "DELETE FROM challenges WHERE expires_ms < ?"
            " AND NOT EXISTS (SELECT 1 FROM receipts r WHERE r.challenge = challenges.challenge)", (now_ms,))
        return max(cursor.rowcount, 0)

    def challenge(self, challenge: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT did, issued_ms, expires_ms, issuer, issued_mono_ns FROM challenges"
                                   " WHERE challenge = ?", (challenge,)).fetchone()
        return None if row is None else {"did": row[0], "issued_ms": row[1], "expires_ms": row[2],
                                         "issuer": row[3], "issued_mono_ns": row[4]}

    def count(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM receipts").fetchone()[0]

    def count_challenges(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM challenges").fetchone()[0]

    def record_rejection(self, did: str, reason: str, now_ms: int) -> None:
        """Count a rejection against a did the fleet view knows (one with an accepted
        receipt): a rejected receipt's did is unauthenticated, so strangers are not stored."""
        self._conn().execute(
            "INSERT INTO rejections (did, reason, count, last_ms) SELECT ?, ?, 1, ?"
            " WHERE EXISTS (SELECT 1 FROM receipts WHERE did = ?)"
            " ON CONFLICT (did, reason) DO UPDATE SET count = rejections.count + 1, last_ms = excluded.last_ms",
            (did, reason, now_ms, did))

    def record_rejections(self, items: list[tuple[str, str, int, int]]) -> None:
        """record_rejection for many (did, reason, count, last_ms) at once, in one transaction."""
        conn = self._conn()
        with self.transaction(conn):
            for did, reason, count, last_ms in items:
                conn.execute(
                    "INSERT INTO rejections (did, reason, count, last_ms) SELECT ?, ?, ?, ?"
                    " WHERE EXISTS (SELECT 1 FROM receipts WHERE did = ?)"
                    " ON CONFLICT (did, reason) DO UPDATE SET count = rejections.count + excluded.count,"
                    " last_ms = excluded.last_ms", (did, reason, count, last_ms, did))

    def run_report(self, run_id: str, did: str | None = None) -> dict[str, Any] | None:
        """Accepted receipts of a run, total ops and, per run challenge, the verified rate
        floor (spec §8, §9)."""
        from tops_job.aggregator.fleet import run_report

        query = "SELECT did, ops, accepted_ms, challenge, challenge_elapsed_ms FROM receipts WHERE run_id = ?"
        args: tuple[Any, ...] = (run_id,)
        if did is not None:
            query += " AND did = ?"
            args += (did,)
        rows = self._conn().execute(query, args).fetchall()
        if not rows:
            return None
        return run_report(run_id, rows, self.challenge)

    def fleet_rows(self, after: str = "", limit: int = 1_000_000) -> list[tuple[Any, ...]]:
        """(did, receipts, ops, first accepted, last accepted, runs) per did, in did order,
        from the first did after `after`."""
        return [tuple(row) for row in self._conn().execute(
            "SELECT did, COUNT(*), CAST(SUM(ops) AS BIGINT), MIN(accepted_ms), MAX(accepted_ms), COUNT(DISTINCT run_id)"
            " FROM receipts WHERE did > ? GROUP BY did ORDER BY did LIMIT ?", (after, limit)).fetchall()]

    def did_rows(self, did: str) -> list[tuple[Any, ...]]:
        """(run_id, ops, accepted_ms, challenge, challenge_elapsed_ms) of each receipt of `did`."""
        return [tuple(row) for row in self._conn().execute(
            "SELECT run_id, ops, accepted_ms, challenge, challenge_elapsed_ms FROM receipts WHERE did = ?"
            " ORDER BY accepted_ms", (did,)).fetchall()]

    def rejections(self, did: str | None = None) -> list[tuple[Any, ...]]:
        query, args = "SELECT did, reason, count, last_ms FROM rejections", ()  # type: tuple[str, tuple[str, ...]]
        if did is not None:
            query, args = query + " WHERE did = ?", (did,)
        return [tuple(row) for row in self._conn().execute(query + " ORDER BY did, reason", args).fetchall()]

    def close(self) -> None:
        with self._turn:
            if self._turn_fd is not None and self._turn_fd >= 0:
                os.close(self._turn_fd)
            self._turn_fd = None
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except Exception:
                pass
