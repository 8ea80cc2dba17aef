"""OpenTelemetry for one run: resource, providers, exporters, and a bounded shutdown.

Configured from the standard variables (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]ENDPOINT / _PROTOCOL / _HEADERS, OTEL_TRACES_EXPORTER,
OTEL_METRICS_EXPORTER = otlp | console | none). Nothing is exported unless an OTLP endpoint
is set or an exporter is named. TOPS_JOB_OTEL_EXPORT_TIMEOUT (seconds, default 5) bounds
every export and the final flush together, so a dead collector cannot eat a 30 s grace.

Metrics always get a Prometheus reader on a private registry: the health server's /metrics,
/metrics.json and dashboard, and --metrics-textfile, all read the same OTel instruments.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry

from tops_job import __version__
from tops_job.config import telemetry_export_timeout
from tops_job.errors import ConfigError

log = logging.getLogger("tops_job.telemetry")

SERVICE_NAME = "tops-job"

# Scheduler identity, read when present: variable -> resource attribute.
_SCHEDULER_ATTRS = {
    "JOB_COMPLETION_INDEX": "k8s.job.completion_index",
    "K8S_NAMESPACE": "k8s.namespace.name",
    "K8S_NODE_NAME": "k8s.node.name",
    "AWS_BATCH_JOB_ID": "aws.batch.job.id",
    "AWS_BATCH_JOB_ARRAY_INDEX": "aws.batch.job.array_index",
    "AWS_BATCH_JQ_NAME": "aws.batch.job_queue",
    "AWS_BATCH_CE_NAME": "aws.batch.compute_environment",
    "SLURM_JOB_ID": "slurm.job.id",
    "SLURM_ARRAY_JOB_ID": "slurm.array.job_id",
    "SLURM_ARRAY_TASK_ID": "slurm.array.task_id",
    "SLURM_CLUSTER_NAME": "slurm.cluster.name",
    "SLURMD_NODENAME": "slurm.node.name",
}


def resource_attributes(*, run_id: str, did: str | None = None, backend: str | None = None,
                        device: str | None = None, dtype: str | None = None,
                        environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What this run is and where it runs. Only named variables are read: nothing
    from the environment at large (secrets live there) reaches the resource."""
    environ = os.environ if environ is None else environ
    attrs: dict[str, Any] = {
        "service.name": SERVICE_NAME,
        "service.version": __version__,
        "host.name": socket.gethostname(),
        "tops_job.run_id": run_id,
    }
    for key, value in (("tops_job.did", did), ("tops_job.backend", backend),
                       ("tops_job.device.model", device), ("tops_job.dtype", dtype)):
        if value:
            attrs[key] = value
    if environ.get("KUBERNETES_SERVICE_HOST"):
        pod = environ.get("K8S_POD_NAME") or environ.get("HOSTNAME")
        if pod:
            attrs["k8s.pod.name"] = pod
    for variable, key in _SCHEDULER_ATTRS.items():
        if environ.get(variable):
            attrs[key] = environ[variable]
    return attrs


