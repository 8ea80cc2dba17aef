"""Delivery for tops-receipt/2's challenge mode (docs/spec/receipt-v2.md §10.3).

The attempt loop only writes each signed commitment to the outbox, with its leaf hashes
when its tree was built on the host; a GPU's tree stays on the device (kept_trees.py).
Sender threads post `{"commit": newest, "open": [earlier commitments whose challenge came
back]}`: one request per attempt, no round trip inside the attempt loop. Openings are
computed here, off the loop, from the kept tree or leaf hashes and the seed; where neither
is left (a crash, a tree let go), from the commitment recomputed by `recommit`. Every state
change is in the outbox before the next message, so a kill -9 anywhere resumes where it
stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from tops_job.delivery.backend import ExchangeStore
from tops_job.delivery.drain_threads import drain
from tops_job.delivery.exchange_http import FINAL_ITEM, HttpExchange
from tops_job.delivery.exchange_outbox import CHALLENGED, OPENED, SIGNED
from tops_job.delivery.kept_trees import KeptTree, KeptTrees, Recommit
from tops_job.delivery.outcomes import Outcome
from tops_job.delivery.protocol import DeliveryReport
from tops_job.delivery.ratelimit import TokenBucket
from tops_job.delivery.retry import RetryPolicy
from tops_job.errors import ErrorClass, StorageError
from tops_job.observability.events import ReceiptEvent
from tops_job.spec.v2 import KeptCommitment, header_of

log = logging.getLogger("tops_job.exchange")

POLL_S = 0.1
LINGER_S = 1.0  # an opened set waits this long for the next commitment to ride with
OPEN_ITEMS_MAX = 4


class ExchangeDelivery:
    def __init__(self, outbox: ExchangeStore, client: HttpExchange, on_receipt: Callable[[ReceiptEvent], None], *,
                 policy: RetryPolicy | None = None, stop: Any = None, workers: int = 2, linger_s: float = LINGER_S,
                 bucket: TokenBucket | None = None):
        self.outbox = outbox
        self.client = client
        self.on_receipt = on_receipt
        self.policy = policy or RetryPolicy(max_retries=1 << 30, base_s=0.2, cap_s=10.0)
        self.stop = stop
        self.workers = max(1, workers)
        self.linger_s = linger_s
        self.bucket = bucket or TokenBucket(10.0)  # RATE_LIMIT_PER_SECOND: exchange requests per second
        self._waited: dict[str, float] = {}  # digest -> seconds its requests waited for the rate limiter
        self.report = DeliveryReport(detail={"submitter": client.name, "outbox": outbox.location, "protocol": "v2"})
        self._cond = threading.Condition()
        self._fresh: deque[str] = deque()  # commitments to send (awaiting a challenge)
        self._ready: dict[str, float] = {}  # challenged commitments -> when they became ready to open
        self._busy: set[str] = set()
        self._tracked: dict[str, str] = {}  # digest -> state, until a verdict
        self._since: dict[str, float] = {}
        self._failures = 0
        self._closing = False
        self._finished = False
        self._halt = threading.Event()
        self._deadline: float | None = None
        self._threads: list[threading.Thread] = []
        self._earlier = 0
        self._withheld = 0  # failed the self-audit: in v2/withheld/, never sent
        self._send_errors: Counter[str] = Counter()
        self._last_error: str | None = None
        self.kept = KeptTrees()  # GPU trees awaiting their challenge
        self.recommit: Recommit | None = None  # set by the run: a commitment recomputed on its backend
        self._recomputed = 0
        self._unopenable: set[str] = set()  # no backend could recompute these in this run

    # ---- the Delivery protocol

    def start(self) -> None:
        if self.outbox.acquire():
            earlier = self.outbox.recover()
            if earlier:
                log.info("[outbox] %d v2 attempts from earlier runs in %s: resuming them", len(earlier), self.outbox.location)
            with self._cond:
                for digest, state in earlier.items():
                    self._track(digest, state)
                self._earlier = len(earlier)
        else:
            log.warning("[outbox] %s is in use by another run: leaving its attempts to that run", self.outbox.location)
        for index in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"tops-job-exchange-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def enqueue(self, receipt: dict[str, Any], digest: bytes, leaf_hashes: bytes | None = None, *,
                held: bool = False, kept: KeptTree | None = None) -> None:
        # durable before anything else happens to it; a held one is not even committed until
        # its self-audit verifies it (see `release`)
        self.outbox.put(receipt, digest.hex(), leaf_hashes, held=held)
        if kept is not None:
            self.kept.put(digest.hex(), kept)
        if not held:
            self.release(digest, durable=True)

    def release(self, digest: bytes, *, durable: bool = False) -> None:
        """Held commitments are not sent at all before the audit: sending one early would
        save the audit's few milliseconds, but a failed audit would then leave the aggregator
        a challenged commitment never opened (counted as expired against this worker) and
        would have shown it a product this worker knows is wrong."""
        if not durable:
            self.outbox.unhold(digest.hex())
        with self._cond:
            self._track(digest.hex(), SIGNED)
            self._cond.notify()

    def withhold(self, digest: bytes, reason: str) -> None:
        self.outbox.withhold(digest.hex(), reason)
        self.kept.discard(digest.hex())
        with self._cond:
            self._withheld += 1

    def _track(self, digest: str, state: str) -> None:
        self._tracked[digest] = state
        self._since.setdefault(digest, time.perf_counter())
        if state == SIGNED:
            self._fresh.append(digest)
        else:
            self._ready[digest] = 0.0  # from an earlier run: open at once

    def _start_closing(self, deadline: float) -> None:
        self._closing = True
        self._deadline = deadline

    def finish(self, deadline_s: float) -> DeliveryReport:
        drain(self._threads, self._cond, self._halt, self._start_closing, deadline_s, self.stop)
        with self._cond:
            self._finished = True
            states = Counter(self._tracked.values())
        self.report.pending = sum(states.values())
        self.report.detail.update(self.state())
        self.report.detail["earlier_runs"] = self._earlier
        if self._recomputed or self.kept.let_go:
            self.report.detail["recomputed_to_open"] = self._recomputed
            self.report.detail["trees_let_go"] = self.kept.let_go
        if self._withheld:
            self.report.detail["withheld"] = self._withheld
            self.report.detail["withheld_in"] = self.outbox.withheld_location
        if states:
            # a commitment whose challenge never came back stays pending, and says so
            self.report.detail["left_because"] = {
                "awaiting_challenge": states[SIGNED], "awaiting_verdict": states[CHALLENGED] + states[OPENED]}
            log.warning("[outbox] %d v2 attempts left in %s (%d awaiting a challenge, %d awaiting a verdict; last "
                        "error %s): the next run resumes them", self.report.pending, self.outbox.location, states[SIGNED],
                        states[CHALLENGED] + states[OPENED], self._last_error)
        self.client.close()
        self.outbox.release()
        return self.report

    def state(self) -> dict[str, Any]:
        with self._cond:
            depth = len(self._tracked)
            errors = dict(self._send_errors)
        return {"outbox_depth": depth, "breaker": "closed", "send_errors_by_class": errors}

    # ---- sender threads

    def _take(self) -> tuple[str | None, list[str]] | None:
        """The next request's commitment and opened sets, or None when this thread is done."""
        with self._cond:
            while True:
                if self._halt.is_set():
                    return None
                now = time.perf_counter()
                ready = [d for d in self._ready if d not in self._busy]
                commit = next((d for d in self._fresh if d not in self._busy), None)
                due = commit is not None or self._closing or any(now - self._ready[d] >= self.linger_s for d in ready)
                if commit is not None or (ready and due):
                    if commit is not None:
                        self._fresh.remove(commit)
                        self._busy.add(commit)
                    opens = ready[:OPEN_ITEMS_MAX]
                    for digest in opens:
                        del self._ready[digest]
                        self._busy.add(digest)
                    return commit, opens
                if self._closing and not self._fresh and not self._ready and not self._busy:
                    return None
                self._cond.wait(POLL_S)

    def _work(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            commit, opens = taken
            try:
                self._send(commit, opens)
            except StorageError as exc:  # the outbox failed: leave the attempts where they are
                log.error("[exchange] %s", exc)
                self._requeue(commit, opens, [])
                self._sleep(1.0)
            except Exception:  # a bug must not kill the sender; the attempts stay in the outbox
                log.exception("[exchange] sending failed")
                self._requeue(commit, opens, [])
                self._sleep(1.0)

    def _requeue(self, commit: str | None, opens: list[str], done: list[str]) -> None:
        with self._cond:
            if commit is not None and commit not in done:
                self._busy.discard(commit)
                if commit in self._tracked and self._tracked[commit] == SIGNED:
                    self._fresh.appendleft(commit)
                elif commit in self._tracked:
                    self._ready[commit] = 0.0
            for digest in opens:
                if digest not in done:
                    self._busy.discard(digest)
                    if digest in self._tracked:
                        self._ready[digest] = 0.0
            self._cond.notify_all()

    def _opened_set(self, digest: str) -> dict[str, Any] | None:
        opened = self.outbox.load(digest, "opened.json")
        if opened is not None:
            return opened
        commitment = self.outbox.load(digest, "commit.json")
        challenge = self.outbox.load(digest, "challenge.json")
        if commitment is None or challenge is None:
            return None
        try:
            source = self._opener(digest, commitment)
            if source is None:
                return None
            opened = {"digest": digest, "openings": source.open(challenge["leaves"])}
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("[exchange] %s: what was kept cannot open it (%s)", digest[:16], exc)
            return None
        self.outbox.put_opened(digest, opened)
        with self._cond:
            if digest in self._tracked:
                self._tracked[digest] = OPENED
        return opened

    def _opener(self, digest: str, commitment: dict[str, Any]) -> KeptTree | KeptCommitment | None:
        """What opens `digest`: its tree still on the device, else its leaf hashes in the
        outbox, else its commitment recomputed from the seed (after a crash, or a tree let go)."""
        tree = self.kept.take(digest)
        if tree is not None:
            return tree
        hashes = self.outbox.leaf_hashes(digest)
        if hashes is not None:
            return KeptCommitment(header_of(commitment), hashes)
        if self.recommit is None or digest in self._unopenable:
            log.warning("[exchange] %s: no leaf hashes kept and no backend here to recompute its commitment: "
                        "left pending for a run on its device", digest[:16])
            return None
        try:
            tree = self.recommit(commitment)
        except ValueError:  # recomputed, but not to the header's root: not again in this run
            self._unopenable.add(digest)
            raise
        if tree is None:
            self._unopenable.add(digest)
        else:
            self._recomputed += 1
        return tree

    def _send(self, commit: str | None, opens: list[str]) -> None:
        sets, sent = [], []
        for digest in opens:
            opened = self._opened_set(digest)
            if opened is None:
                log.warning("[exchange] %s cannot be opened by this run: left pending", digest[:16])
                continue
            sets.append(opened)
            sent.append(digest)
        commitment = self.outbox.load(commit, "commit.json") if commit else None
        if commitment is None and not sets:
            self._requeue(None, [], [])
            with self._cond:
                if commit:
                    self._busy.discard(commit)
                for digest in opens:
                    self._busy.discard(digest)
            return
        asked = time.perf_counter()
        if not self.bucket.take(self._interrupted_sleep):
            self._requeue(commit, opens, [])
            return
        waited = time.perf_counter() - asked
        with self._cond:
            for digest in ([commit] if commit else []) + sent:
                self._waited[digest] = self._waited.get(digest, 0.0) + waited
        answer = self.client.exchange(commitment, sets)
        if answer.transient:
            self._send_errors[ErrorClass.NETWORK.value] += 1
            self._last_error = answer.error
            log.info("[exchange] not delivered (%s)%s", answer.error,
                     f", retry after {answer.retry_after:g}s" if answer.retry_after is not None else "")
            delay = self.policy.delay(min(self._failures, 8), answer.retry_after)
            self._failures += 1
            self._requeue(commit, opens, [])
            self._sleep(delay)
            return
        self._failures = 0
        done: list[str] = []
        if commit is not None and commitment is not None:
            if self._commit_answer(commit, answer.commit):
                done.append(commit)
        for digest, item in zip(sent, answer.opened):
            if self._open_answer(digest, item):
                done.append(digest)
        self._requeue(commit, opens, done)

    def _commit_answer(self, digest: str, item: dict[str, Any] | None) -> bool:
        """True when the commitment left the send queue (challenged or final)."""
        if item is None:
            return False
        status = item.get("status")
        challenge = item.get("challenge")
        if status == 200 and isinstance(challenge, dict) and _leaves_ok(challenge.get("leaves")):
            self.outbox.put_challenge(digest, challenge)
            with self._cond:
                self._busy.discard(digest)
                if digest in self._tracked:
                    self._tracked[digest] = CHALLENGED
                    self._ready[digest] = time.perf_counter()
                self._cond.notify_all()
            return True
        return self._final_or_not(digest, item)

    def _open_answer(self, digest: str, item: dict[str, Any]) -> bool:
        if item.get("status") == 404:  # the aggregator lost it: commit again, it draws again
            self.outbox.drop_challenge(digest)
            with self._cond:
                self._busy.discard(digest)
                if digest in self._tracked:
                    self._tracked[digest] = SIGNED
                    self._fresh.append(digest)
            return True
        return self._final_or_not(digest, item)

    def _final_or_not(self, digest: str, item: dict[str, Any]) -> bool:
        status = item.get("status")
        if status == 200 and item.get("verdict") == "accepted":
            outcome = Outcome.DUPLICATE if item.get("duplicate") is True else Outcome.ACCEPTED
            self._final(digest, "accepted", outcome, item)
            return True
        if status in FINAL_ITEM:
            verdict = "expired" if status == 410 else "rejected"
            self._send_errors[ErrorClass.VALIDATION.value] += 1
            log.warning("[exchange] attempt %s %s (%s %s): recorded in %s", digest[:16], verdict, status,
                        item.get("error"), self.outbox.done_location)
            self._final(digest, verdict, Outcome.REJECTED, item)
            return True
        self._last_error = str(item.get("error") or f"item status {status}")
        return False  # 503 verifier_busy and the like: again later

    def _final(self, digest: str, verdict: str, outcome: Outcome, item: dict[str, Any]) -> None:
        self.outbox.finish(digest, verdict, item)
        self.kept.discard(digest)  # a commitment refused before its opening
        with self._cond:
            self._tracked.pop(digest, None)
            self._busy.discard(digest)
            self._ready.pop(digest, None)
            began = self._since.pop(digest, time.perf_counter())
            waited = self._waited.pop(digest, 0.0)
            finished = self._finished
            if not finished:
                self.report.counts[outcome.value] += 1
            self._cond.notify_all()
        if not finished:
            self.on_receipt(ReceiptEvent(digest=digest, outcome=outcome.value, status=item.get("status"),
                                         error=item.get("error"), latency_s=time.perf_counter() - began,
                                         rate_limit_wait_s=waited))

    def _interrupted_sleep(self, seconds: float) -> bool:
        self._sleep(seconds)
        return self._halt.is_set() or (self.stop is not None and self.stop.stopped)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._halt.is_set() and not (self.stop is not None and self.stop.stopped):
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            self._halt.wait(min(remaining, POLL_S))


def _leaves_ok(leaves: Any) -> bool:
    return isinstance(leaves, list) and 0 < len(leaves) <= 256 and all(type(x) is int and x >= 0 for x in leaves)
