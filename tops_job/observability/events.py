"""Health reporters: what a run tells observers as it goes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("tops_job.reporting")


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    did: str
    pubkey: str
    backend: str
    device: str
    dtype: str
    attempts: int
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AttemptEvent:
    attempt: int
    ok: bool
    error_class: str | None = None
    error: str | None = None
    elapsed_ns: int = 0  # product
    wall_ns: int = 0  # whole attempt
    ops: int = 0
    digest: str | None = None
    stages_ns: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ReceiptEvent:
    digest: str
    outcome: str  # submission.Outcome value
    status: int | None = None
    error: str | None = None
    latency_s: float = 0.0
    attempts: int = 1  # sends it took
    rate_limit_wait_s: float | None = None  # time spent waiting for the rate limiter, when there is one


class Reporter:
    """Base with no-op methods: override what you need. Called from the run's threads;
    keep each call short (queue work elsewhere if it is slow)."""

    name = "reporter"

    def on_run_start(self, run: RunInfo) -> None: ...

    def on_profile(self, profile: dict[str, Any]) -> None: ...

    def on_attempt(self, event: AttemptEvent) -> None: ...

    def on_receipt(self, event: ReceiptEvent) -> None: ...

    def on_run_end(self, summary: dict[str, Any]) -> None: ...

    def on_delivery(self, delivery: Any) -> None:
        """The run's delivery, once it exists: `delivery.state()` gives live outbox depth
        and breaker state (e.g. for a health endpoint or a gauge)."""


class Reporters:
    """Fan-out to every reporter; a failing reporter is logged and counted, never fatal."""

    def __init__(self, reporters: list[Reporter]):
        self.reporters = list(reporters)
        self.failures: dict[str, int] = {}

    def _call(self, method: str, *args: Any, optional: bool = False) -> None:
        for reporter in self.reporters:
            if optional and not hasattr(reporter, method):  # a method added later: older reporters lack it
                continue
            try:
                getattr(reporter, method)(*args)
            except Exception as exc:
                name = getattr(reporter, "name", type(reporter).__name__)
                self.failures[name] = self.failures.get(name, 0) + 1
                log.warning("reporter %s failed in %s: %s", name, method, exc)

    def on_run_start(self, run: RunInfo) -> None:
        self._call("on_run_start", run)

    def on_profile(self, profile: dict[str, Any]) -> None:
        self._call("on_profile", profile)

    def on_attempt(self, event: AttemptEvent) -> None:
        self._call("on_attempt", event)

    def on_receipt(self, event: ReceiptEvent) -> None:
        self._call("on_receipt", event)

    def on_run_end(self, summary: dict[str, Any]) -> None:
        self._call("on_run_end", summary)

    def on_delivery(self, delivery: Any) -> None:
        self._call("on_delivery", delivery, optional=True)
