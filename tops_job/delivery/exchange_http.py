"""The v2 HTTP client (docs/spec/receipt-v2.md §10): run challenges and the exchange.

One POST per call, classified, never sleeping: retries and backoff are the sender's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests

from tops_job.delivery.http_submitter import MAX_ANSWER_BYTES, ThreadSessions, _read_limited, _short
from tops_job.delivery.retry import TRANSIENT_STATUSES, parse_retry_after

log = logging.getLogger("tops_job.exchange")

FINAL_ITEM = frozenset({400, 403, 409, 410, 413, 422})


def endpoint(url: str, name: str) -> str:
    """AGGREGATOR_URL (a bare host, or its /verify) → the aggregator's /v2/<name>."""
    parts = urlsplit(url)
    base = parts.path
    if base.endswith("/verify"):
        base = base[: -len("/verify")]
    return urlunsplit(parts._replace(path=base.rstrip("/") + f"/v2/{name}", query="", fragment=""))


@dataclass
class ExchangeAnswer:
    """What one exchange POST brought back: per item, or a transient failure of the whole."""

    transient: bool
    status: int | None = None
    error: str | None = None
    retry_after: float | None = None
    commit: dict[str, Any] | None = None
    opened: list[dict[str, Any]] = field(default_factory=list)


class HttpExchange:
    name = "http-v2"

    def __init__(self, url: str, *, connect_timeout: float = 3.05, read_timeout: float = 30.0):
        self.url = endpoint(url, "exchange")
        self.challenge_url = endpoint(url, "challenge")
        self.timeout = (connect_timeout, read_timeout)
        self._sessions = ThreadSessions()
        self._session = self._sessions.get

    def run_challenge(self, did: str, pubkey: bytes) -> tuple[bytes, int] | None:
        """(challenge, expires_ms) from GET /v2/challenge, or None (logged) when there is none."""
        try:
            response = self._session().get(self.challenge_url, params={"did": did, "pubkey": pubkey.hex()},
                                           timeout=self.timeout)
            answer = response.json() if response.status_code == 200 else {}
        except (requests.exceptions.RequestException, ValueError) as exc:
            log.warning("[challenge] cannot get a run challenge from %s: %s", self.challenge_url, _short(exc))
            return None
        challenge = answer.get("challenge") if isinstance(answer, dict) else None
        expires = answer.get("expires_ms") if isinstance(answer, dict) else None
        if not (isinstance(challenge, str) and len(challenge) == 64 and type(expires) is int):
            log.warning("[challenge] %s answered %d without a run challenge", self.challenge_url, response.status_code)
            return None
        try:
            return bytes.fromhex(challenge), expires
        except ValueError:
            return None

    def exchange(self, commit: dict[str, Any] | None, opened: list[dict[str, Any]]) -> ExchangeAnswer:
        envelope: dict[str, Any] = {}
        if commit is not None:
            envelope["commit"] = commit
        if opened:
            envelope["open"] = opened
        body = json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode("ascii")
        try:
            response = self._session().post(self.url, data=body, headers={"Content-Type": "application/json"},
                                            timeout=self.timeout, allow_redirects=False, stream=True)
            try:
                content = _read_limited(response, MAX_ANSWER_BYTES)
            finally:
                response.close()
        except requests.exceptions.RequestException as exc:
            return ExchangeAnswer(True, error=f"{type(exc).__name__}: {_short(exc)}")
        try:
            answer = json.loads(content) if content else {}
        except (ValueError, RecursionError):
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        status = response.status_code
        if status != 200 or answer.get("ok") is not True:
            retry_after = parse_retry_after(response.headers.get("Retry-After")) if status in TRANSIENT_STATUSES else None
            # a whole-request 4xx means this client built a bad envelope: kept, retried later, logged
            return ExchangeAnswer(True, status=status, error=str(answer.get("error") or f"http_{status}"),
                                  retry_after=retry_after)
        items = answer.get("open", [])
        return ExchangeAnswer(False, status=status,
                              commit=answer.get("commit") if isinstance(answer.get("commit"), dict) else None,
                              opened=[item for item in items if isinstance(item, dict)] if isinstance(items, list) else [])

    def close(self) -> None:
        self._sessions.close()
