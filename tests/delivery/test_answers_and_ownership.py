"""What counts as delivered, and who sends what: a stub answering `200 {"ok": true}` must not
empty the outbox, and runs sharing one outbox never send the same receipt (per-entry claims)."""

from __future__ import annotations

import json
import subprocess
import time

from tests.support import CLI
from tests.support.peers import (
    CannedServer,
    fill_outbox,
    outbox_digests,
    run_worker,
    signed_digests,
    signed_receipts,
    start_worker,
    worker_env,
)
from tops_job.delivery.outbox import Outbox


def test_a_stub_answering_200_ok_keeps_every_receipt(tmp_path):
    """Anything on the aggregator URL that answers 200 {"ok": true} (a stub, a webhook sink,
    a misrouted ingress) used to count every receipt accepted and delete it: stored nowhere,
    exit 0. Now each stays in the outbox, the summary says why, and the exit is PENDING."""
    stub = CannedServer(200, b'{"ok": true}')
    try:
        result = run_worker(tmp_path, stub.url, "--attempts", "5", "--no-challenge")
    finally:
        stub.close()
    assert result.returncode == 3, result.stderr[-3000:]
    signed = set(signed_digests(tmp_path / "run.jsonl"))
    assert len(signed) == 5 and set(outbox_digests(tmp_path / "outbox")) == signed
    summary = json.loads((tmp_path / "run.summary.json").read_text())
    assert summary["receipts"]["accepted"] == 0 and summary["receipts"]["pending"] == 5
    assert summary["delivery"]["left_because"] == {"unconfirmed_answer": 5}
    assert "no delivery" in result.stderr and stub.posts == 5  # parked at once, not retried against a stub
    listing = subprocess.run([*CLI, "outbox", "--json"], env=worker_env(tmp_path), capture_output=True, text=True,
                             timeout=60)
    pending = json.loads(listing.stdout)["pending"]
    assert len(pending) == 5 and all(entry["last_answer"] == {"status": 200, "error": "unconfirmed_answer",
                                                              "answer": {"ok": True}} for entry in pending)


def test_three_overlapping_runs_send_each_receipt_exactly_once(tmp_path, aggregator, proxy_factory):
    """Runs B and C start while the outbox lock is held (by this test, standing in for an
    earlier run), so each sends only its own receipts; then the lock is free and run D takes
    it while B and C are still sending: D's recovery lists B's and C's receipts. Without
    per-entry claims D re-sent the ones in flight (answered duplicate, counted twice)."""
    proxy = proxy_factory(default="latency", latency_s=0.6)
    outbox = tmp_path / "outbox"
    earlier = fill_outbox(outbox, signed_receipts(6))
    holder = Outbox(outbox)
    assert holder.acquire()
    env = worker_env(tmp_path, TOPS_JOB_SEND_CONCURRENCY="2")
    runs = {}
    try:
        for name in ("b", "c"):
            runs[name] = start_worker(tmp_path, proxy.url, "--attempts", "16", "--no-challenge", env=env, name=name)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(len(signed_digests(tmp_path / f"{n}.jsonl")) >= 6 for n in runs):
            time.sleep(0.05)
    finally:
        holder.release()
    runs["d"] = start_worker(tmp_path, proxy.url, "--attempts", "2", "--no-challenge", env=env, name="d")
    for name, proc in runs.items():
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert proc.returncode == 0, (name, proc.returncode)
    made = set(earlier) | {d for n in runs for d in signed_digests(tmp_path / f"{n}.jsonl")}
    assert len(made) == 6 + 16 + 16 + 2
    sent_twice = {key: n for key, n in proxy.keys.items() if n != 1}
    assert not sent_twice, f"{len(sent_twice)} receipts sent more than once"
    assert set(proxy.keys) == made and set(aggregator.digests()) == made and not outbox_digests(outbox)
    summaries = [json.loads((tmp_path / f"{n}.summary.json").read_text()) for n in runs]
    counted = sum(s["receipts"]["accepted"] + s["receipts"]["duplicate"] for s in summaries)
    assert counted == len(made) and all(s["receipts"]["duplicate"] == 0 for s in summaries)
    assert summaries[2]["delivery"]["earlier_runs"] >= 6  # D drained the leftovers, B's and C's included


def test_a_symlinked_outbox_lock_is_not_followed(tmp_path, aggregator):
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    victim = tmp_path / "victim-lock"
    (outbox / ".lock").symlink_to(victim)
    result = run_worker(tmp_path, aggregator.url, "--attempts", "2", "--no-challenge")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not victim.exists()  # neither created nor locked through the link
    summary = json.loads((tmp_path / "run.summary.json").read_text())
    assert summary["delivery"]["outbox_problems"] == {"unusable_lock": 1}
    assert len(aggregator.digests()) == 2
