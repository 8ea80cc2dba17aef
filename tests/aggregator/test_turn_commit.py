"""A poll thread's turn (turn_commit.py): the requests it serves park at their writes, which
then go out in one transaction; each request resumes with its own outcome once committed."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from typing import NamedTuple

import pytest

from tests.support.transactions import count_transactions
from tops_job.aggregator.group_commit import GroupCommitStore
from tops_job.aggregator.store_pg import open_store
from tops_job.aggregator.turn_commit import Turn, current_turn
from tops_job.aggregator.v2_store import COMMITTED, Conflict, V2Store


class Opened(NamedTuple):
    grouped: GroupCommitStore
    transactions: list[int]  # one entry per write transaction the database ran
    store: V2Store


def _opened(request, tmp_path, engine: str) -> Iterator[Opened]:
    """A group-commit store on a real database, its transactions counted; closed after."""
    opened = open_store(str(tmp_path / "agg.sqlite3") if engine == "sqlite"
                        else request.getfixturevalue("postgres").new_database())
    transactions = count_transactions(opened)
    grouped = GroupCommitStore(opened)
    try:
        yield Opened(grouped, transactions, V2Store(grouped))
    finally:
        grouped.close()


@pytest.fixture
def sqlite(request, tmp_path) -> Iterator[Opened]:
    yield from _opened(request, tmp_path, "sqlite")


@pytest.fixture(params=["sqlite", "postgresql"])
def either(request, tmp_path) -> Iterator[Opened]:
    """The same on each engine."""
    yield from _opened(request, tmp_path, request.param)


def _commit(store: V2Store, i: int, nonce: str) -> dict:
    return store.add_commitment(digest=f"{i:064x}", pubkey="02" + "ab" * 32, did="did:test:a", nonce=nonce,
                                run_id="run-a", attempt=i, ops=1, challenge="c" * 64, s=4, leaves=[0, 1, 2, 3],
                                now_ms=1_000, ttl_ms=600_000, commitment="{}")


def _serve(turn: Turn, results: dict, key, call) -> None:
    def run() -> None:
        try:
            results[key] = call()
        except Exception as exc:
            results[key] = exc
    turn.serve(run)


def test_the_writes_of_a_turn_go_out_in_one_transaction_and_each_request_gets_its_own_outcome(either):
    _, transactions, store = either
    turn, results = Turn(max_hold_s=60), {}
    for i in range(12):  # 0..5 share a nonce: one is recorded, the others are replays
        _serve(turn, results, i, lambda i=i: _commit(store, i, "shared" if i < 6 else f"n{i}")["state"])
    assert results == {} and transactions == []  # all parked: nothing written yet
    assert all(store.commitment(f"{i:064x}") is None for i in range(12))
    turn.commit()
    assert transactions == [1]
    assert results[0] == COMMITTED  # the first to park is the first written
    assert all(isinstance(results[i], Conflict) and results[i].code == "replayed_nonce" for i in range(1, 6))
    assert [results[i] for i in range(6, 12)] == [COMMITTED] * 6
    assert all(store.commitment(f"{i:064x}") is not None for i in (0, *range(6, 12)))


def test_a_request_resumes_after_its_write_is_committed(sqlite, tmp_path):
    turn, results = Turn(), {}

    def read_elsewhere() -> int:  # a connection of its own: it sees only what is committed
        with closing(sqlite3.connect(tmp_path / "agg.sqlite3")) as other:
            return int(other.execute("SELECT COUNT(*) FROM v2_commitments").fetchone()[0])

    _serve(turn, results, "seen", lambda: (_commit(sqlite.store, 1, "n1"), read_elsewhere())[1])
    assert read_elsewhere() == 0 and results == {}
    turn.commit()
    assert results == {"seen": 1}


def test_a_request_that_writes_twice_is_resumed_twice_within_one_commit(sqlite):
    _, transactions, store = sqlite
    turn, results = Turn(), {}
    _serve(turn, results, "twice", lambda: [_commit(store, i, f"n{i}")["state"] for i in (1, 2)])
    _serve(turn, results, "once", lambda: _commit(store, 3, "n3")["state"])
    turn.commit()
    assert results == {"twice": [COMMITTED, COMMITTED], "once": COMMITTED}
    assert transactions == [1, 1]  # the first writes together, then the second write of "twice"


def _half_then_a_bug(conn):
    conn.execute("INSERT INTO v2_runs (run_id, pubkey) VALUES (?, ?)", ("half-written", "02" + "ef" * 32))
    raise RuntimeError("a bug in one write")


def test_a_write_that_fails_fails_only_its_own_request(either):
    grouped, transactions, store = either
    turn, results = Turn(), {}
    for i in range(3):
        _serve(turn, results, i, lambda i=i: _commit(store, i, f"n{i}")["state"])
    _serve(turn, results, "bad", lambda: grouped.group_write(_half_then_a_bug))
    turn.commit()
    assert [results[i] for i in range(3)] == [COMMITTED] * 3
    assert isinstance(results["bad"], RuntimeError) and str(results["bad"]) == "a bug in one write"
    assert len(transactions) == 1 + 4  # the shared one, rolled back; then each write alone
    assert grouped._conn().execute("SELECT COUNT(*) FROM v2_runs WHERE run_id = 'half-written'").fetchone()[0] == 0


def test_a_database_that_fails_as_a_whole_fails_every_request_of_the_turn_and_records_nothing(sqlite):
    grouped, transactions, store = sqlite
    turn, results = Turn(), {}

    def disk_full(conn):
        raise sqlite3.OperationalError("database or disk is full")

    _serve(turn, results, 0, lambda: _commit(store, 0, "n0")["state"])
    _serve(turn, results, "full", lambda: grouped.group_write(disk_full))
    turn.commit()
    assert all(isinstance(results[key], sqlite3.OperationalError) for key in (0, "full"))
    assert transactions == [1]  # no retries one by one: the database itself failed
    assert store.commitment(f"{0:064x}") is None


def test_a_turn_is_due_when_enough_writes_are_parked_or_the_first_has_waited(sqlite):
    store = sqlite.store
    turn, results = Turn(max_hold_s=60, max_parked=3), {}
    assert not turn.due
    for i in range(2):
        _serve(turn, results, i, lambda i=i: _commit(store, i, f"n{i}")["state"])
    assert not turn.due
    _serve(turn, results, 2, lambda: _commit(store, 2, "n2")["state"])
    assert turn.due
    turn.commit()
    assert not turn.due and results == {0: COMMITTED, 1: COMMITTED, 2: COMMITTED}

    held = Turn(max_hold_s=0.3)
    _serve(held, results, 3, lambda: _commit(store, 3, "n3")["state"])
    assert not held.due
    time.sleep(0.35)
    assert held.due
    held.commit()
    assert results[3] == COMMITTED


def test_outside_a_turns_requests_a_write_commits_at_once(sqlite):
    _, transactions, store = sqlite
    assert current_turn() is None
    assert _commit(store, 1, "n1")["state"] == COMMITTED and transactions == [1]
    other: list = []
    turn = Turn()
    # a thread of the pool, while the poll thread's turn holds parked requests: not parked
    turn.serve(lambda: other.append(_commit(store, 2, "n2")["state"]))
    thread = threading.Thread(target=lambda: other.append(_commit(store, 3, "n3")["state"]))
    thread.start()
    thread.join(10)
    assert other == [COMMITTED] and len(transactions) == 2
    turn.commit()
    assert other == [COMMITTED, COMMITTED] and len(transactions) == 3


def test_a_turn_serves_its_next_requests_in_the_greenlets_of_those_that_returned(sqlite):
    """A request greenlet that has returned serves the next request: no greenlet (and Python
    data stack) made and torn down for each. What a request raises still comes out of `serve`,
    or after a park out of `commit`, and the greenlet goes on serving."""
    import greenlet

    store = sqlite.store
    turn, seen = Turn(), []
    turn.serve(lambda: seen.append(greenlet.getcurrent()))
    turn.serve(lambda: seen.append(greenlet.getcurrent()))
    assert len(seen) == 2 and seen[0] is seen[1] and seen[0] is not greenlet.getcurrent()

    def fails() -> None:
        seen.append(greenlet.getcurrent())
        raise ValueError("a request's own failure")

    with pytest.raises(ValueError, match="a request's own failure"):
        turn.serve(fails)
    assert seen[2] is seen[0]

    def fails_after_its_write() -> None:
        _commit(store, 1, "n1")
        raise KeyError("after the write")

    turn.serve(fails_after_its_write)  # parked
    with pytest.raises(KeyError, match="after the write"):
        turn.commit()
    turn.serve(lambda: seen.append(greenlet.getcurrent()))
    assert seen[3] is seen[0]


def test_a_turn_keeps_at_most_max_idle_greenlets(sqlite):
    from tops_job.aggregator import turn_commit

    store = sqlite.store
    turn, results = Turn(max_hold_s=60, max_parked=1000), {}
    for i in range(turn_commit.MAX_IDLE + 6):
        _serve(turn, results, i, lambda i=i: _commit(store, i, f"n{i}")["state"])
    assert results == {} and turn._idle == []  # every one parked, each in a greenlet of its own
    turn.commit()
    assert list(results.values()) == [COMMITTED] * (turn_commit.MAX_IDLE + 6)
    assert len(turn._idle) == turn_commit.MAX_IDLE
