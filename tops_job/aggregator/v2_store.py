"""tops-receipt/2 state (spec §9.1): run challenges, commitments with their drawn leaves and
verdicts, and run ownership. The tables are migration 3 (migrations.py) in the v1 store's
database, on either engine; this class runs its queries on that store's connections.

A commitment is inserted (synchronous=FULL) in the same transaction that checks its replay
key and its run's owner, and only then is its challenge answered: a challenge the worker
sees always belongs to a durable record. In the server those transactions are the group
commit's (group_commit.py), shared with whatever else concurrent requests write.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

COMMITTED, ACCEPTED, REJECTED, EXPIRED = "committed", "accepted", "rejected", "expired"
OWNERS_REMEMBERED = 4096  # runs whose owner a process keeps (each a run id and a key)


class Conflict(Exception):
    """A commitment that the replay key or the run's owner refuses (409)."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


Write = Callable[[Any], Any]  # a function of the open write connection, returning its outcome


def commitment_outcome(outcome: dict[str, Any] | Conflict) -> dict[str, Any]:
    """A commitment_write's outcome: the record, or its Conflict raised."""
    if isinstance(outcome, Conflict):
        raise outcome
    return outcome


def _run_taken(run_id: str) -> Conflict:
    return Conflict("run_id_taken", f"run {run_id} belongs to another key")


def _replayed_nonce() -> Conflict:
    return Conflict("replayed_nonce", "this (pubkey, did, nonce) was committed with another digest")


