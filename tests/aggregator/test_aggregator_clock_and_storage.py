"""The aggregator application in-process, with its clocks and its database in the test's
hands: a wall clock that steps back cannot inflate a rate floor, and a full disk is logged
for what it is and answered 503."""

from __future__ import annotations

import io
import json
import logging

import pytest

from tests.support import TEST_KEY
from tests.support.load import make_receipts
from tops_job.aggregator.app import AggregatorApp
from tops_job.aggregator.migrations import LATEST, migrate
from tops_job.aggregator.store import Store
from tops_job.spec.canonical import receipt_line


class Clocks:
    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.mono_ns = 5_000_000_000

    def advance(self, seconds: float, wall_step: float = 0.0) -> None:
        self.mono_ns += int(seconds * 1e9)
        self.wall += seconds + wall_step


def call(app, method: str, path: str, body: bytes = b"", query: str = "") -> tuple[int, dict, dict]:
    seen: dict = {}

    def start_response(status, headers, exc_info=None):
        seen["status"], seen["headers"] = int(status.split()[0]), dict(headers)

    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "CONTENT_TYPE": "application/json",
               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body), "REMOTE_ADDR": "127.0.0.1"}
    data = b"".join(app(environ, start_response))
    return seen["status"], json.loads(data), seen["headers"]


@pytest.fixture
def clocked(tmp_path):
    clocks = Clocks()
    store = Store(tmp_path / "agg.sqlite3")
    app = AggregatorApp(store, clock=lambda: clocks.wall, monotonic_ns=lambda: clocks.mono_ns, accept="v1")
    yield app, clocks
    store.close()


def _challenged_run(app, clocks, run_id: str, *, wall_step: float, seconds: float = 10.0):
    status, issued, _ = call(app, "GET", "/challenge", query=f"did={TEST_KEY['did']}")
    assert status == 200
    receipts = make_receipts(2, run_id=run_id, challenge=bytes.fromhex(issued["challenge"]))
    clocks.advance(seconds, wall_step=wall_step)  # e.g. an NTP step of the host's wall clock
    for receipt in receipts:
        status, body, _ = call(app, "POST", "/verify", receipt_line(receipt).encode())
        assert status == 200, body
    status, report, _ = call(app, "GET", f"/runs/{run_id}")
    assert status == 200
    return report, sum(r["ops"] for r in receipts)


def test_wall_clock_stepping_back_an_hour_does_not_inflate_the_rate_floor(clocked):
    app, clocks = clocked
    report, ops = _challenged_run(app, clocks, "stepped", wall_step=-3600)
    assert report["last_accepted_ms"] < report["challenge_issued_ms"]  # the wall clock did step back
    # The floor uses the 10 s that really passed, not the wall clock's -3590 s (nor a clamp to 1 ms).
    assert report["rate_floor_ops_per_s"] == pytest.approx(ops / 10.0)
    assert report["challenges"][0]["interval_clock"] == "monotonic"


def test_a_forward_step_cannot_inflate_it_either(clocked):
    app, clocks = clocked
    report, ops = _challenged_run(app, clocks, "forward", wall_step=+3600)
    assert report["rate_floor_ops_per_s"] == pytest.approx(ops / 10.0)


def test_accepted_on_another_host_with_a_non_positive_interval_the_run_is_flagged_not_floored(tmp_path):
    clocks = Clocks()
    store = Store(tmp_path / "agg.sqlite3")
    issuer = AggregatorApp(store, clock=lambda: clocks.wall, monotonic_ns=lambda: clocks.mono_ns, accept="v1")
    other = AggregatorApp(store, clock=lambda: clocks.wall, monotonic_ns=lambda: 0, accept="v1")
    other.clock_domain = "boot:another-host"  # its monotonic clock is not the issuer's
    status, issued, _ = call(issuer, "GET", "/challenge", query=f"did={TEST_KEY['did']}")
    receipts = make_receipts(1, run_id="elsewhere", challenge=bytes.fromhex(issued["challenge"]))
    clocks.advance(10, wall_step=-3600)
    assert call(other, "POST", "/verify", receipt_line(receipts[0]).encode())[0] == 200
    report = call(issuer, "GET", "/runs/elsewhere")[1]
    assert report["rate_floor_ops_per_s"] is None and report["flag"] == "interval_not_positive"
    assert report["challenges"][0]["interval_clock"] == "monotonic"  # measured, by the wall-clock difference
    store.close()


