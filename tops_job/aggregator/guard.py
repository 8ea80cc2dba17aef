"""What keeps one aggregator process standing under hostile clients: a receipt's cost read
from its header before any work, length caps on every stored string, a bounded number of
verifications at once, per-client limits on /challenge, and the step-free clock that dates
rate floors.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
import uuid
from typing import Any

from tops_job.spec.verify import SPOT_COLUMNS

# Stored strings: the did keys the fleet view and every index; the device and backend names
# are labels. The rest of a receipt is hex of fixed length or bounded by opens × tile.
MAX_STRING = {"did": 256, "device": 256, "backend": 64, "dtype": 32}
MAX_TELEMETRY_ENTRIES = 32
MAX_TELEMETRY_KEY = 64

# Verification cost (elements generated) a request may have and still run on its worker's
# poll thread among the turn's cheap requests (serve.py's inline lane): a CPU worker's
# tops-receipt/2 attempt at k = 2816, 64 × 65 × 2816 = 11.7 M, takes 5 ms to check. A
# costlier one, such as an attempt at the cost cap (2^26), runs where the costly lane puts it.
DEFAULT_INLINE_COST = 1 << 24

SLOT_WAIT_S = 5.0  # the longest a costly verification waits for its turn before a 503

# Elements of A and B generated to check one receipt: per opening one row of A and one row
# of Bt per checked column, k elements each (spec §8.5). 2^25 int32 elements ≈ 128 MiB of
# rows; the default CPU receipt (k = 3392, 16 opens) costs 0.5 M.
DEFAULT_MAX_COST = 1 << 25


def string_problem(receipt: Any) -> tuple[str, str] | None:
    """(code, detail) when a string the aggregator would store is over its cap."""
    if not isinstance(receipt, dict):
        return None
    for name, cap in MAX_STRING.items():
        value = receipt.get(name)
        if isinstance(value, str) and len(value) > cap:
            return "field_too_long", f"{name} is {len(value)} characters; this aggregator stores at most {cap}"
    telemetry = receipt.get("telemetry")
    if isinstance(telemetry, dict):
        if len(telemetry) > MAX_TELEMETRY_ENTRIES:
            return "field_too_long", f"telemetry has {len(telemetry)} entries; at most {MAX_TELEMETRY_ENTRIES}"
        if any(isinstance(key, str) and len(key) > MAX_TELEMETRY_KEY for key in telemetry):
            return "field_too_long", f"a telemetry name is over {MAX_TELEMETRY_KEY} characters"
    return None


def receipt_cost(receipt: Any, *, full: bool) -> int | None:
    """Elements generated to verify `receipt`, from its header alone; None when the header
    is not well-formed enough to say (the verifier then rejects it cheaply)."""
    if not isinstance(receipt, dict):
        return None
    values: list[int] = []
    for name in ("n", "k", "tile", "opens"):
        value = receipt.get(name)
        if type(value) is not int or value <= 0:
            return None
        values.append(value)
    n, k, tile, opens = values
    width = min(tile, n)
    columns = width if full else min(width, SPOT_COLUMNS)
    return opens * k * (1 + columns)


class RunInThread(BaseException):
    """Raised on a poll thread by a request whose verification costs more than the gate's
    `inline_cost`, before the request has done any work that counts: the server hands the
    request to a thread of its pool, where it runs again from the start. A BaseException so
    that no handler meant for the request's own failures answers it."""


_lane = threading.local()  # .poll: this is a poll thread; .costly: the last acquire here was over the inline cost;
# .costly_turn: on a poll thread, what its next acquire over the inline cost does (costly_turn_here)


def serve_inline_here() -> None:
    """Marks the calling thread as a server's poll thread: the requests it runs itself run
    without a slot, and those over the inline cost raise RunInThread."""
    _lane.poll = True


def on_poll_thread() -> bool:
    return getattr(_lane, "poll", False)


