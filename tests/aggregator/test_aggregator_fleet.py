"""The fleet view (/dids, /dids/<did>, the /fleet page in headless Chromium) and the
aggregator's own /metrics, checked by promtool."""

from __future__ import annotations

import json
import subprocess
from html.parser import HTMLParser
from urllib.parse import quote

import pytest
import requests

from tests.support import TEST_KEY, require_tool
from tests.support.load import JSON, make_receipts
from tests.support.net import wait_for
from tests.support.peers import Aggregator

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
OTHER = "did:peaq:0xOTHER"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    agg = Aggregator(tmp_path_factory.mktemp("fleet") / "agg.sqlite3")
    issued = requests.get(f"{agg.base}/challenge", params={"did": TEST_KEY["did"]}, timeout=10).json()
    mine = make_receipts(3, run_id="run-a", challenge=bytes.fromhex(issued["challenge"]))
    theirs = make_receipts(2, run_id="run-b", did=OTHER)
    for receipt in mine + theirs:
        assert requests.post(agg.url, data=json.dumps(receipt), headers=JSON, timeout=30).status_code == 200
    forged = dict(mine[0], sig=mine[1]["sig"])  # a known did, another receipt's signature
    assert requests.post(agg.url, data=json.dumps(forged), headers=JSON, timeout=30).status_code == 422
    stranger = dict(theirs[0], did="did:peaq:0xSTRANGER")  # unknown dids' rejections are not stored
    assert requests.post(agg.url, data=json.dumps(stranger), headers=JSON, timeout=30).status_code == 422
    yield agg, mine, theirs
    agg.stop()


def test_dids_lists_each_device_with_its_work_and_rejections(fleet):
    agg, mine, theirs = fleet
    # Rejection counts are written in the background, at most a second late.
    body = wait_for(lambda: (lambda b: b if any(d["rejections"] for d in b["dids"]) else None)(
        requests.get(f"{agg.base}/dids", timeout=10).json()), 10, "the rejection to be counted", interval=0.2)
    by_did = {d["did"]: d for d in body["dids"]}
    assert set(by_did) == {TEST_KEY["did"], OTHER}
    me = by_did[TEST_KEY["did"]]
    assert me["receipts"] == 3 and me["ops_total"] == sum(r["ops"] for r in mine) and me["runs"] == 1
    assert me["rate_floor_ops_per_s"] > 0 and me["last_seen_ms"] >= me["first_accepted_ms"]
    assert me["rejections"] and sum(me["rejections"].values()) == 1
    assert by_did[OTHER]["rate_floor_ops_per_s"] is None and by_did[OTHER]["rejections"] == {}
    assert body["receipts"] == 5 and body["next"] is None
    first = requests.get(f"{agg.base}/dids", params={"limit": 1}, timeout=10).json()
    second = requests.get(f"{agg.base}/dids", params={"limit": 1, "after": first["next"]}, timeout=10).json()
    assert [d["did"] for d in first["dids"] + second["dids"]] == sorted(by_did) and second["next"] is None
    assert requests.get(f"{agg.base}/dids", params={"limit": "x"}, timeout=10).status_code == 400


def test_one_did_shows_its_runs(fleet):
    agg, mine, _ = fleet
    report = requests.get(f"{agg.base}/dids/{quote(TEST_KEY['did'], safe='')}", timeout=10).json()
    assert [run["run_id"] for run in report["runs"]] == ["run-a"]
    (challenge,) = report["runs"][0]["challenges"]
    assert challenge["receipts"] == 3 and challenge["rate_floor_ops_per_s"] == report["rate_floor_ops_per_s"]
    assert requests.get(f"{agg.base}/dids/did:peaq:nobody", timeout=10).status_code == 404
    assert requests.post(f"{agg.base}/dids", timeout=10).status_code == 405


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows = 0
        self.bars = 0
        self.refresh = False
        self._in_chart = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and a.get("class") == "did":
            self.rows += 1
        elif tag == "svg" and a.get("id") == "ops-by-did":
            self._in_chart = True
        elif tag == "rect" and self._in_chart:
            self.bars += 1
        elif tag == "meta" and (a.get("http-equiv") or "").lower() == "refresh":
            self.refresh = True

    def handle_endtag(self, tag):
        if tag == "svg":
            self._in_chart = False


def test_fleet_page_draws_the_fleet_in_chromium(fleet, tmp_path):
    chromium = require_tool("chromium", "apt-get install chromium")
    agg, _, _ = fleet
    url = f"{agg.base}/fleet"
    profile = tmp_path / "chromium-profile"
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=90)
    assert dom.returncode == 0 and "<svg" in dom.stdout, dom.stderr[-2000:]
    page = _Page()
    page.feed(dom.stdout)
    assert page.rows == 2 and page.bars == 2 and page.refresh
    assert TEST_KEY["did"] in dom.stdout and OTHER in dom.stdout
    shot = tmp_path / "fleet.png"
    result = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1280,800",
                             f"--screenshot={shot}", url], capture_output=True, timeout=90)
    assert result.returncode == 0 and shot.exists() and shot.stat().st_size > 5_000, result.stderr[-2000:]


def test_metrics_count_verdicts_and_pass_promtool(fleet, tmp_path):
    agg, _, _ = fleet
    text = requests.get(f"{agg.base}/metrics", timeout=10).text
    assert 'tops_job_aggregator_receipts_total{reason="none",verdict="accepted"} 5.0' in text
    assert 'verdict="rejected"' in text and "tops_job_aggregator_challenges_issued_total 1.0" in text
    assert float(text.split('tops_job_aggregator_verify_cpu_seconds_total{protocol="v1"} ')[1].split()[0]) > 0
    for name in ("tops_job_aggregator_verify_duration_seconds_bucket", "tops_job_aggregator_db_duration_seconds_bucket",
                 "tops_job_aggregator_connections ", "tops_job_aggregator_challenges_expired_total"):
        assert name in text, name
    promtool = require_tool("promtool", "apt-get install prometheus")
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
