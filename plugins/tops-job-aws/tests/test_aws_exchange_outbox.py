"""tops-receipt/2 attempts in S3 (`S3ExchangeStore`) against a moto server on loopback: the
local v2 outbox's semantics, write-once commitments, and ownership by claims and leases so
two runs never resume the same attempt."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest

from tops_job import AWAITING_CHALLENGE, AWAITING_VERDICT, CHALLENGED, ExchangeStore, StorageError
from tops_job_aws.s3_exchange import S3ExchangeStore
from tops_job_aws.s3_leases import Claims, RunLease, S3Objects

PREFIX = "fleet/outbox"
TTL = 3.0
LEAVES = bytes(range(32)) * 4  # four leaf hashes


def _digest(n: int) -> str:
    return f"{n:064x}"


def _commitment(n: int) -> dict:
    return {"schema": "tops-receipt/2", "n": n, "sig": "00" * 65}


class Run:
    """One run's view of the outbox: its own lease and claims on a shared prefix."""

    def __init__(self, s3, bucket, ttl=TTL, prefix=PREFIX):
        self.objects = S3Objects(s3, bucket, prefix)
        self.lease = RunLease(self.objects, ttl)
        self.claims = Claims(self.objects, self.lease)
        self.store = S3ExchangeStore(self.objects, self.lease, self.claims)

    def die(self):
        """kill -9: renewal stops, the lease object stays as last written (expires after ttl)."""
        body = self.objects.read(self.lease.name).body
        self.lease.stop()
        self.objects.write(self.lease.name, body)


@pytest.fixture
def runs(s3, bucket, monkeypatch):
    monkeypatch.setattr(logging.getLogger("tops_job"), "propagate", True)  # a CLI run in this process turns it off
    made = []

    def make(**kw):
        run = Run(s3, bucket, **kw)
        made.append(run)
        return run

    yield make
    for run in made:
        run.lease.stop()


def _keys(s3, bucket, under=""):
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{PREFIX}/{under}"):
        found += [item["Key"][len(PREFIX) + 1:] for item in page.get("Contents", ())]
    return sorted(found)


def _body(s3, bucket, name):
    return s3.get_object(Bucket=bucket, Key=f"{PREFIX}/{name}")["Body"].read()


def test_is_an_exchange_store_named_by_its_url(runs, bucket):
    store = runs().store
    assert isinstance(store, ExchangeStore)
    assert store.location == f"s3://{bucket}/{PREFIX}/v2"
    assert store.withheld_location == f"s3://{bucket}/{PREFIX}/v2/withheld"


def test_an_attempt_from_commitment_to_verdict(runs, s3, bucket):
    run = runs()
    store, digest = run.store, _digest(1)
    store.put(_commitment(1), digest, LEAVES)
    assert _keys(s3, bucket, "v2/") == [f"v2/{digest}.commit.json", f"v2/{digest}.leaves"]
    assert json.loads(_body(s3, bucket, f"claims/v2/{digest}")) == {"owner": run.lease.token}
    assert store.load(digest, "commit.json") == _commitment(1)
    assert store.leaf_hashes(digest) == [bytes(range(32))] * 4
    assert store.state(digest) == AWAITING_CHALLENGE and store.pending() == {digest: AWAITING_CHALLENGE}

    store.put_challenge(digest, {"leaves": [0, 2]})
    assert store.state(digest) == CHALLENGED and store.load(digest, "challenge.json") == {"leaves": [0, 2]}
    store.put_opened(digest, {"digest": digest, "openings": []})
    assert store.state(digest) == AWAITING_VERDICT and store.pending() == {digest: AWAITING_VERDICT}
    store.drop_challenge(digest)  # the aggregator lost it: it draws again
    assert store.state(digest) == AWAITING_CHALLENGE and store.load(digest, "challenge.json") is None

    store.finish(digest, "accepted", {"status": 200, "verdict": "accepted"})
    assert store.verdict(digest) == {"digest": digest, "verdict": "accepted",
                                     "answer": {"status": 200, "verdict": "accepted"}}
    assert _keys(s3, bucket, "v2/") == [f"v2/done/{digest}.json"]
    assert _keys(s3, bucket, "claims/") == []  # its claim went with it
    assert store.state(digest) is None and store.pending() == {}


