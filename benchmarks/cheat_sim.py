"""A cheating worker against tops-receipt/1 and /2: it skips a fraction f of C's leaves
(commits zeros there) and grinds as hard as it likes. Observed acceptance against the bound.

    python benchmarks/cheat_sim.py [--trials 2000] [--grind-seconds 20]

- v1 (Fiat–Shamir, opens = 16): the worker changes one skipped leaf, updates the root
  (log2 L hashes) and recomputes the openings until none lands in its skipped leaves; the
  winning receipt is then checked by the real v1 verifier.
- v2 challenge mode (s = 64): the leaves come from the verifier's secret after the
  commitment; grinding the root has no oracle to grind against, so the simulator submits
  `trials` fresh cheating commitments and counts acceptances by the real v2 verifier.
- v2 fiat-shamir (s = 256, 2^16-hash chain): grinding as for v1, for `--grind-seconds`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import struct
import time

import numpy as np

from tops_job.spec import commitment as v1_commitment
from tops_job.spec.canonical import digest_of as v1_digest_of
from tops_job.spec.errors import ReceiptInvalid
from tops_job.spec.inputs import attempt_seed as v1_seed
from tops_job.spec.inputs import fill_elements, matrix_key, padded_size
from tops_job.spec.merkle import MerkleTree, leaf_hash
from tops_job.spec.receipt import build_body
from tops_job.spec.signing import LocalKeySigner
from tops_job.spec.v2 import (
    CHALLENGE,
    FIAT_SHAMIR,
    S_DEFAULT,
    S_FS,
    attempt_seed,
    build_header,
    challenge_leaves,
    check_commitment,
    check_opened,
    digest_of,
    fs_leaves,
    make_openings,
    nonce_from_challenge,
)
from tops_job.spec.verify import verify_receipt

M, N, K, TILE = 32, 64, 256, 4  # L = 512 leaves
SIGNER = LocalKeySigner(bytes(31) + b"\x05")
DID = "did:sim:cheater"


def product(seed: bytes) -> np.ndarray:
    def matrix(key: int, rows: int) -> np.ndarray:
        buf = np.empty(padded_size(rows * K), np.float32)
        fill_elements(key, buf)
        return buf[: rows * K].reshape(rows, K)
    return (matrix(matrix_key(seed, "A"), M) @ matrix(matrix_key(seed, "B"), N).T).astype(np.int32)


def leaves_of(c: np.ndarray) -> list[bytes]:
    return [c[i, lo: lo + TILE].astype("<i4").tobytes() for i in range(M) for lo in range(0, N, TILE)]


class Incremental:
    """A Merkle tree whose leaves change one at a time (the grinder's root update: log2 L hashes)."""

    def __init__(self, data: list[bytes]):
        self.data = list(data)
        self.tree = MerkleTree([leaf_hash(d) for d in data])

    def set(self, leaf: int, value: bytes) -> None:
        self.data[leaf] = value
        levels = self.tree.levels
        levels[0][leaf] = leaf_hash(value)
        index = leaf
        for depth in range(1, len(levels)):
            index >>= 1
            below = levels[depth - 1]
            left = 2 * index
            levels[depth][index] = (hashlib.sha256(b"\x01" + below[left] + below[left + 1]).digest()
                                    if left + 1 < len(below) else below[left])

    @property
    def root(self) -> bytes:
        return self.tree.root

    @property
    def leaf_count(self) -> int:
        return len(self.data)

    def leaf_data(self, leaf: int) -> bytes:
        return self.data[leaf]

    def audit_path(self, leaf: int) -> list[bytes]:
        return self.tree.audit_path(leaf)


def cheat_data(honest: list[bytes], f: float, rng: random.Random) -> tuple[list[bytes], list[int]]:
    skipped = sorted(rng.sample(range(len(honest)), max(1, round(f * len(honest)))))
    data = list(honest)
    for leaf in skipped:
        data[leaf] = bytes(len(honest[leaf]))
    return data, skipped


def grinding_tree(seed: bytes, f: float, rng: random.Random) -> tuple[list[bytes], set[int], int, Incremental]:
    """A cheater's leaves for the product of `seed` (a fraction `f` skipped), the skipped
    leaves, the one it re-rolls while grinding, and the tree it commits to."""
    data, skipped = cheat_data(leaves_of(product(seed)), f, rng)
    return data, set(skipped), skipped[0], Incremental(data)


def grind_v1(f: float, seconds: float, rng: random.Random) -> dict:
    nonce = os.urandom(32)
    data, skipped_set, spare, tree = grinding_tree(v1_seed(DID, nonce), f, rng)
    begun, tries = time.perf_counter(), 0
    while time.perf_counter() - begun < seconds:
        tries += 1
        opened = v1_commitment.opening_indices(tree.tree.root, nonce, 16, len(data))
        if not skipped_set.intersection(opened):
            body = build_body(did=DID, pubkey=SIGNER.public_key, run_id="sim", attempt=0, nonce=nonce, challenge=None,
                              m=M, n=N, k=K, tile=TILE, opens=16, dtype="float32", backend="sim", device="sim",
                              elapsed_ns=1, started_ms=1, root=tree.tree.root)
            receipt = dict(body, openings=v1_commitment.make_openings(tree, nonce, 16),
                           sig=SIGNER.sign_digest(v1_digest_of(body)).hex())
            verify_receipt(receipt, full=True)  # raises if the real verifier disagrees
            return {"accepted": True, "tries": tries, "seconds": time.perf_counter() - begun}
        tree.set(spare, struct.pack("<Q", tries).ljust(len(data[spare]), b"\x00"))  # still not the true tile
    return {"accepted": False, "tries": tries, "seconds": time.perf_counter() - begun}


def v2_challenge_trials(f: float, trials: int, rng: random.Random) -> dict:
    verifier_key = os.urandom(32)
    accepted = 0
    challenge = os.urandom(32)
    for attempt in range(trials):
        nonce = nonce_from_challenge(challenge, SIGNER.public_key, attempt)
        honest = leaves_of(product(attempt_seed(SIGNER.public_key, DID, nonce)))
        data, _ = cheat_data(honest, f, rng)
        tree = Incremental(data)
        header = build_header(mode=CHALLENGE, did=DID, pubkey=SIGNER.public_key, run_id="sim", attempt=attempt,
                              nonce=nonce, challenge=challenge, m=M, n=N, k=K, tile=TILE, dtype="float32",
                              backend="sim", device="sim", elapsed_ns=1, started_ms=1, root=tree.tree.root)
        digest = digest_of(header)
        committed = check_commitment(dict(header, sig=SIGNER.sign_digest(digest).hex()), s=S_DEFAULT)
        leaves = challenge_leaves(verifier_key, digest, S_DEFAULT, committed.leaf_count)
        try:
            check_opened(committed, leaves, {"digest": digest.hex(), "openings": make_openings(tree, leaves)})
            accepted += 1
        except ReceiptInvalid:
            pass
    return {"accepted": accepted, "trials": trials}


def grind_v2_fs(f: float, seconds: float, rng: random.Random) -> dict:
    nonce = os.urandom(32)
    data, skipped_set, spare, tree = grinding_tree(attempt_seed(SIGNER.public_key, DID, nonce), f, rng)
    begun, tries = time.perf_counter(), 0
    while time.perf_counter() - begun < seconds:
        tries += 1
        header = build_header(mode=FIAT_SHAMIR, did=DID, pubkey=SIGNER.public_key, run_id="sim", attempt=0,
                              nonce=nonce, challenge=None, m=M, n=N, k=K, tile=TILE, dtype="float32", backend="sim",
                              device="sim", elapsed_ns=1, started_ms=1, root=tree.tree.root)
        leaves = fs_leaves(digest_of(header), len(data))
        if not skipped_set.intersection(leaves):
            return {"accepted": True, "tries": tries, "seconds": time.perf_counter() - begun}
        tree.set(spare, struct.pack("<Q", tries).ljust(len(data[spare]), b"\x00"))
    return {"accepted": False, "tries": tries, "seconds": time.perf_counter() - begun}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=2000, help="v2 challenge-mode commitments per f")
    parser.add_argument("--grind-seconds", type=float, default=20.0, help="grinding budget per f (v1, v2 fiat-shamir)")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print(f"shape {M}x{N}x{K}, tile {TILE}: L = {M * N // TILE} leaves; one CPU core\n")
    print("| f | v1 (FS, s=16): bound per try | v1 grinding, observed | v2 challenge (s=64): bound | v2 challenge, observed "
          "| v2 fiat-shamir (s=256): bound per try | v2 FS grinding, observed |")
    print("|---|---|---|---|---|---|---|")
    for f in (0.01, 0.1, 0.5):
        g1 = grind_v1(f, args.grind_seconds, rng)
        v2 = v2_challenge_trials(f, args.trials, rng)
        fs = grind_v2_fs(f, args.grind_seconds, rng)
        g1_text = (f"accepted after {g1['tries']} tries, {g1['seconds']:.2f} s" if g1["accepted"]
                   else f"not accepted in {g1['tries']} tries, {g1['seconds']:.0f} s")
        fs_text = (f"accepted after {fs['tries']} tries, {fs['seconds']:.2f} s" if fs["accepted"]
                   else f"not accepted in {fs['tries']} tries, {fs['seconds']:.0f} s")
        print(f"| {f} | {(1 - f) ** 16:.3g} | {g1_text} | {(1 - f) ** S_DEFAULT:.3g} | "
              f"{v2['accepted']}/{v2['trials']} = {v2['accepted'] / v2['trials']:.3g} | {(1 - f) ** S_FS:.3g} | {fs_text} |")


if __name__ == "__main__":
    main()
