"""Ownership in S3 without a lock server: conditional writes, run leases and claims.

- `S3Objects`: the few object operations an outbox needs, with S3's conditional writes
  (`If-None-Match: *` creates only; `If-Match: <etag>` replaces or deletes only the version
  read) and errors turned into `StorageError`s that name the object.
- `RunLease`: `leases/<token>.json`, rewritten every `ttl/3` s by a daemon thread while the run
  lives. A lease not rewritten for `ttl` s belongs to a dead run. Age is measured on the
  store's own clock (the object's Last-Modified against the response's Date header), so
  instances with skewed clocks agree on who is dead.
- `Claims`: `claims/<name>` names the run that owns an entry. Taken with a create-only write;
  a claim whose owner's lease has expired is taken over with a write conditional on the ETag
  just read, so of two runs taking over the same dead claim exactly one wins.

A run that cannot renew its lease (the store unreachable for `ttl` s) may be presumed dead
and its claims taken over: `RunLease.fresh()` is false then, and a sender must not start a
send it no longer owns (the aggregator's duplicate answer still keeps a late one harmless).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from tops_job import StorageError

from .s3_errors import lost_race, missing, sdk_errors

log = logging.getLogger("tops_job_aws.outbox")

MAX_LEASE_S = 86400.0  # a lease claiming a longer life is judged by this one


@dataclass(frozen=True)
class Stored:
    """One object as read: its bytes, its ETag, and its age on the store's clock."""

    body: bytes
    etag: str
    age_s: float


@dataclass(frozen=True)
class Listed:
    key: str  # relative to the prefix
    modified: float  # store clock, seconds since the epoch
    size: int


class S3Objects:
    """Objects under s3://bucket/prefix/. Every method raises StorageError for anything but
    the outcome it reports (exists, missing, lost the race)."""

    def __init__(self, s3: Any, bucket: str, prefix: str):
        self._s3 = s3
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def url(self, name: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(name)}"

    def _fail(self, doing: str, name: str, exc: Exception) -> StorageError:
        return StorageError(f"cannot {doing} {self.url(name)}: {exc}")

    def create(self, name: str, body: bytes) -> str | None:
        """Store `body` under `name` unless something is there: its ETag, or None when
        the name was taken (by an earlier write or a racing one)."""
        return self._put(name, body, IfNoneMatch="*")

    def replace(self, name: str, body: bytes, etag: str) -> str | None:
        """Replace the version `etag` of `name`: the new ETag, or None when it changed or went."""
        return self._put(name, body, IfMatch=etag)

    def write(self, name: str, body: bytes) -> str:
        """Store `body` under `name` whatever is there (answers, verdicts: last write wins)."""
        etag = self._put(name, body)
        assert etag is not None
        return etag

    def _put(self, name: str, body: bytes, **condition: str) -> str | None:
        try:
            answer = self._s3.put_object(Bucket=self.bucket, Key=self.key(name), Body=body, **condition)
        except sdk_errors() as exc:
            if condition and (lost_race(exc) or ("IfMatch" in condition and missing(exc))):
                return None
            raise self._fail("write", name, exc) from None
        return str(answer["ETag"])

    def read(self, name: str, limit: int | None = None) -> Stored | None:
        """The object, or None when there is none. With `limit`, at most `limit + 1` bytes
        are read (an object longer than `limit` is then known to be one, at bounded cost)."""
        try:
            answer = self._s3.get_object(Bucket=self.bucket, Key=self.key(name))
            stream = answer["Body"]
            try:
                body = stream.read() if limit is None else stream.read(limit + 1)
            finally:
                stream.close()
        except sdk_errors() as exc:
            if missing(exc):
                return None
            raise self._fail("read", name, exc) from None
        return Stored(body, str(answer["ETag"]), _age(answer))

    def move(self, source: str, target: str, etag: str | None = None) -> bool:
        """Move `source` to `target` (whatever `target` held is replaced): S3 has no rename,
        so a copy inside the store, then a delete of the source (only its version `etag` when
        given). False when `source` is not there. A death between the two leaves both."""
        try:
            self._s3.copy_object(Bucket=self.bucket, Key=self.key(target),
                                 CopySource={"Bucket": self.bucket, "Key": self.key(source)})
        except sdk_errors() as exc:
            if missing(exc):
                return False
            raise self._fail(f"copy {self.url(source)} to", target, exc) from None
        self.delete(source, etag)
        return True

    def exists(self, name: str) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=self.key(name))
        except sdk_errors() as exc:
            if missing(exc):
                return False
            raise self._fail("look up", name, exc) from None
        return True

    def delete(self, name: str, etag: str | None = None) -> bool:
        """Delete `name` (only the version `etag` when given): False when that version is
        no longer there. Deleting what is already gone is success."""
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=self.key(name), **({"IfMatch": etag} if etag else {}))
        except sdk_errors() as exc:
            if missing(exc):
                return etag is None
            if lost_race(exc):
                return False
            raise self._fail("delete", name, exc) from None
        return True

    def list(self, under: str = "") -> list[Listed]:
        """Every object whose name starts with `under`, oldest first."""
        found: list[Listed] = []
        base = self.key("")
        try:
            for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.key(under)):
                for item in page.get("Contents", ()):
                    found.append(Listed(item["Key"][len(base):], item["LastModified"].timestamp(), int(item["Size"])))
        except sdk_errors() as exc:
            raise self._fail("list", under, exc) from None
        return sorted(found, key=lambda item: (item.modified, item.key))


