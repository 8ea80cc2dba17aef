"""Observability stack (infra/observability), checked by Prometheus' own tool.

- `promtool check config` on prometheus.yml (and prometheus-kubernetes.yml where the
  promtool build has Kubernetes discovery; Debian's does not, and says so),
- `promtool check rules` and `promtool test rules` (alert unit tests: each alert fires for
  a bad instance, not for a healthy one, and not before its `for:`),
- the Grafana dashboard: valid JSON, every PromQL expression parses (promtool checks it
  as a recording rule) and names only the job's metrics,
- the names are the job's own: a real `tops-job run` against the reference aggregator on a
  loopback port writes its metrics with --metrics-textfile, and every name the alerts and
  the dashboard use appears there (and `promtool check metrics` accepts the file),
- the OpenTelemetry Collector config: no offline validator is installable here (the
  collector is a Go binary outside the registries), so the test checks its structure:
  every pipeline names defined components, OTLP in, Prometheus and OTLP out.

Tool: `promtool` (Debian package `prometheus`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import yaml

from tests.support import INFRA, REPO_ROOT, require_tool
from tests.support.net import free_port, http_get, wait_for

OBS = INFRA / "observability"
RULES = OBS / "rules" / "tops-job-alerts.yml"

# The Prometheus names of tops-job's instruments (health server /metrics, --metrics-textfile
# and the collector's exporter). Histograms add _bucket, _sum and _count.
METRICS = {
    "tops_job_attempts_total", "tops_job_receipts_total",
    "tops_job_product_duration_seconds", "tops_job_attempt_duration_seconds",
    "tops_job_submit_latency_seconds", "tops_job_rate_limiter_wait_seconds",
    "tops_job_ops_per_second", "tops_job_outbox_depth", "tops_job_breaker_state",
    "tops_job_last_success_timestamp_seconds",
    "tops_job_device_check_failures_total", "tops_job_device_health_changes_total",
}
HISTOGRAMS = {m for m in METRICS if m.endswith("_seconds") and "timestamp" not in m}


def promtool(*args: str, cwd=OBS) -> subprocess.CompletedProcess:
    tool = require_tool("promtool", "apt-get install prometheus")
    return subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\btops_job_[a-z0-9_]+", expr))
    out = set()
    for name in names:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        out.add(base if base in HISTOGRAMS else name)
    return out


def test_prometheus_config():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_prometheus_kubernetes_config(tmp_path):
    """Checked whole where promtool has Kubernetes discovery; Debian's build lacks it, so
    there the discovery block is checked by shape and everything else (relabel rules and
    their regexes, rule files, alerting) by promtool, with static targets in its place."""
    source = OBS / "prometheus-kubernetes.yml"
    result = promtool("check", "config", source.name)
    output = result.stdout + result.stderr
    if "field kubernetes_sd_configs not found" not in output:
        assert result.returncode == 0, output
        return
    config = yaml.safe_load(source.read_text())
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    keep = {tuple(rule["source_labels"]): rule for rule in job["relabel_configs"] if rule.get("action") == "keep"}
    assert keep[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)]["regex"] == "true"
    job["static_configs"] = [{"targets": ["127.0.0.1:8082"]}]
    del job["kubernetes_sd_configs"]
    (tmp_path / "rules").symlink_to(OBS / "rules")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_check():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_unit_tests():
    result = promtool("test", "rules", "tops-job-alerts.test.yml", cwd=OBS / "rules")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alerts_cover_the_failure_modes():
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    by_name = {rule["alert"]: rule for rule in rules}
    tests = yaml.safe_load((OBS / "rules" / "tops-job-alerts.test.yml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]}
    assert tested == set(by_name), "every alert has a unit test in which it fires"
    needed = {  # failure mode -> the metric its alert must watch
        "TopsJobNoReceiptsAccepted": "tops_job_receipts_total",
        "TopsJobBreakerOpen": "tops_job_breaker_state",
        "TopsJobOutboxGrowing": "tops_job_outbox_depth",
        "TopsJobThroughputDrop": "tops_job_ops_per_second",
        "TopsJobHighRejectionRate": "tops_job_receipts_total",
        "TopsJobDeviceUntrustworthy": "tops_job_device_check_failures_total",
        "TopsJobDeviceMemoryErrors": "tops_job_device_health_changes_total",
    }
    for alert, metric in needed.items():
        assert metric in metric_names(by_name[alert]["expr"]), alert
    for rule in rules:
        assert metric_names(rule["expr"]) <= METRICS, rule["alert"]


def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads((OBS / "grafana" / "tops-job.json").read_text())
    return [(panel["title"], target["expr"])
            for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_names_only_job_metrics():
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    used = set()
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"{title}: no tops_job metric"
        assert names <= METRICS, f"{title}: unknown metric {names - METRICS}"
        used |= names
    assert used == METRICS, f"not on the dashboard: {METRICS - used}"


def test_dashboard_promql_parses(tmp_path):
    # Grafana's variables replaced by what they expand to; promtool parses each expression.
    rules = [{"record": f"dashboard:expr:{i}",
              "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*")}
             for i, (_, expr) in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_collector_config_structure():
    config = yaml.safe_load((OBS / "otel-collector.yaml").read_text())
    service = config["service"]
    for name, pipeline in service["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], f"{name}: {kind[:-1]} {component} undefined"
        assert pipeline["processors"][0] == "memory_limiter", name
    for extension in service.get("extensions", []):
        assert extension in config["extensions"]
    metrics = service["pipelines"]["metrics"]
    assert "otlp" in metrics["receivers"]
    assert {"prometheus", "otlphttp"} <= set(metrics["exporters"])
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    # Prometheus scrapes what the collector exposes and what the job serves.
    exporter_port = config["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    scrape = yaml.safe_load((OBS / "prometheus.yml").read_text())["scrape_configs"]
    targets = {t for job in scrape for sc in job.get("static_configs", []) for t in sc["targets"]}
    assert any(t.endswith(":" + exporter_port) for t in targets)
    assert any(t.endswith(":8082") for t in targets)
    assert "EXPOSE 8082" in (REPO_ROOT / "Dockerfile").read_text()


def test_metric_names_are_what_the_job_exports(tmp_path):
    tops_job = require_tool("tops-job", "pip install .")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOPS_JOB_", "OTEL_"))}
    env.update(TOPS_JOB_DATA_DIR=str(tmp_path / "data"), TOPS_JOB_CACHE_DIR=str(tmp_path / "cache"),
               TOPS_JOB_CONFIG_DIR=str(tmp_path / "config"), AGGREGATOR_URL=f"http://127.0.0.1:{port}/verify")
    aggregator = subprocess.Popen(
        [tops_job, "aggregator", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--db", str(tmp_path / "aggregator.sqlite")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: aggregator.poll() is not None or http_get(f"http://127.0.0.1:{port}/health")[0] == 200,
                 60, "the aggregator")
        assert aggregator.poll() is None, aggregator.stderr.read()
        textfile = tmp_path / "tops-job.prom"
        result = subprocess.run(
            [tops_job, "run", "--attempts", "3", "--size", "64", "--backend", "numpy",
             "--metrics-textfile", str(textfile)],
            env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    finally:
        aggregator.terminate()
        aggregator.wait(timeout=30)
    text = textfile.read_text()
    exported = metric_names("\n".join(re.findall(r"^tops_job_[a-z0-9_]+", text, re.M)))
    assert METRICS <= exported, f"used by alerts/dashboard but not exported: {METRICS - exported}"
    assert re.search(r'^tops_job_receipts_total\{[^}]*outcome="accepted"', text, re.M)
    assert re.search(r'^tops_job_attempts_total\{(?=[^}]*error_class=)(?=[^}]*outcome=)', text, re.M)
    promtool_bin = require_tool("promtool", "apt-get install prometheus")
    check = subprocess.run([promtool_bin, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
