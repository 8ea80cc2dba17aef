"""The reference aggregator over real HTTP (spec §9)."""

from __future__ import annotations

import json
import sqlite3

import coincurve
import pytest
import requests

from tests.support import TEST_KEY as KEY
from tests.support import VECTORS_DIR
from tests.support.peers import Aggregator
from tops_job.compute.base import Shape
from tops_job.compute.numpy_backend import NumpyBackend
from tops_job.job.attempt import Identity, run_attempt
from tops_job.spec.canonical import digest_of
from tops_job.spec.signing import LocalKeySigner


def _lines(name):
    return [json.loads(line) for line in (VECTORS_DIR / name).read_text().splitlines() if line.strip()]


def _post(base, receipt, **kw):
    data = receipt if isinstance(receipt, (bytes, str)) else json.dumps(receipt)
    headers = kw.pop("headers", {"Content-Type": "application/json"})
    return requests.post(f"{base}/verify", data=data, headers=headers, timeout=30, **kw)


def _count(db):
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]
    finally:
        conn.close()


def _resign(receipt, **changes):
    """A receipt with changed body fields, signed again with the spec's test key."""
    body = {k: v for k, v in receipt.items() if k not in ("openings", "sig")}
    body.update(changes)
    signer = LocalKeySigner(bytes.fromhex(KEY["secret_key_hex"]))
    return dict(body, openings=receipt["openings"], sig=signer.sign_digest(digest_of(body)).hex())


def test_health(server):
    answer = requests.get(f"{server.base}/health", timeout=5)
    assert answer.status_code == 200 and answer.json()["status"] == "healthy"


def test_valid_vector_is_accepted_once_then_duplicate_then_replay_is_409(server):
    receipt = _lines("valid.jsonl")[0]
    before = _count(server.db)
    first = _post(server.base, receipt)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body == {"ok": True, "sig_ok": True, "proof_ok": True, "pubkey_hex": KEY["pubkey_hex"],
                    "digest_hex": digest_of(receipt).hex(), "duplicate": False}
    again = _post(server.base, receipt, headers={"Content-Type": "application/json; charset=utf-8",
                                                 "Idempotency-Key": digest_of(receipt).hex()})
    assert again.status_code == 200 and again.json()["duplicate"] is True
    replay = _post(server.base, _resign(receipt, elapsed_ns=receipt["elapsed_ns"] + 1))  # same (did, nonce)
    assert replay.status_code == 409 and replay.json()["error"] == "replayed_nonce"
    assert _count(server.db) == before + 1


@pytest.mark.parametrize("encode", [lambda t: t.encode("utf-16"), lambda t: t.encode("utf-32"),
                                    lambda t: b"\xef\xbb\xbf" + t.encode(), lambda t: t.encode()[:-2] + b"\xff}"],
                         ids=["utf-16", "utf-32", "utf-8 BOM", "invalid utf-8"])
def test_a_body_that_is_not_plain_utf8_is_400_malformed_json(server, encode):
    before = _count(server.db)
    answer = _post(server.base, encode(json.dumps(_lines("valid.jsonl")[2])))
    assert answer.status_code == 400 and answer.json()["error"] == "malformed_json", answer.text
    assert _count(server.db) == before


@pytest.mark.parametrize("index", range(22))
def test_invalid_vectors_are_422_with_a_stable_code(server, index):
    vectors = _lines("invalid.jsonl")
    if index >= len(vectors):
        pytest.skip("fewer vectors")
    answer = _post(server.base, vectors[index]["receipt"])
    assert answer.status_code == 422, (vectors[index]["reason"], answer.text)
    body = answer.json()
    assert body["ok"] is False and body["error"] and body["detail"]


def test_challenge_of_another_aggregator_is_rejected(server):
    receipt = next(r for r in _lines("valid.jsonl") if "challenge" in r)
    answer = _post(server.base, receipt)
    assert answer.status_code == 422 and answer.json()["error"] == "unknown_challenge"


