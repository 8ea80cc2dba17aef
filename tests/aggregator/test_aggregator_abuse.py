"""The aggregator against hostile clients (issue 12's table, one test a row), over real
loopback HTTP. Every attack is bounded in count and time."""

from __future__ import annotations

import concurrent.futures
import json
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.support import CLI, TEST_KEY
from tests.support.load import JSON, make_receipts
from tests.support.net import wait_for
from tests.support.peers import Aggregator
from tops_job.compute.base import Shape
from tops_job.compute.numpy_backend import NumpyBackend
from tops_job.spec.canonical import receipt_line

IDLE, SLOWLORIS = 2000, 1000


def _fd_room(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft - 200 if soft - 200 < wanted else wanted


def _honest_latencies(base: str, body: str, seconds: float) -> list[float]:
    """POSTs of an accepted receipt (answered duplicate) and GET /health, one after another."""
    session = requests.Session()
    latencies = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        began = time.perf_counter()
        answer = session.post(f"{base}/verify", data=body, headers=JSON, timeout=30)
        assert answer.status_code == 200, answer.text
        latencies.append(time.perf_counter() - began)
        began = time.perf_counter()
        assert session.get(f"{base}/health", timeout=30).status_code == 200
        latencies.append(time.perf_counter() - began)
    return latencies


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@pytest.fixture
def receipt_body() -> str:
    return receipt_line(make_receipts(1, run_id="honest")[0])


def test_idle_and_slowloris_connections_neither_kill_the_process_nor_block_honest_clients(tmp_path, receipt_body, capsys):
    idle_n = _fd_room(IDLE + SLOWLORIS) * IDLE // (IDLE + SLOWLORIS)
    slow_n = _fd_room(IDLE + SLOWLORIS) - idle_n
    agg = Aggregator(tmp_path / "agg.sqlite3", "--header-timeout", "8")
    port = int(agg.base.rsplit(":", 1)[1])
    held: list[socket.socket] = []
    try:
        assert requests.post(agg.url, data=receipt_body, headers=JSON, timeout=30).status_code == 200
        for _ in range(idle_n):  # connect and say nothing (fd ≥ 1024 killed select() waitress)
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        slow = []
        for _ in range(slow_n):  # a request line, then a header line every 2 s
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"POST /verify HTTP/1.1\r\nHost: x\r\n")
            slow.append(sock)
        held += slow
        began = time.monotonic()
        stop = threading.Event()

        def trickle() -> None:
            n = 0
            while not stop.wait(2.0):
                n += 1
                for sock in slow:
                    try:
                        sock.sendall(f"X-Slow-{n}: 1\r\n".encode())
                    except OSError:
                        pass

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        latencies = _honest_latencies(agg.base, receipt_body, 5.0)
        assert agg.proc.poll() is None, "the aggregator died"
        p99 = _p99(latencies)
        with capsys.disabled():
            print(f"\n[abuse] {idle_n} idle + {slow_n} slowloris connections: {len(latencies)} honest requests,"
                  f" p50 {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
        assert p99 < 1.0, p99
        assert agg.metric("tops_job_aggregator_connections") >= idle_n + slow_n - 10

        # The slow requests still trickle, but their headers are overdue: the server closes them.
        time.sleep(max(0.0, began + 8 + 3 - time.monotonic()))
        stop.set()
        trickler.join()
        closed = 0
        for sock in slow:
            sock.settimeout(0.5)
            try:
                closed += sock.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass
        assert closed == len(slow), f"{closed} of {len(slow)} slow requests closed"
        assert agg.metric("tops_job_aggregator_slow_requests_closed_total") >= len(slow)
        assert agg.proc.poll() is None
    finally:
        for sock in held:
            sock.close()
        agg.stop()


def test_at_the_connection_limit_idle_connections_make_room(tmp_path, receipt_body):
    agg = Aggregator(tmp_path / "agg.sqlite3", "--connection-limit", "100")
    port = int(agg.base.rsplit(":", 1)[1])
    held = []
    try:
        for _ in range(300):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        latencies = _honest_latencies(agg.base, receipt_body, 2.0)
        assert _p99(latencies) < 1.0
        assert agg.proc.poll() is None
        assert agg.metric("tops_job_aggregator_connections_shed_total") > 0
    finally:
        for sock in held:
            sock.close()
        agg.stop()


def test_costly_receipts_are_refused_from_their_header_and_honest_latency_holds(tmp_path, receipt_body, capsys):
    agg = Aggregator(tmp_path / "agg.sqlite3", "--max-cost", "2000000")
    try:
        assert requests.post(agg.url, data=receipt_body, headers=JSON, timeout=30).status_code == 200
        # Within the cap: verified (16 opens × k 8192 × 9 = 1.2 M elements).
        (fine,) = make_receipts(1, run_id="fine", shape=Shape(16, 16, 8192), tile=16)
        assert requests.post(agg.url, data=json.dumps(fine), headers=JSON, timeout=60).status_code == 200
        # Over it: refused before any work, whatever the rest of the receipt says.
        (costly,) = make_receipts(1, run_id="costly", shape=Shape(16, 16, 16384), tile=16)
        huge = dict(costly, k=262144, opens=256, ops=2 * 16 * 16 * 262144)
        stop = threading.Event()
        seen: list[tuple[int, str, float]] = []

        def abuser(body: str) -> None:
            session = requests.Session()
            while not stop.is_set():
                began = time.perf_counter()
                answer = session.post(agg.url, data=body, headers=JSON, timeout=30)
                seen.append((answer.status_code, answer.json().get("error", ""), time.perf_counter() - began))

        bodies = [json.dumps(costly), json.dumps(huge)]
        abusers = [threading.Thread(target=abuser, args=(bodies[i % 2],)) for i in range(16)]
        for thread in abusers:
            thread.start()
        try:
            latencies = _honest_latencies(agg.base, receipt_body, 4.0)
        finally:
            stop.set()
            for thread in abusers:
                thread.join()
        assert seen and {(status, code) for status, code, _ in seen} == {(422, "cost_over_cap")}
        with capsys.disabled():
            print(f"\n[abuse] 16 clients posting over-cap receipts ({len(seen)} refused, p99 {_p99([s[2] for s in seen]) * 1000:.1f} ms):"
                  f" honest p99 {_p99(latencies) * 1000:.1f} ms")
        assert _p99(latencies) < 1.0
        rss_kb = int(next(line.split()[1] for line in Path(f"/proc/{agg.proc.pid}/status").read_text().splitlines()
                          if line.startswith("VmHWM:")))
        assert rss_kb < 1_000_000, f"peak RSS {rss_kb} kB"
    finally:
        agg.stop()


def test_resend_of_an_accepted_receipt_is_answered_without_verifying_it_again(tmp_path, receipt_body):
    agg = Aggregator(tmp_path / "agg.sqlite3")
    try:
        first = requests.post(agg.url, data=receipt_body, headers=JSON, timeout=30).json()
        assert first["duplicate"] is False
        verified = agg.metric("tops_job_aggregator_verify_duration_seconds_count")
        for _ in range(20):
            again = requests.post(agg.url, data=receipt_body, headers=JSON, timeout=30).json()
            assert again == dict(first, duplicate=True)
        assert agg.metric("tops_job_aggregator_verify_duration_seconds_count") == verified
        assert agg.metric("tops_job_aggregator_receipts_total", 'reason="none",verdict="duplicate"') == 20
    finally:
        agg.stop()


def test_challenges_are_limited_per_client_and_per_did_and_expired_ones_purged(tmp_path):
    agg = Aggregator(tmp_path / "agg.sqlite3", "--challenge-ttl", "2")
    try:
        session = requests.Session()
        statuses: dict[int, int] = {}
        for i in range(2000):
            answer = session.get(f"{agg.base}/challenge", params={"did": TEST_KEY["did"] if i % 2 else f"did:x:{i}"},
                                 timeout=10)
            statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
            if answer.status_code == 429:
                assert int(answer.headers["Retry-After"]) >= 1 and answer.json()["error"] == "too_many_challenges"
        # 100 at once, then 20 a second (the default --challenge-rate), whatever the did
        assert statuses[429] > 1500 and statuses[200] <= 100 + 20 * 10, statuses
        time.sleep(3)  # every challenge expired, none used: the next issue purges them
        assert session.get(f"{agg.base}/challenge", params={"did": "did:x:late"}, timeout=10).status_code == 200
        assert sqlite3.connect(agg.db).execute("SELECT COUNT(*) FROM challenges").fetchone()[0] == 1
        assert agg.metric("tops_job_aggregator_challenges_expired_total") == statuses[200]
        assert agg.metric("tops_job_aggregator_challenges_issued_total") == statuses[200] + 1
    finally:
        agg.stop()


def test_a_did_holds_a_bounded_number_of_unused_challenges(tmp_path):
    agg = Aggregator(tmp_path / "agg.sqlite3", "--challenge-rate", "1000")
    try:
        codes = [requests.get(f"{agg.base}/challenge", params={"did": "did:x:one"}, timeout=10).status_code
                 for _ in range(80)]
        assert codes.count(200) == 64 and codes.count(429) == 16
    finally:
        agg.stop()


def test_a_huge_did_is_refused_and_nothing_is_stored(tmp_path):
    agg = Aggregator(tmp_path / "agg.sqlite3")
    try:
        (receipt,) = make_receipts(1, run_id="huge-did")
        size_before = sum(p.stat().st_size for p in tmp_path.glob("agg.sqlite3*"))
        answer = requests.post(agg.url, data=json.dumps(dict(receipt, did="d" * 3_900_000)), headers=JSON, timeout=60)
        assert answer.status_code == 422 and answer.json()["error"] == "field_too_long"
        assert "did" in answer.json()["detail"]
        long_device = dict(receipt, device="x" * 300)
        assert requests.post(agg.url, data=json.dumps(long_device), headers=JSON, timeout=30).json()["error"] == "field_too_long"
        assert sqlite3.connect(agg.db).execute("SELECT COUNT(*) FROM receipts").fetchone()[0] == 0
        assert sum(p.stat().st_size for p in tmp_path.glob("agg.sqlite3*")) - size_before < 100_000
    finally:
        agg.stop()


@pytest.mark.parametrize("case", ["garbage", "read-only filesystem", "a directory"])
def test_start_on_an_unusable_database_is_one_clear_line_and_exit_2(tmp_path, case):
    if case == "garbage":
        db = tmp_path / "agg.sqlite3"
        db.write_bytes(b"this is not a database" * 100)
    elif case == "read-only filesystem":
        db = Path("/proc/tops-job-aggregator.sqlite3")
    else:
        db = tmp_path / "dir.sqlite3"
        db.mkdir()
    result = subprocess.run([*CLI, "aggregator", "serve", "--port", "0", "--db", str(db)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot use the database" in lines[0] and str(db) in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_postgres_that_cannot_be_reached_is_one_clear_line_and_exit_2():
    pytest.importorskip("psycopg", reason="pip install 'psycopg[binary]'")
    from tests.support.net import free_port

    dsn = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    result = subprocess.run([*CLI, "aggregator", "serve", "--port", "0", "--db", dsn], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot use the database postgresql://nobody@127.0.0.1" in lines[0], result.stderr


def test_two_workers_share_the_port_and_their_metrics(tmp_path):
    agg = Aggregator(tmp_path / "agg.sqlite3", "--workers", "2")
    try:
        receipts = make_receipts(40, run_id="workers")
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda r: requests.post(agg.url, data=json.dumps(r), headers=JSON, timeout=30).status_code,
                                  receipts))
        assert codes == [200] * 40
        # Whichever worker answers the scrape, the counts are the sum over both.
        for _ in range(4):
            assert agg.metric("tops_job_aggregator_receipts_total", 'reason="none",verdict="accepted"') == 40
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(agg.proc.pid)], capture_output=True, text=True)
        pids = [int(pid) for pid in children.stdout.split()]
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)  # a worker dies: the parent starts another

        def replaced():
            now = subprocess.run(["ps", "-o", "pid=", "--ppid", str(agg.proc.pid)], capture_output=True, text=True)
            alive = [int(pid) for pid in now.stdout.split()]
            return len(alive) == 2 and pids[0] not in alive

        wait_for(replaced, 20, "a replacement worker", interval=0.2)
        (late,) = make_receipts(1, run_id="after-crash")
        assert requests.post(agg.url, data=json.dumps(late), headers=JSON, timeout=30).status_code == 200
    finally:
        agg.stop()
    assert agg.proc.returncode == 0


