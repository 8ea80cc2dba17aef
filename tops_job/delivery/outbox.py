"""The outbox: signed receipts on disk until the aggregator has answered for them.

Layout (one directory, default `<user data dir>/outbox`):

    <digest hex>.json          a receipt waiting to be delivered (one JSON line)
    rejected/<digest>.json     a receipt the aggregator rejected (final 4xx) ...
    rejected/<digest>.answer.json  ... and its answer
    held/<digest>.<pid>.json   a receipt the worker's self-audit holds (run <pid>): durable, not
                               sent; moved up when it verifies, or, left by a dead run, by the
                               next run's `recover` (which logs that it was never audited)
    withheld/<digest>.json     a receipt that failed the self-audit: never sent ...
    withheld/<digest>.reason.json  ... and why
    answers/<digest>.json      the last answer that did not settle a waiting receipt (a 401, a
                               stub's `200 {"ok": true}`), for `tops-job outbox`
    quarantine/<name>          an entry that could not be read back (with a warning)
    .lock                      held (flock) by the run that drains earlier runs' entries

A write is durable before `put` returns: temp file, fsync, rename, fsync the directory.
An entry leaves only after a confirmed 200 (`remove`) or a final answer (`reject`).
Whoever sends an entry first `claim`s it: an flock on the entry file, held while it is in
flight, so no two runs (processes, containers on one volume) ever send it at once.

Directories are created 0700 and no file is opened through a symlink. Anything in the
directory that is not as a worker left it (a file where `quarantine/` belongs, a FIFO, a
link, an entry that cannot be read) is counted in `problems`, logged, and worked around.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import stat
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tops_job.atomic import fsync_dir
from tops_job.errors import StorageError
from tops_job.files import describe_link_error, open_no_follow, private_dir
from tops_job.spec.any_receipt import digest_of_any as digest_of
from tops_job.spec.canonical import receipt_line

log = logging.getLogger("tops_job.outbox")

_ENTRY = re.compile(r"[0-9a-f]{64}\.json")
_HELD = re.compile(r"([0-9a-f]{64})\.([0-9]+)\.json")
_TMP_PREFIX = ".tmp-"


def _write_durably(directory: Path, name: str, data: bytes) -> Path:
    """Temp file, flock, write, fsync, rename, fsync the directory. The temp name is one
    `recover` knows (a crash between fsync and rename leaves it) and carries the writer's pid;
    the flock, held until the rename, tells a run in another PID namespace (another container
    on the same volume) that the writer is alive, which a pid cannot."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f"{_TMP_PREFIX}{os.getpid()}-", suffix=".part")  # 0600
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.replace(tmp, directory / name)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)
    fsync_dir(directory)
    return directory / name


def _locked_by_a_writer(tmp: Path) -> bool:
    """Whether a live writer holds `tmp` (its flock), in any PID namespace."""
    try:
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return True  # gone or unreadable now: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _written_by_another_live_process(tmp: Path) -> bool:
    """A run that started while another held the lock writes without it; a third run that
    then takes the lock must not promote or delete that run's half-written files."""
    if _locked_by_a_writer(tmp):
        return True
    try:
        pid = int(tmp.name[len(_TMP_PREFIX):].split("-", 1)[0])
    except ValueError:
        return False  # an older name without a pid: a leftover
    return another_live_process(pid)


@dataclass
class Claim:
    """This run's hold on one entry while it sends it: an flock on the entry file itself.
    Kernel locks, unlike pids, hold across processes, PID namespaces and containers sharing
    the volume; the kernel drops the lock when the holder dies (kill -9 included)."""

    digest: str
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1


