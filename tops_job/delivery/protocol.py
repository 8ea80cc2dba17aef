"""Delivery: what happens to a signed receipt between the attempt loop and the submitter.

`InlineDelivery` submits on the caller's thread; it serves the local ledger, where a submit
is a local verification and an fsync'd append. Network submitters go through the outbox
and a background sender (see outbox.py and sender.py).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tops_job.delivery.outcomes import Outcome, Submitter
from tops_job.errors import ErrorClass, StorageError
from tops_job.observability.events import ReceiptEvent

if TYPE_CHECKING:
    from tops_job.delivery.backend import OutboxBackend

log = logging.getLogger("tops_job.delivery")


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

    def enqueue(self, receipt: dict[str, Any], digest: bytes, *, held: bool = False) -> None:
        """Take a signed receipt; it must survive a crash from the moment this returns.
        `held`: stored, but not sent until `release` (the worker's self-audit has it); a held
        receipt a crashed run left is sent by the next run, which logs it was never audited."""

    def release(self, digest: bytes) -> None:
        """The held receipt `digest` verified: send it."""

    def withhold(self, digest: bytes, reason: str) -> None:
        """The held receipt `digest` failed the self-audit: never send it; keep it, with
        `reason`, for inspection, and count it in the report."""

    def finish(self, deadline_s: float) -> DeliveryReport:
        """Stop taking receipts; deliver until `deadline_s` seconds pass, then report."""

    def state(self) -> dict[str, Any]:
        """Live state for health and metrics (outbox depth, breaker)."""


class InlineDelivery:
    """`outbox` (when given) is counted, never drained: receipts an earlier run left there
    for an aggregator are reported as pending, so a run without AGGREGATOR_URL never says
    an outbox is empty when it is not (`tops-job outbox send` delivers them)."""

    def __init__(self, submitter: Submitter, on_receipt: Callable[[ReceiptEvent], None],
                 outbox: OutboxBackend | None = None):
        self.submitter = submitter
        self.on_receipt = on_receipt
        self.outbox = outbox
        self.report = DeliveryReport(detail={"submitter": submitter.name})

    def start(self) -> None:
        waiting = self._outbox_depth()
        if waiting and self.outbox is not None:
            log.warning("[outbox] %d receipts wait in %s for an aggregator; this run (no AGGREGATOR_URL) does not "
                        "send them: `tops-job outbox send --aggregator-url URL` does", waiting, self.outbox.location)

    def enqueue(self, receipt: dict[str, Any], digest: bytes, *, held: bool = False) -> None:
        # `held` changes nothing here: the ledger verifies every receipt itself before it is
        # appended, so a receipt held for the self-audit is checked as the aggregator would
        # check it already, and the fsync'd append is what makes it durable.
        begun = time.perf_counter()
        try:
            result = self.submitter.submit(receipt, digest)
        except StorageError as exc:  # the run stops (exit 6); the receipt it signed must not go with it
            self._keep(receipt, digest, exc)
            raise
        self.report.counts[result.outcome.value] += 1
        self.on_receipt(ReceiptEvent(digest=digest.hex(), outcome=result.outcome.value, status=result.status,
                                     error=result.error, latency_s=time.perf_counter() - begun))

    def _keep(self, receipt: dict[str, Any], digest: bytes, failure: StorageError) -> None:
        """The ledger could not take a receipt this run signed (a full or failing disk): it
        goes to the outbox, where `tops-job outbox send --submitter ledger` appends it later,
        and where the outbox cannot take it either, into the log, whole, so it is never lost."""
        from tops_job.spec.canonical import receipt_line

        if self.outbox is not None:
            try:
                store = self.outbox.receipts()
                try:
                    store.put(receipt, digest)
                finally:
                    store.release()
            except Exception as exc:
                log.error("[ledger] %s; the outbox %s cannot take receipt %s either (%s)", failure,
                          self.outbox.location, digest.hex(), exc)
            else:
                log.error("[ledger] %s; receipt %s is kept in the outbox %s: `tops-job outbox send --submitter "
                          "ledger` appends it once the ledger's disk has room", failure, digest.hex(), self.outbox.location)
                return
        log.error("[ledger] receipt %s could not be stored anywhere; here it is, whole, to keep: %s", digest.hex(),
                  receipt_line(receipt))

    def release(self, digest: bytes) -> None:
        """Nothing to do: the receipt was verified and appended by `enqueue`."""

    def withhold(self, digest: bytes, reason: str) -> None:
        """The ledger already judged it (a wrong product it rejects; one it accepted stays in
        the ledger, with this said in the log and the report)."""
        log.warning("[ledger] receipt %s failed the self-audit (%s); the ledger verified it when it came",
                    digest.hex(), reason)
        self.report.detail["failed_self_audit"] = self.report.detail.get("failed_self_audit", 0) + 1

    def finish(self, deadline_s: float) -> DeliveryReport:
        self.submitter.close()
        self.report.detail.update(self.state())
        self.report.pending = self.report.detail["outbox_depth"]
        if self.outbox is not None:
            self.report.detail["outbox"] = self.outbox.location
        return self.report

    def _outbox_depth(self) -> int:
        if self.outbox is None:
            return 0
        try:
            return self.outbox.waiting()
        except StorageError as exc:  # a count for the report: the run goes on
            log.warning("[outbox] cannot count the receipts waiting in %s: %s", self.outbox.location, exc)
            return 0

    def state(self) -> dict[str, Any]:
        rejected = self.report.counts[Outcome.REJECTED.value]
        return {"outbox_depth": self._outbox_depth(), "breaker": "closed",
                "send_errors_by_class": {ErrorClass.VALIDATION.value: rejected} if rejected else {}}
