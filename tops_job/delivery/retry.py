"""Retry policy for receipt delivery: which answers are worth another try, how long to wait,
and how many tries a receipt and a whole run may spend.

- Backoff is exponential with full jitter and a cap (AWS Architecture Blog, "Exponential
  Backoff And Jitter"): wait = uniform(0, min(cap, base * 2**retry)).
- `Retry-After` (RFC 9110 §10.2.3) is honoured in both its forms, delay-seconds and
  HTTP-date, and capped so a misbehaving server cannot park a worker for a day.
- `max_retries` bounds the retries of one receipt; `RetryBudget` bounds retries across the
  run (a floor plus a fraction of first sends), so a dead aggregator is not hammered.
A receipt that runs out of either stays in the outbox for the next run: nothing is lost.
urllib3's `Retry` is not used: it skips POST by default and has no budget.
"""

from __future__ import annotations

import email.utils
import math
import random
import threading
import time
from dataclasses import dataclass, field

TRANSIENT_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
FINAL_STATUSES = frozenset({400, 409, 413, 422})  # spec §9: resending cannot help


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header value, or None when absent or unreadable.
    A date in the past gives 0."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():  # not str.isdigit() alone: it takes "²" too
        return float(text)  # float, not int: no digit limit; a huge value is inf, and `delay` caps it
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):  # OverflowError: a field past a C long
        return None
    if when is None or when.tzinfo is None:  # RFC 9110 dates are GMT; a naive one is malformed
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


@dataclass
class RetryPolicy:
    max_retries: int = 3  # retries of one receipt after its first send (MAX_RETRIES)
    base_s: float = 0.5  # first backoff ceiling
    cap_s: float = 30.0  # no single backoff waits longer
    retry_after_cap_s: float = 120.0  # nor does an honoured Retry-After
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def backoff(self, retry: int) -> float:
        """Full-jitter wait before retry number `retry` (0-based)."""
        ceiling = min(self.cap_s, self.base_s * math.pow(2.0, min(retry, 62)))
        return self.rng.uniform(0.0, ceiling)

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """The wait before a retry: the server's Retry-After (capped) when it sent one,
        else the jittered backoff."""
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.retry_after_cap_s)
        return self.backoff(retry)

    def may_retry(self, retries_so_far: int) -> bool:
        return retries_so_far < self.max_retries


class RetryBudget:
    """Run-wide limit on retries: `floor + ratio * first_sends` retries in all.

    First sends are never limited (each receipt gets one try); retries spend the budget.
    Thread-safe: the sender's workers share one.
    """

    def __init__(self, floor: int = 50, ratio: float = 0.2):
        self.floor = floor
        self.ratio = ratio
        self.first_sends = 0
        self.retries = 0
        self.refused = 0
        self._lock = threading.Lock()

    def record_first_send(self) -> None:
        with self._lock:
            self.first_sends += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget; False (and counted) when it is spent."""
        with self._lock:
            if self.retries < self.floor + self.ratio * self.first_sends:
                self.retries += 1
                return True
            self.refused += 1
            return False

    @property
    def exhausted(self) -> bool:
        with self._lock:
            return self.retries >= self.floor + self.ratio * self.first_sends

    def state(self) -> dict[str, float]:
        with self._lock:
            return {"retries": self.retries, "retries_refused": self.refused,
                    "retry_budget_left": max(0.0, self.floor + self.ratio * self.first_sends - self.retries)}
