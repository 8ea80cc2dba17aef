"""tops-job: a proof-of-compute batch worker (spec tops-receipt/1)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import pluggy

try:
    __version__ = version("tops-job")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

hookimpl = pluggy.HookimplMarker("tops_job")

__all__ = ["__version__", "hookimpl"]
