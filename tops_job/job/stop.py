"""Stopping a run on SIGTERM/SIGINT, with the handlers in place before anything slow.

A scheduler may send TERM a fraction of a second after it starts the process (a preempted
pod, `scancel` of a task that has just begun). The default action would kill the worker with
no summary, so `tops-job run` (and `outbox send`) install the handlers as the first thing
the program does, before click, NumPy or the plugins are imported: `install_early` is
called from the top of cli.py when it runs as the program. The run then takes over the
same StopSignal, so a signal that arrived during start-up is already recorded.

This module imports only os, signal and threading (logging is imported when a signal comes).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

# The commands that stop cleanly on a signal (drain, summary, exit 130/143).
_STOPPABLE = (("run",), ("outbox", "send"))
_EXIT_ON_SECOND_INT = 130  # ExitCode.INTERRUPTED (errors.py is not imported here: it pulls in the spec)


class StopSignal:
    """Set by a signal handler: no new attempt starts, and sleeps wake at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason: str | None = None  # "SIGTERM", "SIGINT"

    def stop(self, reason: str) -> None:
        self.reason = self.reason or reason
        self.event.set()

    @property
    def stopped(self) -> bool:
        return self.event.is_set()


_early: StopSignal | None = None


def install_stop_handlers(stop: StopSignal) -> dict[int, Any]:
    """TERM and INT stop new attempts; a second INT exits at once (the outbox is durable).
    Returns the handlers they replace."""

    def on_signal(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if stop.stopped and signum == signal.SIGINT:
            os._exit(_EXIT_ON_SECOND_INT)
        import logging

        logging.getLogger("tops_job.run").warning("[run] %s received: finishing the current attempt, then stopping",
                                                  name)
        stop.stop(name)

    return {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}


def install_early(argv: list[str]) -> None:
    """At program start: when `argv` is a command that stops cleanly, handle TERM/INT now."""
    global _early
    words = [word for word in argv if not word.startswith("-")]
    if any(tuple(words[:len(command)]) == command for command in _STOPPABLE):
        _early = StopSignal()
        install_stop_handlers(_early)


def early_stop_signal() -> StopSignal | None:
    """The StopSignal the program-start handlers set, if they were installed."""
    return _early
