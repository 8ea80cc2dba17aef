"""Storage faults for real: full disks on a small tmpfs, a read-only outbox, and an outbox
holding what does not belong there. Nothing is lost, the run drains what it can, writes its
summary, and a full disk exits STORAGE_ERROR (6), which schedulers retry."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.support import CLI
from tests.support.disks import remount_read_only, small_tmpfs
from tests.support.peers import fill_outbox, outbox_digests, run_worker, signed_receipts, worker_env
from tops_job.spec.canonical import digest_of


def _run(tmp_path, *args, env=None, name="run"):
    command = [*CLI, "run", "--size", "64", "--opens", "16", "--summary", str(tmp_path / f"{name}.summary.json"), *args]
    return subprocess.run(command, env=env or worker_env(tmp_path), capture_output=True, text=True, timeout=180)


def _lines(path):
    data = path.read_bytes()
    assert data.endswith(b"\n"), f"{path} ends in a partial line: {data[-80:]!r}"
    return [json.loads(line) for line in data.splitlines()]


@pytest.mark.parametrize("flag", ["--ledger", "--receipts-out"])
def test_a_full_disk_leaves_whole_lines_and_the_next_run_appends_cleanly(tmp_path, flag):
    """The ledger (or --receipts-out) on a full disk: the append that does not fit is cut
    back, never left torn (the next run's first line used to glue onto 532 bytes of it)."""
    with small_tmpfs(tmp_path / "disk", "200k") as disk:
        target = disk / "receipts.jsonl"
        full = _run(tmp_path, "--attempts", "200", flag, str(target), name="full")
        assert full.returncode == 6, full.stderr[-3000:]
        assert "No space left" in full.stderr
        before = _lines(target)
        assert 3 <= len(before) < 200
        summary = json.loads((tmp_path / "full.summary.json").read_text())
        assert summary["exit_reason"] == "STORAGE_ERROR" and summary["error"]["class"] == "storage"
        subprocess.run(["mount", "-o", "remount,size=2m", str(disk)], check=True)
        again = _run(tmp_path, "--attempts", "3", flag, str(target), name="again")
        # the ledger's receipt that did not fit waits in the outbox, and a ledger run says so (3)
        assert again.returncode == (3 if flag == "--ledger" else 0), again.stderr[-3000:]
        assert len(_lines(target)) == len(before) + 3


def test_the_receipt_a_full_ledger_cannot_take_waits_in_the_outbox_and_is_appended_later(tmp_path):
    env = worker_env(tmp_path)
    with small_tmpfs(tmp_path / "disk", "200k") as disk:
        ledger = disk / "ledger.jsonl"
        full = _run(tmp_path, "--attempts", "200", "--ledger", str(ledger), env=env, name="full")
        assert full.returncode == 6, full.stderr[-3000:]
        in_ledger = {line["digest_hex"] for line in _lines(ledger)}
        waiting = outbox_digests(tmp_path / "outbox")
        assert len(waiting) == 1 and not set(waiting) & in_ledger  # the one that did not fit, nothing lost
        assert f"receipt {waiting[0]} is kept in the outbox" in full.stderr
        summary = json.loads((tmp_path / "full.summary.json").read_text())
        assert summary["delivery"]["pending"] == 1
        subprocess.run(["mount", "-o", "remount,size=2m", str(disk)], check=True)
        sent = subprocess.run([*CLI, "outbox", "send", "--submitter", "ledger"], capture_output=True, text=True,
                              env={**env, "TOPS_JOB_LEDGER": str(ledger)}, timeout=120)
        assert sent.returncode == 0, sent.stderr[-3000:]
        assert {line["digest_hex"] for line in _lines(ledger)} == in_ledger | set(waiting)
        assert outbox_digests(tmp_path / "outbox") == []


def test_a_receipt_neither_the_full_ledger_nor_the_outbox_can_take_is_logged_whole(tmp_path):
    with small_tmpfs(tmp_path / "disk", "200k") as disk:
        env = {**worker_env(tmp_path), "TOPS_JOB_OUTBOX_DIR": str(disk / "outbox")}
        full = _run(tmp_path, "--attempts", "200", "--ledger", str(disk / "ledger.jsonl"), env=env, name="full")
        assert full.returncode == 6, full.stderr[-3000:]
        (logged,) = [line for line in full.stderr.splitlines() if "could not be stored anywhere" in line]
        kept = json.loads(logged.split("to keep: ", 1)[1])
        assert digest_of(kept).hex() in logged  # the whole receipt, signed: `tops-job verify` takes it
        assert digest_of(kept).hex() not in {line["digest_hex"] for line in _lines(disk / "ledger.jsonl")}


def test_a_partial_last_line_is_set_aside_before_the_next_append(tmp_path, caplog):
    from tops_job.appendlog import AppendLog, complete_lines

    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"torn": "rec')  # kill -9 mid-write
    assert list(complete_lines(path)) == ['{"a": 1}', '{"b": 2}']
    assert "partial line" in caplog.text and "skipped" in caplog.text
    log = AppendLog(path, what="ledger")
    log.append('{"c": 3}\n')
    log.close()
    assert path.read_bytes() == b'{"a": 1}\n{"b": 2}\n{"c": 3}\n'
    aside = list(tmp_path.glob("ledger.jsonl.partial-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == b'{"torn": "rec'


def test_a_full_outbox_disk_exits_6_with_every_stored_receipt_pending(tmp_path):
    """Disk full used to be CONFIG_ERROR (2), which the Kubernetes podFailurePolicy maps to
    FailJob: the whole Indexed Job stopped. STORAGE_ERROR (6) is retried."""
    with small_tmpfs(tmp_path / "outbox", "160k") as outbox:
        env = worker_env(tmp_path, TOPS_JOB_OUTBOX_DIR=str(outbox), TOPS_JOB_DRAIN_TIMEOUT="1")
        result = run_worker(tmp_path, "http://127.0.0.1:9/verify", "--attempts", "200", "--no-challenge", env=env)
        assert result.returncode == 6, result.stderr[-3000:]
        summary = json.loads((tmp_path / "run.summary.json").read_text())
        stored = outbox_digests(outbox)
        assert stored and summary["receipts"]["pending"] == len(stored) == summary["delivery"]["outbox_at_end"]
        assert summary["exit_reason"] == "STORAGE_ERROR"


def test_a_read_only_outbox_with_a_stray_file_still_drains_and_summarises(tmp_path, aggregator):
    """A read-only outbox holding a stray file and earlier receipts: the stray file cannot be
    quarantined, the lock file cannot be created, and delivered entries cannot be unlinked.
    Each is reported and worked around: the earlier receipts are delivered and counted
    accepted (not "pending" for receipts the aggregator holds), the run's own receipt cannot
    be stored (exit 6), and the summary is written."""
    with small_tmpfs(tmp_path / "outbox", "1m") as outbox:
        earlier = fill_outbox(outbox, signed_receipts(4))
        (outbox / "stray.txt").write_text("hello")
        remount_read_only(outbox)
        env = worker_env(tmp_path, TOPS_JOB_OUTBOX_DIR=str(outbox))
        result = run_worker(tmp_path, aggregator.url, "--attempts", "2", "--no-challenge", env=env)
        assert result.returncode == 6, result.stderr[-3000:]
        summary = json.loads((tmp_path / "run.summary.json").read_text())
        assert summary["receipts"]["accepted"] == 4 and summary["receipts"]["pending"] == 0
        assert set(aggregator.digests()) == set(earlier)
        problems = summary["delivery"]["outbox_problems"]
        assert problems["unquarantinable"] == 1 and problems["unusable_lock"] == 1
        assert problems["unremovable_entry"] == 4
        assert summary["delivery"]["answered_but_kept_in_outbox"] == {"accepted": 4}
        assert sorted(outbox_digests(outbox)) == sorted(earlier) and (outbox / "stray.txt").exists()


def test_wrong_file_types_in_the_outbox_are_reported_and_worked_around(tmp_path, aggregator):
    """quarantine/ and rejected/ are files, an entry name is a directory, another a symlink,
    a FIFO sits among the entries: the run used to die on FileExistsError with no summary,
    and every retry the same way. Now all is reported, the good receipts are delivered, the
    rejected one stays in the outbox (rejected/ is unusable) and the summary says so."""
    outbox = tmp_path / "outbox"
    good = signed_receipts(2)
    bad = dict(signed_receipts(1, run_id="tampered")[0], attempt=7)  # signature no longer matches
    earlier = fill_outbox(outbox, good + [bad])
    (outbox / "quarantine").write_text("not a directory")
    (outbox / "rejected").write_text("not a directory")
    (outbox / ("c" * 64 + ".json")).mkdir()
    (outbox / ("d" * 64 + ".json")).symlink_to(tmp_path / "victim")
    os.mkfifo(outbox / "fifo")
    result = run_worker(tmp_path, aggregator.url, "--attempts", "2", "--no-challenge")
    assert result.returncode == 4, result.stderr[-3000:]  # the tampered receipt was rejected
    summary = json.loads((tmp_path / "run.summary.json").read_text())
    assert summary["receipts"]["accepted"] == 4 and summary["receipts"]["rejected"] == 1
    problems = summary["delivery"]["outbox_problems"]
    assert problems["misplaced_file"] == 2 and problems["unquarantinable"] == 3 and problems["unmovable_rejection"] == 1
    assert summary["delivery"]["answered_but_kept_in_outbox"] == {"rejected": 1}
    assert set(aggregator.digests()) == set(earlier[:2]) | set(_own(tmp_path))
    receipts_left = [p.name[:-5] for p in outbox.glob("*.json") if p.is_file() and not p.is_symlink()]
    assert receipts_left == [digest_of(bad).hex()] and (outbox / "fifo").exists()
    assert not (tmp_path / "victim").exists()


def _own(tmp_path):
    from tests.support.peers import signed_digests

    return signed_digests(tmp_path / "run.jsonl")


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_an_outbox_path_that_is_a_file_exits_2_naming_the_variable(tmp_path, protocol):
    (tmp_path / "not-a-dir").write_text("x")
    env = {**worker_env(tmp_path), "TOPS_JOB_OUTBOX_DIR": str(tmp_path / "not-a-dir")}
    result = _run(tmp_path, "--attempts", "1", "--protocol", protocol, "--aggregator-url", "http://127.0.0.1:9/verify",
                  env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "TOPS_JOB_OUTBOX_DIR" in result.stderr and "not a directory" in result.stderr.lower()
