"""The tops-receipt/2 vectors (docs/spec/receipt-v2.md §15), made by scripts/make_v2_vectors.py,
an implementation written from the spec's text that imports nothing from tops_job: the
library accepts every valid one with the same digest and leaves and rejects every invalid
one with its listed code, and the script reproduces the committed files exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tops_job.spec.errors import ReceiptInvalid
from tops_job.spec.v2 import challenge_leaves, check_commitment, fs_leaves, parse_json, verify_challenge_transcript, verify_fs_receipt

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "tests" / "vectors" / "v2"
SCRIPT = ROOT / "scripts" / "make_v2_vectors.py"


def _load(name: str) -> list[dict]:
    return [json.loads(line) for line in (VECTORS / name).read_text().splitlines() if line]


VALID, INVALID = _load("valid.jsonl"), _load("invalid.jsonl")


def _verify(vector: dict):
    if "commitment_bytes_hex" in vector:
        obj = parse_json(bytes.fromhex(vector["commitment_bytes_hex"]))
    else:
        obj = vector["commitment"]
    if vector["kind"] == "challenge":
        return verify_challenge_transcript(obj, vector.get("opened"), verifier_key=bytes.fromhex(vector["verifier_key"]),
                                           s=vector["s"])
    return verify_fs_receipt(obj)


def test_vector_files_cover_both_modes_and_every_reason():
    assert {v["kind"] for v in VALID} == {"challenge", "fiat-shamir"}
    assert len(INVALID) >= 40 and all(v["reason"] and v["expect"] != "accept" for v in INVALID)


@pytest.mark.parametrize("vector", VALID, ids=[v["name"] for v in VALID])
def test_valid_vector_is_accepted_with_its_digest_and_leaves(vector):
    verified = _verify(vector)
    assert verified.digest.hex() == vector["digest"]
    if vector["kind"] == "challenge":
        committed = check_commitment(vector["commitment"], s=vector["s"])
        leaves = challenge_leaves(bytes.fromhex(vector["verifier_key"]), committed.digest, vector["s"], committed.leaf_count)
        assert verified.soundness == f"(1-f)^{vector['s']}"
    else:
        r = vector["commitment"]
        leaves = fs_leaves(verified.digest, r["m"] * -(-r["n"] // r["tile"]))
        assert verified.soundness.startswith("grinding-bounded")
    assert leaves == vector["leaves"]


@pytest.mark.parametrize("vector", INVALID, ids=[v["name"] for v in INVALID])
def test_invalid_vector_is_rejected_with_its_code(vector):
    with pytest.raises(ReceiptInvalid) as info:
        _verify(vector)
    assert info.value.code == vector["expect"], vector["reason"]


def test_script_reproduces_the_committed_vectors(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], check=True, capture_output=True, timeout=300)
    for name in ("valid.jsonl", "invalid.jsonl"):
        assert (tmp_path / name).read_bytes() == (VECTORS / name).read_bytes(), name
