"""Error classes and exit codes.

The library raises these; only the CLI edge turns them into messages and exit codes.
The error classes keep the Rust worker's names (GPU, Network, Signature, Validation) and
add Config, so counts in the summary and metrics read the same as before.
"""

from __future__ import annotations

import enum
import errno

from tops_job.spec.errors import ReceiptInvalid, SignatureError, SpecError

__all__ = ["ConfigError", "DeviceError", "ErrorClass", "ExitCode", "LIBRARY_ERRORS", "ReceiptInvalid",
           "SignatureError", "SpecError", "StorageError", "TopsJobError", "error_class_of", "exit_code_of"]


class ErrorClass(str, enum.Enum):
    """What kind of failure an attempt or a submission met; a label in metrics and summaries."""

    GPU = "gpu"  # the device or its driver failed (CuPy, CUDA, NVML)
    NETWORK = "network"  # the aggregator could not be reached or answered 5xx/429
    SIGNATURE = "signature"  # signing failed or a signature did not verify
    VALIDATION = "validation"  # a receipt broke the spec or the aggregator rejected it
    CONFIG = "config"  # a setting is missing or malformed
    STORAGE = "storage"  # a disk is full or a file cannot be written
    INTERNAL = "internal"  # a bug: anything not classified above


class ExitCode(enum.IntEnum):
    """Exit status of `tops-job`; schedulers key retry policies on these (see README)."""

    OK = 0  # every receipt of the run was accepted (or verified into the local ledger)
    INTERNAL_ERROR = 1  # an unexpected error; the traceback is logged
    CONFIG_ERROR = 2  # a variable or flag is missing or malformed; retrying cannot help
    PENDING = 3  # some receipts wait in the outbox (aggregator unavailable); nothing is lost
    REJECTED = 4  # the aggregator rejected some receipts as invalid; final
    DEVICE_ERROR = 5  # the requested device is missing or failed
    STORAGE_ERROR = 6  # a disk is full or unwritable; nothing is lost, a retry elsewhere can succeed
    INTERRUPTED = 130  # SIGINT: stopped cleanly, outbox complete, summary written
    TERMINATED = 143  # SIGTERM: stopped cleanly, outbox complete, summary written


class TopsJobError(Exception):
    """Base of every error the library raises on purpose."""

    error_class: ErrorClass = ErrorClass.INTERNAL
    exit_code: ExitCode = ExitCode.INTERNAL_ERROR


class ConfigError(TopsJobError):
    """A setting is wrong. `variable` names the flag or environment variable."""

    error_class = ErrorClass.CONFIG
    exit_code = ExitCode.CONFIG_ERROR

    def __init__(self, variable: str, problem: str):
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class DeviceError(TopsJobError):
    """The compute device is unusable (no GPU for --backend cupy, a CUDA failure)."""

    error_class = ErrorClass.GPU
    exit_code = ExitCode.DEVICE_ERROR





# A path that names something unusable (a file where a directory belongs, no permission):
# the setting is wrong and a retry on the same settings cannot help.
_PATH_ERRNOS = frozenset({errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ELOOP,
                          errno.ENAMETOOLONG, errno.EEXIST})


class StorageError(TopsJobError):
    """A data directory, ledger or outbox cannot be written. A full disk, a read-only mount
    or an I/O error is STORAGE_ERROR, which schedulers retry (another node, freed space);
    a path that cannot work as given (`errno` in _PATH_ERRNOS) is a CONFIG_ERROR."""

    exit_code = ExitCode.STORAGE_ERROR
    error_class = ErrorClass.STORAGE

    def __init__(self, message: str, os_error: OSError | None = None):
        super().__init__(message)
        self.errno = os_error.errno if os_error is not None else None
        if self.errno in _PATH_ERRNOS:
            self.exit_code = ExitCode.CONFIG_ERROR
            self.error_class = ErrorClass.CONFIG


# What the library raises on purpose; anything else is a bug (INTERNAL).
LIBRARY_ERRORS: tuple[type[Exception], ...] = (TopsJobError, SpecError)


def error_class_of(exc: BaseException) -> ErrorClass:
    """The class an error is counted under in summaries, metrics and spans."""
    if isinstance(exc, TopsJobError):
        return exc.error_class
    if isinstance(exc, ReceiptInvalid):
        return ErrorClass.VALIDATION
    if isinstance(exc, SignatureError):
        return ErrorClass.SIGNATURE
    return ErrorClass.INTERNAL


def exit_code_of(exc: BaseException) -> ExitCode:
    """The exit status a run that stops on `exc` ends with."""
    return exc.exit_code if isinstance(exc, TopsJobError) else ExitCode.INTERNAL_ERROR
