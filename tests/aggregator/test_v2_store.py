"""V2Store on both engines: what a write returns is what a read gives back, and the first
verdict on a commitment is the one that stays."""

from __future__ import annotations

import pytest

from tops_job.aggregator.store_pg import open_store
from tops_job.aggregator.v2_store import ACCEPTED, COMMITTED, EXPIRED, REJECTED, Conflict, V2Store


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    db = str(tmp_path / "agg.sqlite3") if request.param == "sqlite" else request.getfixturevalue("postgres").new_database()
    opened = open_store(db)
    yield V2Store(opened)
    opened.close()


def _commit(store: V2Store, digest: str, nonce: str = "n1", **changes):
    fields = dict(digest=digest, pubkey="02" + "ab" * 32, did="did:test:a", nonce=nonce, run_id="run-a", attempt=0,
                  ops=1 << 20, challenge="c" * 64, s=4, leaves=[3, 1, 4, 1], now_ms=1_000, ttl_ms=600_000,
                  commitment='{"kept":"as sent"}')
    fields.update(changes)
    return store.add_commitment(**fields)


def test_an_added_commitment_answers_as_it_reads_back(store):
    added = _commit(store, "d1" * 32)
    assert added == store.commitment("d1" * 32)
    assert added["state"] == COMMITTED and added["leaves"] == [3, 1, 4, 1] and added["expires_ms"] == 601_000
    assert _commit(store, "d1" * 32, leaves=[9, 9, 9, 9]) == added  # posting again changes nothing


def test_the_first_verdict_stays(store):
    _commit(store, "d2" * 32)
    assert store.set_verdict("d2" * 32, ACCEPTED, now_ms=2_000, clock_epoch="boot:x", clock_ms=5) == ACCEPTED
    assert store.set_verdict("d2" * 32, REJECTED, now_ms=3_000, error="wrong_product", detail="late") == ACCEPTED
    assert store.set_verdict("d2" * 32, EXPIRED, now_ms=4_000) == ACCEPTED
    record = store.commitment("d2" * 32)
    assert record is not None and record["state"] == ACCEPTED and record["error"] is None


def test_a_replayed_nonce_and_another_keys_run_are_conflicts(store):
    _commit(store, "d3" * 32, nonce="n3")
    with pytest.raises(Conflict) as replay:
        _commit(store, "d4" * 32, nonce="n3")
    assert replay.value.code == "replayed_nonce"
    with pytest.raises(Conflict) as taken:
        _commit(store, "d5" * 32, nonce="n5", pubkey="03" + "cd" * 32)
    assert taken.value.code == "run_id_taken"
    assert store.commitment("d4" * 32) is None and store.commitment("d5" * 32) is None