def costly_turn_here(turn: str | None) -> None:
    """On a poll thread whose server runs costly requests itself (serve.py, `costly_on_poll`):
    the request it runs next has its turn. "run": its next acquire over the inline cost takes
    it here, whatever its cost; "busy": that acquire answers None (a 503), the request having
    waited past SLOT_WAIT_S for its turn; None: back to raising RunInThread. Used once."""
    _lane.costly_turn = turn


def took_costly_lane(*, reset: bool = False) -> bool:
    """Whether this thread's gate acquire since the last reset was over the inline cost (on a
    pool thread, or on a poll thread in its costly turn): the server then sends that
    connection's next request to the costly lane directly."""
    costly = getattr(_lane, "costly", False)
    if reset:
        _lane.costly = False
    return costly


class VerifyGate:
    """At most `slots` verifications at once in this process, plus one lane kept for cheap
    receipts (cost ≤ `cheap_cost`): a flood of costly receipts, each within the cap, fills the
    slots but never makes an ordinary receipt wait behind all of them. A request that waits
    longer than `wait_s` is answered 503 (transient) rather than queued without bound.

    On a poll thread (serve.py's inline lane) a verification of cost ≤ `inline_cost` runs at
    once, without a slot: the poll thread runs one request at a time, so it is a lane of its
    own. A costlier one, or one whose cost is unknown, raises RunInThread: a poll thread
    never waits for a slot, which would stall every connection it serves. The server then
    queues it for a thread, or for its own costly turn (`costly_turn_here`)."""

    def __init__(self, slots: int, wait_s: float = SLOT_WAIT_S, cheap_cost: int = DEFAULT_MAX_COST // 16,
                 inline_cost: int = DEFAULT_INLINE_COST):
        self.slots = slots
        self.wait_s = wait_s
        self.cheap_cost = cheap_cost
        self.inline_cost = inline_cost
        self._sem = threading.BoundedSemaphore(slots)
        self._cheap = threading.BoundedSemaphore(1)
        self._lock = threading.Lock()
        self.busy = 0

    def acquire(self, cost: int | None = None) -> str | None:
        """A token for release(), or None when no slot freed in time. Raises RunInThread on a
        poll thread when the work is over the inline cost."""
        costly = cost is None or cost > self.inline_cost
        if on_poll_thread():
            if costly:
                turn, _lane.costly_turn = getattr(_lane, "costly_turn", None), None
                if turn is None:
                    raise RunInThread
                _lane.costly = True
                if turn == "busy":
                    return None
            token = "inline"
        else:
            _lane.costly = costly
            if cost is not None and cost <= self.cheap_cost:
                if self._sem.acquire(blocking=False):
                    token = "slot"
                elif self._cheap.acquire(timeout=self.wait_s):
                    token = "cheap"
                else:
                    return None
            elif self._sem.acquire(timeout=self.wait_s):
                token = "slot"
            else:
                return None
        with self._lock:
            self.busy += 1
        return token

    def release(self, token: str = "slot") -> None:
        with self._lock:
            self.busy -= 1
        if token != "inline":
            (self._cheap if token == "cheap" else self._sem).release()


class RateLimiter:
    """A token bucket per client address: `rate` per second, bursts of `burst`. At most
    `max_clients` buckets are kept (the least recently used go first)."""

    def __init__(self, rate: float, burst: int, max_clients: int = 10_000, clock: Any = time.monotonic):
        self.rate, self.burst, self.max_clients, self.clock = rate, burst, max_clients, clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """0 when allowed now, else the seconds until a token is available."""
        now = self.clock()
        with self._lock:
            tokens, then = self._buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.rate)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / self.rate
            self._buckets[client] = (tokens, now)  # re-inserted: dict order is recency
            while len(self._buckets) > self.max_clients:
                self._buckets.pop(next(iter(self._buckets)))
        return wait


@functools.cache
def boot_id() -> str | None:
    """The kernel's id of this boot (Linux), read once: it cannot change under a running
    process. None where there is none."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return None


def clock_domain() -> str:
    """Names the CLOCK_MONOTONIC this process reads: every process of one boot of one host
    shares it (the kernel's boot id); elsewhere, this process alone."""
    boot = boot_id()
    return "boot:" + boot if boot is not None else f"proc:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
