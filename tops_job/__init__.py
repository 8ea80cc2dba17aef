"""tops-job: a proof-of-compute batch worker (spec tops-receipt/1)."""

from __future__ import annotations

import os

# OpenBLAS workers spin for about 0.1 s after each GEMM by default; the attempt loop follows
# every product with threaded input generation and hashing, which the spinning slows by
# half. Sleeping at once costs the next GEMM microseconds. Only effective before NumPy loads
# OpenBLAS, and an operator's own setting wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from importlib.metadata import PackageNotFoundError, version

import pluggy

try:
    __version__ = version("tops-job")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

hookimpl = pluggy.HookimplMarker("tops_job")

__all__ = ["__version__", "hookimpl"]
