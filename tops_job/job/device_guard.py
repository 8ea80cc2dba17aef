"""The worker's own check of its device: a known-answer self-test before the first timed
attempt, a background self-audit of a sample of its receipts, and NVML health around the run.

A fleet must not learn from the aggregator (exit 4, FailJob) that a kernel miscompiled or
that one GPU in a hundred corrupts results. So:

- start(): NVML health read, then the self-test (compute/selftest.py). A mismatch raises
  SelfTestFailed: exit 5 before any receipt exists.
- take(attempt, result): every `audit_every`-th receipt, and any attempt whose telemetry
  flags the device (throttled, new ECC errors, Xid events), is held: verified on the CPU on a
  background thread with the aggregator's library (spec.verify): sampled columns as the
  aggregator does for the every-Nth sample, every revealed value for a flagged attempt.
  `take` only says whether the receipt is held; the guard keeps no receipt back. The caller
  stores every receipt durably at once (a held one marked not to be sent) and asks
  `settled()` for the audits done since, (digest, ok), to release or withhold. A receipt
  that fails is never sent; the run stops (exit 5) naming the device.
- finish(): waits for the audits in flight, reads NVML health again, and returns the audits
  settled since the last `settled()`; `section()` is the summary's `device_checks`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import trace

from tops_job.compute import device_health, selftest
from tops_job.compute.base import Backend
from tops_job.compute.selftest import SelfTestResult
from tops_job.errors import DeviceError
from tops_job.spec.errors import ReceiptInvalid
from tops_job.spec.merkle import leaf_hash
from tops_job.spec.receipt import DEFAULT_MIN_OPENS
from tops_job.spec.v2 import S_MIN, KeptCommitment, check_commitment, header_of, verify_fs_receipt
from tops_job.spec.v2.openings import check_openings
from tops_job.spec.verify import verify_receipt

log = logging.getLogger("tops_job.device")
AUDIT_NICE = 10  # the audit thread's scheduling niceness (Linux)
FLAG_KEYS = ("throttled", *(f"{key}_new" for key in device_health.BAD_CHANGES))


class Signed(Protocol):
    receipt: dict[str, Any]
    digest: bytes


@dataclass(frozen=True)
class Settled:
    """One audit's end: `error` is None when the receipt verified."""
    digest: bytes
    attempt: int
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class AuditFailure:
    attempt: int
    reason: str  # why it was audited: "sample", "throttled", "ecc_uncorrected_new", ...
    error: str  # what verification said
    device: str  # model, PCI bus id, UUID

    def as_dict(self) -> dict[str, Any]:
        return {"attempt": self.attempt, "reason": self.reason, "error": self.error, "device": self.device}


class SelfAuditFailed(DeviceError):
    """A receipt of this worker failed its own verification: the device computes wrongly."""

    def __init__(self, failure: AuditFailure):
        super().__init__(f"self-audit: the receipt of attempt {failure.attempt} does not verify on the CPU "
                         f"({failure.error}); device {failure.device} is untrustworthy")
        self.failure = failure


