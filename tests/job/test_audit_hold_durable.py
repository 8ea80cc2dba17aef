"""Receipts held for the self-audit are durable: kill -9 while their audit runs, and the next
run sends them (saying they were never audited); a receipt that fails its audit is kept in
the outbox's withheld place and never sent. Real `tops-job run` subprocesses against the
reference aggregator, for tops-receipt/1 and /2.

The audit is steered with a `sitecustomize.py` on the worker's PYTHONPATH (test-only): it
replaces the audit's verifier in the subprocess with one that never returns (the run is
killed inside the window) or one that says the product is wrong."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.peers import CLI, Aggregator, worker_env
from tops_job.spec.canonical import digest_of as digest_v1
from tops_job.spec.v2 import digest_of as digest_v2
from tops_job.spec.v2 import header_of

SIZE = {"v1": ["--size", "64", "--opens", "16"], "v2": ["--size", "96,96,256"]}

BLOCK_AUDIT = """
import threading

import tops_job.job.device_guard as guard


def _never(*args, **kwargs):  # the audit never ends: the run is killed while receipts are held
    threading.Event().wait()


guard.verify_receipt = _never
guard.audit_v2 = _never
"""

FAIL_AUDIT = """
import tops_job.job.device_guard as guard
from tops_job.spec.errors import ReceiptInvalid


def _wrong(*args, **kwargs):
    raise ReceiptInvalid("wrong_product", "the test's device computes wrongly")


