"""The outbox: signed receipts on disk until the aggregator has answered for them.

Layout (one directory, default `<user data dir>/outbox`):

    <digest hex>.json          a receipt waiting to be delivered (one JSON line)
    rejected/<digest>.json     a receipt the aggregator rejected (final 4xx) ...
    rejected/<digest>.answer.json  ... and its answer
    quarantine/<name>          an entry that could not be read back (with a warning)
    .lock                      held (flock) by the run that drains this outbox

A write is durable before `put` returns: temp file, fsync, rename, fsync the directory.
An entry leaves only after a 200 (`remove`) or a final answer (`reject`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tops_job.atomic import fsync_dir, write_atomic
from tops_job.errors import StorageError
from tops_job.spec.canonical import digest_of, receipt_line

log = logging.getLogger("tops_job.outbox")

_ENTRY = re.compile(r"[0-9a-f]{64}\.json")
_TMP_PREFIX = ".tmp-"


def _write_durably(directory: Path, name: str, data: bytes) -> Path:
    # The temp name is one `_recover` knows: a crash between fsync and rename leaves it.
    # The temp name carries the writer's pid: `recover` leaves a live writer's files alone.
    return write_atomic(directory / name, data, sync_dir=True, tmp_prefix=f"{_TMP_PREFIX}{os.getpid()}-",
                        tmp_suffix=".part")


def _written_by_another_live_process(tmp: Path) -> bool:
    """A run that started while another held the lock writes without it; a third run that
    then takes the lock must not promote or delete that run's half-written files."""
    try:
        pid = int(tmp.name[len(_TMP_PREFIX):].split("-", 1)[0])
    except ValueError:
        return False  # an older name without a pid: a leftover
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


