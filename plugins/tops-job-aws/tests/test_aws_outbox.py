"""The S3 outbox against a moto server on loopback: leases and claims, the directory
outbox's semantics kept in S3, abuse of the bucket's contents, and real runs that die with
receipts in the bucket and a later run, on another data directory, that delivers them."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support import CLI
from tests.support.peers import Aggregator, FaultProxy, run_worker, signed_digests, signed_receipts, start_worker, worker_env
from tops_job import ConfigError, StorageError, digest_of_any, receipt_line
from tops_job_aws import tops_job_outbox
from tops_job_aws.s3_leases import Claims, RunLease, S3Objects
from tops_job_aws.s3_outbox import MAX_ENTRY, S3Outbox, S3ReceiptStore

LEASE_S = 3.0
PREFIX = "fleet/outbox"


@pytest.fixture(scope="module")
def receipts() -> list[dict[str, Any]]:
    return signed_receipts(6, run_id="s3-outbox")


@pytest.fixture
def backend(s3: Any, bucket: str) -> S3Outbox:
    return S3Outbox(bucket, PREFIX, s3, LEASE_S)


@pytest.fixture
def stores(backend: S3Outbox):
    """backend.receipts(), each released at the end of the test."""
    made = []

    def make():
        made.append(backend.receipts())
        return made[-1]

    yield make
    for store in made:
        store.release()


def hexd(receipt: dict[str, Any]) -> str:
    return digest_of_any(receipt).hex()


def line(receipt: dict[str, Any]) -> bytes:
    return (receipt_line(receipt) + "\n").encode("ascii")


def keys(s3: Any, bucket: str, under: str = "") -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{PREFIX}/{under}")
    return {item["Key"][len(PREFIX) + 1:] for page in pages for item in page.get("Contents", ())}


def body(s3: Any, bucket: str, name: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=f"{PREFIX}/{name}")["Body"].read()


# ---- leases and claims

HOLDER = """
import os, sys, time
import boto3
from tops_job_aws.s3_outbox import S3Outbox
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
store = S3Outbox(sys.argv[1], sys.argv[2], s3, 3.0).receipts()
assert store.claims.take("entry-1") and store.acquire()
print(store.lease.token, flush=True)
time.sleep(120)
"""


def test_a_killed_runs_claims_are_taken_over_once_its_lease_expires(aws_env, s3, backend, bucket, stores, caplog):
    caplog.set_level("INFO", logger="tops_job_aws.outbox")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, bucket, PREFIX], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        token = holder.stdout.readline().strip()
        assert token, "the holder did not start"
        other = stores()
        assert other.claims.owner("entry-1") == token
        assert not other.claims.take("entry-1") and not other.acquire()  # a live run's, renewed
        time.sleep(LEASE_S)
        assert not other.claims.take("entry-1"), "a lease renewed every ttl/3 must not expire"
        holder.kill()  # kill -9: no release, the lease object stays
        holder.wait(10)
        killed = time.monotonic()
        while not other.claims.take("entry-1"):
            assert time.monotonic() - killed < LEASE_S + 3, "the dead run's claim was never taken over"
            time.sleep(0.2)
        assert time.monotonic() - killed >= LEASE_S - 1.5  # not before its lease could have lapsed
    finally:
        holder.kill()
        holder.wait(10)
    assert other.acquire()
    assert other.claims.owner("entry-1") == other.lease.token
    assert "took over entry-1" in caplog.text
    # the dead run's lease object is still there; it goes once it is two lease lives old
    dead = f"leases/{token}.json"
    assert dead in keys(s3, bucket, "leases/")
    assert other.lease.sweep() == 0 or time.monotonic() - killed >= 2 * LEASE_S
    time.sleep(max(0.0, 2 * LEASE_S + 1.5 - (time.monotonic() - killed)))
    other.recover()  # sweeps
    assert dead not in keys(s3, bucket, "leases/")
    assert other.lease.name in keys(s3, bucket, "leases/")  # a live run's stays


def _race(objects: S3Objects, names: list[str], takers: int) -> dict[str, list[str]]:
    """`takers` runs (each with its own lease) take every name at once; name -> winners."""
    leases = [RunLease(objects, LEASE_S) for _ in range(takers)]
    for lease in leases:
        lease.start()
    won: dict[str, list[str]] = {name: [] for name in names}
    mutex, barrier = threading.Lock(), threading.Barrier(takers)

    def take(lease: RunLease) -> None:
        claims = Claims(objects, lease)
        order = random.Random(lease.token).sample(names, len(names))
        barrier.wait()
        for name in order:
            if claims.take(name):
                with mutex:
                    won[name].append(lease.token)

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for lease in leases:
        lease.stop()
    return won


def test_racing_takers_exactly_one_wins_each_free_or_abandoned_claim(s3, bucket):
    objects = S3Objects(s3, bucket, PREFIX)
    free = [f"free-{i}" for i in range(20)]
    won = _race(objects, free, 8)
    assert all(len(winners) == 1 for winners in won.values()), won
    # claims left by a run with no lease (dead long ago): each taken over by exactly one
    abandoned = [f"abandoned-{i}" for i in range(10)]
    for name in abandoned:
        objects.create(f"claims/{name}", json.dumps({"owner": "0" * 32}).encode())
    won = _race(objects, abandoned, 8)
    assert all(len(winners) == 1 for winners in won.values()), won


def test_a_lease_claiming_a_longer_life_is_judged_by_it(s3, bucket):
    objects = S3Objects(s3, bucket, PREFIX)
    objects.write("leases/slow.json", json.dumps({"token": "slow", "ttl_s": 600}).encode())
    objects.write("leases/huge.json", json.dumps({"token": "huge", "ttl_s": 1e300}).encode())
    objects.write("leases/junk.json", b"\xff not json")
    lease = RunLease(objects, LEASE_S)
    time.sleep(1.2)
    assert lease.alive("slow") and lease.alive("huge")  # capped at a day, still alive
    assert lease.alive("junk")  # judged by our own ttl: written 1.2 s ago
    assert not lease.alive("never-written")
    with pytest.raises(ValueError):
        RunLease(objects, 2.0)


# ---- the directory outbox's semantics


def test_put_is_create_only_and_idempotent(s3, bucket, stores, receipts):
    store = stores()
    digest = digest_of_any(receipts[0])
    assert store.put(receipts[0], digest) == f"s3://{bucket}/{PREFIX}/receipts/{digest.hex()}.json"
    first = s3.head_object(Bucket=bucket, Key=f"{PREFIX}/receipts/{digest.hex()}.json")
    store.put(receipts[0], digest)
    again = s3.head_object(Bucket=bucket, Key=f"{PREFIX}/receipts/{digest.hex()}.json")
    assert (first["ETag"], first["LastModified"]) == (again["ETag"], again["LastModified"])  # never overwritten
    assert store.count() == 1 and store.holds(digest.hex())
    assert store.load(digest.hex()) == receipts[0]
    assert store.location == f"s3://{bucket}/{PREFIX}"


def test_held_receipts_unhold_withhold_and_a_dead_runs_are_promoted(s3, bucket, stores, receipts, caplog):
    run, later = stores(), stores()
    verified, failed, unaudited = receipts[:3]
    for receipt in (verified, failed, unaudited):
        run.put_held(receipt, digest_of_any(receipt))
    assert run.count() == 0 and len(keys(s3, bucket, "held/")) == 3  # durable, out of the senders' sight
    run.unhold(hexd(verified))
    run.withhold(hexd(failed), "self-audit: wrong_product")
    assert run.count() == 1 and keys(s3, bucket, "held/") == {f"held/{hexd(unaudited)}.{run.lease.token}.json"}
    assert json.loads(body(s3, bucket, f"withheld/{hexd(failed)}.reason.json"))["reason"] == "self-audit: wrong_product"
    assert body(s3, bucket, f"withheld/{hexd(failed)}.json") == line(failed)

    assert later.recover() == [hexd(verified)]  # the held one's run is alive: it stays held
    run.release()  # the run ends without auditing it (its lease goes)
    with caplog.at_level("WARNING", logger="tops_job_aws.outbox"):
        waiting = later.recover()
    assert sorted(waiting) == sorted([hexd(verified), hexd(unaudited)])
    assert "never audited" in caplog.text and not keys(s3, bucket, "held/")
    assert later.load(hexd(unaudited)) == unaudited
    assert not keys(s3, bucket, "quarantine/")
    # the run, alive after all (its lease had lapsed), finishes its audit: nothing raises, the
    # receipt is where the other run put it, and the summary's problems say what happened
    run.unhold(hexd(unaudited))
    assert run.problems["held_receipt_taken_over"] == 1 and later.holds(hexd(unaudited))


def test_claims_keep_senders_apart(s3, bucket, stores, receipts, caplog):
    first, second = stores(), stores()
    digest = hexd(receipts[0])
    assert first.claim(digest) == "gone"  # nothing stored under it
    first.put(receipts[0], digest_of_any(receipts[0]))
    claim = first.claim(digest)
    assert not isinstance(claim, str) and claim.digest == digest
    assert first.claim(digest) == "busy"  # another sender thread of the same run
    assert second.claim(digest) == "busy"  # another live run
    assert first.remove(digest)
    claim.release()
    assert second.claim(digest) == "gone"  # delivered meanwhile
    assert not keys(s3, bucket, "claims/")

    second.put(receipts[1], digest_of_any(receipts[1]))
    assert first.acquire() and not second.acquire()
    second.lease.stop()  # its lease can no longer be renewed: it must not start a send
    with caplog.at_level("WARNING", logger="tops_job_aws.outbox"):
        assert second.claim(hexd(receipts[1])) == "busy"
    assert "lease" in caplog.text


def test_reject_keeps_the_answer_beside_and_answers_are_noted_and_forgotten(s3, bucket, backend, stores, receipts):
    store = stores()
    rejected, waiting, delivered = receipts[:3]
    for receipt in (rejected, waiting, delivered):
        store.put(receipt, digest_of_any(receipt))
    store.note_answer(hexd(waiting), {"status": 401, "error": "unauthorized"})
    store.note_answer(hexd(delivered), {"status": 503})
    assert store.remove(hexd(delivered)) and store.remove(hexd(delivered))  # twice: gone is gone
    assert store.reject(hexd(rejected), {"status": 422, "error": "bad_signature"})
    assert store.reject(hexd(rejected), {"status": 422})  # already moved
    assert keys(s3, bucket, "rejected/") == {f"rejected/{hexd(rejected)}.json", f"rejected/{hexd(rejected)}.answer.json"}
    assert keys(s3, bucket, "answers/") == {f"answers/{hexd(waiting)}.json"}
    assert store.count() == 1 and store.rejected_location == f"s3://{bucket}/{PREFIX}/rejected"

    listing = backend.inventory()
    assert listing["outbox"] == f"s3://{bucket}/{PREFIX}"
    assert [(p["digest"], p["run_id"], p["attempt"], p["last_answer"]["status"]) for p in listing["pending"]] == \
        [(hexd(waiting), "s3-outbox", waiting["attempt"], 401)]
    assert listing["rejected"] == [{"digest": hexd(rejected), "run_id": "s3-outbox", "attempt": rejected["attempt"],
                                    "did": rejected["did"], "answer": {"status": 422, "error": "bad_signature"}}]
    assert listing["quarantined"] == [] and listing["held_for_self_audit"] == 0 and listing["withheld"] == []
    assert backend.waiting() == 1


# ---- abuse: what else may be in the bucket


def test_corrupt_huge_and_misfiled_objects_are_set_aside_never_sent(s3, bucket, stores, receipts, caplog):
    store = stores()
    garbage, huge, misfiled, wrong_name = (hexd(r) for r in receipts[:4])
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/receipts/{garbage}.json", Body=b'{"sig": "00", "nonce": 1, "x": \xff')
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/receipts/{huge}.json", Body=b"[" * (MAX_ENTRY + 1))
    # a whole receipt under another's name: it is re-filed under its own digest, never dropped
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/receipts/{wrong_name}.json", Body=line(receipts[2]))
    with caplog.at_level("WARNING", logger="tops_job_aws.outbox"):
        assert store.load(garbage) is None and store.load(huge) is None
        assert store.load(wrong_name) is None
    assert keys(s3, bucket, "quarantine/") == {f"quarantine/{garbage}.json", f"quarantine/{huge}.json"}
    assert store.quarantined == 2 and "quarantined" in caplog.text
    assert keys(s3, bucket, "receipts/") == {f"receipts/{misfiled}.json"} and store.load(misfiled) == receipts[2]

    # put() finds its name taken by other content: that content is set aside, the receipt stored
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/receipts/{wrong_name}.json", Body=b"not a receipt")
    store.put(receipts[3], digest_of_any(receipts[3]))
    assert store.load(wrong_name) == receipts[3]
    assert f"quarantine/{wrong_name}.json" in keys(s3, bucket, "quarantine/")


def test_objects_that_are_not_entries_are_quarantined_and_others_left_alone(s3, bucket, stores, receipts):
    store = stores()
    store.put(receipts[0], digest_of_any(receipts[0]))
    strays = ["receipts/notes.txt", "receipts/ABC.json", "receipts/sub/dir.json", f"receipts/{hexd(receipts[1])}.json.bak"]
    for name in strays:
        s3.put_object(Bucket=bucket, Key=f"{PREFIX}/{name}", Body=b"x")
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/README.txt", Body=b"the operator's own file")
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/receipts/", Body=b"")  # the S3 console's "folder"
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/held/not-a-held-name.json", Body=b"x")
    assert store.recover() == [hexd(receipts[0])]
    assert keys(s3, bucket, "quarantine/") == {"quarantine/" + name.split("/", 1)[1] for name in strays}
    assert store.quarantined == len(strays)
    assert {"README.txt", "held/not-a-held-name.json", "receipts/"} <= keys(s3, bucket)


def test_s3_failures_are_storage_errors_naming_the_url(aws_env, s3, bucket, receipts):
    import boto3
    from botocore.config import Config

    with pytest.raises(StorageError, match=r"cannot write s3://no-such-bucket-for-outbox/box/leases/.*NoSuchBucket"):
        S3Outbox("no-such-bucket-for-outbox", "box", s3, LEASE_S).receipts()
    # the store unreachable mid-run (a closed loopback port), the run's lease still fresh
    dead = S3Objects(boto3.client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                                  config=Config(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=1)), bucket, PREFIX)
    lease = RunLease(S3Objects(s3, bucket, PREFIX), LEASE_S)
    lease.start()
    store = S3ReceiptStore(dead, lease, Claims(dead, lease))
    digest = digest_of_any(receipts[0])
    try:
        assert store.claim(digest.hex()) == "unreadable"  # parked, not declared gone
        assert store.holds(digest.hex()) and store.load(digest.hex()) is None
        assert not store.remove(digest.hex()) and not store.reject(digest.hex(), {"status": 422})
        store.note_answer(digest.hex(), {"status": 503})
        assert {"unreadable_entry", "unremovable_entry", "unmovable_rejection", "unrecordable_answer"} <= set(store.problems)
        with pytest.raises(StorageError, match=rf"cannot write s3://{bucket}/{PREFIX}/receipts/{digest.hex()}\.json"):
            store.put(receipts[0], digest)
        with pytest.raises(StorageError, match=rf"s3://{bucket}/{PREFIX}/held/{digest.hex()}\.{lease.token}\.json"):
            store.put_held(receipts[0], digest)
        with pytest.raises(StorageError, match=rf"cannot list s3://{bucket}/{PREFIX}/receipts/"):
            store.recover()
        with pytest.raises(StorageError, match=rf"s3://{bucket}/{PREFIX}/held/"):
            store.unhold(digest.hex())
    finally:
        lease.stop()


def test_the_hook_reads_its_settings_and_names_a_bad_one(aws_env, bucket, monkeypatch):
    assert tops_job_outbox(config=None) is None
    monkeypatch.setenv("TOPS_JOB_S3_OUTBOX_URL", f"s3://{bucket}/runs/box")
    backend = tops_job_outbox(config=None)
    assert isinstance(backend, S3Outbox) and backend.location == f"s3://{bucket}/runs/box" and backend.lease_s == 60
    for value in ("2", "abc", "nan", "1e9", "-5"):
        monkeypatch.setenv("TOPS_JOB_S3_OUTBOX_LEASE_S", value)
        with pytest.raises(ConfigError, match="TOPS_JOB_S3_OUTBOX_LEASE_S"):
            tops_job_outbox(config=None)
    monkeypatch.setenv("TOPS_JOB_S3_OUTBOX_LEASE_S", "4.5")
    assert tops_job_outbox(config=None).lease_s == 4.5
    monkeypatch.setenv("TOPS_JOB_S3_OUTBOX_URL", "https://bucket/box")
    with pytest.raises(ConfigError, match="TOPS_JOB_S3_OUTBOX_URL"):
        tops_job_outbox(config=None)


# ---- end to end: real runs, a real aggregator


E2E_LEASE_S = "4"


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/verify"


def s3_env(tmp: Path, bucket: str, name: str, **extra: str) -> dict[str, str]:
    """A worker's environment with the S3 outbox and its own, fresh data directory."""
    settings = {"TOPS_JOB_S3_OUTBOX_URL": f"s3://{bucket}/{PREFIX}", "TOPS_JOB_S3_OUTBOX_LEASE_S": E2E_LEASE_S,
                "TOPS_JOB_DATA_DIR": str(tmp / f"{name}-data"), "TOPS_JOB_OUTBOX_DIR": str(tmp / f"{name}-local-outbox"),
                "PYTHONPATH": os.pathsep.join(sys.path)}
    return worker_env(tmp, **{**settings, **extra})


