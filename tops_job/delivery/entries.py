"""Where each receipt of a delivery stands: one state per receipt, in one table.

    queued ──claim──▶ in_flight ──confirmed 200 / final 4xx──▶ final
      ▲                  │
      └────requeue───── parked (with a reason: max_retries, breaker_open, retry_budget,
                                unconfirmed_answer, unreadable, stopped, …)

`final` also covers entries that left this run's hands: delivered or moved by another run
("gone"), or being sent by another live run ("another_run"). A new state (say, waiting for a
commitment to be opened) is a new member of `State` and a transition in the sender; the
table, its counts and the summary's reconciliation need no change.
"""

from __future__ import annotations

import enum
import threading
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any


class State(str, enum.Enum):
    QUEUED = "queued"  # waiting for a sender thread
    IN_FLIGHT = "in_flight"  # claimed (flock on the entry) and being sent
    PARKED = "parked"  # waiting for a later round or a later run; `reason` says why
    FINAL = "final"  # answered for, or out of this run's hands; `reason` says how


@dataclass
class Entry:
    digest: str
    state: State = State.QUEUED
    reason: str | None = None  # parked: why it waits; final: the outcome or where it went
    sent: bool = False  # sent at least once by this run: a later round is a retry
    earlier: bool = False  # left by an earlier run
    receipt: dict[str, Any] | None = None  # a few of this run's receipts, saving a read back
    answer: dict[str, Any] | None = None  # the last answer that did not settle it


class Entries:
    """The table, with the condition the sender threads wait on."""

    def __init__(self, cache_max: int):
        self.cond = threading.Condition()
        self._entries: dict[str, Entry] = {}
        self._ready: deque[str] = deque()  # queued digests, in order (an entry is here once)
        self._cached = 0
        self._cache_max = cache_max

    def add(self, digest: str, *, receipt: dict[str, Any] | None = None, earlier: bool = False) -> bool:
        """Queue a receipt; False when the table already knows it."""
        with self.cond:
            if digest in self._entries:
                return False
            keep = receipt if receipt is not None and self._cached < self._cache_max else None
            self._cached += keep is not None  # bounded: a long outage must not hold every receipt
            self._entries[digest] = Entry(digest, earlier=earlier, receipt=keep)
            self._ready.append(digest)
            self.cond.notify()
            return True

    def take(self) -> Entry | None:
        """The next queued entry, now in flight; None when none is queued. Call holding `cond`."""
        while self._ready:
            entry = self._entries[self._ready.popleft()]
            if entry.state is State.QUEUED:
                entry.state = State.IN_FLIGHT
                return entry
        return None

    def has_queued(self) -> bool:
        return bool(self._ready)

    def receipt(self, entry: Entry) -> dict[str, Any] | None:
        """The cached receipt, released from the cache."""
        with self.cond:
            receipt, entry.receipt = entry.receipt, None
            self._cached -= receipt is not None
            return receipt

    def mark_sent(self, entry: Entry) -> bool:
        """Whether this run sent it before; marks it sent."""
        with self.cond:
            before, entry.sent = entry.sent, True
            return before

    def park(self, entry: Entry, why: str, answer: dict[str, Any] | None = None) -> None:
        with self.cond:
            if entry.state is not State.FINAL:
                entry.state, entry.reason = State.PARKED, why
                if answer is not None:
                    entry.answer = answer

    def finalize(self, entry: Entry, how: str) -> None:
        with self.cond:
            entry.state, entry.reason = State.FINAL, how
            if entry.receipt is not None:
                entry.receipt = None
                self._cached -= 1

    def requeue(self, reasons: tuple[str, ...]) -> int:
        """Parked entries whose reason is in `reasons` go back to the queue."""
        with self.cond:
            again = [e for e in self._entries.values() if e.state is State.PARKED and e.reason in reasons]
            for entry in again:
                entry.state, entry.reason = State.QUEUED, None
                self._ready.append(entry.digest)
            if again:
                self.cond.notify_all()
            return len(again)

    def open_entries(self) -> list[Entry]:
        """Entries not final (queued, in flight, parked)."""
        with self.cond:
            return [e for e in self._entries.values() if e.state is not State.FINAL]

    def count(self, state: State) -> int:
        with self.cond:
            return sum(1 for e in self._entries.values() if e.state is state)

    def reasons(self, state: State) -> dict[str, int]:
        with self.cond:
            return dict(Counter(e.reason or "?" for e in self._entries.values() if e.state is state))

    def not_final(self) -> int:
        with self.cond:
            return sum(1 for e in self._entries.values() if e.state is not State.FINAL)
