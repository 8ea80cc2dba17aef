"""The aggregator's answers as its endpoints build them: (status, JSON body, extra headers),
turned into HTTP by AggregatorApp. One spelling of an error, and of the transient `busy`
that both /verify and /v2/exchange give when no verification slot frees in time."""

from __future__ import annotations

from typing import Any

Response = tuple[int, dict[str, Any], dict[str, str]]


def error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    return status, {"ok": False, "error": code, "detail": detail}, headers or {}


def busy() -> Response:
    """503 with Retry-After: a resource answer, never a verdict (a worker keeps the receipt)."""
    return error(503, "busy", "every verification slot is taken; retry later", {"Retry-After": "1"})
