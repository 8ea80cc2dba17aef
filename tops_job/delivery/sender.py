"""Durable delivery: the outbox plus background sender threads.

`enqueue` returns once the receipt is fsync'd in the outbox; sender threads beside the
compute loop deliver it through the rate limit, the circuit breaker and the retry policy.
`start` first queues what earlier runs left. `finish(deadline)` stops taking receipts,
keeps delivering until the deadline (about a second after SIGTERM/SIGINT), then leaves the
rest in the outbox and says so. Every wait is on the run's stop event, so a TERM during
a backoff or a breaker cool-down acts at once.

Each receipt has one state in `entries` (queued, in flight, parked with a reason, final).
A sender thread takes a queued one and goes through the steps: claim (an flock on the entry
file: no other run sends it meanwhile), admit (breaker, rate limit, retry budget), send, and
settle (delivered, rejected, or retry / park).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from opentelemetry import trace

from tops_job.delivery.backend import Claim, ReceiptStore
from tops_job.delivery.breaker import CircuitBreaker
from tops_job.delivery.drain_threads import drain
from tops_job.delivery.entries import Entries, Entry, State
from tops_job.delivery.outcomes import UNCONFIRMED, Outcome, SubmitResult, Submitter
from tops_job.delivery.protocol import DeliveryReport
from tops_job.delivery.ratelimit import TokenBucket
from tops_job.delivery.retry import RetryBudget, RetryPolicy
from tops_job.errors import ErrorClass, StorageError
from tops_job.observability.events import ReceiptEvent

log = logging.getLogger("tops_job.sender")
tracer = trace.get_tracer("tops_job.sender")

POLL_S = 0.1  # how often a sleeping sender rechecks the drain deadline
CACHE_MAX = 64  # receipts kept in memory to save a read back; the rest are read from the outbox


class OutboxDelivery:
    def __init__(self, outbox: ReceiptStore, submitter: Submitter, on_receipt: Callable[[ReceiptEvent], None], *,
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
        self.report = DeliveryReport(detail={"submitter": submitter.name, "outbox": outbox.location})
        self.entries = Entries(CACHE_MAX)  # one state per receipt: queued, in flight, parked, final
        self._cond = self.entries.cond
        self._closing = False
        self._finished = False
        self._halt = threading.Event()
        self._deadline: float | None = None
        self._threads: list[threading.Thread] = []
        self._earlier = 0
        self._left_to_other_run = 0
        self._withheld = 0  # failed the self-audit: in outbox/withheld/, never sent
        self._send_errors: Counter = Counter()  # failed sends by error class (network, validation)
        self._stale: Counter = Counter()  # answered for, but the entry could not leave the outbox

    @classmethod
    def from_config(cls, config: Any, submitter: Submitter, on_receipt: Callable[[ReceiptEvent], None],
                    stop: Any = None, store: ReceiptStore | None = None) -> OutboxDelivery:
        """`store`: the outbox backend's receipt store (the `tops_job_outbox` hook's); the
        directory TOPS_JOB_OUTBOX_DIR when None."""
        policy = RetryPolicy(max_retries=config.max_retries, base_s=config.retry_base_s, cap_s=config.retry_cap_s,
                             retry_after_cap_s=max(config.retry_cap_s, 120.0))
        if store is None:
            from tops_job.delivery.outbox import Outbox

            store = Outbox(config.outbox)
        return cls(store, submitter, on_receipt, policy=policy,
                   budget=RetryBudget(floor=config.retry_budget),
                   breaker=CircuitBreaker(config.breaker_threshold, config.breaker_cooldown_s),
                   bucket=TokenBucket(config.rate_limit_per_second), stop=stop, workers=config.send_concurrency)

    # ---- the Delivery protocol

    def start(self) -> None:
        try:
            self._queue_earlier()
        except StorageError as exc:  # the run goes on: its own receipts may still be deliverable
            self.outbox.problem("unreadable_outbox", f"{exc}; earlier runs' receipts are left for a later run")
        for index in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"tops-job-sender-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _queue_earlier(self) -> None:
        if not self.outbox.acquire():
            self._left_to_other_run = self.outbox.count()
            log.warning("[outbox] %s is in use by another run: leaving its %d earlier receipts to that run",
                        self.outbox.location, self._left_to_other_run)
            return
        earlier = self.outbox.recover()
        if earlier:
            log.info("[outbox] %d receipts from earlier runs in %s: sending them first", len(earlier), self.outbox.location)
        self._earlier = sum(self.entries.add(digest, earlier=True) for digest in earlier)

    def enqueue(self, receipt: dict[str, Any], digest: bytes, *, held: bool = False) -> None:
        if held:  # durable, in outbox/held/, and out of the senders' sight until released
            self.outbox.put_held(receipt, digest)
            return
        self.outbox.put(receipt, digest)  # durable before anything else happens to it
        self.entries.add(digest.hex(), receipt=receipt)

    def release(self, digest: bytes) -> None:
        self.outbox.unhold(digest.hex())
        self.entries.add(digest.hex())

    def withhold(self, digest: bytes, reason: str) -> None:
        self.outbox.withhold(digest.hex(), reason)
        with self._cond:
            self._withheld += 1

    def _start_closing(self, deadline: float) -> None:
        self._closing = True
        self._deadline = deadline

    def finish(self, deadline_s: float) -> DeliveryReport:
        drain(self._threads, self._cond, self._halt, self._start_closing, deadline_s, self.stop)
        self._reconcile()
        with self._cond:
            self._finished = True
        pending = self.entries.not_final()
        self.report.pending = pending
        self.report.detail.update(self.state())
        self.report.detail["earlier_runs"] = self._earlier
        reasons = self.entries.reasons(State.PARKED)
        if reasons:
            self.report.detail["left_because"] = reasons
        in_flight = self.entries.count(State.IN_FLIGHT)
        if in_flight:
            self.report.detail["in_flight_at_end"] = in_flight  # counted pending; a late answer may settle it
        handed = {how: n for how, n in self.entries.reasons(State.FINAL).items() if how in ("gone", "another_run")}
        if handed:
            self.report.detail["handled_by_another_run"] = handed
        if self._left_to_other_run:
            self.report.detail["left_to_other_run"] = self._left_to_other_run
        if self._withheld:
            self.report.detail["withheld"] = self._withheld
            self.report.detail["withheld_in"] = self.outbox.withheld_location
        if self._stale:
            self.report.detail["answered_but_kept_in_outbox"] = dict(self._stale)
        self.report.detail["outbox_at_end"] = self.outbox.count()
        log.info("[delivery] breaker %s (opened %d times), %d retries, %d refused by the run's retry budget",
                 self.report.detail["breaker"], self.report.detail["breaker_opened"], self.report.detail["retries"],
                 self.report.detail["retries_refused"])
        if pending:
            log.warning("[outbox] %d receipts left in %s (nothing is lost): the next run or `tops-job outbox send` "
                        "sends them", pending, self.outbox.location)
        self.submitter.close()
        self.outbox.release()
        return self.report

    def _reconcile(self) -> None:
        """Count each receipt where it actually is: an entry this run still tracks that is no
        longer in the outbox was delivered or moved by another run."""
        for entry in self.entries.open_entries():
            if entry.state is not State.IN_FLIGHT and not self.outbox.holds(entry.digest):
                self.entries.finalize(entry, "gone")

    def state(self) -> dict[str, Any]:
        with self._cond:
            errors = dict(self._send_errors)
        return {"outbox_depth": self.entries.not_final(), "breaker": self.breaker.state,
                "breaker_opened": self.breaker.opened_count, **self.budget.state(),
                "quarantined": self.outbox.quarantined, "send_errors_by_class": errors,
                **({"outbox_problems": dict(self.outbox.problems)} if self.outbox.problems else {})}

    def _count_error(self, error_class: ErrorClass) -> None:
        with self._cond:
            self._send_errors[error_class.value] += 1

    # ---- sender threads

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self.entries.has_queued() and not self._closing and not self._halt.is_set():
                    self._cond.wait(POLL_S)
                if self._halt.is_set():
                    return
                entry = self.entries.take()
                if entry is None:
                    if self._closing:
                        return
                    continue
            try:
                self._deliver(entry)
            except Exception:  # a bug must not kill the sender; the receipt stays in the outbox
                log.exception("[sender] delivering %s failed", entry.digest)
                self.entries.park(entry, "internal_error")

    def _deliver(self, entry: Entry) -> None:
        """One receipt, as one `submit` span whose retries are events: claim it, then admit,
        send and settle until it is final or parked."""
        with tracer.start_as_current_span("submit", attributes={"tops_job.digest": entry.digest}) as span:
            claimed = self._claim(entry)
            if claimed is None:
                return
            claim, receipt = claimed
            try:
                self._send_until_settled(entry, receipt, span)
            finally:
                claim.release()
            if entry.state is State.IN_FLIGHT:  # never left in flight once released
                self.entries.park(entry, "internal_error")

    def _claim(self, entry: Entry) -> tuple[Claim, dict[str, Any]] | None:
        """Step 1: own the entry (an flock on its file, so no other run sends it meanwhile)
        and have its receipt. None when this run does not send it now (the entry's state says why)."""
        claim = self.outbox.claim(entry.digest)
        if isinstance(claim, str):
            if claim == "unreadable":
                self.entries.park(entry, "unreadable")
            else:  # "gone": delivered or moved by another run; "busy": another live run is sending it
                self.entries.finalize(entry, "gone" if claim == "gone" else "another_run")
            return None
        receipt = self.entries.receipt(entry) or self.outbox.load(entry.digest)
        if receipt is None:
            claim.release()
            if self.outbox.holds(entry.digest):  # unreadable this time: a later run sends it
                self.entries.park(entry, "unreadable")
            else:  # quarantined or re-filed
                self.entries.finalize(entry, "gone")
            return None
        return claim, receipt

    def _send_until_settled(self, entry: Entry, receipt: dict[str, Any], span: Any) -> None:
        key = bytes.fromhex(entry.digest)
        retries = sends = 0
        begun = time.perf_counter()
        waited = [0.0]  # in the rate limiter
        while True:
            why = self._admit(entry, first_of_round=sends == 0, waited=waited)
            if why is not None:
                span.set_attribute("tops_job.outcome", Outcome.PENDING.value)
                return self.entries.park(entry, why)
            sends += 1
            result = self._send(receipt, key)
            if self._settle(entry, result):
                return self._final(entry, result, sends, begun, waited[0], span)
            span.set_attribute("tops_job.outcome", Outcome.PENDING.value)
            if result.error == UNCONFIRMED:  # not an outage: resending at once cannot help
                return self._park_answered(entry, UNCONFIRMED, result)
            if not self.policy.may_retry(retries):
                return self._park_answered(entry, "max_retries", result)
            if not self.budget.try_spend():
                return self._park_answered(entry, "retry_budget", result)
            delay = self.policy.delay(retries, result.retry_after)
            retries += 1
            span.add_event("retry", {"tops_job.retry": retries, "error.type": result.error or "transient",
                                     "http.response.status_code": result.status or 0, "tops_job.delay_s": delay})
            log.info("[sender] receipt %s: retry %d in %.1fs", entry.digest[:16], retries, delay)
            if self._sleep(delay):
                return self.entries.park(entry, "stopped")

    def _park_answered(self, entry: Entry, why: str, result: SubmitResult) -> None:
        """Park `entry`; an answer that left it waiting is kept beside the outbox."""
        self.entries.park(entry, why, result.response or None)
        if result.response:
            self.outbox.note_answer(entry.digest, {"status": result.status, "error": result.error,
                                                   "answer": result.response})

    def _admit(self, entry: Entry, *, first_of_round: bool, waited: list[float]) -> str | None:
        """Step 2: the breaker, the rate limit and (for a later round) the run's retry budget.
        None when the send may go; else why the entry waits."""
        while not self.breaker.allow():
            if self._sleep(max(self.breaker.wait_hint(), 0.01)):
                return "breaker_open"
        asked = time.perf_counter()
        taken = self.bucket.take(self._sleep)
        waited[0] += time.perf_counter() - asked
        if not taken:
            self.breaker.release_probe()
            return "stopped"
        if first_of_round:
            if self.entries.mark_sent(entry):  # requeued after an earlier round: a retry, paid for
                if not self.budget.try_spend():
                    self.breaker.release_probe()
                    return "retry_budget"
            else:
                self.budget.record_first_send()
        return None

    def _send(self, receipt: dict[str, Any], key: bytes) -> SubmitResult:
        """Step 3: one send. (Whether an aggregator's answer confirms the delivery is the
        submitter's call: the HTTP one requires the digest and both verdicts, see
        outcomes.confirmed; a plugin's queue submitter has no verdict to give.)"""
        try:
            return self.submitter.submit(receipt, key)
        except Exception as exc:  # a plugin submitter must not raise, but if it does: transient
            return SubmitResult(Outcome.TRANSIENT, error=f"{type(exc).__name__}: {exc}")

    def _settle(self, entry: Entry, result: SubmitResult) -> bool:
        """Step 4: act on the answer. True when the receipt is final (delivered or rejected)."""
        digest = entry.digest
        if result.delivered:
            self.breaker.record_success()
            if not self.outbox.remove(digest):
                with self._cond:
                    self._stale[result.outcome.value] += 1
            self._requeue_parked()
            return True
        if result.outcome is Outcome.REJECTED:
            self._count_error(ErrorClass.VALIDATION)
            self.breaker.record_success()  # the aggregator is up and answered
            if self.outbox.reject(digest, {"status": result.status, "error": result.error, "answer": result.response}):
                log.warning("[sender] receipt %s rejected (%s %s): moved to %s", digest, result.status, result.error,
                            self.outbox.rejected_location)
            else:
                with self._cond:
                    self._stale[Outcome.REJECTED.value] += 1
            return True
        self.breaker.record_failure()
        self._count_error(ErrorClass.NETWORK)
        log.info("[sender] receipt %s not delivered (%s%s)", digest[:16], result.error,
                 f", retry after {result.retry_after:g}s" if result.retry_after is not None else "")
        return False

    def _final(self, entry: Entry, result: SubmitResult, sends: int, begun: float, waited: float, span: Any) -> None:
        span.set_attribute("tops_job.outcome", result.outcome.value)
        span.set_attribute("tops_job.sends", sends)
        if result.status is not None:
            span.set_attribute("http.response.status_code", result.status)
        self.entries.finalize(entry, result.outcome.value)
        with self._cond:
            finished = self._finished
            if not finished:
                self.report.counts[result.outcome.value] += 1
        if not finished:  # after the summary it is only reported by the next run's count
            self.on_receipt(ReceiptEvent(digest=entry.digest, outcome=result.outcome.value, status=result.status,
                                         error=result.error, latency_s=time.perf_counter() - begun, attempts=sends,
                                         rate_limit_wait_s=waited))

    def _requeue_parked(self) -> None:
        """The aggregator answered again: give receipts that ran out of retries another round,
        while the run's retry budget lasts (it bounds the rounds)."""
        if self.budget.exhausted or self._halt.is_set():
            return
        self.entries.requeue(("max_retries", "breaker_open"))

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

