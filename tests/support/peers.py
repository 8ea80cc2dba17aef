"""Real peers for delivery tests: the reference aggregator in a subprocess on an ephemeral
port, a fault-injecting HTTP proxy in front of it, and the `tops-job run` CLI."""

from __future__ import annotations

import collections
import email.utils
import json
import os
import socket
import sqlite3
import struct
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from tests.support import CLI, TEST_SECRET


class Aggregator:
    """`tops-job aggregator serve --port 0` in a subprocess. `accept` is the schemas it takes
    (the aggregator's own default is v2 only; the v1 tests ask for both)."""

    def __init__(self, db: Path, *extra: str, accept: str = "both", **popen: Any):
        self.db = db
        self.proc = subprocess.Popen([*CLI, "aggregator", "serve", "--port", "0", "--db", str(db), "--accept", accept,
                                      *extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)
        deadline = time.monotonic() + 30
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if "serving on http://" in line or not line:
                break
        if "serving on http://" not in line:
            self.proc.kill()
            raise RuntimeError(f"aggregator did not start: {line!r}")
        self.base = line.split("serving on ", 1)[1].split()[0]
        self.url = self.base + "/verify"
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _drain_stderr(self) -> None:
        for _ in self.proc.stderr:
            pass

    def _first_column(self, sql: str) -> list[str]:
        conn = sqlite3.connect(self.db)
        try:
            return [row[0] for row in conn.execute(sql)]
        finally:
            conn.close()

    def digests(self) -> list[str]:
        return self._first_column("SELECT digest FROM receipts")

    def v2_accepted(self) -> list[str]:
        """Digests of the tops-receipt/2 commitments it accepted."""
        return self._first_column("SELECT digest FROM v2_commitments WHERE state = 'accepted'")

    def metric(self, name: str, labels: str = "") -> float:
        """The sum of a /metrics sample's values: all its series, or those whose labels
        begin with `labels` (e.g. 'verdict="duplicate"')."""
        text = requests.get(f"{self.base}/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + (("{" + labels) if labels else "")) and not line.startswith("#"):
                if labels or line.startswith(name + " ") or line.startswith(name + "{"):
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class FaultProxy:
    """A real HTTP server in front of the aggregator. Each POST /verify takes the next fault
    from `faults` (then `default`, None meaning "forward"). Faults: an HTTP status ("500",
    "502", "503", "422"), "429" (Retry-After seconds), "429-date" (Retry-After HTTP-date),
    "hang" (no answer for `hang_s`), "reset" (TCP RST), "slow" (forward after `slow_s`),
    "lost" (forward, then answer 502 as if the answer was lost), "503-long" (Retry-After: 30), "latency" (forward after
    `latency_s`)."""

    def __init__(self, upstream: str, *, default: str | None = None, hang_s: float = 2.0, slow_s: float = 0.3,
                 latency_s: float = 0.2, challenge_404: bool = False):
        self.upstream = upstream.rstrip("/")
        self.faults: collections.deque[str] = collections.deque()
        self.default = default
        self.hang_s, self.slow_s, self.latency_s = hang_s, slow_s, latency_s
        self.challenge_404 = challenge_404
        self.seen: collections.Counter = collections.Counter()
        self.keys: collections.Counter = collections.Counter()  # POSTs per Idempotency-Key (receipt digest)
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.startswith("/challenge") and proxy.challenge_404:
                    return self._answer(404, b'{"ok":false,"error":"not_found"}')
                upstream = requests.get(proxy.upstream + self.path, timeout=10)
                self._answer(upstream.status_code, upstream.content)

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with proxy.lock:
                    fault = proxy.faults.popleft() if proxy.faults else proxy.default
                    proxy.seen[fault or "forward"] += 1
                    proxy.keys[self.headers.get("Idempotency-Key", "")] += 1
                if fault is None:
                    return self._forward(body)
                if fault == "lost":
                    self._forward(body, send=False)
                    return self._answer(502, b"bad gateway")
                if fault in ("slow", "latency"):
                    time.sleep(proxy.slow_s if fault == "slow" else proxy.latency_s)
                    return self._forward(body)
                if fault == "hang":
                    time.sleep(proxy.hang_s)
                    self.close_connection = True
                    return
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if fault == "429":
                    return self._answer(429, b'{"ok":false,"error":"slow_down"}', {"Retry-After": "1"})
                if fault == "429-date":
                    when = email.utils.formatdate(time.time() + 1, usegmt=True)
                    return self._answer(429, b'{"ok":false,"error":"slow_down"}', {"Retry-After": when})
                if fault == "503-long":  # a long Retry-After: the worker sits in backoff
                    return self._answer(503, b'{"ok":false,"error":"busy"}', {"Retry-After": "30"})
                status = int(fault)
                headers = {"Retry-After": "0"} if status == 503 else {}
                self._answer(status, json.dumps({"ok": False, "error": f"injected_{status}", "detail": "fault"}).encode(),
                             headers)

            def _forward(self, body: bytes, send: bool = True) -> None:
                upstream = requests.post(proxy.upstream + self.path, data=body, timeout=30,
                                         headers={"Content-Type": self.headers.get("Content-Type", ""),
                                                  "Idempotency-Key": self.headers.get("Idempotency-Key", "")})
                if send:
                    self._answer(upstream.status_code, upstream.content)

            def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients killed with -9 reset their connections: expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/verify"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def worker_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The caller's (already isolated) environment plus a fixed key and fast, small delivery settings."""
    env = dict(os.environ)
    env.update({
        "WORKER_SK_HEX": TEST_SECRET,
        "TOPS_JOB_PROTOCOL": "v1",  # these helpers drive the v1 outbox and sender; v2's have their own tests
        "TOPS_JOB_OUTBOX_DIR": str(tmp / "outbox"),
        "TOPS_JOB_RETRY_BASE": "0.05",
        "TOPS_JOB_RETRY_CAP": "0.4",
        "TOPS_JOB_CONNECT_TIMEOUT": "1",
        "TOPS_JOB_READ_TIMEOUT": "1",
        "TOPS_JOB_BREAKER_COOLDOWN": "0.3",
        "RATE_LIMIT_PER_SECOND": "1000",
        "TOPS_JOB_DRAIN_TIMEOUT": "20",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def run_worker(tmp: Path, url: str | None, *args: str, env: dict[str, str] | None = None, timeout: float = 60,
               name: str = "run") -> subprocess.CompletedProcess:
    command = [*CLI, "run", "--size", "64", "--opens", "16", "--receipts-out", str(tmp / f"{name}.jsonl"),
               "--summary", str(tmp / f"{name}.summary.json"), *args]
    if url:
        command += ["--aggregator-url", url]
    return subprocess.run(command, env=env or worker_env(tmp), capture_output=True, text=True, timeout=timeout)


def start_worker(tmp: Path, url: str, *args: str, env: dict[str, str] | None = None, name: str = "run") -> subprocess.Popen:
    command = [*CLI, "run", "--size", "64", "--opens", "16", "--receipts-out", str(tmp / f"{name}.jsonl"),
               "--summary", str(tmp / f"{name}.summary.json"), "--aggregator-url", url, *args]
    return subprocess.Popen(command, env=env or worker_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signed_digests(path: Path) -> list[str]:
    """Digests of the receipts a run wrote with --receipts-out (either schema)."""
    from tops_job.spec.any_receipt import digest_of_any as digest_of

    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(digest_of(json.loads(line)).hex())
        except ValueError:  # a line cut short by kill -9
            continue
    return out


def outbox_digests(outbox: Path) -> list[str]:
    return [p.name[:-5] for p in outbox.glob("*.json") if len(p.name) == 69]


class CannedServer:
    """A real HTTP server on loopback that answers every POST with one fixed answer:
    `status`, `headers` and `body`, whatever was sent."""

    def __init__(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None):
        self.status, self.body, self.headers = status, body, headers or {}
        self.posts = 0
        canned = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                canned.posts += 1
                self.send_response(canned.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(canned.body)))
                for name, value in canned.headers.items():
                    self.send_header(name, value)  # latin-1 on the wire, as http.server writes it
                self.end_headers()
                self.wfile.write(canned.body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/verify"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def signed_receipts(count: int, run_id: str = "earlier", size: int = 32) -> list[dict[str, Any]]:
    """`count` valid receipts signed with the vectors' key, made in this process."""
    from tests.support import TEST_KEY
    from tops_job.compute.base import Shape
    from tops_job.compute.numpy_backend import NumpyBackend
    from tops_job.job.attempt import Identity, run_attempt
    from tops_job.spec.signing import LocalKeySigner

    identity = Identity(did=TEST_KEY["did"], signer=LocalKeySigner(bytes.fromhex(TEST_KEY["secret_key_hex"])))
    backend = NumpyBackend("float32", threads=1)
    try:
        return [run_attempt(backend, Shape(size, size, size), identity, run_id=run_id, attempt=i, tile=8,
                            opens=16).receipt for i in range(count)]
    finally:
        backend.close()


def fill_outbox(outbox: Path, receipts: list[dict[str, Any]]) -> list[str]:
    """Store `receipts` in `outbox` as an earlier run would have; their digests."""
    from tops_job.delivery.outbox import Outbox
    from tops_job.spec.canonical import digest_of

    box = Outbox(outbox)
    for receipt in receipts:
        box.put(receipt, digest_of(receipt))
    return [digest_of(r).hex() for r in receipts]
