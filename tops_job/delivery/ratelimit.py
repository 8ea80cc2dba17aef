"""Token bucket: at most `rate` sends per second on average, bursts up to `burst`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate)
        self.clock = clock
        self._tokens = self.burst
        self._stamp = clock()
        self._lock = threading.Lock()

    def try_take(self) -> float:
        """Take a token if one is there and return 0; else return the seconds until one is."""
        with self._lock:
            now = self.clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens >= 1.0 - 1e-9:  # float dust must not leave a waiter spinning
                self._tokens = max(0.0, self._tokens - 1.0)
                return 0.0
            return (1.0 - self._tokens) / self.rate

    def take(self, sleep: Callable[[float], bool]) -> bool:
        """Block until a token is taken; `sleep(seconds)` returns True when interrupted,
        and then no token is taken and this returns False."""
        while True:
            wait = self.try_take()
            if wait <= 0:
                return True
            if sleep(wait):
                return False
