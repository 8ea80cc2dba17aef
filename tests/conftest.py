"""Every test runs in an isolated environment: its own data, cache and config directories,
and none of the caller's tops-job settings. Shared helpers live in tests/support."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

# Variables that would leak the developer's or CI's settings into a test.
_ISOLATED_PREFIXES = ("TOPS_JOB_", "OTEL_")
_ISOLATED = ("WORKER_SK_HEX", "AGGREGATOR_URL", "DEVICE_DID", "METRICS_ENABLED", "WORKER_DEBUG_RECEIPT",
             "AUTOTUNE_TARGET_MS", "MAX_RETRIES", "RATE_LIMIT_PER_SECOND")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Every test gets its own data, cache and config directories and none of the
    caller's tops-job settings."""
    for name in list(os.environ):
        if name.startswith(_ISOLATED_PREFIXES) or name in _ISOLATED:
            monkeypatch.delenv(name, raising=False)
    dirs = {name: tmp_path / name for name in ("data", "cache", "config")}
    monkeypatch.setenv("TOPS_JOB_DATA_DIR", str(dirs["data"]))
    monkeypatch.setenv("TOPS_JOB_CACHE_DIR", str(dirs["cache"]))
    monkeypatch.setenv("TOPS_JOB_CONFIG_DIR", str(dirs["config"]))
    yield dirs
    # An in-process CLI run points the tops_job logger at its own stderr handler and stops
    # propagation; undo that so the next test's caplog sees records again.
    logger = logging.getLogger("tops_job")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
