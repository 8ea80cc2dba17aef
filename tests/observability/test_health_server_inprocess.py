"""The health server and the metrics readers in this process, on loopback: stopping with
open keep-alive connections, and reads from several threads at once."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from tops_job.observability import telemetry
from tops_job.observability.events import AttemptEvent
from tops_job.observability.health_server import HealthServer, RunView
from tops_job.observability.metrics import RunMetrics, samples, total


@pytest.fixture
def view():
    handle = telemetry.setup_telemetry(None, telemetry.resource_attributes(run_id="inprocess"), environ={})
    metrics = RunMetrics(handle.meter())
    for attempt in range(3):
        metrics.record_attempt(AttemptEvent(attempt=attempt, ok=True, elapsed_ns=10_000_000, wall_ns=20_000_000,
                                            ops=10**9))
    yield RunView(handle.prometheus_registry, metrics, "inprocess")
    handle.shutdown()


def test_stop_closes_keep_alive_connections_and_ends_the_thread(view):
    """A dashboard tab or a scraper holds a keep-alive connection; the run's end must not
    wait on it, nor leave the server thread serving."""
    server = HealthServer(view, "127.0.0.1", 0).start()
    client = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    client.request("GET", "/health")
    response = client.getresponse()
    assert response.status == 200 and json.loads(response.read())["run_id"] == "inprocess"

    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.5
    assert not server._thread.is_alive()
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        client.request("GET", "/health")
        client.getresponse().read()
    client.close()


def test_concurrent_reads_each_see_every_sample_once(view, monkeypatch):
    """The Prometheus bridge queues each collection and drains the queue in whichever
    reader gets there: two readers at once could see a metric twice and nothing at all.
    The window is widened here (a pause right after the bridge queues its data) so the
    overlap happens on every try."""
    collector = view.registry._collector_to_names.copy().popitem()[0]
    queue = collector.add_metrics_data

    def queue_then_pause(data):
        queue(data)
        time.sleep(0.02)

    monkeypatch.setattr(collector, "add_metrics_data", queue_then_pause)
    seen: list[float] = []
    barrier = threading.Barrier(4)

    def read() -> None:
        barrier.wait()
        seen.append(total(samples(view.registry), "tops_job_attempts_total", outcome="ok"))

    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == [3.0] * 4
