"""`tops-job run` speaking tops-receipt/2 to the reference aggregator (the default): commit,
challenge, open through the v2 outbox, and what survives kill -9 and a silent aggregator."""

from __future__ import annotations

import json
import random
import subprocess
import time

import pytest
import requests

from tests.support.peers import CLI, Aggregator, FaultProxy, signed_digests, worker_env

SIZE = "96,96,256"


@pytest.fixture
def agg(tmp_path):
    server = Aggregator(tmp_path / "agg.sqlite3", accept="v2")
    yield server
    server.stop()


def _env(tmp_path):
    env = worker_env(tmp_path)
    env.pop("TOPS_JOB_PROTOCOL")  # the default: v2
    return env


def _command(tmp_path, url, *args, name="run"):
    return [*CLI, "run", "--size", SIZE, "--receipts-out", str(tmp_path / f"{name}.jsonl"),
            "--summary", str(tmp_path / f"{name}.summary.json"), "--aggregator-url", url, *args]


def _run(tmp_path, url, *args, name="run"):
    return subprocess.run(_command(tmp_path, url, *args, name=name), env=_env(tmp_path), capture_output=True,
                          text=True, timeout=120)


def _pending(outbox):
    return sorted(p.name[:64] for p in (outbox / "v2").glob("*.commit.json"))


def test_default_run_commits_opens_and_is_accepted_once_each(tmp_path, agg):
    result = _run(tmp_path, agg.base, "--attempts", "6")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run.summary.json").read_text())
    assert summary["receipts"]["accepted"] == 6 and summary["delivery"]["protocol"] == "v2"
    report = requests.get(f"{agg.base}/v2/runs/{summary['run_id']}", timeout=10).json()
    assert report["accepted"] == 6 and report["awaiting_openings"] == 0 and report["rate_floor_ops_per_s"] > 0
    signed = signed_digests(tmp_path / "run.jsonl")
    assert sorted(signed) == sorted(agg.v2_accepted())
    assert _pending(tmp_path / "outbox") == []


@pytest.mark.parametrize("lane", ["poll", "thread"])
def test_exchanges_over_the_inline_cost_are_accepted_in_either_costly_lane(tmp_path, lane):
    """Every exchange over --inline-cost 1, so each runs in the costly lane: on the poll thread
    in its own turn, or on a thread; two workers sharing the port."""
    server = Aggregator(tmp_path / "agg.sqlite3", "--workers", "2", "--inline-cost", "1", "--costly-lane", lane,
                        accept="v2")
    try:
        result = _run(tmp_path, server.base, "--attempts", "6")
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads((tmp_path / "run.summary.json").read_text())
        assert summary["receipts"]["accepted"] == 6
        assert sorted(signed_digests(tmp_path / "run.jsonl")) == sorted(server.v2_accepted())
    finally:
        server.stop()


def test_commitments_whose_challenge_never_comes_back_stay_pending_and_say_so(tmp_path, agg):
    proxy = FaultProxy(agg.base, default="503")  # run challenges pass, every exchange fails
    try:
        result = _run(tmp_path, proxy.url.rsplit("/", 1)[0], "--attempts", "3", "--drain-timeout", "1.5")
    finally:
        proxy.close()
    assert result.returncode == 3, result.stderr[-3000:]  # PENDING: nothing lost, nothing delivered
    summary = json.loads((tmp_path / "run.summary.json").read_text())
    assert summary["delivery"]["left_because"] == {"awaiting_challenge": 3, "awaiting_verdict": 0}
    assert "awaiting a challenge" in result.stderr
    assert len(_pending(tmp_path / "outbox")) == 3 and agg.v2_accepted() == []
    again = _run(tmp_path, agg.base, "--attempts", "1", name="again")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(agg.v2_accepted()) == sorted(signed_digests(tmp_path / "run.jsonl") + signed_digests(tmp_path / "again.jsonl"))
    assert _pending(tmp_path / "outbox") == []


def test_kill_9_anywhere_then_every_attempt_is_accepted_exactly_once(tmp_path, agg):
    rng = random.Random(1101)
    proxy = FaultProxy(agg.base, default="latency", latency_s=0.05)
    signed: set[str] = set()
    try:
        for trial in range(6):
            url = proxy.url.rsplit("/", 1)[0] if trial % 2 else agg.base
            proc = subprocess.Popen(_command(tmp_path, url, "--attempts", "200", name=f"kill{trial}"),
                                    env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.8, 2.5))
            proc.kill()
            proc.wait(10)
            signed.update(signed_digests(tmp_path / f"kill{trial}.jsonl"))
    finally:
        proxy.close()
    final = _run(tmp_path, agg.base, "--attempts", "1", name="final")
    assert final.returncode == 0, final.stderr[-3000:]
    signed.update(signed_digests(tmp_path / "final.jsonl"))
    accepted = agg.v2_accepted()
    assert len(accepted) == len(set(accepted))  # never counted twice
    assert signed <= set(accepted)  # never lost
    assert len(set(accepted) - signed) <= 6  # at most one per kill was durable but not yet written out
    assert _pending(tmp_path / "outbox") == []
    assert not list((tmp_path / "outbox" / "v2").glob(".tmp-*"))


def test_no_run_challenge_at_start_ends_the_run_pending_after_the_wait(tmp_path):
    """An aggregator that cannot be reached when the run starts: a v2 commitment needs its run
    challenge, so the worker waits (bounded by --drain-timeout), then exits 3 with nothing
    computed and nothing lost."""
    began = time.monotonic()
    result = _run(tmp_path, "http://127.0.0.1:9/verify", "--attempts", "3", "--drain-timeout", "2")
    assert result.returncode == 3, result.stderr[-3000:]
    assert time.monotonic() - began < 60
    assert "no run challenge" in result.stderr
    assert not list((tmp_path / "outbox").rglob("*.commit.json"))
