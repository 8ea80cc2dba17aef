"""Writers on one SQLite file take turns through an flock (store.Store.transaction), so a
second worker process waits for the kernel's wake-up, not in SQLite's sleeping busy handler."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from tops_job.aggregator.store import ACCEPTED, DUPLICATE, Store


def _fields(i: int) -> dict:
    return dict(digest=f"{i:064x}", did="did:x", nonce=f"{i:064x}", pubkey="ab" * 33, run_id="r", attempt=i, ops=1,
                started_ms=0, challenge=None, accepted_ms=0, receipt="{}")


def _hold_the_writers_turn(path: str, held: multiprocessing.Event, seconds: float) -> None:
    store = Store(path)
    with store.transaction(store._conn()):
        held.set()
        time.sleep(seconds)


def test_a_writer_in_another_process_waits_for_the_turn_then_commits_at_once(tmp_path):
    path = str(tmp_path / "agg.sqlite3")
    store = Store(path)
    held = multiprocessing.get_context("fork").Event()
    other = multiprocessing.get_context("fork").Process(target=_hold_the_writers_turn, args=(path, held, 0.5))
    other.start()
    assert held.wait(10)
    began = time.monotonic()
    assert store.add_receipts([_fields(1)]) == [ACCEPTED]
    waited = time.monotonic() - began
    other.join(10)
    assert 0.3 < waited < 5  # it waited for the other writer, and was not refused (no "database is locked")
    assert (tmp_path / "agg.sqlite3.writer-lock").exists()


def test_a_transaction_that_raises_is_rolled_back_and_gives_the_turn_back(tmp_path):
    store = Store(str(tmp_path / "agg.sqlite3"))
    conn = store._conn()
    with pytest.raises(RuntimeError):
        with store.transaction(conn):
            conn.execute("INSERT INTO rejections (did, reason, count, last_ms) VALUES ('d', 'r', 1, 0)")
            raise RuntimeError("boom")
    assert conn.execute("SELECT COUNT(*) FROM rejections").fetchone()[0] == 0
    assert store.add_receipts([_fields(2), _fields(2)]) == [ACCEPTED, DUPLICATE]  # the turn was given back


def test_new_databases_use_16_kib_pages(tmp_path):
    store = Store(str(tmp_path / "agg.sqlite3"))
    assert store._conn().execute("PRAGMA page_size").fetchone()[0] == 16384


def test_the_server_keeps_freed_memory_on_glibc():
    """tops_job.heap.keep_freed_memory sets glibc's trim and mmap thresholds (benchmarks/RESULTS.md
    has what it saves); on glibc Linux it must take effect, or the server silently loses it."""
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not a glibc system: keep_freed_memory changes nothing there by design")
    code = "from tops_job.heap import keep_freed_memory; print(keep_freed_memory())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"
