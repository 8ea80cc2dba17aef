"""The bounded end of a delivery's background threads, shared by the v1 sender
(sender.py) and the v2 exchange (exchange.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

STOP_DRAIN_S = 1.0  # after SIGTERM/SIGINT: deliver what goes through without waiting, this long


def drain(threads: Sequence[threading.Thread], cond: threading.Condition, halt: threading.Event,
          start_closing: Callable[[float], None], deadline_s: float, stop: Any) -> None:
    """Let `threads` finish their work until the deadline (STOP_DRAIN_S once a stop signal
    came), then halt them. `start_closing(deadline)` is called under `cond` to tell the owner
    it is closing and until when; a thread still inside a send is not waited for beyond its
    own timeout: what it holds stays durable for the next run."""
    stopping = stop is not None and stop.stopped
    allowed = min(deadline_s, STOP_DRAIN_S) if stopping else deadline_s
    deadline = time.monotonic() + allowed
    with cond:
        start_closing(deadline)
        cond.notify_all()
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    halt.set()
    with cond:
        cond.notify_all()
    for thread in threads:
        thread.join(timeout=0.05)