class Outbox:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.rejected_dir = self.path / "rejected"
        self.quarantine_dir = self.path / "quarantine"
        self.answers_dir = self.path / "answers"
        self.held_dir = self.path / "held"
        self.withheld_dir = self.path / "withheld"
        self.location, self.rejected_location = str(self.path), str(self.rejected_dir)
        self.withheld_location = str(self.withheld_dir)
        self._lock_handle: int | None = None
        self._mutex = threading.Lock()
        self.quarantined = 0
        self.problems: Counter = Counter()  # what was found wrong with the outbox, and how often
        try:
            private_dir(self.path)
        except OSError as exc:
            raise StorageError(f"cannot create outbox {self.path} (TOPS_JOB_OUTBOX_DIR, --outbox): {exc.strerror or exc}",
                               exc) from None

    def problem(self, what: str, detail: str) -> None:
        """Something in the outbox is not as this worker left it: counted for the summary,
        logged, and worked around (the run goes on with what it can use)."""
        with self._mutex:
            self.problems[what] += 1
        log.warning("[outbox] %s: %s", what, detail)

    # ---- ownership of earlier runs' entries

    def acquire(self) -> bool:
        """Take the outbox's lock (non-blocking). Only the holder drains earlier entries, so
        two workers sharing a directory do not both queue the same leftovers; each send is
        also guarded by a per-entry `claim`. False when another run holds it. A lock file
        that cannot be used (a symlink, a directory, no permission) is reported, and the run
        drains anyway: the per-entry claims keep runs apart."""
        try:
            fd = open_no_follow(self.path / ".lock", os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            self.problem("unusable_lock", f"cannot use {self.path / '.lock'} ({describe_link_error(exc)}); "
                         "draining without it (each entry is still claimed before it is sent)")
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._lock_handle = fd
        return True

    def release(self) -> None:
        if self._lock_handle is not None:
            os.close(self._lock_handle)
            self._lock_handle = None

    def claim(self, digest: str) -> Claim | str:
        """Hold entry `digest` for sending: a Claim, or why not: "gone" (delivered, rejected
        or moved by another run), "busy" (another live run is sending it), "unreadable"."""
        path = self.path / f"{digest}.json"
        try:
            fd = open_no_follow(path, os.O_RDONLY)
        except FileNotFoundError:
            return "gone"
        except OSError as exc:
            self.problem("unreadable_entry", f"cannot open {path.name} ({describe_link_error(exc)}); it stays")
            return "unreadable"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return "busy"
        try:  # the holder before us may have removed or moved it: the name must still be this file
            now, held = os.stat(path, follow_symlinks=False), os.fstat(fd)
            same = (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return "gone"
        return Claim(digest, fd)

    def recover(self) -> list[str]:
        """Promote complete temp files a crash left behind between fsync and rename, delete
        incomplete ones, set aside what does not belong, and return the digests waiting,
        oldest first. Call with the lock."""
        for tmp in self.path.glob(_TMP_PREFIX + "*"):
            self._recover_temp(tmp)
        self._recover_held()
        try:
            fsync_dir(self.path)
            items = list(os.scandir(self.path))
        except OSError as exc:
            raise StorageError(f"cannot read outbox {self.path}: {exc.strerror or exc}", exc) from None
        entries = []
        for item in items:
            kind = _kind(item)
            if item.name in ("rejected", "quarantine", "answers", "held", "withheld"):
                if kind != "directory":
                    self.problem("misplaced_file", f"{item.path} is a {kind} where a directory belongs; "
                                 f"{item.name} entries are kept in the outbox instead")
            elif item.name == ".lock" or item.name.startswith(_TMP_PREFIX):
                continue
            elif _ENTRY.fullmatch(item.name) and kind == "file":
                try:
                    entries.append((item.stat(follow_symlinks=False).st_mtime_ns, item.name))
                except OSError:
                    continue
            else:
                why = "not an outbox entry name" if kind == "file" else f"a {kind}, not a receipt file"
                self.quarantine(Path(item.path), why)
        return [name[:-5] for _, name in sorted(entries)]

    def _recover_temp(self, tmp: Path) -> None:
        if _written_by_another_live_process(tmp):
            return
        try:
            info = tmp.lstat()
            if not stat.S_ISREG(info.st_mode):
                return self.quarantine(tmp, "a temp name that is not a regular file")
            receipt = self._read(tmp)
        except OSError:
            return  # unreadable now: leave it for the next recovery
        if receipt is not None:
            digest = digest_of(receipt).hex()
            final = self.path / f"{digest}.json"
            if final.exists() and not self._intact(final, digest):
                self._set_aside(final)  # the temp file is the true entry under that name
            if not final.exists():
                try:
                    os.replace(tmp, final)
                except OSError as exc:
                    self.problem("unrecoverable_temp", f"cannot promote {tmp.name}: {exc.strerror or exc}")
                    return
                log.info("[outbox] recovered %s from an interrupted write", digest)
                return
        elif info.st_size == 0 and time.time() - info.st_mtime < 60:
            return  # a writer between mkstemp and its flock: not yet written, leave it
        try:
            tmp.unlink()
        except OSError:
            pass

    # ---- receipts held for the self-audit

    def _held_path(self, digest: str) -> Path:
        return self.held_dir / f"{digest}.{os.getpid()}.json"

    def put_held(self, receipt: dict[str, Any], digest: bytes) -> Path:
        """`put`, into held/: durable when this returns, but no sender sees it until `unhold`."""
        data = (receipt_line(receipt) + "\n").encode("ascii")
        try:
            with self._mutex:
                private_dir(self.held_dir)
            return _write_durably(self.held_dir, self._held_path(digest.hex()).name, data)
        except OSError as exc:
            raise StorageError(f"cannot write to outbox {self.held_dir}: {exc.strerror or exc}", exc) from None

    def unhold(self, digest: str) -> None:
        """The held receipt verified: it becomes an ordinary entry, to be sent."""
        try:
            os.replace(self._held_path(digest), self.path / f"{digest}.json")
            fsync_dir(self.path)
            fsync_dir(self.held_dir)
        except OSError as exc:
            raise StorageError(f"cannot move {digest}.json from {self.held_dir} into the outbox: "
                               f"{exc.strerror or exc}", exc) from None

    def withhold(self, digest: str, reason: str) -> None:
        """The held receipt failed the self-audit: it moves to withheld/ with `reason`, never sent."""
        text = json.dumps({"digest": digest, "reason": reason}, sort_keys=True, indent=2) + "\n"
        try:
            with self._mutex:
                private_dir(self.withheld_dir)
            _write_durably(self.withheld_dir, f"{digest}.reason.json", text.encode("utf-8"))
            os.replace(self._held_path(digest), self.withheld_dir / f"{digest}.json")
            fsync_dir(self.withheld_dir)
            fsync_dir(self.held_dir)
        except OSError as exc:
            raise StorageError(f"cannot move held {digest}.json to {self.withheld_dir}: {exc.strerror or exc}",
                               exc) from None
        log.warning("[outbox] receipt %s withheld (%s): kept in %s, never sent", digest, reason, self.withheld_dir)

    def _recover_held(self) -> None:
        """Receipts a dead run held for its self-audit: that audit never ended, so they are
        sent like any other (the aggregator verifies them anyway), and the log says so. A live
        run's (its pid alive, and not this process's: a container's pid is reused) stay held."""
        try:
            items = list(os.scandir(self.held_dir))
        except FileNotFoundError:
            return
        except OSError as exc:
            self.problem("unreadable_held", f"cannot read {self.held_dir} ({exc.strerror or exc}); its receipts wait")
            return
        moved = 0
        for item in items:
            match = _HELD.fullmatch(item.name)
            if match is None or not item.is_file(follow_symlinks=False):
                continue
            digest, pid = match.group(1), int(match.group(2))
            if another_live_process(pid):
                continue
            target = self.path / f"{digest}.json"
            try:
                if target.exists():
                    os.unlink(item.path)
                else:
                    os.replace(item.path, target)
            except OSError as exc:
                self.problem("unrecoverable_held", f"cannot move {item.name} into the outbox: {exc.strerror or exc}")
                continue
            moved += 1
            log.warning("[outbox] receipt %s was held for a self-audit that never ended (run %d stopped); it was "
                        "never audited and is sent now", digest, pid)
        if moved:
            fsync_dir(self.path)
            fsync_dir(self.held_dir)

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

    def note_answer(self, digest: str, answer: dict[str, Any]) -> None:
        """Keep the last answer that left `digest` waiting (shown by `tops-job outbox`)."""
        text = json.dumps(answer, sort_keys=True, indent=2) + "\n"
        try:
            with self._mutex:
                private_dir(self.answers_dir)
            _write_durably(self.answers_dir, f"{digest}.json", text.encode("utf-8"))
        except OSError as exc:
            self.problem("unrecordable_answer", f"cannot keep the answer for {digest} in {self.answers_dir} "
                         f"({exc.strerror or exc})")

    def _forget_answer(self, digest: str) -> None:
        try:
            (self.answers_dir / f"{digest}.json").unlink()
        except OSError:
            pass

    def remove(self, digest: str) -> bool:
        """Delivered (200): the entry goes. False (logged) when it cannot be removed (a
        read-only or failing disk): it stays, and the next run's send is answered duplicate."""
        self._forget_answer(digest)
        try:
            (self.path / f"{digest}.json").unlink()
            fsync_dir(self.path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            self.problem("unremovable_entry", f"{digest}.json was delivered but cannot be removed "
                         f"({exc.strerror or exc}); the next run's send of it is answered duplicate")
            return False
        return True

    def reject(self, digest: str, answer: dict[str, Any]) -> bool:
        """A final answer: the receipt and the answer move to rejected/. False (logged) when
        they cannot: the receipt then stays in the outbox, with nothing lost."""
        text = json.dumps(answer, sort_keys=True, indent=2) + "\n"
        self._forget_answer(digest)
        try:
            with self._mutex:
                private_dir(self.rejected_dir)
            _write_durably(self.rejected_dir, f"{digest}.answer.json", text.encode("utf-8"))
            os.replace(self.path / f"{digest}.json", self.rejected_dir / f"{digest}.json")
            fsync_dir(self.rejected_dir)
            fsync_dir(self.path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            self.problem("unmovable_rejection", f"cannot move rejected {digest}.json to {self.rejected_dir} "
                         f"({exc.strerror or exc}); it stays in the outbox")
            return False
        return True

    def quarantine(self, path: Path, why: str) -> None:
        target = self.quarantine_dir / path.name
        try:
            with self._mutex:
                private_dir(self.quarantine_dir)
            os.replace(path, target)
            fsync_dir(self.path)
        except OSError as exc:
            self.problem("unquarantinable", f"{path.name} ({why}) cannot be moved to {self.quarantine_dir} "
                         f"({exc.strerror or exc}); it is left in place and skipped")
            return
        with self._mutex:
            self.quarantined += 1
        log.warning("[outbox] quarantined %s: %s; it is kept in %s for inspection", path.name, why, self.quarantine_dir)

    def pending(self) -> Iterator[str]:
        for item in self.path.glob("*.json"):
            if _ENTRY.fullmatch(item.name):
                yield item.name[:-5]

    def count(self) -> int:
        """Entries waiting (receipt files under their digest), without reading them."""
        return self.count_in(self.path)

    @staticmethod
    def count_in(path: Path) -> int:
        """`count` for an outbox directory this process does not open (nothing is created)."""
        try:
            return sum(1 for item in os.scandir(path)
                       if _ENTRY.fullmatch(item.name) and item.is_file(follow_symlinks=False))
        except OSError:
            return 0

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        """The receipt in `path`, or None when the content is not one. An I/O error (too many
        open files, a flaky disk) raises OSError instead: a good receipt that could not be read
        this time must not be quarantined, where nothing would ever send it."""
        from tops_job.delivery.backend import parse_entry

        return parse_entry(path.read_bytes())


def is_entry_name(name: str) -> bool:
    return bool(_ENTRY.fullmatch(name))


def rejected_entries(rejected_dir: Path) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(digest, the aggregator's answer or None) for each rejected receipt kept in `rejected_dir`."""
    if not rejected_dir.is_dir():
        return
    for item in sorted(rejected_dir.glob("*.json")):
        if not _ENTRY.fullmatch(item.name):
            continue
        digest = item.name[:-5]
        try:
            answer = json.loads((rejected_dir / f"{digest}.answer.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            answer = None
        yield digest, answer


def another_live_process(pid: int) -> bool:
    """Whether `pid` is a live process other than this one. Our own pid counts as not: a
    container restarted on the same volume reuses pids, so a file named by our pid was left
    by an earlier, dead run."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _kind(item: os.DirEntry) -> str:
    """What a directory entry is, without following a symlink."""
    try:
        mode = item.stat(follow_symlinks=False).st_mode
    except OSError:
        return "vanished entry"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"
