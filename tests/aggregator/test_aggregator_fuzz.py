"""10,000+ malformed or tampered receipts at the real aggregator: 0 accepted, 0 5xx."""

from __future__ import annotations

import collections
import copy
import json
import random
import sqlite3

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import VECTORS_DIR
from tops_job.spec.receipt import FIELDS

TARGET = 10_000
JSON = {"Content-Type": "application/json"}


def _lines(name):
    return [json.loads(line) for line in (VECTORS_DIR / name).read_text().splitlines() if line.strip()]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30)

field_values = st.one_of(st.integers(min_value=-5, max_value=2**60), st.text(max_size=70),
                         st.sampled_from(["tops-receipt/1", "0" * 64, "f" * 66, "a" * 130, "did:peaq:DEVICE123"]),
                         st.booleans(), st.none(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=3))
receipt_shaped = st.dictionaries(st.sampled_from(sorted(FIELDS)), field_values, min_size=10, max_size=len(FIELDS))


def _mutate(receipt: dict, rng: random.Random) -> dict:
    """1..3 random changes to a valid receipt; never returns it unchanged."""
    original = json.dumps(receipt, sort_keys=True)
    while True:
        r = copy.deepcopy(receipt)
        for _ in range(rng.randint(1, 3)):
            kind = rng.randrange(9)
            name = rng.choice(sorted(r)) if r else "x"
            if kind == 0 and r:
                del r[name]
            elif kind == 1:
                r[rng.choice(["note", "extra", "Sig", "openings2"])] = rng.choice([1, "x", None])
            elif kind == 2 and isinstance(r.get(name), int):
                r[name] = r[name] + rng.choice([-1, 1, 2**53, -r[name] - 1])
            elif kind == 3 and isinstance(r.get(name), str) and r[name]:
                text = r[name]
                i = rng.randrange(len(text))
                r[name] = text[:i] + rng.choice("0123456789abcdefABCDEF\u00e9 \"\\") + text[i + 1:]
            elif kind == 4:
                r[name] = rng.choice([None, True, 1.5, [], {}, "", -1, 2**64])
            elif kind == 5 and isinstance(r.get("openings"), list) and r["openings"]:
                opening = rng.choice(r["openings"])
                if isinstance(opening, dict):
                    leaf = opening.get("leaf")
                    opening["leaf"] = rng.choice([(leaf + 1) if isinstance(leaf, int) else 0, -1, "0", 2**40])
            elif kind == 6 and isinstance(r.get("openings"), list) and r["openings"]:
                opening = rng.choice(r["openings"])
                if isinstance(opening, dict) and isinstance(opening.get("values"), str) and opening["values"]:
                    v = opening["values"]
                    i = rng.randrange(len(v))
                    # Any change, a pad-bit-only one too: the verifier takes canonical base64 only.
                    opening["values"] = v[:i] + rng.choice("AQgw+/=") + v[i + 1:]
            elif kind == 7 and isinstance(r.get("openings"), list) and r["openings"]:
                opening = rng.choice(r["openings"])
                if isinstance(opening, dict) and opening.get("path"):
                    opening["path"][rng.randrange(len(opening["path"]))] = f"{rng.getrandbits(256):064x}"
            elif kind == 8 and isinstance(r.get("openings"), list):
                rng.shuffle(r["openings"]) if rng.random() < 0.5 else r["openings"].pop()
        if json.dumps(r, sort_keys=True) != original:
            return r


def test_ten_thousand_bad_receipts_none_accepted_no_5xx(server):
    before = sqlite3.connect(server.db).execute("SELECT COUNT(*) FROM receipts").fetchone()[0]
    session = requests.Session()  # keep-alive: one connection for the whole barrage
    statuses: collections.Counter = collections.Counter()
    url = f"{server.base}/verify"

    def send(data, headers=JSON):
        if not isinstance(data, (bytes, str)):
            data = json.dumps(data)
        answer = session.post(url, data=data, headers=headers, timeout=60)
        statuses[answer.status_code] += 1
        assert answer.status_code < 500, (answer.status_code, answer.text[:300])
        assert answer.status_code != 200, ("accepted a bad receipt", str(data)[:300])
        assert answer.headers["Content-Type"].startswith("application/json")
        return answer

    for vector in _lines("invalid.jsonl"):
        send(vector["receipt"])
    valid = [r for r in _lines("valid.jsonl") if "challenge" not in r]
    rng = random.Random(1234)
    for _ in range(4600):
        send(_mutate(rng.choice(valid), rng))
    for size in (262_145, 300_000, 1_000_000):
        send(b"{" + b" " * size + b"}")
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "application/jsonx", "", "multipart/form-data"):
        for receipt in valid:
            send(receipt, {"Content-Type": ctype} if ctype else {})
    for depth in (100, 1000, 10_000, 50_000, 100_000):
        send(b"[" * depth + b"]" * depth)
        send(b'{"a":' * depth + b"1" + b"}" * depth)
    for _ in range(100):
        send(bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200))))

    @settings(max_examples=2800, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(json_values)
    def any_json(value):
        send(value)

    @settings(max_examples=2800, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(receipt_shaped)
    def shaped(value):
        send(value)

    any_json()
    shaped()
    total = sum(statuses.values())
    after = sqlite3.connect(server.db).execute("SELECT COUNT(*) FROM receipts").fetchone()[0]
    print(f"\n{total} bad receipts: statuses {dict(statuses)}")
    assert total >= TARGET, total
    assert after == before
    assert set(statuses) <= {400, 409, 413, 415, 422}
