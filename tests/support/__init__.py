"""What the tests share: the repository's paths, the vectors' key, small helpers.

Launchers for real peers live beside this file: `peers` (the reference aggregator, a fault
proxy, a canned-answer server, `tops-job run` in a subprocess), `health` (a job serving its
health port), `otlp_receiver`, `net`, `gpu_emulator`."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

REPO_ROOT = Path(__file__).resolve().parents[2]
VECTORS_DIR = REPO_ROOT / "tests" / "vectors"
SPEC_DOC = REPO_ROOT / "docs" / "spec" / "receipt-v1.md"
INFRA = REPO_ROOT / "infra"
TEST_KEY: dict[str, str] = json.loads((VECTORS_DIR / "key.json").read_text())
TEST_SECRET = TEST_KEY["secret_key_hex"]
CLI = [sys.executable, "-m", "tops_job.cli"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def require_tool(name: str, install_hint: str) -> str:
    """Path of executable `name` (PATH, then beside this Python), or skip saying how to get
    it. In CI (CI=true), where scripts/test.sh installs every tool, a missing one fails."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        message = f"{name} not found; install it with: {install_hint}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI must run every test but the GPU ones)")
        pytest.skip(message)
    return found


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    """`tops-job ARGS` in this process (click's runner); exceptions propagate."""
    from tops_job.cli import cli

    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
