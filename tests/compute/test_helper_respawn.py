"""The CPU commitment's helper processes die (kill -9, the OOM killer): each is replaced and
an attempt it broke is retried once, instead of every later attempt failing on a broken pipe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import CLI, TEST_SECRET
from tops_job.compute.base import Shape
from tops_job.compute.numpy_backend import NumpyBackend
from tops_job.job.attempt import Identity, run_attempt
from tops_job.spec.signing import LocalKeySigner
from tops_job.spec.verify import verify_receipt

SIZE = 1100  # above MIN_SHARED_ELEMENTS: the commitment uses helper processes


def _helpers(parent: int) -> list[int]:
    """Pids of `parent`'s commitment helpers."""
    found = []
    for task in Path(f"/proc/{parent}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"tops_job.compute.host_workers" in cmdline:
                found.append(int(child))
    return found


def test_a_killed_helper_is_replaced_before_the_next_commitment():
    identity = Identity(did="did:peaq:test", signer=LocalKeySigner(bytes.fromhex(TEST_SECRET)))
    backend = NumpyBackend("float32", threads=2)
    try:
        shape = Shape(SIZE, SIZE, 64)
        run_attempt(backend, shape, identity, run_id="r", attempt=0, tile=512, opens=16)
        before = _helpers(os.getpid())
        assert before, "no helper process: this test needs /proc and memfd"
        for pid in before:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        result = run_attempt(backend, shape, identity, run_id="r", attempt=1, tile=512, opens=16)
        verify_receipt(result.receipt, full=True)
        after = _helpers(os.getpid())
        assert after and not set(after) & set(before)
    finally:
        backend.close()


def test_kill_9_of_helpers_during_a_run_costs_no_attempt(tmp_path):
    """The helpers are killed three times while the run commits (each time after the run has
    made progress): every attempt still ends with a receipt (an attempt whose helper died
    under it is retried once)."""
    env = dict(os.environ, WORKER_SK_HEX=TEST_SECRET, PYTHONUNBUFFERED="1")
    summary_path = tmp_path / "summary.json"
    proc = subprocess.Popen([*CLI, "run", "--backend", "numpy", "--size", f"{SIZE},{SIZE},64", "--tile", "512",
                             "--attempts", "12", "--summary", str(summary_path),
                             "--ledger", str(tmp_path / "ledger.jsonl")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = 0
    ledger = tmp_path / "ledger.jsonl"
    try:
        deadline = time.monotonic() + 120
        progress = 0
        while proc.poll() is None and time.monotonic() < deadline and killed < 3:
            lines = ledger.read_bytes().count(b"\n") if ledger.exists() else 0
            helpers = _helpers(proc.pid)
            if lines > progress and helpers:
                for pid in helpers:
                    os.kill(pid, signal.SIGKILL)
                killed += 1
                progress = lines
            time.sleep(0.02)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    if killed == 0:
        pytest.skip("the run ended before a helper could be killed (a fast machine); the in-process test covers it")
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["attempts"] == {**summary["attempts"], "ok": 12, "failed": 0}
    assert "new helper processes" in stderr
