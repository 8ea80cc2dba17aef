"""Files and directories the worker creates, safe in a directory others can write to.

Every directory the worker creates is 0700 whatever the umask (its parents too, when it has
to create them); every file it opens for writing is opened without following a symlink
(O_NOFOLLOW), so a link planted in a shared directory cannot redirect a ledger append or a
lock to someone else's file. Files replaced whole go through `atomic.write_atomic` (a temp
file and a rename, which replaces a link instead of following it).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create `path` and any missing parents with mode 0700 (mkdir's mode is masked by the
    umask, which can only take bits away from 0700). An existing directory is left as it is."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.is_dir():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIR_MODE)
        except FileExistsError:
            if not directory.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(directory)) from None
    return path


def open_no_follow(path: Path, flags: int, mode: int = PRIVATE_FILE_MODE, *, regular_only: bool = True) -> int:
    """os.open with O_NOFOLLOW and O_CLOEXEC; a symlink at `path` fails with ELOOP, and (with
    `regular_only`) a path that is not a regular file (a FIFO, a device) fails with EINVAL."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode) or regular_only and not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def describe_link_error(exc: OSError) -> str:
    """ELOOP from O_NOFOLLOW reads 'Too many levels of symbolic links'; say what it means."""
    if exc.errno == errno.ELOOP:
        return "is a symbolic link; refusing to follow it (give the file itself; for standard output, -)"
    return exc.strerror or str(exc)
