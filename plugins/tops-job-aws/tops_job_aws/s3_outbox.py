"""The outbox in S3: receipts that outlive the instance that signed them (hook `tops_job_outbox`).

Layout under s3://bucket/prefix/ (the directory outbox's, `tops_job/delivery/outbox.py`,
with S3's means of keeping its promises):

    receipts/<digest>.json            a receipt waiting to be delivered (one JSON line), written
                                      once with a create-only put (If-None-Match: *)
    held/<digest>.<lease token>.json  a receipt the worker's self-audit holds (run <token>): not
                                      sent; moved up when it verifies, or, left by a run whose
                                      lease expired, by the next run's `recover` (which logs
                                      that it was never audited)
    withheld/<digest>.json            a receipt that failed the self-audit: never sent ...
    withheld/<digest>.reason.json     ... and why
    rejected/<digest>.json            a receipt the aggregator rejected (final 4xx) ...
    rejected/<digest>.answer.json     ... and its answer
    answers/<digest>.json             the last answer that left a waiting receipt waiting
    quarantine/<name>                 an object under receipts/ that is not a receipt entry
    leases/<token>.json               a live run's lease (see s3_leases.RunLease)
    claims/<digest>                   the run sending that receipt now; claims/.drain: the run
                                      that drains earlier runs' entries

A put is durable when S3 answers it. An entry leaves only after a confirmed 200 (`remove`)
or a final answer (`reject`). Whoever sends an entry first `claim`s it (s3_leases.Claims):
no two live runs ever send it at once, and a dead run's claims lapse with its lease.
S3 has no rename: a move is a copy inside the store, then a delete of the source, so a run
that dies between the two leaves the entry in both places; the copy is the same receipt
(its name is its digest), and the aggregator answers a second send of it duplicate.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import Counter
from typing import Any

from tops_job import StorageError, digest_of_any, parse_entry, receipt_line

from .s3_leases import Claims, RunLease, S3Objects

log = logging.getLogger("tops_job_aws.outbox")

MAX_ENTRY = 16 * 1024 * 1024  # bytes; a longer object is no receipt any aggregator takes
_DIGEST = r"[0-9a-f]{64}"
_ENTRY = re.compile(rf"({_DIGEST})\.json")
_HELD = re.compile(rf"({_DIGEST})\.([A-Za-z0-9_-]+)\.json")
DRAIN = ".drain"  # the claim of the run that drains earlier runs' entries


def _json(value: Any) -> bytes:
    return (json.dumps(value, sort_keys=True, indent=2) + "\n").encode("utf-8")


class S3Claim:
    """This run's claim on one entry while it sends it (`claims/<digest>`)."""

    def __init__(self, store: S3ReceiptStore, digest: str):
        self.digest = digest
        self._store = store
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._store._let_go(self.digest)