def waiting_in_bucket(s3: Any, bucket: str) -> set[str]:
    """Digests stored under receipts/ or held/."""
    return {name.split("/")[1][:64] for name in keys(s3, bucket) if name.startswith(("receipts/", "held/"))}


def wait_for_dead_leases(objects: S3Objects) -> None:
    judge = RunLease(objects, float(E2E_LEASE_S))
    deadline = time.monotonic() + 3 * float(E2E_LEASE_S)
    while any(judge.alive(item.key[len("leases/"):-5]) for item in objects.list("leases/")):
        assert time.monotonic() < deadline, "a killed run's lease never expired"
        time.sleep(0.25)


@pytest.fixture
def aggregator(tmp_path: Path):
    agg = Aggregator(tmp_path / "aggregator.db")
    yield agg
    agg.stop()


def test_a_killed_run_s_receipts_are_delivered_by_a_run_on_another_machine(aws_env, s3, bucket, tmp_path, aggregator):
    """Run A signs with the aggregator down, so receipts pile up in the bucket, and is killed
    with SIGKILL; run B, with a fresh data directory (another instance), delivers each of
    them exactly once."""
    a = start_worker(tmp_path, closed_port_url(), "--protocol", "v1", "--attempts", "100000",
                     env=s3_env(tmp_path, bucket, "a"), name="a")
    try:
        deadline = time.monotonic() + 40
        while len(waiting_in_bucket(s3, bucket)) < 6:
            assert a.poll() is None, a.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "run A stored no receipts in the bucket"
            time.sleep(0.1)
    finally:
        a.kill()
        a.wait(10)
    time.sleep(0.5)  # a request the run had sent whole before the kill may still land
    left = waiting_in_bucket(s3, bucket)
    written = set(signed_digests(tmp_path / "a.jsonl"))
    assert left and written <= left  # nothing reached the aggregator; each written-out receipt is in the bucket
    assert not (tmp_path / "a-local-outbox").exists() or not list((tmp_path / "a-local-outbox").glob("*.json"))

    before = keys(s3, bucket)
    listing = subprocess.run([*CLI, "outbox", "--json"], env=s3_env(tmp_path, bucket, "look"), capture_output=True,
                             text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr[-3000:]
    shown = json.loads(listing.stdout)
    assert shown["outbox"] == f"s3://{bucket}/{PREFIX}"
    assert {entry["digest"] for entry in shown["pending"]} == {name[9:73] for name in before if name.startswith("receipts/")}
    assert shown["held_for_self_audit"] == sum(name.startswith("held/") for name in before)
    assert all(entry["run_id"] and entry["age_s"] >= 0 for entry in shown["pending"])
    assert keys(s3, bucket) == before  # listing takes no lease and writes nothing

    wait_for_dead_leases(S3Objects(s3, bucket, PREFIX))
    b = run_worker(tmp_path, aggregator.url, "--protocol", "v1", "--attempts", "1", env=s3_env(tmp_path, bucket, "b"),
                   name="b")
    assert b.returncode == 0, b.stderr[-3000:]
    stored = aggregator.digests()
    assert len(stored) == len(set(stored))  # none counted twice
    assert left | set(signed_digests(tmp_path / "b.jsonl")) == set(stored)
    assert waiting_in_bucket(s3, bucket) == set()
    summary = json.loads((tmp_path / "b.summary.json").read_text())
    assert summary["receipts"]["duplicate"] == 0 and summary["delivery"]["earlier_runs"] == len(left)
    assert summary["receipts"]["accepted"] == len(left) + 1


def test_concurrent_senders_never_send_the_same_entry(aws_env, s3, bucket, tmp_path, aggregator, receipts):
    """A run sends its own receipts (slowly) while the drain claim is held elsewhere; then two
    `tops-job outbox send` start together: one drains everything in the bucket, the run's
    in-flight receipts included, and the per-entry claims keep every receipt to one POST."""
    proxy = FaultProxy(aggregator.base, default="latency", latency_s=0.5)
    earlier = set()
    holder = S3Outbox(bucket, PREFIX, s3, float(E2E_LEASE_S)).receipts()
    for receipt in receipts:
        holder.put(receipt, digest_of_any(receipt))
        earlier.add(hexd(receipt))
    assert holder.acquire()  # an earlier run, still draining
    env = s3_env(tmp_path, bucket, "run", TOPS_JOB_SEND_CONCURRENCY="1")
    try:
        run = start_worker(tmp_path, proxy.url, "--protocol", "v1", "--attempts", "12", env=env, name="run")
        deadline = time.monotonic() + 60
        while len(signed_digests(tmp_path / "run.jsonl")) < 3:
            assert time.monotonic() < deadline and run.poll() is None, "the run signed nothing"
            time.sleep(0.05)
    finally:
        holder.release()
    senders = [subprocess.Popen([*CLI, "outbox", "send", "--aggregator-url", proxy.url],
                                env=s3_env(tmp_path, bucket, f"send{i}", TOPS_JOB_SEND_CONCURRENCY="4"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        for proc in (run, *senders):
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, (proc.args, err[-3000:])
    finally:
        for proc in (run, *senders):
            proc.kill()
        proxy.close()
    made = earlier | set(signed_digests(tmp_path / "run.jsonl"))
    assert len(made) == len(receipts) + 12
    sent_twice = {key: n for key, n in proxy.keys.items() if n != 1}
    assert not sent_twice, f"{len(sent_twice)} receipts sent more than once"
    assert set(proxy.keys) == made and set(aggregator.digests()) == made
    assert waiting_in_bucket(s3, bucket) == set() and not keys(s3, bucket, "claims/")


@pytest.mark.parametrize("command", [("run", "--protocol", "v1", "--attempts", "1"), ("outbox", "send"), ("outbox",)])
@pytest.mark.parametrize("variable,value", [("TOPS_JOB_S3_OUTBOX_URL", "https://bucket/box"),
                                            ("TOPS_JOB_S3_OUTBOX_LEASE_S", "1")])
def test_bad_outbox_settings_exit_2_naming_the_variable(aws_env, s3, bucket, tmp_path, command, variable, value):
    env = s3_env(tmp_path, bucket, "bad", AGGREGATOR_URL=closed_port_url(), **{variable: value})
    result = subprocess.run([*CLI, *command], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr[-3000:]
    assert variable in result.stderr
    assert not keys(s3, bucket)  # nothing was written before the check


def test_the_s3_backend_and_its_stores_offer_every_protocol_member(aws_env, backend):
    from tops_job import ExchangeStore, OutboxBackend, ReceiptStore

    assert isinstance(backend, OutboxBackend)
    receipts, exchanges = backend.receipts(), backend.exchanges()
    try:
        assert isinstance(receipts, ReceiptStore) and isinstance(exchanges, ExchangeStore)
    finally:
        receipts.release()
        exchanges.release()