def test_under_a_small_descriptor_limit_a_flood_of_connections_is_survived(tmp_path, receipt_body):
    """RLIMIT_NOFILE 256: the connection limit is derived under it, so 600 connections
    neither crash the process (EMFILE, select()) nor lock honest clients out."""

    def small_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    agg = Aggregator(tmp_path / "agg.sqlite3", preexec_fn=small_limit)
    port = int(agg.base.rsplit(":", 1)[1])
    held = []
    try:
        for _ in range(600):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        latencies = _honest_latencies(agg.base, receipt_body, 2.0)
        assert _p99(latencies) < 1.0 and agg.proc.poll() is None
        assert agg.metric("tops_job_aggregator_connection_limit") <= 256 - 64
    finally:
        for sock in held:
            sock.close()
        agg.stop()


def test_a_body_that_trickles_in_is_cut_off(tmp_path):
    agg = Aggregator(tmp_path / "agg.sqlite3", "--header-timeout", "1", "--body-timeout", "1")
    port = int(agg.base.rsplit(":", 1)[1])
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /verify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        began = time.monotonic()
        closed_after = None
        sock.settimeout(0.2)
        while time.monotonic() - began < 8:
            try:
                sock.sendall(b" ")  # one byte of body every 0.2 s: never idle, never done
                if sock.recv(1) == b"":
                    closed_after = time.monotonic() - began
                    break
            except TimeoutError:
                continue
            except OSError:
                closed_after = time.monotonic() - began
                break
        sock.close()
        assert closed_after is not None and closed_after < 5, closed_after
    finally:
        agg.stop()


