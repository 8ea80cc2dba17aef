"""Group commit: what concurrent requests write (accepted v1 receipts; tops-receipt/2
commitments and verdicts) is written by one thread per process, many to a transaction.

Each accepted receipt must be durable before its 200 (SQLite synchronous=FULL, PostgreSQL's
commit), and a commit costs an fsync — milliseconds, during which SQLite holds its one
write lock. One transaction per receipt caps a whole machine at one fsync's worth of receipts
whatever the cores; here every request waiting at that moment shares the next commit. The
answers are unchanged: each request still gets its own outcome (ACCEPTED, DUPLICATE or
REPLAY; a v2 record or its conflict), or the storage error, after its write is committed.
A write is a function of the open connection, run in order in the batch's transaction: it
returns its outcome or raises. A batch that fails for one write's fault (a constraint, a bug)
is rolled back and each of its writes is run again alone, so that write fails only its own
request. When the database fails as a whole (full, read-only, I/O, the connection lost:
`Store.failed_whole`) every request of the batch gets that error at once, a 503. Savepoints
would not do: SQLite rolls the whole transaction back on SQLITE_FULL or IOERR. Writes are
pure functions of the connection, so running one again after a rollback is safe.

A write with nothing else queued or being written runs on its caller's thread, in a
transaction of its own: handing each write to the writer thread and waiting for it cost about
0.3 ms of CPU an exchange (benchmarks/RESULTS.md, tenth round). The writer thread batches
whatever arrives while a write is under way. A worker's poll thread serves one request at a
time, so its requests share commits differently: each parks at its write, and the writes of
a turn go out together (turn_commit.py, `write_parked`).

Rejection counts (the fleet view's) are not worth a commit each — a client posting invalid
receipts would turn each into an fsync — so they are summed in memory and written by the same
thread at most once every FLUSH_S, nobody waiting for them.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from tops_job.aggregator.turn_commit import current_turn

MAX_BATCH = 64
FLUSH_S = 1.0
MAX_REJECTION_KEYS = 10_000  # (did, reason) pairs held between flushes; more are dropped

log = logging.getLogger("tops_job.aggregator")


class _Pending:
    __slots__ = ("write", "done", "outcome", "error")

    def __init__(self, write: Callable[[Any], Any]):
        self.write = write
        self.done = threading.Event()
        self.outcome: Any = None
        self.error: BaseException | None = None


def _write_all(writes: list[Callable[[Any], Any]], conn: Any) -> list[Any]:
    """Each write's outcome, in order, on the one transaction's connection."""
    return [write(conn) for write in writes]


class GroupCommitStore:
    """`store` with add_receipt and group_write batched; every other method is the store's own."""

    def __init__(self, store: Any, max_batch: int = MAX_BATCH, flush_s: float = FLUSH_S):
        self._store = store
        self._max_batch = max_batch
        self._flush_s = flush_s
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._rejections: dict[tuple[str, str], list[int]] = {}
        self._rejections_lock = threading.Lock()
        self._flushed = time.monotonic()
        self._turn = threading.Lock()  # held by whoever is writing: a caller on its own, or the writer's batch
        self._handed = 0  # writes handed to the writer thread and not yet finished
        self._handed_lock = threading.Lock()
        self._writer = threading.Thread(target=self._write, name="aggregator-group-commit", daemon=True)
        self._writer.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def add_receipt(self, **fields: Any) -> str:
        return str(self.group_write(lambda conn: self._store.insert_receipts(conn, [fields])[0]))

    def group_write(self, write: Callable[[Any], Any]) -> Any:
        """`write(conn)`'s outcome once the transaction it ran in is committed: on this
        thread when no other write is queued or under way, else in the writer's next batch.
        From a request a poll thread serves in a turn (turn_commit.py): with the turn's
        other writes, once its requests have all answered or parked."""
        turn = current_turn()
        if turn is not None:
            return turn.park(self, write)
        if self._turn.acquire(blocking=False):
            try:
                if not self._handed:
                    return self._store.group_write(write)
            finally:
                self._turn.release()
        pending = _Pending(write)
        with self._handed_lock:
            self._handed += 1
        self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.outcome

    def record_rejection(self, did: str, reason: str, now_ms: int) -> None:
        with self._rejections_lock:
            entry = self._rejections.get((did, reason))
            if entry is not None:
                entry[0] += 1
                entry[1] = now_ms
            elif len(self._rejections) < MAX_REJECTION_KEYS:
                self._rejections[(did, reason)] = [1, now_ms]

    def flush_rejections(self) -> None:
        with self._rejections_lock:
            pending, self._rejections = self._rejections, {}
        self._flushed = time.monotonic()
        if pending:
            try:
                self._store.record_rejections([(did, reason, n, last) for (did, reason), (n, last) in pending.items()])
            except Exception as exc:  # counts for the fleet view; the answers stood
                log.warning("could not record %d rejection counts (%s): %s", len(pending), type(exc).__name__, exc)

    def _write(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self._flush_s)
            except queue.Empty:
                self.flush_rejections()
                continue
            if first is None:
                self.flush_rejections()
                return
            if time.monotonic() - self._flushed >= self._flush_s:
                self.flush_rejections()
            with self._turn:  # after a write running on its caller's thread; what queued meanwhile joins the batch
                stop = self._write_batch(first)
            if stop:
                self.flush_rejections()
                return

    @property
    def waiting(self) -> int:
        """Writes handed to the writer thread and not yet answered."""
        return self._handed

    def _write_batch(self, first: _Pending) -> bool:
        """Writes `first` and what is queued behind it (up to a batch); whether the queue ended."""
        batch = [first]
        stop = False
        while len(batch) < self._max_batch:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                break
            if more is None:
                stop = True
                break
            batch.append(more)
        try:
            results = self._write_many([p.write for p in batch])
        except BaseException as exc:  # not a write's fault (the interpreter is stopping): no retries
            results = [(None, exc)] * len(batch)
        for p, (outcome, error) in zip(batch, results):
            self._finish(p, outcome=outcome, error=error)
        return stop

    def write_parked(self, writes: list[Callable[[Any], Any]]) -> list[tuple[Any, BaseException | None]]:
        """A poll thread's turn of parked writes (turn_commit.py), after any write under way."""
        with self._turn:
            return self._write_many(writes)

    def _write_many(self, writes: list[Callable[[Any], Any]]) -> list[tuple[Any, BaseException | None]]:
        """Each write's (outcome, error): all in one transaction, or each alone when one
        write's fault failed them together."""
        try:
            outcomes = self._store.group_write(functools.partial(_write_all, writes))
        except Exception as exc:
            if len(writes) == 1 or self._store.failed_whole(exc):
                return [(None, exc)] * len(writes)
            log.warning("a group commit of %d writes failed (%s: %s); writing each alone",
                        len(writes), type(exc).__name__, exc)
            return [self._write_alone(write) for write in writes]
        return [(outcome, None) for outcome in outcomes]

    def _write_alone(self, write: Callable[[Any], Any]) -> tuple[Any, BaseException | None]:
        try:
            return self._store.group_write(write), None
        except Exception as exc:  # the waiting request re-raises it (a 503 for storage errors)
            return None, exc

    def _finish(self, pending: _Pending, *, outcome: Any = None, error: BaseException | None = None) -> None:
        pending.outcome, pending.error = outcome, error
        with self._handed_lock:
            self._handed -= 1
        pending.done.set()

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=10)
        self._store.close()
