"""The outbox is always accounted for: a run without AGGREGATOR_URL counts what it holds,
`tops-job outbox` lists pending and rejected entries, `tops-job outbox send` delivers them."""

from __future__ import annotations

import json
import subprocess

from tests.support import CLI
from tests.support.peers import fill_outbox, outbox_digests, run_worker, signed_receipts, worker_env


def _tampered() -> dict:
    return dict(signed_receipts(1, run_id="tampered")[0], attempt=9)  # its signature no longer matches


def test_a_run_without_aggregator_url_reports_what_the_outbox_holds(tmp_path):
    """It used to say pending 0, outbox_depth 0 over 706 receipts and leave them there."""
    held = fill_outbox(tmp_path / "outbox", signed_receipts(7))
    result = run_worker(tmp_path, None, "--attempts", "2")
    assert result.returncode == 3, result.stderr[-3000:]  # receipts wait: PENDING
    summary = json.loads((tmp_path / "run.summary.json").read_text())
    assert summary["receipts"]["accepted"] == 2 and summary["receipts"]["pending"] == 7
    assert summary["delivery"]["outbox_depth"] == 7 and summary["delivery"]["outbox"] == str(tmp_path / "outbox")
    assert "tops-job outbox send" in result.stderr
    assert sorted(outbox_digests(tmp_path / "outbox")) == sorted(held)


def test_outbox_lists_then_send_delivers_with_runs_exit_codes(tmp_path, aggregator):
    outbox = tmp_path / "outbox"
    good = fill_outbox(outbox, signed_receipts(5))
    bad = fill_outbox(outbox, [_tampered()])[0]
    env = worker_env(tmp_path)

    listing = subprocess.run([*CLI, "outbox", "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    data = json.loads(listing.stdout)
    assert sorted(e["digest"] for e in data["pending"]) == sorted(good + [bad]) and data["rejected"] == []

    dead = subprocess.run([*CLI, "outbox", "send", "--aggregator-url", "http://127.0.0.1:9/verify",
                           "--drain-timeout", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert dead.returncode == 3, dead.stderr[-2000:]  # nothing lost: all still pending
    assert len(outbox_digests(outbox)) == 6

    sent = subprocess.run([*CLI, "outbox", "send", "--aggregator-url", aggregator.url], env=env,
                          capture_output=True, text=True, timeout=60)
    assert sent.returncode == 4, sent.stderr[-2000:]  # one was rejected
    assert "5 accepted" in sent.stderr and "1 rejected" in sent.stderr
    assert sorted(aggregator.digests()) == sorted(good) and outbox_digests(outbox) == []

    text = subprocess.run([*CLI, "outbox"], env=env, capture_output=True, text=True, timeout=60)
    assert "0 pending, 1 rejected" in text.stdout
    rejected_line = next(line for line in text.stdout.splitlines() if line.startswith("rejected"))
    assert bad in rejected_line and "422" in rejected_line and "signer_mismatch" in rejected_line

    again = subprocess.run([*CLI, "outbox", "send", "--aggregator-url", aggregator.url], env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "0 pending" in again.stderr


def test_outbox_send_without_a_url_names_the_variable(tmp_path):
    result = subprocess.run([*CLI, "outbox", "send"], env=worker_env(tmp_path), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "AGGREGATOR_URL" in result.stderr
