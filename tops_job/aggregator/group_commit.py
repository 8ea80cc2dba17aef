"""Group commit: the receipts that concurrent requests accept are written by one thread per
process, many to a transaction.

Each accepted receipt must be durable before its 200 (SQLite synchronous=FULL, PostgreSQL's
commit), and a commit costs an fsync — milliseconds, during which SQLite holds its one
write lock. One transaction per receipt caps a whole machine at one fsync's worth of receipts
whatever the cores; here every request waiting at that moment shares the next commit. The
answers are unchanged: each request still gets its own ACCEPTED, DUPLICATE or REPLAY (or the
storage error), after its receipt is committed.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

MAX_BATCH = 64


class _Pending:
    __slots__ = ("fields", "done", "outcome", "error")

    def __init__(self, fields: dict[str, Any]):
        self.fields = fields
        self.done = threading.Event()
        self.outcome: str | None = None
        self.error: BaseException | None = None


class GroupCommitStore:
    """`store` with add_receipt batched; every other method is the store's own."""

    def __init__(self, store: Any, max_batch: int = MAX_BATCH):
        self._store = store
        self._max_batch = max_batch
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
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

    def _write(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
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
                return

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=10)
        self._store.close()
