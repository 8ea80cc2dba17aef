"""Delivery: what happens to a signed receipt between the attempt loop and the submitter.

`InlineDelivery` submits on the caller's thread; it serves the local ledger, where a submit
is a local verification and an fsync'd append. Network submitters go through the outbox
and a background sender (see outbox.py and sender.py).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tops_job.delivery.outcomes import Outcome, Submitter
from tops_job.errors import ErrorClass
from tops_job.observability.events import ReceiptEvent


@dataclass
class DeliveryReport:
    counts: Counter = field(default_factory=Counter)  # Outcome value -> receipts
    pending: int = 0  # left in the outbox for the next run
    detail: dict[str, Any] = field(default_factory=dict)  # breaker, retries, outbox path…

    @property
    def rejected(self) -> int:
        return self.counts[Outcome.REJECTED.value]


class Delivery(Protocol):
    def start(self) -> None:
        """Begin (a durable delivery first drains what earlier runs left)."""

    def enqueue(self, receipt: dict[str, Any], digest: bytes) -> None:
        """Take a signed receipt; it must survive a crash from the moment this returns."""

    def finish(self, deadline_s: float) -> DeliveryReport:
        """Stop taking receipts; deliver until `deadline_s` seconds pass, then report."""

    def state(self) -> dict[str, Any]:
        """Live state for health and metrics (outbox depth, breaker)."""


class InlineDelivery:
    def __init__(self, submitter: Submitter, on_receipt: Callable[[ReceiptEvent], None]):
        self.submitter = submitter
        self.on_receipt = on_receipt
        self.report = DeliveryReport(detail={"submitter": submitter.name})

    def start(self) -> None:
        pass

    def enqueue(self, receipt: dict[str, Any], digest: bytes) -> None:
        begun = time.perf_counter()
        result = self.submitter.submit(receipt, digest)
        self.report.counts[result.outcome.value] += 1
        self.on_receipt(ReceiptEvent(digest=digest.hex(), outcome=result.outcome.value, status=result.status,
                                     error=result.error, latency_s=time.perf_counter() - begun))

    def finish(self, deadline_s: float) -> DeliveryReport:
        self.submitter.close()
        self.report.detail.update(self.state())
        return self.report

    def state(self) -> dict[str, Any]:
        rejected = self.report.counts[Outcome.REJECTED.value]
        return {"outbox_depth": 0, "breaker": "closed",
                "send_errors_by_class": {ErrorClass.VALIDATION.value: rejected} if rejected else {}}