def test_a_rejected_or_expired_verdict_keeps_the_commitment(runs):
    store = runs().store
    for n, verdict in ((2, "rejected"), (3, "expired")):
        store.put(_commitment(n), _digest(n), LEAVES)
        store.finish(_digest(n), verdict, {"status": 422 if n == 2 else 410, "error": "x"})
        record = store.verdict(_digest(n))
        assert record["verdict"] == verdict and record["commitment"] == _commitment(n)
    assert store.pending() == {}


def test_a_commitment_is_written_once_and_never_overwritten(runs, s3, bucket, caplog):
    first, other = runs(), runs()
    digest = _digest(4)
    first.store.put(_commitment(4), digest, LEAVES)
    with caplog.at_level(logging.WARNING, logger="tops_job_aws"):
        first.store.put(_commitment(99), digest, LEAVES)  # the same run again (a retried put)
    assert "the stored commitment is kept" in caplog.text
    with pytest.raises(StorageError, match=f"s3://{bucket}/{PREFIX}/claims/v2/{digest}.*another live run"):
        other.store.put(_commitment(98), digest, LEAVES)
    assert json.loads(_body(s3, bucket, f"v2/{digest}.commit.json")) == _commitment(4)
    # and S3 itself refuses a second create
    assert first.objects.create(f"v2/{digest}.commit.json", b"{}") is None


def test_held_attempts_wait_for_their_audit(runs, s3, bucket):
    run, other = runs(), runs()
    store = run.store
    store.put(_commitment(5), _digest(5), LEAVES, held=True)
    store.put(_commitment(6), _digest(6), LEAVES, held=True)
    assert _body(s3, bucket, f"v2/{_digest(5)}.held").decode().strip() == run.lease.token
    assert store.pending() == {}  # out of every sender's sight
    assert other.store.held_by_live_run(_digest(5)) and not store.held_by_live_run(_digest(5))
    store.unhold(_digest(5))
    assert store.pending() == {_digest(5): AWAITING_CHALLENGE}

    store.withhold(_digest(6), "tile 3 differs")
    assert _keys(s3, bucket, "v2/withheld/") == [f"v2/withheld/{_digest(6)}.{k}" for k in
                                                  ("commit.json", "leaves", "reason.json")]
    assert json.loads(_body(s3, bucket, f"v2/withheld/{_digest(6)}.reason.json"))["reason"] == "tile 3 differs"
    assert json.loads(_body(s3, bucket, f"v2/withheld/{_digest(6)}.commit.json")) == _commitment(6)
    assert not any(key.startswith(f"v2/{_digest(6)}") for key in _keys(s3, bucket, "v2/"))
    assert f"claims/v2/{_digest(6)}" not in _keys(s3, bucket, "claims/")
    assert store.pending() == {_digest(5): AWAITING_CHALLENGE}


def test_only_one_live_run_resumes_earlier_attempts(runs):
    a, b = runs(), runs()
    assert a.store.acquire() and a.store.acquire()  # taking it again is harmless
    assert not b.store.acquire()
    a.store.release()
    assert b.store.acquire()


