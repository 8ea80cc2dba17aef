"""Helper processes that share the CPU commitment's work.

Hashing C's leaves is most of the commitment. hashlib releases the GIL for each leaf, but two
threads that re-take the GIL thousands of times per attempt mostly wait on each other
(measured 1.0–1.4× on two cores, bimodal). Processes have no GIL to share: C and its int32
copy live in memfd-backed shared memory, and each helper converts and hashes a band of rows
while this process does its own band.

memfd rather than /dev/shm: a container's /dev/shm is often 64 MiB, and a mapping past a
full tmpfs dies with SIGBUS; a memfd is bounded only by the memory cgroup, and the kernel
frees it when the last process using it exits, kill -9 included. The helpers are plain
`python -m tops_job.compute.host_workers` children speaking length-prefixed pickles on
their stdin/stdout: multiprocessing's spawn would re-import the caller's __main__, which a
library must not do to a script without a main guard. A helper exits at EOF on stdin, so it
never outlives this process. Where any of this is unavailable (not Linux, no /proc),
`SharedRows.create` returns None and the backend commits in-process.
"""

from __future__ import annotations

import logging
import mmap
import os
import pickle
import secrets
import signal
import struct
import subprocess
import sys
from typing import IO, Any

import numpy as np

from tops_job.errors import TopsJobError
from tops_job.spec.commitment import commit_rows, split_hashes

log = logging.getLogger("tops_job.backends")

# Below this many elements of C the helpers cost more than they save.
MIN_SHARED_ELEMENTS = 1 << 20
_HEADER = struct.Struct("<I")


_HELPER_FAILURES = (OSError, EOFError, pickle.UnpicklingError, struct.error, ValueError)


class HelperLost(TopsJobError):
    """A helper process died during a commitment; it has been replaced. The attempt is
    retried once (runner.py) before it counts as failed."""


class SharedArray:
    """A NumPy array on a memfd that helper processes open through /proc/<pid>/fd."""

    def __init__(self, shape: tuple[int, ...], dtype: Any):
        self.shape, self.dtype = shape, np.dtype(dtype)
        nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self.fd = os.memfd_create("tops-job", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, nbytes)
        self._map = mmap.mmap(self.fd, nbytes)
        self.array: np.ndarray | None = np.frombuffer(self._map, self.dtype).reshape(shape)
        # A token, not the path, names the buffer for the helpers: fd numbers are reused.
        self.spec = (secrets.token_hex(8), f"/proc/{os.getpid()}/fd/{self.fd}", shape, self.dtype.str)

    def close(self) -> None:
        self.array = None
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere; the kernel frees it at exit
            pass
        os.close(self.fd)


def _send(stream: IO[bytes], message: Any) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("helper stream closed")
    return pickle.loads(stream.read(_HEADER.unpack(header)[0]))


