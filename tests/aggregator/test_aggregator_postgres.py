"""Aggregator replicas on one real PostgreSQL: the guarantees of one SQLite aggregator hold
across processes — a receipt is stored exactly once, a replayed nonce is refused by any
replica, a challenge issued by one is honoured by another — and the aggregator creates and
migrates its own schema.

Needs PostgreSQL (Debian package `postgresql`) and psycopg 3 (`pip install 'psycopg[binary]'`).
"""

from __future__ import annotations

import json
import threading

import pytest
import requests

from tests.support.load import JSON, make_receipts, post_load
from tests.support.peers import Aggregator
from tops_job.aggregator.migrations import LATEST
from tops_job.spec.canonical import digest_of, receipt_line


def _query(dsn, sql, *args):
    import psycopg

    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, args or None).fetchall()


@pytest.fixture
def replicas(postgres, tmp_path):
    dsn = postgres.new_database()
    started: list = [None, None]

    def start(index):  # both at once: they race to create the schema
        started[index] = Aggregator(dsn)  # type: ignore[arg-type]

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(started), "a replica did not start"
    yield dsn, started
    for replica in started:
        replica.stop()


def test_schema_is_created_and_versioned_by_the_aggregator(replicas):
    dsn, _ = replicas
    versions = [row[0] for row in _query(dsn, "SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == list(range(1, LATEST + 1))  # two replicas started together: each migration once


def test_one_receipt_posted_to_both_replicas_at_once_is_accepted_once(replicas):
    dsn, (a, b) = replicas
    receipts = make_receipts(20, run_id="race")
    for receipt in receipts:
        body = receipt_line(receipt)
        answers: list = [None, None]
        barrier = threading.Barrier(2)

        def send(index, base, body=body, answers=answers, barrier=barrier):
            barrier.wait()
            answers[index] = requests.post(f"{base}/verify", data=body, headers=JSON, timeout=30)

        threads = [threading.Thread(target=send, args=(i, r.base)) for i, r in enumerate((a, b))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [x.status_code for x in answers] == [200, 200], [x.text for x in answers]
        assert sorted(x.json()["duplicate"] for x in answers) == [False, True]
    stored = _query(dsn, "SELECT digest FROM receipts WHERE run_id = 'race'")
    assert sorted(row[0] for row in stored) == sorted(digest_of(r).hex() for r in receipts)


def test_replayed_nonce_is_refused_by_the_other_replica(replicas):
    from tests.aggregator.test_aggregator_api import _resign

    _, (a, b) = replicas
    (receipt,) = make_receipts(1, run_id="replay")
    assert requests.post(f"{a.base}/verify", data=json.dumps(receipt), headers=JSON, timeout=30).status_code == 200
    replay = _resign(receipt, elapsed_ns=receipt["elapsed_ns"] + 1)  # same (did, nonce), another digest
    answer = requests.post(f"{b.base}/verify", data=json.dumps(replay), headers=JSON, timeout=30)
    assert answer.status_code == 409 and answer.json()["error"] == "replayed_nonce"


def test_challenge_issued_by_one_replica_is_honoured_by_the_other(replicas):
    _, (a, b) = replicas
    from tests.support import TEST_KEY

    issued = requests.get(f"{a.base}/challenge", params={"did": TEST_KEY["did"]}, timeout=10).json()
    receipts = make_receipts(3, run_id="challenged", challenge=bytes.fromhex(issued["challenge"]))
    for receipt in receipts:
        answer = requests.post(f"{b.base}/verify", data=json.dumps(receipt), headers=JSON, timeout=30)
        assert answer.status_code == 200, answer.text
    report = requests.get(f"{a.base}/runs/challenged", timeout=10).json()
    assert report["receipts"] == 3 and report["challenge_issued_ms"] == issued["issued_ms"]
    assert report["rate_floor_ops_per_s"] > 0  # same host: the step-free clock is shared by both replicas


def test_load_against_two_replicas_stores_every_receipt_exactly_once(replicas, capsys):
    dsn, (a, b) = replicas
    receipts = make_receipts(300, run_id="load")
    result = post_load([a.url, b.url], receipts, copies=2, clients=8, deadline_s=120)
    assert sum(result.statuses.values()) == 600, result.statuses
    assert set(result.statuses) == {200}, result.statuses  # no 5xx, nothing refused
    firsts = [digest for digest, _, body in result.answers if body.get("duplicate") is False]
    assert sorted(firsts) == sorted(digest_of(r).hex() for r in receipts)  # each accepted once, by one replica
    stored = _query(dsn, "SELECT digest FROM receipts WHERE run_id = 'load'")
    assert len(stored) == len({row[0] for row in stored}) == 300
    with capsys.disabled():
        print(f"\n[pg load] 600 posts of 300 receipts over 2 replicas, 8 clients: {result.wall_s:.1f} s, "
              f"p50 {result.percentile(0.5) * 1000:.1f} ms, p99 {result.percentile(0.99) * 1000:.1f} ms")


def test_a_v2_worker_run_on_one_replica_is_reported_by_the_other(replicas, tmp_path):
    """tops-receipt/2 state (run challenges, commitments, verdicts) lives in the shared
    database too: a run committed and opened through replica A is the same run at B."""
    import subprocess

    from tests.support.peers import CLI, worker_env

    dsn, (a, b) = replicas
    env = worker_env(tmp_path, TOPS_JOB_RUN_ID="pg-v2-run")
    env.pop("TOPS_JOB_PROTOCOL", None)  # the default: v2
    run = subprocess.run([*CLI, "run", "--size", "96,96,256", "--attempts", "3", "--aggregator-url", a.url,
                          "--summary", str(tmp_path / "s.json")], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    accepted = _query(dsn, "SELECT COUNT(*) FROM v2_commitments WHERE state = 'accepted' AND run_id = %s", "pg-v2-run")
    assert accepted == [(3,)]
    report = requests.get(b.base + "/v2/runs/pg-v2-run", timeout=10).json()
    assert report["accepted"] == 3 and report["ops_total"] == 3 * 2 * 96 * 96 * 256
