"""The aggregator's tops-receipt/2 endpoints (spec §10): run challenges, the exchange that
records a commitment before drawing its leaves and judges opened sets, and run reports.

Every verdict is a function of the stored record: a commitment posted again gets the same
challenge, an opened set posted again gets the recorded verdict. A resource failure while
verifying answers 503 `verifier_busy` and records nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from tops_job.aggregator.answers import Response, busy
from tops_job.aggregator.answers import error as _error
from tops_job.aggregator.events import Events
from tops_job.aggregator.guard import VerifyGate, boot_id
from tops_job.aggregator.v2_store import (
    ACCEPTED,
    COMMITTED,
    EXPIRED,
    REJECTED,
    Conflict,
    V2Store,
    Write,
    commitment_outcome,
)
from tops_job.spec.errors import ReceiptInvalid
from tops_job.spec.v2 import (
    COST_CAP,
    S_DEFAULT,
    Committed,
    VerifierBusy,
    challenge_leaves,
    check_commitment,
    check_opened,
    cost_of,
    parse_json,
    recorded_commitment,
)
from tops_job.spec.v2.encoding import HEX32, PUBKEY

log = logging.getLogger("tops_job.aggregator")

OPEN_TTL_MS = 600_000  # a drawn challenge stays answerable this long (spec §0)
RUN_TTL_MS = 6 * 3600 * 1000  # a run challenge (spec §0)
RETENTION_MS = 7 * 24 * 3600 * 1000
OPEN_ITEMS_MAX = 4
ISSUED_REMEMBERED = 4096  # run challenges a process keeps read (each a few hundred bytes)
CHECKED_REMEMBERED = 2048  # commitments a process keeps checked (each a header and its leaves, about 4 KB)
_DID = re.compile(r"[\x21-\x7e]{1,128}")
_RUN = re.compile(r"[A-Za-z0-9._-]{1,64}")


class Pending:
    """An item's answer that waits on the exchange's writes: `finish(outcome)` makes it once
    they are committed (V2Store.write_together), from its own write's outcome if it has one."""

    __slots__ = ("write", "finish", "outcome")

    def __init__(self, write: Write | None, finish: Callable[[Any], dict[str, Any]]):
        self.write, self.finish, self.outcome = write, finish, None


Answer = dict[str, Any] | Pending  # an item's answer now, or once its write is recorded


def _item(status: int, code: str, detail: str, digest: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"status": status, "error": code, "detail": detail}
    if digest:
        item["digest"] = digest
    return item


def steady_clock() -> tuple[str, int]:
    """(epoch, ms) on a clock that never steps (spec §12.4): CLOCK_BOOTTIME where there is one,
    its epoch the kernel's boot id; else the monotonic clock of this process."""
    epoch = _steady_epoch()
    if epoch.startswith("boot:"):
        return epoch, int(time.clock_gettime(time.CLOCK_BOOTTIME) * 1000)
    return epoch, int(time.monotonic() * 1000)


@functools.cache
def _steady_epoch() -> str:
    """Once per process: reading the boot id for each accepted attempt took a tenth of a
    millisecond of it."""
    boot = boot_id()
    if boot is not None:
        try:
            time.clock_gettime(time.CLOCK_BOOTTIME)  # AttributeError or OSError where there is none
            return "boot:" + boot
        except (OSError, AttributeError):
            pass
    return "process:" + secrets.token_hex(8)


def _opened_digests(items: list[Any]) -> set[str]:
    return {item["digest"] for item in items
            if isinstance(item, dict) and isinstance(item.get("digest"), str) and HEX32.fullmatch(item["digest"])}


class Kept:
    """A commitment this process checked, and while it waits for its opening here, its record
    as this process wrote it: that opening reads nothing first (V2Endpoints._open_record)."""

    __slots__ = ("committed", "record")

    def __init__(self, committed: Committed, record: dict[str, Any] | None = None):
        self.committed, self.record = committed, record


