"""All-or-nothing appends to a JSON-lines file (the local ledger, --receipts-out).

An append either adds whole lines or leaves the file as it was: a write that fails part
way (a full disk) is cut back to the length before it. A file that already ends in a partial
line (a crash or kill -9 mid-write, or an older version) is repaired when opened: the partial
line is set aside in `<name>.partial-<time>` beside it and cut off, so the next line never
glues onto it. Readers (`complete_lines`) skip such a line with a warning.

The file is opened without following symlinks and created 0600; its directory 0700.
Appends from several processes are serialised with flock, so cutting back a failed append
never cuts another process's line.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tops_job.atomic import write_atomic
from tops_job.errors import StorageError
from tops_job.files import describe_link_error, open_no_follow, private_dir

log = logging.getLogger("tops_job.appendlog")

_CHUNK = 64 * 1024


class AppendLog:
    def __init__(self, path: Path, *, what: str, sync: bool = True):
        self.path = Path(path)
        self.what = what  # "ledger", "--receipts-out": named in errors
        self.sync = sync
        self._lock = threading.Lock()
        try:
            private_dir(self.path.parent)
            # A device or FIFO (/dev/stdout) is allowed; only a regular file is repaired and cut back.
            self._fd = open_no_follow(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, regular_only=False)
            self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        except OSError as exc:
            raise StorageError(f"cannot open {what} {self.path}: {describe_link_error(exc)}", exc) from None
        try:
            with self._flocked():
                self.repaired = self._repair() if self._regular else 0
        except OSError as exc:
            os.close(self._fd)
            raise StorageError(f"cannot repair the partial last line of {what} {self.path}: "
                               f"{exc.strerror or exc}", exc) from None

    @contextlib.contextmanager
    def _flocked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _repair(self) -> int:
        """Set aside a partial last line; the bytes set aside (0 when the file was whole)."""
        size = os.fstat(self._fd).st_size
        if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
            return 0
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - _CHUNK)
            chunk = os.pread(self._fd, end - start, start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        partial = os.pread(self._fd, size - keep, keep)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.partial-{stamp}-{os.getpid()}")
        write_atomic(aside, partial, mode=0o600, sync_dir=True)
        os.ftruncate(self._fd, keep)
        os.fsync(self._fd)
        log.warning("[%s] %s ended in a partial line (%d bytes, from an interrupted write): set aside in %s",
                    self.what, self.path, len(partial), aside)
        return len(partial)

    def append(self, text: str) -> None:
        """Append `text` (whole lines); all of it or, on an error, none of it."""
        data = text.encode("utf-8")
        if not data.endswith(b"\n"):
            raise ValueError("append whole lines")
        with self._lock, self._flocked():
            before = os.fstat(self._fd).st_size if self._regular else -1
            try:
                view = memoryview(data)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
                if self.sync and self._regular:
                    os.fsync(self._fd)
            except OSError as exc:
                self._cut_back(before)
                raise StorageError(f"cannot append to {self.what} {self.path}: {exc.strerror or exc}", exc) from None

    def _cut_back(self, length: int) -> None:
        if length < 0:  # not a regular file: nothing to cut
            return
        try:
            os.ftruncate(self._fd, length)
            os.fsync(self._fd)
        except OSError as exc:  # the next open repairs it (sets the partial line aside)
            log.error("[%s] cannot cut %s back after a failed append: %s", self.what, self.path, exc)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def complete_lines(path: Path, what: str = "file") -> Iterator[str]:
    """The complete lines of a JSON-lines file; a partial last line is skipped with a warning."""
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    if tail.strip():
        log.warning("[%s] %s ends in a partial line (%d bytes, an interrupted write): skipped", what, path, len(tail))
    for line in lines:
        if line.strip():
            yield line.decode("utf-8", errors="replace")
