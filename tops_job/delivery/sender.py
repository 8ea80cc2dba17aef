"""Durable delivery: the outbox plus background sender threads.

`enqueue` returns once the receipt is fsync'd in the outbox; sender threads beside the
compute loop deliver it through the rate limit, the circuit breaker and the retry policy.
`start` first queues what earlier runs left. `finish(deadline)` stops taking receipts,
keeps delivering until the deadline (about a second after SIGTERM/SIGINT), then leaves the
rest in the outbox and says so. Every wait is on the run's stop event, so a TERM during
a backoff or a breaker cool-down acts at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from opentelemetry import trace

from tops_job.delivery.breaker import CircuitBreaker
from tops_job.delivery.outbox import Outbox
from tops_job.delivery.outcomes import Outcome, SubmitResult, Submitter
from tops_job.delivery.protocol import DeliveryReport
from tops_job.delivery.ratelimit import TokenBucket
from tops_job.delivery.retry import RetryBudget, RetryPolicy
from tops_job.errors import ErrorClass
from tops_job.observability.events import ReceiptEvent

log = logging.getLogger("tops_job.sender")
tracer = trace.get_tracer("tops_job.sender")

STOP_DRAIN_S = 1.0  # after SIGTERM/SIGINT: deliver what goes through without waiting, this long
POLL_S = 0.1  # how often a sleeping sender rechecks the drain deadline
CACHE_MAX = 64  # receipts kept in memory to save a read back; the rest are read from the outbox


class OutboxDelivery:
    def __init__(self, outbox: Outbox, submitter: Submitter, on_receipt: Callable[[ReceiptEvent], None], *,
                 policy: RetryPolicy | None = None, budget: RetryBudget | None = None,
                 breaker: CircuitBreaker | None = None, bucket: TokenBucket | None = None,
                 stop: Any = None, workers: int = 4):
        self.outbox = outbox
        self.submitter = submitter
        self.on_receipt = on_receipt
        self.policy = policy or RetryPolicy()
        self.budget = budget or RetryBudget()
        self.breaker = breaker or CircuitBreaker()
        self.bucket = bucket or TokenBucket(10.0)
        self.stop = stop  # runner.StopSignal or None
        self.workers = max(1, workers)
        self.report = DeliveryReport(detail={"submitter": submitter.name, "outbox": str(outbox.path)})
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        self._cache: dict[str, dict[str, Any]] = {}  # some of this run's receipts, saving a read back
        self._sent: set[str] = set()  # sent at least once in this run and not yet final
        self._tracked: set[str] = set()  # known and not yet final
        self._parked: dict[str, str] = {}  # digest -> why it waits for a later round or run
        self._closing = False
        self._finished = False
        self._halt = threading.Event()
        self._deadline: float | None = None
        self._threads: list[threading.Thread] = []
        self._earlier = 0
        self._send_errors: Counter = Counter()  # failed sends by error class (network, validation)

    @classmethod
    def from_config(cls, config: Any, submitter: Submitter, on_receipt: Callable[[ReceiptEvent], None],
                    stop: Any = None) -> OutboxDelivery:
        policy = RetryPolicy(max_retries=config.max_retries, base_s=config.retry_base_s, cap_s=config.retry_cap_s,
                             retry_after_cap_s=max(config.retry_cap_s, 120.0))
        return cls(Outbox(config.outbox), submitter, on_receipt, policy=policy,
                   budget=RetryBudget(floor=config.retry_budget),
                   breaker=CircuitBreaker(config.breaker_threshold, config.breaker_cooldown_s),
                   bucket=TokenBucket(config.rate_limit_per_second), stop=stop, workers=config.send_concurrency)

    # ---- the Delivery protocol

    def start(self) -> None:
        if self.outbox.acquire():
            earlier = self.outbox.recover()
            if earlier:
                log.info("[outbox] %d receipts from earlier runs in %s: sending them first", len(earlier), self.outbox.path)
            with self._cond:
                self._queue.extend(earlier)
                self._tracked.update(earlier)
                self._earlier = len(earlier)
        else:
            log.warning("[outbox] %s is in use by another run: leaving its earlier receipts to that run", self.outbox.path)
        for index in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"tops-job-sender-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def enqueue(self, receipt: dict[str, Any], digest: bytes) -> None:
        self.outbox.put(receipt, digest)  # durable before anything else happens to it
        key = digest.hex()
        with self._cond:
            if len(self._cache) < CACHE_MAX:  # bounded: a long outage must not hold every receipt
                self._cache[key] = receipt
            self._tracked.add(key)
            self._queue.append(key)
            self._cond.notify()

    def finish(self, deadline_s: float) -> DeliveryReport:
        stopping = self.stop is not None and self.stop.stopped
        allowed = min(deadline_s, STOP_DRAIN_S) if stopping else deadline_s
        with self._cond:
            self._closing = True
            self._deadline = time.monotonic() + allowed
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=max(0.0, self._deadline - time.monotonic()))
        self._halt.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:  # a sender inside a send returns within its timeout; do not wait for it
            thread.join(timeout=0.05)
        with self._cond:
            self._finished = True
            pending = len(self._tracked)
            parked = dict(self._parked)
        self.report.pending = pending
        self.report.detail.update(self.state())
        self.report.detail["earlier_runs"] = self._earlier
        if parked:
            reasons: dict[str, int] = {}
            for why in parked.values():
                reasons[why] = reasons.get(why, 0) + 1
            self.report.detail["left_because"] = reasons
        log.info("[delivery] breaker %s (opened %d times), %d retries, %d refused by the run's retry budget",
                 self.report.detail["breaker"], self.report.detail["breaker_opened"], self.report.detail["retries"],
                 self.report.detail["retries_refused"])
        if pending:
            log.warning("[outbox] %d receipts left in %s (nothing is lost): the next run sends them first",
                        pending, self.outbox.path)
        self.submitter.close()
        self.outbox.release()
        return self.report

    def state(self) -> dict[str, Any]:
        with self._cond:
            depth = len(self._tracked)
            errors = dict(self._send_errors)
        return {"outbox_depth": depth, "breaker": self.breaker.state, "breaker_opened": self.breaker.opened_count,
                **self.budget.state(), "quarantined": self.outbox.quarantined, "send_errors_by_class": errors}

    def _count_error(self, error_class: ErrorClass) -> None:
        with self._cond:
            self._send_errors[error_class.value] += 1

    # ---- sender threads

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing and not self._halt.is_set():
                    self._cond.wait(POLL_S)
                if self._halt.is_set() or (not self._queue and self._closing):
                    return
                digest = self._queue.popleft()
            try:
                self._deliver(digest)
            except Exception:  # a bug must not kill the sender; the receipt stays in the outbox
                log.exception("[sender] delivering %s failed", digest)
                self._park(digest, "internal_error")

    def _deliver(self, digest: str) -> None:
        """One receipt through breaker, rate limit and retries, as one `submit` span whose
        retries are events."""
        with tracer.start_as_current_span("submit", attributes={"tops_job.digest": digest}) as span:
            self._deliver_in_span(digest, span)

    def _deliver_in_span(self, digest: str, span: Any) -> None:
        with self._cond:
            receipt = self._cache.pop(digest, None)
        if receipt is None:
            receipt = self.outbox.load(digest)
            if receipt is None and self.outbox.holds(digest):  # unreadable this time: a later run sends it
                return self._park(digest, "unreadable")
            if receipt is None:  # gone or quarantined
                with self._cond:
                    self._tracked.discard(digest)
                    self._sent.discard(digest)
                return
        key = bytes.fromhex(digest)
        retries = sends = 0
        begun = time.perf_counter()
        waited = 0.0  # in the rate limiter
        while True:
            while not self.breaker.allow():
                if self._sleep(max(self.breaker.wait_hint(), 0.01)):
                    return self._park(digest, "breaker_open")
            asked = time.perf_counter()
            taken = self.bucket.take(self._sleep)
            waited += time.perf_counter() - asked
            if not taken:
                self.breaker.release_probe()
                span.set_attribute("tops_job.outcome", Outcome.PENDING.value)
                return self._park(digest, "stopped")
            if sends == 0:
                if self._sent_before(digest):  # requeued after an earlier round: a retry, paid for
                    if not self.budget.try_spend():
                        self.breaker.release_probe()
                        return self._park(digest, "retry_budget")
                else:
                    self.budget.record_first_send()
            sends += 1
            try:
                result = self.submitter.submit(receipt, key)
            except Exception as exc:  # a plugin submitter must not raise, but if it does: transient
                result = SubmitResult(Outcome.TRANSIENT, error=f"{type(exc).__name__}: {exc}")
            if result.outcome in (Outcome.ACCEPTED, Outcome.DUPLICATE):
                self.breaker.record_success()
                self.outbox.remove(digest)
                self._final(digest, result, sends, begun, waited, span)
                self._requeue_parked()
                return
            if result.outcome is Outcome.REJECTED:
                self._count_error(ErrorClass.VALIDATION)
                self.breaker.record_success()  # the aggregator is up and answered
                self.outbox.reject(digest, {"status": result.status, "error": result.error, "answer": result.response})
                log.warning("[sender] receipt %s rejected (%s %s): moved to %s", digest, result.status, result.error,
                            self.outbox.rejected_dir)
                self._final(digest, result, sends, begun, waited, span)
                return
            self.breaker.record_failure()
            self._count_error(ErrorClass.NETWORK)
            log.info("[sender] receipt %s not delivered (%s%s)", digest[:16], result.error,
                     f", retry after {result.retry_after:g}s" if result.retry_after is not None else "")
            span.set_attribute("tops_job.outcome", Outcome.PENDING.value)
            if not self.policy.may_retry(retries):
                return self._park(digest, "max_retries")
            if not self.budget.try_spend():
                return self._park(digest, "retry_budget")
            delay = self.policy.delay(retries, result.retry_after)
            retries += 1
            span.add_event("retry", {"tops_job.retry": retries, "error.type": result.error or "transient",
                                     "http.response.status_code": result.status or 0, "tops_job.delay_s": delay})
            log.info("[sender] receipt %s: retry %d in %.1fs", digest[:16], retries, delay)
            if self._sleep(delay):
                return self._park(digest, "stopped")

    def _final(self, digest: str, result: SubmitResult, sends: int, begun: float, waited: float, span: Any) -> None:
        span.set_attribute("tops_job.outcome", result.outcome.value)
        span.set_attribute("tops_job.sends", sends)
        if result.status is not None:
            span.set_attribute("http.response.status_code", result.status)
        with self._cond:
            self._tracked.discard(digest)
            self._parked.pop(digest, None)
            self._sent.discard(digest)
            finished = self._finished
            if not finished:
                self.report.counts[result.outcome.value] += 1
        if not finished:  # after the summary it is only reported by the next run's count
            self.on_receipt(ReceiptEvent(digest=digest, outcome=result.outcome.value, status=result.status,
                                         error=result.error, latency_s=time.perf_counter() - begun, attempts=sends,
                                         rate_limit_wait_s=waited))

    def _sent_before(self, digest: str) -> bool:
        """Whether this run sent `digest` before; marks it sent."""
        with self._cond:
            seen = digest in self._sent
            self._sent.add(digest)
        return seen

    def _park(self, digest: str, why: str) -> None:
        with self._cond:
            if digest in self._tracked:
                self._parked[digest] = why
        return None

    def _requeue_parked(self) -> None:
        """The aggregator answered again: give receipts that ran out of retries another round,
        while the run's retry budget lasts (it bounds the rounds)."""
        if self.budget.exhausted:
            return
        with self._cond:
            again = [d for d, why in self._parked.items() if why in ("max_retries", "breaker_open")]
            if not again or self._closing and self._halt.is_set():
                return
            for digest in again:
                del self._parked[digest]
            self._queue.extend(again)
            self._cond.notify_all()

    def _sleep(self, seconds: float) -> bool:
        """Wait `seconds`; True (interrupted) on a stop request, at the drain deadline, or
        at once when the wait would end past the deadline."""
        end = time.monotonic() + seconds
        while True:
            if self._halt.is_set() or (self.stop is not None and self.stop.stopped):
                return True
            deadline = self._deadline
            if deadline is not None and end > deadline:
                return True
            remaining = end - time.monotonic()
            if remaining <= 0:
                return False
            waiter = self.stop.event if self.stop is not None else self._halt
            waiter.wait(min(remaining, POLL_S))
