"""Logging for the CLI: human lines by default, JSON lines with TOPS_JOB_LOG_FORMAT=json."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tops_job.config import LogSettings

# The attempt the current thread works on (set by the run loop); JSON lines carry it.
current_attempt: ContextVar[int | None] = ContextVar("tops_job_attempt", default=None)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, message, logger, run id, attempt, and
    the current trace and span ids when a span is active."""

    def __init__(self, run_id: str | None = None):
        super().__init__()
        self.run_id = run_id

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "message": record.getMessage(),
            "logger": record.name,
        }
        if self.run_id:
            entry["run_id"] = self.run_id
        attempt = getattr(record, "attempt", None)
        if attempt is None:
            attempt = current_attempt.get()
        if attempt is not None:
            entry["attempt"] = int(attempt)
        try:
            from opentelemetry import trace

            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                entry["trace_id"] = format(context.trace_id, "032x")
                entry["span_id"] = format(context.span_id, "016x")
        except Exception:
            pass
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def setup_logging(settings: LogSettings, *, verbose: bool = False, run_id: str | None = None) -> None:
    root = logging.getLogger("tops_job")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    if settings.json:
        handler.setFormatter(JsonFormatter(run_id))
    else:
        # On a terminal a log line first clears the progress line (progress.py) it would join.
        handler.setFormatter(logging.Formatter(("\r\033[K" if sys.stderr.isatty() else "") + "%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def set_run_id(run_id: str) -> None:
    """Once the configuration is loaded: JSON lines from now on carry the run id."""
    for handler in logging.getLogger("tops_job").handlers:
        if isinstance(handler.formatter, JsonFormatter):
            handler.formatter.run_id = run_id
