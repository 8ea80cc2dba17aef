"""The HTTP submitter: one POST per call, classified into an Outcome (spec §9).

It sends once and never sleeps: retries, backoff, the breaker and the rate limit live in the
sender (sender.py), which owns the outbox and the stop signal.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from tops_job import __version__
from tops_job.delivery.outcomes import Outcome, SubmitResult, confirmed
from tops_job.delivery.retry import FINAL_STATUSES, TRANSIENT_STATUSES, parse_retry_after
from tops_job.spec.canonical import receipt_line

log = logging.getLogger("tops_job.submit_http")
USER_AGENT = f"tops-job/{__version__}"


def verify_url(url: str) -> str:
    """AGGREGATOR_URL as given; a bare host (no path) means its /verify."""
    parts = urlsplit(url)
    if parts.path in ("", "/"):
        return urlunsplit(parts._replace(path="/verify"))
    return url


def sibling_url(url: str, endpoint: str) -> str:
    """The aggregator's other endpoints beside /verify: …/verify → …/challenge."""
    parts = urlsplit(verify_url(url))
    base = parts.path.rsplit("/", 1)[0]
    return urlunsplit(parts._replace(path=f"{base}/{endpoint}", query="", fragment=""))


class ThreadSessions:
    """One keep-alive session per sender thread (requests' Session is not thread-safe),
    without urllib3's own retries: the retry policy is ours. Shared by the v1 submitter and
    the v2 exchange client."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: list[requests.Session] = []
        self._lock = threading.Lock()

    def get(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(max_retries=0, pool_connections=1, pool_maxsize=1)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = USER_AGENT
            self._local.session = session
            with self._lock:
                self._all.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            sessions, self._all = self._all, []
        for session in sessions:
            session.close()


class HttpSubmitter:
    name = "http"

    def __init__(self, url: str, *, connect_timeout: float = 3.05, read_timeout: float = 10.0):
        self.url = verify_url(url)
        self.timeout = (connect_timeout, read_timeout)
        self._sessions = ThreadSessions()
        self._session = self._sessions.get

    def submit(self, receipt: dict[str, Any], digest: bytes) -> SubmitResult:
        body = receipt_line(receipt).encode("ascii")
        headers = {"Content-Type": "application/json", "Idempotency-Key": digest.hex()}
        try:
            # No redirects: a 301/302 would turn the POST into a GET; a 3xx is kept as transient.
            response = self._session().post(self.url, data=body, headers=headers, timeout=self.timeout,
                                            allow_redirects=False, stream=True)
            try:
                content = _read_limited(response, MAX_ANSWER_BYTES)
            finally:
                response.close()
        except requests.exceptions.ConnectTimeout:
            return SubmitResult(Outcome.TRANSIENT, error="connect_timeout")
        except requests.exceptions.ReadTimeout:
            return SubmitResult(Outcome.TRANSIENT, error="read_timeout")
        except requests.exceptions.ConnectionError as exc:
            return SubmitResult(Outcome.TRANSIENT, error="connection_error: " + _short(exc))
        except requests.exceptions.RequestException as exc:
            return SubmitResult(Outcome.TRANSIENT, error=f"{type(exc).__name__}: {_short(exc)}")
        return classify(response.status_code, content, response.headers.get("Retry-After"), digest)

    def close(self) -> None:
        self._sessions.close()


def classify(status: int, content: bytes, retry_after: str | None, digest: bytes) -> SubmitResult:
    try:
        answer = json.loads(content) if content else {}
    except (ValueError, RecursionError):  # RecursionError: deeply nested JSON
        answer = {}
    if not isinstance(answer, dict):
        answer = {}
    if status == 200:
        if answer.get("ok") is not True:
            return SubmitResult(Outcome.TRANSIENT, status=status, response=answer, error="bad_answer")
        if "digest_hex" in answer and answer["digest_hex"] != digest.hex():
            return SubmitResult(Outcome.TRANSIENT, status=status, response=answer, error="digest_mismatch")
        outcome = Outcome.DUPLICATE if answer.get("duplicate") is True else Outcome.ACCEPTED
        return confirmed(SubmitResult(outcome, status=status, response=answer), digest)
    error = str(answer.get("error") or f"http_{status}")
    if status in FINAL_STATUSES:
        return SubmitResult(Outcome.REJECTED, status=status, response=answer or {"status": status}, error=error)
    # 408, 429, 5xx are transient by the spec; any other answer (401/403/404 from a wrong URL
    # or an allow list) is kept too: the receipt stays in the outbox, never thrown away.
    return SubmitResult(Outcome.TRANSIENT, status=status, response=answer, error=error,
                        retry_after=parse_retry_after(retry_after) if status in TRANSIENT_STATUSES else None)


def fetch_challenge(url: str, did: str, *, timeout: tuple[float, float] = (3.05, 10.0)) -> bytes | None:
    """Ask the aggregator for a run challenge (spec §1, §9). None (with a warning) when it
    does not offer one (404) or cannot be reached: the run then uses random nonces."""
    target = sibling_url(url, "challenge")
    try:
        response = requests.get(target, params={"did": did}, timeout=timeout, headers={"User-Agent": USER_AGENT})
    except requests.exceptions.RequestException as exc:
        log.warning("[challenge] cannot reach %s (%s): using random nonces", target, _short(exc))
        return None
    if response.status_code == 404:
        log.warning("[challenge] the aggregator offers no run challenge (404): using random nonces")
        return None
    try:
        challenge = bytes.fromhex(response.json()["challenge"]) if response.status_code == 200 else b""
    except (ValueError, KeyError, TypeError, RecursionError):
        challenge = b""
    if len(challenge) != 32:
        log.warning("[challenge] %s answered %d without a 32-byte challenge: using random nonces",
                    target, response.status_code)
        return None
    log.info("[challenge] run challenge %s… from %s", challenge.hex()[:16], target)
    return challenge


MAX_ANSWER_BYTES = 1 << 20  # an answer is a small JSON object; never buffer an endless body


def _read_limited(response: requests.Response, limit: int) -> bytes:
    """The answer body, cut off after `limit` bytes (it then fails to parse: a bad answer)."""
    chunks, size = [], 0
    for chunk in response.iter_content(64 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(chunks)[: limit + 1]


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
