"""Receipt verification, spec §8. One library for `tops-job verify`, the local ledger and the
reference aggregator, so all three accept and reject exactly the same receipts."""

from __future__ import annotations

import base64
import binascii
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from .canonical import digest_of
from .commitment import leaf_columns, opening_indices, tiles_per_row
from .errors import ReceiptInvalid
from .inputs import attempt_seed, element_rows, matrix_key, nonce_from_challenge
from .merkle import leaf_hash, root_from_path
from .receipt import DEFAULT_MIN_OPENS, check_fields
from .signing import is_low_s, recover_public_key
from .v2.product import tile_values

SPOT_COLUMNS = 8  # §8.5: at least min(width, 8) columns per opening


@dataclass(frozen=True)
class Verified:
    """What an accepted receipt proved."""

    digest: bytes
    pubkey: bytes
    did: str
    run_id: str
    attempt: int
    nonce: str
    ops: int
    started_ms: int

    def response(self, duplicate: bool = False) -> dict[str, Any]:
        """The aggregator's 200 answer (spec §9), with the seed worker's field names."""
        return {"ok": True, "sig_ok": True, "proof_ok": True, "pubkey_hex": self.pubkey.hex(),
                "digest_hex": self.digest.hex(), "duplicate": duplicate}


def verify_receipt(receipt: Any, *, min_opens: int = DEFAULT_MIN_OPENS, full: bool = False,
                   rng: random.Random | None = None) -> Verified:
    """Accept `receipt` (a parsed JSON value) or raise ReceiptInvalid naming the first rule
    it breaks. `full` recomputes every revealed value instead of a random sample of columns."""
    check_fields(receipt, min_opens=min_opens)
    r = receipt
    nonce = bytes.fromhex(r["nonce"])
    if "challenge" in r and nonce_from_challenge(bytes.fromhex(r["challenge"]), r["attempt"]) != nonce:
        raise ReceiptInvalid("challenge_mismatch", "nonce does not follow from the challenge")

    digest = digest_of(r)
    sig = bytes.fromhex(r["sig"])
    if not is_low_s(sig):
        raise ReceiptInvalid("high_s", "signature s is not in the lower half of the curve order")
    recovered = recover_public_key(digest, sig)
    if recovered is None:
        raise ReceiptInvalid("bad_signature", "signature recovers no key")
    if recovered.hex() != r["pubkey"]:
        raise ReceiptInvalid("signer_mismatch", "signature was not made by pubkey")

    # The columns to recompute come from the verifier's own randomness, unknown to the worker.
    _check_openings(r, nonce, full=full, rng=rng or random.Random(os.urandom(32)))
    return Verified(digest=digest, pubkey=recovered, did=r["did"], run_id=r["run_id"],
                    attempt=r["attempt"], nonce=r["nonce"], ops=r["ops"], started_ms=r["started_ms"])


