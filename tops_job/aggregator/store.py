"""Accepted receipts and issued challenges in SQLite (WAL, synchronous=FULL).

Each server thread has its own connection; writes are short `BEGIN IMMEDIATE`
transactions, so concurrent requests serialise on the database, never on verification.
A receipt is counted once: `digest` is the primary key and `(did, nonce)` is unique.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    digest TEXT PRIMARY KEY,
    did TEXT NOT NULL,
    nonce TEXT NOT NULL,
    pubkey TEXT NOT NULL,
    run_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    ops INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    challenge TEXT,
    accepted_ms INTEGER NOT NULL,
    receipt TEXT NOT NULL,
    UNIQUE (did, nonce)
);
CREATE INDEX IF NOT EXISTS receipts_run ON receipts (run_id);
CREATE TABLE IF NOT EXISTS challenges (
    challenge TEXT PRIMARY KEY,
    did TEXT NOT NULL,
    issued_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
"""

ACCEPTED, DUPLICATE, REPLAY = "accepted", "duplicate", "replay"


class Store:
    def __init__(self, path: Path | str):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        conn = self._conn()
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA synchronous=FULL")  # a 200 means it survives power loss
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def add_receipt(self, *, digest: str, did: str, nonce: str, pubkey: str, run_id: str, attempt: int, ops: int,
                    started_ms: int, challenge: str | None, accepted_ms: int, receipt: str) -> str:
        """ACCEPTED (stored now), DUPLICATE (this digest was stored before) or REPLAY
        (the (did, nonce) was stored with another digest)."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO receipts (digest, did, nonce, pubkey, run_id, attempt, ops, started_ms, challenge,"
                " accepted_ms, receipt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (digest, did, nonce, pubkey, run_id, attempt, ops, started_ms, challenge, accepted_ms, receipt))
            if cursor.rowcount == 1:
                outcome = ACCEPTED
            elif conn.execute("SELECT 1 FROM receipts WHERE digest = ?", (digest,)).fetchone():
                outcome = DUPLICATE
            else:
                outcome = REPLAY
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return outcome

    def issue_challenge(self, did: str, now_ms: int, ttl_ms: int) -> dict[str, Any]:
        challenge = secrets.token_hex(32)
        self._conn().execute("INSERT INTO challenges (challenge, did, issued_ms, expires_ms) VALUES (?, ?, ?, ?)",
                             (challenge, did, now_ms, now_ms + ttl_ms))
        return {"challenge": challenge, "issued_ms": now_ms, "expires_ms": now_ms + ttl_ms}

    def challenge(self, challenge: str) -> dict[str, Any] | None:
        row = self._conn().execute("SELECT did, issued_ms, expires_ms FROM challenges WHERE challenge = ?",
                                   (challenge,)).fetchone()
        return None if row is None else {"did": row[0], "issued_ms": row[1], "expires_ms": row[2]}

    def count(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM receipts").fetchone()[0]

    def run_report(self, run_id: str, did: str | None = None) -> dict[str, Any] | None:
        """Accepted receipts of a run, total ops and, per run challenge, the verified rate
        floor Σ ops / (last accepted − challenge issued) (spec §8)."""
        query = "SELECT did, ops, accepted_ms, challenge FROM receipts WHERE run_id = ?"
        args: tuple[Any, ...] = (run_id,)
        if did is not None:
            query += " AND did = ?"
            args += (did,)
        rows = self._conn().execute(query, args).fetchall()
        if not rows:
            return None
        groups: dict[str, list[tuple[int, int]]] = {}
        for _did, ops, accepted_ms, challenge in rows:
            if challenge:
                groups.setdefault(challenge, []).append((ops, accepted_ms))
        challenges = []
        for challenge, items in groups.items():
            issued = self.challenge(challenge)
            if issued is None:
                continue
            ops_total = sum(ops for ops, _ in items)
            last = max(accepted for _, accepted in items)
            seconds = max(last - issued["issued_ms"], 1) / 1000.0
            challenges.append({"challenge": challenge, "issued_ms": issued["issued_ms"], "last_accepted_ms": last,
                               "receipts": len(items), "ops_total": ops_total,
                               "rate_floor_ops_per_s": ops_total / seconds})
        report: dict[str, Any] = {
            "run_id": run_id, "dids": sorted({row[0] for row in rows}), "receipts": len(rows),
            "ops_total": sum(row[1] for row in rows), "first_accepted_ms": min(row[2] for row in rows),
            "last_accepted_ms": max(row[2] for row in rows), "challenges": challenges,
            "rate_floor_ops_per_s": None,
        }
        if len(challenges) == 1:
            report["challenge_issued_ms"] = challenges[0]["issued_ms"]
            report["rate_floor_ops_per_s"] = challenges[0]["rate_floor_ops_per_s"]
            report["rate_floor_tflops"] = challenges[0]["rate_floor_ops_per_s"] / 1e12
        return report

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass
