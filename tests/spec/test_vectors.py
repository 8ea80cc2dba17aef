"""The spec's vectors, made by an independent implementation: every valid one verifies with
the digest it lists, every invalid one is rejected."""

from __future__ import annotations

import json

import pytest

from tests.support import VECTORS_DIR
from tops_job.errors import ReceiptInvalid
from tops_job.spec.canonical import digest_of
from tops_job.spec.verify import verify_receipt


def _valid():
    return [json.loads(line) for line in (VECTORS_DIR / "valid.jsonl").read_text().splitlines() if line]


def _invalid():
    return [json.loads(line) for line in (VECTORS_DIR / "invalid.jsonl").read_text().splitlines() if line]


def _digests():
    lines = (VECTORS_DIR / "digests.txt").read_text().split("\n")
    return [line.split()[0] for line in lines if line.strip()]


def test_vector_files_are_not_empty():
    assert len(_valid()) >= 6 and len(_invalid()) >= 20


@pytest.mark.parametrize("full", [False, True], ids=["sampled", "full"])
@pytest.mark.parametrize("index", range(6))
def test_valid_vectors_verify_with_listed_digest(index, full):
    receipt = _valid()[index]
    verified = verify_receipt(receipt, full=full)
    assert verified.digest.hex() == _digests()[index]
    assert verified.pubkey.hex() == receipt["pubkey"]


@pytest.mark.parametrize("case", _invalid(), ids=lambda c: c["reason"])
def test_invalid_vectors_are_rejected(case):
    # Full and sampled checks must both reject: sampling only ever skips columns.
    with pytest.raises(ReceiptInvalid):
        verify_receipt(case["receipt"], full=True)
    with pytest.raises(ReceiptInvalid):
        verify_receipt(case["receipt"])


def test_digest_is_sha256_of_sorted_compact_body():
    receipt = _valid()[0]
    import hashlib

    body = {k: v for k, v in receipt.items() if k not in ("openings", "sig")}
    expected = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).digest()
    assert digest_of(receipt) == expected