@pytest.mark.parametrize("data,headers,status,code", [
    (b"{", {"Content-Type": "application/json"}, 400, "malformed_json"),
    (b"\xff\xfe\x00", {"Content-Type": "application/json"}, 400, "malformed_json"),
    (b"[" * 100_000 + b"]" * 100_000, {"Content-Type": "application/json"}, 400, "malformed_json"),
    (b'{"a": NaN}', {"Content-Type": "application/json"}, 400, "malformed_json"),
    (b'{"a": 1, "a": 2}', {"Content-Type": "application/json"}, 400, "malformed_json"),
    (b"{}", {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    (b"{}", {}, 415, "unsupported_media_type"),
    (b"[]", {"Content-Type": "application/json"}, 422, "not_an_object"),
    (b"x" * 300_000, {"Content-Type": "application/json"}, 413, "too_large"),
])
def test_bad_requests_get_final_4xx(server, data, headers, status, code):
    answer = requests.post(f"{server.base}/verify", data=data, headers=headers, timeout=30)
    assert answer.status_code == status, answer.text[:300]
    assert answer.json()["error"] == code


def test_oversize_chunked_body_is_413(server):
    def chunks():
        for _ in range(40):
            yield b"x" * 10_000

    answer = requests.post(f"{server.base}/verify", data=chunks(), headers={"Content-Type": "application/json"}, timeout=30)
    assert answer.status_code == 413


def test_wrong_methods_and_paths(server):
    assert requests.get(f"{server.base}/verify", timeout=5).status_code == 405
    assert requests.get(f"{server.base}/nope", timeout=5).status_code == 404
    assert requests.get(f"{server.base}/runs/unknown-run", timeout=5).status_code == 404
    assert requests.get(f"{server.base}/challenge", timeout=5).status_code == 400
    assert requests.get(f"{server.base}/challenge?did=has%20space", timeout=5).status_code == 400


def test_challenged_run_reports_a_rate_floor(server):
    did = KEY["did"]
    issued = requests.get(f"{server.base}/challenge", params={"did": did}, timeout=5).json()
    assert len(bytes.fromhex(issued["challenge"])) == 32 and issued["expires_ms"] > issued["issued_ms"]
    identity = Identity(did=did, signer=LocalKeySigner(bytes.fromhex(KEY["secret_key_hex"])))
    backend = NumpyBackend("float32")
    total = 0
    for attempt in range(3):
        result = run_attempt(backend, Shape(32, 32, 32), identity, run_id="rate-floor-run", attempt=attempt, tile=8,
                             opens=16, challenge=bytes.fromhex(issued["challenge"]))
        answer = _post(server.base, result.receipt)
        assert answer.status_code == 200, answer.text
        total += result.ops
    report = requests.get(f"{server.base}/runs/rate-floor-run", timeout=5).json()
    assert report["receipts"] == 3 and report["ops_total"] == total
    assert report["challenge_issued_ms"] == issued["issued_ms"]
    # The interval is measured on the step-free clock; here it agrees with the wall clock's to a few ms.
    (floor,) = report["challenges"]
    assert floor["interval_clock"] == "monotonic" and floor["interval_ms"] > 0
    assert abs(floor["interval_ms"] - (report["last_accepted_ms"] - issued["issued_ms"])) <= 50
    assert report["rate_floor_ops_per_s"] == pytest.approx(total / (floor["interval_ms"] / 1000))

    other = Identity(did="did:peaq:SOMEONE-ELSE", signer=identity.signer)  # a challenge issued to another did
    result = run_attempt(backend, Shape(32, 32, 32), other, run_id="rate-floor-run", attempt=9, tile=8,
                         opens=16, challenge=bytes.fromhex(issued["challenge"]))
    assert _post(server.base, result.receipt).json()["error"] == "unknown_challenge"


def test_allow_list_restricts_submitters(tmp_path):
    allowed = tmp_path / "allowed.txt"
    other = coincurve.PrivateKey().public_key.format(compressed=True).hex()
    allowed.write_text(f"# fleet keys\n{other}\n")
    server = Aggregator(tmp_path / "agg.sqlite3", "--allow", str(allowed))
    try:
        receipt = _lines("valid.jsonl")[1]
        answer = _post(server.base, receipt)
        assert answer.status_code == 403 and answer.json()["error"] == "pubkey_not_allowed"
    finally:
        server.stop()
    server = Aggregator(tmp_path / "agg2.sqlite3", "--allow", KEY["pubkey_hex"])
    try:
        assert _post(server.base, receipt).status_code == 200
    finally:
        server.stop()


def test_allow_list_answers_4xx_not_5xx_for_a_pubkey_of_the_wrong_type(tmp_path):
    """With --allow, the pubkey is looked up before verification: a list or an object there
    (unhashable) must still be a final 4xx, never a 500."""
    server = Aggregator(tmp_path / "agg.sqlite3", "--allow", KEY["pubkey_hex"])
    try:
        receipt = _lines("valid.jsonl")[1]
        for pubkey in ([KEY["pubkey_hex"]], {"hex": KEY["pubkey_hex"]}, 7, None):
            answer = _post(server.base, dict(receipt, pubkey=pubkey))
            assert answer.status_code in (403, 422), (pubkey, answer.status_code, answer.text)
            assert answer.json()["ok"] is False
        assert _count(server.db) == 0
    finally:
        server.stop()
