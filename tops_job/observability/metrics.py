"""The run's metrics: OpenTelemetry instruments (names under `tops_job.`, UCUM units) and
the views that read them back (Prometheus text, the seed's JSON, the dashboard's data).

The Prometheus names are what the bridge makes of these (see the README, Observability):
`tops_job.attempts` {attempt} -> tops_job_attempts_total, `tops_job.product.duration` s ->
tops_job_product_duration_seconds, `tops_job.ops` {op}/s -> tops_job_ops_per_second, ...
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from prometheus_client import CollectorRegistry, generate_latest

from tops_job.atomic import write_atomic
from tops_job.delivery.outcomes import DELIVERED_OUTCOMES, Outcome
from tops_job.files import private_dir
from tops_job.observability.events import AttemptEvent, ReceiptEvent

BREAKER_STATES = {"closed": 0, "half_open": 1, "half-open": 1, "open": 2}
DURATION_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SERIES_POINTS = 600  # throughput points kept for the dashboard


class RunMetrics:
    """Instruments for one run, fed by the observability reporter."""

    def __init__(self, meter: Meter, delivery_state: Callable[[], dict[str, Any]] | None = None):
        self._delivery_state = delivery_state
        self._lock = threading.Lock()
        self.series: deque[tuple[float, float, float]] = deque(maxlen=SERIES_POINTS)  # (time, ops/s, product s)
        self.last_failed = False
        self.attempts = meter.create_counter(
            "tops_job.attempts", unit="{attempt}", description="Attempts by outcome (ok, failed) and error class.")
        self.receipts = meter.create_counter(
            "tops_job.receipts", unit="{receipt}",
            description="Receipts by delivery outcome (accepted, duplicate, rejected, pending).")
        self.product_duration = meter.create_histogram(
            "tops_job.product.duration", unit="s", description="Time of the timed matrix product, on the device.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S)
        self.attempt_duration = meter.create_histogram(
            "tops_job.attempt.duration", unit="s",
            description="Time of a whole attempt: inputs, product, commitment, signing.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S)
        self.submit_latency = meter.create_histogram(
            "tops_job.submit.latency", unit="s", description="From hand-over to final delivery outcome, retries included.",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
        self.rate_limiter_wait = meter.create_histogram(
            "tops_job.rate_limiter.wait", unit="s", description="Time a submission waited for the rate limiter.",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
        self.ops = meter.create_gauge(
            "tops_job.ops", unit="{op}/s", description="Achieved operations per second over the last product.")
        self.last_success = meter.create_gauge(
            "tops_job.last_success.timestamp", unit="s",
            description="Unix time of the newest receipt the aggregator holds (accepted or duplicate).")
        self.device_failures = meter.create_counter(
            "tops_job.device.check_failures", unit="{failure}",
            description="Device checks that failed (check: selftest, self_audit), by device (PCI bus id, UUID).")
        self.device_health = meter.create_counter(
            "tops_job.device.health_changes", unit="{event}",
            description="NVML health counters that moved during the run (ECC errors, remapped rows, Xid events).")
        meter.create_observable_gauge(
            "tops_job.outbox.depth", callbacks=[self._observe_outbox], unit="{receipt}",
            description="Receipts waiting in the durable outbox.")
        meter.create_observable_gauge(
            "tops_job.breaker.state", callbacks=[self._observe_breaker], unit="1",
            description="Aggregator circuit breaker: 0 closed, 1 half-open, 2 open.")

    # ---- feeding

    def bind_delivery(self, state: Callable[[], dict[str, Any]]) -> None:
        self._delivery_state = state

    def delivery_state(self) -> dict[str, Any]:
        if self._delivery_state is None:
            return {"outbox_depth": 0, "breaker": "closed"}
        try:
            return dict(self._delivery_state())
        except Exception:  # a delivery mid-shutdown: report what is known
            return {"outbox_depth": 0, "breaker": "unknown"}

    def record_attempt(self, event: AttemptEvent) -> None:
        if not event.ok:
            self.attempts.add(1, {"outcome": "failed", "error_class": event.error_class or "internal"})
            self.last_failed = True
            return
        self.last_failed = False
        self.attempts.add(1, {"outcome": "ok", "error_class": "none"})
        product_s = event.elapsed_ns / 1e9
        self.product_duration.record(product_s)
        self.attempt_duration.record(event.wall_ns / 1e9)
        if event.elapsed_ns > 0:
            rate = event.ops / product_s
            self.ops.set(rate)
            with self._lock:
                self.series.append((time.time(), rate, product_s))

    def record_receipt(self, event: ReceiptEvent) -> None:
        self.receipts.add(1, {"outcome": event.outcome})
        if event.outcome != Outcome.PENDING:
            self.submit_latency.record(max(0.0, event.latency_s))
        wait = getattr(event, "rate_limit_wait_s", None)
        if wait is not None:
            self.rate_limiter_wait.record(max(0.0, wait))
        if event.outcome in DELIVERED_OUTCOMES:
            self.last_success.set(time.time())

    def record_device_checks(self, checks: dict[str, Any] | None) -> None:
        """The summary's `device_checks`: a failed self-test or self-audit, health changes.
        Healthy runs add 0, so the series exist (and alerts see them) before anything fails."""
        if not checks:
            return
        device = str(checks.get("device", ""))
        selftest = checks.get("selftest")
        if selftest is not None:
            failed = not selftest.get("ok", True)
            self.device_failures.add(int(failed), {"check": "selftest", "device": device,
                                                   "stage": str(selftest.get("stage")) if failed else "none"})
        audit = checks.get("self_audit") or {}
        if audit.get("every") or audit.get("failure"):
            self.device_failures.add(int(bool(audit.get("failure"))),
                                     {"check": "self_audit", "device": device, "stage": "receipt"})
        changes = {k: v for k, v in ((checks.get("health") or {}).get("changes") or {}).items()
                   if k != "xid_last" and v > 0}
        for counter, delta in (changes or {"ecc_uncorrected": 0}).items():
            self.device_health.add(int(delta), {"counter": counter, "device": device})

    def _observe_outbox(self, options: CallbackOptions) -> Iterable[Observation]:
        yield Observation(int(self.delivery_state().get("outbox_depth", 0) or 0))

    def _observe_breaker(self, options: CallbackOptions) -> Iterable[Observation]:
        state = str(self.delivery_state().get("breaker", "closed"))
        if state in BREAKER_STATES:
            yield Observation(BREAKER_STATES[state])

    def throughput_series(self) -> list[tuple[float, float, float]]:
        with self._lock:
            return list(self.series)


# ---------------------------------------------------------------- reading back

def prometheus_text(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def samples(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample by its Prometheus name (…_total, …_bucket, …_sum)."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in registry.collect():
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


def total(found: dict, name: str, **labels: str) -> float:
    return sum(value for sample_labels, value in found.get(name, ())
               if all(sample_labels.get(k) == v for k, v in labels.items()))


def histogram_counts(found: dict, name: str) -> list[tuple[str, int]]:
    """(upper bound, observations in that bucket alone), from the cumulative buckets."""
    buckets = sorted(((labels["le"], value) for labels, value in found.get(name + "_bucket", ())),
                     key=lambda item: float(item[0]))
    counts, previous = [], 0.0
    for bound, cumulative in buckets:
        counts.append((bound, int(cumulative - previous)))
        previous = cumulative
    return counts


def seed_json(found: dict, uptime_s: float, health_status: str) -> dict[str, Any]:
    """The seed worker's /metrics document, from the same instruments as /metrics."""
    ok = total(found, "tops_job_attempts_total", outcome="ok")
    failed = total(found, "tops_job_attempts_total", outcome="failed")
    count = total(found, "tops_job_product_duration_seconds_count")
    product_sum = total(found, "tops_job_product_duration_seconds_sum")
    delivered = sum(total(found, "tops_job_receipts_total", outcome=o.value) for o in DELIVERED_OUTCOMES)
    uptime = max(uptime_s, 1e-9)
    return {
        "metrics": {
            "total_attempts": int(ok + failed),
            "successful_attempts": int(ok),
            "failed_attempts": int(failed),
            "average_time_ms": round(product_sum / count * 1000, 2) if count else 0.0,
            "attempts_per_second": round(ok / uptime, 2),
            "receipts_per_second": round(delivered / uptime, 2),
        },
        "health_status": health_status,
    }


def write_textfile(registry: CollectorRegistry, path: Path) -> Path:
    """For node_exporter's textfile collector: written atomically so the collector never
    reads half a file; world-readable like its others."""
    path = Path(path)
    private_dir(path.parent)
    return write_atomic(path, prometheus_text(registry), mode=0o644)