def test_full_disk_is_logged_as_such_and_answered_503(tmp_path, caplog):
    store = Store(tmp_path / "agg.sqlite3")
    app = AggregatorApp(store, accept="v1")
    conn = store._conn()  # this thread's connection, the one the in-process app uses
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={pages}")  # the database file can grow no more: a full disk
    receipts = make_receipts(30, run_id="full")
    statuses = []
    with caplog.at_level(logging.ERROR, logger="tops_job.aggregator"):
        for receipt in receipts:
            status, body, headers = call(app, "POST", "/verify", receipt_line(receipt).encode())
            statuses.append(status)
            if status == 503:
                assert body["error"] == "storage_unavailable" and headers["Retry-After"] == "1"
    assert 503 in statuses and set(statuses) <= {200, 503}
    messages = [record.getMessage() for record in caplog.records]
    assert messages and all("database or disk is full" in m for m in messages), messages
    assert not any("no transaction is active" in m for m in messages)
    store.close()


def test_migrations_adopt_a_first_release_database_and_refuse_a_newer_one(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    from tops_job.aggregator.migrations import MIGRATIONS

    for statement in MIGRATIONS[0].statements:  # what the first release created, without a version table
        conn.execute(statement)
    conn.execute("INSERT INTO receipts VALUES ('d', 'did', 'n', 'p', 'r', 0, 10, 1, NULL, 2, '{}')")
    assert migrate(conn, "sqlite", "BEGIN IMMEDIATE") == 0
    assert migrate(conn, "sqlite", "BEGIN IMMEDIATE") == LATEST
    assert conn.execute("SELECT COUNT(*) FROM receipts").fetchone()[0] == 1
    conn.execute("INSERT INTO schema_migrations VALUES (?, 'from the future', 0)", (LATEST + 1,))
    with pytest.raises(Exception, match="newer than this aggregator"):
        migrate(conn, "sqlite", "BEGIN IMMEDIATE")
    conn.close()


def test_no_free_verification_slot_is_503_busy_not_a_rejection(tmp_path):
    from tops_job.aggregator.guard import VerifyGate

    store = Store(tmp_path / "agg.sqlite3")
    gate = VerifyGate(1, wait_s=0.2)
    app = AggregatorApp(store, gate=gate, accept="v1")
    (receipt, other) = make_receipts(2, run_id="busy")
    slot = gate.acquire()  # the one slot is taken by a long verification
    assert slot == "slot"
    assert call(app, "POST", "/verify", receipt_line(other).encode())[0] == 200  # a cheap receipt has its own lane
    lane = gate.acquire(cost=1)  # and now that lane is taken too
    assert lane == "cheap"
    status, body, headers = call(app, "POST", "/verify", receipt_line(receipt).encode())
    assert (status, body["error"], headers["Retry-After"]) == (503, "busy", "1")
    gate.release(slot)
    gate.release(lane)
    assert call(app, "POST", "/verify", receipt_line(receipt).encode())[0] == 200
    store.close()


def test_running_out_of_memory_while_verifying_is_503_not_a_final_4xx(tmp_path, monkeypatch):
    import tops_job.aggregator.app as app_module

    def out_of_memory(*args, **kwargs):  # fault injection: what numpy raises when an allocation fails
        raise MemoryError("Unable to allocate 12.0 GiB for an array")

    store = Store(tmp_path / "agg.sqlite3")
    app = AggregatorApp(store, accept="v1")
    monkeypatch.setattr(app_module, "verify_receipt", out_of_memory)
    (receipt,) = make_receipts(1, run_id="oom")
    status, body, headers = call(app, "POST", "/verify", receipt_line(receipt).encode())
    assert status == 503 and body["error"] == "out_of_memory" and int(headers["Retry-After"]) > 0
    assert app.gate.busy == 0  # the slot was given back
    store.close()


def test_rejection_counts_are_batched_not_a_commit_each(tmp_path):
    from tops_job.aggregator.group_commit import GroupCommitStore

    store = Store(tmp_path / "agg.sqlite3")
    batched = GroupCommitStore(store, flush_s=3600)  # flushed by the test, not the clock
    (receipt,) = make_receipts(1, run_id="known")
    app = AggregatorApp(batched, accept="v1")
    assert call(app, "POST", "/verify", receipt_line(receipt).encode())[0] == 200
    forged = dict(receipt, sig=receipt["sig"][:-2] + ("00" if receipt["sig"][-2:] != "00" else "01"))
    for _ in range(200):
        assert call(app, "POST", "/verify", receipt_line(forged).encode())[0] == 422
    assert store.rejections() == []  # nothing written per rejection...
    batched.flush_rejections()
    ((did, reason, count, _),) = store.rejections()  # ...one upsert for all 200
    assert (did, count) == (TEST_KEY["did"], 200) and reason
    batched.close()
