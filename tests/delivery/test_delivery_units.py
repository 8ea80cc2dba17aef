"""The delivery building blocks in-process: retry policy, budget, breaker, token bucket,
outbox, and the HTTP answer classification."""

from __future__ import annotations

import email.utils
import json
import os
import random

import pytest

from tests.support import VECTORS_DIR
from tests.support.peers import CannedServer
from tops_job.delivery.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from tops_job.delivery.http_submitter import HttpSubmitter, classify, sibling_url, verify_url
from tops_job.delivery.outbox import Outbox
from tops_job.delivery.outcomes import Outcome
from tops_job.delivery.ratelimit import TokenBucket
from tops_job.delivery.retry import RetryBudget, RetryPolicy, parse_retry_after
from tops_job.spec.canonical import digest_of


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _vector(index: int = 0) -> dict:
    return json.loads((VECTORS_DIR / "valid.jsonl").read_text().splitlines()[index])


# ---- retry

def test_retry_after_seconds_and_http_date():
    assert parse_retry_after("7") == 7.0
    now = 1_700_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    for junk in (None, "", "soon", "-5", "1.5e3", "Wed, 99 Foo 2024"):
        assert parse_retry_after(junk) is None


def test_backoff_is_full_jitter_under_the_cap():
    policy = RetryPolicy(base_s=0.5, cap_s=4.0, rng=random.Random(1))
    for retry in range(12):
        waits = [policy.backoff(retry) for _ in range(300)]
        ceiling = min(4.0, 0.5 * 2 ** retry)
        assert 0 <= min(waits) and max(waits) <= ceiling
        assert max(waits) > 0.8 * ceiling and min(waits) < 0.2 * ceiling  # spread over [0, ceiling]


def test_retry_after_wins_and_is_capped():
    policy = RetryPolicy(retry_after_cap_s=60.0)
    assert policy.delay(0, retry_after=12.0) == 12.0
    assert policy.delay(5, retry_after=86400.0) == 60.0
    assert RetryPolicy(max_retries=2).may_retry(1) and not RetryPolicy(max_retries=2).may_retry(2)


def test_retry_budget_is_a_floor_plus_a_share_of_first_sends():
    budget = RetryBudget(floor=3, ratio=0.5)
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]
    for _ in range(4):
        budget.record_first_send()
    assert budget.try_spend() and budget.try_spend() and not budget.try_spend()
    assert budget.state()["retries_refused"] == 2


# ---- breaker

def test_breaker_opens_after_threshold_and_probes_once_after_cooldown():
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == CLOSED
    breaker.record_failure()
    assert breaker.state == OPEN and not breaker.allow() and breaker.opened_count == 1
    clock.now += 10
    assert breaker.state == HALF_OPEN
    assert breaker.allow() and not breaker.allow()  # exactly one probe
    breaker.record_failure()
    assert breaker.state == OPEN and breaker.opened_count == 2
    clock.now += 10
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == CLOSED and breaker.allow() and breaker.allow()


def test_success_resets_the_consecutive_count():
    breaker = CircuitBreaker(threshold=2, cooldown_s=1)
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == CLOSED


# ---- token bucket

def test_token_bucket_holds_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(rate=5, burst=2, clock=clock)
    assert bucket.try_take() == 0 and bucket.try_take() == 0
    assert bucket.try_take() == pytest.approx(0.2)
    clock.now += 0.2
    assert bucket.try_take() == 0
    taken = 0
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        clock.now += seconds
        return False

    start = clock.now
    while clock.now - start < 10:
        bucket.take(sleep)
        taken += 1
    assert 49 <= taken <= 52


def test_token_bucket_take_gives_up_when_interrupted():
    bucket = TokenBucket(rate=1, burst=1, clock=FakeClock())
    assert bucket.take(lambda s: True)  # a token is there: no sleep
    assert not bucket.take(lambda s: True)


# ---- outbox

def test_outbox_put_is_durable_and_recover_lists_oldest_first(tmp_path):
    outbox = Outbox(tmp_path / "outbox")
    receipts = [_vector(i) for i in range(3)]
    for receipt in receipts:
        outbox.put(receipt, digest_of(receipt))
    assert outbox.acquire()
    assert outbox.recover() == [digest_of(r).hex() for r in receipts]
    assert outbox.load(digest_of(receipts[1]).hex()) == receipts[1]
    outbox.remove(digest_of(receipts[1]).hex())
    assert sorted(outbox.pending()) == sorted(digest_of(r).hex() for r in (receipts[0], receipts[2]))
    outbox.release()


