"""V2Store on both engines, writing in transactions of its own and through the server's group
commit: what a write returns is what a read gives back, the first verdict on a commitment is
the one that stays, and concurrent writes share commits without sharing their outcomes."""

from __future__ import annotations

import re
import sqlite3
import threading
import time

import pytest

from tests.support.transactions import count_transactions
from tops_job.aggregator.group_commit import GroupCommitStore
from tops_job.aggregator.migrations import StorageUnavailable
from tops_job.aggregator.store_pg import open_store
from tops_job.aggregator.v2_store import ACCEPTED, COMMITTED, EXPIRED, REJECTED, Conflict, V2Store


def _open(request, tmp_path, engine: str):
    return open_store(str(tmp_path / "agg.sqlite3") if engine == "sqlite" else request.getfixturevalue("postgres").new_database())


@pytest.fixture(params=["sqlite", "postgresql", "sqlite, group commit", "postgresql, group commit"])
def store(request, tmp_path):
    engine, _, grouped = request.param.partition(", ")
    opened = _open(request, tmp_path, engine)
    wrapped = GroupCommitStore(opened) if grouped else opened
    yield V2Store(wrapped)
    wrapped.close()


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


def test_a_replay_refused_as_a_runs_first_commitment_binds_nothing(store):
    """A refused commitment records nothing (spec §9.1), its run included: the run stays free
    for its key's honest first commitment. The replay is refused on both paths: a run's first
    commitment (checked before the run is bound) and its later ones (the insert's conflict)."""
    _commit(store, "e1" * 32, nonce="n-e", run_id="run-e")
    with pytest.raises(Conflict) as replay:
        _commit(store, "e2" * 32, nonce="n-e", run_id="run-fresh")
    assert replay.value.code == "replayed_nonce"
    with pytest.raises(Conflict) as replay_in_run:
        _commit(store, "e3" * 32, nonce="n-e", run_id="run-e", attempt=1)
    assert replay_in_run.value.code == "replayed_nonce"
    assert _commit(store, "e4" * 32, nonce="n-other", run_id="run-fresh", pubkey="03" + "cd" * 32)["state"] == COMMITTED
    assert store.commitment("e2" * 32) is None and store.commitment("e3" * 32) is None


def _as_one_batch(opened, calls: dict) -> tuple[dict, int, V2Store, GroupCommitStore]:
    """Runs each of `calls` (key: a function of the V2Store and its GroupCommitStore) on a
    thread of its own while the writer is held in a transaction, so that all their writes
    queue and go out in one batch when it is released. Each call's result or exception, and
    how many transactions the store opened (the holder's included), and the stores to read
    back from and close."""
    transactions = count_transactions(opened)
    grouped = GroupCommitStore(opened)
    store = V2Store(grouped)
    inside, release = threading.Event(), threading.Event()

    def hold(conn) -> None:
        inside.set()
        release.wait(30)

    holder = threading.Thread(target=grouped.group_write, args=(hold,))
    holder.start()
    assert inside.wait(10)  # the writer is in a transaction: what comes now waits for the next one
    results: dict = {}

    def run(key, call) -> None:
        try:
            results[key] = call(store, grouped)
        except Exception as exc:
            results[key] = exc

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while grouped.waiting < len(calls) and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in threads + [holder]:
        thread.join(30)
    return results, len(transactions), store, grouped


