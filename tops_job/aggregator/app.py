"""The aggregator's WSGI application (spec §9).

POST /verify       full §8 verification (tops_job.spec.verify, the library `tops-job verify` uses),
                   then policy: allow list, known challenge, duplicate, replay
GET  /challenge    ?did=… a run challenge, remembered with the time it was issued
GET  /runs/<id>    accepted receipts, total ops, and the rate floor of challenged runs
GET  /health       liveness and the number of receipts held

Before any verification work: stored strings are length-capped, the receipt's cost is read
from its header and capped, and a resend of an accepted receipt is answered from the store.
Verifications run at most `gate.slots` at once on a worker's threads, besides the one its poll
thread may run when the cost is under the gate's inline cost (guard.py, serve.py).

Of an accepted v1 receipt the store keeps its claim: the signed body and `sig`, without the
openings (`keep_openings` keeps the body as sent). The openings are the evidence for this
verification and nearly all of a receipt's bytes (99 % of a 93 KB one, whose claim is 622
bytes); writing them grew the database by every body and cost the server more CPU than any
step but the verification (benchmarks/RESULTS.md). tops-receipt/2 never stored its opened
leaves either. The claim is enough for anyone to check later who signed what: its digest and
signature are the receipt's.

tops-receipt/2 (docs/spec/receipt-v2.md §10), in v2_exchange.py:
GET  /v2/challenge ?did=…&pubkey=… a run challenge bound to that key
POST /v2/exchange  {"commit": …, "open": [...]}: record a commitment, then draw its leaves;
                   judge opened sets
GET  /v2/runs/<id>, /v2/keys/<pubkey>   accepted, abandoned, ops and the rate floor

`accept` says which schemas are taken: "v2" (default), "v1" or "both".

Bad input never gets a 5xx: every failure of the request is a 4xx with a stable `error`
code. The only 5xx is 503 (with Retry-After) when the database itself fails or the
process is out of verification slots or memory.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from tops_job.aggregator import guard
from tops_job.aggregator.answers import Response, busy
from tops_job.aggregator.answers import error as _error
from tops_job.aggregator.events import Events
from tops_job.aggregator.migrations import StorageUnavailable
from tops_job.aggregator.store import ACCEPTED, DUPLICATE, Store, TooManyChallenges
from tops_job.aggregator.v2_exchange import V2Endpoints
from tops_job.aggregator.v2_store import V2Store
from tops_job.errors import ReceiptInvalid
from tops_job.spec.canonical import digest_of, receipt_line
from tops_job.spec.receipt import DEFAULT_MIN_OPENS, parse_json
from tops_job.spec.verify import verify_receipt

log = logging.getLogger("tops_job.aggregator")

DEFAULT_MAX_BODY = 4 * 1024 * 1024
CHALLENGE_TTL_MS = 24 * 3600 * 1000
_RUN_PATH = re.compile(r"/runs/([A-Za-z0-9._-]{1,64})")
_V2_RUN_PATH = re.compile(r"/v2/runs/([^/]{1,128})")
_V2_KEY_PATH = re.compile(r"/v2/keys/([^/]{1,128})")
ACCEPT_CHOICES = ("v1", "v2", "both")
_DID = re.compile(r"[\x21-\x7e]{1,256}")

REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           409: "Conflict", 410: "Gone", 411: "Length Required", 413: "Content Too Large", 415: "Unsupported Media Type",
           422: "Unprocessable Content", 429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


def _storage_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the database failed, whichever engine."""
    return (sqlite3.Error, StorageUnavailable)


