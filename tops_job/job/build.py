"""Wiring: from a Config and the plugin manager to a ready JobRun."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tops_job.appendlog import AppendLog
from tops_job.compute import create_backend
from tops_job.config import Config
from tops_job.delivery.backend import OutboxBackend
from tops_job.delivery.outcomes import Submitter
from tops_job.delivery.protocol import InlineDelivery
from tops_job.errors import ConfigError, SignatureError, StorageError
from tops_job.job.attempt import Identity
from tops_job.job.attempt_v2 import V2Attempts
from tops_job.job.device_guard import DeviceGuard
from tops_job.job.runner import JobRun, StopSignal
from tops_job.job.summary import write_summary
from tops_job.observability.events import Reporter, Reporters
from tops_job.plugins.manager import PluginManager
from tops_job.spec.canonical import receipt_line
from tops_job.spec.identity import default_did
from tops_job.spec.v2 import CHALLENGE, FIAT_SHAMIR

log = logging.getLogger("tops_job.app")

SubmitterFactory = Callable[[Config], Submitter]


def _load_failures(pm: PluginManager) -> str:
    report = getattr(pm, "load_report", None)
    return report.failures_text() if report is not None else ""


def build_identity(config: Config, pm: PluginManager, signer_name: str | None = None) -> Identity:
    """The signer the `tops_job_signer` hook chooses. A signer plugin that raises stops
    the run (never a silent fall-back to the local key); so does `signer_name`
    (--signer, TOPS_JOB_SIGNER) when the chosen signer has another name, e.g. because
    the plugin that should have answered failed to load."""
    signer = pm.hooks.signer(config=config)
    if signer is None:
        raise ConfigError("WORKER_SK_HEX", "no signer is configured: set WORKER_SK_HEX or TOPS_JOB_KEY_FILE, "
                          "or configure a signer plugin" + _load_failures(pm))
    if signer_name and getattr(signer, "name", None) != signer_name:
        raise ConfigError("TOPS_JOB_SIGNER", f"signer {signer_name!r} was asked for but {getattr(signer, 'name', '?')!r} "
                          "answered; is its plugin installed and configured?" + _load_failures(pm))
    try:
        public_key = signer.public_key
    except Exception as exc:
        raise SignatureError(f"signer {getattr(signer, 'name', '?')} cannot give its public key: {exc}") from exc
    did = config.device_did or default_did(public_key)
    return Identity(did=did, signer=signer)


def submitter_registry(pm: PluginManager) -> dict[str, tuple[SubmitterFactory, tuple[str, ...]]]:
    registry: dict[str, tuple[SubmitterFactory, tuple[str, ...]]] = {}

    def register(name: str, factory: SubmitterFactory, schemes: tuple[str, ...] = ()) -> None:
        # Installed plugins are called before the built-ins, so the first registration of a
        # name wins: a plugin can replace the built-in "http" or "ledger".
        registry.setdefault(name, (factory, tuple(schemes)))

    pm.hooks.register_submitters(register=register)
    return registry


def choose_submitter(config: Config, pm: PluginManager, name: str | None = None) -> tuple[str, SubmitterFactory]:
    """By name (TOPS_JOB_SUBMITTER), else by AGGREGATOR_URL's scheme, else the local ledger."""
    registry = submitter_registry(pm)
    if name:
        if name not in registry:
            raise ConfigError("TOPS_JOB_SUBMITTER", f"no submitter named {name!r}; available: "
                              f"{', '.join(sorted(registry))}" + _load_failures(pm))
        return name, registry[name][0]
    if config.aggregator_url:
        scheme = urlsplit(config.aggregator_url).scheme
        for candidate, (factory, schemes) in registry.items():
            if scheme in schemes:
                return candidate, factory
        raise ConfigError("AGGREGATOR_URL", f"no submitter handles {scheme!r} URLs" + _load_failures(pm))
    if "ledger" not in registry:
        raise ConfigError("TOPS_JOB_SUBMITTER", "no AGGREGATOR_URL and the ledger submitter is disabled")
    return "ledger", registry["ledger"][0]


def make_delivery_factory(config: Config, pm: PluginManager, submitter_name: str | None = None,
                          stop: StopSignal | None = None,
                          chosen: tuple[str, SubmitterFactory] | None = None):
    name, factory = chosen or choose_submitter(config, pm, submitter_name)
    outbox = pm.hooks.outbox(config=config)  # the directory, or a plugin's durable storage
    if uses_exchange(config, factory):  # tops-receipt/2 challenge mode: commit, challenge, open
        return _exchange_delivery(config, outbox, stop)
    submitter = factory(config)
    if name == "ledger":
        return lambda on_receipt: InlineDelivery(submitter, on_receipt, outbox=outbox)
    from tops_job.delivery.sender import OutboxDelivery  # network submitters: durable outbox + background sender

    return lambda on_receipt: OutboxDelivery.from_config(config, submitter, on_receipt, stop=stop,
                                                         store=outbox.receipts())


def uses_exchange(config: Config, factory: SubmitterFactory) -> bool:
    """v2 with the built-in HTTP submitter speaks the challenge mode (/v2/exchange), unless
    --no-challenge; any other sink (the local ledger, a plugin's submitter) takes
    self-contained fiat-shamir receipts."""
    from tops_job.plugins.builtins import http_submitter

    return (config.protocol == "v2" and factory is http_submitter._factory and bool(config.aggregator_url)
            and config.challenge is not False)


