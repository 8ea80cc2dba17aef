"""tops-receipt/2 challenge-mode attempts in S3: `tops_job.ExchangeStore` with the local
directory's semantics (tops_job/delivery/exchange_outbox.py), for instances whose disk dies
with them.

Objects, under the outbox prefix (one `S3Objects` shared with the v1 store):

    v2/<digest>.held            held for the self-audit (the holding run's lease token inside)
    v2/<digest>.leaves          leaf hashes, 32 bytes each
    v2/<digest>.commit.json     the signed commitment, created once (If-None-Match: *), never
                                overwritten; its presence is the attempt's life
    v2/<digest>.challenge.json  the aggregator's drawn leaves
    v2/<digest>.opened.json     the opened set
    v2/done/<digest>.json       the verdict with the aggregator's answer (and the commitment
                                when not accepted)
    v2/withheld/<digest>.*      failed the self-audit: commitment, leaves, reason.json
    claims/v2/<digest>          the run that sends the attempt (see s3_leases.Claims)
    claims/v2/.drain            the run that resumes earlier runs' attempts

Write order as on disk: held marker, leaves, then the commitment, so a commitment always has
its leaves; the verdict before the attempt's objects go, the commitment last. Before any of
them, `put` claims the attempt for this run: while this run's lease lives no other run resumes
it. `recover` resumes only attempts whose owner is dead, each taken over with a conditional
write, so of two runs recovering at once exactly one resumes a given attempt. Every read that
feeds a send (`load`) answers only for attempts this run owns while its lease is fresh: a run
that may have been presumed dead sends nothing more.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from typing import Any

from tops_job import AWAITING_CHALLENGE, AWAITING_VERDICT, CHALLENGED, StorageError
from tops_job_aws.s3_leases import Claims, RunLease, S3Objects

log = logging.getLogger("tops_job_aws.outbox")

_NAME = re.compile(r"v2/([0-9a-f]{64})\.(held|leaves|commit\.json|challenge\.json|opened\.json)")
_SIDES = (".opened.json", ".challenge.json", ".leaves")  # removed before the commitment
_KINDS = ("commit.json", "challenge.json", "opened.json")
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")  # a lease token (a run's uuid4().hex)
DRAIN = "v2/.drain"


class S3ExchangeStore:
    def __init__(self, objects: S3Objects, lease: RunLease, claims: Claims):
        self.objects = objects
        self.lease = lease
        self.claims = claims
        self.location = objects.url("v2")
        self.withheld_location = objects.url("v2/withheld")
        self.done_location = objects.url("v2/done")
        self._mine: set[str] = set()  # attempts this run put or resumed (its delivery tracks them)
        self._mutex = threading.Lock()

    # ---- ownership

    def _start_lease(self) -> None:
        self.lease.start()  # idempotent; a store used only for reads never writes a lease

    def acquire(self) -> bool:
        """Become the run that resumes earlier runs' attempts: False while a live run is."""
        self._start_lease()
        return self.claims.take(DRAIN)

    def release(self) -> None:
        self.claims.give_up_all()
        self.lease.stop()

    def _owns(self, digest: str) -> bool:
        """Whether this run may still send `digest`: its claim, and a lease no one can have
        presumed dead."""
        if not self.claims.owns(_claim(digest)):
            log.warning("[outbox] v2 attempt %s is not this run's to send: left to the run that owns it", digest[:16])
            return False
        if not self._fresh():
            log.warning("[outbox] this run's lease in %s is not fresh (the store unreachable?): v2 attempt %s is not "
                        "sent, another run may have taken it over", self.objects.url("leases"), digest[:16])
            return False
        return True

    def _fresh(self) -> bool:
        """Whether the lease is fresh, waiting up to one renewal period for a renewal that is
        merely late (a busy machine), not for a store that stays unreachable."""
        deadline = time.monotonic() + self.lease.ttl_s / 3
        while not self.lease.fresh():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    # ---- writes

    def _create(self, name: str, body: bytes) -> bool:
        return self.objects.create(name, body) is not None

    def put(self, commitment: dict[str, Any], digest: str, leaf_hashes: bytes | None, *, held: bool = False) -> None:
        """Durable before it returns: this run's claim, the held marker, the leaf hashes, then
        the commitment (created once: an attempt already stored is kept as it is)."""
        _check(digest)
        self._start_lease()
        if not self.claims.take(_claim(digest)):
            where = self.objects.url("claims/" + _claim(digest))
            raise StorageError(f"cannot store v2 attempt {digest}: {where} is held by another live run")
        with self._mutex:
            self._mine.add(digest)
        if held:
            self.objects.write(f"v2/{digest}.held", f"{self.lease.token}\n".encode("ascii"))
        if leaf_hashes is not None:
            self.objects.write(f"v2/{digest}.leaves", leaf_hashes)
        if not self._create(f"v2/{digest}.commit.json", _line(commitment)):
            log.warning("[outbox] v2 attempt %s is already in %s: the stored commitment is kept", digest[:16],
                        self.location)

    def put_challenge(self, digest: str, challenge: dict[str, Any]) -> None:
        self.objects.write(f"v2/{_check(digest)}.challenge.json", _line(challenge))

    def put_opened(self, digest: str, opened: dict[str, Any]) -> None:
        self.objects.write(f"v2/{_check(digest)}.opened.json", _line(opened))

    def unhold(self, digest: str) -> None:
        """The self-audit verified it: it may be sent."""
        self.objects.delete(f"v2/{_check(digest)}.held")

    def withhold(self, digest: str, reason: str) -> None:
        """The self-audit failed it: its objects move to withheld/, with `reason`; never sent."""
        _check(digest)
        self.objects.write(f"v2/withheld/{digest}.reason.json", _line({"digest": digest, "reason": reason}))
        for suffix in (".leaves", ".commit.json"):
            self.objects.move(f"v2/{digest}{suffix}", f"v2/withheld/{digest}{suffix}")
        self.objects.delete(f"v2/{digest}.held")
        self._forget(digest)
        log.warning("[outbox] v2 attempt %s withheld (%s): kept in %s, never sent", digest, reason,
                    self.withheld_location)

    def held_by_live_run(self, digest: str) -> bool:
        """Whether `digest` is held for the self-audit of a live run other than this one."""
        stored = self.objects.read(f"v2/{_check(digest)}.held")
        if stored is None:
            return False
        token = stored.body.decode("ascii", "replace").strip()
        if not _TOKEN.fullmatch(token):
            return False  # not a marker a run wrote: nobody holds it
        return token != self.lease.token and self.lease.alive(token)

    def drop_challenge(self, digest: str) -> None:
        """The aggregator does not know the commitment (a new database): it will draw again."""
        for suffix in (".opened.json", ".challenge.json"):
            self.objects.delete(f"v2/{_check(digest)}{suffix}")

    def finish(self, digest: str, verdict: str, answer: dict[str, Any]) -> None:
        """Record the verdict, then forget the attempt's objects (the commitment last)."""
        _check(digest)
        record: dict[str, Any] = {"digest": digest, "verdict": verdict, "answer": answer}
        commitment = self._load(digest, "commit.json")
        if verdict != "accepted" and commitment is not None:
            record["commitment"] = commitment
        self.objects.write(f"v2/done/{digest}.json", _line(record))
        self._remove(digest)
        self._forget(digest)

    def _remove(self, digest: str) -> None:
        for suffix in _SIDES + (".commit.json",):
            self.objects.delete(f"v2/{digest}{suffix}")

    def _forget(self, digest: str) -> None:
        with self._mutex:
            self._mine.discard(digest)
        self.claims.give_up(_claim(digest))

    # ---- reads

    def _load(self, digest: str, kind: str) -> dict[str, Any] | None:
        if kind not in _KINDS:
            raise ValueError(f"no v2 object kind {kind!r} (one of {', '.join(_KINDS)})")
        stored = self.objects.read(f"v2/{_check(digest)}.{kind}")
        return None if stored is None else _json(stored.body)

    def load(self, digest: str, kind: str) -> dict[str, Any] | None:
        """What the sender sends: None unless this run owns the attempt (see `_owns`)."""
        if not self._owns(_check(digest)):
            return None
        return self._load(digest, kind)

    def leaf_hashes(self, digest: str) -> list[bytes] | None:
        stored = self.objects.read(f"v2/{_check(digest)}.leaves")
        blob = b"" if stored is None else stored.body
        if not blob or len(blob) % 32:
            return None
        return [blob[i: i + 32] for i in range(0, len(blob), 32)]

    def state(self, digest: str) -> str | None:
        if not self.objects.exists(f"v2/{_check(digest)}.commit.json"):
            return None
        return _state({kind: 0.0 for kind in ("opened.json", "challenge.json")
                       if self.objects.exists(f"v2/{digest}.{kind}")})

    def verdict(self, digest: str) -> dict[str, Any] | None:
        stored = self.objects.read(f"v2/done/{_check(digest)}.json")
        return None if stored is None else _json(stored.body)

    def _names(self) -> dict[str, dict[str, float]]:
        """digest -> {kind: modified} of every attempt object directly under v2/ (anything
        else there is not this store's and is left alone)."""
        found: dict[str, dict[str, float]] = {}
        for item in self.objects.list("v2/"):
            match = _NAME.fullmatch(item.key)
            if match:
                found.setdefault(match.group(1), {})[match.group(2)] = item.modified
        return found

    def pending(self) -> dict[str, str]:
        """digest -> state of every attempt without a verdict and not held, oldest commitment
        first (whichever run owns it)."""
        names = self._names()
        waiting = [(kinds["commit.json"], digest) for digest, kinds in names.items()
                   if "commit.json" in kinds and "held" not in kinds]
        return {digest: _state(names[digest]) for _, digest in sorted(waiting)}

    def recover(self) -> dict[str, str]:
        """Take over the attempts no live run owns, tidy what their dead runs left, and return
        digest -> state of those this run now resumes, oldest commitment first."""
        self._start_lease()
        if not self.lease.fresh():
            log.warning("[outbox] this run's lease in %s is not fresh: it resumes no earlier v2 attempts",
                        self.objects.url("leases"))
            return {}
        resumed: list[tuple[float, str, str]] = []
        names = self._names()
        self._sweep_claims(names)
        for digest, kinds in names.items():
            with self._mutex:
                if digest in self._mine:
                    continue  # put or resumed by this run already: its delivery tracks it
            if not self.claims.take(_claim(digest)):
                continue  # a live run sends it (or is still writing it)
            try:
                kept = self._tidy(digest, kinds)
            except StorageError as exc:  # left for a later run; the others are resumed
                log.warning("[outbox] v2 attempt %s not resumed: %s", digest[:16], exc)
                kept = None
            if kept is None:
                self.claims.give_up(_claim(digest))
            else:
                with self._mutex:
                    self._mine.add(digest)
                resumed.append((kinds["commit.json"], digest, kept))
        self.lease.sweep()
        return {digest: state for _, digest, state in sorted(resumed)}

    def _sweep_claims(self, names: dict[str, dict[str, float]]) -> None:
        """Claims a dead run left on attempts that are gone (it died between the verdict and
        letting go): taken over and deleted, so claims/ does not grow without end."""
        for item in self.objects.list("claims/v2/"):
            digest = item.key[len("claims/v2/"):]
            if re.fullmatch(r"[0-9a-f]{64}", digest) and digest not in names and not self.claims.owns(_claim(digest)):
                if self.claims.take(_claim(digest)):  # False: a live run is writing it now
                    self.claims.give_up(_claim(digest))

    def _tidy(self, digest: str, kinds: dict[str, float]) -> str | None:
        """An attempt this run just took over: its state, or None when nothing is left to send."""
        if "held" in kinds:
            if self.held_by_live_run(digest):
                return None  # its claim had lapsed but its holder lives: it still owns the hold
            if "commit.json" in kinds:
                log.warning("[outbox] v2 attempt %s was held for a self-audit that never ended (its run stopped); "
                            "it was never audited and is sent now", digest)
            self.objects.delete(f"v2/{digest}.held")
            kinds = {k: v for k, v in kinds.items() if k != "held"}
        if "commit.json" in kinds and not self.objects.exists(f"v2/{digest}.commit.json"):
            return None  # its owner finished or withheld it after we listed it
        if "commit.json" not in kinds:  # the run died before the commitment: nothing was sent
            for suffix in _SIDES:
                self.objects.delete(f"v2/{digest}{suffix}")
            return None
        if self.objects.exists(f"v2/done/{digest}.json"):  # the run died inside finish()
            self._remove(digest)
            return None
        return _state(kinds)


def _claim(digest: str) -> str:
    return f"v2/{digest}"


def _check(digest: str) -> str:
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise ValueError(f"not a v2 attempt digest (64 lower-case hex digits): {digest!r}")
    return digest


def _state(kinds: dict[str, float]) -> str:
    if "opened.json" in kinds:
        return AWAITING_VERDICT
    if "challenge.json" in kinds:
        return CHALLENGED
    return AWAITING_CHALLENGE


def _json(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _line(value: dict[str, Any]) -> bytes:
    return (json.dumps(value, sort_keys=True, separators=(",", ":")) + "\n").encode("utf-8")
