"""The aggregator's alerts and Grafana dashboard (infra/observability), checked by promtool
against the names a real aggregator serves at /metrics.

Tool: `promtool` (Debian package `prometheus`).
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import requests
import yaml

from tests.support import INFRA, require_tool
from tests.support.load import JSON, make_receipts
from tests.support.peers import Aggregator

OBS = INFRA / "observability"
RULES = OBS / "rules" / "tops-job-aggregator-alerts.yml"
DASHBOARD = OBS / "grafana" / "tops-job-aggregator.json"


def promtool(*args: str, cwd=OBS) -> subprocess.CompletedProcess:
    tool = require_tool("promtool", "apt-get install prometheus")
    return subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def names_in(expr: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", n) if n.endswith(("_bucket", "_sum", "_count")) and "duration" in n else n
            for n in re.findall(r"\btops_job_aggregator_[a-z0-9_]+", expr)}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> set[str]:
    """Metric families a running aggregator exposes after some traffic."""
    agg = Aggregator(tmp_path_factory.mktemp("obs") / "agg.sqlite3")
    try:
        (receipt,) = make_receipts(1, run_id="obs")
        requests.post(agg.url, data=json.dumps(receipt), headers=JSON, timeout=30)
        requests.get(f"{agg.base}/challenge", params={"did": "did:x:obs"}, timeout=10)
        text = requests.get(f"{agg.base}/metrics", timeout=10).text
    finally:
        agg.stop()
    families = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            families.add(name + "_total" if kind == "counter" and not name.endswith("_total") else name)
    return families


def test_rules_check_and_unit_tests():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    result = promtool("test", "rules", "tops-job-aggregator-alerts.test.yml", cwd=OBS / "rules")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_every_alert_fires_in_a_test_and_watches_served_metrics(served):
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    tests = yaml.safe_load((OBS / "rules" / "tops-job-aggregator-alerts.test.yml").read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]}
    quiet = {case["alertname"] for t in tests for case in t["alert_rule_test"] if not case["exp_alerts"]}
    assert fired == quiet == {rule["alert"] for rule in rules}
    for rule in rules:
        assert names_in(rule["expr"]) and names_in(rule["expr"]) <= served, rule["alert"]
    for config in ("prometheus.yml", "prometheus-kubernetes.yml"):
        assert "rules/tops-job-aggregator-alerts.yml" in yaml.safe_load((OBS / config).read_text())["rule_files"]


def test_dashboard_parses_and_shows_every_served_metric(served, tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]
    used: set[str] = set()
    for title, expr in exprs:
        names = names_in(expr)
        assert names and names <= served, f"{title}: {names - served}"
        used |= names
    assert used == served, f"not on the dashboard: {served - used}"
    rules = [{"record": f"dashboard:expr:{i}", "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*")}
             for i, (_, expr) in enumerate(exprs)]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
