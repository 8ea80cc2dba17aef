"""glibc heap settings for processes that take in and drop large buffers one item after
another: the aggregator's workers, `tops-job verify` over many receipts."""

from __future__ import annotations

import sys

# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 128 << 20  # free heap kept at the top before glibc returns it to the kernel
# Larger allocations get their own mapping, zeroed by the kernel at every first touch. 32 MiB
# holds the verifier's largest arrays: a tops-receipt/2 product check generates its rows in
# chunks of CHUNK_ELEMENTS float32 (8 MiB, spec/v2/product.py); mapped afresh, those cost 40 %
# of a k = 2816 opened set's verification here (benchmarks/RESULTS.md).
HEAP_ALLOCATIONS_UP_TO = 32 << 20


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for the next item instead of handing it back to the
    kernel. A receipt's body, its decoded strings and the verifier's arrays are freed after
    each one; glibc's defaults trimmed and re-mapped them, and the kernel zeroed the pages
    again on the next one's first touch: about 230 page faults and 0.5 ms of system time per
    93 KB receipt in the aggregator, and half of `tops-job verify`'s time on 300 KB receipts
    (benchmarks/RESULTS.md). Process-wide; False where the C library is not glibc (nothing
    changed)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        return False
    if mallopt is None or not sys.platform.startswith("linux"):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)) and bool(mallopt(_M_MMAP_THRESHOLD, HEAP_ALLOCATIONS_UP_TO))
