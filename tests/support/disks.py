"""Small real file systems for storage faults: a tmpfs of a few hundred KiB fills up for
real (ENOSPC), and remounted read-only it refuses writes and unlinks for real (EROFS)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "512k") -> Iterator[Path]:
    """A tmpfs of `size` mounted on `path` (created), unmounted afterwards; skips where this
    process may not mount (not root, or a container without CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CAP_SYS_ADMIN)")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)


def fill(path: Path, leave: int = 0) -> Path:
    """Fill the file system under `path` until at most `leave` bytes are free."""
    filler = path / "filler"
    with open(filler, "wb") as handle:
        while True:
            free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
            if free <= leave:
                break
            try:
                handle.write(b"\0" * min(65536, max(4096, free - leave)))
                handle.flush()
            except OSError:
                break
    return filler