guard.verify_receipt = _wrong
guard.audit_v2 = _wrong
"""


@pytest.fixture
def agg(tmp_path):
    server = Aggregator(tmp_path / "agg.sqlite3", accept="both")
    yield server
    server.stop()


def _env(tmp_path: Path, protocol: str, plugin: str | None = None) -> dict[str, str]:
    env = worker_env(tmp_path, TOPS_JOB_PROTOCOL=protocol)
    if plugin is not None:
        where = tmp_path / f"plugin-{abs(hash(plugin))}"
        where.mkdir(exist_ok=True)
        (where / "sitecustomize.py").write_text(plugin)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(where), env.get("PYTHONPATH")) if p)
    return env


def _command(tmp_path: Path, protocol: str, url: str, *args: str, name: str) -> list[str]:
    return [*CLI, "run", *SIZE[protocol], "--receipts-out", str(tmp_path / f"{name}.jsonl"),
            "--summary", str(tmp_path / f"{name}.summary.json"), "--aggregator-url", url, *args]


def _url(agg: Aggregator, protocol: str) -> str:
    return agg.url if protocol == "v1" else agg.base


def _signed(path: Path, protocol: str) -> dict[str, int]:
    """digest -> attempt of each receipt a run wrote with --receipts-out."""
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                receipt = json.loads(line)
            except ValueError:  # a line cut short by kill -9
                continue
            if protocol == "v1":
                out[digest_v1(receipt).hex()] = receipt["attempt"]
            else:
                out[digest_v2(receipt).hex()] = header_of(receipt)["attempt"]
    return out


def _accepted(agg: Aggregator, protocol: str) -> list[str]:
    return agg.digests() if protocol == "v1" else agg.v2_accepted()


def _seen_by_aggregator(agg: Aggregator, protocol: str) -> list[str]:
    if protocol == "v1":
        return agg.digests()
    conn = sqlite3.connect(agg.db)
    try:
        return [row[0] for row in conn.execute("SELECT digest FROM v2_commitments")]
    finally:
        conn.close()


def _waiting(outbox: Path, protocol: str) -> list[str]:
    """Receipts still in the sending path (or held) of the outbox."""
    if protocol == "v1":
        names = [p.name for p in outbox.glob("*.json")] + [p.name for p in (outbox / "held").glob("*.json")]
        return sorted(n[:64] for n in names)
    return sorted(p.name[:64] for p in (outbox / "v2").glob("*.commit.json"))


def _wait_for_lines(path: Path, count: int, proc: subprocess.Popen, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early ({proc.returncode})")
        time.sleep(0.02)
    raise AssertionError(f"{path} never reached {count} lines: held receipts are not written out at once")


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_kill_9_while_every_receipt_waits_for_its_audit_loses_none(tmp_path, agg, protocol):
    attempts = 4
    proc = subprocess.Popen(_command(tmp_path, protocol, _url(agg, protocol), "--attempts", str(attempts),
                                     "--audit-every", "1", name="killed"),
                            env=_env(tmp_path, protocol, BLOCK_AUDIT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for_lines(tmp_path / "killed.jsonl", attempts, proc)
        time.sleep(0.5)  # the senders have had their chance: a held receipt must not go out
        assert _seen_by_aggregator(agg, protocol) == []
    finally:
        proc.kill()
        proc.wait(10)
    signed = _signed(tmp_path / "killed.jsonl", protocol)
    assert len(signed) == attempts
    assert _waiting(tmp_path / "outbox", protocol) == sorted(signed)  # durable, though never audited

    final = subprocess.run(_command(tmp_path, protocol, _url(agg, protocol), "--attempts", "1", name="final"),
                           env=_env(tmp_path, protocol), capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr[-3000:]
    assert final.stderr.count("never audited") == attempts
    accepted = _accepted(agg, protocol)
    assert len(accepted) == len(set(accepted))  # exactly once
    assert set(accepted) == set(signed) | set(_signed(tmp_path / "final.jsonl", protocol))
    assert _waiting(tmp_path / "outbox", protocol) == []


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_a_receipt_that_fails_its_audit_is_withheld_and_never_sent(tmp_path, agg, protocol):
    every = 3
    result = subprocess.run(_command(tmp_path, protocol, _url(agg, protocol), "--attempts", "50",
                                     "--audit-every", str(every), name="failed"),
                            env=_env(tmp_path, protocol, FAIL_AUDIT), capture_output=True, text=True, timeout=120)
    assert result.returncode == 5, result.stderr[-3000:]  # DEVICE_ERROR, naming the device
    summary = json.loads((tmp_path / "failed.summary.json").read_text())
    assert summary["device_checks"]["self_audit"]["failure"]["attempt"] == 0
    signed = _signed(tmp_path / "failed.jsonl", protocol)
    audited = {d for d, attempt in signed.items() if attempt % every == 0}
    assert audited and summary["delivery"]["withheld"] == len(audited)
    withheld = tmp_path / "outbox" / ("withheld" if protocol == "v1" else "v2/withheld")
    suffix = ".json" if protocol == "v1" else ".commit.json"
    assert {p.name[:64] for p in withheld.glob(f"*{suffix}") if len(p.name) == 64 + len(suffix)} == audited
    for digest in audited:
        reason = json.loads((withheld / f"{digest}.reason.json").read_text())
        assert "self-audit" in reason["reason"] and "wrong_product" in reason["reason"]
    assert not audited & set(_seen_by_aggregator(agg, protocol))  # never sent
    assert set(_accepted(agg, protocol)) == set(signed) - audited  # the others went as usual
    if protocol == "v1":  # `tops-job outbox` shows them, with the reason
        listing = subprocess.run([*CLI, "outbox"], env=_env(tmp_path, protocol), capture_output=True, text=True,
                                 timeout=60)
        assert listing.returncode == 0, listing.stderr[-3000:]
        assert sum(line.startswith("withheld ") and "wrong_product" in line
                   for line in listing.stdout.splitlines()) == len(audited)

    again = subprocess.run(_command(tmp_path, protocol, _url(agg, protocol), "--attempts", "1", name="again"),
                           env=_env(tmp_path, protocol), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not audited & set(_seen_by_aggregator(agg, protocol))  # a later run does not send it either
    assert _waiting(tmp_path / "outbox", protocol) == []