class AggregatorApp:
    def __init__(self, store: Store, *, max_body: int = DEFAULT_MAX_BODY, min_opens: int = DEFAULT_MIN_OPENS,
                 allow: set[str] | None = None, full: bool = False, clock: Callable[[], float] = time.time,
                 monotonic_ns: Callable[[], int] = time.monotonic_ns, max_cost: int = guard.DEFAULT_MAX_COST,
                 gate: guard.VerifyGate | None = None, challenge_limiter: guard.RateLimiter | None = None,
                 challenge_ttl_ms: int = CHALLENGE_TTL_MS, events: Events | None = None,
                 accept: str = "v2", v2: V2Endpoints | None = None, keep_openings: bool = False):
        if accept not in ACCEPT_CHOICES:
            raise ValueError(f"accept must be one of {ACCEPT_CHOICES}")
        self.store = store
        self.accept = accept
        self.gate = gate or guard.VerifyGate(2)
        # v2 state lives in the same database file, in its own tables
        self.events = events or Events()
        self.v2 = v2 or V2Endpoints(V2Store(store), allow=allow, clock=clock, gate=self.gate, events=self.events)
        self._column_key = secrets.token_bytes(32)  # v1 column samples: a function of the digest
        self.max_body = max_body
        self.min_opens = min_opens
        self.allow = allow
        self.full = full
        self.keep_openings = keep_openings
        self.clock = clock  # wall clock: timestamps people read
        self.monotonic_ns = monotonic_ns  # step-free clock: intervals (rate floors)
        self.clock_domain = guard.clock_domain()
        self.max_cost = max_cost
        self.challenge_limiter = challenge_limiter or guard.RateLimiter(rate=20.0, burst=100)
        self.challenge_ttl_ms = challenge_ttl_ms

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            status, body, headers = self.route(environ)
        except _storage_errors() as exc:
            log.error("database failure (%s): %s", type(exc).__name__, exc)
            status, body, headers = _error(503, "storage_unavailable", "the database failed; retry later",
                                           {"Retry-After": "1"})
        except Exception:  # a bug: logged; still a well-formed answer
            log.exception("unexpected failure handling %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            status, body, headers = _error(500, "internal_error", "unexpected server failure")
        data = json.dumps(body, separators=(",", ":")).encode("utf-8")
        start_response(f"{status} {REASONS.get(status, 'Unknown')}",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *headers.items()])
        return [data]

    def route(self, environ: dict[str, Any]) -> Response:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        if path == "/verify":
            if method != "POST":
                return _error(405, "method_not_allowed", "POST a receipt to /verify", {"Allow": "POST"})
            return self.verify(environ)
        if path.startswith("/v2/"):
            return self.route_v2(method, path, environ)
        if method not in ("GET", "HEAD"):
            if path in ("/health", "/challenge") or _RUN_PATH.fullmatch(path):
                return _error(405, "method_not_allowed", f"{path} answers GET", {"Allow": "GET"})
            return _error(404, "not_found", f"no endpoint {path}")
        if path == "/health":
            return 200, {"status": "healthy", "receipts": self.store.count(), "min_opens": self.min_opens,
                         "max_body": self.max_body, "challenges": True}, {}
        if path == "/challenge":
            return self.challenge(environ)
        match = _RUN_PATH.fullmatch(path)
        if match:
            did = _query(environ).get("did")
            report = self.store.run_report(match.group(1), did)
            if report is None and self.accept != "v1":  # a tops-receipt/2 run: its v2 report
                status, body, _ = self.v2.run(match.group(1))
                if status == 200:
                    return 200, body, {}
            if report is None:
                return _error(404, "unknown_run", "no accepted receipts for this run")
            return 200, report, {}
        return _error(404, "not_found", f"no endpoint {path}")

    # ---- POST /verify

    def route_v2(self, method: str, path: str, environ: dict[str, Any]) -> Response:
        if self.accept == "v1":
            return _error(404, "not_found", "this aggregator accepts tops-receipt/1 only (POST /verify)")
        if path == "/v2/exchange":
            if method != "POST":
                return _error(405, "method_not_allowed", "POST an exchange to /v2/exchange", {"Allow": "POST"})
            data = self._body(environ)
            if isinstance(data, tuple):
                return data
            # The same gate as /verify bounds its verification (V2Endpoints shares self.gate).
            began = time.perf_counter()
            answer = self.v2.exchange(data)
            self.events.verify_seconds(time.perf_counter() - began)
            return answer
        if method not in ("GET", "HEAD"):
            return _error(405, "method_not_allowed", f"{path} answers GET", {"Allow": "GET"})
        if path == "/v2/challenge":
            wait = self.challenge_limiter.take(str(environ.get("REMOTE_ADDR", "")))
            if wait > 0:
                return _error(429, "too_many_challenges", "this client asks for challenges too often",
                              {"Retry-After": str(max(1, int(wait + 0.999)))})
            return self.v2.challenge(_query(environ))
        match = _V2_RUN_PATH.fullmatch(path)
        if match:
            return self.v2.run(match.group(1))
        match = _V2_KEY_PATH.fullmatch(path)
        if match:
            return self.v2.key(match.group(1))
        return _error(404, "not_found", f"no endpoint {path}")

    def _body(self, environ: dict[str, Any]) -> bytes | Response:
        """The request body, or the 4xx that refuses it (media type, length, size)."""
        media = str(environ.get("CONTENT_TYPE", "")).split(";", 1)[0].strip().lower()
        if media != "application/json":
            return _error(415, "unsupported_media_type", "send the receipt as Content-Type: application/json")
        length_text = str(environ.get("CONTENT_LENGTH", "") or "").strip()
        if length_text:
            if not length_text.isdigit():
                return _error(400, "bad_content_length", "Content-Length is not a number")
            if int(length_text) > self.max_body:
                return _error(413, "too_large", f"the body is over {self.max_body} bytes")
        stream = environ.get("wsgi.input")
        try:
            data = stream.read(self.max_body + 1) if stream is not None else b""
        except (OSError, ValueError):
            return _error(400, "unreadable_body", "the request body could not be read")
        if len(data) > self.max_body:
            return _error(413, "too_large", f"the body is over {self.max_body} bytes")
        return bytes(data)

    def verify(self, environ: dict[str, Any]) -> Response:
        data = self._body(environ)
        if isinstance(data, tuple):
            return data
        try:  # UTF-8 only (RFC 8259 §8.1): json.loads would also take UTF-16/32 bytes and a BOM
            text = data.decode("utf-8")
            receipt = parse_json(text)
        except UnicodeDecodeError:
            return _error(400, "malformed_json", "the body is not UTF-8")
        except ReceiptInvalid as exc:
            return _error(400, exc.code, exc.detail)
        schema = receipt.get("schema") if isinstance(receipt, dict) else None
        if self.accept == "v2" or schema == "tops-receipt/2":
            return _error(422, "schema_not_accepted", "this aggregator takes tops-receipt/2 commitments at "
                                                      "/v2/exchange" + ("" if self.accept == "v2" else
                                                                        " and tops-receipt/1 receipts here"))
        if self.allow is not None:
            pubkey = receipt.get("pubkey") if isinstance(receipt, dict) else None
            if not isinstance(pubkey, str) or pubkey not in self.allow:  # a list or object is unhashable
                return _error(403, "pubkey_not_allowed", "this pubkey may not submit here")
        problem = guard.string_problem(receipt)
        if problem:
            return _error(422, *problem)
        # The cost from the header, capped before any work (the code v2 uses too: receipt-v2.md §8).
        cost = guard.receipt_cost(receipt, full=self.full)
        if cost is not None and cost > self.max_cost:
            return _error(422, "cost_over_cap", f"verifying this receipt generates {cost} elements (opens × k × (1 + columns));"
                          f" this aggregator verifies at most {self.max_cost}")
        # A byte-identical resend (what a worker's outbox sends) is answered from the store;
        # any other spelling of an accepted receipt is verified again and answered duplicate
        # by the store.
        sent_sha256 = hashlib.sha256(data).hexdigest()
        digest = _digest(receipt)  # None: not well formed, and verify_receipt says how
        resent = self._resend(digest, sent_sha256, text) if digest is not None else None
        if resent is not None:
            return resent
        # A challenge this aggregator never issued to this did is refused before the work
        # (the did is the signed one once verification has passed).
        challenge = receipt.get("challenge") if isinstance(receipt, dict) else None
        issued = None
        if isinstance(challenge, str):
            issued = self.store.challenge(challenge)
            if issued is None or issued["did"] != receipt.get("did"):
                self._rejected(receipt, "unknown_challenge")
                return _error(422, "unknown_challenge", "this aggregator did not issue that challenge to this did")
        token = self.gate.acquire(cost)
        if token is None:
            return busy()
        began = time.perf_counter()
        try:
            with self.events.verifying("v1"):
                verified = verify_receipt(receipt, min_opens=self.min_opens, full=self.full, rng=self._columns(digest))
        except ReceiptInvalid as exc:
            self._rejected(receipt, exc.code)
            return _error(422, exc.code, exc.detail)
        except MemoryError:  # a resource failure, not the receipt's: transient
            log.error("out of memory verifying a receipt of cost %s", cost)
            return _error(503, "out_of_memory", "the aggregator ran out of memory; retry later", {"Retry-After": "5"})
        except Exception as exc:  # input the verifier did not foresee: still a rejection, never a 5xx
            log.warning("verifier failed on a receipt (%s: %s); rejected", type(exc).__name__, exc)
            return _error(422, "unverifiable", "the receipt could not be verified")
        finally:
            self.gate.release(token)
            self.events.verify_seconds(time.perf_counter() - began)
        elapsed_ms = self._since_issue(issued) if issued is not None else None
        outcome = self.store.add_receipt(
            digest=verified.digest.hex(), did=verified.did, nonce=verified.nonce, pubkey=verified.pubkey.hex(),
            run_id=verified.run_id, attempt=verified.attempt, ops=verified.ops, started_ms=verified.started_ms,
            challenge=challenge, accepted_ms=int(self.clock() * 1000),
            receipt=text if self.keep_openings else claim_line(receipt), sent_sha256=sent_sha256,
            challenge_elapsed_ms=elapsed_ms)
        if outcome in (ACCEPTED, DUPLICATE):
            return 200, verified.response(duplicate=outcome == DUPLICATE), {}
        self._rejected(receipt, "replayed_nonce")
        return _error(409, "replayed_nonce", "this (did, nonce) was accepted with another digest")

    def _resend(self, digest: bytes, sent_sha256: str, text: str) -> Response | None:
        """The answer to a byte-for-byte resend of an accepted receipt, from the store and
        without verifying it again; None for anything else."""
        stored = self.store.stored_receipt(digest.hex())
        if stored is None:
            return None
        pubkey, kept, accepted_sha256 = stored
        # rows from before sent_sha256 kept the whole body as sent
        if accepted_sha256 != sent_sha256 and not (accepted_sha256 is None and kept == text):
            return None
        return 200, {"ok": True, "sig_ok": True, "proof_ok": True, "pubkey_hex": pubkey, "digest_hex": digest.hex(),
                     "duplicate": True}, {}

    def _since_issue(self, issued: dict[str, Any]) -> int:
        """Milliseconds from a challenge's issue to now on a clock that does not step: this
        host's CLOCK_MONOTONIC when it issued the challenge, else (another host) the wall
        clocks' difference, which a stepped clock can make non-positive (then no floor)."""
        if issued.get("issuer") == self.clock_domain and issued.get("issued_mono_ns") is not None:
            return (self.monotonic_ns() - int(issued["issued_mono_ns"])) // 1_000_000
        return int(self.clock() * 1000) - int(issued["issued_ms"])

    def _rejected(self, receipt: Any, reason: str) -> None:
        did = receipt.get("did") if isinstance(receipt, dict) else None
        if isinstance(did, str) and 0 < len(did) <= guard.MAX_STRING["did"]:
            try:
                self.store.record_rejection(did, reason, int(self.clock() * 1000))
            except _storage_errors() as exc:  # a count for the fleet view; the answer stands
                log.warning("could not record a rejection (%s): %s", type(exc).__name__, exc)

    def _columns(self, digest: bytes | None) -> random.Random | None:
        """v1 samples columns with the verifier's randomness; drawn from a key and the digest,
        the same receipt gets the same sample, so posting it again cannot re-roll the check."""
        if digest is None:
            return None  # verify_receipt rejects it before sampling
        return random.Random(hmac.new(self._column_key, digest, hashlib.sha256).digest())

    # ---- GET /challenge

    def challenge(self, environ: dict[str, Any]) -> Response:
        did = _query(environ).get("did")
        if not did or not _DID.fullmatch(did):
            return _error(400, "bad_did", "give ?did= (printable ASCII, no spaces, up to 256 characters)")
        wait = self.challenge_limiter.take(str(environ.get("REMOTE_ADDR", "")))
        if wait > 0:
            return _error(429, "too_many_challenges", "this client asks for challenges too often",
                          {"Retry-After": str(max(1, int(wait + 0.999)))})
        now_ms = int(self.clock() * 1000)
        self.events.challenges_purged(self.store.purge_challenges(now_ms))
        try:
            issued = self.store.issue_challenge(did, now_ms, self.challenge_ttl_ms, issuer=self.clock_domain,
                                                mono_ns=self.monotonic_ns())
        except TooManyChallenges:
            return _error(429, "too_many_challenges", "this did holds too many unused challenges; use one or wait",
                          {"Retry-After": "60"})
        return 200, issued, {}


def _digest(receipt: Any) -> bytes | None:
    """The receipt's signed digest, or None where its fields cannot make one."""
    try:
        return digest_of(receipt)
    except (TypeError, ValueError, AttributeError):
        return None


def claim_line(receipt: dict[str, Any]) -> str:
    """What the store keeps of an accepted v1 receipt: every field but the openings (the
    signed body and `sig`), as one JSON line."""
    return receipt_line({key: value for key, value in receipt.items() if key != "openings"})


def _query(environ: dict[str, Any]) -> dict[str, str]:
    try:
        parsed = parse_qs(str(environ.get("QUERY_STRING", "")), keep_blank_values=True, max_num_fields=20)
    except ValueError:
        return {}
    return {name: values[0] for name, values in parsed.items() if values}
