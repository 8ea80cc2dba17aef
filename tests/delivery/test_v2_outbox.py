"""The v2 outbox on its own: what a crash at each point leaves, and what recovery makes of it."""

from __future__ import annotations

import json

from tops_job.delivery.exchange_outbox import CHALLENGED, OPENED, SIGNED, ExchangeOutbox

DIGEST = "ab" * 32


def test_states_follow_the_files_written(tmp_path):
    outbox = ExchangeOutbox(tmp_path)
    outbox.put({"schema": "tops-receipt/2"}, DIGEST, b"\x01" * 64)
    assert outbox.state(DIGEST) == SIGNED and outbox.leaf_hashes(DIGEST) == [b"\x01" * 32] * 2
    outbox.put_challenge(DIGEST, {"leaves": [0, 1], "s": 2, "expires_ms": 1})
    assert outbox.state(DIGEST) == CHALLENGED
    outbox.put_opened(DIGEST, {"digest": DIGEST, "openings": []})
    assert outbox.state(DIGEST) == OPENED
    assert outbox.pending() == {DIGEST: OPENED}
    outbox.drop_challenge(DIGEST)  # the aggregator lost it: committed again, drawn again
    assert outbox.state(DIGEST) == SIGNED


def test_a_verdict_is_written_before_the_attempt_is_forgotten(tmp_path):
    outbox = ExchangeOutbox(tmp_path)
    outbox.put({"schema": "tops-receipt/2"}, DIGEST, b"\x01" * 32)
    outbox.finish(DIGEST, "rejected", {"status": 422, "error": "wrong_product"})
    assert outbox.pending() == {}
    record = outbox.verdict(DIGEST)
    assert record["verdict"] == "rejected" and record["commitment"] == {"schema": "tops-receipt/2"}


def test_recovery_after_a_crash_inside_finish_and_leftovers(tmp_path):
    outbox = ExchangeOutbox(tmp_path)
    outbox.put({"schema": "tops-receipt/2"}, DIGEST, b"\x01" * 32)
    # kill -9 after the verdict was written, before the attempt's files were removed
    (outbox.done_dir / f"{DIGEST}.json").write_text(json.dumps({"digest": DIGEST, "verdict": "accepted"}))
    # a side file whose commitment never made it, and a dead writer's temp file
    other = "cd" * 32
    (outbox.path / f"{other}.leaves").write_bytes(b"\x02" * 32)
    (outbox.path / ".tmp-999999999-x.part").write_bytes(b"half")
    assert outbox.recover() == {}
    assert sorted(p.name for p in outbox.path.iterdir()) == ["done"]


def test_only_one_run_drains_the_directory(tmp_path):
    first, second = ExchangeOutbox(tmp_path), ExchangeOutbox(tmp_path)
    assert first.acquire() and not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