def test_outbox_lock_is_exclusive(tmp_path):
    first, second = Outbox(tmp_path / "o"), Outbox(tmp_path / "o")
    assert first.acquire()
    assert not second.acquire()
    first.release()
    assert second.acquire()


def test_outbox_quarantines_corrupt_entries_and_recovers_interrupted_writes(tmp_path, caplog):
    outbox = Outbox(tmp_path / "outbox")
    good, other = _vector(0), _vector(1)
    (outbox.path / ("a" * 64 + ".json")).write_text("{not json")
    (outbox.path / (digest_of(other).hex() + ".json")).write_text(json.dumps(good))  # wrong name for its content
    (outbox.path / "stray.txt").write_text("hello")
    (outbox.path / ".tmp-x.part").write_text(json.dumps(other))  # complete, never renamed
    (outbox.path / ".tmp-y.part").write_text('{"sig": "ab')  # cut short
    assert outbox.acquire()
    waiting = outbox.recover()
    assert not list(outbox.path.glob(".tmp-*"))
    # Nothing signed is lost: the complete temp file is the true entry under its name, and
    # the receipt that sat under a wrong name is re-filed under its own digest.
    assert sorted(waiting) == sorted(["a" * 64, digest_of(other).hex(), digest_of(good).hex()])
    loaded = {d: outbox.load(d) for d in waiting}
    assert loaded == {"a" * 64: None, digest_of(other).hex(): other, digest_of(good).hex(): good}
    assert sorted(os.listdir(outbox.quarantine_dir)) == sorted(["a" * 64 + ".json", "stray.txt"])
    assert "quarantined" in caplog.text and "re-filed under its own digest" in caplog.text


def test_recover_leaves_a_live_writers_temp_files_alone(tmp_path):
    """Run B started while A held the lock and writes without it; run C, taking the lock
    after A, must not promote or delete B's half-written receipt (B would lose it)."""
    import subprocess
    import sys

    outbox = Outbox(tmp_path / "outbox")
    receipt = _vector(3)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live_tmp = outbox.path / f".tmp-{writer.pid}-abc.part"
        live_tmp.write_text('{"sig": "ab')  # being written right now
        dead_tmp = outbox.path / f".tmp-{dead.pid}-def.part"
        dead_tmp.write_text(json.dumps(receipt))  # complete; its writer died before the rename
        assert outbox.acquire()
        waiting = outbox.recover()
        assert live_tmp.exists() and live_tmp.read_text() == '{"sig": "ab'
        assert not dead_tmp.exists() and waiting == [digest_of(receipt).hex()]
    finally:
        writer.kill()
        writer.wait()


def test_outbox_reject_keeps_receipt_and_answer(tmp_path):
    outbox = Outbox(tmp_path / "outbox")
    receipt = _vector(2)
    digest = digest_of(receipt).hex()
    outbox.put(receipt, bytes.fromhex(digest))
    outbox.reject(digest, {"status": 422, "error": "wrong_product"})
    assert not (outbox.path / f"{digest}.json").exists()
    assert json.loads((outbox.rejected_dir / f"{digest}.json").read_text()) == receipt
    assert json.loads((outbox.rejected_dir / f"{digest}.answer.json").read_text())["error"] == "wrong_product"


# ---- HTTP answers

DIGEST = bytes(32)


@pytest.mark.parametrize("status,outcome", [
    (400, Outcome.REJECTED), (409, Outcome.REJECTED), (413, Outcome.REJECTED), (422, Outcome.REJECTED),
    (408, Outcome.TRANSIENT), (429, Outcome.TRANSIENT), (500, Outcome.TRANSIENT), (502, Outcome.TRANSIENT),
    (503, Outcome.TRANSIENT), (504, Outcome.TRANSIENT), (404, Outcome.TRANSIENT), (403, Outcome.TRANSIENT),
])
def test_classify_final_and_transient(status, outcome):
    result = classify(status, b'{"ok": false, "error": "x"}', "3", DIGEST)
    assert result.outcome is outcome
    if status in (429, 503):
        assert result.retry_after == 3.0