def test_a_dead_runs_attempts_are_resumed_by_exactly_one_of_two_racing_runs(runs, s3, bucket, caplog):
    dead = runs()
    digests = [_digest(n) for n in range(10, 22)]
    for n, digest in enumerate(digests):
        dead.store.put(_commitment(n), digest, LEAVES, held=(n == 0))
        if n % 3 == 1:
            dead.store.put_challenge(digest, {"leaves": [1]})
    dead.objects.write(f"v2/{_digest(30)}.leaves", LEAVES)  # died before its commitment
    dead.objects.write(f"v2/{_digest(30)}.held", dead.lease.token.encode())
    dead.claims.take(f"v2/{_digest(30)}")
    dead.claims.take(f"v2/{_digest(31)}")  # died after its verdict, before letting go of the claim
    dead.store.acquire()
    dead.die()

    b, c = runs(), runs()
    assert b.store.recover() == {} and not b.store.acquire()  # its lease has not expired yet
    time.sleep(TTL + 1.5)
    results: dict[str, dict[str, str]] = {}
    barrier = threading.Barrier(2)

    def recover(name, run):
        barrier.wait()
        results[name] = run.store.recover()

    with caplog.at_level(logging.INFO, logger="tops_job_aws"):
        threads = [threading.Thread(target=recover, args=(name, run)) for name, run in (("b", b), ("c", c))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    resumed_b, resumed_c = set(results["b"]), set(results["c"])
    assert not resumed_b & resumed_c  # never the same attempt twice
    assert resumed_b | resumed_c == set(digests)  # none left behind
    for result in results.values():
        for digest, state in result.items():
            assert state == (CHALLENGED if digests.index(digest) % 3 == 1 else AWAITING_CHALLENGE)
    assert "never audited" in caplog.text
    keys = _keys(s3, bucket, "v2/")
    assert not any(key.endswith(".held") for key in keys)
    assert not any(key.startswith(f"v2/{_digest(30)}") for key in keys)  # the orphan leaves went
    # the resumed attempts' claims (now b's and c's) and the dead run's .drain (until a run acquires it)
    assert _keys(s3, bucket, "claims/") == sorted([f"claims/v2/{d}" for d in digests] + ["claims/v2/.drain"])

    # each sends only its own: the other's attempts read as nothing to it
    mine, theirs = (b, c) if resumed_b else (c, b)
    some = next(iter(resumed_b or resumed_c))
    assert mine.store.load(some, "commit.json") is not None
    assert theirs.store.load(some, "commit.json") is None
    assert c.store.recover() == {} and b.store.recover() == {}  # nothing more to take while both live
    assert b.store.acquire() and not c.store.acquire()  # the dead run's .drain is taken over once


def test_resumed_in_commitment_order(runs):
    dead = runs()
    order = [_digest(n) for n in (44, 41, 43, 42)]
    for digest in order:
        dead.store.put(_commitment(0), digest, LEAVES)
        time.sleep(1.05)  # Last-Modified has one-second resolution
    dead.lease.stop()  # a clean stop deletes the lease: its claims are free at once
    assert list(runs().store.recover()) == order


def test_a_run_killed_inside_finish_is_tidied(runs, s3, bucket):
    dead = runs()
    digest = _digest(50)
    dead.store.put(_commitment(50), digest, LEAVES)
    dead.store.put_challenge(digest, {"leaves": [0]})
    dead.objects.write(f"v2/done/{digest}.json", b'{"verdict":"accepted"}')  # then kill -9
    dead.lease.stop()
    fresh = runs()
    assert fresh.store.recover() == {}
    assert _keys(s3, bucket, "v2/") == [f"v2/done/{digest}.json"]
    assert _keys(s3, bucket, "claims/") == []


def test_garbage_under_v2_never_stops_recovery(runs, s3, bucket):
    run = runs()
    good = _digest(60)
    run.store.put(_commitment(60), good, LEAVES)
    run.lease.stop()
    junk = {
        "v2/not-a-digest.commit.json": b"{}",
        f"v2/{_digest(61).upper()}.commit.json": b"{}",
        f"v2/{_digest(62)}.commit.json": b"\xff{not json",
        f"v2/{_digest(63)}.commit.json": b"[1, 2]",
        f"v2/{_digest(63)}.leaves": b"x" * 33,
        f"v2/{_digest(64)}.held": b"\x00\xff",
        f"v2/{_digest(65)}.whatever": b"",
        "v2/done/garbage.json": b"[",
        "v2/sub/dir/thing": b"",
        f"claims/v2/{_digest(62)}": b"not json",  # a claim this code did not write: abandoned
    }
    for name, body in junk.items():
        s3.put_object(Bucket=bucket, Key=f"{PREFIX}/{name}", Body=body)
    store = runs().store
    recovered = store.recover()
    assert set(recovered) == {good, _digest(62), _digest(63)}
    assert store.load(_digest(62), "commit.json") is None and store.load(_digest(63), "commit.json") is None
    assert store.leaf_hashes(_digest(63)) is None  # not a multiple of 32 bytes
    assert store.load(good, "commit.json") == _commitment(60)
    keys = _keys(s3, bucket, "v2/")
    for name in junk:
        if name.startswith("v2/") and _digest(64) not in name:
            assert name in keys, name  # not this store's: left alone
    assert f"v2/{_digest(64)}.held" not in keys  # a dead run's marker without a commitment goes
    with pytest.raises(ValueError, match="not a v2 attempt digest"):
        store.load("../../etc", "commit.json")


def test_a_run_whose_lease_is_not_fresh_sends_nothing(runs, caplog):
    run = runs()
    run.store.put(_commitment(70), _digest(70), LEAVES)
    run.lease.stop()  # as if renewal had failed for half its life
    with caplog.at_level(logging.WARNING, logger="tops_job_aws"):
        assert run.store.load(_digest(70), "commit.json") is None
    assert "not fresh" in caplog.text


def test_an_unreachable_store_is_a_storage_error_naming_the_url():
    import boto3
    from botocore.config import Config

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    client = boto3.client("s3", region_name="us-east-1", endpoint_url=f"http://127.0.0.1:{port}",
                          aws_access_key_id="testing", aws_secret_access_key="testing",
                          config=Config(retries={"max_attempts": 1}, connect_timeout=1))
    objects = S3Objects(client, "nowhere", "p")
    lease = RunLease(objects, TTL)
    store = S3ExchangeStore(objects, lease, Claims(objects, lease))
    for call in (lambda: store.put(_commitment(1), _digest(1), LEAVES), store.recover, store.pending,
                 lambda: store.put_challenge(_digest(1), {"leaves": [0]}), lambda: store.verdict(_digest(1))):
        with pytest.raises(StorageError, match=r"s3://nowhere/p/"):
            call()


# ---- end to end: real `tops-job run` processes, a real aggregator, the outbox in moto's S3


class CountingProxy:
    """A real HTTP server in front of the aggregator that counts, per attempt digest, the
    commitments and opened sets posted through it. POSTs after the first `forward` are
    answered 503 (the exchange down, the run challenge still served)."""

    def __init__(self, upstream: str, forward: int | None = None):
        from collections import Counter
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import requests

        from tops_job.spec.v2 import digest_of

        self.commits: Counter[str] = Counter()
        self.opens: Counter[str] = Counter()
        self.forward = forward
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                answer = requests.get(upstream + self.path, timeout=10)
                self._answer(answer.status_code, answer.content)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with proxy._lock:
                    refuse = proxy.forward is not None and proxy.forward <= 0
                    if proxy.forward is not None:
                        proxy.forward -= 1
                if refuse:
                    return self._answer(503, b'{"ok":false,"error":"down"}')
                envelope = json.loads(body)
                answer = requests.post(upstream + self.path, data=body, timeout=30,
                                       headers={"Content-Type": "application/json"})
                with proxy._lock:  # counted once the aggregator has it
                    if "commit" in envelope:
                        proxy.commits[digest_of(envelope["commit"]).hex()] += 1
                    for item in envelope.get("open", ()):
                        proxy.opens[item["digest"]] += 1
                self._answer(answer.status_code, answer.content)

            def _answer(self, status, body):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def agg(tmp_path, aws_env):
    from tests.support.peers import Aggregator

    server = Aggregator(tmp_path / "agg.sqlite3", accept="v2")
    yield server
    server.stop()


def _run_env(tmp_path, bucket, name, **extra):
    from tests.support.peers import worker_env

    env = worker_env(tmp_path, TOPS_JOB_S3_OUTBOX_URL=f"s3://{bucket}/{PREFIX}", TOPS_JOB_S3_OUTBOX_LEASE_S=str(TTL),
                     TOPS_JOB_DATA_DIR=str(tmp_path / f"data-{name}"), **extra)  # each run a fresh instance's disk
    for local in ("TOPS_JOB_PROTOCOL", "TOPS_JOB_OUTBOX_DIR"):  # v2 (the default), the outbox in S3
        env.pop(local)
    return env


def _command(tmp_path, url, attempts, name):
    from tests.support.peers import CLI

    return [*CLI, "run", "--size", "96,96,256", "--attempts", str(attempts), "--aggregator-url", url,
            "--receipts-out", str(tmp_path / f"{name}.jsonl"), "--summary", str(tmp_path / f"{name}.summary.json")]


def _signed(path):
    from tests.support.peers import signed_digests

    return set(signed_digests(path))


def _commits_in(s3, bucket):
    return {key[3:67] for key in _keys(s3, bucket, "v2/") if key.endswith(".commit.json") and "/" not in key[3:]}


def _killed_run(tmp_path, s3, bucket, agg, *, forward: int, at_least: int, **extra):
    """`tops-job run` that exchanges its first `forward` requests, then finds the exchange
    down, and is killed -9 once `at_least` commitments wait in the bucket: what it left."""
    import subprocess

    proxy = CountingProxy(agg.base, forward)
    proc = subprocess.Popen(_command(tmp_path, proxy.base, 400, "dead"), env=_run_env(tmp_path, bucket, "dead", **extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(_commits_in(s3, bucket)) < at_least and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        proc.kill()
        proc.wait(10)
    finally:
        proc.kill()
        proxy.close()
    time.sleep(0.5)  # a request the run had sent whole before the kill may still land
    left = _commits_in(s3, bucket)
    assert len(left) >= at_least
    return left, _signed(tmp_path / "dead.jsonl")


def test_a_killed_runs_attempts_in_s3_are_accepted_once_by_a_run_on_a_fresh_disk(tmp_path, aws_env, s3, bucket, agg):
    import subprocess

    # every attempt held for the self-audit first: written held, released once verified
    left, signed = _killed_run(tmp_path, s3, bucket, agg, forward=3, at_least=6, TOPS_JOB_AUDIT_EVERY="1")
    # the outbox is written before the receipt sinks: the kill may land between the two for
    # the one attempt in flight, so at most one commitment in the bucket is not in --receipts-out
    assert len(left - signed) <= 1
    time.sleep(TTL + 1.5)  # the dead run's lease expires
    proxy = CountingProxy(agg.base)
    try:
        result = subprocess.run(_command(tmp_path, proxy.base, 1, "next"), capture_output=True, text=True,
                                env=_run_env(tmp_path, bucket, "next", TOPS_JOB_AUDIT_EVERY="1"), timeout=120)
    finally:
        proxy.close()
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(left)} v2 attempts from earlier runs" in result.stderr
    summary = json.loads((tmp_path / "next.summary.json").read_text())
    assert summary["receipts"]["accepted"] == len(left) + 1 and summary["receipts"]["pending"] == 0
    assert summary["device_checks"]["self_audit"]["audited"] == 1  # its own attempt was held, audited, then sent
    accepted = agg.v2_accepted()
    assert len(accepted) == len(set(accepted))
    assert left | _signed(tmp_path / "next.jsonl") <= set(accepted)  # the dead run's and its own
    assert all(proxy.opens[digest] == 1 for digest in left)  # each opened once, by the run that resumed it
    assert _commits_in(s3, bucket) == set()
    done = {key[len("v2/done/"):-5] for key in _keys(s3, bucket, "v2/done/")}
    assert left <= done
    assert not [key for key in _keys(s3, bucket, "v2/") if key.endswith((".leaves", ".held", ".challenge.json"))]


def test_two_concurrent_runs_never_send_the_same_attempt(tmp_path, aws_env, s3, bucket, agg):
    import subprocess

    left, _ = _killed_run(tmp_path, s3, bucket, agg, forward=0, at_least=8)
    time.sleep(TTL + 1.5)
    proxy = CountingProxy(agg.base)
    try:
        procs = [subprocess.Popen(_command(tmp_path, proxy.base, 3, name), env=_run_env(tmp_path, bucket, name),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for name in "bc"]
        errs = [proc.communicate(timeout=120)[1] for proc in procs]
    finally:
        proxy.close()
    assert [proc.returncode for proc in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]
    assert sum(f"{len(left)} v2 attempts from earlier runs" in err for err in errs) == 1  # one resumed them
    own = _signed(tmp_path / "b.jsonl") | _signed(tmp_path / "c.jsonl")
    assert len(own) == 6
    sent = left | own
    assert set(proxy.commits) == sent and set(proxy.opens) == sent
    assert max(proxy.commits.values()) == 1 and max(proxy.opens.values()) == 1  # never twice
    accepted = agg.v2_accepted()
    assert sorted(accepted) == sorted(sent)
    assert _commits_in(s3, bucket) == set()
