"""The health server (METRICS_ENABLED=1 or --health-port): a small WSGI app on waitress,
in a background thread, for as long as the run lasts.

  /health        the seed's JSON (status, uptime_seconds, version, timestamp) + run, breaker, outbox
  /metrics       Prometheus text exposition, from the run's OTel instruments
  /metrics.json  the seed's JSON metrics document, from the same instruments
  /              an HTML dashboard with server-drawn SVG charts
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry

from tops_job import __version__
from tops_job.delivery.outcomes import REPORTED_OUTCOMES
from tops_job.observability import dashboard
from tops_job.observability.metrics import RunMetrics, histogram_counts, prometheus_text, samples, seed_json, total

log = logging.getLogger("tops_job.health")
# What generate_latest writes (prometheus_client >= 0.22 labels its own output 1.0.0, which
# older scrapers do not know).
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class RunView:
    """What the endpoints show: the run's metrics read back from the registry."""

    def __init__(self, registry: CollectorRegistry, metrics: RunMetrics, run_id: str):
        self.registry = registry
        self.metrics = metrics
        self.run_id = run_id
        self.started = time.monotonic()
        self.finished = False

    def status(self) -> str:
        state = self.metrics.delivery_state()
        if state.get("breaker", "closed") != "closed" or self.metrics.last_failed:
            return "degraded"
        return "healthy"

    def health(self) -> dict[str, Any]:
        state = self.metrics.delivery_state()
        return {
            "status": self.status(),
            "uptime_seconds": int(time.monotonic() - self.started),
            "version": __version__,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "run_id": self.run_id,
            "breaker": state.get("breaker", "closed"),
            "outbox_depth": int(state.get("outbox_depth", 0) or 0),
        }

    def metrics_json(self) -> dict[str, Any]:
        return seed_json(samples(self.registry), time.monotonic() - self.started, self.status())

    def dashboard(self) -> str:
        found = samples(self.registry)
        outcomes: dict[str, float] = {}
        for labels, value in found.get("tops_job_attempts_total", ()):
            key = "attempt:ok" if labels.get("outcome") == "ok" else f"attempt:{labels.get('error_class', 'failed')}"
            outcomes[key] = outcomes.get(key, 0) + value
        for outcome in REPORTED_OUTCOMES:
            value = total(found, "tops_job_receipts_total", outcome=outcome.value)
            if value:
                outcomes[f"receipt:{outcome.value}"] = value
        return dashboard.render(health=self.health(), seed=seed_json(found, time.monotonic() - self.started, self.status()),
                                series=self.metrics.throughput_series(),
                                product_buckets=histogram_counts(found, "tops_job_product_duration_seconds"),
                                outcomes=outcomes)


def make_app(view: RunView) -> Callable:
    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _send(start_response, "405 Method Not Allowed", "text/plain", b"GET only\n")
        try:
            if path == "/health":
                return _json(start_response, view.health())
            if path == "/metrics":
                return _send(start_response, "200 OK", PROMETHEUS_TEXT, prometheus_text(view.registry))
            if path == "/metrics.json":
                return _json(start_response, view.metrics_json())
            if path in ("/", "/index.html"):
                return _send(start_response, "200 OK", "text/html; charset=utf-8", view.dashboard().encode())
        except Exception:
            log.exception("[health] %s failed", path)
            return _send(start_response, "500 Internal Server Error", "text/plain", b"internal error\n")
        return _send(start_response, "404 Not Found", "text/plain", b"not found\n")

    return app


def _json(start_response: Callable, data: Any) -> list[bytes]:
    return _send(start_response, "200 OK", "application/json", json.dumps(data, indent=2).encode() + b"\n")


def _send(start_response: Callable, status: str, content_type: str, body: bytes) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store")])
    return [body]


class HealthServer:
    def __init__(self, view: RunView, host: str, port: int):
        import waitress

        self.server = waitress.create_server(make_app(view), host=host, port=port, threads=2,
                                             ident="tops-job", clear_untrusted_proxy_headers=True)
        self.host, self.port = host, int(self.server.effective_port)
        self._thread = threading.Thread(target=self._serve, name="tops-job-health", daemon=True)

    def _serve(self) -> None:
        try:
            self.server.run()
        except Exception as exc:  # closing the socket under the loop can end it this way
            log.debug("[health] server loop ended: %s", exc)

    def start(self) -> HealthServer:
        self._thread.start()
        shown = "localhost" if self.host in ("0.0.0.0", "::", "") else self.host
        log.info("[health] serving /health, /metrics, /metrics.json and the dashboard on http://%s:%d/", shown, self.port)
        return self

    def stop(self) -> None:
        """Close the listening socket and every open connection (a dashboard tab or a
        scraper keeps one alive, and the loop runs while any is open), in the loop's own
        thread; then end the loop and the worker threads."""
        from waitress import wasyncore

        def close_all() -> None:
            wasyncore.close_all(self.server._map, ignore_all=True)

        try:
            if self._thread.is_alive():
                self.server.trigger.pull_trigger(close_all)
            else:
                close_all()
        except Exception as exc:
            log.debug("[health] stop: %s", exc)
            close_all()
        self._thread.join(timeout=2)
        try:
            self.server.task_dispatcher.shutdown(timeout=1)
        except Exception as exc:
            log.debug("[health] stop: %s", exc)