def _check_openings(r: dict[str, Any], nonce: bytes, *, full: bool, rng: random.Random) -> None:
    m, n, k, tile, opens = r["m"], r["n"], r["k"], r["tile"], r["opens"]
    openings = r["openings"]
    if len(openings) != opens:
        raise ReceiptInvalid("openings_count", f"{len(openings)} openings for opens={opens}")
    root = bytes.fromhex(r["root"])
    leaf_count = m * tiles_per_row(n, tile)
    expected = opening_indices(root, nonce, opens, leaf_count)

    checks: list[tuple[int, int, np.ndarray, np.ndarray]] = []  # (j, row, columns, revealed values)
    for j, (opening, leaf) in enumerate(zip(openings, expected)):
        if not isinstance(opening, dict) or set(opening) != {"leaf", "values", "path"}:
            raise ReceiptInvalid("bad_opening", f"opening {j} must have exactly leaf, values, path")
        if type(opening["leaf"]) is not int or opening["leaf"] != leaf:
            raise ReceiptInvalid("wrong_leaf", f"opening {j} names leaf {opening['leaf']!r}, expected {leaf}")
        row, lo, hi = leaf_columns(leaf, n, tile)
        data = _decode_values(opening["values"], j, hi - lo)
        path = _decode_path(opening["path"], j)
        if root_from_path(leaf_hash(data), leaf, leaf_count, path) != root:
            raise ReceiptInvalid("bad_merkle_path", f"opening {j}: path does not prove the values under root")
        values = np.frombuffer(data, dtype="<i4")
        width = hi - lo
        columns = np.arange(width) if full else np.array(sorted(rng.sample(range(width), min(width, SPOT_COLUMNS))))
        checks.append((j, row, lo + columns, values[columns]))

    seed = attempt_seed(r["did"], nonce)
    if full:  # whole tiles in bounded chunks, each distinct row generated once (v2's product check)
        tiles = tile_values(seed, n=n, k=k, tile=tile, leaves=expected)
        for (j, row, columns, revealed), leaf in zip(checks, expected):
            bad = np.flatnonzero(tiles[leaf] != revealed)
            if bad.size:
                raise ReceiptInvalid("wrong_product", f"opening {j}: C[{row}][{columns[bad[0]]}] is not A·B")
        return
    # Recompute the sampled entries of C from §2: one row of A and one row of Bt each.
    key_a, key_b = matrix_key(seed, "A"), matrix_key(seed, "B")
    a_rows = element_rows(key_a, np.array([row * k for _, row, _, _ in checks], dtype=np.uint64), k)
    cols = np.concatenate([c for _, _, c, _ in checks])
    b_rows = element_rows(key_b, cols.astype(np.uint64) * np.uint64(k), k)
    at = 0
    for index, (j, row, columns, revealed) in enumerate(checks):
        recomputed = b_rows[at : at + len(columns)] @ a_rows[index]
        at += len(columns)
        bad = np.flatnonzero(recomputed != revealed)
        if bad.size:
            raise ReceiptInvalid("wrong_product", f"opening {j}: C[{row}][{columns[bad[0]]}] is not A·B")


def _decode_values(values: Any, j: int, width: int) -> bytes:
    if not isinstance(values, str):
        raise ReceiptInvalid("bad_values", f"opening {j}: values must be a base64 string")
    try:
        data = base64.b64decode(values, validate=True)
    except (binascii.Error, ValueError):
        raise ReceiptInvalid("bad_values", f"opening {j}: values are not standard padded base64") from None
    if base64.b64encode(data).decode("ascii") != values:
        # validate=True still ignores the unused low bits before '=': one canonical form only.
        raise ReceiptInvalid("bad_values", f"opening {j}: values are not in canonical padded base64")
    if len(data) != 4 * width:
        raise ReceiptInvalid("bad_values", f"opening {j}: {len(data)} bytes of values for a tile of width {width}")
    return data


def _decode_path(path: Any, j: int) -> list[bytes]:
    if not isinstance(path, list) or len(path) > 64:
        raise ReceiptInvalid("bad_path", f"opening {j}: path must be a list of hashes")
    nodes = []
    for node in path:
        if not isinstance(node, str) or len(node) != 64 or node != node.lower():
            raise ReceiptInvalid("bad_path", f"opening {j}: path entries are 32 bytes of lowercase hex")
        try:
            nodes.append(bytes.fromhex(node))
        except ValueError:
            raise ReceiptInvalid("bad_path", f"opening {j}: path entries are 32 bytes of lowercase hex") from None
    return nodes



def cost_of(receipt: Any, *, full: bool) -> int:
    """opens * (columns checked + 1) * k, from the header alone (0 when it is not well typed:
    verification rejects it first). The cap is the caller's (receipt-v2.md §8 step 7)."""
    if not isinstance(receipt, dict):
        return 0
    values = [receipt.get(name) for name in ("opens", "tile", "k")]
    if not all(type(v) is int and 0 <= v < 2**53 for v in values):
        return 0
    opens, tile, k = (int(v) for v in values if isinstance(v, int))
    return opens * ((tile if full else min(tile, SPOT_COLUMNS)) + 1) * k
