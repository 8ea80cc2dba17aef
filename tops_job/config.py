"""Configuration: flags, then environment, then defaults, validated once at start-up.

Every tops-job environment variable is read here (the OpenTelemetry SDK's own OTEL_* and the
schedulers' identity variables are read where telemetry builds its resource). A `Config` is
frozen: a plugin can read it, not change it. Every error names the flag or variable that is
wrong; secrets are never echoed.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import platformdirs

from tops_job.compute import BACKEND_NAMES, DTYPES
from tops_job.errors import ConfigError
from tops_job.keys import KeySource, parse_secret_hex, resolve_key
from tops_job.spec.receipt import MAX_K, MAX_OPENS

APP = "tops-job"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Config:
    attempts: int = 10
    backend: str = "auto"
    dtype: str | None = None
    size: tuple[int, int, int] | None = None
    target_ms: int = 300
    tile: int | None = None
    opens: int = 16  # tops-receipt/1 only; v2's openings are the spec's (receipt-v2.md §12)
    protocol: str = "v2"  # receipts: tops-receipt/2 (challenge mode with an aggregator) or /1
    aggregator_url: str | None = None
    device_did: str | None = None
    max_retries: int = 3
    rate_limit_per_second: float = 10.0
    metrics_enabled: bool = False
    health_port: int = 8082
    health_host: str = "0.0.0.0"  # all interfaces: Prometheus scrapes the pod/container address
    debug_receipt: bool = False
    drain_timeout: float = 30.0
    connect_timeout: float = 3.05  # delivery (README: Delivery): HTTP connect timeout, seconds
    read_timeout: float = 10.0  # HTTP read timeout, seconds
    retry_base_s: float = 0.5  # first backoff ceiling; doubles per retry, full jitter
    retry_cap_s: float = 30.0  # longest single backoff
    retry_budget: int = 50  # retries across the run (plus a fifth of first sends)
    breaker_threshold: int = 5  # consecutive failures that open the circuit breaker
    breaker_cooldown_s: float = 15.0  # open breaker: seconds before one probe
    send_concurrency: int = 4  # sender threads
    challenge: bool | None = None  # ask the aggregator for a run challenge (None: when it offers one)
    retune: bool = False
    selftest: bool = True  # known-answer test of the device before the first attempt
    audit_every: int = 10  # verify every Nth receipt (and flagged ones) on the CPU; 0: off
    strict_device: bool = False  # no host fallback when the device kernels cannot be built
    run_id: str = ""
    data_dir: Path = field(default_factory=lambda: Path(platformdirs.user_data_dir(APP)))
    cache_dir: Path = field(default_factory=lambda: Path(platformdirs.user_cache_dir(APP)))
    config_dir: Path = field(default_factory=lambda: Path(platformdirs.user_config_dir(APP)))
    ledger_path: Path | None = None
    outbox_dir: Path | None = None
    summary_path: Path | None = None
    receipts_out: Path | None = None
    metrics_textfile: Path | None = None  # final metrics for node_exporter's textfile collector
    secret: bytes | None = field(default=None, repr=False)  # WORKER_SK_HEX, parsed
    key_file: Path | None = None  # TOPS_JOB_KEY_FILE

    @cached_property
    def key(self) -> KeySource:
        """The worker's own key: WORKER_SK_HEX, else TOPS_JOB_KEY_FILE, else the one generated
        once into the config directory. Resolved on first use, so a run that signs through a
        plugin (KMS) never reads, needs or generates a local key."""
        return resolve_key(self.secret, self.key_file, self.config_dir)

    def key_if_resolved(self) -> KeySource | None:
        """The local key if something has used it (for logs and the summary), else None."""
        key = self.__dict__.get("key")
        return key if isinstance(key, KeySource) else None

    @property
    def ledger(self) -> Path:
        return self.ledger_path or self.data_dir / "ledger.jsonl"

    @property
    def outbox(self) -> Path:
        return self.outbox_dir or self.data_dir / "outbox"

    @property
    def summary(self) -> Path:
        return self.summary_path or self.data_dir / "summaries" / f"{self.run_id}.json"

    def public_dict(self) -> dict[str, Any]:
        """The configuration for the summary and logs: no secrets, paths as strings."""
        data = asdict(self)
        data.pop("secret", None)
        key = self.key_if_resolved()
        data["key_origin"] = key.origin if key else None
        for name, value in data.items():
            if isinstance(value, Path):
                data[name] = str(value)
        data["size"] = list(self.size) if self.size else None
        return data

    def describe(self, did: str, pubkey_hex: str) -> list[str]:
        """The seed worker's start-up lines, extended."""
        sink = self.aggregator_url or f"none (in-process verification, ledger {self.ledger})"
        return [
            "[config] Loaded configuration:",
            f"  - Device DID: {did}",
            f"  - Public key: {pubkey_hex} ({key.origin if (key := self.key_if_resolved()) else 'plugin signer'})",
            f"  - Aggregator URL: {sink}",
            f"  - Autotune target: {self.target_ms}ms",
            f"  - Max retries: {self.max_retries}",
            f"  - Rate limit: {self.rate_limit_per_second:g}/s",
            f"  - Backend: {self.backend}" + (f" ({self.dtype})" if self.dtype else ""),
            f"  - Attempts: {self.attempts}, run id {self.run_id}",
        ]


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


