"""Hooks for what only the application sees; metrics.py counts them. No-ops here, so the app
and its endpoints run the same without metrics (tests, `--in-process` benchmarks)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Events:
    def verify_seconds(self, seconds: float) -> None:
        """Wall time of one receipt's verification (a v1 receipt, a v2 exchange)."""

    def verify_cpu(self, protocol: str, seconds: float) -> None:
        """CPU time of this thread spent in the checks themselves: a v1 receipt's, a v2
        commitment's or opened set's. Against the process's CPU it says how much of the
        aggregator's work is verification and how much the serving around it."""

    def challenges_purged(self, count: int) -> None:
        """Expired unused challenges deleted."""

    @contextmanager
    def verifying(self, protocol: str) -> Iterator[None]:
        """Counts the block's CPU time (this thread's) as verification."""
        began = time.thread_time()
        try:
            yield
        finally:
            self.verify_cpu(protocol, time.thread_time() - began)
