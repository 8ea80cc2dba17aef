"""The aggregator's own Prometheus metrics, served at GET /metrics.

    tops_job_aggregator_receipts_total{verdict, reason}   every POST /verify answer
    tops_job_aggregator_requests_total{endpoint, code}
    tops_job_aggregator_verify_duration_seconds           one receipt's verification
    tops_job_aggregator_verify_cpu_seconds_total{protocol} CPU time in the checks themselves
    tops_job_aggregator_db_duration_seconds{operation}    each store call
    tops_job_aggregator_challenges_issued_total / _expired_total
    tops_job_aggregator_connections / _connection_limit   per process, summed over workers
    tops_job_aggregator_verify_slots_busy
    tops_job_aggregator_slow_requests_closed_total / _connections_shed_total

With several worker processes, prometheus_client's multiprocess mode: each worker writes
its values to files under one directory the parent made, and whichever worker answers a
scrape sums them all.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from tops_job.aggregator.events import Events

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_ENDPOINTS = {"/verify", "/challenge", "/health", "/metrics", "/dids", "/fleet"}
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def enable_multiprocess(directory: str) -> None:
    """Call in each worker before its metrics exist: values go to files in `directory`."""
    import prometheus_client.values as values

    os.environ[MULTIPROC_ENV] = directory
    values.ValueClass = values.MultiProcessValue()


class AggregatorMetrics(Events):
    def __init__(self) -> None:
        import prometheus_client

        prometheus_client.disable_created_metrics()  # no *_created series beside each counter and histogram
        self.multiprocess = MULTIPROC_ENV in os.environ
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.receipts = Counter("tops_job_aggregator_receipts", "POST /verify answers by verdict and reason",
                                ["verdict", "reason"], registry=r)
        self.requests = Counter("tops_job_aggregator_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "code"], registry=r)
        self.verify = Histogram("tops_job_aggregator_verify_duration_seconds", "Verification of one receipt",
                                buckets=_LATENCY, registry=r)
        self.verify_cpu_seconds = Counter(
            "tops_job_aggregator_verify_cpu_seconds",
            "CPU time spent in the checks themselves (v1 receipts; v2 commitments and opened sets); against "
            "the process's CPU, the share of the aggregator's work that is verification", ["protocol"], registry=r)
        self.db = Histogram("tops_job_aggregator_db_duration_seconds", "One store operation", ["operation"],
                            buckets=_LATENCY, registry=r)
        self.issued = Counter("tops_job_aggregator_challenges_issued", "Run challenges issued", registry=r)
        self.expired = Counter("tops_job_aggregator_challenges_expired", "Expired unused challenges purged", registry=r)
        self.connections = Gauge("tops_job_aggregator_connections", "Open client connections",
                                 multiprocess_mode="livesum", registry=r)
        self.limit = Gauge("tops_job_aggregator_connection_limit", "Connection limit (summed over workers)",
                           multiprocess_mode="livesum", registry=r)
        self.slots = Gauge("tops_job_aggregator_verify_slots_busy", "Verifications in progress",
                           multiprocess_mode="livesum", registry=r)
        self.slow = Counter("tops_job_aggregator_slow_requests_closed", "Connections closed for slow headers or body",
                            registry=r)
        self.shed = Counter("tops_job_aggregator_connections_shed", "Idle connections closed at the connection limit",
                            registry=r)
        self._slow_seen = self._shed_seen = 0
        self._verify_cpu: dict[str, Any] = {}

    # Events (the application's hooks)
    def verify_seconds(self, seconds: float) -> None:
        self.verify.observe(seconds)

    def verify_cpu(self, protocol: str, seconds: float) -> None:
        # A labelled child looked up once: this runs twice for every attempt.
        child = self._verify_cpu.get(protocol)
        if child is None:
            child = self._verify_cpu[protocol] = self.verify_cpu_seconds.labels(protocol)
        child.inc(seconds)

    def challenges_purged(self, count: int) -> None:
        if count:
            self.expired.inc(count)

    def server_tick(self, server: Any) -> None:
        """Once a second from the server loop: connection gauges and guard counters."""
        self.connections.set(len(server.active_channels))
        self.limit.set(server.adj.connection_limit)
        if server.slow_closed > self._slow_seen:
            self.slow.inc(server.slow_closed - self._slow_seen)
            self._slow_seen = server.slow_closed
        if server.shed_count > self._shed_seen:
            self.shed.inc(server.shed_count - self._shed_seen)
            self._shed_seen = server.shed_count

    def exposition(self) -> bytes:
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return bytes(generate_latest(registry))
        return bytes(generate_latest(self.registry))


class TimedStore:
    """The store, each call timed into tops_job_aggregator_db_duration_seconds."""

    def __init__(self, store: Any, metrics: AggregatorMetrics):
        self._store = store
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if not callable(target) or name.startswith("_") or name == "transaction":  # its block is timed by the caller
            return target
        histogram = self._metrics.db.labels(name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return target(*args, **kwargs)
            finally:
                histogram.observe(time.perf_counter() - began)

        return timed


class MetricsMiddleware:
    """Serves /metrics and counts every answer of `app`."""

    def __init__(self, app: Callable[..., Iterable[bytes]], metrics: AggregatorMetrics, gate: Any = None):
        self.app = app
        self.metrics = metrics
        self.gate = gate

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        if path == "/metrics":
            if self.gate is not None:
                self.metrics.slots.set(self.gate.busy)
            data = self.metrics.exposition()
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(data)))])
            self.metrics.requests.labels("/metrics", "200").inc()
            return [data]
        seen: dict[str, str] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            seen["status"] = status.split(" ", 1)[0]
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        if self.gate is not None:
            self.metrics.slots.set(self.gate.busy)
        chunks = list(self.app(environ, capture))
        code = seen.get("status", "500")
        endpoint = path if path in _ENDPOINTS else ("/runs" if path.startswith("/runs/") else
                                                    "/dids/<did>" if path.startswith("/dids/") else "other")
        self.metrics.requests.labels(endpoint, code).inc()
        if path == "/verify":
            verdict, reason = "rejected", "unknown"
            try:
                body = json.loads(b"".join(chunks))
                if body.get("ok"):
                    verdict, reason = ("duplicate" if body.get("duplicate") else "accepted"), "none"
                else:
                    reason = str(body.get("error", "unknown"))[:64]
                    verdict = "unavailable" if code.startswith("5") else "rejected"
            except (ValueError, AttributeError):
                pass
            self.metrics.receipts.labels(verdict, reason).inc()
        elif path == "/challenge" and code == "200":
            self.metrics.issued.inc()
        return chunks