def _committed_state(i: int, nonce: str):
    return lambda store, _: _commit(store, f"{i:064x}", nonce=nonce)["state"]


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_concurrent_writes_share_one_commit_and_keep_their_own_outcomes(request, tmp_path, engine):
    opened = _open(request, tmp_path, engine)
    # requests 0..9 share a nonce: one of them is recorded, the rest are replays
    results, transactions, store, grouped = _as_one_batch(opened, {i: _committed_state(i, "shared" if i < 10 else f"n{i}")
                                                   for i in range(24)})
    assert transactions == 2  # the holder's, then all 24 commitments in one
    outcomes = [r.code if isinstance(r, Conflict) else r for r in (results[i] for i in range(24))]
    assert sorted(outcomes[:10]) == [COMMITTED] + ["replayed_nonce"] * 9
    assert outcomes[10:] == [COMMITTED] * 14
    assert all(store.commitment(f"{i:064x}") is not None for i in range(10, 24))
    grouped.close()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_write_with_nothing_beside_it_runs_on_its_callers_thread_and_one_beside_another_waits_for_a_batch(
        request, tmp_path, engine):
    grouped = GroupCommitStore(_open(request, tmp_path, engine))
    store = V2Store(grouped)
    try:
        ran_on = []
        write = store.commitment_write(digest="f1" * 32, pubkey="02" + "ab" * 32, did="did:test:a", nonce="n1",
                                       run_id="run-a", attempt=0, ops=1, challenge="c" * 64, s=4, leaves=[0, 1, 2, 3],
                                       now_ms=1_000, ttl_ms=600_000, commitment="{}")
        record = grouped.group_write(lambda conn: ran_on.append(threading.get_ident()) or write(conn))
        assert ran_on == [threading.get_ident()]  # no hand-over to the writer thread, and no wait for it
        assert record["state"] == COMMITTED and store.commitment("f1" * 32)["state"] == COMMITTED
        assert grouped.waiting == 0

        inside, release = threading.Event(), threading.Event()
        holder = threading.Thread(target=grouped.group_write, args=(lambda conn: inside.set() or release.wait(30),))
        holder.start()
        assert inside.wait(10)
        beside = threading.Thread(target=lambda: grouped.group_write(lambda conn: ran_on.append(threading.get_ident())))
        beside.start()
        deadline = time.monotonic() + 10
        while grouped.waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert grouped.waiting == 1 and len(ran_on) == 1  # queued for the writer while the first is under way
        release.set()
        for thread in (holder, beside):
            thread.join(30)
        assert len(ran_on) == 2 and ran_on[1] not in (threading.get_ident(), beside.ident)  # the writer thread's
        assert grouped.waiting == 0
    finally:
        grouped.close()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_write_that_fails_fails_its_batch_and_leaves_nothing(request, tmp_path, engine):
    grouped = GroupCommitStore(_open(request, tmp_path, engine))
    store = V2Store(grouped)

    def half_then_fail(conn):
        conn.execute("INSERT INTO v2_runs (run_id, pubkey) VALUES (?, ?)", ("half-written", "02" + "ef" * 32))
        raise RuntimeError("a bug in a write")

    with pytest.raises(RuntimeError, match="a bug in a write"):
        grouped.group_write(half_then_fail)
    assert grouped._conn().execute("SELECT COUNT(*) FROM v2_runs WHERE run_id = 'half-written'").fetchone()[0] == 0
    assert _commit(store, "e1" * 32)["state"] == COMMITTED  # the writer goes on
    grouped.close()


def _half_then_a_bug(conn):
    conn.execute("INSERT INTO v2_runs (run_id, pubkey) VALUES (?, ?)", ("half-written", "02" + "ef" * 32))
    raise RuntimeError("a bug in one write")


def _half_then_a_constraint(conn):  # 'taken' is recorded before the batch; no ON CONFLICT here
    conn.execute("INSERT INTO v2_runs (run_id, pubkey) VALUES (?, ?)", ("half-written", "02" + "ef" * 32))
    conn.execute("INSERT INTO v2_runs (run_id, pubkey) VALUES (?, ?)", ("taken", "02" + "ef" * 32))


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
@pytest.mark.parametrize("bad_write, error", [(_half_then_a_bug, "a bug in one write"),
                                              (_half_then_a_constraint, "(?i)unique")])