def _age(answer: dict[str, Any]) -> float:
    """Seconds since the object was last written, on the store's clock (its Date header);
    the local clock only when the store sends no Date."""
    modified = answer["LastModified"].timestamp()
    date = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
    except (TypeError, ValueError):
        now = time.time()
    return max(0.0, now - modified)


class RunLease:
    """This run's lease. `start` writes it and keeps it fresh; `stop` deletes it."""

    def __init__(self, objects: S3Objects, ttl_s: float, token: str | None = None):
        if not 3 <= ttl_s <= MAX_LEASE_S:
            raise ValueError(f"a lease's life must be 3 s to {MAX_LEASE_S:.0f} s (shorter cannot be renewed reliably)")
        self.objects = objects
        self.ttl_s = ttl_s
        self.token = token or uuid.uuid4().hex
        self._renewed = 0.0  # time.monotonic() of the last successful write
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return f"leases/{self.token}.json"

    def start(self) -> None:
        if self._thread is not None:
            return
        self._renew()
        self._thread = threading.Thread(target=self._keep, name="tops-job-s3-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        body = json.dumps({"token": self.token, "ttl_s": self.ttl_s}).encode()
        self.objects.write(self.name, body)
        self._renewed = time.monotonic()

    def _keep(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self._renew()
            except StorageError as exc:
                log.warning("[outbox] cannot renew this run's lease (%s); after %.0f s other runs may take over "
                            "its entries", exc, self.ttl_s)

    def fresh(self) -> bool:
        """Whether this run surely still holds its lease (renewed within half its life)."""
        return self._thread is not None and time.monotonic() - self._renewed < self.ttl_s / 2

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl_s)
            self._thread = None
        try:
            self.objects.delete(self.name)
        except StorageError as exc:
            log.warning("[outbox] cannot delete this run's lease (%s); it expires in %.0f s", exc, self.ttl_s)

    def alive(self, token: str) -> bool:
        """Whether the run `token` holds a lease younger than the ttl (ours: whether fresh)."""
        if token == self.token:
            return self.fresh()
        stored = self.objects.read(f"leases/{token}.json", 4096)
        return stored is not None and stored.age_s < max(self.ttl_s, _ttl(stored.body))


    def sweep(self, limit: int = 100) -> int:
        """Delete up to `limit` leases of runs dead for two lease lives (a kill -9 leaves its
        lease behind; nothing needs it once no claim can name a live run by it). A run that
        comes back rewrites its lease. Returns how many went; failures are only logged."""
        swept = 0
        try:
            for item in self.objects.list("leases/")[:limit]:
                if item.key == self.name:
                    continue
                stored = self.objects.read(item.key, 4096)
                if stored is not None and stored.age_s >= 2 * max(self.ttl_s, _ttl(stored.body)):
                    swept += self.objects.delete(item.key, stored.etag)
        except StorageError as exc:
            log.warning("[outbox] cannot sweep expired leases (%s); they stay, harmless", exc)
        return swept


class Claims:
    """Which run owns which entry: `claims/<name>` holding the owner's lease token."""

    def __init__(self, objects: S3Objects, lease: RunLease):
        self.objects = objects
        self.lease = lease
        self._held: dict[str, str] = {}  # name -> ETag of our claim
        self._mutex = threading.Lock()

    def take(self, name: str) -> bool:
        """Own `name`: True when this run does now (it did, it was free, or its owner is
        dead and this run won the takeover); False while another live run owns it."""
        body = json.dumps({"owner": self.lease.token}).encode()
        key = f"claims/{name}"
        for _ in range(3):  # a claim deleted between our create and our read: try again
            etag = self.objects.create(key, body)
            if etag is None:
                current = self.objects.read(key)
                if current is None:
                    continue
                owner = _owner(current.body)
                if owner == self.lease.token:
                    etag = current.etag  # ours already (a retried create that had succeeded)
                elif owner is not None and self.lease.alive(owner):
                    return False
                else:
                    etag = self.objects.replace(key, body, current.etag)
                    if etag is None:
                        return False  # another run took it over first
                    log.info("[outbox] took over %s from a run that stopped (%s)", name, owner)
            with self._mutex:
                self._held[name] = etag
            return True
        return False

    def owner(self, name: str) -> str | None:
        """The token of the run that claims `name`, or None."""
        stored = self.objects.read(f"claims/{name}")
        return None if stored is None else _owner(stored.body)

    def owns(self, name: str) -> bool:
        with self._mutex:
            return name in self._held

    def give_up(self, name: str) -> None:
        """Release our claim on `name` (only the version we wrote: a run that took it over
        after our lease lapsed keeps its own)."""
        with self._mutex:
            etag = self._held.pop(name, None)
        if etag is not None:
            try:
                self.objects.delete(f"claims/{name}", etag)
            except StorageError as exc:
                log.warning("[outbox] cannot release the claim on %s (%s); it lapses with this run's lease", name, exc)

    def give_up_all(self) -> None:
        with self._mutex:
            names = list(self._held)
        for name in names:
            self.give_up(name)


def _ttl(body: bytes) -> float:
    """The ttl a lease says its run renews within (runs may be configured differently: a
    lease is judged by the longer of its own ttl and the reader's); 0 when unreadable."""
    try:
        value = json.loads(body).get("ttl_s")
    except (ValueError, AttributeError):
        return 0.0
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        return 0.0
    return min(float(value), MAX_LEASE_S)


def _owner(body: bytes) -> str | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None  # not a claim this code wrote: treat as abandoned
    owner = value.get("owner") if isinstance(value, dict) else None
    return owner if isinstance(owner, str) else None