def make_resource(attrs: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Resource:
    """Ours, overridden by what the operator set (OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME)."""
    environ = os.environ if environ is None else environ
    ours = dict(attrs)
    operator = OTELResourceDetector().detect().attributes
    for key in operator:
        ours.pop(key, None)
    if environ.get("OTEL_SERVICE_NAME"):
        ours.pop("service.name", None)
    return Resource.create(ours)


# ---------------------------------------------------------------- the global tracer

class _SwitchTracer(trace.Tracer):
    """Set as the global provider once per process; each run points it at its own SDK
    provider. The tracers that modules took at import time follow the current run."""

    def __init__(self, switch: _SwitchProvider, args: tuple, kwargs: dict):
        self._switch, self._args, self._kwargs = switch, args, kwargs

    def _tracer(self) -> trace.Tracer:
        return self._switch.current.get_tracer(*self._args, **self._kwargs)

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self._tracer().start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._tracer().start_as_current_span(*args, **kwargs)


class _SwitchProvider(trace.TracerProvider):
    def __init__(self) -> None:
        self.current: trace.TracerProvider = trace.NoOpTracerProvider()

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _SwitchTracer(self, args, kwargs)


_SWITCH = _SwitchProvider()
_SWITCH_LOCK = threading.Lock()
_switch_installed = False


def _install_switch() -> None:
    global _switch_installed
    with _SWITCH_LOCK:
        if not _switch_installed:
            trace.set_tracer_provider(_SWITCH)
            _switch_installed = True


# ---------------------------------------------------------------- exporters


def _exporters_for(signal: str, environ: Mapping[str, str]) -> list[str]:
    """'otlp', 'console' or nothing, per OTEL_<SIGNAL>_EXPORTER; unset means OTLP only
    when an endpoint is configured (the SDK's default would send to localhost:4318)."""
    variable = f"OTEL_{signal.upper()}_EXPORTER"
    names = [n.strip().lower() for n in environ.get(variable, "").split(",") if n.strip()]
    if not names:
        endpoint = environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    if "none" in names:
        return []
    for name in names:
        if name not in ("otlp", "console"):
            raise ConfigError(variable, f"{name!r} is not one of otlp, console, none")
    return names


def _protocol(signal: str, environ: Mapping[str, str]) -> str:
    variable = f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL"
    if not environ.get(variable):
        variable = "OTEL_EXPORTER_OTLP_PROTOCOL"
    protocol = environ.get(variable, "").strip() or "http/protobuf"
    if protocol not in ("http/protobuf", "grpc"):
        raise ConfigError(variable, f"{protocol!r} is not supported (use http/protobuf, or grpc with "
                                    "opentelemetry-exporter-otlp-proto-grpc installed)")
    return protocol


def _span_exporter(name: str, environ: Mapping[str, str], timeout_s: float):
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(out=sys.stderr)
    if _protocol("traces", environ) == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
        except ImportError:
            raise ConfigError("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc needs opentelemetry-exporter-otlp-proto-grpc") from None
        return Grpc(timeout=timeout_s)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(timeout=timeout_s)


def _export_interval_ms(environ: Mapping[str, str]) -> float:
    text = environ.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip()
    if not text:
        return 60_000.0
    try:
        value = float(text)
    except ValueError:
        raise ConfigError("OTEL_METRIC_EXPORT_INTERVAL", f"{text!r} is not a number of milliseconds") from None
    if not value > 0:
        raise ConfigError("OTEL_METRIC_EXPORT_INTERVAL", f"{value:g} is not a positive number of milliseconds")
    return value


def _metric_reader(name: str, environ: Mapping[str, str], timeout_s: float) -> MetricReader:
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

    if name == "console":
        exporter = ConsoleMetricExporter(out=sys.stderr)
    elif _protocol("metrics", environ) == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as Grpc
        except ImportError:
            raise ConfigError("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc needs opentelemetry-exporter-otlp-proto-grpc") from None
        exporter = Grpc(timeout=timeout_s)
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter(timeout=timeout_s)  # type: ignore[assignment]
    return PeriodicExportingMetricReader(exporter, export_interval_millis=_export_interval_ms(environ),
                                         export_timeout_millis=timeout_s * 1000)


# ---------------------------------------------------------------- the handle

class _SerialRegistry(CollectorRegistry):
    """A registry read by one reader at a time. The OTel Prometheus bridge queues each
    collection and drains the whole queue in whichever reader runs next, so two readers
    at once (two scrapes, a scrape and the final textfile) could get every sample twice
    and nothing at all."""

    def __init__(self) -> None:
        super().__init__(auto_describe=True)
        self._read_lock = threading.Lock()

    def collect(self) -> Any:
        with self._read_lock:
            return iter(list(super().collect()))



@dataclass
class TelemetryHandle:
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    prometheus_registry: CollectorRegistry
    resource: Resource
    export_timeout_s: float
    _closed: bool = False

    def meter(self):
        return self.meter_provider.get_meter("tops_job", __version__)

    def shutdown(self, timeout_s: float | None = None) -> bool:
        """Flush and shut down both providers within `timeout_s` (default: the export
        bound) whatever the collector does; True when everything finished in time."""
        global _active
        if self._closed:
            return True
        self._closed = True
        bound = self.export_timeout_s if timeout_s is None else timeout_s
        if _SWITCH.current is self.tracer_provider:
            _SWITCH.current = trace.NoOpTracerProvider()
        if _active is self:
            _active = None
        millis = max(1, int(bound * 1000))
        jobs = [
            threading.Thread(target=_quietly, args=(self.tracer_provider.shutdown,), name="otel-traces-shutdown", daemon=True),
            threading.Thread(target=_quietly, args=(self.meter_provider.shutdown, millis), name="otel-metrics-shutdown", daemon=True),
        ]
        deadline = time.monotonic() + bound
        for job in jobs:
            job.start()
        for job in jobs:
            job.join(max(0.0, deadline - time.monotonic()))
        late = [job.name for job in jobs if job.is_alive()]
        if late:
            log.warning("[telemetry] export did not finish within %.1f s (%s); giving up on it", bound, ", ".join(late))
        return not late


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:  # the exporter's own failure must not fail the run
        log.warning("[telemetry] shutdown: %s", exc)


_active: TelemetryHandle | None = None


def setup_telemetry(config: Any, resource_attrs: Mapping[str, Any],
                    environ: Mapping[str, str] | None = None) -> TelemetryHandle:
    """Build this run's providers and make them current. Raises ConfigError for a bad
    OTEL_* or TOPS_JOB_OTEL_* value."""
    global _active
    environ = os.environ if environ is None else environ
    timeout_s = telemetry_export_timeout(environ)
    resource = make_resource(resource_attrs, environ)
    trace_names = _exporters_for("traces", environ)
    metric_names = _exporters_for("metrics", environ)

    # shutdown_on_exit=False: our own shutdown is bounded; the SDK's atexit hook is not.
    tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    for name in trace_names:
        tracer_provider.add_span_processor(BatchSpanProcessor(_span_exporter(name, environ, timeout_s),
                                                              export_timeout_millis=timeout_s * 1000))
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    registry = _SerialRegistry()
    readers: list[MetricReader] = [PrometheusMetricReader(registry=registry, scope_info_enabled=False)]
    readers += [_metric_reader(name, environ, timeout_s) for name in metric_names]
    meter_provider = MeterProvider(resource=resource, metric_readers=readers, shutdown_on_exit=False)

    if _active is not None:
        _active.shutdown()
    _install_switch()
    _SWITCH.current = tracer_provider
    _active = TelemetryHandle(tracer_provider, meter_provider, registry, resource, timeout_s)
    if trace_names or metric_names:
        log.info("[telemetry] exporting traces: %s, metrics: %s (bound %.1f s)",
                 ",".join(trace_names) or "none", ",".join(metric_names) or "none", timeout_s)
    return _active


def active(config: Any = None) -> TelemetryHandle:
    """The current run's telemetry; a local one (no export) when nobody set it up, as
    when the library runs a job without the CLI."""
    if _active is None:
        run_id = getattr(config, "run_id", "") or "unknown"
        setup_telemetry(config, resource_attributes(run_id=run_id), environ={})
    assert _active is not None
    return _active


def setup_for_job(config: Any, job: Any) -> TelemetryHandle:
    """setup_telemetry with the resource of a built JobRun (identity and device known)."""
    backend = job.backend
    return setup_telemetry(config, resource_attributes(
        run_id=config.run_id, did=job.identity.did, backend=getattr(backend, "name", None),
        device=getattr(backend, "device_model", None), dtype=getattr(backend, "dtype", None)))
