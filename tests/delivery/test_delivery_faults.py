"""`tops-job run` against the real aggregator behind a fault-injecting proxy: every receipt is
accepted exactly once (counted in SQLite) or is still in the outbox."""

from __future__ import annotations

import json
import os
import socket

import pytest
import requests

from tests.support.peers import Aggregator, outbox_digests, run_worker, signed_digests, worker_env

N = 6


def _summary(tmp_path, name="run"):
    return json.loads((tmp_path / f"{name}.summary.json").read_text())


@pytest.mark.parametrize("fault", ["500", "502", "503", "429", "429-date", "hang", "reset", "slow", "lost"])
def test_run_delivers_exactly_once_through_faults(tmp_path, aggregator, proxy_factory, fault):
    proxy = proxy_factory(hang_s=1.5)
    proxy.faults.extend([fault] * 3)  # the first three sends meet the fault, then it passes
    result = run_worker(tmp_path, proxy.url, "--attempts", str(N))
    assert result.returncode == 0, result.stderr[-3000:]
    signed = signed_digests(tmp_path / "run.jsonl")
    stored = aggregator.digests()
    assert len(signed) == N and sorted(stored) == sorted(signed)  # each once: digest is the key
    assert outbox_digests(tmp_path / "outbox") == []
    summary = _summary(tmp_path)
    assert summary["receipts"]["accepted"] + summary["receipts"]["duplicate"] == N
    assert proxy.seen[fault] == 3
    if fault == "lost":  # the aggregator counted it, the answer was lost, the retry is a duplicate
        assert summary["receipts"]["duplicate"] >= 1


def test_dead_aggregator_leaves_everything_in_the_outbox_then_next_run_drains(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/verify"
    result = run_worker(tmp_path, dead, "--attempts", "4", "--drain-timeout", "1")
    assert result.returncode == 3, result.stderr[-3000:]  # PENDING: nothing lost
    first = signed_digests(tmp_path / "run.jsonl")
    assert sorted(outbox_digests(tmp_path / "outbox")) == sorted(first)
    summary = _summary(tmp_path)
    assert summary["receipts"]["pending"] == 4 and summary["exit_reason"] == "PENDING"
    assert summary["delivery"]["breaker"] in ("open", "half_open", "closed")
    assert summary["errors_by_class"]["network"] >= 4  # every failed send, classed as the Rust worker did
    assert "left in" in result.stderr

    server = Aggregator(tmp_path / "agg.sqlite3")
    try:
        again = run_worker(tmp_path, server.url, "--attempts", "2", name="second")
        assert again.returncode == 0, again.stderr[-3000:]
        second = signed_digests(tmp_path / "second.jsonl")
        assert sorted(server.digests()) == sorted(first + second)
        assert outbox_digests(tmp_path / "outbox") == []
        assert _summary(tmp_path, "second")["delivery"]["earlier_runs"] == 4
    finally:
        server.stop()


def test_final_answer_moves_receipt_to_rejected_and_exits_4(tmp_path, aggregator, proxy_factory):
    proxy = proxy_factory()
    proxy.faults.append("422")
    result = run_worker(tmp_path, proxy.url, "--attempts", "3")
    assert result.returncode == 4, result.stderr[-3000:]
    rejected = tmp_path / "outbox" / "rejected"
    answers = list(rejected.glob("*.answer.json"))
    assert len(answers) == 1 and json.loads(answers[0].read_text())["status"] == 422
    assert len(aggregator.digests()) == 2 and proxy.seen["422"] == 1  # not retried
    assert _summary(tmp_path)["errors_by_class"] == {"validation": 1}


def test_breaker_opens_and_budget_stops_hammering(tmp_path, aggregator, proxy_factory):
    proxy = proxy_factory(default="503")
    env = worker_env(tmp_path, TOPS_JOB_BREAKER_THRESHOLD="2", TOPS_JOB_BREAKER_COOLDOWN="0.2", MAX_RETRIES="5",
                     TOPS_JOB_RETRY_BUDGET="4", TOPS_JOB_SEND_CONCURRENCY="1")
    result = run_worker(tmp_path, proxy.url, "--attempts", "8", "--drain-timeout", "5", env=env)
    assert result.returncode == 3, result.stderr[-3000:]
    summary = _summary(tmp_path)
    assert summary["delivery"]["breaker_opened"] >= 1
    # 8 first sends, retries capped by the run's budget (4 + a fifth of first sends), not 8 × 6
    assert sum(proxy.seen.values()) <= 8 + 4 + 2
    assert summary["delivery"]["retries_refused"] >= 1
    assert sorted(outbox_digests(tmp_path / "outbox")) == sorted(signed_digests(tmp_path / "run.jsonl"))


def test_challenge_is_used_and_gives_a_rate_floor(tmp_path, aggregator):
    result = run_worker(tmp_path, aggregator.url, "--attempts", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    receipts = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert len({r["challenge"] for r in receipts}) == 1
    report = requests.get(f"{aggregator.base}/runs/{receipts[0]['run_id']}", timeout=5).json()
    assert report["receipts"] == 3 and report["ops_total"] == sum(r["ops"] for r in receipts)
    assert report["rate_floor_ops_per_s"] > 0

    plain = run_worker(tmp_path, aggregator.url, "--attempts", "2", "--no-challenge", name="plain")
    assert plain.returncode == 0
    assert all("challenge" not in json.loads(line) for line in (tmp_path / "plain.jsonl").read_text().splitlines())


def test_aggregator_without_challenge_means_random_nonces_with_a_warning(tmp_path, aggregator, proxy_factory):
    proxy = proxy_factory(challenge_404=True)
    result = run_worker(tmp_path, proxy.url, "--attempts", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "offers no run challenge" in result.stderr
    assert all("challenge" not in json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines())


def test_corrupt_outbox_entry_is_quarantined_not_a_crash(tmp_path, aggregator):
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    (outbox / ("b" * 64 + ".json")).write_text("garbage")
    result = run_worker(tmp_path, aggregator.url, "--attempts", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "quarantined" in result.stderr
    assert os.listdir(outbox / "quarantine") == ["b" * 64 + ".json"]
    assert len(aggregator.digests()) == 2
