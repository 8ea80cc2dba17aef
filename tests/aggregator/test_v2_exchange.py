"""The reference aggregator's tops-receipt/2 endpoints over real HTTP (docs/spec/receipt-v2.md
§9–§10), and issue 11's attack table at the HTTP level."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import pytest
import requests

from tests.spec.v2_helpers import THIEF_SECRET, WORKER_SECRET, make, resigned
from tests.support.peers import Aggregator
from tests.support.transactions import count_transactions
from tops_job.spec.signing import LocalKeySigner
from tops_job.spec.v2 import digest_of

WORKER_PUB = LocalKeySigner(WORKER_SECRET).public_key
THIEF_PUB = LocalKeySigner(THIEF_SECRET).public_key


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    aggregator = Aggregator(tmp_path_factory.mktemp("aggregator-v2") / "agg.sqlite3", accept="v2")
    yield aggregator
    aggregator.stop()


def _challenge(base: str, did: str = "did:test:worker", pubkey: bytes = WORKER_PUB) -> bytes:
    answer = requests.get(f"{base}/v2/challenge", params={"did": did, "pubkey": pubkey.hex()}, timeout=10)
    assert answer.status_code == 200, answer.text
    return bytes.fromhex(answer.json()["challenge"])


def _exchange(base: str, body) -> dict:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = requests.post(f"{base}/v2/exchange", data=data, headers={"Content-Type": "application/json"}, timeout=60)
    return {"http": answer.status_code, **answer.json()}


def _commit(base: str, commitment: dict) -> dict:
    answer = _exchange(base, {"commit": commitment})
    assert answer["http"] == 200, answer
    return answer["commit"]


def _open(base: str, opened: dict) -> dict:
    answer = _exchange(base, {"open": [opened]})
    assert answer["http"] == 200, answer
    return answer["open"][0]


def _honest(base: str, run_id: str, attempt: int = 0, **kw):
    return make(challenge=_challenge(base), run_id=run_id, attempt=attempt, **kw)


def test_commit_challenge_open_is_accepted_once(v2):
    made = _honest(v2.base, "flow-1")
    first = _commit(v2.base, made.commitment)
    assert first["status"] == 200 and len(first["challenge"]["leaves"]) == 64
    assert _commit(v2.base, made.commitment)["challenge"] == first["challenge"]  # posting again cannot re-roll
    verdict = _open(v2.base, made.opened(first["challenge"]["leaves"]))
    assert verdict == {"status": 200, "digest": made.digest.hex(), "verdict": "accepted", "duplicate": False,
                       "ops": 2 * 8 * 32 * 256, "soundness": "(1-f)^64"}
    again = _open(v2.base, made.opened(first["challenge"]["leaves"]))
    assert again["verdict"] == "accepted" and again["duplicate"] is True
    report = requests.get(f"{v2.base}/v2/runs/flow-1", timeout=10).json()
    assert report["accepted"] == 1 and report["ops_total"] == 2 * 8 * 32 * 256
    assert report["rate_floor_ops_per_s"] > 0


def test_commit_and_open_ride_in_one_request(v2):
    one = _honest(v2.base, "pipeline-1", attempt=0)
    two = _honest(v2.base, "pipeline-1", attempt=1)
    leaves = _commit(v2.base, one.commitment)["challenge"]["leaves"]
    answer = _exchange(v2.base, {"commit": two.commitment, "open": [one.opened(leaves)]})
    assert answer["open"][0]["verdict"] == "accepted"
    assert answer["commit"]["status"] == 200 and "challenge" in answer["commit"]


def test_the_server_counts_the_cpu_of_its_checks(v2):
    """tops_job_aggregator_verify_cpu_seconds_total{protocol="v2"} grows when a commitment is
    checked and when an opened set is verified, and not for an exchange refused before any
    check (the benchmark divides it by the server's CPU)."""
    series = ("tops_job_aggregator_verify_cpu_seconds_total", 'protocol="v2"')
    before = v2.metric(*series)
    assert _exchange(v2.base, b'{"commit": ')["error"] == "malformed_json"
    assert v2.metric(*series) == before
    made = _honest(v2.base, "cpu-1")
    leaves = _commit(v2.base, made.commitment)["challenge"]["leaves"]
    committed = v2.metric(*series)
    assert committed > before
    assert _open(v2.base, made.opened(leaves))["verdict"] == "accepted"
    assert v2.metric(*series) > committed


def test_half_skipped_commitments_are_rejected_however_many_are_tried(v2):
    """Attack 1: the worker may regrind as often as it likes; each try is a new commitment
    whose leaves it learns only after the aggregator recorded it."""
    for attempt in range(12):
        made = _honest(v2.base, "grinder", attempt=attempt, skip_rows=4)
        leaves = _commit(v2.base, made.commitment)["challenge"]["leaves"]
        verdict = _open(v2.base, made.opened(leaves))
        assert verdict["status"] == 422 and verdict["error"] == "wrong_product"
    assert requests.get(f"{v2.base}/v2/runs/grinder", timeout=10).json()["accepted"] == 0


def test_a_rejected_digest_gets_the_same_answer_again(v2):
    """Attack: post the same wrong receipt again. The verdict is remembered; even the right
    openings afterwards do not change it."""
    made = _honest(v2.base, "reroll", skip_rows=8)
    leaves = _commit(v2.base, made.commitment)["challenge"]["leaves"]
    answers = [_open(v2.base, made.opened(leaves)) for _ in range(3)]
    assert {a["error"] for a in answers} == {"wrong_product"}
    assert _commit(v2.base, made.commitment)["error"] == "wrong_product"


def test_k1_cheap_shape_is_refused(v2):
    made = _honest(v2.base, "cheap")
    answer = _commit(v2.base, resigned(made, k=1))
    assert answer["status"] == 422 and answer["error"] == "bad_shape"


def test_stolen_commitment_resigned_by_another_key_earns_nothing_and_victim_is_unharmed(v2):
    victim = _honest(v2.base, "victim-run")
    thief_challenge = _challenge(v2.base, pubkey=THIEF_PUB)
    thief = make(challenge=thief_challenge, run_id="thief-run", secret=THIEF_SECRET)
    stolen_header = dict(thief.header, root=victim.header["root"])
    digest = digest_of(stolen_header)
    stolen = dict(stolen_header, sig=LocalKeySigner(THIEF_SECRET).sign_digest(digest).hex())
    leaves = _commit(v2.base, stolen)["challenge"]["leaves"]
    verdict = _open(v2.base, {"digest": digest.hex(), "openings": victim.opened(leaves)["openings"]})
    assert verdict["error"] == "wrong_product"
    # re-signing the victim's header as it is (nonce bound to the victim's key) fails earlier
    naive = dict(victim.header, pubkey=THIEF_PUB.hex())
    naive["sig"] = LocalKeySigner(THIEF_SECRET).sign_digest(digest_of(naive)).hex()
    assert _commit(v2.base, naive)["error"] == "challenge_mismatch"
    leaves = _commit(v2.base, victim.commitment)["challenge"]["leaves"]
    assert _open(v2.base, victim.opened(leaves))["verdict"] == "accepted"


def test_replayed_nonce_with_another_digest_is_409(v2):
    made = _honest(v2.base, "replay")
    assert _commit(v2.base, made.commitment)["status"] == 200
    answer = _commit(v2.base, resigned(made, elapsed_ns=999))
    assert answer["status"] == 409 and answer["error"] == "replayed_nonce"


def test_run_id_belongs_to_one_key(v2):
    made = _honest(v2.base, "owned-run")
    assert _commit(v2.base, made.commitment)["status"] == 200
    other = make(challenge=_challenge(v2.base, pubkey=THIEF_PUB), run_id="owned-run", secret=THIEF_SECRET)
    answer = _commit(v2.base, other.commitment)
    assert answer["status"] == 409 and answer["error"] == "run_id_taken"


def test_amplification_header_is_refused_from_the_header(v2):
    made = _honest(v2.base, "amp")
    begun = time.perf_counter()
    answer = _commit(v2.base, resigned(made, m=1, n=8, k=262144, tile=8))
    assert answer["error"] == "cost_over_cap" and time.perf_counter() - begun < 5


def test_audit_path_entry_with_spaces_is_rejected(v2):
    made = _honest(v2.base, "spaces")
    leaves = _commit(v2.base, made.commitment)["challenge"]["leaves"]
    opened = made.opened(leaves)
    node = opened["openings"][0]["path"][0]
    opened["openings"][0]["path"][0] = " ".join(node[i:i + 2] for i in range(0, 62, 2))
    assert _open(v2.base, opened)["error"] == "bad_path"


@pytest.mark.parametrize("field", ["did", "device", "dtype", "backend"])
def test_empty_required_strings_are_rejected(v2, field):
    made = _honest(v2.base, f"empty-{field}")
    assert _commit(v2.base, resigned(made, **{field: ""}))["status"] == 422


def test_utf16_body_is_400(v2):
    made = _honest(v2.base, "utf16")
    answer = _exchange(v2.base, json.dumps({"commit": made.commitment}).encode("utf-16"))
    assert answer["http"] == 400 and answer["error"] == "not_utf8"


def test_unknown_run_challenge_and_opened_set_for_unknown_commitment(v2):
    made = make(run_id="nochallenge")  # a challenge this aggregator never issued
    assert _commit(v2.base, made.commitment)["error"] == "unknown_challenge"
    answer = _open(v2.base, made.opened([0] * 64))
    assert answer["status"] == 404 and answer["error"] == "unknown_commitment"


def test_challenge_endpoint_checks_its_parameters(v2):
    assert requests.get(f"{v2.base}/v2/challenge", params={"did": "", "pubkey": WORKER_PUB.hex()}, timeout=5).status_code == 400
    assert requests.get(f"{v2.base}/v2/challenge", params={"did": "d", "pubkey": "02" + "AB" * 32}, timeout=5).status_code == 400


def test_v1_receipts_are_not_accepted_by_default(v2):
    answer = requests.post(f"{v2.base}/verify", data=json.dumps({"schema": "tops-receipt/1"}),
                           headers={"Content-Type": "application/json"}, timeout=10)
    assert answer.status_code == 422 and answer.json()["error"] == "schema_not_accepted"


def test_expired_run_challenge_and_expired_openings_are_enforced(tmp_path):
    aggregator = Aggregator(tmp_path / "short.sqlite3", "--run-ttl", "1", "--open-ttl", "1", accept="v2")
    try:
        late = make(challenge=_challenge(aggregator.base), run_id="late")
        time.sleep(1.2)
        answer = _commit(aggregator.base, late.commitment)
        assert answer["status"] == 410 and answer["error"] == "challenge_expired"
        made = make(challenge=_challenge(aggregator.base), run_id="slow")
        leaves = _commit(aggregator.base, made.commitment)["challenge"]["leaves"]
        time.sleep(1.2)
        answer = _open(aggregator.base, made.opened(leaves))
        assert answer["status"] == 410 and answer["error"] == "challenge_expired"
        keys = requests.get(f"{aggregator.base}/v2/keys/{WORKER_PUB.hex()}", timeout=5).json()
        assert keys["abandoned"] == 1 and keys["accepted"] == 0
    finally:
        aggregator.stop()


def _call(app, method, path, body=b"", query=""):
    import io

    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "CONTENT_TYPE": "application/json",
               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
    status, answer, _headers = app.route(environ)
    return status, answer


def test_a_resource_failure_is_503_and_records_nothing(tmp_path, monkeypatch):
    """Under a memory cap v1 answered an honest receipt `422 unverifiable` (final); v2 answers
    503 verifier_busy and the same opened set is accepted once resources are back."""
    from tops_job.aggregator import v2_exchange
    from tops_job.aggregator.app import AggregatorApp
    from tops_job.aggregator.store import Store

    app = AggregatorApp(Store(tmp_path / "agg.sqlite3"))
    status, issued = _call(app, "GET", "/v2/challenge", query=f"did=did:test:worker&pubkey={WORKER_PUB.hex()}")
    assert status == 200
    made = make(challenge=bytes.fromhex(issued["challenge"]), run_id="busy")
    status, answer = _call(app, "POST", "/v2/exchange", json.dumps({"commit": made.commitment}).encode())
    leaves = answer["commit"]["challenge"]["leaves"]
    body = json.dumps({"open": [made.opened(leaves)]}).encode()

    def out_of_memory(*args, **kwargs):
        raise MemoryError
    monkeypatch.setattr(v2_exchange, "check_opened", out_of_memory)
    status, answer = _call(app, "POST", "/v2/exchange", body)
    assert status == 200 and answer["open"][0]["status"] == 503 and answer["open"][0]["error"] == "verifier_busy"
    monkeypatch.undo()
    status, answer = _call(app, "POST", "/v2/exchange", body)
    assert answer["open"][0]["verdict"] == "accepted"


def _committed_in_app(tmp_path, run_id: str, attempts: int = 2):
    """An in-process app with a run challenge, and `attempts` attempts of one run."""
    from tops_job.aggregator.app import AggregatorApp
    from tops_job.aggregator.store import Store

    store = Store(tmp_path / "agg.sqlite3")
    app = AggregatorApp(store)
    status, issued = _call(app, "GET", "/v2/challenge", query=f"did=did:test:worker&pubkey={WORKER_PUB.hex()}")
    assert status == 200
    made = [make(challenge=bytes.fromhex(issued["challenge"]), run_id=run_id, attempt=i) for i in range(attempts)]
    return app, store, made


def test_a_run_challenge_read_once_is_refused_once_expired_and_unknown_once_purged(tmp_path):
    """The endpoints keep a run challenge they have read while it is unexpired (every
    commitment of a run names it); expired, it is read again and refused, and purged it is
    unknown, as if it had never been kept."""
    from tops_job.aggregator.app import AggregatorApp
    from tops_job.aggregator.store import Store
    from tops_job.aggregator.v2_exchange import RETENTION_MS, V2Endpoints
    from tops_job.aggregator.v2_store import V2Store

    now = [1_000_000.0]
    store = Store(tmp_path / "agg.sqlite3")
    app = AggregatorApp(store, v2=V2Endpoints(V2Store(store), clock=lambda: now[0], run_ttl_ms=60_000))
    status, issued = _call(app, "GET", "/v2/challenge", query=f"did=did:test:worker&pubkey={WORKER_PUB.hex()}")
    assert status == 200

    def commit(attempt: int) -> dict:
        made = make(challenge=bytes.fromhex(issued["challenge"]), run_id="kept", attempt=attempt)
        status, answer = _call(app, "POST", "/v2/exchange", json.dumps({"commit": made.commitment}).encode())
        assert status == 200
        return dict(answer["commit"])

    assert commit(0)["status"] == commit(1)["status"] == 200
    now[0] += 61  # the run challenge has expired
    assert commit(2)["error"] == "challenge_expired"
    now[0] += RETENTION_MS / 1000
    assert _call(app, "GET", "/v2/challenge", query=f"did=did:test:other&pubkey={WORKER_PUB.hex()}")[0] == 200  # purges
    assert commit(3)["error"] == "unknown_challenge"
    store.close()


def test_an_exchange_records_its_verdict_and_commitment_in_one_transaction(tmp_path):
    """A worker's usual exchange (the next commitment with the last openings) is one commit and
    one fsync, not one per item."""
    app, store, (one, two) = _committed_in_app(tmp_path, "one-transaction")
    status, answer = _call(app, "POST", "/v2/exchange", json.dumps({"commit": one.commitment}).encode())
    leaves = answer["commit"]["challenge"]["leaves"]
    transactions = count_transactions(store)
    body = {"commit": two.commitment, "open": [one.opened(leaves)]}
    status, answer = _call(app, "POST", "/v2/exchange", json.dumps(body).encode())
    assert status == 200 and answer["open"][0]["verdict"] == "accepted" and "challenge" in answer["commit"]
    assert transactions == [1]
    assert app.v2.store.commitment(one.digest.hex())["state"] == "accepted"
    assert app.v2.store.commitment(two.digest.hex())["leaves"] == answer["commit"]["challenge"]["leaves"]
    status, again = _call(app, "POST", "/v2/exchange", json.dumps(body).encode())  # a resend: answered from the records
    assert again["open"][0]["duplicate"] is True and again["commit"] == answer["commit"] and transactions == [1]


def test_the_same_opened_set_twice_in_one_exchange_is_verified_once(tmp_path, monkeypatch):
    from tops_job.aggregator import v2_exchange

    app, store, (one,) = _committed_in_app(tmp_path, "twice", attempts=1)
    status, answer = _call(app, "POST", "/v2/exchange", json.dumps({"commit": one.commitment}).encode())
    opened = one.opened(answer["commit"]["challenge"]["leaves"])
    verified = []
    check_opened = v2_exchange.check_opened
    monkeypatch.setattr(v2_exchange, "check_opened", lambda *a: verified.append(1) or check_opened(*a))
    status, answer = _call(app, "POST", "/v2/exchange", json.dumps({"open": [opened, opened, opened]}).encode())
    assert len(verified) == 1
    assert [item["duplicate"] for item in answer["open"]] == [False, True, True]
    assert {item["verdict"] for item in answer["open"]} == {"accepted"}


def test_a_failed_transaction_records_neither_item_and_the_resend_succeeds(tmp_path, monkeypatch):
    """The verdict and the commitment are committed together or not at all: after a 503 the
    worker sends the same exchange again and gets both."""
    import sqlite3

    app, store, (one, two) = _committed_in_app(tmp_path, "all-or-nothing")
    status, answer = _call(app, "POST", "/v2/exchange", json.dumps({"commit": one.commitment}).encode())
    leaves = answer["commit"]["challenge"]["leaves"]
    body = json.dumps({"commit": two.commitment, "open": [one.opened(leaves)]}).encode()
    group_write = store.group_write

    def fails_at_commit(write):
        def then_fails(conn):
            write(conn)
            raise sqlite3.OperationalError("disk I/O error")
        return group_write(then_fails)
    monkeypatch.setattr(store, "group_write", fails_at_commit)
    with pytest.raises(sqlite3.OperationalError):  # the app's WSGI edge answers it 503 storage_unavailable
        _call(app, "POST", "/v2/exchange", body)
    assert app.v2.store.commitment(one.digest.hex())["state"] == "committed" and app.v2.store.commitment(two.digest.hex()) is None
    monkeypatch.undo()
    status, answer = _call(app, "POST", "/v2/exchange", body)
    assert answer["open"][0]["verdict"] == "accepted" and answer["open"][0]["duplicate"] is False
    assert answer["commit"]["status"] == 200 and "challenge" in answer["commit"]


def test_a_commitment_resent_with_its_own_opened_set_is_answered_with_the_verdict(tmp_path):
    """The opened sets are judged before the commitment (§10.2), as when each was written on
    its own; a resent commitment alone costs no transaction."""
    app, store, (one,) = _committed_in_app(tmp_path, "own-set", attempts=1)
    status, answer = _call(app, "POST", "/v2/exchange", json.dumps({"commit": one.commitment}).encode())
    leaves = answer["commit"]["challenge"]["leaves"]
    transactions = count_transactions(store)
    status, resent = _call(app, "POST", "/v2/exchange", json.dumps({"commit": one.commitment}).encode())
    assert resent["commit"]["challenge"]["leaves"] == leaves and transactions == []
    body = {"commit": one.commitment, "open": [one.opened(leaves)]}
    status, answer = _call(app, "POST", "/v2/exchange", json.dumps(body).encode())
    assert answer["open"][0] == {**answer["open"][0], "verdict": "accepted", "duplicate": False}
    assert answer["commit"]["verdict"] == "accepted" and answer["commit"]["duplicate"] is True
    assert transactions == [1]


def test_a_new_commitment_is_not_read_first_and_another_process_answers_a_resend_from_the_record(tmp_path, monkeypatch):
    """A commitment this process has not checked goes straight to the insert (no read of its
    record first); sent again to another worker process, or a replica, it is answered from the
    record the insert's conflict finds: the same leaves, and the same verdict once opened."""
    from tops_job.aggregator.app import AggregatorApp
    from tops_job.aggregator.store import Store

    here, store, (one, two) = _committed_in_app(tmp_path, "two-processes")
    there = AggregatorApp(Store(tmp_path / "agg.sqlite3"))  # another worker process on the same database
    reads = []
    monkeypatch.setattr(here.v2.store, "commitment", lambda digest, read=here.v2.store.commitment: reads.append(digest) or read(digest))
    status, first = _call(here, "POST", "/v2/exchange", json.dumps({"commit": one.commitment}).encode())
    leaves = first["commit"]["challenge"]["leaves"]
    assert status == 200 and reads == []
    status, again = _call(there, "POST", "/v2/exchange", json.dumps({"commit": one.commitment}).encode())
    assert again["commit"] == first["commit"]
    status, opened = _call(there, "POST", "/v2/exchange", json.dumps({"open": [one.opened(leaves)]}).encode())
    assert opened["open"][0]["verdict"] == "accepted"
    status, late = _call(here, "POST", "/v2/exchange", json.dumps({"commit": one.commitment}).encode())
    assert late["commit"]["verdict"] == "accepted" and late["commit"]["duplicate"] is True
    assert reads == [one.digest.hex()]  # sent again where it was checked: read, not inserted
    status, answer = _call(there, "POST", "/v2/exchange", json.dumps({"commit": two.commitment}).encode())
    status, again = _call(here, "POST", "/v2/exchange", json.dumps({"commit": two.commitment}).encode())
    assert again["commit"] == answer["commit"] and "challenge" in answer["commit"]
    there.v2.store.close()
    store.close()


def test_an_opening_uses_the_commitment_its_process_checked_and_rebuilds_one_checked_elsewhere(tmp_path, monkeypatch):
    """The worker process that checked a commitment keeps it for the opening; another one
    rebuilds it from the record (recorded_commitment), and so does this one when the record
    was drawn with another s."""
    from tops_job.aggregator import v2_exchange
    from tops_job.aggregator.app import AggregatorApp
    from tops_job.aggregator.store import Store

    here, store, (one, two, three) = _committed_in_app(tmp_path, "kept", attempts=3)
    there = AggregatorApp(Store(tmp_path / "agg.sqlite3"))
    rebuilt = []
    monkeypatch.setattr(v2_exchange, "recorded_commitment",
                        lambda obj, s, rebuild=v2_exchange.recorded_commitment: rebuilt.append(obj["attempt"]) or rebuild(obj, s=s))

    def commit_then_open(made, committing, opening) -> dict:
        status, answer = _call(committing, "POST", "/v2/exchange", json.dumps({"commit": made.commitment}).encode())
        leaves = answer["commit"]["challenge"]["leaves"]
        status, answer = _call(opening, "POST", "/v2/exchange", json.dumps({"open": [made.opened(leaves)]}).encode())
        return dict(answer["open"][0])

    assert commit_then_open(one, here, here)["verdict"] == "accepted" and rebuilt == []
    assert commit_then_open(two, here, there)["verdict"] == "accepted" and rebuilt == [1]
    status, answer = _call(here, "POST", "/v2/exchange", json.dumps({"commit": three.commitment}).encode())
    kept = here.v2._checked[three.digest.hex()]
    kept.committed, kept.record = dataclasses.replace(kept.committed, s=65), None  # as if a replica's record had s = 64
    status, answer = _call(here, "POST", "/v2/exchange", json.dumps({"open": [three.opened(answer["commit"]["challenge"]["leaves"])]}).encode())
    assert answer["open"][0]["verdict"] == "accepted" and rebuilt == [1, 2]
    there.v2.store.close()
    store.close()


def test_an_opening_of_a_commitment_recorded_here_reads_nothing_first_and_its_resend_reads_the_record(tmp_path, monkeypatch):
    """The process that recorded a commitment judges its opening against the record it wrote,
    without reading it; the opened set sent again is read and answered from the record,
    never verified twice."""
    from tops_job.aggregator import v2_exchange

    app, store, (one,) = _committed_in_app(tmp_path, "unread", attempts=1)
    status, answer = _call(app, "POST", "/v2/exchange", json.dumps({"commit": one.commitment}).encode())
    leaves = answer["commit"]["challenge"]["leaves"]
    reads, verified = [], []
    monkeypatch.setattr(app.v2.store, "commitment", lambda digest, read=app.v2.store.commitment: reads.append(digest) or read(digest))
    monkeypatch.setattr(v2_exchange, "check_opened", lambda *a, check=v2_exchange.check_opened: verified.append(1) or check(*a))
    body = json.dumps({"open": [one.opened(leaves)]}).encode()
    status, answer = _call(app, "POST", "/v2/exchange", body)
    assert answer["open"][0]["verdict"] == "accepted" and answer["open"][0]["duplicate"] is False
    assert reads == [] and verified == [1]
    status, again = _call(app, "POST", "/v2/exchange", body)
    assert again["open"][0] == {**answer["open"][0], "duplicate": True}
    assert reads and set(reads) == {one.digest.hex()} and verified == [1]
    store.close()


def test_an_opening_here_of_a_commitment_another_process_decided_is_answered_from_the_record(tmp_path):
    """A replica (or another worker process) accepted the opened set first: the one sent here
    too is judged against the record this process wrote, and its verdict's write, which moves
    only a committed record, finds it accepted: the answer is the record's. A rejection
    recorded elsewhere stands the same way, and a record deleted by hand is unknown."""
    from tops_job.aggregator.app import AggregatorApp
    from tops_job.aggregator.store import Store

    here, store, (one, two, three) = _committed_in_app(tmp_path, "decided-elsewhere", attempts=3)
    there = AggregatorApp(Store(tmp_path / "agg.sqlite3"))
    committed = []
    for made in (one, two, three):
        status, answer = _call(here, "POST", "/v2/exchange", json.dumps({"commit": made.commitment}).encode())
        committed.append(answer["commit"]["challenge"]["leaves"])
    status, first = _call(there, "POST", "/v2/exchange", json.dumps({"open": [one.opened(committed[0])]}).encode())
    assert first["open"][0]["duplicate"] is False
    status, answer = _call(here, "POST", "/v2/exchange", json.dumps({"open": [one.opened(committed[0])]}).encode())
    assert answer["open"][0] == {**first["open"][0], "duplicate": True}
    forged = two.opened(committed[1])
    forged["openings"][0]["values"] = forged["openings"][1]["values"]
    status, rejected = _call(there, "POST", "/v2/exchange", json.dumps({"open": [forged]}).encode())
    assert rejected["open"][0]["status"] == 422
    status, answer = _call(here, "POST", "/v2/exchange", json.dumps({"open": [two.opened(committed[1])]}).encode())
    assert answer["open"][0] == rejected["open"][0]
    with store._conn() as conn:
        conn.execute("DELETE FROM v2_commitments WHERE digest = ?", (three.digest.hex(),))
    status, answer = _call(here, "POST", "/v2/exchange", json.dumps({"open": [three.opened(committed[2])]}).encode())
    assert status == 200 and answer["open"][0]["status"] == 404 and answer["open"][0]["error"] == "unknown_commitment"
    there.v2.store.close()
    store.close()


def test_a_run_committed_here_is_not_read_for_its_owner_again_and_a_rolled_back_one_is(tmp_path, monkeypatch):
    """Once a commitment of a run is committed the run is its key's for good: the run's next
    commitments skip the owner's read. A write rolled back teaches nothing, and another key
    is still refused the run."""
    import sqlite3

    app, store, (one, two) = _committed_in_app(tmp_path, "owned")
    statements: list[str] = []
    store._conn().set_trace_callback(statements.append)

    def owner_reads() -> int:
        return sum("FROM v2_runs" in statement for statement in statements)

    failing = True
    group_write = store.group_write

    def fails_once(write):
        if failing:
            return group_write(lambda conn: (write(conn), conn.execute("SELECT * FROM no_such_table")))
        return group_write(write)
    monkeypatch.setattr(store, "group_write", fails_once)
    with pytest.raises(sqlite3.OperationalError):  # the app's __call__ answers it 503
        _call(app, "POST", "/v2/exchange", json.dumps({"commit": one.commitment}).encode())
    assert app.v2.store.commitment(one.digest.hex()) is None
    failing = False
    reads = owner_reads()
    status, answer = _call(app, "POST", "/v2/exchange", json.dumps({"commit": one.commitment}).encode())
    assert "challenge" in answer["commit"] and owner_reads() > reads  # nothing was learned from the rolled-back write
    reads = owner_reads()
    status, answer = _call(app, "POST", "/v2/exchange", json.dumps({"commit": two.commitment}).encode())
    assert "challenge" in answer["commit"] and owner_reads() == reads
    status, issued = _call(app, "GET", "/v2/challenge", query=f"did=did:test:thief&pubkey={THIEF_PUB.hex()}")
    stolen = make(challenge=bytes.fromhex(issued["challenge"]), run_id="owned", attempt=2, secret=THIEF_SECRET,
                  did="did:test:thief")
    status, answer = _call(app, "POST", "/v2/exchange", json.dumps({"commit": stolen.commitment}).encode())
    assert answer["commit"]["status"] == 409 and answer["commit"]["error"] == "run_id_taken"
    store._conn().set_trace_callback(None)
    store.close()


def test_on_a_poll_thread_an_exchange_over_the_inline_cost_asks_for_a_thread_before_any_work(tmp_path, monkeypatch):
    """serve.py's inline lane: an exchange whose opened sets cost more than the gate's inline
    cost raises RunInThread on the poll thread before verifying or writing anything, and is
    answered in full when it runs again on a pool thread. A commitment alone costs nothing."""
    import threading

    from tops_job.aggregator import guard, v2_exchange
    from tops_job.spec.v2 import cost_of

    app, store, (one, two) = _committed_in_app(tmp_path, "lanes")
    verified: list[int] = []
    check_opened = v2_exchange.check_opened
    monkeypatch.setattr(v2_exchange, "check_opened", lambda *a: verified.append(1) or check_opened(*a))
    transactions = count_transactions(store)

    def on_poll_thread(data: bytes) -> Any:
        seen: dict[str, Any] = {}

        def run() -> None:
            guard.serve_inline_here()
            try:
                seen["answer"] = _call(app, "POST", "/v2/exchange", data)
            except guard.RunInThread:
                seen["answer"] = "to a thread"
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        return seen["answer"]

    status, answer = on_poll_thread(json.dumps({"commit": one.commitment}).encode())  # no opened set: inline
    assert status == 200 and transactions == [1]
    leaves = answer["commit"]["challenge"]["leaves"]
    cost = cost_of(one.commitment, 64)
    app.gate.inline_cost = cost - 1
    body = json.dumps({"commit": two.commitment, "open": [one.opened(leaves)]}).encode()
    assert on_poll_thread(body) == "to a thread"
    assert verified == [] and transactions == [1]
    assert _state(app, one) == "committed" and app.v2.store.commitment(two.digest.hex()) is None
    status, answer = _call(app, "POST", "/v2/exchange", body)  # on the pool thread
    assert answer["open"][0]["verdict"] == "accepted" and "challenge" in answer["commit"]
    assert verified == [1] and transactions == [1, 1] and app.gate.busy == 0
    app.gate.inline_cost = cost  # at the inline cost it runs where it is
    status, again = on_poll_thread(body)
    assert again["open"][0]["duplicate"] is True and verified == [1]


def _state(app, made) -> str:
    return app.v2.store.commitment(made.digest.hex())["state"]


def test_the_steady_clock_keeps_one_epoch_and_never_goes_back():
    from tops_job.aggregator.v2_exchange import steady_clock

    readings = [steady_clock() for _ in range(200)]
    epochs = {epoch for epoch, _ in readings}
    assert len(epochs) == 1  # read once, the same for every accepted attempt of this process
    epoch = epochs.pop()
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:  # Linux, as everywhere these tests run
        assert epoch == "boot:" + handle.read().strip()
    times = [ms for _, ms in readings]
    assert times == sorted(times) and abs(times[-1] - time.clock_gettime(time.CLOCK_BOOTTIME) * 1000) < 1000