# ---- parsers: each takes (name, text) and raises ConfigError(name, …) ----

def parse_int(lo: int, hi: int) -> Callable[[str, str], int]:
    def parse(name: str, text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ConfigError(name, f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise ConfigError(name, f"{value} is outside {lo}..{hi}")
        return value
    return parse


def parse_float(lo: float, hi: float) -> Callable[[str, str], float]:
    def parse(name: str, text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ConfigError(name, f"{text!r} is not a number") from None
        if not lo < value <= hi or value != value:
            raise ConfigError(name, f"{value:g} is outside ({lo:g}, {hi:g}]")
        return value
    return parse


def parse_bool(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(name, f"{text!r} is not a boolean (use 1/0, true/false)")


def parse_choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, text: str) -> str:
        if text not in choices:
            raise ConfigError(name, f"{text!r} is not one of {', '.join(choices)}")
        return text
    return parse


def parse_size(name: str, text: str) -> tuple[int, int, int]:
    """N (a cube) or M,N,K."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(name, f"{text!r} is not N or M,N,K") from None
    if len(dims) == 1:
        dims *= 3
    if len(dims) != 3 or min(dims) < 1 or max(dims[:2]) > 1 << 20 or dims[2] > MAX_K:
        raise ConfigError(name, f"{text!r} must be N or M,N,K with positive sides (k ≤ {MAX_K})")
    return dims[0], dims[1], dims[2]


def parse_url(name: str, text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(name, f"{text!r} is not an http(s) URL with a host (e.g. http://aggregator:8081/verify)")
    return text.strip()


def parse_did(name: str, text: str) -> str:
    if not text or not all(" " < c <= "~" for c in text) or len(text) > 256:
        raise ConfigError(name, "must be printable ASCII without spaces, 1..256 characters")
    return text


def parse_run_id(name: str, text: str) -> str:
    if not _RUN_ID.fullmatch(text):
        raise ConfigError(name, "must be 1..64 characters of [A-Za-z0-9._-]")
    return text


def parse_host(name: str, text: str) -> str:
    host = text.strip()
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        raise ConfigError(name, f"{text!r} is not a host name or address (e.g. 0.0.0.0, 127.0.0.1, ::)")
    return host


def parse_path(name: str, text: str) -> Path:
    if not text.strip():
        raise ConfigError(name, "is empty")
    return Path(text).expanduser()


# field -> (environment variables in precedence order, parser)
SETTINGS: dict[str, tuple[tuple[str, ...], Callable[[str, str], Any]]] = {
    "attempts": (("TOPS_JOB_ATTEMPTS",), parse_int(1, 10_000_000)),
    "backend": (("TOPS_JOB_BACKEND",), parse_choice(BACKEND_NAMES)),
    "dtype": (("TOPS_JOB_DTYPE",), parse_choice(DTYPES)),
    "size": (("TOPS_JOB_SIZE",), parse_size),
    "target_ms": (("AUTOTUNE_TARGET_MS",), parse_int(1, 600_000)),
    "tile": (("TOPS_JOB_TILE",), parse_int(1, 1 << 20)),
    "opens": (("TOPS_JOB_OPENS",), parse_int(1, MAX_OPENS)),
    "protocol": (("TOPS_JOB_PROTOCOL",), parse_choice(("v1", "v2"))),
    "aggregator_url": (("AGGREGATOR_URL",), parse_url),
    "device_did": (("DEVICE_DID",), parse_did),
    "max_retries": (("MAX_RETRIES",), parse_int(0, 1000)),
    "rate_limit_per_second": (("RATE_LIMIT_PER_SECOND",), parse_float(0.0, 1e6)),
    "metrics_enabled": (("METRICS_ENABLED",), parse_bool),
    "health_port": (("TOPS_JOB_HEALTH_PORT",), parse_int(0, 65535)),
    "health_host": (("TOPS_JOB_HEALTH_HOST",), parse_host),
    "debug_receipt": (("WORKER_DEBUG_RECEIPT",), parse_bool),
    "drain_timeout": (("TOPS_JOB_DRAIN_TIMEOUT",), parse_float(-1e-9, 86400.0)),
    "connect_timeout": (("TOPS_JOB_CONNECT_TIMEOUT",), parse_float(0.0, 3600.0)),
    "read_timeout": (("TOPS_JOB_READ_TIMEOUT",), parse_float(0.0, 3600.0)),
    "retry_base_s": (("TOPS_JOB_RETRY_BASE",), parse_float(0.0, 3600.0)),
    "retry_cap_s": (("TOPS_JOB_RETRY_CAP",), parse_float(0.0, 86400.0)),
    "retry_budget": (("TOPS_JOB_RETRY_BUDGET",), parse_int(0, 10_000_000)),
    "breaker_threshold": (("TOPS_JOB_BREAKER_THRESHOLD",), parse_int(1, 1_000_000)),
    "breaker_cooldown_s": (("TOPS_JOB_BREAKER_COOLDOWN",), parse_float(0.0, 86400.0)),
    "send_concurrency": (("TOPS_JOB_SEND_CONCURRENCY",), parse_int(1, 64)),
    "challenge": (("TOPS_JOB_CHALLENGE",), parse_bool),
    "selftest": (("TOPS_JOB_SELFTEST",), parse_bool),
    "audit_every": (("TOPS_JOB_AUDIT_EVERY",), parse_int(0, 1_000_000)),
    "strict_device": (("TOPS_JOB_STRICT_DEVICE",), parse_bool),
    "run_id": (("TOPS_JOB_RUN_ID",), parse_run_id),
    "data_dir": (("TOPS_JOB_DATA_DIR",), parse_path),
    "cache_dir": (("TOPS_JOB_CACHE_DIR",), parse_path),
    "config_dir": (("TOPS_JOB_CONFIG_DIR",), parse_path),
    "ledger_path": (("TOPS_JOB_LEDGER",), parse_path),
    "outbox_dir": (("TOPS_JOB_OUTBOX_DIR",), parse_path),
    "summary_path": (("TOPS_JOB_SUMMARY",), parse_path),
    "receipts_out": (("TOPS_JOB_RECEIPTS_OUT",), parse_path),
    "metrics_textfile": (("TOPS_JOB_METRICS_TEXTFILE",), parse_path),
}


def load_config(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
                *, need_key: bool = True) -> Config:
    """Build the Config: a flag given on the command line (not None) wins over the
    environment, which wins over the default. Flags arrive already typed by click."""
    environ = os.environ if environ is None else environ
    flags = {name: value for name, value in (flags or {}).items() if value is not None}
    unknown = set(flags) - {f.name for f in fields(Config)}
    if unknown:
        raise TypeError(f"load_config: no settings named {sorted(unknown)}")
    values: dict[str, Any] = {}
    for name, (variables, parse) in SETTINGS.items():
        if name in flags:
            value = flags[name]
            if isinstance(value, str) and name not in ("backend", "dtype"):
                value = parse(f"--{name.replace('_', '-')}", value)
            values[name] = value
            continue
        for variable in variables:
            text = environ.get(variable)
            if text is not None and (text != "" or name in ("metrics_enabled", "debug_receipt")):
                values[name] = parse(variable, text)
                break
    values.update({name: value for name, value in flags.items() if name not in SETTINGS})
    if environ.get("WORKER_SK_HEX"):
        values["secret"] = parse_secret_hex(environ["WORKER_SK_HEX"], "WORKER_SK_HEX")
    if environ.get("TOPS_JOB_KEY_FILE"):
        values["key_file"] = parse_path("TOPS_JOB_KEY_FILE", environ["TOPS_JOB_KEY_FILE"])
    if not values.get("run_id"):
        values["run_id"] = new_run_id()
    config = Config(**values)
    if config.tile is not None and config.size and config.tile > config.size[1]:
        raise ConfigError("TOPS_JOB_TILE", f"tile {config.tile} is wider than n={config.size[1]}")
    if need_key:
        config.key  # noqa: B018  (resolve now: a bad key is a start-up error)
    return config


# ---- settings read before a Config exists (the CLI group, the plugin manager, telemetry) ----

DEFAULT_EXPORT_TIMEOUT_S = 5.0


def telemetry_export_timeout(environ: Mapping[str, str] | None = None) -> float:
    """TOPS_JOB_OTEL_EXPORT_TIMEOUT: how long the run's end may wait for the collector."""
    environ = os.environ if environ is None else environ
    text = environ.get("TOPS_JOB_OTEL_EXPORT_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_EXPORT_TIMEOUT_S
    return parse_float(0.0, 300.0)("TOPS_JOB_OTEL_EXPORT_TIMEOUT", text)

@dataclass(frozen=True)
class LogSettings:
    json: bool  # TOPS_JOB_LOG_FORMAT=json: one JSON object per line for log shippers


def log_settings(environ: Mapping[str, str] | None = None) -> LogSettings:
    environ = os.environ if environ is None else environ
    text = environ.get("TOPS_JOB_LOG_FORMAT", "text").strip().lower() or "text"
    return LogSettings(json=parse_choice(("text", "json"))("TOPS_JOB_LOG_FORMAT", text) == "json")


@dataclass(frozen=True)
class PluginSettings:
    disabled: frozenset[str]  # TOPS_JOB_DISABLE_PLUGINS
    only: frozenset[str] | None  # TOPS_JOB_LOAD_PLUGINS (None: all installed)
    trace: bool  # TOPS_JOB_TRACE_PLUGINS


def plugin_settings(environ: Mapping[str, str] | None = None) -> PluginSettings:
    environ = os.environ if environ is None else environ

    def names(text: str | None) -> frozenset[str]:
        return frozenset(name.strip() for name in (text or "").split(",") if name.strip())

    only = names(environ.get("TOPS_JOB_LOAD_PLUGINS")) if "TOPS_JOB_LOAD_PLUGINS" in environ else None
    trace = environ.get("TOPS_JOB_TRACE_PLUGINS", "").strip().lower() not in ("", "0", "false", "no", "off")
    return PluginSettings(disabled=names(environ.get("TOPS_JOB_DISABLE_PLUGINS")), only=only, trace=trace)
