"""The health server of a running job: /health, /metrics (promtool), /metrics.json, the
dashboard in headless Chromium; and the final --metrics-textfile."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.support import require_tool
from tests.support.health import get, wait_for_attempts
from tops_job import __version__

PROMETHEUS_NAMES = {
    "tops_job_attempts_total", "tops_job_receipts_total", "tops_job_product_duration_seconds",
    "tops_job_attempt_duration_seconds", "tops_job_submit_latency_seconds", "tops_job_ops_per_second",
    "tops_job_outbox_depth", "tops_job_breaker_state", "tops_job_last_success_timestamp_seconds",
}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def promtool_check(text: bytes, tmp_path: Path) -> None:
    promtool = require_tool("promtool", "apt-get install prometheus")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def families(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


@pytest.fixture
def running_job(job_env, start_job, tmp_path):
    """A long run with the health server on an ephemeral port; TERM at the end."""
    textfile = tmp_path / "textfile" / "tops-job.prom"
    job = start_job(["run", "--size", "96", "--attempts", "1000000", "--health-port", "0",
                     "--metrics-textfile", str(textfile)], {**job_env, "TOPS_JOB_HEALTH_HOST": "127.0.0.1"})
    port = job.health_port()
    wait_for_attempts(port, 5)
    # Receipts are reported once delivered (the self-audit may still hold the first ones).
    deadline = time.monotonic() + 30
    while b"tops_job_receipts_total{" not in get(port, "/metrics")[2] and time.monotonic() < deadline:
        time.sleep(0.1)
    yield job, port, textfile
    job.proc.send_signal(signal.SIGTERM)
    job.wait(timeout=30)


def test_health_and_metrics_json_have_the_seed_shape(running_job):
    job, port, _ = running_job
    status, content_type, body = get(port, "/health")
    health = json.loads(body)
    assert status == 200 and content_type.startswith("application/json")
    assert health["status"] == "healthy" and health["version"] == __version__
    assert isinstance(health["uptime_seconds"], int) and health["uptime_seconds"] >= 0
    assert datetime.fromisoformat(health["timestamp"]).tzinfo is not None
    assert health["breaker"] == "closed" and health["outbox_depth"] == 0 and health["run_id"]

    data = json.loads(get(port, "/metrics.json")[2])
    assert set(data) == {"metrics", "health_status"} and data["health_status"] == "healthy"
    m = data["metrics"]
    assert set(m) == {"total_attempts", "successful_attempts", "failed_attempts", "average_time_ms",
                      "attempts_per_second", "receipts_per_second"}
    assert m["successful_attempts"] >= 5 and m["failed_attempts"] == 0
    assert m["total_attempts"] == m["successful_attempts"]
    assert m["average_time_ms"] > 0 and m["attempts_per_second"] > 0 and m["receipts_per_second"] > 0


def test_metrics_endpoint_passes_promtool_and_uses_the_agreed_names(running_job, tmp_path):
    _, port, _ = running_job
    status, content_type, body = get(port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    promtool_check(body, tmp_path)
    found = families(body.decode())
    missing = PROMETHEUS_NAMES - set(found)
    # the rate limiter histogram appears once a rate-limited sender reports a wait
    assert not missing, f"missing metric families: {missing}"
    assert found["tops_job_attempts_total"] == "counter"
    assert found["tops_job_product_duration_seconds"] == "histogram"
    assert found["tops_job_breaker_state"] == "gauge"
    assert re.search(r'^tops_job_attempts_total\{error_class="none",outcome="ok"\} \d+', body.decode(), re.M)
    assert "otel_scope" not in body.decode()


def test_unknown_path_is_404(running_job):
    import urllib.error

    _, port, _ = running_job
    with pytest.raises(urllib.error.HTTPError) as error:
        get(port, "/nope")
    assert error.value.code == 404


def test_textfile_is_written_at_the_end_and_passes_promtool(job_env, start_job, tmp_path):
    textfile = tmp_path / "node_exporter" / "tops-job.prom"
    job = start_job(["run", "--size", "64", "--attempts", "3"],
                    {**job_env, "TOPS_JOB_METRICS_TEXTFILE": str(textfile)})
    assert job.wait() == 0, job.stderr()
    text = textfile.read_bytes()
    promtool_check(text, tmp_path)
    found = families(text.decode())
    assert PROMETHEUS_NAMES <= set(found)
    assert re.search(r'^tops_job_attempts_total\{error_class="none",outcome="ok"\} 3\.0$', text.decode(), re.M)
    assert re.search(r'^tops_job_receipts_total\{outcome="accepted"\} 3\.0$', text.decode(), re.M)
    assert oct(textfile.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in textfile.parent.iterdir()] == ["tops-job.prom"], "no temp file left behind"


class _Charts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, int] = {}
        self.shapes: dict[str, int] = {}
        self._current: str | None = None
        self.refresh = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "svg" and "chart" in (a.get("class") or ""):
            self._current = a["id"]
            self.charts[a["id"]] = int(a.get("data-points", 0))
        elif self._current and tag in ("polyline", "rect", "circle"):
            self.shapes[self._current] = self.shapes.get(self._current, 0) + 1
        elif tag == "meta" and (a.get("http-equiv") or "").lower() == "refresh":
            self.refresh = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._current = None


def test_dashboard_renders_charts_with_data_in_chromium(running_job, tmp_path):
    chromium = require_tool("chromium", "apt-get install chromium")
    _, port, _ = running_job
    url = f"http://127.0.0.1:{port}/"
    profile = tmp_path / "chromium-profile"
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=90)
    assert dom.returncode == 0 and "<svg" in dom.stdout, dom.stderr[-2000:]
    parsed = _Charts()
    parsed.feed(dom.stdout)
    assert set(parsed.charts) == {"throughput", "product-time", "outcomes"}
    assert all(points > 0 for points in parsed.charts.values()), parsed.charts
    assert all(parsed.shapes.get(chart, 0) > 0 for chart in parsed.charts), parsed.shapes
    assert parsed.refresh, "the page refreshes itself"
    assert "http://" not in dom.stdout.replace(url, "").replace("http://www.w3.org/2000/svg", ""), \
        "no external resources"

    shot = tmp_path / "dashboard.png"
    result = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,900",
                             f"--screenshot={shot}", url], capture_output=True, timeout=90)
    assert result.returncode == 0 and shot.exists() and shot.stat().st_size > 10_000, result.stderr[-2000:]