class S3ReceiptStore:
    """tops_job.ReceiptStore in S3, with the directory Outbox's semantics (see the module
    docstring for the layout). Writes that must be durable raise StorageError naming the
    s3:// URL; what the directory version logs and works around is logged (`problem`) and
    worked around here too."""

    def __init__(self, objects: S3Objects, lease: RunLease, claims: Claims):
        self.objects = objects
        self.lease = lease
        self.claims = claims
        self.location = objects.url().rstrip("/")
        self.rejected_location = objects.url("rejected")
        self.withheld_location = objects.url("withheld")
        self.quarantined = 0
        self.problems: Counter = Counter()
        self._mutex = threading.Lock()
        self._sending: set[str] = set()  # claimed by this process's senders

    def problem(self, what: str, detail: str) -> None:
        with self._mutex:
            self.problems[what] += 1
        log.warning("[outbox] %s: %s", what, detail)

    # ---- ownership

    def acquire(self) -> bool:
        """Take `claims/.drain` (False while another live run holds it)."""
        return self.claims.take(DRAIN)

    def release(self) -> None:
        """Give up every claim this run holds and end its lease."""
        self.claims.give_up_all()
        self.lease.stop()

    def claim(self, digest: str) -> S3Claim | str:
        if not _ENTRY.fullmatch(f"{digest}.json"):
            return "gone"
        if not self.lease.fresh():
            log.warning("[outbox] not sending %s: this run's lease in %s could not be renewed lately, so another run "
                        "may already own the entry", digest, self.location)
            return "busy"
        with self._mutex:
            if digest in self._sending:
                return "busy"
            self._sending.add(digest)
        try:
            if not self.claims.take(digest):
                self._forget_sending(digest)
                return "busy"
            if not self.objects.exists(self._entry(digest)):  # delivered or moved by the claim's last owner
                self._let_go(digest)
                return "gone"
        except StorageError as exc:
            self._let_go(digest)
            self.problem("unreadable_entry", f"cannot claim {digest} ({exc}); it stays")
            return "unreadable"
        return S3Claim(self, digest)

    def _forget_sending(self, digest: str) -> None:
        with self._mutex:
            self._sending.discard(digest)

    def _let_go(self, digest: str) -> None:
        self.claims.give_up(digest)
        self._forget_sending(digest)

    def recover(self) -> list[str]:
        """Promote what dead runs held for their self-audit, quarantine objects under
        receipts/ that are not entries, and return the digests waiting, oldest first."""
        self._recover_held()
        digests = []
        for item in self.objects.list("receipts/"):
            name = item.key[len("receipts/"):]
            match = _ENTRY.fullmatch(name)
            if match:
                digests.append(match.group(1))
            elif item.key.endswith("/") and item.size == 0:
                continue  # a "folder" marker (the S3 console makes them): not an entry, harmless
            else:
                self.quarantine(item.key, "not an outbox entry name")
        self.lease.sweep()
        return digests

    def _recover_held(self) -> None:
        try:
            listed = self.objects.list("held/")
        except StorageError as exc:
            self.problem("unreadable_held", f"{exc}; its receipts wait")
            return
        for item in listed:
            match = _HELD.fullmatch(item.key[len("held/"):])
            if match is None:
                continue
            digest, token = match.groups()
            if token == self.lease.token or self.lease.alive(token):
                continue
            stored = self.objects.read(item.key, MAX_ENTRY)
            if stored is None:
                continue  # its run moved it meanwhile
            receipt = parse_entry(stored.body)
            if receipt is None or digest_of_any(receipt).hex() != digest:
                self.quarantine(item.key, "held object that is not the receipt its name says")
                continue
            self._create_verified(self._entry(digest), stored.body, digest)
            self.objects.delete(item.key, stored.etag)
            log.warning("[outbox] receipt %s was held for a self-audit that never ended (run %s stopped); it was "
                        "never audited and is sent now", digest, token)

    # ---- receipts held for the self-audit

    def _held(self, digest: str) -> str:
        return f"held/{digest}.{self.lease.token}.json"

    def put_held(self, receipt: dict[str, Any], digest: bytes) -> str:
        name = self._held(digest.hex())
        self._create_verified(name, (receipt_line(receipt) + "\n").encode("ascii"), digest.hex())
        return self.objects.url(name)

    def unhold(self, digest: str) -> None:
        held = self.objects.read(self._held(digest), MAX_ENTRY)
        if held is None:
            self._held_taken_over(digest)
            return
        self._create_verified(self._entry(digest), held.body, digest)
        self.objects.delete(self._held(digest), held.etag)

    def withhold(self, digest: str, reason: str) -> None:
        held = self.objects.read(self._held(digest), MAX_ENTRY)
        if held is None:
            self._held_taken_over(digest)
            return
        self.objects.write(f"withheld/{digest}.reason.json", _json({"digest": digest, "reason": reason}))
        self.objects.write(f"withheld/{digest}.json", held.body)
        self.objects.delete(self._held(digest), held.etag)
        log.warning("[outbox] receipt %s withheld (%s): kept in %s, never sent", digest, reason, self.withheld_location)

    def _held_taken_over(self, digest: str) -> None:
        """Our held receipt is gone: only another run's `recover` moves it, after this run's
        lease lapsed (the store unreachable for a lease's life). It went out as an ordinary entry."""
        self.problem("held_receipt_taken_over", f"{self.objects.url(self._held(digest))} was promoted by another "
                     "run while this run's lease had lapsed; that run sends it unaudited")

    # ---- entries

    @staticmethod
    def _entry(digest: str) -> str:
        return f"receipts/{digest}.json"

    def put(self, receipt: dict[str, Any], digest: bytes) -> str:
        """Store `receipt` under receipts/<digest>.json with a create-only put: never
        overwrites. An object already there is kept when it is this receipt (the digest binds
        the content), and set aside (re-filed or quarantined) when it is not."""
        name = self._entry(digest.hex())
        self._create_verified(name, (receipt_line(receipt) + "\n").encode("ascii"), digest.hex())
        return self.objects.url(name)

    def _create_verified(self, name: str, data: bytes, digest: str) -> None:
        for _ in range(3):
            if self.objects.create(name, data) is not None:
                return
            there = self.objects.read(name, MAX_ENTRY)
            if there is None:
                continue  # removed between our create and our read (delivered by another run)
            found = parse_entry(there.body)
            if found is not None and digest_of_any(found).hex() == digest:
                return  # the same receipt, stored before
            self._set_aside(name, found, there.etag)
        raise StorageError(f"cannot write {self.objects.url(name)}: the name stays taken by other content")

    def load(self, digest: str) -> dict[str, Any] | None:
        name = self._entry(digest)
        try:
            stored = self.objects.read(name, MAX_ENTRY)
        except StorageError as exc:
            log.warning("[outbox] cannot read %s now (%s); it stays in the outbox", digest, exc)
            return None
        if stored is None:
            return None
        receipt = parse_entry(stored.body)
        if receipt is None:
            self.quarantine(name, "unreadable or not a receipt", stored.etag)
            return None
        if digest_of_any(receipt).hex() != digest:
            self._set_aside(name, receipt, stored.etag)
            return None
        return receipt

    def _set_aside(self, name: str, receipt: dict[str, Any] | None, etag: str) -> None:
        """An object whose content does not hash to its name: a whole receipt is re-filed
        under its own digest (never dropped); anything else is quarantined."""
        if receipt is None:
            return self.quarantine(name, "content does not hash to its name", etag)
        right = digest_of_any(receipt).hex()
        try:
            created = self.objects.create(self._entry(right), (receipt_line(receipt) + "\n").encode("ascii"))
            if created is not None:
                self.objects.delete(name, etag)
        except StorageError as exc:
            self.problem("unrefilable_entry", f"cannot re-file {self.objects.url(name)} under its digest ({exc})")
            return
        if created is None:  # something is filed under that digest already: keep this copy aside
            return self.quarantine(name, f"a copy of receipt {right}, which is already filed", etag)
        log.warning("[outbox] %s held receipt %s; re-filed under its own digest", self.objects.url(name), right)

    def holds(self, digest: str) -> bool:
        """Whether the entry is waiting (an unreadable store counts as yes: nothing is
        declared gone because a read failed)."""
        try:
            return self.objects.exists(self._entry(digest))
        except StorageError as exc:
            self.problem("unreadable_entry", str(exc))
            return True

    def count(self) -> int:
        try:
            return sum(1 for item in self.objects.list("receipts/") if _ENTRY.fullmatch(item.key[len("receipts/"):]))
        except StorageError as exc:
            self.problem("unreadable_outbox", str(exc))
            return 0

    def note_answer(self, digest: str, answer: dict[str, Any]) -> None:
        try:
            self.objects.write(f"answers/{digest}.json", _json(answer))
        except StorageError as exc:
            self.problem("unrecordable_answer", f"cannot keep the answer for {digest} ({exc})")

    def _forget_answer(self, digest: str) -> None:
        try:
            self.objects.delete(f"answers/{digest}.json")
        except StorageError:
            pass

    def remove(self, digest: str) -> bool:
        self._forget_answer(digest)
        try:
            self.objects.delete(self._entry(digest))
        except StorageError as exc:
            self.problem("unremovable_entry", f"{digest} was delivered but cannot be removed ({exc}); the next "
                         "run's send of it is answered duplicate")
            return False
        return True

    def reject(self, digest: str, answer: dict[str, Any]) -> bool:
        """The answer goes to rejected/<digest>.answer.json, then the receipt beside it."""
        self._forget_answer(digest)
        try:
            if not self.objects.exists(self._entry(digest)):
                return True  # moved already: the answer kept with it stays
            self.objects.write(f"rejected/{digest}.answer.json", _json(answer))
            self.objects.move(self._entry(digest), f"rejected/{digest}.json")
        except StorageError as exc:
            self.problem("unmovable_rejection", f"cannot move rejected {digest} to {self.rejected_location} ({exc}); "
                         "it stays in the outbox")
            return False
        return True

    def quarantine(self, name: str, why: str, etag: str | None = None) -> None:
        """Move object `name` (relative to the prefix) to quarantine/, with a warning."""
        target = "quarantine/" + name.split("/", 1)[-1]
        try:
            self.objects.move(name, target, etag)
        except StorageError as exc:
            self.problem("unquarantinable", f"{self.objects.url(name)} ({why}) cannot be moved to quarantine/ ({exc}); "
                         "it is left in place and skipped")
            return
        with self._mutex:
            self.quarantined += 1
        log.warning("[outbox] quarantined %s: %s; it is kept in %s for inspection", self.objects.url(name), why,
                    self.objects.url(target))


