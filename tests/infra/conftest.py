"""Shared helpers for the infra tests: the repository root and "find a tool or skip"."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"


def require_tool(name: str, install_hint: str) -> str:
    """Path of executable `name` (PATH, then beside this Python), or skip saying how to get it."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.skip(f"{name} not found; install it with: {install_hint}")
    return found
