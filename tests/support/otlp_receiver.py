"""A real OTLP/HTTP receiver on loopback: decodes ExportTraceServiceRequest and
ExportMetricsServiceRequest (opentelemetry-proto) and keeps what arrived, raw bytes too."""

from __future__ import annotations

import gzip
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest, ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse


def any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def attrs(key_values: Any) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in key_values}


class OtlpReceiver:
    def __init__(self) -> None:
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.raw: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path == "/v1/traces":
                    request, response = ExportTraceServiceRequest(), ExportTraceServiceResponse()
                elif self.path == "/v1/metrics":
                    request, response = ExportMetricsServiceRequest(), ExportMetricsServiceResponse()
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                request.ParseFromString(body)
                with receiver.lock:
                    receiver.raw.append(body)
                    receiver.headers.append(dict(self.headers))
                    (receiver.traces if self.path == "/v1/traces" else receiver.metrics).append(request)
                payload = response.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OtlpReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def spans(self) -> list[dict[str, Any]]:
        found = []
        with self.lock:
            requests = list(self.traces)
        for request in requests:
            for resource_spans in request.resource_spans:
                resource = attrs(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        found.append({
                            "name": span.name, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(), "attributes": attrs(span.attributes),
                            "events": [(e.name, attrs(e.attributes)) for e in span.events],
                            "status": span.status.code, "resource": resource,
                            "start": span.start_time_unix_nano, "end": span.end_time_unix_nano})
        return found

    def metric_points(self) -> dict[str, list[dict[str, Any]]]:
        """Name -> points of the newest export of that metric (cumulative), with unit,
        kind, resource and attributes."""
        found: dict[str, list[dict[str, Any]]] = {}
        with self.lock:
            requests = list(self.metrics)
        for request in requests:
            for resource_metrics in request.resource_metrics:
                resource = attrs(resource_metrics.resource.attributes)
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        kind = metric.WhichOneof("data")
                        points = []
                        for point in getattr(metric, kind).data_points:
                            entry = {"attributes": attrs(point.attributes), "unit": metric.unit, "kind": kind,
                                     "resource": resource}
                            if kind == "histogram":
                                entry.update(count=point.count, sum=point.sum, buckets=list(point.bucket_counts),
                                             bounds=list(point.explicit_bounds))
                            else:
                                entry["value"] = point.as_double if point.WhichOneof("value") == "as_double" else point.as_int
                            points.append(entry)
                        found[metric.name] = points
        return found