class _CheatingBackend(NumpyBackend):
    """A worker that reports a product it did not compute (C + 1): its receipts are signed and
    their Merkle paths check, so every verification runs to the end before it fails."""

    def multiply(self) -> int:
        elapsed = super().multiply()
        self.c += 1
        return elapsed


@pytest.mark.parametrize("lane", ["thread", "poll"])
def test_costly_receipts_within_the_cap_do_not_hold_up_cheap_honest_ones(tmp_path, capsys, lane):
    """Costly requests in either lane (serve.py): on threads within the verification slots, or
    on the poll thread one a turn, where an honest request waits behind one of them at most."""
    from tests.support.load import identity
    from tops_job.job.attempt import run_attempt

    agg = Aggregator(tmp_path / "agg.sqlite3", "--costly-lane", lane)  # the default cap, 2^25
    try:
        costly = run_attempt(_CheatingBackend("float32"), Shape(16, 16, 131072), identity(), run_id="cheat", attempt=0,
                             tile=16, opens=16).receipt  # 16 × 131072 × 9 = 18.9 M elements: under the cap
        honest = [receipt_line(r) for r in make_receipts(400, run_id="honest-new")]
        stop = threading.Event()
        seen: list[tuple[int, str]] = []

        def abuser() -> None:
            session = requests.Session()
            body = json.dumps(costly)
            while not stop.is_set():
                answer = session.post(agg.url, data=body, headers=JSON, timeout=60)
                seen.append((answer.status_code, answer.json().get("error", "")))

        abusers = [threading.Thread(target=abuser) for _ in range(16)]
        for thread in abusers:
            thread.start()
        latencies = []
        try:
            time.sleep(1.0)  # the verification slots are full of costly work
            session = requests.Session()
            for body in honest:  # new receipts: each needs its own verification
                began = time.perf_counter()
                answer = session.post(agg.url, data=body, headers=JSON, timeout=60)
                latencies.append(time.perf_counter() - began)
                assert answer.status_code == 200 and answer.json()["duplicate"] is False, answer.text
                if len(latencies) >= 60 and sum(latencies) > 6:
                    break
        finally:
            stop.set()
            for thread in abusers:
                thread.join()
        assert {code for _, code in seen} <= {"wrong_product", "busy"} and any(c == "wrong_product" for _, c in seen)
        with capsys.disabled():
            print(f"\n[abuse] 16 clients posting costly forged receipts, costly lane {lane} ({len(seen)} verified and refused):"
                  f" {len(latencies)} new honest receipts, p50 {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms,"
                  f" p99 {_p99(latencies) * 1000:.1f} ms")
        # Each honest receipt is itself verified while 16 full verifications compete for the
        # same 2 cores; before the bounded lanes this was 2-7 s. Measured 0.3-0.9 s here, so
        # 1.5 s keeps the test about the fix, not about the machine's other load.
        assert _p99(latencies) < 1.5
    finally:
        agg.stop()
