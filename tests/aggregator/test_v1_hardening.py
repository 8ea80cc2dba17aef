"""tops-receipt/1 at an aggregator that still takes it (--accept both): the v1 rows of issue
11's attack table that the aggregator can close without changing v1 itself."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import requests

from tests.support.peers import Aggregator
from tops_job.spec.canonical import digest_of
from tops_job.spec.commitment import HostCommitment, make_openings
from tops_job.spec.inputs import attempt_seed, fill_elements, matrix_key, padded_size
from tops_job.spec.receipt import build_body
from tops_job.spec.signing import LocalKeySigner

SIGNER = LocalKeySigner(bytes(31) + b"\x0b")


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    aggregator = Aggregator(tmp_path_factory.mktemp("aggregator-both") / "agg.sqlite3", accept="both")
    yield aggregator
    aggregator.stop()


def _post(base: str, receipt: dict) -> requests.Response:
    return requests.post(f"{base}/verify", data=json.dumps(receipt), headers={"Content-Type": "application/json"},
                         timeout=60)


def _wrong_receipt(m: int = 16, n: int = 128, k: int = 64, tile: int = 128) -> dict:
    """C with one wrong column in every row: an 8-column sample of a 128-wide tile misses it
    with probability 15/16, so 16 openings pass about a third of the time per fresh sample."""
    nonce = os.urandom(32)
    seed = attempt_seed("did:test:v1", nonce)

    def matrix(key: int, rows: int) -> np.ndarray:
        buf = np.empty(padded_size(rows * k), np.float32)
        fill_elements(key, buf)
        return buf[: rows * k].reshape(rows, k)
    c = matrix(matrix_key(seed, "A"), m) @ matrix(matrix_key(seed, "B"), n).T
    c[:, 5] += 1
    commitment = HostCommitment(c, tile, np.empty((m, n), np.int32))
    body = build_body(did="did:test:v1", pubkey=SIGNER.public_key, run_id="v1-reroll", attempt=0, nonce=nonce,
                      challenge=None, m=m, n=n, k=k, tile=tile, opens=16, dtype="float32", backend="numpy",
                      device="cpu", elapsed_ns=1, started_ms=1, root=commitment.root)
    return dict(body, openings=make_openings(commitment, nonce, 16), sig=SIGNER.sign_digest(digest_of(body)).hex())


def test_same_wrong_receipt_gets_the_same_answer_every_post(both):
    """v1 redrew its column sample per POST (accepted on the 3rd); now the sample is a
    function of the digest."""
    receipt = _wrong_receipt()
    answers = {_post(both.base, receipt).status_code for _ in range(20)}
    assert answers in ({422}, {200})


def test_v1_amplification_header_is_refused_before_work(both):
    receipt = {"schema": "tops-receipt/1", "m": 1, "n": 8, "k": 262144, "tile": 8, "opens": 256}
    begun = time.perf_counter()
    answer = _post(both.base, receipt)
    assert answer.status_code == 422 and answer.json()["error"] == "cost_over_cap"
    assert time.perf_counter() - begun < 5


def test_v2_commitments_are_not_taken_at_verify(both):
    answer = _post(both.base, {"schema": "tops-receipt/2"})
    assert answer.status_code == 422 and answer.json()["error"] == "schema_not_accepted"