def test_classify_200():
    verified = {"ok": True, "sig_ok": True, "proof_ok": True, "digest_hex": DIGEST.hex()}
    ok = json.dumps({**verified, "duplicate": False}).encode()
    assert classify(200, ok, None, DIGEST).outcome is Outcome.ACCEPTED
    dup = json.dumps({**verified, "duplicate": True}).encode()
    assert classify(200, dup, None, DIGEST).outcome is Outcome.DUPLICATE
    other = json.dumps({"ok": True, "sig_ok": True, "proof_ok": True, "digest_hex": "11" * 32}).encode()
    assert classify(200, other, None, DIGEST).outcome is Outcome.TRANSIENT  # not our receipt: keep it
    assert classify(200, b"<html>", None, DIGEST).outcome is Outcome.TRANSIENT


@pytest.mark.parametrize("answer", [
    {"ok": True},  # a stub, a webhook sink, a misrouted ingress
    {"ok": True, "digest_hex": DIGEST.hex()},  # names it, but says nothing was verified
    {"ok": True, "digest_hex": DIGEST.hex(), "sig_ok": True, "proof_ok": False},
    {"ok": True, "digest_hex": DIGEST.hex(), "sig_ok": "yes", "proof_ok": True},
], ids=["bare-ok", "no-verdict", "proof-failed", "not-a-boolean"])
def test_a_200_counts_only_when_it_names_the_digest_and_says_both_verified(answer):
    result = classify(200, json.dumps(answer).encode(), None, DIGEST)
    assert result.outcome is Outcome.TRANSIENT and result.error == "unconfirmed_answer"
    assert result.response == answer  # kept for the report


def test_urls():
    assert verify_url("http://agg:8081") == "http://agg:8081/verify"
    assert verify_url("http://agg:8081/api/verify") == "http://agg:8081/api/verify"
    assert sibling_url("http://agg:8081/api/verify", "challenge") == "http://agg:8081/api/challenge"
    assert sibling_url("http://agg:8081", "challenge") == "http://agg:8081/challenge"


# ---- odd answers from a real server: classified, never raised

@pytest.fixture
def canned():
    servers = []

    def make(status, body=b"", headers=None):
        server = CannedServer(status, body, headers)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def _send_once(url: str):
    """One spec vector through a fresh HttpSubmitter, as the sender would send it."""
    receipt = _vector(0)
    submitter = HttpSubmitter(url)
    try:
        return submitter.submit(receipt, digest_of(receipt))
    finally:
        submitter.close()


@pytest.mark.parametrize("retry_after", [
    "\u00b2",  # a latin-1 superscript: str.isdigit() says yes, int() says no
    "9" * 400,  # an int too large for a float
    "9" * 5000,  # past Python's int-from-string digit limit
    "Mon, 99999999999999999999 Jan 2024 00:00:00 GMT",  # a date whose day overflows a C long
    "Mon, 01 Jan 2024 00:00:00 +99999999999999999999",
], ids=["superscript", "400-digits", "5000-digits", "huge-day", "huge-offset"])
def test_odd_retry_after_is_classified_not_raised(canned, retry_after):
    server = canned(503, b'{"ok": false, "error": "busy"}', {"Retry-After": retry_after})
    result = _send_once(server.url)
    assert result.outcome is Outcome.TRANSIENT and result.status == 503 and result.error == "busy"
    assert result.retry_after is None or result.retry_after >= 0
    assert RetryPolicy(retry_after_cap_s=60.0).delay(0, result.retry_after) <= 60.0


def test_retry_after_of_many_digits_waits_the_cap():
    assert RetryPolicy(retry_after_cap_s=60.0).delay(0, parse_retry_after("9" * 5000)) == 60.0
    assert parse_retry_after("\u00b2") is None and parse_retry_after("\u0663") is None  # ASCII digits only


def test_deeply_nested_answer_is_classified_not_raised(canned):
    server = canned(422, b"[" * 100_000 + b"]" * 100_000)
    result = _send_once(server.url)
    assert result.outcome is Outcome.REJECTED and result.status == 422  # final, not retried for ever


def test_a_redirect_is_not_followed_and_keeps_the_receipt(canned):
    """requests would turn a POST into a GET on 302 and call whatever answers there a
    delivery; a 3xx is neither accepted nor final: the receipt stays in the outbox."""
    target = canned(200, json.dumps({"ok": True}).encode())
    redirect = canned(302, b"", {"Location": target.url})
    result = _send_once(redirect.url)
    assert result.outcome is Outcome.TRANSIENT and result.status == 302 and target.posts == 0


def test_an_endless_answer_body_is_cut_off(canned):
    server = canned(200, b" " * (3 << 20) + b'{"ok": true}')
    result = _send_once(server.url)
    assert result.outcome is Outcome.TRANSIENT and result.error == "bad_answer"  # never buffered whole