class Helper:
    """One helper process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, start_new_session=False)

    def request(self, *message: Any) -> None:
        assert self.proc.stdin is not None  # Popen(stdin=PIPE)
        _send(self.proc.stdin, message)

    def reply(self) -> Any:
        assert self.proc.stdout is not None  # Popen(stdout=PIPE)
        status, value = _receive(self.proc.stdout)
        if status != "ok":
            raise RuntimeError(f"helper process failed: {value}")
        return value

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except Exception:
            self.proc.kill()

    def kill(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class SharedRows:
    """C and its int32 copy in shared memory, committed by this process and its helpers,
    each a band of rows."""

    def __init__(self, product: SharedArray, scratch: SharedArray, helpers: list[Helper]):
        self.product, self.scratch, self.helpers = product, scratch, helpers
        self._attached = False  # the helpers' "attach" replies are read at the first commit
        self._broken = False  # a helper's stream is out of step: replace them all before the next commit

    @classmethod
    def create(cls, shape: tuple[int, int], dtype: Any, helpers: list[Helper] | int) -> SharedRows | None:
        """Buffers for `shape` shared with `helpers` (started here when given as a count)."""
        count = helpers if isinstance(helpers, int) else len(helpers)
        if count < 1 or shape[0] * shape[1] < MIN_SHARED_ELEMENTS or not hasattr(os, "memfd_create"):
            return None
        try:
            product, scratch = SharedArray(shape, dtype), SharedArray(shape, np.int32)
            if isinstance(helpers, int):
                helpers = [Helper() for _ in range(count)]
            for helper in helpers:  # they start and map the buffers while the inputs and product run
                helper.request("attach", product.spec, scratch.spec)
        except Exception as exc:  # no memfd, no /proc, no processes: commit in-process instead
            log.info("[backend] committing in one process (helper processes unavailable: %s)", exc)
            return None
        return cls(product, scratch, helpers)

    def commit(self, tile: int) -> list[bytes]:
        """The leaf hashes of C. A helper found dead (kill -9, the OOM killer) before the
        commit is replaced first; one that dies during it is replaced too, and HelperLost
        tells the caller to retry the attempt."""
        try:
            if self._broken or any(helper.proc.poll() is not None for helper in self.helpers):
                self._restart_helpers("a commitment helper process had exited")
            return self._commit(tile)
        except _HELPER_FAILURES as exc:
            try:
                self._restart_helpers(f"a commitment helper process failed ({type(exc).__name__}: {exc})")
            except _HELPER_FAILURES:  # one died again at once: the next commitment tries again
                self._broken = True
            raise HelperLost(f"a commitment helper process died during the commitment ({type(exc).__name__}); "
                             "it was replaced") from None

    def _restart_helpers(self, why: str) -> None:
        """Replace every helper (a live one may be mid-reply: its stream is out of step) and
        attach the new ones to the current buffers. In place: the backend holds this list."""
        log.warning("[backend] %s: starting %d new helper processes", why, len(self.helpers))
        for helper in self.helpers:
            helper.kill()
        self.helpers[:] = [Helper() for _ in self.helpers]
        for helper in self.helpers:
            helper.request("attach", self.product.spec, self.scratch.spec)
        for helper in self.helpers:
            helper.reply()
        self._attached = True
        self._broken = False

    def _commit(self, tile: int) -> list[bytes]:
        if not self._attached:
            for helper in self.helpers:
                helper.reply()
            self._attached = True
        rows = self.product.shape[0]
        bounds = np.linspace(0, rows, len(self.helpers) + 2).astype(int).tolist()
        bands = list(zip(bounds[:-1], bounds[1:]))
        for helper, (lo, hi) in zip(self.helpers, bands[1:]):
            helper.request("commit", self.product.spec, self.scratch.spec, lo, hi, tile)
        assert self.product.array is not None and self.scratch.array is not None, "released"
        mine = commit_rows(self.product.array, self.scratch.array, bands[0][0], bands[0][1], tile)
        return split_hashes(mine + b"".join(helper.reply() for helper in self.helpers))

    def release(self) -> None:
        """Free the buffers; the helpers stay for the next shape."""
        if not self._attached:  # keep each helper's replies in step with its requests
            try:
                for helper in self.helpers:
                    helper.reply()
            except _HELPER_FAILURES:  # a dead helper: the next buffers' commit replaces them
                for helper in self.helpers:
                    helper.kill()
            self._attached = True
        self.product.close()
        self.scratch.close()


def close_helpers(helpers: list[Helper]) -> None:
    for helper in helpers:
        helper.close()


# ---- in a helper process ----

_attached: dict[str, np.ndarray] = {}  # token -> array, the parent's current buffers only


def _attach(spec: tuple, keep: set[str]) -> np.ndarray:
    token, path, shape, dtype = spec
    for old in set(_attached) - keep:  # the parent moved to new buffers: unmap the old ones
        del _attached[old]
    if token not in _attached:
        fd = os.open(path, os.O_RDWR)
        try:
            mapping = mmap.mmap(fd, int(np.prod(shape)) * np.dtype(dtype).itemsize)
        finally:
            os.close(fd)
        _attached[token] = np.frombuffer(mapping, np.dtype(dtype)).reshape(shape)
    return _attached[token]


def _handle(kind: str, product_spec: tuple, scratch_spec: tuple, *band: int) -> Any:
    keep = {product_spec[0], scratch_spec[0]}
    product, scratch = _attach(product_spec, keep), _attach(scratch_spec, keep)
    if kind == "attach":
        return None
    lo, hi, tile = band
    return commit_rows(product, scratch, lo, hi, tile)


def main() -> None:
    # The parent decides when to stop (TERM/INT reach the whole process group under tini -g
    # or a terminal); a helper killed mid-commit would only break the attempt in progress.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            message = _receive(stdin)
        except EOFError:
            return
        try:
            reply = ("ok", _handle(*message))
        except Exception as exc:
            reply = ("error", f"{type(exc).__name__}: {exc}")
        _send(stdout, reply)


if __name__ == "__main__":
    main()
