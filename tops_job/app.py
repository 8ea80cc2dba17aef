"""Wiring: from a Config and the plugin manager to a ready JobRun."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import pluggy

from .attempt import Identity
from .backends import create_backend
from .canonical import receipt_line
from .config import Config
from .delivery import InlineDelivery
from .errors import ConfigError, SignatureError, StorageError
from .keys import default_did
from .reporting import Reporter, Reporters
from .runner import JobRun, StopSignal
from .submission import Submitter

log = logging.getLogger("tops_job.app")

SubmitterFactory = Callable[[Config], Submitter]


def build_identity(config: Config, pm: pluggy.PluginManager) -> Identity:
    signer = pm.hook.tops_job_signer(config=config)
    if signer is None:
        raise ConfigError("WORKER_SK_HEX", "no signer is configured: set WORKER_SK_HEX or TOPS_JOB_KEY_FILE, or configure a signer plugin")
    try:
        public_key = signer.public_key
    except Exception as exc:
        raise SignatureError(f"signer {getattr(signer, 'name', '?')} cannot give its public key: {exc}") from exc
    did = config.device_did or default_did(public_key)
    return Identity(did=did, signer=signer)


def submitter_registry(pm: pluggy.PluginManager) -> dict[str, tuple[SubmitterFactory, tuple[str, ...]]]:
    registry: dict[str, tuple[SubmitterFactory, tuple[str, ...]]] = {}

    def register(name: str, factory: SubmitterFactory, schemes: tuple[str, ...] = ()) -> None:
        registry[name] = (factory, tuple(schemes))

    pm.hook.tops_job_register_submitters(register=register)
    return registry


def choose_submitter(config: Config, pm: pluggy.PluginManager, name: str | None = None) -> tuple[str, SubmitterFactory]:
    """By name (TOPS_JOB_SUBMITTER), else by AGGREGATOR_URL's scheme, else the local ledger."""
    registry = submitter_registry(pm)
    if name:
        if name not in registry:
            raise ConfigError("TOPS_JOB_SUBMITTER", f"no submitter named {name!r}; available: {', '.join(sorted(registry))}")
        return name, registry[name][0]
    if config.aggregator_url:
        scheme = urlsplit(config.aggregator_url).scheme
        for candidate, (factory, schemes) in registry.items():
            if scheme in schemes:
                return candidate, factory
        raise ConfigError("AGGREGATOR_URL", f"no submitter handles {scheme!r} URLs")
    if "ledger" not in registry:
        raise ConfigError("TOPS_JOB_SUBMITTER", "no AGGREGATOR_URL and the ledger submitter is disabled")
    return "ledger", registry["ledger"][0]


def make_delivery_factory(config: Config, pm: pluggy.PluginManager, submitter_name: str | None = None):
    name, factory = choose_submitter(config, pm, submitter_name)
    submitter = factory(config)
    if name == "ledger":
        return lambda on_receipt: InlineDelivery(submitter, on_receipt)
    from .sender import OutboxDelivery  # network submitters: durable outbox + background sender

    return lambda on_receipt: OutboxDelivery.from_config(config, submitter, on_receipt)


def collect_reporters(config: Config, pm: pluggy.PluginManager) -> Reporters:
    reporters: list[Reporter] = []
    pm.hook.tops_job_register_reporters(register=reporters.append, config=config)
    return Reporters(reporters)


class ReceiptsFile:
    """--receipts-out: every signed receipt as a JSON line, flushed as it is written."""

    def __init__(self, path: Path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(path, "a", encoding="ascii")
        except OSError as exc:
            raise StorageError(f"cannot open --receipts-out {path}: {exc.strerror or exc}") from None
        self._lock = threading.Lock()

    def __call__(self, receipt: dict[str, Any]) -> None:
        with self._lock:
            self._handle.write(receipt_line(receipt) + "\n")
            self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def build_job(config: Config, pm: pluggy.PluginManager, *, stop: StopSignal,
              receipt_sinks: list[Callable[[dict[str, Any]], None]], submitter_name: str | None = None) -> JobRun:
    identity = build_identity(config, pm)
    backend = create_backend(config.backend, config.dtype)
    profile_store = pm.hook.tops_job_profile_store(config=config)
    reporters = collect_reporters(config, pm)

    def run_finished(summary: dict[str, Any]) -> None:
        try:
            pm.hook.tops_job_run_finished(summary=summary, config=config)
        except Exception as exc:
            log.warning("a tops_job_run_finished hook failed: %s", exc)
            summary.setdefault("plugin_failures", {})["tops_job_run_finished"] = 1

    return JobRun(config, backend=backend, identity=identity,
                  make_delivery=make_delivery_factory(config, pm, submitter_name), reporters=reporters,
                  profile_store=profile_store, stop=stop, receipt_sinks=receipt_sinks, run_finished=run_finished)


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True)
