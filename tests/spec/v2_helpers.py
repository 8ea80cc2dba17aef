"""Honest and cheating tops-receipt/2 commitments built with NumPy, for the v2 tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from tops_job.spec.inputs import fill_elements, matrix_key, padded_size
from tops_job.spec.merkle import MerkleTree, leaf_hash
from tops_job.spec.signing import LocalKeySigner
from tops_job.spec.v2 import CHALLENGE, attempt_seed, build_header, digest_of, make_openings, nonce_from_challenge

WORKER_SECRET = bytes(31) + b"\x07"
THIEF_SECRET = bytes(31) + b"\x09"


def product(seed: bytes, m: int, n: int, k: int) -> np.ndarray:
    def matrix(key: int, rows: int) -> np.ndarray:
        buf = np.empty(padded_size(rows * k), np.float32)
        fill_elements(key, buf)
        return buf[: rows * k].reshape(rows, k)
    return (matrix(matrix_key(seed, "A"), m) @ matrix(matrix_key(seed, "B"), n).T).astype(np.int32)


@dataclass
class Made:
    header: dict[str, Any]
    commitment: dict[str, Any]  # header + sig
    digest: bytes
    data: list[bytes]  # leaf data
    tree: MerkleTree

    def leaf_data(self, leaf: int) -> bytes:
        return self.data[leaf]

    def audit_path(self, leaf: int) -> list[bytes]:
        return self.tree.audit_path(leaf)

    def opened(self, leaves: list[int]) -> dict[str, Any]:
        return {"digest": self.digest.hex(), "openings": make_openings(self, leaves)}


def make(*, m: int = 8, n: int = 32, k: int = 256, tile: int = 8, mode: str = CHALLENGE, attempt: int = 0,
         did: str = "did:test:worker", run_id: str = "run-1", secret: bytes = WORKER_SECRET,
         challenge: bytes | None = None, skip_rows: int = 0, sign_with: bytes | None = None,
         **fields: Any) -> Made:
    """One attempt; `skip_rows` rows of C are left as zeros (a cheating worker)."""
    signer = LocalKeySigner(secret)
    pub = signer.public_key
    if challenge is None and mode == CHALLENGE:
        challenge = os.urandom(32)
    nonce = nonce_from_challenge(challenge, pub, attempt) if challenge else os.urandom(32)
    c = product(attempt_seed(pub, did, nonce), m, n, k)
    c[:skip_rows] = 0
    data = [c[i, lo: lo + tile].astype("<i4").tobytes() for i in range(m) for lo in range(0, n, tile)]
    tree = MerkleTree([leaf_hash(d) for d in data])
    header = build_header(mode=mode, did=did, pubkey=pub, run_id=run_id, attempt=attempt, nonce=nonce,
                          challenge=challenge, m=m, n=n, k=k, tile=tile, dtype="float32", backend="numpy",
                          device="test cpu", elapsed_ns=1000, started_ms=1764547200000, root=tree.root)
    header.update(fields)
    digest = digest_of(header)
    sig = LocalKeySigner(sign_with).sign_digest(digest) if sign_with else signer.sign_digest(digest)
    return Made(header=header, commitment=dict(header, sig=sig.hex()), digest=digest, data=data, tree=tree)


def resigned(made: Made, secret: bytes = WORKER_SECRET, **changes: Any) -> dict[str, Any]:
    """The commitment with `changes` to its header, signed again (so only the change is wrong)."""
    header = dict(made.header, **changes)
    return dict(header, sig=LocalKeySigner(secret).sign_digest(digest_of(header)).hex())