class DeviceGuard:
    def __init__(self, backend: Backend, *, selftest: bool = True, audit_every: int = 10):
        if audit_every < 0:
            raise ValueError("audit_every must be 0 (off) or positive")
        self.backend = backend
        self.selftest_enabled = selftest
        self.audit_every = audit_every
        self.device = selftest_device(backend)
        self.health = getattr(backend, "health", None)
        self.selftest_result: SelfTestResult | None = None
        self.health_before: dict[str, int] = {}
        self.health_after: dict[str, int] = {}
        self.audited = 0
        self.audit_s = 0.0
        self.flagged = 0
        self.failure: AuditFailure | None = None
        self._record_failure = lambda error_class: None
        self._reported = False
        self._queue: queue.Queue = queue.Queue()
        self._settled: list[Settled] = []  # audits ended, not yet asked for
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def attach(self, record_failure) -> None:
        """`record_failure(error_class)`: how a failed audit is counted (RunStats)."""
        self._record_failure = record_failure

    # ---- the run's edges -------------------------------------------------------------------

    def start(self) -> None:
        if self.health is not None:
            self.health_before = self.health.read()
        if self.selftest_enabled:
            with trace.get_tracer("tops_job.device").start_as_current_span("selftest"):
                self.selftest_result = selftest.run_selftest(self.backend)
            if not self.selftest_result.ok:
                log.error("[device] self-test failed on %s (%s): %s differ: %s", self.device, self.backend.dtype,
                          self.selftest_result.stage, self.selftest_result.detail)
                raise selftest.SelfTestFailed(self.selftest_result)
            log.info("[device] self-test passed on %s (%s) in %.0f ms", self.device, self.backend.dtype,
                     self.selftest_result.seconds * 1e3)
        if self.audit_every:
            self._thread = threading.Thread(target=self._audit_loop, name="tops-self-audit", daemon=True)
            self._thread.start()

    def take(self, attempt: int, result: Signed) -> bool:
        """Whether `result` is held for audit (then queued for it). A held receipt must be
        stored durably but not sent until `settled()` says how its audit ended."""
        reason = self._reason(attempt, result.receipt)
        if reason:
            self._queue.put((attempt, reason, result))
        return reason is not None

    def settled(self) -> list[Settled]:
        """The audits ended since the last call (digest, ok), in the order they ended."""
        with self._lock:
            out, self._settled = self._settled, []
        return out

    def pending_failure(self) -> SelfAuditFailed | None:
        """The failed audit as the run's error (counted and reported once), or None."""
        if self.failure is None:
            return None
        if not self._reported:
            self._reported = True
            self._record_failure("gpu")
            f = self.failure
            log.error("[device] self-audit failed on %s: attempt %d (%s): %s", f.device, f.attempt, f.reason, f.error)
            trace.get_current_span().add_event("device.self_audit_failed", {
                "tops_job.attempt": f.attempt, "tops_job.device": f.device, "error.type": "gpu",
                "tops_job.audit.reason": f.reason, "tops_job.audit.error": f.error})
        return SelfAuditFailed(self.failure)

    def finish(self) -> list[Settled]:
        """Wait for the audits in flight; the audits settled since the last `settled()`."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self.health is not None:
            try:
                self.health_after = self.health.read()
            except Exception as exc:  # the run's receipts matter more than this reading
                log.warning("[device] cannot read NVML health at the end: %s", exc)
            delta = device_health.changes(self.health_before, self.health_after)
            if device_health.is_bad(delta):
                log.warning("[device] %s: health counters moved during the run: %s", self.device, delta)
        return self.settled()

    def section(self) -> dict[str, Any]:
        """The summary's `device_checks`."""
        out: dict[str, Any] = {"device": self.device}
        if self.selftest_result is not None:
            out["selftest"] = self.selftest_result.as_dict()
        out["self_audit"] = {"every": self.audit_every, "audited": self.audited, "flagged": self.flagged,
                             "seconds": round(self.audit_s, 4),
                             "failure": self.failure.as_dict() if self.failure else None}
        if self.health_before or self.health_after:
            out["health"] = {"before": self.health_before, "after": self.health_after,
                             "changes": device_health.changes(self.health_before, self.health_after)}
        fallback = getattr(self.backend, "fallback", None)
        if fallback:
            out["fallback"] = fallback
        return out

    # ---- the audit -------------------------------------------------------------------------

    def _reason(self, attempt: int, receipt: dict[str, Any]) -> str | None:
        if not self.audit_every:
            return None
        telemetry = receipt.get("telemetry") or {}
        for key in FLAG_KEYS:
            if telemetry.get(key):
                self.flagged += 1
                return key
        return "sample" if attempt % self.audit_every == 0 else None

    def _audit_loop(self) -> None:
        try:  # Linux: a thread is a task with its own nice value; yield the cores to the attempts
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), AUDIT_NICE)
        except (AttributeError, OSError):
            pass
        while True:
            item = self._queue.get()
            if item is None:
                return
            attempt, reason, result = item
            began = time.perf_counter()
            try:
                if result.receipt.get("schema") == "tops-receipt/2":
                    audit_v2(result, leaves=16 if reason == "sample" else 64)
                else:
                    opens = int(result.receipt.get("opens", DEFAULT_MIN_OPENS))
                    # A sampled receipt is checked as the aggregator checks it (random columns); one
                    # NVML flagged is suspect, so every revealed value is recomputed.
                    verify_receipt(result.receipt, min_opens=min(opens, DEFAULT_MIN_OPENS), full=reason != "sample")
                error = None
            except Exception as exc:  # ReceiptInvalid, or anything the receipt makes the verifier do
                error = str(exc) if hasattr(exc, "code") else f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.audit_s += time.perf_counter() - began
                self.audited += 1
                self._settled.append(Settled(result.digest, attempt, error))
                if error is not None and self.failure is None:
                    self.failure = AuditFailure(attempt, reason, error, self.device)


def audit_v2(result: Signed, *, leaves: int) -> None:
    """A tops-receipt/2 attempt checked on the CPU: a fiat-shamir receipt as any verifier does;
    a challenge-mode commitment by recomputing `leaves` random tiles from the seed and comparing
    their hashes with the leaf hashes the device produced (and the header's root with theirs);
    where the tree stayed on the device, by opening `leaves` random leaves from it and checking
    them as the verifier does (the recomputed tiles' hashes, up their device paths, give the root).
    Raises ReceiptInvalid (or ValueError for a tree that does not give the root)."""
    receipt = result.receipt
    if "openings" in receipt:
        verify_fs_receipt(receipt, cost_cap=1 << 62)
        return
    check_commitment(receipt, s=S_MIN, cost_cap=1 << 62)
    kept = getattr(result, "kept", None)
    if kept is not None:  # the tree is on the device: open random leaves and check them as the verifier does
        chosen = _random_leaves(leaves, kept.leaf_count)
        check_openings(header_of(receipt), chosen, kept.open(chosen))
        return
    blob = getattr(result, "leaf_hashes", None) or b""
    hashes = [blob[i: i + 32] for i in range(0, len(blob), 32)]
    reopened = KeptCommitment(header_of(receipt), hashes)
    chosen = _random_leaves(leaves, len(hashes))
    reopened.prepare(chosen)
    for leaf in chosen:
        if leaf_hash(reopened.leaf_data(leaf)) != hashes[leaf]:
            raise ReceiptInvalid("wrong_product", f"leaf {leaf}: the device's tile is not A·B")


def _random_leaves(count: int, total: int) -> list[int]:
    """`count` leaves of `total`, drawn independently (repeats allowed) from the OS's randomness."""
    return [int.from_bytes(os.urandom(8), "little") % total for _ in range(count)]


def selftest_device(backend: Backend) -> str:
    return selftest.device_label(backend)