def _exchange_delivery(config: Config, outbox: OutboxBackend, stop: StopSignal | None):
    from tops_job.delivery.exchange import ExchangeDelivery
    from tops_job.delivery.exchange_http import HttpExchange
    from tops_job.delivery.ratelimit import TokenBucket
    from tops_job.delivery.retry import RetryPolicy

    assert config.aggregator_url
    url = config.aggregator_url
    policy = RetryPolicy(max_retries=1 << 30, base_s=config.retry_base_s, cap_s=config.retry_cap_s,
                         retry_after_cap_s=max(config.retry_cap_s, 120.0))
    return lambda on_receipt: ExchangeDelivery(
        outbox.exchanges(), HttpExchange(url, connect_timeout=config.connect_timeout,
                                                    read_timeout=max(config.read_timeout, 30.0)),
        on_receipt, policy=policy, stop=stop, workers=min(2, config.send_concurrency),
        bucket=TokenBucket(config.rate_limit_per_second))


def v2_attempts(config: Config, chosen: tuple[str, SubmitterFactory], identity: Identity,
                stop: StopSignal) -> V2Attempts | None:
    """The run's tops-receipt/2 attempts, or None for --protocol v1."""
    if config.protocol != "v2":
        return None
    from tops_job.plugins.builtins import http_submitter

    if chosen[1] is http_submitter._factory and config.aggregator_url and config.challenge is False:
        raise ConfigError("TOPS_JOB_CHALLENGE", "tops-receipt/2 needs the aggregator's run challenge; "
                          "--protocol v1 sends unchallenged receipts")
    if not uses_exchange(config, chosen[1]):
        return V2Attempts(FIAT_SHAMIR)
    from tops_job.delivery.exchange_http import HttpExchange

    assert config.aggregator_url
    client = HttpExchange(config.aggregator_url, connect_timeout=config.connect_timeout,
                          read_timeout=config.read_timeout)
    return V2Attempts(CHALLENGE, lambda: client.run_challenge(identity.did, identity.signer.public_key),
                      wait=stop.event.wait, give_up_s=max(config.drain_timeout, 5.0))


def challenge_source(config: Config, did: str) -> Callable[[], bytes | None] | None:
    """--challenge: with an AGGREGATOR_URL, ask it for a run challenge (spec §1) unless
    TOPS_JOB_CHALLENGE=0; an aggregator without one (404) means random nonces."""
    url = config.aggregator_url
    if not url or config.challenge is False:
        return None
    from tops_job.delivery.http_submitter import fetch_challenge

    return lambda: fetch_challenge(url, did, timeout=(config.connect_timeout, config.read_timeout))


def collect_reporters(config: Config, pm: PluginManager) -> Reporters:
    reporters: list[Reporter] = []
    pm.hooks.register_reporters(register=reporters.append, config=config)
    return Reporters(reporters)


class ReceiptsFile:
    """--receipts-out: every signed receipt as a JSON line, written whole or not at all
    (the receipt itself is already safe in the outbox or ledger when this is called).
    `-` is standard output (a path is never opened through a symlink, /dev/stdout is one)."""

    def __init__(self, path: Path):
        self._log = AppendLog(path, what="--receipts-out", sync=False) if str(path) != "-" else None
        self._lock = threading.Lock()

    def __call__(self, receipt: dict[str, Any]) -> None:
        line = receipt_line(receipt) + "\n"
        if self._log is not None:
            return self._log.append(line)
        with self._lock:
            try:
                sys.stdout.write(line)
                sys.stdout.flush()
            except OSError as exc:
                raise StorageError(f"cannot write --receipts-out to standard output: {exc.strerror or exc}", exc) from None

    def close(self) -> None:
        if self._log is not None:
            self._log.close()


def build_job(config: Config, pm: PluginManager, *, stop: StopSignal,
              receipt_sinks: list[Callable[[dict[str, Any]], None]], submitter_name: str | None = None,
              signer_name: str | None = None) -> JobRun:
    identity = build_identity(config, pm, signer_name)
    backend = create_backend(config.backend, config.dtype, strict_device=config.strict_device)
    profile_store = pm.hooks.profile_store(config=config)
    if profile_store is None and not config.size:
        raise ConfigError("TOPS_JOB_SIZE", "no profile store plugin answered (blocked?): give --size or enable one"
                          + _load_failures(pm))
    reporters = collect_reporters(config, pm)
    # One count of plugin trouble for the summary's `plugin_failures`: plugins that failed
    # to load ("name.load"), hooks that raised ("name.hook"), reporter calls (reporter name).
    failures = pm.hook_failures
    for name in pm.load_report.failed:
        failures[f"{name}.load"] = 1
    failures.update(reporters.failures)
    reporters.failures = failures

    def run_finished(summary: dict[str, Any]) -> None:
        before = sum(failures.values())
        pm.hooks.run_finished(summary=summary, config=config)
        summary["plugin_failures"] = dict(failures)
        if sum(failures.values()) != before:  # keep the written summary in step with the count
            write_summary(summary, config.summary)

    chosen = choose_submitter(config, pm, submitter_name)  # once: a failing hook is counted once
    return JobRun(config, backend=backend, identity=identity,
                  make_delivery=make_delivery_factory(config, pm, submitter_name, stop, chosen), reporters=reporters,
                  profile_store=profile_store, stop=stop, receipt_sinks=receipt_sinks, run_finished=run_finished,
                  challenge=challenge_source(config, identity.did),
                  guard=DeviceGuard(backend, selftest=config.selftest, audit_every=config.audit_every),
                  v2=v2_attempts(config, chosen, identity, stop))

