"""Group commit: the receipts that concurrent requests accept are written by one thread per
process, many to a transaction.

Each accepted receipt must be durable before its 200 (SQLite synchronous=FULL, PostgreSQL's
commit), and a commit costs an fsync — milliseconds, during which SQLite holds its one
write lock. One transaction per receipt caps a whole machine at one fsync's worth of receipts
whatever the cores; here every request waiting at that moment shares the next commit. The
answers are unchanged: each request still gets its own ACCEPTED, DUPLICATE or REPLAY (or the
storage error), after its receipt is committed.

Rejection counts (the fleet view's) are not worth a commit each — a client posting invalid
receipts would turn each into an fsync — so they are summed in memory and written by the same
thread at most once every FLUSH_S, nobody waiting for them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

MAX_BATCH = 64
FLUSH_S = 1.0
MAX_REJECTION_KEYS = 10_000  # (did, reason) pairs held between flushes; more are dropped

log = logging.getLogger("tops_job.aggregator")


class _Pending:
    __slots__ = ("fields", "done", "outcome", "error")

    def __init__(self, fields: dict[str, Any]):
        self.fields = fields
        self.done = threading.Event()
        self.outcome: str | None = None
        self.error: BaseException | None = None


class GroupCommitStore:
    """`store` with add_receipt batched; every other method is the store's own."""

    def __init__(self, store: Any, max_batch: int = MAX_BATCH, flush_s: float = FLUSH_S):
        self._store = store
        self._max_batch = max_batch
        self._flush_s = flush_s
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._rejections: dict[tuple[str, str], list[int]] = {}
        self._rejections_lock = threading.Lock()
        self._flushed = time.monotonic()
        self._writer = threading.Thread(target=self._write, name="aggregator-group-commit", daemon=True)
        self._writer.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def add_receipt(self, **fields: Any) -> str:
        pending = _Pending(fields)
        self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.outcome is not None
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
                outcomes = self._store.add_receipts([p.fields for p in batch])
            except BaseException as exc:  # each waiting request re-raises it (a 503 for storage errors)
                for p in batch:
                    p.error = exc
                    p.done.set()
            else:
                for p, outcome in zip(batch, outcomes):
                    p.outcome = outcome
                    p.done.set()
            if stop:
                self.flush_rejections()
                return

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=10)
        self._store.close()
