"""tops-job: a proof-of-compute batch worker (spec tops-receipt/1).

The names in `__all__` are the public API: what plugins and other programs import. Everything
else is internal and may move between releases. They are loaded on first use, so that
`import tops_job` (every plugin does it for `hookimpl`) stays cheap.
"""

from __future__ import annotations

import os

# OpenBLAS workers spin for about 0.1 s after each GEMM by default; the attempt loop follows
# every product with threaded input generation and hashing, which the spinning slows by
# half. Sleeping at once costs the next GEMM microseconds. Only effective before NumPy loads
# OpenBLAS, and an operator's own setting wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import importlib
from typing import TYPE_CHECKING, Any

# name -> module that defines it
_PUBLIC = {
    # errors and exit codes
    "ConfigError": "tops_job.errors", "DeviceError": "tops_job.errors", "ErrorClass": "tops_job.errors",
    "ExitCode": "tops_job.errors", "ReceiptInvalid": "tops_job.errors", "SignatureError": "tops_job.errors",
    "StorageError": "tops_job.errors", "TopsJobError": "tops_job.errors",
    # settings
    "Config": "tops_job.config",
    # the protocol: signing, identity, verification
    "Signer": "tops_job.spec.signing", "LocalKeySigner": "tops_job.spec.signing",
    "recover_public_key": "tops_job.spec.signing", "recoverable_from_rs": "tops_job.spec.signing",
    "is_low_s": "tops_job.spec.signing", "HALF_ORDER": "tops_job.spec.signing",
    "default_did": "tops_job.spec.identity", "eth_address": "tops_job.spec.identity",
    "verify_receipt": "tops_job.spec.verify",
    # plugin-facing types
    "Profile": "tops_job.compute.autotune", "ProfileCache": "tops_job.compute.autotune",
    "profile_from_json": "tops_job.compute.autotune",
    "Submitter": "tops_job.delivery.outcomes", "SubmitResult": "tops_job.delivery.outcomes",
    "Outcome": "tops_job.delivery.outcomes",
    "OutboxBackend": "tops_job.delivery.backend", "ReceiptStore": "tops_job.delivery.backend",
    "ExchangeStore": "tops_job.delivery.backend", "LocalOutbox": "tops_job.delivery.backend",
    "parse_entry": "tops_job.delivery.backend", "AWAITING_CHALLENGE": "tops_job.delivery.backend",
    "CHALLENGED": "tops_job.delivery.backend", "AWAITING_VERDICT": "tops_job.delivery.backend",
    "digest_of_any": "tops_job.spec.any_receipt", "receipt_line": "tops_job.spec.canonical",
    "Reporter": "tops_job.observability.events", "RunInfo": "tops_job.observability.events",
    "AttemptEvent": "tops_job.observability.events", "ReceiptEvent": "tops_job.observability.events",
}

__all__ = ["__version__", "hookimpl", *_PUBLIC]

if TYPE_CHECKING:
    import pluggy

    __version__: str
    hookimpl: pluggy.HookimplMarker
    from tops_job.compute.autotune import Profile, ProfileCache, profile_from_json
    from tops_job.config import Config
    from tops_job.delivery.backend import (
        AWAITING_CHALLENGE,
        AWAITING_VERDICT,
        CHALLENGED,
        ExchangeStore,
        LocalOutbox,
        OutboxBackend,
        ReceiptStore,
        parse_entry,
    )
    from tops_job.delivery.outcomes import Outcome, SubmitResult, Submitter
    from tops_job.errors import (
        ConfigError,
        DeviceError,
        ErrorClass,
        ExitCode,
        ReceiptInvalid,
        SignatureError,
        StorageError,
        TopsJobError,
    )
    from tops_job.observability.events import AttemptEvent, ReceiptEvent, Reporter, RunInfo
    from tops_job.spec.any_receipt import digest_of_any
    from tops_job.spec.canonical import receipt_line
    from tops_job.spec.identity import default_did, eth_address
    from tops_job.spec.signing import HALF_ORDER, LocalKeySigner, Signer, is_low_s, recover_public_key, recoverable_from_rs
    from tops_job.spec.verify import verify_receipt


def _version() -> str:
    # importlib.metadata costs tens of milliseconds: looked up on first use, so the CLI's
    # signal handlers go in before it (tops_job/job/stop.py).
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tops-job")
    except PackageNotFoundError:  # running from a source tree that was not installed
        return "0.0.0+source"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        globals()["__version__"] = value = _version()
        return value
    if name == "hookimpl":  # pluggy (and inspect) cost ~10 ms: also loaded on first use
        import pluggy

        globals()["hookimpl"] = marker = pluggy.HookimplMarker("tops_job")
        return marker
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'tops_job' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
