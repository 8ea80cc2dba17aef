"""The background sender in-process, against real peers on loopback: what it keeps in memory
while the aggregator is away, and how many sends a run spends on a flapping aggregator."""

from __future__ import annotations

import socket
import tracemalloc

from tests.support import TEST_KEY
from tests.support.peers import outbox_digests
from tops_job.compute.base import Shape
from tops_job.compute.numpy_backend import NumpyBackend
from tops_job.delivery.breaker import CircuitBreaker
from tops_job.delivery.http_submitter import HttpSubmitter
from tops_job.delivery.outbox import Outbox
from tops_job.delivery.ratelimit import TokenBucket
from tops_job.delivery.retry import RetryBudget, RetryPolicy
from tops_job.delivery.sender import OutboxDelivery
from tops_job.job.attempt import Identity, run_attempt
from tops_job.spec.canonical import digest_of
from tops_job.spec.signing import LocalKeySigner


def _dead_url() -> str:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/verify"


def test_a_long_outage_does_not_hold_every_receipt_in_memory(tmp_path):
    """The receipts are on disk in the outbox; while the aggregator is down the sender must
    not also keep each one in memory, or a long outage grows the worker without bound."""
    outbox = Outbox(tmp_path / "outbox")
    delivery = OutboxDelivery(outbox, HttpSubmitter(_dead_url(), connect_timeout=0.5), lambda event: None,
                              breaker=CircuitBreaker(threshold=1, cooldown_s=600), bucket=TokenBucket(1000.0),
                              workers=2)
    delivery.start()
    count, size = 300, 100_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(count):
            receipt = {"nonce": f"{index:064x}", "sig": "00" * 65, "pad": "x" * size + str(index)}
            delivery.enqueue(receipt, digest_of(receipt))
            del receipt
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    report = delivery.finish(0.5)
    assert report.pending == count and len(outbox_digests(outbox.path)) == count  # nothing lost
    assert grown < count * size / 3, f"{grown / 1e6:.1f} MB held for {count * size / 1e6:.0f} MB of receipts on disk"


def test_receipts_requeued_after_a_success_spend_the_run_retry_budget(tmp_path, aggregator, proxy_factory):
    """A receipt parked after its retries is sent again when the aggregator answers; those
    sends are retries and come out of the run's budget, so a flapping aggregator gets at most
    first sends + budget, not a fresh free round after every success."""
    identity = Identity(did=TEST_KEY["did"], signer=LocalKeySigner(bytes.fromhex(TEST_KEY["secret_key_hex"])))
    backend = NumpyBackend("float32")
    receipts = [run_attempt(backend, Shape(32, 32, 32), identity, run_id="flap", attempt=i, tile=8, opens=16).receipt
                for i in range(6)]
    proxy = proxy_factory()
    proxy.faults.extend(["503", "503", None] * 40)  # two failures, then one forwarded, over and over
    floor = 2
    delivery = OutboxDelivery(Outbox(tmp_path / "outbox"), HttpSubmitter(proxy.url), lambda event: None,
                              policy=RetryPolicy(max_retries=0), budget=RetryBudget(floor=floor, ratio=0.0),
                              breaker=CircuitBreaker(threshold=1000), bucket=TokenBucket(1000.0), workers=1)
    for receipt in receipts:
        delivery.enqueue(receipt, digest_of(receipt))
    delivery.start()
    report = delivery.finish(10.0)
    sends = sum(proxy.seen.values())
    assert sends <= len(receipts) + floor, f"{sends} sends for {len(receipts)} receipts and a budget of {floor}"
    stored, waiting = set(aggregator.digests()), set(outbox_digests(tmp_path / "outbox"))
    assert {digest_of(r).hex() for r in receipts} == stored | waiting and not stored & waiting
    assert report.pending == len(waiting)
