"""Error classes and exit codes.

The library raises these; only the CLI edge turns them into messages and exit codes.
The error classes keep the Rust worker's names (GPU, Network, Signature, Validation) and
add Config, so counts in the summary and metrics read the same as before.
"""

from __future__ import annotations

import enum


class ErrorClass(str, enum.Enum):
    """What kind of failure an attempt or a submission met; a label in metrics and summaries."""

    GPU = "gpu"  # the device or its driver failed (CuPy, CUDA, NVML)
    NETWORK = "network"  # the aggregator could not be reached or answered 5xx/429
    SIGNATURE = "signature"  # signing failed or a signature did not verify
    VALIDATION = "validation"  # a receipt broke the spec or the aggregator rejected it
    CONFIG = "config"  # a setting is missing or malformed
    INTERNAL = "internal"  # a bug: anything not classified above


class ExitCode(enum.IntEnum):
    """Exit status of `tops-job`; schedulers key retry policies on these (see README)."""

    OK = 0  # every receipt of the run was accepted (or verified into the local ledger)
    INTERNAL_ERROR = 1  # an unexpected error; the traceback is logged
    CONFIG_ERROR = 2  # a variable or flag is missing or malformed; retrying cannot help
    PENDING = 3  # some receipts wait in the outbox (aggregator unavailable); nothing is lost
    REJECTED = 4  # the aggregator rejected some receipts as invalid; final
    DEVICE_ERROR = 5  # the requested device is missing or failed
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


class SignatureError(TopsJobError):
    """Signing failed (a bad key, a KMS failure)."""

    error_class = ErrorClass.SIGNATURE


class NetworkError(TopsJobError):
    """The aggregator could not be reached, or answered with a transient failure."""

    error_class = ErrorClass.NETWORK


class ReceiptInvalid(TopsJobError):
    """A receipt failed spec §8. `code` is stable (the aggregator's `error` field)."""

    error_class = ErrorClass.VALIDATION

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class StorageError(TopsJobError):
    """A data directory, ledger or outbox cannot be written."""

    exit_code = ExitCode.CONFIG_ERROR
    error_class = ErrorClass.CONFIG
