"""Circuit breaker for the aggregator.

closed: sends flow; `threshold` consecutive failures open it.
open: nothing is sent (receipts stay in the outbox) until `cooldown_s` has passed.
half_open: exactly one probe is let through; success closes the breaker, failure opens it
again for another cool-down.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(self, threshold: int = 5, cooldown_s: float = 15.0, clock: Callable[[], float] = time.monotonic):
        self.threshold = max(1, threshold)
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_out = False
        self.opened_count = 0  # times it opened in this run (metrics, summary)
        self._lock = threading.Lock()

    def allow(self) -> bool:
        """May a send go now? In half-open, only the first caller gets True (the probe)."""
        with self._lock:
            if self._state == CLOSED:
                return True
            if self._state == OPEN and self.clock() - self._opened_at >= self.cooldown_s:
                self._state = HALF_OPEN
                self._probe_out = False
            if self._state == HALF_OPEN and not self._probe_out:
                self._probe_out = True
                return True
            return False

    def wait_hint(self) -> float:
        """Seconds until a send might be allowed (0 when closed)."""
        with self._lock:
            if self._state == OPEN:
                return max(0.0, self.cooldown_s - (self.clock() - self._opened_at))
            return 0.0 if self._state == CLOSED else 0.05

    def record_success(self) -> None:
        with self._lock:
            self._state = CLOSED
            self._failures = 0
            self._probe_out = False

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state == HALF_OPEN or (self._state == CLOSED and self._failures >= self.threshold):
                self._state = OPEN
                self._opened_at = self.clock()
                self._probe_out = False
                self.opened_count += 1

    def release_probe(self) -> None:
        """The probe was not sent after all (stop, deadline): let another caller probe."""
        with self._lock:
            if self._state == HALF_OPEN:
                self._probe_out = False

    @property
    def state(self) -> str:
        with self._lock:
            if self._state == OPEN and self.clock() - self._opened_at >= self.cooldown_s:
                return HALF_OPEN
            return self._state
