"""A one-line progress display for people at a terminal; never in logs or pipes."""

from __future__ import annotations

import threading
from typing import Any, TextIO

from tops_job import hookimpl
from tops_job.delivery.outcomes import DELIVERED_OUTCOMES
from tops_job.observability.events import AttemptEvent, ReceiptEvent, Reporter, RunInfo

CLEAR_LINE = "\r\033[K"


class TerminalProgress(Reporter):
    name = "progress"

    def __init__(self, stream: TextIO):
        self.stream = stream
        self._lock = threading.Lock()
        self.total = self.ok = self.failed = self.delivered = 0
        self.ops = 0
        self.product_s = 0.0

    def on_run_start(self, run: RunInfo) -> None:
        self.total = run.attempts

    def on_attempt(self, event: AttemptEvent) -> None:
        with self._lock:
            if event.ok:
                self.ok += 1
                self.ops += event.ops
                self.product_s += event.elapsed_ns / 1e9
            else:
                self.failed += 1
            self._draw()

    def on_receipt(self, event: ReceiptEvent) -> None:
        with self._lock:
            if event.outcome in DELIVERED_OUTCOMES:
                self.delivered += 1
                self._draw()

    def on_run_end(self, summary: dict[str, Any]) -> None:
        with self._lock:
            self.stream.write(CLEAR_LINE)
            self.stream.flush()

    def line(self) -> str:
        rate = f" · {self.ops / self.product_s / 1e9:,.0f} GFLOP/s" if self.product_s else ""
        failed = f" ({self.failed} failed)" if self.failed else ""
        return f"[run] attempt {self.ok + self.failed}/{self.total}{failed}{rate} · {self.delivered} delivered"

    def _draw(self) -> None:
        self.stream.write(CLEAR_LINE + self.line())
        self.stream.flush()


class ProgressPlugin:
    """Registered by the CLI only when stderr is a terminal and logs are text."""

    def __init__(self, stream: TextIO):
        self.reporter = TerminalProgress(stream)

    @hookimpl
    def tops_job_register_reporters(self, register, config):
        register(self.reporter)