class Outbox:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.rejected_dir = self.path / "rejected"
        self.quarantine_dir = self.path / "quarantine"
        self._lock_handle: Any = None
        self._mutex = threading.Lock()
        self.quarantined = 0
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create outbox {self.path}: {exc.strerror or exc}", exc) from None

    # ---- ownership of earlier runs' entries

    def acquire(self) -> bool:
        """Take the outbox's lock (non-blocking). Only the holder drains earlier entries, so
        two workers sharing a directory never send the same leftovers at once."""
        try:
            handle = open(self.path / ".lock", "a+")
        except OSError as exc:
            raise StorageError(f"cannot open outbox lock in {self.path}: {exc.strerror or exc}", exc) from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._lock_handle = handle
        return True

    def release(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    def recover(self) -> list[str]:
        """Promote complete temp files a crash left behind between fsync and rename, delete
        incomplete ones, and return the digests waiting, oldest first. Call with the lock."""
        for tmp in self.path.glob(_TMP_PREFIX + "*"):
            if _written_by_another_live_process(tmp):
                continue
            try:
                receipt = self._read(tmp)
            except OSError:
                continue  # unreadable now: leave it for the next recovery
            if receipt is not None:
                digest = digest_of(receipt).hex()
                final = self.path / f"{digest}.json"
                if final.exists() and not self._intact(final, digest):
                    self._set_aside(final)  # the temp file is the true entry under that name
                if not final.exists():
                    os.replace(tmp, final)
                    log.info("[outbox] recovered %s from an interrupted write", digest)
                    continue
            try:
                tmp.unlink()
            except OSError:
                pass
        fsync_dir(self.path)
        entries = []
        for item in self.path.iterdir():
            if item.is_file() and _ENTRY.fullmatch(item.name):
                try:
                    entries.append((item.stat().st_mtime_ns, item.name))
                except OSError:
                    continue
            elif item.is_file() and item.name != ".lock" and not item.name.startswith(_TMP_PREFIX):
                self.quarantine(item, "not an outbox entry name")
        return [name[:-5] for _, name in sorted(entries)]

    # ---- entries

    def put(self, receipt: dict[str, Any], digest: bytes) -> Path:
        """Durably store `receipt`; when this returns it survives kill -9 and power loss."""
        data = (receipt_line(receipt) + "\n").encode("ascii")
        try:
            return _write_durably(self.path, f"{digest.hex()}.json", data)
        except OSError as exc:
            raise StorageError(f"cannot write to outbox {self.path}: {exc.strerror or exc}", exc) from None

    def load(self, digest: str) -> dict[str, Any] | None:
        """The receipt stored under `digest`, or None when it is gone or was quarantined."""
        path = self.path / f"{digest}.json"
        if not path.exists():
            return None
        try:
            receipt = self._read(path)
        except FileNotFoundError:
            return None
        except OSError as exc:  # stays in the outbox; this run or the next sends it
            log.warning("[outbox] cannot read %s now (%s); it stays in the outbox", path.name, exc)
            return None
        if receipt is None:
            self.quarantine(path, "unreadable or not a receipt")
            return None
        if digest_of(receipt).hex() != digest:
            self._set_aside(path, receipt)
            return None
        return receipt

    def _intact(self, path: Path, digest: str) -> bool:
        """Whether `path` holds the receipt its name says (an unreadable file counts as
        intact: a read error now is no reason to replace it)."""
        try:
            receipt = self._read(path)
        except OSError:
            return True
        return receipt is not None and digest_of(receipt).hex() == digest

    def _set_aside(self, path: Path, receipt: dict[str, Any] | None = None) -> None:
        """An entry whose content does not hash to its name. A whole receipt is one this
        worker signed: it is re-filed under its own digest, never dropped; anything else, or
        a copy of an entry already filed right, is quarantined."""
        if receipt is None:
            try:
                receipt = self._read(path)
            except OSError:
                receipt = None
        if receipt is not None:
            right = self.path / f"{digest_of(receipt).hex()}.json"
            if not right.exists():
                try:
                    os.replace(path, right)
                    fsync_dir(self.path)
                except OSError as exc:
                    log.warning("[outbox] cannot re-file %s under its digest: %s", path.name, exc)
                    return
                log.warning("[outbox] %s held receipt %s; re-filed under its own digest", path.name, right.name[:-5])
                return
        self.quarantine(path, "content does not hash to its name")

    def holds(self, digest: str) -> bool:
        return (self.path / f"{digest}.json").exists()

    def remove(self, digest: str) -> None:
        """Delivered (200): the entry goes."""
        try:
            (self.path / f"{digest}.json").unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.path)

    def reject(self, digest: str, answer: dict[str, Any]) -> None:
        """A final answer: the receipt and the answer move to rejected/."""
        with self._mutex:
            self.rejected_dir.mkdir(exist_ok=True)
        text = json.dumps(answer, sort_keys=True, indent=2) + "\n"
        _write_durably(self.rejected_dir, f"{digest}.answer.json", text.encode("utf-8"))
        try:
            os.replace(self.path / f"{digest}.json", self.rejected_dir / f"{digest}.json")
        except FileNotFoundError:
            return
        fsync_dir(self.rejected_dir)
        fsync_dir(self.path)

    def quarantine(self, path: Path, why: str) -> None:
        with self._mutex:
            self.quarantine_dir.mkdir(exist_ok=True)
            self.quarantined += 1
        target = self.quarantine_dir / path.name
        try:
            os.replace(path, target)
            fsync_dir(self.path)
        except OSError as exc:
            log.warning("[outbox] cannot quarantine %s (%s): %s", path, why, exc)
            return
        log.warning("[outbox] quarantined %s: %s; it is kept in %s for inspection", path.name, why, self.quarantine_dir)

    def pending(self) -> Iterator[str]:
        for item in self.path.glob("*.json"):
            if _ENTRY.fullmatch(item.name):
                yield item.name[:-5]

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        """The receipt in `path`, or None when the content is not one. An I/O error (too many
        open files, a flaky disk) raises OSError instead: a good receipt that could not be read
        this time must not be quarantined, where nothing would ever send it."""
        from tops_job.spec.receipt import parse_json

        data = path.read_bytes()
        try:
            receipt = parse_json(data)
        except Exception:
            return None
        if not isinstance(receipt, dict) or "sig" not in receipt or "nonce" not in receipt:
            return None
        try:
            digest_of(receipt)
        except (TypeError, ValueError):
            return None
        return receipt