def test_an_entry_that_cannot_be_read_now_is_kept_not_quarantined(tmp_path, monkeypatch):
    """An I/O error (EMFILE, a flaky disk) is not a corrupt entry: quarantined receipts are
    never sent again, so a good one must stay in the outbox."""
    import errno
    from pathlib import Path as _Path

    outbox = Outbox(tmp_path / "outbox")
    receipt = _vector(4)
    digest = digest_of(receipt).hex()
    outbox.put(receipt, bytes.fromhex(digest))
    real_read_bytes = _Path.read_bytes

    def failing_read_bytes(self):
        if self.name == f"{digest}.json":
            raise OSError(errno.EMFILE, "Too many open files")
        return real_read_bytes(self)

    monkeypatch.setattr(_Path, "read_bytes", failing_read_bytes)
    assert outbox.load(digest) is None
    assert outbox.holds(digest) and not outbox.quarantine_dir.exists()
    monkeypatch.setattr(_Path, "read_bytes", real_read_bytes)
    assert outbox.load(digest) == receipt


def _hold_flock_elsewhere(path, *, new_pid_namespace: bool = False):
    """A process (in a new PID namespace when asked and possible) that holds an flock on `path`."""
    import shutil
    import subprocess
    import sys

    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(60)")
    command = [sys.executable, "-c", code, str(path)]
    if new_pid_namespace:
        if os.geteuid() != 0 or not shutil.which("unshare"):
            pytest.skip("a new PID namespace needs root and unshare (util-linux)")
        command = ["unshare", "--pid", "--fork", "--kill-child", *command]
    holder = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def _release(holder, path) -> None:
    """Kill the holder (unshare --kill-child takes its child along) and wait until the lock is free."""
    import fcntl
    import time

    holder.kill()
    holder.wait()
    deadline = time.monotonic() + 10
    while True:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError:
            assert time.monotonic() < deadline, "the lock holder did not go away"
            time.sleep(0.02)
        finally:
            os.close(fd)


def test_a_temp_file_locked_by_a_writer_in_another_pid_namespace_is_left_alone(tmp_path):
    """Another container on the same volume: its pid means nothing here (here it names a dead
    process), but its flock on the temp file says it is alive and still writing."""
    import subprocess
    import sys

    outbox = Outbox(tmp_path / "outbox")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp = outbox.path / f".tmp-{dead.pid}-abc.part"
    tmp.write_text('{"sig": "ab')  # half written
    holder = _hold_flock_elsewhere(tmp, new_pid_namespace=True)
    try:
        assert outbox.acquire()
        assert outbox.recover() == [] and tmp.read_text() == '{"sig": "ab'
    finally:
        _release(holder, tmp)
    assert outbox.recover() == [] and not tmp.exists()  # its writer is gone: now it is a leftover


def test_an_entry_claimed_by_a_process_in_another_pid_namespace_is_busy(tmp_path):
    outbox = Outbox(tmp_path / "outbox")
    receipt = _vector(5)
    digest = digest_of(receipt).hex()
    outbox.put(receipt, bytes.fromhex(digest))
    holder = _hold_flock_elsewhere(outbox.path / f"{digest}.json", new_pid_namespace=True)
    try:
        assert outbox.claim(digest) == "busy"
    finally:
        _release(holder, outbox.path / f"{digest}.json")
    claim = outbox.claim(digest)
    assert not isinstance(claim, str)
    outbox.remove(digest)  # delivered while claimed
    claim.release()
    assert outbox.claim(digest) == "gone"


def test_a_v2_offline_receipt_is_filed_and_read_under_its_own_v2_digest(tmp_path, caplog):
    """A plugin submitter gets tops-receipt/2 fiat-shamir receipts through the v1 outbox: the
    outbox must name and check them by v2's digest, or it re-files them under a v1 digest and
    the run never sends them."""
    vector = [json.loads(line) for line in (VECTORS_DIR / "v2" / "valid.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "fiat-shamir"][0]
    receipt, digest = vector["commitment"], bytes.fromhex(vector["digest"])
    outbox = Outbox(tmp_path / "outbox")
    outbox.put_held(receipt, digest)
    outbox.unhold(digest.hex())
    assert outbox.acquire()
    assert outbox.recover() == [digest.hex()]
    assert outbox.load(digest.hex()) == receipt
    assert "re-filed" not in caplog.text and not outbox.quarantine_dir.exists()
