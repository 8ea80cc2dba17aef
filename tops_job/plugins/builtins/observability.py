"""Metrics for every run (OTel instruments, exported as configured), the health server
when METRICS_ENABLED=1 / --health-port, and the final --metrics-textfile."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from tops_job import hookimpl
from tops_job.observability import telemetry
from tops_job.observability.events import AttemptEvent, ReceiptEvent, Reporter, RunInfo
from tops_job.observability.metrics import RunMetrics, write_textfile

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from tops_job.observability.health_server import HealthServer, RunView

log = logging.getLogger("tops_job.observability")


class ObservabilityReporter(Reporter):
    name = "observability"

    def __init__(self, config: Any):
        self.config = config
        self.metrics: RunMetrics | None = None
        self.registry: CollectorRegistry | None = None
        self.server: HealthServer | None = None
        self.view: RunView | None = None
        self._delivery: Any = None

    def on_delivery(self, delivery: Any) -> None:
        self._delivery = delivery
        if self.metrics is not None:
            self.metrics.bind_delivery(delivery.state)

    def on_run_start(self, run: RunInfo) -> None:
        handle = telemetry.active(self.config)
        self.registry = handle.prometheus_registry
        self.metrics = RunMetrics(handle.meter(), self._delivery.state if self._delivery is not None else None)
        if self.config.metrics_enabled:
            from tops_job.observability.health_server import HealthServer, RunView

            self.view = RunView(handle.prometheus_registry, self.metrics, run.run_id)
            host = getattr(self.config, "health_host", None) or "0.0.0.0"
            try:
                self.server = HealthServer(self.view, host, self.config.health_port)
                self.server.start()
            except OSError as exc:  # the run goes on without it; the summary still counts
                log.warning("[health] cannot serve on %s:%s: %s", host, self.config.health_port, exc)
                raise

    def on_attempt(self, event: AttemptEvent) -> None:
        if self.metrics is not None:
            self.metrics.record_attempt(event)

    def on_receipt(self, event: ReceiptEvent) -> None:
        if self.metrics is not None:
            self.metrics.record_receipt(event)

    def on_run_end(self, summary: dict[str, Any]) -> None:
        try:
            if self.metrics is not None:
                self.metrics.record_device_checks(summary.get("device_checks"))
            path = getattr(self.config, "metrics_textfile", None)
            if path and self.registry is not None:
                write_textfile(self.registry, path)
                log.info("[metrics] final metrics written to %s", path)
        finally:
            if self.server is not None:
                self.server.stop()
                self.server = None


@hookimpl
def tops_job_register_reporters(register, config):
    register(ObservabilityReporter(config))
