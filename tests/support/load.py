"""Receipts made for aggregator tests, and a bounded load generator (loopback only)."""

from __future__ import annotations

import collections
import random
import threading
import time
from dataclasses import dataclass, field

import requests

from tests.support import TEST_KEY
from tops_job.compute.base import Shape
from tops_job.compute.numpy_backend import NumpyBackend
from tops_job.job.attempt import Identity, run_attempt
from tops_job.spec.canonical import receipt_line
from tops_job.spec.signing import LocalKeySigner

JSON = {"Content-Type": "application/json"}


def identity(did: str | None = None) -> Identity:
    return Identity(did=did or TEST_KEY["did"], signer=LocalKeySigner(bytes.fromhex(TEST_KEY["secret_key_hex"])))


def make_receipts(count: int, *, run_id: str = "load", did: str | None = None, shape: Shape | None = None,
                  tile: int = 8, opens: int = 16, challenge: bytes | None = None, first_attempt: int = 0) -> list[dict]:
    backend = NumpyBackend("float32")
    who = identity(did)
    shape = shape or Shape(16, 16, 32)
    return [run_attempt(backend, shape, who, run_id=run_id, attempt=first_attempt + i, tile=tile, opens=opens,
                        challenge=challenge).receipt for i in range(count)]


@dataclass
class LoadResult:
    statuses: collections.Counter = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)
    answers: list[tuple[str, int, dict]] = field(default_factory=list)  # (digest sent, status, body)
    wall_s: float = 0.0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def post_load(urls: list[str], receipts: list[dict], *, copies: int = 2, clients: int = 8, deadline_s: float = 120,
              seed: int = 7) -> LoadResult:
    """Send every receipt `copies` times, each copy to a URL drawn in turn from `urls`, in a
    shuffled order, from `clients` threads with keep-alive sessions. Bounded: stops at
    `deadline_s`."""
    from tops_job.spec.canonical import digest_of

    jobs = [(receipt_line(r), digest_of(r).hex(), urls[(i + c) % len(urls)]) for i, r in enumerate(receipts)
            for c in range(copies)]
    random.Random(seed).shuffle(jobs)
    result = LoadResult()
    lock = threading.Lock()
    cursor = iter(jobs)
    stop_at = time.monotonic() + deadline_s

    def client() -> None:
        session = requests.Session()
        while time.monotonic() < stop_at:
            with lock:
                job = next(cursor, None)
            if job is None:
                return
            body, digest, url = job
            began = time.perf_counter()
            try:
                answer = session.post(url, data=body, headers=JSON, timeout=30)
                status, parsed = answer.status_code, answer.json()
            except (requests.RequestException, ValueError) as exc:
                status, parsed = 0, {"error": type(exc).__name__}
            took = time.perf_counter() - began
            with lock:
                result.statuses[status] += 1
                result.latencies.append(took)
                result.answers.append((digest, status, parsed))

    began = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.wall_s = time.monotonic() - began
    return result