def test_a_write_that_fails_in_a_shared_batch_fails_only_its_own_request(request, tmp_path, engine, bad_write, error):
    opened = _open(request, tmp_path, engine)
    opened.group_write(lambda conn: conn.execute("INSERT INTO v2_runs (run_id, pubkey) VALUES ('taken', 'x')"))
    calls = {i: _committed_state(i, f"n{i}") for i in range(6)}
    calls["bad"] = lambda _, grouped: grouped.group_write(bad_write)
    results, transactions, store, grouped = _as_one_batch(opened, calls)
    assert isinstance(results["bad"], Exception) and re.search(error, str(results["bad"])), results["bad"]
    assert not grouped.failed_whole(results["bad"])
    assert [results[i] for i in range(6)] == [COMMITTED] * 6
    assert transactions == 1 + 1 + 7  # the holder's, the shared one rolled back, then each write alone
    assert all(store.commitment(f"{i:064x}") is not None for i in range(6))
    assert grouped._conn().execute("SELECT COUNT(*) FROM v2_runs WHERE run_id = 'half-written'").fetchone()[0] == 0
    grouped.close()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_a_database_failing_as_a_whole_fails_the_batch_without_trying_each_write(request, tmp_path, engine):
    opened = _open(request, tmp_path, engine)
    # What the engine raises when the database itself fails (full disk; a lost connection).
    failure = sqlite3.OperationalError("database or disk is full") if engine == "sqlite" else \
        StorageUnavailable("server closed the connection unexpectedly")

    def the_disk_fills(conn):
        raise failure

    calls = {i: _committed_state(i, f"n{i}") for i in range(6)}
    calls["failing"] = lambda _, grouped: grouped.group_write(the_disk_fills)
    results, transactions, store, grouped = _as_one_batch(opened, calls)
    assert all(results[key] is failure for key in calls), results
    assert transactions == 1 + 1  # the holder's and the batch's: nobody tried again alone
    assert all(store.commitment(f"{i:064x}") is None for i in range(6))
    grouped.close()


def _race(postgres, first_row: dict, commit_fields: dict):
    """Replica A's transaction holds `first_row` uncommitted while replica B records a
    commitment through its group commit; A commits once B waits on it. B's outcome."""
    import psycopg

    dsn = postgres.new_database()
    replica_b = GroupCommitStore(open_store(dsn))
    outcome: dict[str, object] = {}

    def record() -> None:
        try:
            outcome["record"] = _commit(V2Store(replica_b), **commit_fields)
        except Exception as exc:
            outcome["error"] = exc

    with psycopg.connect(dsn) as replica_a, psycopg.connect(dsn, autocommit=True) as watcher:
        columns = ", ".join(first_row)
        replica_a.execute(f"INSERT INTO v2_commitments ({columns}) VALUES ({', '.join(['%s'] * len(first_row))})",
                          list(first_row.values()))
        thread = threading.Thread(target=record)
        thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not watcher.execute(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()[0]:
            time.sleep(0.01)
        replica_a.commit()
    thread.join(30)
    replica_b.close()
    return outcome


def _row(digest: str, nonce: str) -> dict:
    return dict(digest=digest, pubkey="02" + "ab" * 32, did="did:test:a", nonce=nonce, run_id="run-a", attempt=0,
                ops=1 << 20, challenge="c" * 64, s=4, leaves="[2, 7, 1, 8]", committed_ms=500, expires_ms=600_500,
                state=COMMITTED, commitment='{"first":"replica a"}')


def test_a_commitment_raced_on_two_replicas_is_recorded_once_and_read_back(postgres):
    outcome = _race(postgres, _row("f1" * 32, "n1"), dict(digest="f1" * 32, nonce="n1"))
    assert "error" not in outcome, outcome  # before: a unique violation, and B's whole batch answered 503
    record = outcome["record"]
    assert record["leaves"] == [2, 7, 1, 8] and record["commitment"] == '{"first":"replica a"}'  # A's draw stands


def test_a_nonce_raced_on_two_replicas_is_a_replay_on_the_second(postgres):
    outcome = _race(postgres, _row("f2" * 32, "n2"), dict(digest="f3" * 32, nonce="n2"))
    assert isinstance(outcome.get("error"), Conflict) and outcome["error"].code == "replayed_nonce", outcome