class S3Outbox:
    """tops_job.OutboxBackend in s3://bucket/prefix. Each store it hands out has its own
    lease and claims, so releasing one (a run's receipts) never ends another's (its v2
    exchanges)."""

    def __init__(self, bucket: str, prefix: str, s3: Any, lease_s: float):
        self.objects = S3Objects(s3, bucket, prefix)
        self.lease_s = lease_s
        self.location = self.objects.url().rstrip("/")

    def _ownership(self) -> tuple[RunLease, Claims]:
        lease = RunLease(self.objects, self.lease_s)
        lease.start()
        return lease, Claims(self.objects, lease)

    def receipts(self) -> S3ReceiptStore:
        return S3ReceiptStore(self.objects, *self._ownership())

    def exchanges(self) -> Any:
        from .s3_exchange import S3ExchangeStore

        return S3ExchangeStore(self.objects, *self._ownership())

    def waiting(self) -> int:
        """Entries under receipts/ (one list; nothing written, no lease)."""
        return sum(1 for item in self.objects.list("receipts/") if _ENTRY.fullmatch(item.key[len("receipts/"):]))

    def inventory(self) -> dict[str, Any]:
        """What `tops-job outbox` lists (delivery/drain.list_outbox's shape). Reads only."""
        pending = []
        for item in self.objects.list("receipts/"):
            match = _ENTRY.fullmatch(item.key[len("receipts/"):])
            if match is None:
                continue
            digest = match.group(1)
            fields, age = self._fields(item.key)
            pending.append({"digest": digest, **fields, "age_s": round(age, 1),
                            "last_answer": self._answer(f"answers/{digest}.json")})
        rejected = []
        for item in sorted(self.objects.list("rejected/"), key=lambda item: item.key):
            match = _ENTRY.fullmatch(item.key[len("rejected/"):])
            if match:
                rejected.append({"digest": match.group(1), **self._fields(item.key)[0],
                                 "answer": self._answer(f"rejected/{match.group(1)}.answer.json")})
        withheld = []
        for item in sorted(self.objects.list("withheld/"), key=lambda item: item.key):
            match = _ENTRY.fullmatch(item.key[len("withheld/"):])
            if match:
                reason = self._answer(f"withheld/{match.group(1)}.reason.json") or {}
                withheld.append({"digest": match.group(1), **self._fields(item.key)[0], "reason": reason.get("reason")})
        return {"outbox": self.location, "pending": pending, "rejected": rejected,
                "quarantined": sorted(item.key[len("quarantine/"):] for item in self.objects.list("quarantine/")),
                "held_for_self_audit": sum(1 for item in self.objects.list("held/")
                                           if _HELD.fullmatch(item.key[len("held/"):])),
                "withheld": withheld}

    def _fields(self, name: str) -> tuple[dict[str, Any], float]:
        stored = self.objects.read(name, MAX_ENTRY)
        if stored is None:
            return {"unreadable": True}, 0.0
        try:
            receipt = json.loads(stored.body)
            return {"run_id": receipt.get("run_id"), "attempt": receipt.get("attempt"), "did": receipt.get("did")}, \
                stored.age_s
        except (ValueError, AttributeError):
            return {"unreadable": True}, stored.age_s

    def _answer(self, name: str) -> dict[str, Any] | None:
        stored = self.objects.read(name, MAX_ENTRY)
        if stored is None:
            return None
        try:
            value = json.loads(stored.body)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None