class V2Store:
    def __init__(self, store: Any):
        """`store`: the aggregator's Store (SQLite or PostgreSQL), migrated; its connections,
        one per thread, and its write-transaction statement are used here."""
        self._store = store
        self._owners: dict[str, str] = {}  # run id -> the key that owns it, learned from committed writes

    def _conn(self) -> Any:
        return self._store._conn()

    # ---- run challenges

    def issue_run_challenge(self, *, challenge: str, did: str, pubkey: str, now_ms: int, ttl_ms: int,
                            clock_epoch: str, clock_ms: int) -> dict[str, Any]:
        self._conn().execute(
            "INSERT INTO v2_run_challenges (challenge, did, pubkey, issued_ms, expires_ms, clock_epoch, issued_clock_ms)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)", (challenge, did, pubkey, now_ms, now_ms + ttl_ms, clock_epoch, clock_ms))
        return {"ok": True, "challenge": challenge, "issued_ms": now_ms, "expires_ms": now_ms + ttl_ms}

    def run_challenge(self, challenge: str) -> dict[str, Any] | None:
        row = self._conn().execute(
            "SELECT did, pubkey, issued_ms, expires_ms, clock_epoch, issued_clock_ms FROM v2_run_challenges"
            " WHERE challenge = ?", (challenge,)).fetchone()
        if row is None:
            return None
        return dict(zip(("did", "pubkey", "issued_ms", "expires_ms", "clock_epoch", "issued_clock_ms"), row))

    def purge(self, now_ms: int, retention_ms: int) -> None:
        """Forget run challenges, and commitments that ended unaccepted, older than the retention."""
        conn = self._conn()
        conn.execute("DELETE FROM v2_run_challenges WHERE expires_ms < ?", (now_ms - retention_ms,))
        conn.execute("DELETE FROM v2_commitments WHERE state IN ('rejected', 'expired') AND verdict_ms < ?",
                     (now_ms - retention_ms,))

    # ---- commitments

    def run_owned(self, run_id: str, pubkey: str) -> None:
        """A commitment of the run by this key is committed: the run is the key's for good
        (v2_runs rows are never deleted), and its next commitments skip the owner's read.
        Called after the commit, never from inside a write: a write rolled back binds nothing."""
        if self._owners.get(run_id) != pubkey:
            if len(self._owners) >= OWNERS_REMEMBERED:
                self._owners.clear()  # the runs under way are read again, once each
            self._owners[run_id] = pubkey

    def commitment(self, digest: str) -> dict[str, Any] | None:
        return self._read_commitment(self._conn(), digest)

    @staticmethod
    def _read_commitment(conn: Any, digest: str) -> dict[str, Any] | None:
        row = conn.execute(
            "SELECT state, error, detail, leaves, s, expires_ms, ops, commitment, run_id, pubkey FROM v2_commitments"
            " WHERE digest = ?", (digest,)).fetchone()
        if row is None:
            return None
        record = dict(zip(("state", "error", "detail", "leaves", "s", "expires_ms", "ops", "commitment", "run_id",
                           "pubkey"), row))
        record["leaves"] = json.loads(record["leaves"])
        return record

    def add_commitment(self, **fields: Any) -> dict[str, Any]:
        """Record a checked commitment with its drawn leaves, or return the record already
        there for this digest. Raises Conflict for a replayed nonce or another key's run."""
        return commitment_outcome(self.write_together([self.commitment_write(**fields)])[0])

    def set_verdict(self, digest: str, state: str, **fields: Any) -> str:
        """Move a COMMITTED record to its final state; returns the state it ends in (a verdict
        recorded first by another request wins)."""
        return str(self.write_together([self.verdict_write(digest, state, **fields)])[0][0])

    def write_together(self, writes: list[Write]) -> list[Any]:
        """Each write's outcome, all of them run in one transaction and committed: in the
        server, through the group commit, one fsync for everything an exchange records."""
        return list(self._store.group_write(lambda conn: [write(conn) for write in writes]))

    def commitment_write(self, *, digest: str, pubkey: str, did: str, nonce: str, run_id: str, attempt: int, ops: int,
                         challenge: str, s: int, leaves: list[int], now_ms: int, ttl_ms: int,
                         commitment: str) -> Write:
        """add_commitment's write, for write_together: its outcome is the record, or the
        Conflict (commitment_outcome raises it)."""

        def write(conn: Any) -> dict[str, Any] | Conflict:  # a conflict is an outcome, not a failed batch
            # The run's owner first: a digest already recorded names the same key and run (the
            # digest covers both), so its owner check passes and the insert below finds it.
            # A run this process saw committed for this key is the key's: nothing to read.
            owner = (pubkey,) if self._owners.get(run_id) == pubkey else \
                conn.execute("SELECT pubkey FROM v2_runs WHERE run_id = ?", (run_id,)).fetchone()
            if owner is not None and owner[0] != pubkey:
                return _run_taken(run_id)
            if owner is None:
                # A run's first commitment binds the run to its key, and a refused one records
                # nothing: a replayed nonce is looked for before the run is bound. A later
                # commitment's replay is the insert's conflict below.
                if conn.execute("SELECT 1 FROM v2_commitments WHERE pubkey = ? AND did = ? AND nonce = ?",
                                (pubkey, did, nonce)).fetchone():
                    return _replayed_nonce()
                conn.execute("INSERT INTO v2_runs (run_id, pubkey) VALUES (?, ?) ON CONFLICT DO NOTHING", (run_id, pubkey))
                owner = conn.execute("SELECT pubkey FROM v2_runs WHERE run_id = ?", (run_id,)).fetchone()
                if owner[0] != pubkey:
                    return _run_taken(run_id)
            # ON CONFLICT: the digest (primary key) or the (pubkey, did, nonce) replay key is
            # recorded already, here or by a PostgreSQL replica since the reads above: that row
            # wins. The same digest is its record; none is a nonce replayed with another digest.
            inserted = conn.execute(
                "INSERT INTO v2_commitments (digest, pubkey, did, nonce, run_id, attempt, ops, challenge, s, leaves,"
                " committed_ms, expires_ms, state, commitment) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (digest, pubkey, did, nonce, run_id, attempt, ops, challenge, s, json.dumps(leaves), now_ms,
                 now_ms + ttl_ms, COMMITTED, commitment)).rowcount == 1
            if not inserted:
                return self._read_commitment(conn, digest) or _replayed_nonce()
            return {"state": COMMITTED, "error": None, "detail": None, "leaves": list(leaves), "s": s,
                    "expires_ms": now_ms + ttl_ms, "ops": ops, "commitment": commitment, "run_id": run_id,
                    "pubkey": pubkey}  # what commitment(digest) reads back, without reading it

        return write

    def verdict_write(self, digest: str, state: str, *, now_ms: int, error: str | None = None, detail: str | None = None,
                      clock_epoch: str | None = None, clock_ms: int | None = None) -> Write:
        """set_verdict's write, for write_together: its outcome is the state the record ends in,
        and whether this write moved it there (not: another request's verdict came first)."""

        def write(conn: Any) -> tuple[str, bool]:
            moved = conn.execute(
                "UPDATE v2_commitments SET state = ?, error = ?, detail = ?, verdict_ms = ?, clock_epoch = ?,"
                " accepted_clock_ms = ? WHERE digest = ? AND state = ?",
                (state, error, detail, now_ms, clock_epoch, clock_ms, digest, COMMITTED)).rowcount == 1
            if moved:
                return state, True
            row = conn.execute("SELECT state FROM v2_commitments WHERE digest = ?", (digest,)).fetchone()
            return (EXPIRED if row is None else str(row[0])), False  # gone (deleted by hand): nothing to accept

        return write

    def run_report(self, run_id: str, now_ms: int) -> dict[str, Any] | None:
        owner = self._conn().execute("SELECT pubkey FROM v2_runs WHERE run_id = ?", (run_id,)).fetchone()
        if owner is None:
            return None
        rows = self._conn().execute(
            "SELECT state, ops, expires_ms, challenge, clock_epoch, accepted_clock_ms FROM v2_commitments"
            " WHERE run_id = ?", (run_id,)).fetchall()
        counts = {ACCEPTED: 0, REJECTED: 0, EXPIRED: 0, "awaiting_openings": 0}
        ops_total = 0
        by_challenge: dict[str, list[tuple[int, str, int]]] = {}
        for state, ops, expires_ms, challenge, epoch, clock_ms in rows:
            if state == COMMITTED:
                counts[EXPIRED if expires_ms <= now_ms else "awaiting_openings"] += 1
                continue
            counts[state] += 1
            if state == ACCEPTED:
                ops_total += ops
                by_challenge.setdefault(challenge, []).append((ops, epoch, clock_ms))
        floors = []
        for challenge, items in by_challenge.items():
            issued = self.run_challenge(challenge)
            if issued is None:
                continue
            same = [(ops, clock_ms) for ops, epoch, clock_ms in items if epoch == issued["clock_epoch"]]
            if not same:
                continue
            seconds = max(max(clock for _, clock in same) - issued["issued_clock_ms"], 1) / 1000.0
            floors.append({"challenge": challenge, "receipts": len(same), "ops_total": sum(o for o, _ in same),
                           "seconds": seconds, "rate_floor_ops_per_s": sum(o for o, _ in same) / seconds})
        return {"ok": True, "run_id": run_id, "pubkey": owner[0], "accepted": counts[ACCEPTED],
                "rejected": counts[REJECTED], "expired": counts[EXPIRED],
                "awaiting_openings": counts["awaiting_openings"], "ops_total": ops_total, "challenges": floors,
                "rate_floor_ops_per_s": max((f["rate_floor_ops_per_s"] for f in floors), default=None)}

    def key_report(self, pubkey: str, now_ms: int) -> dict[str, Any]:
        """Per key: commitments accepted, rejected, and abandoned (expired unopened), spec §12.2."""
        rows = self._conn().execute("SELECT state, expires_ms FROM v2_commitments WHERE pubkey = ?", (pubkey,)).fetchall()
        counts = {ACCEPTED: 0, REJECTED: 0, "abandoned": 0, "awaiting_openings": 0}
        for state, expires_ms in rows:
            if state in (COMMITTED, EXPIRED):
                counts["abandoned" if state == EXPIRED or expires_ms <= now_ms else "awaiting_openings"] += 1
            else:
                counts[state] += 1
        total = sum(counts.values())
        return {"ok": True, "pubkey": pubkey, **counts,
                "abandonment_rate": counts["abandoned"] / total if total else 0.0}

    def close(self) -> None:
        """The connections are the store's; it closes them."""