class V2Endpoints:
    def __init__(self, store: V2Store, *, s: int = S_DEFAULT, cost_cap: int = COST_CAP,
                 allow: set[str] | None = None, clock: Callable[[], float] = time.time,
                 steady: Callable[[], tuple[str, int]] = steady_clock, open_ttl_ms: int = OPEN_TTL_MS,
                 run_ttl_ms: int = RUN_TTL_MS, gate: VerifyGate | None = None, verifier_key: bytes | None = None,
                 events: Events | None = None):
        self.store = store
        self.s = s
        self.cost_cap = cost_cap
        self.allow = allow
        self.clock = clock
        self.steady = steady
        self.open_ttl_ms = open_ttl_ms
        self.run_ttl_ms = run_ttl_ms
        self.verifier_key = verifier_key or secrets.token_bytes(32)  # K_v: drawn leaves are recorded, so it may change
        self.gate = gate or VerifyGate(2)  # bounds the exchanges verifying at once; the app shares its own
        self.events = events or Events()
        self._issued: dict[str, dict[str, Any]] = {}  # run challenges read, by challenge (_run_challenge)
        # Commitments this process checked lately, by digest: their opening needs no rebuild
        # from the record, and a digest not here is most likely new (_commit).
        self._checked: OrderedDict[str, Kept] = OrderedDict()

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # ---- GET /v2/challenge

    def challenge(self, query: dict[str, str]) -> Response:
        did, pubkey = query.get("did", ""), query.get("pubkey", "")
        if not _DID.fullmatch(did):
            return _error(400, "bad_did", "give ?did= (1..128 printable ASCII characters, no spaces)")
        if not PUBKEY.fullmatch(pubkey):
            return _error(400, "bad_hex", "give ?pubkey= (compressed secp256k1 key, 66 lowercase hex)")
        if self.allow is not None and pubkey not in self.allow:
            return _error(403, "pubkey_not_allowed", "this pubkey may not submit here")
        now = self._now_ms()
        self.store.purge(now, RETENTION_MS)
        epoch, steady_ms = self.steady()
        return 200, self.store.issue_run_challenge(challenge=secrets.token_hex(32), did=did, pubkey=pubkey, now_ms=now,
                                                   ttl_ms=self.run_ttl_ms, clock_epoch=epoch, clock_ms=steady_ms), {}

    # ---- POST /v2/exchange

    def exchange(self, data: bytes) -> Response:
        try:
            envelope = parse_json(data)
        except ReceiptInvalid as exc:
            return _error(400, exc.code, exc.detail)
        if (not isinstance(envelope, dict) or not envelope or set(envelope) - {"commit", "open"}
                or not isinstance(envelope.get("open", []), list) or len(envelope.get("open", [])) > OPEN_ITEMS_MAX):
            return _error(400, "bad_envelope", f'the body is {{"commit"?: commitment, "open"?: [at most '
                                               f'{OPEN_ITEMS_MAX} opened sets]}}, not empty')
        items = envelope.get("open", [])
        records = {digest: self._open_record(digest) for digest in _opened_digests(items)}
        token = self.gate.acquire(sum(self._opening_cost(digest, record) for digest, record in records.items()))
        if token is None:
            return busy()
        try:
            # Records read before a wait for a slot may have been decided since: read again then.
            return self._exchange(envelope, items, records if token == "inline" else None)
        finally:
            self.gate.release(token)

    def _exchange(self, envelope: dict[str, Any], items: list[Any], records: dict[str, Any] | None) -> Response:
        # Every item is checked first (an opened set verified); what they record, a verdict per
        # opened set and the new commitment, is then written in one transaction: one commit and
        # one wait for it per exchange, where a worker's usual exchange made two in turn.
        seen: set[str] = set()
        opens: list[Answer | None] = []
        for item in items:
            digest = item.get("digest") if isinstance(item, dict) else None
            if isinstance(digest, str) and digest in seen:
                opens.append(None)  # the same set twice: answered from the first one's record, never verified twice
                continue
            if isinstance(digest, str):
                seen.add(digest)
            opens.append(self._open(item, records))
        commit = self._commit(envelope["commit"]) if "commit" in envelope else None
        self._record([answer for answer in (*opens, commit) if isinstance(answer, Pending)])
        answer: dict[str, Any] = {"ok": True}
        if "open" in envelope:
            answer["open"] = [self._settled(self._open(item)) if first is None else self._finished(first)
                              for item, first in zip(items, opens)]
        if commit is not None:
            answer["commit"] = self._finished(commit)
        return 200, answer, {}

    def _record(self, pending: list[Pending]) -> None:
        writing = [(item, item.write) for item in pending if item.write is not None]
        if writing:
            for (item, _), outcome in zip(writing, self.store.write_together([write for _, write in writing])):
                item.outcome = outcome

    def _answer_as_recorded(self, digest: str, before: dict[str, Any], *, challenge: bool) -> dict[str, Any]:
        """The answer from the digest's record as it is now (`before` if it has since gone; an
        opened set whose record has gone, deleted by hand, is unknown)."""
        record = self.store.commitment(digest)
        if record is None and not challenge and before["state"] == COMMITTED:
            return _item(404, "unknown_commitment", "no commitment with this digest here: send it again", digest)
        return self._state_answer(digest, record or before, challenge=challenge)

    def _settled(self, answer: Answer) -> dict[str, Any]:
        """An answer whose write, if any, is recorded now on its own."""
        if isinstance(answer, Pending):
            self._record([answer])
        return self._finished(answer)

    @staticmethod
    def _finished(answer: Answer) -> dict[str, Any]:
        return answer.finish(answer.outcome) if isinstance(answer, Pending) else answer

    def _commit(self, obj: Any) -> Answer:
        try:
            with self.events.verifying("v2"):
                committed = check_commitment(obj, s=self.s, cost_cap=self.cost_cap)
        except ReceiptInvalid as exc:
            return _item(422, exc.code, exc.detail)
        h, digest = committed.header, committed.digest.hex()
        if self.allow is not None and h["pubkey"] not in self.allow:
            return _item(403, "pubkey_not_allowed", "this pubkey may not submit here", digest)
        issued = self._run_challenge(h["challenge"])
        refusal = None
        if issued is None or issued["did"] != h["did"] or issued["pubkey"] != h["pubkey"]:
            refusal = _item(422, "unknown_challenge", "this aggregator did not issue that run challenge to this "
                                                      "(did, pubkey)", digest)
        elif issued["expires_ms"] <= self._now_ms():
            refusal = _item(410, "challenge_expired", f"the run challenge expired at {issued['expires_ms']}", digest)
        # A commitment sent again is answered from its record, whatever its run challenge has
        # become. One this process has not checked lately is most likely new: it goes straight
        # to the insert, whose conflict finds a record there (recorded here before, or by a
        # replica) as it must anyway when two replicas race. A resend seen here costs a read.
        if refusal is not None or digest in self._checked:
            record = self.store.commitment(digest)
            if record is not None:
                if record["state"] != COMMITTED:
                    return self._state_answer(digest, record, challenge=True)
                # An opened set in this exchange may decide it: answered after the exchange's writes.
                return Pending(None, lambda _: self._answer_as_recorded(digest, record, challenge=True))
            if refusal is not None:
                return refusal
        kept = self._checked[digest] = Kept(committed)
        self._checked.move_to_end(digest)
        if len(self._checked) > CHECKED_REMEMBERED:
            self._checked.popitem(last=False)
        return self._new_commitment(obj, kept)

    def _new_commitment(self, obj: dict[str, Any], kept: Kept) -> Pending:
        """The write that records a commitment with its drawn leaves, answered once committed."""
        committed = kept.committed
        h, digest = committed.header, committed.digest.hex()
        now = self._now_ms()
        leaves = challenge_leaves(self.verifier_key, committed.digest, self.s, committed.leaf_count)
        write = self.store.commitment_write(
            digest=digest, pubkey=h["pubkey"], did=h["did"], nonce=h["nonce"], run_id=h["run_id"],
            attempt=h["attempt"], ops=committed.ops, challenge=h["challenge"], s=self.s, leaves=leaves,
            now_ms=now, ttl_ms=self.open_ttl_ms, commitment=json.dumps(obj, sort_keys=True, separators=(",", ":")))

        def finish(outcome: dict[str, Any] | Conflict) -> dict[str, Any]:
            try:
                record = commitment_outcome(outcome)
            except Conflict as exc:
                return _item(409, exc.code, exc.detail, digest)
            # Committed: the run is this key's for good (v2_runs rows are never deleted).
            self.store.run_owned(h["run_id"], h["pubkey"])
            if record["state"] == COMMITTED and record["s"] == committed.s:
                # The opening that follows reads nothing first. Should a replica or another
                # process decide the record meanwhile, the verdict's write finds it decided (it
                # moves only a committed record) and that opening is answered from the record.
                kept.record = {**record, "commitment": None}  # the checked commitment stands in for its text
            return self._state_answer(digest, record, challenge=True)
        return Pending(write, finish)

    def _run_challenge(self, challenge: str) -> dict[str, Any] | None:
        """The run challenge's row, read once per process while it is unexpired: a worker's
        every commitment names its run's challenge. A row never changes once issued, and the
        purge deletes it only a retention after it expires, so an unexpired row remembered
        here is the row stored; an expired one is read again (for its 410, or, purged, 422)."""
        issued = self._issued.get(challenge)
        if issued is None or issued["expires_ms"] <= self._now_ms():
            issued = self.store.run_challenge(challenge)
            if issued is not None:
                if len(self._issued) >= ISSUED_REMEMBERED:
                    self._issued.clear()  # the runs under way are read again, once each
                self._issued[challenge] = issued
        return issued

    def _state_answer(self, digest: str, record: dict[str, Any], *, challenge: bool) -> dict[str, Any]:
        state = record["state"]
        if state == COMMITTED and record["expires_ms"] <= self._now_ms():
            state = self.store.set_verdict(digest, EXPIRED, now_ms=self._now_ms(), error="challenge_expired",
                                           detail="no accepted opening before the challenge expired")
        if state == ACCEPTED:
            return {"status": 200, "digest": digest, "verdict": "accepted", "duplicate": True, "ops": record["ops"],
                    "soundness": f"(1-f)^{record['s']}"}
        if state == REJECTED:
            return _item(422, record["error"], record["detail"] or "rejected before", digest)
        if state == EXPIRED:
            return _item(410, "challenge_expired", "the challenge expired before an accepted opening", digest)
        if not challenge:
            raise AssertionError("a committed record answers only a commitment")
        return {"status": 200, "digest": digest,
                "challenge": {"leaves": record["leaves"], "s": record["s"], "expires_ms": record["expires_ms"]}}

    def _open_record(self, digest: str) -> dict[str, Any] | None:
        """The record an opened set is judged against: the one this process wrote, while the
        commitment waits for its opening here; else the store's."""
        kept = self._checked.get(digest)
        if kept is not None and kept.record is not None:
            return kept.record
        return self.store.commitment(digest)

    def _opening_cost(self, digest: str, record: dict[str, Any] | None) -> int:
        """What verifying an opened set of this recorded commitment costs (s·(tile+1)·k, §8
        step 7); 0 when it will not be verified (unknown, or its verdict is already recorded)."""
        if record is None or record["state"] != COMMITTED:
            return 0
        kept = self._checked.get(digest)
        header = kept.committed.header if kept is not None else json.loads(record["commitment"])
        return cost_of(header, record["s"])

    def _open(self, opened: Any, read: dict[str, Any] | None = None) -> Answer:
        """An opened set's answer; `read`: records this exchange read already, by digest."""
        digest = opened.get("digest") if isinstance(opened, dict) else None
        if not isinstance(digest, str) or not HEX32.fullmatch(digest):
            return _item(422, "bad_opening", "an opened set is {digest: 64 hex, openings: [...]}")
        record = read[digest] if read is not None and digest in read else self._open_record(digest)
        kept = self._checked.get(digest)
        if kept is not None:
            # One opening at most is judged against the kept record: whatever it records, the
            # next one (a resend) reads the store's, and a duplicate is answered before any work.
            kept.record = None
        if record is None:
            return _item(404, "unknown_commitment", "no commitment with this digest here: send it again", digest)
        if record["state"] != COMMITTED or record["expires_ms"] <= self._now_ms():
            return self._state_answer(digest, record, challenge=False)
        if kept is not None and kept.committed.s == record["s"]:  # s: a replica's record may have another
            committed = kept.committed
        else:
            committed = recorded_commitment(json.loads(record["commitment"]), s=record["s"])
        try:
            with self.events.verifying("v2"):
                verified = check_opened(committed, record["leaves"], opened)
        except ReceiptInvalid as exc:  # final, remembered: the same digest gets this answer again
            return Pending(self.store.verdict_write(digest, REJECTED, now_ms=self._now_ms(), error=exc.code,
                                                    detail=exc.detail),
                           lambda outcome: self._answer_as_recorded(digest, record, challenge=False))
        except (VerifierBusy, MemoryError) as exc:
            return _item(503, "verifier_busy", f"verification ran out of resources ({exc}); retry", digest)
        except Exception:  # a bug is never a verdict on the worker
            log.exception("verifier failed on opened set %s", digest)
            return _item(503, "verifier_busy", "the verifier failed; retry", digest)
        epoch, steady_ms = self.steady()

        def finish(outcome: tuple[str, bool]) -> dict[str, Any]:
            if not outcome[1]:  # another request (a replica's, another process's) recorded a verdict first
                return self._answer_as_recorded(digest, record, challenge=False)
            return {"status": 200, "digest": digest, "verdict": "accepted", "duplicate": False, "ops": verified.ops,
                    "soundness": verified.soundness}
        return Pending(self.store.verdict_write(digest, ACCEPTED, now_ms=self._now_ms(), clock_epoch=epoch,
                                                clock_ms=steady_ms), finish)

    # ---- GET /v2/runs/<run_id>, /v2/keys/<pubkey>

    def run(self, run_id: str) -> Response:
        if not _RUN.fullmatch(run_id):
            return _error(400, "bad_run_id", "run ids are 1..64 of [A-Za-z0-9._-]")
        report = self.store.run_report(run_id, self._now_ms())
        return (200, report, {}) if report else _error(404, "unknown_run", "no commitments for this run")

    def key(self, pubkey: str) -> Response:
        if not PUBKEY.fullmatch(pubkey):
            return _error(400, "bad_hex", "a compressed secp256k1 key, 66 lowercase hex")
        return 200, self.store.key_report(pubkey, self._now_ms()), {}
