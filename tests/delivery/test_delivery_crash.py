"""kill -9 at random points, SIGTERM and SIGINT mid-run and during backoff: no receipt is
lost and none is counted twice."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import time

import pytest

from tests.support.peers import outbox_digests, run_worker, signed_digests, start_worker, worker_env

TRIALS = 10


def _wait_for_lines(path, count, proc, limit=30.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"{path} never reached {count} lines")


def test_kill_9_at_random_points_then_next_run_delivers_each_receipt_once(tmp_path, aggregator, proxy_factory):
    rng = random.Random(20240611)
    proxy = proxy_factory(latency_s=0.05)
    signed_all: set[str] = set()
    for trial in range(TRIALS):
        url = proxy.url if trial % 2 else aggregator.url
        proxy.default = "latency" if trial % 4 == 1 else None
        proc = start_worker(tmp_path, url, "--attempts", "60", name=f"kill{trial}")
        time.sleep(rng.uniform(0.3, 1.5))
        proc.kill()
        proc.wait(10)
        signed_all.update(signed_digests(tmp_path / f"kill{trial}.jsonl"))
    proxy.default = None
    left = set(outbox_digests(tmp_path / "outbox"))
    final = run_worker(tmp_path, aggregator.url, "--attempts", "1", name="final")
    assert final.returncode == 0, final.stderr[-3000:]
    signed_all.update(signed_digests(tmp_path / "final.jsonl"))
    stored = aggregator.digests()
    assert len(stored) == len(set(stored))
    assert signed_all <= set(stored)  # every receipt that was written out is counted
    assert left <= set(stored)
    # at most one receipt per kill was in the outbox but not yet in --receipts-out
    assert len(set(stored) - signed_all) <= TRIALS
    assert outbox_digests(tmp_path / "outbox") == []
    # a kill between mkstemp and the writer's flock leaves an empty temp file, which recovery
    # leaves for a minute (a writer in another PID namespace may be about to fill it)
    assert [p.name for p in (tmp_path / "outbox").glob(".tmp-*") if p.stat().st_size] == []


def _term_and_time(proc, signum):
    began = time.monotonic()
    proc.send_signal(signum)
    proc.wait(15)
    return time.monotonic() - began


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_run_stops_quickly_with_a_complete_outbox(tmp_path, aggregator, proxy_factory, signum, code):
    proxy = proxy_factory(default="latency", latency_s=0.2)
    proc = start_worker(tmp_path, proxy.url, "--attempts", "100000")
    _wait_for_lines(tmp_path / "run.jsonl", 8, proc)
    took = _term_and_time(proc, signum)
    stderr = proc.stderr.read()
    assert proc.returncode == code, stderr[-3000:]
    assert took < 2.5, f"took {took:.2f}s to stop"
    signed = set(signed_digests(tmp_path / "run.jsonl"))
    stored, waiting = set(aggregator.digests()), set(outbox_digests(tmp_path / "outbox"))
    assert signed <= stored | waiting and not (stored & waiting) - signed
    summary = json.loads((tmp_path / "run.summary.json").read_text())
    assert summary["stop_reason"] == signal.Signals(signum).name and summary["exit_code"] == code


def test_sigterm_during_backoff_acts_at_once(tmp_path, aggregator, proxy_factory):
    proxy = proxy_factory(default="503-long")
    env = worker_env(tmp_path, TOPS_JOB_SEND_CONCURRENCY="1", TOPS_JOB_BREAKER_THRESHOLD="1000")
    proc = start_worker(tmp_path, proxy.url, "--attempts", "100000", env=env)
    _wait_for_lines(tmp_path / "run.jsonl", 3, proc)
    stderr: list[str] = []
    in_backoff = threading.Event()

    def watch() -> None:  # the sender logs each retry just before it sleeps
        for line in proc.stderr:
            stderr.append(line)
            found = re.search(r"\[sender\] receipt \w+: retry \d+ in ([\d.]+)s", line)
            if found and float(found.group(1)) >= 10:
                in_backoff.set()

    threading.Thread(target=watch, daemon=True).start()
    assert in_backoff.wait(15), "the sender never entered its 30 s Retry-After wait"
    took = _term_and_time(proc, signal.SIGTERM)
    assert proc.returncode == 143, "".join(stderr)[-3000:]
    assert took < 2.0, f"took {took:.2f}s to stop"
    signed = set(signed_digests(tmp_path / "run.jsonl"))
    assert signed and signed <= set(outbox_digests(tmp_path / "outbox"))
    assert aggregator.digests() == []
    summary = json.loads((tmp_path / "run.summary.json").read_text())
    assert summary["receipts"]["pending"] >= len(signed)


def test_sigterm_reaches_the_job_as_pid_1(tmp_path, aggregator):
    """In a container without an init, tops-job is PID 1, and the kernel drops any signal PID 1
    has no handler for: SIGTERM must still stop it cleanly (exit 143, outbox complete)."""
    import shutil
    import subprocess

    from tests.support.peers import CLI

    if shutil.which("unshare") is None or subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                                                         capture_output=True).returncode != 0:
        pytest.skip("unshare cannot make a PID namespace here (needs root or user namespaces)")
    command = ["unshare", "--pid", "--fork", "--mount-proc", *CLI, "run", "--size", "64", "--attempts", "100000",
               "--receipts-out", str(tmp_path / "run.jsonl"), "--summary", str(tmp_path / "run.summary.json"),
               "--aggregator-url", aggregator.url]
    outer = subprocess.Popen(command, env=worker_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(tmp_path / "run.jsonl", 5, outer)
    children = open(f"/proc/{outer.pid}/task/{outer.pid}/children").read().split()
    (job_pid,) = children  # the job, PID 1 in its namespace
    (nspid,) = [line for line in open(f"/proc/{job_pid}/status") if line.startswith("NSpid:")]
    assert nspid.split()[-1] == "1"  # its pid in its own namespace
    began = time.monotonic()
    os.kill(int(job_pid), signal.SIGTERM)
    try:
        outer.wait(15)
    except subprocess.TimeoutExpired:
        os.kill(int(job_pid), signal.SIGKILL)  # PID 1 ignored TERM: the failure this test is for
        raise
    took = time.monotonic() - began
    assert outer.returncode == 143, outer.stderr.read()[-3000:]
    assert took < 2.5, f"took {took:.2f}s to stop"
    signed = set(signed_digests(tmp_path / "run.jsonl"))
    assert signed <= set(aggregator.digests()) | set(outbox_digests(tmp_path / "outbox"))
    assert json.loads((tmp_path / "run.summary.json").read_text())["exit_code"] == 143
