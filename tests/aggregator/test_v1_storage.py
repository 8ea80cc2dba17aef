"""What the aggregator keeps of an accepted tops-receipt/1 receipt (its signed claim, not the
openings, unless --keep-openings) and how it recognises a resend, over real HTTP and SQLite."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
import requests

from tests.support.load import JSON, make_receipts
from tests.support.peers import Aggregator
from tops_job.compute.base import Shape
from tops_job.spec.canonical import digest_of, receipt_line
from tops_job.spec.signing import recover_public_key

VERIFIED = "tops_job_aggregator_verify_duration_seconds_count"


@pytest.fixture(scope="module")
def receipts() -> list[dict]:
    """Receipts with whole-row tiles of 1024 values: ~93 KB each, nearly all of it openings."""
    return make_receipts(24, run_id="storage", shape=Shape(16, 1024, 1024), tile=1024)


def _rows(db: Path) -> dict[str, tuple[str, str | None]]:
    conn = sqlite3.connect(db)
    try:
        return {row[0]: (row[1], row[2]) for row in conn.execute("SELECT digest, receipt, sent_sha256 FROM receipts")}
    finally:
        conn.close()


def _post(agg: Aggregator, body: str) -> dict:
    answer = requests.post(agg.url, data=body, headers=JSON, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _on_disk(db: Path) -> int:
    """Bytes of the database file once its write-ahead log is checkpointed into it."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file())


def test_an_accepted_receipt_is_kept_as_its_signed_claim_without_the_openings(tmp_path, receipts):
    Aggregator(tmp_path / "agg.sqlite3").stop()
    empty = _on_disk(tmp_path / "agg.sqlite3")  # the schema's pages
    agg = Aggregator(tmp_path / "agg.sqlite3")
    try:
        bodies = [receipt_line(r) for r in receipts]
        for body in bodies:
            assert _post(agg, body)["duplicate"] is False
    finally:
        agg.stop()
    rows = _rows(tmp_path / "agg.sqlite3")
    assert len(rows) == len(receipts)
    for receipt, body in zip(receipts, bodies):
        kept, sent_sha256 = rows[digest_of(receipt).hex()]
        claim = json.loads(kept)
        assert claim == {k: v for k, v in receipt.items() if k != "openings"}  # the signed body and sig
        assert sent_sha256 == hashlib.sha256(body.encode()).hexdigest()
        # Who signed what can be checked from the claim alone, later, by anyone.
        assert recover_public_key(digest_of(claim), bytes.fromhex(claim["sig"])).hex() == receipt["pubkey"]
    # The database grows by the claims, not by the bodies (SQLite, WAL checkpointed at close).
    grown, sent = _on_disk(tmp_path / "agg.sqlite3") - empty, sum(len(b) for b in bodies)
    print(f"\n[storage] {len(bodies)} receipts, {sent} bytes sent, the database grew by {grown} bytes")
    assert grown < sent / 20, (grown, sent)


def test_keep_openings_stores_the_body_as_sent(tmp_path, receipts):
    agg = Aggregator(tmp_path / "agg.sqlite3", "--keep-openings")
    try:
        body = json.dumps(receipts[0], separators=(",", ":"))  # not the canonical key order: kept as sent
        assert _post(agg, body)["duplicate"] is False
        verified = agg.metric(VERIFIED)
        assert _post(agg, body)["duplicate"] is True
        assert agg.metric(VERIFIED) == verified  # answered from the store
    finally:
        agg.stop()
    assert _rows(tmp_path / "agg.sqlite3")[digest_of(receipts[0]).hex()] == (body, hashlib.sha256(body.encode()).hexdigest())


def test_only_a_byte_identical_resend_skips_verification(tmp_path, receipts):
    agg = Aggregator(tmp_path / "agg.sqlite3")
    try:
        receipt = receipts[1]
        body = receipt_line(receipt)
        first = _post(agg, body)
        verified = agg.metric(VERIFIED)
        assert _post(agg, body) == dict(first, duplicate=True)
        assert agg.metric(VERIFIED) == verified
        # Another spelling of the same receipt is verified again, then found in the store.
        assert _post(agg, json.dumps(receipt, indent=1))["duplicate"] is True
        assert agg.metric(VERIFIED) == verified + 1
        # The same signed claim with openings that fail: the store's claim does not vouch for them.
        forged = dict(receipt, openings=[dict(o, values=receipts[2]["openings"][i]["values"])
                                         for i, o in enumerate(receipt["openings"])])
        answer = requests.post(agg.url, data=receipt_line(forged), headers=JSON, timeout=30)
        assert answer.status_code == 422, answer.text
    finally:
        agg.stop()


def test_rows_stored_whole_before_the_hash_column_still_answer_resends(tmp_path, receipts):
    db = tmp_path / "agg.sqlite3"
    receipt = receipts[3]
    body = receipt_line(receipt)
    agg = Aggregator(db)
    try:
        _post(agg, body)
    finally:
        agg.stop()
    conn = sqlite3.connect(db)
    try:  # what an aggregator of the previous schema kept: the body as sent, no hash
        conn.execute("UPDATE receipts SET receipt = ?, sent_sha256 = NULL WHERE digest = ?", (body, digest_of(receipt).hex()))
        conn.commit()
    finally:
        conn.close()
    agg = Aggregator(db)
    try:
        verified = agg.metric(VERIFIED)
        assert _post(agg, body)["duplicate"] is True
        assert agg.metric(VERIFIED) == verified
        assert _post(agg, json.dumps(receipt, indent=1))["duplicate"] is True
        assert agg.metric(VERIFIED) == verified + 1
    finally:
        agg.stop()
