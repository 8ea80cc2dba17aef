"""The self-audit on tops-receipt/2 attempts: a challenge-mode commitment has no openings, so
the worker recomputes random tiles from the seed and compares them with the device's leaf
hashes; a fiat-shamir receipt is verified as any verifier does."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.spec.v2_helpers import make
from tops_job.job.device_guard import audit_v2
from tops_job.spec.errors import ReceiptInvalid
from tops_job.spec.v2 import FIAT_SHAMIR, fs_leaves


@dataclass
class Result:
    receipt: dict
    digest: bytes
    leaf_hashes: bytes | None = None


def _result(made):
    return Result(made.commitment, made.digest, b"".join(made.tree.levels[0]))


def test_an_honest_commitment_passes():
    audit_v2(_result(make()), leaves=64)


def test_a_device_that_got_c_wrong_is_caught():
    with pytest.raises(ReceiptInvalid) as info:
        audit_v2(_result(make(skip_rows=8)), leaves=16)  # every row of C zero
    assert info.value.code == "wrong_product"


def test_leaf_hashes_that_do_not_give_the_root_are_caught():
    result = _result(make())
    result.leaf_hashes = bytes(32) + result.leaf_hashes[32:]
    with pytest.raises(ValueError):
        audit_v2(result, leaves=1)


def test_fiat_shamir_receipts_are_verified():
    made = make(mode=FIAT_SHAMIR, challenge=None, m=4, n=16, tile=4)
    audit_v2(Result(dict(made.commitment, openings=made.opened(fs_leaves(made.digest, 16))["openings"]),
                    made.digest), leaves=16)
    bad = make(mode=FIAT_SHAMIR, challenge=None, m=4, n=16, tile=4, skip_rows=4)
    with pytest.raises(ReceiptInvalid):
        audit_v2(Result(dict(bad.commitment, openings=bad.opened(fs_leaves(bad.digest, 16))["openings"]),
                        bad.digest), leaves=16)
